"""Benchmark baton against its peers on one PostgreSQL server, each system at its best.

    python -m benchmarks [--small] [--systems baton,pgqueuer] [--processes 1,2,4]

Starts an embedded PostgreSQL (or uses ``BATON_DATABASE_URL`` / ``--dsn``) and runs every
system x workload as a subprocess on a fresh database, workload by workload so that the
systems compared in a row ran minutes apart, not an hour:

1. ``enqueue_one`` and ``enqueue_batch`` for every system;
2. the drain sweep: every system drains jobs with 1, 2 and 4 worker processes at each of
   its own settings (:data:`SWEEP`), and the fastest is its chosen setting;
3. the drain of ``--n-drain`` jobs at each system's chosen setting, with the database
   counters, then ``latency`` at that setting and with its other process counts (the
   lowest p99 of them is the system's best latency);
4. baton's workflow workloads, at ``--workflow-concurrency`` slots per process whatever the
   drain chose (or whether it ran), so a run of them alone gives the full run's figures.

Prints the tables (each system at its best with CPU per job and the ratios to the best
peer; the sweep; every figure), writes ``benchmarks/results/<timestamp>.json`` (the sweep
included) and ``.md``, and the chart ``docs/benchmarks.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import chart, report, server
from benchmarks.peers.common import emit
from benchmarks.peers.run_all import drop_db, fresh_db, oban_python, run_peer

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("baton", "procrastinate", "pgqueuer", "chancy", "oban")
SHARED = ("enqueue_one", "enqueue_batch", "drain", "latency")
BATON_ONLY = report.WORKFLOWS
FULL_N = {
    "enqueue_one": 2000, "enqueue_batch": 100_000, "drain": 100_000, "latency": 1000,
    "chain": 200, "fanout": 1000, "insert10k": 10_000,
}  # fmt: skip
SMALL_N = {
    "enqueue_one": 50, "enqueue_batch": 300, "drain": 300, "latency": 20,
    "chain": 10, "fanout": 20, "insert10k": 500,
}  # fmt: skip
PROCESSES = (1, 2, 4)
# Each system's own knob, per worker process: baton's slots, procrastinate's concurrency,
# chancy's queue concurrency, oban's queue limit; for pgqueuer C is max_concurrent_tasks
# with dequeue batches of C / 2 (its QueueManager needs tasks >= 2 x batch). baton's and
# pgqueuer's go up to where they stop gaining: with 2 processes at 400, 800 and 1600, baton
# drained 46,666 / 50,778 / 52,725 jobs/s (+4 % for the last doubling) and pgqueuer 21,292 /
# 23,037 / 22,604 (sweeps of 2026-12-04); their lowest settings of earlier sweeps (baton
# 100, pgqueuer 20) never won. At 4 x 1600 a sweep run has about 8 jobs per slot, so its
# figure is mostly ramp-up and tail.
SWEEP = {
    "baton": (200, 400, 800, 1600),
    "procrastinate": (25, 100),
    "pgqueuer": (200, 400, 800, 1600),
    "chancy": (100, 400),
    "oban": (50, 200),
}
# Jobs per sweep run: enough for a few seconds of drain for each system (the final
# drain runs --n-drain for every system).
SWEEP_N = {"baton": 50_000, "pgqueuer": 30_000, "chancy": 10_000, "oban": 10_000,
           "procrastinate": 3_000}  # fmt: skip
# The final drain is FULL_N["drain"] jobs, but procrastinate's, at under 1,000 jobs/s here,
# would take minutes of the 15 the whole run may take; fewer jobs (a smaller table) can
# only flatter it. The headline table shows each system's n.
FINAL_DRAIN_N = {"procrastinate": 20_000}
# --small, and any system whose knob is not swept: one setting.
DEFAULT_CONCURRENCY = {
    "baton": 200, "procrastinate": 100, "pgqueuer": 200, "chancy": 400, "oban": 100,
}  # fmt: skip
# baton's workflow workloads: slots per worker process. A 1 -> 10,000 -> 1 workflow with
# 2 processes ran at 6,323-9,990 steps/s with 100 slots and 11,329-12,518 with 400 (the
# drain's chosen setting in every full run while its sweep stopped at 400), so it is fixed,
# not taken from the drain.
WORKFLOW_CONCURRENCY = 400


def err(msg: str) -> None:
    emit(msg, sys.stderr)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", help="admin DSN; default BATON_DATABASE_URL, else embedded")
    p.add_argument("--small", action="store_true", help="tiny sizes: proves the harness")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workloads", default=",".join(SHARED + BATON_ONLY))
    for wl in FULL_N:
        p.add_argument(f"--n-{wl.replace('_', '-')}", type=int, dest=f"n_{wl}")
    p.add_argument(
        "--processes",
        help="worker processes swept, e.g. 1,2 (default 1,2,4; --small 1,2)",
    )
    p.add_argument(
        "--concurrency",
        default="",
        help="settings swept per system, e.g. baton=100/200,pgqueuer=200 (default: SWEEP)",
    )
    p.add_argument("--n-sweep", type=int, help="jobs per sweep run (default per system)")
    p.add_argument(
        "--fanout-scaling",
        default="250,10000",
        help="extra fanout sizes, to show statements grow linearly ('' for none)",
    )
    p.add_argument(
        "--fanout-processes",
        default="1,2",
        help="worker processes for the extra fanout sizes (above 1: baton worker --processes)",
    )
    p.add_argument(
        "--workflow-concurrency",
        type=int,
        default=WORKFLOW_CONCURRENCY,
        help=f"slots per worker process for chain, fanout and insert10k "
        f"(default {WORKFLOW_CONCURRENCY})",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per phase, seconds")
    p.add_argument("--chart", type=Path, default=ROOT / "docs" / "benchmarks.png")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument(
        "--write-docs",
        nargs="?",
        type=Path,
        const=ROOT / "docs" / "benchmarks.md",
        metavar="PAGE",
        help="put this run's tables into docs/benchmarks.md, or PAGE (not with --small)",
    )
    return p.parse_args()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.splitlines()
            if ln.startswith("model name")
        )
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["mem_gb"] = round(int(mem) / 2**20, 1)
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, StopIteration, IndexError):
        pass
    return info


def git_state() -> dict[str, Any]:
    """The commit benchmarked and whether baton/ had uncommitted changes (read-only git)."""

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # never write the index
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "baton_dirty": bool(git("status", "--porcelain", "--", "baton")),
    }


def grid(args: argparse.Namespace, systems: list[str]) -> dict[str, list[int]]:
    """The settings swept per system: --concurrency, else SWEEP (--small: one)."""
    given = {
        k: [int(x) for x in v.split("/")]
        for k, _, v in (s.partition("=") for s in args.concurrency.split(","))
        if v
    }
    out = {}
    for s in systems:
        default = [DEFAULT_CONCURRENCY[s]] if args.small else list(SWEEP[s])
        out[s] = given.get(s, default)
    return out


class Runner:
    """Runs one system x workload on a fresh database and keeps what it returned."""

    def __init__(self, admin: str, timeout: float) -> None:
        self.admin = admin
        self.timeout = timeout
        self.pythons: dict[str, str | None] = {}

    def python(self, system: str) -> str | None:
        if system not in self.pythons:
            self.pythons[system] = oban_python() if system == "oban" else sys.executable
        return self.pythons[system]

    def run(
        self,
        system: str,
        wl: str,
        n: int,
        conc: int,
        label: str | None = None,
        processes: int = 1,
        settle: float | None = None,
    ) -> dict[str, Any]:
        label = label or wl
        python = self.python(system)
        if python is None:
            return {
                "system": system,
                "workload": wl,
                "label": label,
                "skipped": "needs Python >= 3.12 with oban (none found, or set-up failed)",
            }
        extra = ["--processes", str(processes)]
        if settle is not None:
            extra += ["--settle", str(settle)]
        err(f"running {system} {label} n={n} processes={processes} concurrency={conc}")
        db = f"bench_{system}_{wl}"
        dsn = fresh_db(self.admin, db)
        t0 = time.monotonic()
        r = run_peer(python, system, dsn, wl, n, conc, self.timeout, extra)
        drop_db(self.admin, db)
        r.update(
            label=label,
            run_concurrency=conc,
            processes=processes,
            setting=report.setting_label(system, processes, conc),
            run_seconds=round(time.monotonic() - t0, 1),
        )
        err(json.dumps(r)[:400])
        return r


def best(sweep: list[dict[str, Any]], system: str) -> dict[str, Any] | None:
    """The fastest error-free sweep run of ``system`` (by drain jobs/s)."""
    runs = [
        r for r in sweep if r["system"] == system and not r.get("error") and r.get("jobs_per_s")
    ]
    return max(runs, key=lambda r: r["jobs_per_s"]) if runs else None


def main() -> None:
    args = parse_args()
    if args.small:
        os.environ.setdefault("BENCH_SETTLE_S", "1.1")  # lagged counters: approximate
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    workloads = args.workloads.split(",")
    sizes = dict(SMALL_N if args.small else FULL_N)
    sizes.update({wl: v for wl in FULL_N if (v := getattr(args, f"n_{wl}")) is not None})
    processes = [int(x) for x in (args.processes or ("1,2" if args.small else "1,2,4")).split(",")]
    settings = grid(args, systems)
    started, results, sweep = time.time(), [], []
    chosen: dict[str, dict[str, Any]] = {}
    phases: dict[str, float] = {}
    with server.postgres(args.dsn) as admin:
        statements = server.install_statements(admin)
        pg = server.describe(admin)
        emit(f"PostgreSQL: {pg['version']}")
        emit("settings: " + ", ".join(f"{k}={v}" for k, v in pg.items() if k != "version"))
        emit(f"pg_stat_statements: {'loaded' if statements else 'not loaded'}")
        runner = Runner(admin, args.timeout)

        for wl in ("enqueue_one", "enqueue_batch"):
            if wl in workloads:
                t0 = time.monotonic()
                for s in systems:
                    results.append(runner.run(s, wl, sizes[wl], DEFAULT_CONCURRENCY[s]))
                phases[wl] = time.monotonic() - t0

        t0 = time.monotonic()
        for s in systems:
            configs = [(p, c) for p in processes for c in settings[s]]
            if "drain" in workloads and len(configs) > 1:
                n = args.n_sweep or (SMALL_N["drain"] if args.small else SWEEP_N[s])
                for p, c in configs:
                    r = runner.run(s, "drain", n, c, f"sweep p{p} c{c}", p, settle=0)
                    sweep.append(r)
                if (b := best(sweep, s)) is not None:
                    chosen[s] = {"processes": b["processes"], "concurrency": b["run_concurrency"]}
            chosen.setdefault(s, {"processes": processes[0], "concurrency": settings[s][0]})
        phases["drain_sweep"] = time.monotonic() - t0

        for wl in ("drain", "latency"):
            if wl in workloads:
                t0 = time.monotonic()
                for s in systems:
                    pick = chosen[s]
                    n = sizes[wl]
                    if wl == "drain" and not args.small and args.n_drain is None:
                        n = min(n, FINAL_DRAIN_N.get(s, n))
                    res = runner.run(s, wl, n, pick["concurrency"], None, pick["processes"])
                    results.append(res)
                    if "settings" in res.get("extra", {}):
                        pick["settings"] = res["extra"]["settings"]
                    if wl == "latency":  # and at the other process counts, same setting
                        runs = [res] + [
                            runner.run(s, wl, n, pick["concurrency"], f"latency p{p}", p)
                            for p in processes if p != pick["processes"]]  # fmt: skip
                        results += [*runs[1:], report.latency_best(runs)]
                phases[wl] = time.monotonic() - t0

        if "baton" in systems:
            t0 = time.monotonic()
            conc = args.workflow_concurrency
            for wl in BATON_ONLY:
                if wl not in workloads:
                    continue
                if wl == "fanout" and not args.small:
                    for k in filter(None, args.fanout_scaling.split(",")):
                        for procs in map(int, filter(None, args.fanout_processes.split(","))):
                            label = f"fanout@{k}" + (f"x{procs}" if procs > 1 else "")
                            results.append(runner.run("baton", wl, int(k), conc, label, procs))
                results.append(runner.run("baton", wl, sizes[wl], conc))
            phases["workflows"] = time.monotonic() - t0
    finish(
        args,
        systems,
        results,
        sweep,
        {
            "postgres": pg,
            "pg_stat_statements": statements,
            "machine": machine(),
            "git": git_state(),
            "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
            "processes_swept": processes,
            "settings_swept": settings,
            "chosen": chosen,
            "workflow_concurrency": args.workflow_concurrency,
            "small": args.small,
            "seconds": round(time.time() - started, 1),
            "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
        },
    )


def finish(
    args: argparse.Namespace,
    systems: list[str],
    results: list[dict[str, Any]],
    sweep: list[dict[str, Any]],
    meta: dict[str, Any],
) -> None:
    text = report.document(results, sweep, systems, meta["chosen"], meta["workflow_concurrency"])
    emit(text)
    for line in report.problems(results + sweep):
        emit(f"problem: {line}")
    emit(f"took {meta['seconds']:.0f} s ({meta['phase_seconds']})")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = ROOT / "benchmarks" / "results" / f"{stamp}{'-small' if args.small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results, "sweep": sweep}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    emit(f"results: {out.relative_to(ROOT)}")
    if not args.no_chart:
        m = meta["machine"]
        title = (
            f"baton vs peers, each at its best - {m.get('cpus')} CPUs, "
            f"{meta['postgres']['version'].split(' on ')[0]}"
            f"{' (--small: sizes too small to mean anything)' if args.small else ''}"
        )
        chart.draw(results, sweep, systems, args.chart, title)
        emit(f"chart: {args.chart}")
    if args.write_docs and not args.small:
        meta["summary"] = report.summary(results, systems, meta["chosen"])
        report.write_docs(args.write_docs, text, meta, out.name)
        emit(f"docs: {args.write_docs}")
    if any(r.get("error") for r in results + sweep):
        sys.exit(1)  # a run failed: the figures above are incomplete


if __name__ == "__main__":
    main()
