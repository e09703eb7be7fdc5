"""baton behind PgBouncer in transaction mode, and inspection from a read URL.

The PgBouncer tests start a real ``pgbouncer`` (Debian's package: 1.18, which does not
track prepared statements) in front of the suite's server, with a pool of 20 server
connections per database.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import baton
from baton.cli import main
from baton.db import connect_sync
from baton.errors import ConfigurationError
from baton.testing import running_worker, wait_for_jobs
from tests.conftest import TEMPLATE, Server
from tests.helpers import live_workers, reap, sql_rows, worker_process

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
needs_pgbouncer = pytest.mark.skipif(
    PGBOUNCER is None and not os.environ.get("CI"),
    reason="pgbouncer is not installed (apt-get install pgbouncer); CI installs it")

POOL_SIZE = 20
CLIENTS = 200
JOBS_PER_CLIENT = 5
COPY_BATCH = 100


class Bouncer:
    """A running PgBouncer in transaction mode in front of the suite's server."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log

    def url(self, dsn: str) -> str:
        """``dsn`` (a database of the suite's server) reached through the pooler."""
        return make_conninfo(dsn, host="127.0.0.1", port=str(self.port))

    def admin(self, dsn: str, command: str) -> list[dict[str, Any]]:
        """Run ``command`` (``SHOW POOLS``, ...) on the admin console; rows as dicts."""
        url = make_conninfo(self.url(dsn), dbname="pgbouncer")
        # The console speaks the simple query protocol only: a client-side cursor.
        with psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor,
                             prepare_threshold=None) as conn:
            cur = conn.execute(command)
            names = [col.name for col in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> list[str]:
    """PgBouncer refuses to run as root: run it as the embedded server's user (it can reach
    that server's socket), else as nobody."""
    if os.geteuid() != 0:
        return []
    for user in ("embedded_postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["-u", user]
    pytest.fail("pgbouncer cannot run as root and no other user exists")


@pytest.fixture(scope="module")
def bouncer(pg_server: Server) -> Iterator[Bouncer]:
    if PGBOUNCER is None:
        pytest.fail("pgbouncer is not installed; CI must install it (apt-get install pgbouncer)")
    server = conninfo_to_dict(pg_server.url)
    user = str(server.get("user") or "postgres")
    folder = Path(tempfile.mkdtemp(prefix="baton-pgbouncer-"))
    folder.chmod(0o755)  # readable by the user it runs as
    # The password (if the server wants one) is the one baton's URL carries.
    (folder / "userlist.txt").write_text(f'"{user}" "{server.get("password") or ""}"\n')
    target = " ".join(f"{key}={server[key]}" for key in ("host", "port") if server.get(key))
    port = _free_port()
    (folder / "pgbouncer.ini").write_text(f"""\
[databases]
* = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/userlist.txt
admin_users = {user}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 400
""")
    for path in folder.iterdir():
        path.chmod(0o644)
    log = folder / "pgbouncer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PGBOUNCER, *_run_as(), str(folder / "pgbouncer.ini")],
                                stdout=out, stderr=subprocess.STDOUT)
    bouncer = Bouncer(port, log)
    try:
        try:  # retries while the port is not open yet
            connect_sync(make_conninfo(bouncer.url(pg_server.url), dbname="pgbouncer"), 15,
                         autocommit=True).close()
        except Exception:
            proc.kill()
            proc.wait()
            raise AssertionError(f"pgbouncer did not start:\n{log.read_text()[-3000:]}"
                                 ) from None
        yield bouncer
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def _pooled_app(dsn: str, bouncer: Bouncer, runs: Counter[int], listen_dsn: str | None = None
                ) -> baton.Baton:
    """An app whose URL goes through the pooler and whose LISTEN connections do not."""
    app = baton.Baton(bouncer.url(dsn), listen_dsn=listen_dsn or dsn, pooler="transaction")

    @app.step(name="tally")
    async def tally(n: int) -> int:
        runs[n] += 1
        return n

    @app.step(name="total")
    async def total(ctx: baton.Context, n: int) -> int:
        runs[n] += 1
        return sum(ctx.results.values())

    return app


@needs_pgbouncer
async def test_queue_and_workflows_through_pgbouncer(dsn: str, bouncer: Bouncer) -> None:
    """200 clients held open at once enqueue jobs and workflows through 20 server
    connections; a worker behind the same pooler runs them all, each once, woken by
    NOTIFY heard on its direct LISTEN connection alone (no polling)."""
    runs: Counter[int] = Counter()
    app = _pooled_app(dsn, bouncer, runs)
    tally, total = app.steps["tally"], app.steps["total"]
    dbname = conninfo_to_dict(dsn)["dbname"]
    connected = anyio.Event()
    enqueued = anyio.Event()
    release = anyio.Event()
    counts = {"connected": 0, "enqueued": 0}
    workflow_ids: dict[int, uuid.UUID] = {}
    job_ids: list[int] = []

    def workflow(client: int) -> baton.Workflow:
        base = 1_000_000 + client * 10
        wf = baton.Workflow(f"client-{client}")
        wf.add("a", tally.new(n=base))
        wf.add("b", tally.new(n=base + 1), deps=["a"])
        wf.add("c", tally.new(n=base + 2), deps=["a"])
        wf.add("d", total.new(n=base + 3), deps=["b", "c"])
        return wf

    async def client(n: int) -> None:
        # A client of the pooler, as an application would open it: nothing prepared.
        async with await psycopg.AsyncConnection.connect(
                bouncer.url(dsn), prepare_threshold=None) as conn:
            counts["connected"] += 1
            if counts["connected"] == CLIENTS:
                connected.set()
            await connected.wait()  # all 200 are open before any writes
            jobs = [tally.new(n=n * 100 + i) for i in range(JOBS_PER_CLIENT)]
            job_ids.extend(await app.enqueue_many(jobs, conn=conn))
            workflow_ids[n] = await app.insert(workflow(n), conn=conn)
            await conn.commit()
            counts["enqueued"] += 1
            if counts["enqueued"] == CLIENTS:
                enqueued.set()
            await release.wait()  # held open until the pooler has been looked at

    finished: set[uuid.UUID] = set()
    with anyio.fail_after(180):
        async with app.events.subscribe() as events, \
                running_worker(app, queues={"default": 20}, poll_interval=3600):
            async with anyio.create_task_group() as tg:
                for n in range(CLIENTS):
                    tg.start_soon(client, n)
                await enqueued.wait()
                clients = [c for c in bouncer.admin(dsn, "SHOW CLIENTS")
                           if c["database"] == dbname]
                servers = [s for s in bouncer.admin(dsn, "SHOW SERVERS")
                           if s["database"] == dbname]
                backends = sql_rows(dsn, "SELECT count(*) FROM pg_stat_activity "
                                         "WHERE datname = current_database()")[0][0]
                release.set()
            assert len(clients) >= CLIENTS  # the 200, and the app's own pool
            assert 0 < len(servers) <= POOL_SIZE
            # On the server: the pooler's 20 at most, the worker's notifier and heartbeat,
            # the subscription, and this count's own connection.
            assert backends <= POOL_SIZE + 4
            # From synchronous code, and a batch large enough to go by COPY, too.
            sync_id = await anyio.to_thread.run_sync(
                lambda: app.enqueue_sync(tally.new(n=999_999)))
            job_ids.append(sync_id)
            job_ids.extend(await app.enqueue_many([tally.new(n=2_000_000 + i)
                                                   for i in range(COPY_BATCH)]))
            async for event in events:
                if event.type == "workflow_finished":
                    assert event.outcome == "completed"
                    finished.add(event.workflow_id)
                    if len(finished) == CLIENTS:
                        break
            while sql_rows(dsn, "SELECT count(*) FROM baton.jobs WHERE state <> 'completed'"
                           )[0][0]:
                await anyio.sleep(0.05)
        for n in (0, CLIENTS - 1):  # the results came through the pooler whole
            base = 1_000_000 + n * 10
            assert await app.results(workflow_ids[n]) == {
                "a": base, "b": base + 1, "c": base + 2, "d": 2 * base + 3}
    await app.close()

    assert finished == set(workflow_ids.values())
    expected = {n * 100 + i for n in range(CLIENTS) for i in range(JOBS_PER_CLIENT)}
    expected |= {1_000_000 + c * 10 + k for c in range(CLIENTS) for k in range(4)}
    expected |= {999_999, *range(2_000_000, 2_000_000 + COPY_BATCH)}
    assert set(runs) == expected and set(runs.values()) == {1}  # none lost, none twice
    assert len(set(job_ids)) == CLIENTS * JOBS_PER_CLIENT + 1 + COPY_BATCH
    [(jobs, attempts)] = sql_rows(dsn, "SELECT count(*), max(attempt) FROM baton.jobs")
    assert (jobs, attempts) == (len(expected), 1)


@needs_pgbouncer
async def test_listen_connections_bypass_the_pooler(dsn: str, bouncer: Bouncer) -> None:
    """A worker's LISTEN and heartbeat and an event subscription connect to listen_dsn;
    the pooled connections prepare nothing."""
    app = _pooled_app(dsn, bouncer, Counter(),
                      listen_dsn=make_conninfo(dsn, application_name="direct-url"))
    async with app.events.subscribe(), running_worker(app) as worker:
        async with app.connection() as conn:
            assert conn.prepare_threshold is None
        heartbeat = worker._heartbeat
        assert heartbeat is not None
        with anyio.fail_after(10):
            while heartbeat.beats == 0:  # its connection opens at the first beat
                await anyio.sleep(0.01)
        direct = sql_rows(dsn, "SELECT application_name, query FROM pg_stat_activity "
                               "WHERE datname = current_database() AND (query LIKE 'LISTEN%' "
                               "OR application_name = 'baton-heartbeat')")
        # The worker's notifier (named by the URL) and heartbeat (its last statement reads
        # the live workers), and the subscription.
        assert sorted(name for name, _ in direct) == [
            "baton-events", "baton-heartbeat", "direct-url"]
        assert all(query.startswith("LISTEN") for name, query in direct
                   if name != "baton-heartbeat")
        through = {c["application_name"] for c in bouncer.admin(dsn, "SHOW CLIENTS")}
        assert not through & {"baton-events", "baton-heartbeat", "direct-url"}
    await app.close()


@needs_pgbouncer
async def test_cli_worker_through_pgbouncer(dsn: str, bouncer: Bouncer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``baton worker`` behind the pooler: the pooler from the environment, the direct
    URL from ``--listen-url``."""
    from tests.apps import procs

    monkeypatch.setenv("BATON_POOLER", "transaction")
    app = baton.Baton(bouncer.url(dsn), listen_dsn=dsn)
    direct = make_conninfo(dsn, application_name="direct-url")
    proc = worker_process(bouncer.url(dsn), "tests.apps.procs:app", "--listen-url", direct)
    try:
        with anyio.fail_after(60):
            while live_workers(dsn) == 0:
                await anyio.sleep(0.05)
        ids = await app.enqueue_many([procs.quick.new(n=n) for n in range(50)])
        await wait_for_jobs(app, ids, ["completed"], timeout=60)
        assert sql_rows(dsn, "SELECT application_name FROM pg_stat_activity WHERE datname = "
                             "current_database() AND query LIKE 'LISTEN%'") == [("direct-url",)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)
        await app.close()


def test_pooler_needs_a_listen_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATON_LISTEN_URL", raising=False)
    app = baton.Baton("postgresql:///x", pooler="transaction")
    with pytest.raises(ConfigurationError, match="listen_dsn"):
        _ = app.listen_dsn
    monkeypatch.setenv("BATON_LISTEN_URL", "postgresql:///direct")
    assert app.listen_dsn == "postgresql:///direct"
    monkeypatch.setenv("BATON_POOLER", "transaction")
    assert baton.Baton("postgresql:///x").pooler == "transaction"
    monkeypatch.setenv("BATON_POOLER", "statement")
    with pytest.raises(ConfigurationError, match="unknown pooler"):
        baton.Baton("postgresql:///x")
    assert baton.Baton("postgresql:///x", listen_dsn="postgresql:///y",
                       pooler="transaction").listen_dsn == "postgresql:///y"


async def test_pooled_worker_without_listen_url_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATON_LISTEN_URL", raising=False)
    app = baton.Baton("postgresql://nobody@127.0.0.1:1/none", pooler="transaction")
    with pytest.raises(ConfigurationError, match="listen_dsn"):
        await baton.Worker(app).run()  # before any connection is tried
    assert not app.is_open


@pytest.fixture
def replica_dsn(pg_server: Server, template_db: str) -> Iterator[str]:
    """A second database standing in for a read replica (with other contents)."""
    name = f"baton_replica_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(TEMPLATE)))
    yield pg_server.dsn(name)
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture
async def read_app(dsn: str, replica_dsn: str) -> AsyncIterator[baton.Baton]:
    app = baton.Baton(dsn, read_dsn=replica_dsn)

    @app.step(name="noop")
    async def noop() -> None:
        return None

    yield app
    await app.close()


async def test_inspection_reads_the_read_url(read_app: baton.Baton, dsn: str,
                                             replica_dsn: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    noop = read_app.steps["noop"]
    primary_id = await read_app.enqueue(noop.new())  # writes go to dsn
    assert (await read_app.get_job(primary_id)).state == "available"
    replica = baton.Baton(replica_dsn)
    await replica.enqueue_many([noop.new(), noop.new(), noop.new()])
    await replica.close()

    status = await read_app.query.status()
    assert [(q.queue, q.counts) for q in status.queues] == [("default", {"available": 3})]
    assert len(await read_app.query.jobs()) == 3
    jobs = await anyio.to_thread.run_sync(lambda: read_app.query.jobs_sync())
    assert len(jobs) == 3
    assert read_app.read_dsn == replica_dsn

    # The CLI runs its own event loop: in a thread.
    assert await anyio.to_thread.run_sync(
        main, ["status", "--dsn", dsn, "--read-url", replica_dsn, "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[out.index("{"):])
    assert data["queues"][0]["counts"] == {"available": 3}
    assert await anyio.to_thread.run_sync(main, ["status", "--dsn", dsn, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["queues"][0]["counts"] == {
        "available": 1}


def test_read_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_READ_URL", "postgresql:///replica")
    assert baton.Baton("postgresql:///x").read_dsn == "postgresql:///replica"
    monkeypatch.delenv("BATON_READ_URL")
    assert baton.Baton("postgresql:///x").read_dsn == "postgresql:///x"
