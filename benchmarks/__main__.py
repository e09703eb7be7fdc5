"""Benchmark baton against its peers on one PostgreSQL server.

    python -m benchmarks [--small] [--systems baton,pgqueuer] [--workloads drain,latency]

Starts an embedded PostgreSQL (or uses ``BATON_DATABASE_URL`` / ``--dsn``), runs every
system x workload as a subprocess on a fresh database, prints one table (each figure per
system, and baton's ratio to the best peer), writes ``benchmarks/results/<timestamp>.json``
(and ``.md``) and the chart ``docs/benchmarks.png``.
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
BATON_ONLY = ("chain", "fanout", "insert10k")
FULL_N = {
    "enqueue_one": 2000, "enqueue_batch": 100_000, "drain": 100_000, "latency": 500,
    "chain": 200, "fanout": 1000, "insert10k": 10_000,
}  # fmt: skip
SMALL_N = {
    "enqueue_one": 50, "enqueue_batch": 300, "drain": 300, "latency": 20,
    "chain": 10, "fanout": 20, "insert10k": 500,
}  # fmt: skip
# Drain/latency concurrency: each system at its best setting in a drain sweep at 100, 200 and
# 400 (50,000 jobs; see docs/benchmarks.md).
CONCURRENCY = {"baton": 200, "procrastinate": 100, "pgqueuer": 400, "chancy": 400, "oban": 100}


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
        "--fanout-scaling",
        default="250",
        help="extra fanout sizes, to show statements grow linearly ('' for none)",
    )
    p.add_argument(
        "--concurrency", default="", help="override per system, e.g. baton=200,pgqueuer=20"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per phase, seconds")
    p.add_argument("--chart", type=Path, default=ROOT / "docs" / "benchmarks.png")
    p.add_argument("--no-chart", action="store_true")
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


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """(system, workload, label, n) for every run, in order."""
    sizes = dict(SMALL_N if args.small else FULL_N)
    sizes.update({wl: v for wl in FULL_N if (v := getattr(args, f"n_{wl}")) is not None})
    runs = []
    for system in args.systems.split(","):
        for wl in args.workloads.split(","):
            if wl in BATON_ONLY and system != "baton":
                continue
            if wl == "fanout" and not args.small:
                runs += [
                    (system, wl, f"fanout@{k}", int(k)) for k in args.fanout_scaling.split(",") if k
                ]
            runs.append((system, wl, wl, sizes[wl]))
    return runs


def main() -> None:
    args = parse_args()
    if args.small:
        os.environ.setdefault("BENCH_SETTLE_S", "1.1")  # lagged counters: approximate
    conc = dict(CONCURRENCY)
    conc.update(
        {k: int(v) for k, _, v in (s.partition("=") for s in args.concurrency.split(",")) if v}
    )
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    started, results = time.time(), []
    with server.postgres(args.dsn) as admin:
        statements = server.install_statements(admin)
        pg = server.describe(admin)
        emit(f"PostgreSQL: {pg['version']}")
        emit("settings: " + ", ".join(f"{k}={v}" for k, v in pg.items() if k != "version"))
        emit(f"pg_stat_statements: {'loaded' if statements else 'not loaded'}")
        pythons: dict[str, str | None] = {}
        for system, wl, label, n in plan(args):
            if system not in pythons:
                pythons[system] = oban_python() if system == "oban" else sys.executable
            python = pythons[system]
            if python is None:
                results.append(
                    {
                        "system": system,
                        "workload": wl,
                        "label": label,
                        "skipped": "needs Python >= 3.12 with oban (none found, or set-up failed)",
                    }
                )
                continue
            err(f"running {system} {label} n={n} concurrency={conc[system]}")
            db = f"bench_{system}_{wl}"
            dsn = fresh_db(admin, db)
            r = run_peer(python, system, dsn, wl, n, conc[system], args.timeout)
            drop_db(admin, db)
            r.update(label=label, run_concurrency=conc[system])
            results.append(r)
            err(json.dumps(r)[:400])
    finish(
        args,
        systems,
        results,
        {
            "postgres": pg,
            "pg_stat_statements": statements,
            "machine": machine(),
            "git": git_state(),
            "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
            "concurrency": conc,
            "small": args.small,
            "seconds": round(time.time() - started, 1),
        },
    )


def finish(
    args: argparse.Namespace,
    systems: list[str],
    results: list[dict[str, Any]],
    meta: dict[str, Any],
) -> None:
    table = report.markdown(results, systems)
    emit(table)
    for line in report.problems(results):
        emit(f"problem: {line}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = ROOT / "benchmarks" / "results" / f"{stamp}{'-small' if args.small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    emit(f"results: {out.relative_to(ROOT)}")
    if not args.no_chart:
        m = meta["machine"]
        title = (
            f"baton vs peers - {m.get('cpus')} CPUs, "
            f"{meta['postgres']['version'].split(' on ')[0]}"
            f"{' (--small: sizes too small to mean anything)' if args.small else ''}"
        )
        chart.draw(results, systems, args.chart, title)
        emit(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
