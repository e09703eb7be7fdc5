"""The fault proxy itself: it passes traffic through and loses one committed reply."""

from __future__ import annotations

import psycopg
import pytest

from tests.faults.harness import query, upstream_socket
from tests.faults.proxy import PgProxy


async def test_proxy_loses_the_reply_of_a_committed_statement(dsn: str) -> None:
    await query(dsn, "CREATE TABLE marks (n integer)")
    async with PgProxy(upstream_socket(dsn)) as proxy:
        via = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=proxy.port,
                                             sslmode="disable",
                                             gssencmode="disable")
        async with await psycopg.AsyncConnection.connect(via, autocommit=True) as conn:
            await conn.execute("INSERT INTO marks VALUES (1)")
            proxy.arm(r"INSERT INTO marks")
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("INSERT INTO marks VALUES (%s)", (2,))
        async with await psycopg.AsyncConnection.connect(via) as conn:  # in a transaction
            proxy.arm(r"VALUES \(3\)")
            await conn.execute("INSERT INTO marks VALUES (3)")
            await conn.execute("SELECT 1")  # replies pass while the transaction is open
            with pytest.raises(psycopg.OperationalError):
                await conn.commit()
        async with await psycopg.AsyncConnection.connect(via) as conn:
            # Pipelined, reading rows mid-transaction (a Flush, no Sync): they must arrive.
            proxy.arm(r"VALUES \(4\)")
            with pytest.raises(psycopg.OperationalError):
                async with conn.pipeline(), conn.transaction():
                    cur = await conn.execute("INSERT INTO marks VALUES (4) RETURNING n")
                    assert await cur.fetchall() == [(4,)]
                    await conn.execute("INSERT INTO marks VALUES (5)")
    assert [d.committed for d in proxy.drops] == [True, True, True]
    assert await query(dsn, "SELECT n FROM marks ORDER BY n") == [
        {"n": n} for n in range(1, 6)]
