"""Turn benchmark results into tables: each system at its best (with CPU per job and
baton's ratios to the best peer), the drain sweep, and every figure per system."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Figure:
    label: str
    workload: str
    path: tuple[str, ...]
    higher_is_better: bool | None  # None: informational, no ratio
    target: str = ""
    digits: int = 1
    every_size: bool = False
    """Also shown for each extra size of its workload (``fanout@250``, ``fanout@10000x2``)."""


# fmt: off
FIGURES = (
    Figure("enqueue_one jobs/s", "enqueue_one", ("jobs_per_s",), True),
    Figure("enqueue_batch jobs/s (1,000 per call)", "enqueue_batch", ("jobs_per_s",), True,
           ">= 2.5x best peer"),
    Figure("enqueue_batch: CPU us/job, client + server", "enqueue_batch",
           ("extra", "cpu", "total_us_per_job"), False),
    Figure("drain jobs/s (start to table done)", "drain", ("jobs_per_s",), True,
           ">= 2.5x best peer"),
    Figure("drain jobs/s (first to last start)", "drain", ("extra", "steady_jobs_per_s"), True),
    Figure("drain: worker processes x setting", "drain", ("setting",), None),
    Figure("drain: first job after worker start, s", "drain", ("extra", "first_job_after_s"),
           False, digits=3),
    Figure("drain: client CPU us/job (worker processes)", "drain",
           ("extra", "cpu", "client_us_per_job"), False),
    Figure("drain: server CPU us/job (postgres)", "drain", ("extra", "cpu", "server_us_per_job"),
           False),
    Figure("drain: total CPU us/job", "drain", ("extra", "cpu", "total_us_per_job"), False,
           "<= 0.5x best peer"),
    Figure("drain: cores busy, client + server", "drain", ("extra", "cpu", "cores"), None,
           digits=2),
    Figure("latency enqueue->start p50 ms", "latency", ("p50_ms",), False, digits=2),
    Figure("latency enqueue->start p99 ms", "latency", ("p99_ms",), False, "<= 5 ms", 2),
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
    Figure("drain: worker RSS start MB (each)", "drain", ("extra", "worker", "rss_mb_start"),
           None),
    Figure("drain: worker RSS end MB (each)", "drain", ("extra", "worker", "rss_mb_end"), None),
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
           ("extra", "statements_net_per_step"), None, "flat in n", 2, every_size=True),
    Figure("fanout: steps/s from the insert's commit (median of runs)", "fanout",
           ("extra", "steps_per_s_after_insert"), None, ">= 10,000 at 10,000", 0,
           every_size=True),
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
    """One row per figure (and per extra size of its workload): label, systems..., ratio,
    target."""
    by_key = {(r["system"], r.get("label", r["workload"])): r for r in results}
    out = []
    for fig in FIGURES:
        keys = [fig.workload]
        if fig.every_size:
            sizes = {r.get("label", "") for r in results if r["workload"] == fig.workload}
            keys = [*sorted(s for s in sizes if "@" in s), fig.workload]
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


# Each system's knob, as the system names it.
KNOB = {"baton": "concurrency", "procrastinate": "concurrency", "chancy": "concurrency",
        "oban": "limit"}  # fmt: skip


def setting_label(system: str, processes: int, concurrency: int) -> str:
    """``2 x concurrency 200``: worker processes and the system's own setting in each."""
    if system == "pgqueuer":  # as benchmarks.peers.pgqueuer_peer maps it
        batch = max(1, concurrency // 2)
        knob = f"batch {batch}, tasks {max(concurrency, 2 * batch)}"
    else:
        knob = f"{KNOB.get(system, 'concurrency')} {concurrency}"
    return f"{processes} x {knob}"


@dataclass(frozen=True)
class Column:
    label: str
    workload: str
    path: tuple[str, ...]
    higher_is_better: bool | None
    digits: int = 1
    target: str = ""
    goal: tuple[str, float] | None = None  # ("ratio>=", 2.5), ("ratio<=", 0.5), ("<=", 5)


HEADLINE = (
    Column("drain jobs", "drain", ("n",), None, 0),
    Column("drain jobs/s", "drain", ("jobs_per_s",), True, 0, ">= 2.5x", ("ratio>=", 2.5)),
    Column("CPU us/job client", "drain", ("extra", "cpu", "client_us_per_job"), False),
    Column("CPU us/job server", "drain", ("extra", "cpu", "server_us_per_job"), False),
    Column("CPU us/job total", "drain", ("extra", "cpu", "total_us_per_job"), False, 1,
           "<= 0.5x", ("ratio<=", 0.5)),
    Column("batch enqueue jobs/s", "enqueue_batch", ("jobs_per_s",), True, 0, ">= 2.5x",
           ("ratio>=", 2.5)),
    Column("batch enqueue CPU us/job", "enqueue_batch", ("extra", "cpu", "total_us_per_job"),
           False),
    Column("enqueue->start p50 ms", "latency", ("p50_ms",), False, 2),
    Column("enqueue->start p99 ms", "latency", ("p99_ms",), False, 2),
    Column("enqueue->start p99 ms, best processes", "latency best", ("p99_ms",), False, 2,
           "<= 5 ms", ("<=", 5.0)),
    Column("best latency at", "latency best", ("setting",), None),
)  # fmt: skip


def latency_best(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Of one system's latency runs (one setting, several process counts), the one with the
    lowest p99, labelled ``latency best``; an empty result if none finished."""
    ok = [r for r in runs if r.get("p99_ms") is not None and not r.get("error")]
    first = runs[0]
    out: dict[str, Any] = {"system": first["system"], "workload": "latency",
                           "label": "latency best", "of": [r.get("label") for r in runs]}
    if ok:
        b = min(ok, key=lambda r: r["p99_ms"])
        out.update({k: b.get(k) for k in ("n", "p50_ms", "p99_ms", "max_ms", "processes",
                                          "run_concurrency", "setting")})
    return out


def latency_table(results: Sequence[dict[str, Any]], systems: Sequence[str]) -> str:
    """Per system, enqueue -> start p50 / p99 ms at each worker process count (the setting
    per process is the drain's choice)."""
    runs = [r for r in results if r.get("workload") == "latency" and r.get("label") !=
            "latency best" and r.get("p99_ms") is not None]  # fmt: skip
    counts = sorted({int(r.get("processes", 1)) for r in runs})
    header = ["system", *(f"{p} process{'es' if p > 1 else ''}: p50 / p99 ms" for p in counts)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in systems:
        cells = []
        for p in counts:
            r = next((r for r in runs if r["system"] == s and r.get("processes", 1) == p), None)
            cells.append(f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}" if r else "-")
        lines.append("| " + " | ".join([s, *cells]) + " |")
    return "\n".join(lines)


def _best_peer(col: Column, vals: dict[str, Any]) -> float | None:
    peers = [v for s, v in vals.items() if s != "baton" and isinstance(v, int | float)]
    if not peers or col.higher_is_better is None:
        return None
    return max(peers) if col.higher_is_better else min(peers)


def headline(
    results: Sequence[dict[str, Any]], systems: Sequence[str], chosen: dict[str, Any]
) -> str:
    """Each system at its chosen setting: throughput, CPU per job, latency; then baton's
    ratio to the best peer in each column, the target and whether it is met."""
    by_key = {(r["system"], r.get("label", r["workload"])): r for r in results}
    header = ["system", "chosen: processes x setting", *(c.label for c in HEADLINE)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cols = {c.label: {s: dig(by_key.get((s, c.workload), {}), c.path) for s in systems}
            for c in HEADLINE}  # fmt: skip
    for s in systems:
        c = chosen.get(s, {})
        label = setting_label(s, c["processes"], c["concurrency"]) if c else "-"
        cells = [_fmt(cols[col.label][s], col.digits) for col in HEADLINE]
        lines.append("| " + " | ".join([f"**{s}**" if s == "baton" else s, label, *cells]) + " |")
    if "baton" not in systems:
        return "\n".join(lines)
    ratios, targets, verdicts = [], [], []
    for col in HEADLINE:
        baton, best = cols[col.label]["baton"], _best_peer(col, cols[col.label])
        r = baton / best if isinstance(baton, int | float) and best else None
        ratios.append(f"{r:.2f}x" if r is not None else "")
        targets.append(col.target)
        verdict = ""
        if col.goal is not None:
            kind, bound = col.goal
            value = baton if kind == "<=" else r
            if isinstance(value, int | float):
                ok = value >= bound if kind.endswith(">=") else value <= bound
                verdict = "met" if ok else "NOT met"
        verdicts.append(verdict)
    lines.append("| baton / best peer |  | " + " | ".join(ratios) + " |")
    lines.append("| target |  | " + " | ".join(targets) + " |")
    lines.append("| verdict |  | " + " | ".join(verdicts) + " |")
    return "\n".join(lines)


def sweep_table(
    sweep: Sequence[dict[str, Any]], systems: Sequence[str], chosen: dict[str, Any]
) -> str:
    """Every sweep run: throughput, CPU per job and cores busy; the chosen one in bold."""
    header = ["system", "processes x setting", "n", "drain jobs/s", "steady jobs/s",
              "CPU us/job client", "server", "total", "cores busy", "note"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in systems:
        c = chosen.get(s, {})
        for r in (r for r in sweep if r["system"] == s):
            cpu = dig(r, ("extra", "cpu")) or {}
            label = setting_label(s, r.get("processes", 1), r.get("run_concurrency", 0))
            if (r.get("processes"), r.get("run_concurrency")) == (
                c.get("processes"), c.get("concurrency")):  # fmt: skip
                label = f"**{label}**"
            lines.append("| " + " | ".join([
                s, label, f"{r.get('n', 0):,}", _fmt(r.get("jobs_per_s"), 0),
                _fmt(dig(r, ("extra", "steady_jobs_per_s")), 0),
                _fmt(cpu.get("client_us_per_job"), 1), _fmt(cpu.get("server_us_per_job"), 1),
                _fmt(cpu.get("total_us_per_job"), 1), _fmt(cpu.get("cores"), 2),
                str(r.get("error") or r.get("skipped") or "")[:80],
            ]) + " |")  # fmt: skip
    return "\n".join(lines)


def scaling_table(sweep: Sequence[dict[str, Any]], systems: Sequence[str]) -> str:
    """Per system, the best drain jobs/s at each process count over its settings."""
    counts = sorted({int(r.get("processes", 1)) for r in sweep})
    header = ["system", *(f"{p} process{'es' if p > 1 else ''}" for p in counts)]
    if len(counts) > 1:
        header.append(f"gain {counts[0]} -> {counts[1]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in systems:
        bests: list[float | None] = []
        for p in counts:
            vals = [
                r["jobs_per_s"]
                for r in sweep
                if r["system"] == s
                and r.get("processes") == p
                and r.get("jobs_per_s")
                and not r.get("error")
            ]
            bests.append(max(vals) if vals else None)  # fmt: skip
        cells = [_fmt(v, 0) for v in bests]
        if len(counts) > 1:
            a, b = bests[0], bests[1]
            cells.append(f"{100 * (b - a) / a:+.0f} %" if a and b else "")
        lines.append("| " + " | ".join([s, *cells]) + " |")
    return "\n".join(lines)


WORKFLOWS = ("chain", "fanout", "insert10k")


def document(
    results: Sequence[dict[str, Any]],
    sweep: Sequence[dict[str, Any]],
    systems: Sequence[str],
    chosen: dict[str, Any],
    workflow_concurrency: int | None = None,
) -> str:
    """The whole report in markdown: headline, scaling, sweep, every figure."""
    parts = ["## Each system at its best", "", headline(results, systems, chosen)]
    if sweep:
        parts += ["", "## Drain by worker processes (best setting at each count)", "",
                  scaling_table(sweep, systems), "", "## The drain sweep", "",
                  sweep_table(sweep, systems, chosen)]  # fmt: skip
    if len({r.get("processes") for r in results if r.get("workload") == "latency"}) > 1:
        parts += ["", "## Latency by worker processes (the drain's setting per process)", "",
                  latency_table(results, systems)]  # fmt: skip
    parts += ["", "## Every figure", ""]
    if workflow_concurrency is not None and any(r.get("system") == "baton" and
                                                r.get("workload") in WORKFLOWS for r in results):
        parts += [f"baton's workflow workloads ran with {workflow_concurrency} slots per "
                  "worker process.", ""]
    parts.append(markdown(results, systems))
    return "\n".join(parts)


def summary(
    results: Sequence[dict[str, Any]], systems: Sequence[str], chosen: dict[str, Any]
) -> str:
    """One paragraph of what the run shows: baton against the best peer, figure by figure,
    each system at its chosen setting (sentences built from the figures, nothing else)."""
    by_key = {(r["system"], r.get("label", r["workload"])): r for r in results}
    if "baton" not in systems or len(systems) < 2:
        return ""
    parts = []
    for col in HEADLINE:
        if col.label not in ("drain jobs/s", "CPU us/job total", "batch enqueue jobs/s"):
            continue
        vals = {s: dig(by_key.get((s, col.workload), {}), col.path) for s in systems}
        peers = {s: v for s, v in vals.items() if s != "baton" and isinstance(v, int | float)}
        baton = vals["baton"]
        if not peers or not isinstance(baton, int | float):
            continue
        pick = max if col.higher_is_better else min
        peer = pick(peers, key=lambda s: peers[s])
        where = ""
        if col.workload == "drain" and peer in chosen:  # the setting the figure was taken at
            where = (
                f" ({setting_label(peer, chosen[peer]['processes'], chosen[peer]['concurrency'])})"
            )
        parts.append(
            f"{col.label}: baton {_fmt(baton, col.digits)}, best peer {peer} "
            f"{_fmt(peers[peer], col.digits)}{where}, {baton / peers[peer]:.2f}x"
        )
    p99 = dig(by_key.get(("baton", "latency"), {}), ("p99_ms",))
    if isinstance(p99, int | float):
        parts.append(f"baton's enqueue->start p99 {p99:.2f} ms")
    return "; ".join(parts) + "." if parts else ""


BEGIN, END = "<!-- benchmark-results:begin -->", "<!-- benchmark-results:end -->"


def write_docs(path: Path, text: str, meta: dict[str, Any], json_name: str) -> None:
    """Replace what lies between the page's result markers with this run's tables."""
    page = path.read_text()
    start, end = page.index(BEGIN) + len(BEGIN), page.index(END)
    m, g = meta["machine"], meta["git"]
    head = (
        f"Run of `{meta['command']}` at commit {g['commit'][:7]}"
        f"{' (baton/ had uncommitted changes)' if g['baton_dirty'] else ''}: "
        f"{meta['seconds'] / 60:.1f} minutes on {m.get('cpus')} CPUs "
        f"(load average {' '.join(m.get('loadavg_at_start', []))} at the start), "
        f"{meta['postgres']['version'].split(' on ')[0]}; "
        f"figures in `benchmarks/results/{json_name}`, the sweep included.\n\n"
        f"**{meta['summary']}**"
    )
    # The report's headings are one level too high for the page.
    body = text.replace("\n## ", "\n### ").replace("## ", "### ", 1)
    path.write_text(page[:start] + "\n" + head + "\n\n" + body + "\n" + page[end:])
