"""Turn benchmark results into one table: each figure per system, baton vs the best peer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    label: str
    workload: str
    path: tuple[str, ...]
    higher_is_better: bool | None  # None: informational, no ratio
    target: str = ""
    digits: int = 1


# fmt: off
FIGURES = (
    Figure("enqueue_one jobs/s", "enqueue_one", ("jobs_per_s",), True),
    Figure("enqueue_batch jobs/s (1,000 per call)", "enqueue_batch", ("jobs_per_s",), True,
           ">= 2x best peer"),
    Figure("drain jobs/s (from worker start)", "drain", ("jobs_per_s",), True,
           ">= 2x best peer"),
    Figure("drain jobs/s (first to last start)", "drain", ("extra", "steady_jobs_per_s"), True,
           ">= 2x best peer"),
    Figure("drain: first job after worker start, s", "drain", ("extra", "first_job_after_s"),
           False, digits=3),
    Figure("latency enqueue->start p50 ms", "latency", ("p50_ms",), False, "<= 5 ms", 2),
    Figure("latency enqueue->start p99 ms", "latency", ("p99_ms",), False, "<= 25 ms", 2),
    Figure("drain: server CPU ms/job", "drain", ("extra", "db", "server_cpu_ms_per_job"), False,
           digits=3),
    Figure("drain: WAL bytes/job", "drain", ("extra", "db", "wal_bytes_per_job"), False),
    Figure("drain: WAL records/job", "drain", ("extra", "db", "wal_records_per_job"), False,
           digits=2),
    Figure("drain: statements/job", "drain", ("extra", "db", "statements_per_job"), False,
           digits=3),
    Figure("drain: statement exec ms/job", "drain", ("extra", "db", "stmt_exec_ms_per_job"),
           False, digits=4),
    Figure("drain: commits/job", "drain", ("extra", "db", "xact_commit_per_job"), False,
           digits=3),
    Figure("drain: buffer hits/job", "drain", ("extra", "db", "blks_hit_per_job"), False),
    Figure("drain: tuples updated/job", "drain", ("extra", "db", "tup_updated_per_job"), None,
           digits=2),
    Figure("drain: tuples deleted/job", "drain", ("extra", "db", "tup_deleted_per_job"), None,
           digits=2),
    Figure("drain: worker RSS start MB", "drain", ("extra", "worker", "rss_mb_start"), None),
    Figure("drain: worker RSS end MB", "drain", ("extra", "worker", "rss_mb_end"), None),
    Figure("drain: worker RSS growth %", "drain", ("extra", "worker", "rss_growth_pct"), None,
           "<= 10%"),
    Figure("chain: handoff p50 ms", "chain", ("p50_ms",), None, "<= 10 ms", 2),
    Figure("chain: handoff p99 ms", "chain", ("p99_ms",), None, digits=2),
    Figure("chain: wall s", "chain", ("seconds",), None, digits=3),
    Figure("chain: statements/step (net of idle)", "chain",
           ("extra", "statements_net_per_step"), None, digits=2),
    Figure("fanout: fan-out handoff p50 ms", "fanout", ("extra", "fan_out_ms", "p50_ms"), None,
           digits=2),
    Figure("fanout: fan-out handoff p99 ms", "fanout", ("extra", "fan_out_ms", "p99_ms"), None,
           digits=2),
    Figure("fanout: fan-in handoff ms (median of runs)", "fanout", ("extra", "fan_in_ms"), None,
           "<= 10 ms", 2),
    Figure("fanout: wall s (median of runs)", "fanout", ("seconds",), None, digits=3),
    Figure("fanout: statements/step (net of idle)", "fanout",
           ("extra", "statements_net_per_step"), None, "flat in n", 2),
    Figure("insert10k: await app.insert(wf) s", "insert10k", ("seconds",), None, "< 1 s", 3),
)
# fmt: on


def dig(result: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def ratio(fig: Figure, baton: Any, peers: Sequence[Any]) -> str:
    """baton's value divided by the best peer's, with which peer value was best."""
    vals = [v for v in peers if isinstance(v, int | float)]
    if fig.higher_is_better is None or not vals or not isinstance(baton, int | float):
        return ""
    best = max(vals) if fig.higher_is_better else min(vals)
    if best == 0:
        return ""
    return f"{baton / best:.2f}x"


def rows(results: Sequence[dict[str, Any]], systems: Sequence[str]) -> list[list[str]]:
    """One row per figure (and per extra fanout size): label, systems..., ratio, target."""
    by_key = {(r["system"], r.get("label", r["workload"])): r for r in results}
    labels = sorted({r.get("label", "") for r in results if "@" in r.get("label", "")})
    out = []
    for fig in FIGURES:
        keys = [fig.workload]
        if fig.workload == "fanout" and "statements" in fig.label:
            keys = [*labels, "fanout"]
        for key in keys:
            vals = [dig(by_key.get((s, key), {}), fig.path) for s in systems]
            if all(v is None for v in vals):
                continue
            label = fig.label.replace("fanout:", f"{key}:") if key != fig.workload else fig.label
            n = next((by_key[(s, key)].get("n") for s in systems if (s, key) in by_key), "")
            cells = [_fmt(v, fig.digits) for v in vals]
            peer_vals = [v for s, v in zip(systems, vals, strict=True) if s != "baton"]
            baton = vals[systems.index("baton")] if "baton" in systems else None
            out.append(
                [label, f"{n:,}" if n else "", *cells, ratio(fig, baton, peer_vals), fig.target]
            )
    return out


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(results: Sequence[dict[str, Any]], systems: Sequence[str]) -> str:
    header = ["figure", "n", *systems, "baton / best peer", "target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results, systems)]
    return "\n".join(lines)


def problems(results: Sequence[dict[str, Any]]) -> list[str]:
    """Errors and skips, one line each."""
    return [
        f"{r['system']} {r.get('label', r['workload'])}: {r.get('error') or r.get('skipped')}"
        for r in results
        if r.get("error") or r.get("skipped")
    ]
