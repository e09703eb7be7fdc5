"""Queue limits: concurrency across workers, rate and token windows, partitions, the CLI,
and a queue without limits keeping the plain fetch."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import anyio
import pytest

import baton
from baton import cli
from baton.errors import ConfigurationError
from baton.limits import Window, parse_window
from baton.testing import running_worker, wait_for_jobs
from tests.apps import limited
from tests.conftest import bound
from tests.helpers import live_workers, reap, sql_rows, worker_process

Q = limited.QUEUE


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    async with bound(limited.app, dsn) as bound_app:
        yield bound_app


def most_at_once(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """The most intervals ``[start, end)`` open at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def busiest_window(starts: Sequence[datetime], seconds: float) -> int:
    """The most of ``starts`` in any window ``[t, t + seconds)``."""
    starts = sorted(starts)
    width = timedelta(seconds=seconds)
    most, first = 0, 0
    for last, at in enumerate(starts):
        while starts[first] <= at - width:
            first += 1
        most = max(most, last - first + 1)
    return most


def job_times(dsn: str, ids: Sequence[int]) -> list[tuple[datetime, datetime, Any]]:
    return [tuple(row) for row in sql_rows(  # type: ignore[misc]
        dsn, "SELECT attempted_at, finalized_at, args FROM baton.jobs "
        "WHERE id = ANY(%s) ORDER BY attempted_at, id", (list(ids),))]


# -- settings ----------------------------------------------------------------------------


def test_windows_parse() -> None:
    assert parse_window("20/1s") == Window(limit=20, seconds=1.0)
    assert parse_window("20/s") == parse_window((20, 1))
    assert parse_window("100/500ms") == Window(limit=100, seconds=0.5)
    assert parse_window("1000/1m").seconds == 60.0
    assert str(parse_window((5, 3600.0))) == "5/3600s"
    for bad in ("20", "0/1s", "20/0s", "x/1s", (0, 1.0), (20, 0), (True, 1.0)):
        with pytest.raises(ConfigurationError):
            parse_window(bad)  # type: ignore[arg-type]


async def test_limits_are_set_listed_replaced_and_removed(app: baton.Baton) -> None:
    with pytest.raises(ConfigurationError, match="no limit given"):
        await app.limit_queue(Q)
    with pytest.raises(ConfigurationError, match="concurrency"):
        await app.limit_queue(Q, concurrency=0)
    first = await app.limit_queue(Q, concurrency=3, rate=(20, 1.0), tokens="100000/1m",
                                  partition_by="customer")
    assert (first.concurrency, first.rate, first.tokens, first.partition_by) == (
        3, Window(limit=20, seconds=1.0), Window(limit=100_000, seconds=60.0), "customer")
    assert first.describe() == "concurrency 3, rate 20/1s, tokens 100000/60s per customer"
    with pytest.raises(ConfigurationError, match="without partition_by"):
        await app.limit_queue(Q, total_concurrency=5)
    capped = await app.limit_queue(Q, concurrency=2, partition_by="customer",
                                   total_concurrency=10)
    assert capped.describe() == "concurrency 2 per customer; concurrency 10 in all"
    again = app.limit_queue_sync(Q, rate="5/1s")  # replaces every limit
    assert (again.concurrency, again.rate, again.partition_by) == (None, parse_window("5/s"),
                                                                    None)
    assert [lim.queue for lim in await app.queue_limits()] == [Q]
    assert app.queue_limits_sync(["other"]) == []
    assert await app.unlimit_queue(Q) is True
    assert app.unlimit_queue_sync(Q) is False
    assert await app.queue_limits() == []


# -- concurrency -------------------------------------------------------------------------


async def test_global_concurrency_holds_across_worker_processes(app: baton.Baton) -> None:
    """Four workers with two slots each never run more than three jobs of the queue.

    Two slots, not more: a worker whose jobs end refills its own room at once, so one that
    could take all three would leave the others nothing to show that they share it."""
    await app.limit_queue(Q, concurrency=3)
    procs = [worker_process(app.dsn, "tests.apps.limited:app", "--queues", f"{Q}=2",
                            "--poll-interval", "0.5") for _ in range(4)]
    samples: list[int] = []
    try:
        with anyio.fail_after(90):
            # Every worker is up before the jobs come: the first one alone would drain them.
            while live_workers(app.dsn) < len(procs):
                await anyio.sleep(0.05)
            ids = await app.enqueue_many([limited.nap.new(seconds=0.05) for _ in range(60)])
            while True:
                rows = sql_rows(app.dsn, "SELECT count(*) FILTER (WHERE state = 'executing'), "
                                "count(*) FILTER (WHERE state = 'completed') FROM baton.jobs")
                samples.append(rows[0][0])
                if rows[0][1] == len(ids):
                    break
                await anyio.sleep(0.002)  # a sample every few ms, not a synchronisation
        workers = sql_rows(app.dsn, "SELECT count(DISTINCT attempted_by) FROM baton.jobs")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            reap(proc)
    assert max(samples) == 3, Counter(samples)
    # Exact, not sampled: a job leaves executing (finalized_at) before the claim that sees
    # its room starts the next (attempted_at), so the intervals never overlap by more.
    times = job_times(app.dsn, ids)
    assert most_at_once([(start, end) for start, end, _ in times]) == 3
    assert workers[0][0] >= 2  # the limit is shared, not one worker's


async def test_a_queue_without_limits_keeps_the_plain_fetch(app: baton.Baton) -> None:
    await app.limit_queue(Q, concurrency=1)
    free = await app.enqueue_many([limited.free_nap.new(seconds=0.2) for _ in range(8)])
    capped = await app.enqueue_many([limited.nap.new(seconds=0.01) for _ in range(4)])
    async with running_worker(app, queues={Q: 8, "unlimited": 8}) as worker:
        assert worker.limits.applies(Q) and not worker.limits.applies("unlimited")
        await wait_for_jobs(app, free + capped, ["completed"], timeout=30)
    assert most_at_once([(s, e) for s, e, _ in job_times(app.dsn, free)]) == 8
    assert most_at_once([(s, e) for s, e, _ in job_times(app.dsn, capped)]) == 1
    starts = sql_rows(app.dsn, "SELECT DISTINCT queue FROM baton.queue_limit_starts")
    assert starts == []  # no rate: nothing recorded


async def test_limits_change_while_workers_run(app: baton.Baton) -> None:
    async with running_worker(app, queues={Q: 6}) as worker:
        assert not worker.limits.applies(Q)
        await app.limit_queue(Q, concurrency=2)
        with anyio.fail_after(10):
            while not worker.limits.applies(Q):  # told on the control channel
                await anyio.sleep(0.01)
        ids = await app.enqueue_many([limited.nap.new(seconds=0.03) for _ in range(12)])
        await wait_for_jobs(app, ids, ["completed"], timeout=30)
        assert most_at_once([(s, e) for s, e, _ in job_times(app.dsn, ids)]) == 2
        await app.unlimit_queue(Q)
        with anyio.fail_after(10):
            while worker.limits.applies(Q):
                await anyio.sleep(0.01)
        more = await app.enqueue_many([limited.nap.new(seconds=0.2) for _ in range(6)])
        await wait_for_jobs(app, more, ["completed"], timeout=30)
    assert most_at_once([(s, e) for s, e, _ in job_times(app.dsn, more)]) == 6


# -- rate --------------------------------------------------------------------------------


async def test_rate_limit_holds_over_ten_seconds(app: baton.Baton) -> None:
    """20 a second, with two workers of ten slots each: no second-long window holds more
    than 20 starts, and the first ten seconds hold 200 within 10 %. The workers poll
    seldom: each claim that finds the window full says when it frees up, and the
    producer fetches again then."""
    await app.limit_queue(Q, rate=(20, 1.0))
    ids = await app.enqueue_many([limited.nap.new(seconds=0.01) for _ in range(230)])
    slow_poll = {"queues": {Q: 10}, "poll_interval": 30.0}
    async with running_worker(app, **slow_poll), running_worker(app, **slow_poll):
        await wait_for_jobs(app, ids, ["completed"], timeout=60)
    starts = [start for start, _, _ in job_times(app.dsn, ids)]
    assert busiest_window(starts, 1.0) <= 20
    first_ten = [s for s in starts if s < starts[0] + timedelta(seconds=10)]
    assert 180 <= len(first_ten) <= 200, len(first_ten)
    kept = sql_rows(app.dsn, "SELECT min(started_at) FROM baton.queue_limit_starts")
    assert kept[0][0] is None or kept[0][0] > starts[-1] - timedelta(seconds=1.5)


# -- partitions --------------------------------------------------------------------------


async def test_partitions_each_get_their_share(app: baton.Baton) -> None:
    """One job at a time per customer: a customer with thirty jobs queued first does not
    hold back the two that came after it, and none runs two at once."""
    await app.limit_queue(Q, concurrency=1, partition_by="customer")
    big = await app.enqueue_many(
        [limited.nap.new(seconds=0.05, customer="big") for _ in range(30)])
    small = await app.enqueue_many([limited.nap.new(seconds=0.05, customer=name)
                                    for name in ("a", "b") for _ in range(3)])
    async with running_worker(app, queues={Q: 10}):
        await wait_for_jobs(app, big + small, ["completed"], timeout=60)
    times = job_times(app.dsn, big + small)
    for customer in ("big", "a", "b"):
        mine = [(s, e) for s, e, args in times if args["customer"] == customer]
        assert most_at_once(mine) == 1, customer
    big_starts = [s for s, _, args in times if args["customer"] == "big"]
    small_done = max(s for s, _, args in times if args["customer"] != "big")
    # The small customers' three jobs each ran beside big's first few, not after its 30.
    assert small_done < big_starts[5]


async def test_total_concurrency_caps_a_partitioned_queue(app: baton.Baton) -> None:
    """One at a time per customer and two in all: three customers never run three."""
    await app.limit_queue(Q, concurrency=1, partition_by="customer", total_concurrency=2)
    ids = await app.enqueue_many([limited.nap.new(seconds=0.03, customer=name)
                                  for _ in range(4) for name in ("a", "b", "c")])
    async with running_worker(app, queues={Q: 10}):
        await wait_for_jobs(app, ids, ["completed"], timeout=60)
    times = job_times(app.dsn, ids)
    assert most_at_once([(s, e) for s, e, _ in times]) == 2
    for customer in ("a", "b", "c"):
        assert most_at_once([(s, e) for s, e, args in times
                             if args["customer"] == customer]) == 1


async def test_partitioned_rate_counts_each_partition(app: baton.Baton) -> None:
    await app.limit_queue(Q, rate="2/1m", partition_by="customer")
    ids = await app.enqueue_many([limited.nap.new(seconds=0, customer=name)
                                  for name in ("a", "b", "c") for _ in range(4)])
    async with running_worker(app, queues={Q: 10}):
        done = await wait_until_claimed(app, 6)
    assert Counter(done) == {"a": 2, "b": 2, "c": 2}
    left = sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs WHERE state = 'available' "
                    "AND id = ANY(%s)", (ids,))
    assert left == [(6,)]


async def wait_until_claimed(app: baton.Baton, n: int) -> list[str]:
    """Wait until ``n`` jobs completed; return their customers."""
    with anyio.fail_after(30):
        while True:
            async with app.connection() as conn:
                cur = await conn.execute("SELECT args->>'customer' FROM baton.jobs "
                                         "WHERE state = 'completed'")
                rows = await cur.fetchall()
            if len(rows) >= n:
                return [row[0] for row in rows]
            await anyio.sleep(0.01)


# -- tokens ------------------------------------------------------------------------------


async def test_token_window_stops_starts_once_spent(app: baton.Baton) -> None:
    """100 tokens a minute, one job at a time, each job recording 60: the second job
    starts (40 left), the third waits for the window."""
    await app.limit_queue(Q, concurrency=1, tokens=(100, 60.0))
    ids = [await app.enqueue(limited.spend.new(tokens=60)) for _ in range(4)]
    async with running_worker(app, queues={Q: 4}) as worker:
        await wait_for_jobs(app, ids[:2], ["completed"], timeout=30)
        async with app.connection(autocommit=True) as conn:  # the claim a worker would make
            rows = await worker.limits.claim(conn, {"queue": Q, "demand": 4,
                                                    "worker_id": worker.id,
                                                    "steps": worker.step_names})
        assert rows == []
    states = sql_rows(app.dsn, "SELECT state FROM baton.jobs ORDER BY id")
    assert [s for (s,) in states] == ["completed", "completed", "available", "available"]


# -- command line ------------------------------------------------------------------------


def test_cli_sets_lists_and_removes_limits(dsn: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["queue", "limit", Q, "--concurrency", "3", "--rate", "20/1s",
                     "--partition-by", "customer", "--dsn", dsn]) == 0
    assert "concurrency 3, rate 20/1s per customer" in capsys.readouterr().out
    assert cli.main(["queue", "limits", "--dsn", dsn, "--json"]) == 0
    [shown] = json.loads(capsys.readouterr().out)
    assert shown["rate"] == {"limit": 20, "seconds": 1.0} and shown["concurrency"] == 3
    assert cli.main(["queue", "limit", Q, "--rate", "fast", "--dsn", dsn]) == 2
    assert "invalid rate 'fast'" in capsys.readouterr().err
    assert cli.main(["queue", "unlimit", Q, "--dsn", dsn]) == 0
    assert "has no limits now" in capsys.readouterr().out
    assert sql_rows(dsn, "SELECT count(*) FROM baton.queue_limits") == [(0,)]


async def test_a_busy_partition_beyond_the_scan_hides_no_one(app: baton.Baton) -> None:
    """A claim considers a bounded number of jobs: when one customer fills them all, it
    claims that customer's share and asks for another claim at once, which skips it."""
    await app.limit_queue(Q, concurrency=1, partition_by="customer")
    await app.enqueue_many([limited.nap.new(seconds=0, customer="big") for _ in range(150)])
    await app.enqueue(limited.nap.new(seconds=0, customer="small"))
    worker = baton.Worker(app, baton.WorkerSettings(queues={Q: 10}))
    await worker.limits.load()
    producer = worker.producers[Q]
    params = {"queue": Q, "demand": 10, "worker_id": worker.id, "steps": worker.step_names}
    async with app.connection(autocommit=True) as conn:
        producer._wake = anyio.Event()
        first = await worker.limits.claim(conn, params)
        assert [row[2]["customer"] for row in first] == ["big"]
        assert producer._wake.is_set()  # the scan was cut short: claim again now
        second = await worker.limits.claim(conn, params)
        assert [row[2]["customer"] for row in second] == ["small"]
        assert await worker.limits.claim(conn, params) == []


async def test_limited_claim_reads_the_fetch_index(app: baton.Baton) -> None:
    """The limited claim walks the queue's available jobs in the fetch index's order, as
    the plain fetch does, instead of sorting the queue."""
    await app.limit_queue(Q, concurrency=5, rate="100/1s", partition_by="customer")
    await app.enqueue_many([limited.nap.new(seconds=0, customer=str(i % 7))
                            for i in range(2000)])
    async with app.connection() as conn:
        await conn.execute("ANALYZE baton.jobs")
        await conn.execute(app.sql["queue_limit_lock"], {"queue": Q})
        cur = await conn.execute(
            b"EXPLAIN (COSTS OFF) " + app.sql["jobs_fetch_limited"].as_bytes(conn),
            {"queue": Q, "demand": 10, "scan": 100, "steps": ["tests.apps.limited.nap"],
             "worker_id": "w"})
        plan = "\n".join(row[0] for row in await cur.fetchall())
        await conn.rollback()
    candidates = plan[plan.index("CTE candidates"):plan.index("CTE picked")]
    assert "jobs_fetch_idx" in candidates and "Sort" not in candidates, plan


async def test_limits_removed_behind_a_workers_back(app: baton.Baton) -> None:
    """A claim that finds the queue's limits gone claims nothing, and the queue takes the
    plain fetch from then on."""
    await app.limit_queue(Q, concurrency=1)
    worker = baton.Worker(app, baton.WorkerSettings(queues={Q: 10}))
    await worker.limits.load()
    assert worker.limits.applies(Q)
    await app.enqueue(limited.nap.new(seconds=0))
    async with app.connection(autocommit=True) as conn:
        await conn.execute("DELETE FROM baton.queue_limits")  # no announcement
        params = {"queue": Q, "demand": 10, "worker_id": worker.id,
                  "steps": worker.step_names}
        assert await worker.limits.claim(conn, params) == []
    assert not worker.limits.applies(Q)
