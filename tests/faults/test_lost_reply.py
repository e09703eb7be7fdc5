"""Lost replies: a proxy between the workers and the server throws away the reply to a
committed statement (a claim, an outcome write, a result, a gate read, a heartbeat) and
closes the connection."""

from __future__ import annotations

import anyio
import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import Server
from tests.faults.conftest import MakeScenario
from tests.faults.harness import upstream_socket
from tests.faults.proxy import PgProxy
from tests.faults.scenario import verdict

STATEMENTS = {
    "claim": r"SET state = 'executing'",          # jobs_fetch
    "finish": r"WITH outcome AS",                  # jobs_finish (and what rides with it)
    "result": r"SET result = jsonb_build_object",  # node_store_result
    "gates": r"n\.has_result, n\.result",          # node_gates (its transaction's COMMIT)
    "heartbeat": r"INSERT INTO \S+\.worker_registry",
}
ROUNDS = 3


@pytest.mark.timeout(300)
async def test_replies_lost_after_commit(make_scenario: MakeScenario, dsn: str,
                                         pg_server: Server) -> None:
    if not pg_server.embedded:
        pytest.skip("the proxy forwards to the suite's own server's Unix socket")
    async with PgProxy(upstream_socket(dsn)) as proxy:
        via = make_conninfo(dsn, host="127.0.0.1", port=proxy.port, sslmode="disable",
                            gssencmode="disable")
        s = make_scenario("lost_reply", worker_dsn=via)
        async with s.running():
            for i in range(2):
                s.cluster.start(f"w{i}", {"default": 10})
            missed = []
            for _ in range(ROUNDS):
                # Fresh work for each round, so that every kind of statement comes by.
                await s.enqueue_tiny(1_500)
                await s.insert_workflows(40)
                for name, pattern in STATEMENTS.items():
                    proxy.arm(pattern)
                    with anyio.move_on_after(10):
                        await proxy.wait_dropped()
                    if proxy.armed:  # the statement did not come by in time
                        proxy.disarm()
                        missed.append(name)
                        continue
                    s.faults[f"lost_reply_{name}"] += 1
            s.notes["drops_not_triggered"] = missed
            s.notes["drops_rolled_back"] = sum(not d.committed for d in proxy.drops)
            s.notes["proxy_connections"] = proxy.connections
            violations = await s.finish()
    assert not violations, verdict(violations)
    assert not missed, f"statements that never came by while armed: {missed}"
