"""Database-side cost of a run, measured the same way for every system.

Stdlib plus psycopg (imported lazily; both the project venv and the oban venv have it).
A :func:`snapshot` is taken before and after a measured window; :func:`per_job` turns two
of them into per-job figures. What each figure is:

* ``wal_bytes`` -- ``pg_wal_lsn_diff`` of ``pg_current_wal_lsn()``: exact, cluster-wide.
* ``server_cpu_ms`` -- user+system CPU of the postmaster and every process under it, read
  from ``/proc`` (live children, plus the children it already reaped). Real CPU time of the
  whole server, background writers included; ``None`` when the server is not local.
* ``statements`` / ``exec_ms`` -- ``pg_stat_statements`` calls / total_exec_time for this
  database, if the extension is loaded and installed in it (``None`` otherwise).
* ``xact_commit``, ``blks_*``, ``tup_*`` -- ``pg_stat_database`` counters for this database;
  ``wal_records``, ``wal_fpi`` -- ``pg_stat_wal`` (cluster-wide). These are flushed by each
  backend when idle at most every 10 s (PGSTAT_IDLE_INTERVAL), so :func:`snapshot` waits
  ``SETTLE_S`` seconds before reading them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

# pg_stat_statements drops leading comments, so probes are marked by a column alias.
PROBE = "zz_bench_probe"
_DB_COLS = (
    "xact_commit", "xact_rollback", "blks_hit", "blks_read", "tup_returned", "tup_fetched",
    "tup_inserted", "tup_updated", "tup_deleted",
)  # fmt: skip
_SNAPSHOT_SQL = f"""
SELECT pg_current_wal_lsn()::text AS {PROBE}, pg_backend_pid(),
       {", ".join("d." + c for c in _DB_COLS)}, w.wal_records, w.wal_fpi
FROM pg_stat_database AS d, pg_stat_wal AS w
WHERE d.datname = current_database()"""
# Statements that do work: BEGIN/COMMIT/ROLLBACK are counted as transactions instead.
_STATEMENTS_SQL = f"""
SELECT COALESCE(sum(calls), 0)::bigint AS {PROBE}, COALESCE(sum(total_exec_time), 0)::float8
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '%{PROBE}%' AND query !~* '^\\s*(BEGIN|COMMIT|ROLLBACK)\\M'"""
SETTLE_S = float(os.environ.get("BENCH_SETTLE_S", "11"))
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "(comm)"; comm may contain spaces. Index 0 here is field 3 (state).
    return text[text.rindex(")") + 2 :].split()


def _ticks(fields: list[str], with_children: bool = True) -> int:
    # utime, stime, cutime, cstime are fields 14-17 (1-based) -> 11..14 here.
    return sum(int(x) for x in fields[11 : 15 if with_children else 13])


def server_cpu_seconds(backend_pid: int) -> float | None:
    """CPU seconds used so far by the postmaster owning ``backend_pid`` and its children."""
    mine = _proc_stat(backend_pid)
    return None if mine is None else postmaster_cpu_seconds(int(mine[1]))


def postmaster_cpu_seconds(postmaster: int | None) -> float | None:
    """CPU seconds used so far by ``postmaster`` and every process under it (live ones,
    and those it reaped); ``None`` when it is not a process of this machine."""
    if postmaster is None:
        return None
    root = _proc_stat(postmaster)
    if root is None:
        return None
    total = _ticks(root)
    parent = str(postmaster)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (f := _proc_stat(entry.name)) and f[1] == parent:
            total += _ticks(f)
    return total / _TICKS


async def postmaster_pid(dsn: str) -> int | None:
    """The server's postmaster, if it runs on this machine (the parent of a backend)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT pg_backend_pid() AS {PROBE}".encode())
        row = await cur.fetchone()
        mine = _proc_stat(row[0]) if row else None  # while the backend lives
    return None if mine is None else int(mine[1])


async def analyze(dsn: str) -> None:
    """Give every table of the run's database planner statistics (``ANALYZE``).

    A deployed queue's tables have them: autovacuum analyzes a table soon after it fills.
    A database created for one run has none until autovacuum's first pass, which lands
    before a drain's window in some runs and not in others; without them PgQueuer's claim
    read its whole table on every dequeue (385 tuples read per job against 8.6) and its
    drain ran at half speed. Run outside every measured window.
    """
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"ANALYZE /* {PROBE} */".encode())


def rss_mb() -> float | None:
    """Resident set size of this process in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


async def snapshot(dsn: str, settle: float = SETTLE_S) -> dict[str, Any]:
    """Read the counters; ``settle`` seconds are waited between instant and lagged ones."""
    import psycopg

    out: dict[str, Any] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT pg_current_wal_lsn()::text AS {PROBE}, pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        out["lsn"], pid = row
        out["cpu_s"] = server_cpu_seconds(pid)
        if settle:
            await asyncio.sleep(settle)
        cur = await conn.execute(_SNAPSHOT_SQL.encode())
        row = await cur.fetchone()
        assert row is not None
        out.update(zip((*_DB_COLS, "wal_records", "wal_fpi"), row[2:], strict=True))
        out["statements"] = out["exec_ms"] = None
        with contextlib.suppress(psycopg.Error):
            cur = await conn.execute(_STATEMENTS_SQL.encode())
            srow = await cur.fetchone()
            if srow is not None:
                out["statements"], out["exec_ms"] = int(srow[0]), float(srow[1])
        cur = await conn.execute(
            f"SELECT pg_wal_lsn_diff(%s::pg_lsn, '0/0')::bigint AS {PROBE}".encode(), (out["lsn"],)
        )
        lsn_row = await cur.fetchone()
        out["lsn_bytes"] = int(lsn_row[0]) if lsn_row else None
    return out


# Commits and statements the "before" snapshot itself adds to the window (its own
# connection's queries that run after its counters were read): subtracted below.
_SNAPSHOT_COMMITS = 3


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Raw counter differences between two snapshots (``None`` where unknown)."""
    d: dict[str, Any] = {}
    for key in ("lsn_bytes", "cpu_s", "exec_ms", "statements", *_DB_COLS, "wal_records",
                "wal_fpi"):  # fmt: skip
        a, b = after.get(key), before.get(key)
        d[key] = None if a is None or b is None else a - b
    if d["xact_commit"] is not None:
        d["xact_commit"] -= _SNAPSHOT_COMMITS
    return d


def per_job(d: dict[str, Any], n: int) -> dict[str, Any]:
    """Per-job figures from a :func:`delta`; names say what each one is."""

    def per(key: str, scale: float = 1.0, digits: int = 2) -> float | None:
        v = d.get(key)
        return None if v is None or n <= 0 else round(v * scale / n, digits)

    return {
        "wal_bytes_per_job": per("lsn_bytes", digits=1),
        "wal_records_per_job": per("wal_records"),
        "wal_fpi_per_job": per("wal_fpi", digits=3),
        "server_cpu_ms_per_job": per("cpu_s", 1000.0, 4),
        "statements_per_job": per("statements", digits=3),
        "stmt_exec_ms_per_job": per("exec_ms", digits=4),
        "xact_commit_per_job": per("xact_commit", digits=3),
        "blks_hit_per_job": per("blks_hit", digits=1),
        "blks_read_per_job": per("blks_read", digits=2),
        "tup_returned_per_job": per("tup_returned", digits=1),
        "tup_fetched_per_job": per("tup_fetched", digits=1),
        "tup_inserted_per_job": per("tup_inserted", digits=2),
        "tup_updated_per_job": per("tup_updated", digits=2),
        "tup_deleted_per_job": per("tup_deleted", digits=2),
    }


class RssSampler:
    """Samples this process's RSS when a drain starts, is half done and ends."""

    def __init__(self) -> None:
        self.samples: dict[str, float | None] = {}
        self.peak: float = 0.0

    async def run(self, progress: Any, n: int, interval: float = 0.05) -> None:
        """Poll ``progress()`` (jobs started so far) until it reaches ``n``."""
        marks = [("start", 1), ("middle", max(1, n // 2)), ("end", n)]
        while marks:
            done = progress()
            rss = rss_mb()
            self.peak = max(self.peak, rss or 0.0)
            while marks and done >= marks[0][1]:
                self.samples[marks.pop(0)[0]] = rss
            await asyncio.sleep(interval)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"rss_mb_{k}": v for k, v in self.samples.items()}
        out["rss_mb_peak"] = self.peak or None
        start, end = self.samples.get("start"), self.samples.get("end")
        if start and end:
            out["rss_growth_pct"] = round(100 * (end - start) / start, 1)
        return out
