"""baton-only workflow workloads: ``chain``, ``fanout`` and ``insert10k``.

``chain``: a workflow of n steps, each depending on the one before. ``fanout``: one root,
n children depending on it, one sink depending on all of them (1 -> n -> 1), run
:data:`FANOUT_RUNS` times one after the other, since each run has a single fan-in handoff
(the figure is their median; wall time too). For both, the handoff latency of a dependent
is ``jobs.attempted_at`` of the dependent minus the latest ``jobs.finalized_at`` among its
dependencies (both server clock). Statements are counted
over the run with ``pg_stat_statements`` when it is loaded, and ``pg_stat_database``
commits always; the worker's idle background rate (heartbeat, maintenance, poll) is
measured just before and reported so it can be told apart.

``insert10k``: time of ``await app.insert(wf)`` for one root and n - 1 children.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any

import baton
from benchmarks.peers import dbstats
from benchmarks.peers.common import TRACKER, Result, percentile
from benchmarks.peers.fleet import tree_cpu_seconds

if TYPE_CHECKING:
    from benchmarks.peers.baton_peer import BatonPeer

IDLE_SAMPLE_S = 2.0
FANOUT_RUNS = 5
_POLL = "SELECT state AS zz_bench_probe FROM {s}.workflows WHERE id = %s"
_HANDOFF = """
SELECT n.name AS zz_bench_probe,
       1000 * extract(epoch FROM jn.attempted_at - max(jd.finalized_at))
FROM {s}.edges AS e
JOIN {s}.nodes AS n ON n.workflow_id = e.workflow_id AND n.name = e.node
JOIN {s}.nodes AS d ON d.workflow_id = e.workflow_id AND d.name = e.dep
JOIN {s}.jobs AS jn ON jn.id = n.job_id
JOIN {s}.jobs AS jd ON jd.id = d.job_id
WHERE e.workflow_id = %s
GROUP BY n.name, jn.attempted_at"""


def build_chain(peer: BatonPeer, n: int) -> baton.Workflow:
    wf = baton.Workflow("bench-chain")
    for k in range(n):
        wf.add(f"s{k}", peer.noop.new(i=k), deps=[f"s{k - 1}"] if k else ())
    return wf


def build_fanout(peer: BatonPeer, n: int, *, sink: bool = True) -> baton.Workflow:
    wf = baton.Workflow("bench-fanout")
    wf.add("root", peer.noop.new(i=0))
    children = [f"c{k}" for k in range(1, n + 1)]
    for k, name in enumerate(children, start=1):
        wf.add(name, peer.noop.new(i=k), deps=["root"])
    if sink:
        wf.add("sink", peer.noop.new(i=n + 1), deps=children)
    return wf


def _dist(values: list[float]) -> dict[str, float | int]:
    v = sorted(values)
    if not v:
        return {"count": 0}
    return {
        "count": len(v),
        "p50_ms": round(percentile(v, 50), 3),
        "p99_ms": round(percentile(v, 99), 3),
        "max_ms": round(v[-1], 3),
    }


async def _wait_finished(peer: BatonPeer, wf_id: Any, timeout: float) -> tuple[str, int]:
    """Poll the workflow row every 5 ms; return its final state and the polls made."""
    polls, deadline = 0, time.perf_counter() + timeout
    sql = _POLL.format(s=peer.app.schema).encode()
    async with peer.app.connection(autocommit=True) as conn:
        while time.perf_counter() < deadline:
            polls += 1
            row = await (await conn.execute(sql, (wf_id,))).fetchone()
            if row and row[0] != "running":
                return str(row[0]), polls
            await asyncio.sleep(0.005)
    raise TimeoutError(f"workflow not finished within {timeout:.0f}s")


async def _run_graph(peer: BatonPeer, res: Result, args: argparse.Namespace) -> None:
    """Run the graph with the worker in this process, or with ``--processes`` above 1 in
    ``baton worker --processes N`` (as deployed; the graph is inserted from here)."""
    await peer.setup()
    res.concurrency = peer.concurrency
    runs = FANOUT_RUNS if args.workload == "fanout" else 1
    steps = len(_build_graph(peer, args).nodes)
    TRACKER.reset(steps * runs)
    with tempfile.TemporaryDirectory(prefix="bench-board-") as board:
        fleet = peer.fleet(args.workload, args.processes, board) if args.processes > 1 else None
        if fleet is None:
            await peer.start_worker()
        else:
            await fleet.start(120)
            await fleet.go()
        wf_ids: list[Any] = []
        walls: list[float] = []
        after_insert: list[float] = []
        states: list[str] = []
        polls = 0
        try:
            idle0 = await dbstats.snapshot(peer.dsn)
            await asyncio.sleep(IDLE_SAMPLE_S)
            before = await dbstats.snapshot(peer.dsn)
            idle = dbstats.delta(idle0, before)
            idle_window = IDLE_SAMPLE_S + dbstats.SETTLE_S  # the sleep plus the settle
            client0 = tree_cpu_seconds(fleet.pids) if fleet is not None else None
            start = time.perf_counter()
            for _ in range(runs):
                wf = _build_graph(peer, args)
                t0 = time.perf_counter()
                wf_ids.append(await peer.app.insert(wf))
                inserted = time.perf_counter()
                state, made = await _wait_finished(peer, wf_ids[-1], args.timeout)
                walls.append(time.perf_counter() - t0)
                after_insert.append(time.perf_counter() - inserted)
                states.append(state)
                polls += made
            elapsed = time.perf_counter() - start
            client_s = None if client0 is None else tree_cpu_seconds(fleet.pids) - client0
            d = dbstats.delta(before, await dbstats.snapshot(peer.dsn))
        finally:
            if fleet is None:
                await peer.stop_worker()
            else:
                await fleet.stop()
    window = elapsed + dbstats.SETTLE_S
    res.seconds = round(statistics.median(walls), 4)
    res.jobs_per_s = round(steps / res.seconds, 1)
    # From the insert's commit to the workflow's end: the rate of the steps themselves.
    res.extra["steps_per_s_after_insert"] = round(steps / statistics.median(after_insert), 1)
    res.extra["after_insert_seconds"] = [round(w, 4) for w in after_insert]
    res.extra["processes"] = args.processes
    if client_s is not None:
        res.extra["worker_cpu_ms"] = round(1000 * client_s, 1)
    handoffs: list[dict[str, float]] = []
    async with peer.app.connection() as conn:
        for wf_id in wf_ids:
            cur = await conn.execute(_HANDOFF.format(s=peer.app.schema).encode(), (wf_id,))
            handoffs.append({name: float(ms) for name, ms in await cur.fetchall()})
    overall = _dist([v for handoff in handoffs for v in handoff.values()])
    res.p50_ms, res.p99_ms = overall.get("p50_ms"), overall.get("p99_ms")
    res.max_ms = overall.get("max_ms")
    total_steps = steps * runs
    res.extra.update(
        steps=steps,
        runs=runs,
        wall_seconds=[round(w, 4) for w in walls],
        workflow_state=states[0] if len(set(states)) == 1 else states,
        handoff_ms=overall,
        statements=d["statements"],
        xact_commits=(d["xact_commit"] or 0) - polls,
        idle_statements_per_s=_rate(idle["statements"], idle_window),
        idle_xact_commits_per_s=_rate(idle["xact_commit"], idle_window),
        window_s=round(window, 3),
        bodies_run=len(TRACKER.started) if fleet is None
        else sum(int(r.get("calls", 0)) for r in fleet.results),
        wal_bytes=d["lsn_bytes"],
        server_cpu_ms=None if d["cpu_s"] is None else round(1000 * d["cpu_s"], 1),
    )
    for key in ("statements", "xact_commits"):
        rate = res.extra[f"idle_{key}_per_s"]
        if res.extra[key] is not None and rate is not None:
            net = res.extra[key] - rate * window
            res.extra[f"{key}_net_of_idle"] = round(net)
            res.extra[f"{key}_net_per_step"] = round(net / total_steps, 2)
    if args.workload == "fanout":
        res.extra["fan_out_ms"] = _dist(
            [v for handoff in handoffs for k, v in handoff.items() if k.startswith("c")])
        fan_in = [handoff["sink"] for handoff in handoffs]
        res.extra["fan_in_ms"] = round(statistics.median(fan_in), 3)
        res.extra["fan_in_runs_ms"] = [round(v, 3) for v in fan_in]
    if any(state != "completed" for state in states):
        res.error = f"workflow ended {states}"


def _build_graph(peer: BatonPeer, args: argparse.Namespace) -> baton.Workflow:
    return build_chain(peer, args.n) if args.workload == "chain" else build_fanout(peer, args.n)


def _rate(value: float | None, seconds: float) -> float | None:
    return None if value is None else round(value / seconds, 2)


async def _run_insert(peer: BatonPeer, res: Result, args: argparse.Namespace) -> None:
    await peer.setup()
    times, builds = [], []
    for _ in range(args.repeat):
        b0 = time.perf_counter()
        wf = build_fanout(peer, args.n - 1, sink=False)
        t0 = time.perf_counter()
        await peer.app.insert(wf)
        times.append(time.perf_counter() - t0)
        builds.append(t0 - b0)
    res.seconds = round(statistics.median(times), 4)
    res.jobs_per_s = round(args.n / res.seconds, 1)
    res.extra.update(
        insert_seconds=[round(t, 4) for t in times],
        build_seconds_median=round(statistics.median(builds), 4),
        steps=args.n,
        measured="median of `await app.insert(wf)` over repeats, same database; "
        "building the Workflow (step.new() for every node) is not included",
        rows_in_table=await peer.total(),
    )


async def chain(peer: BatonPeer, res: Result, args: argparse.Namespace) -> None:
    await _run_graph(peer, res, args)


async def fanout(peer: BatonPeer, res: Result, args: argparse.Namespace) -> None:
    await _run_graph(peer, res, args)


async def insert10k(peer: BatonPeer, res: Result, args: argparse.Namespace) -> None:
    args.repeat = 3
    await _run_insert(peer, res, args)


WORKLOADS: dict[str, tuple[int, Any]] = {
    "chain": (200, chain),
    "fanout": (1000, fanout),
    "insert10k": (10_000, insert10k),
}
