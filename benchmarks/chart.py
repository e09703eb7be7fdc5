"""The PNG chart of a benchmark run (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import dig

BARS = (
    ("enqueue_one, jobs/s (higher is better)", "enqueue_one", ("jobs_per_s",)),
    ("enqueue_batch, jobs/s (higher is better)", "enqueue_batch", ("jobs_per_s",)),
    ("drain at each one's best, jobs/s (higher is better)", "drain", ("jobs_per_s",)),
    ("latency enqueue->start p50 ms (lower is better)", "latency", ("p50_ms",)),
    ("latency enqueue->start p99 ms (lower is better)", "latency", ("p99_ms",)),
    ("drain, WAL bytes/job (lower is better)", "drain", ("extra", "db", "wal_bytes_per_job")),
)  # fmt: skip


LINE_COLORS = {"baton": "tab:orange", "procrastinate": "tab:purple", "pgqueuer": "tab:blue",
               "chancy": "tab:green", "oban": "tab:red"}  # fmt: skip


def _label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _color(system: str) -> str:
    return "tab:orange" if system == "baton" else "tab:blue"


def draw(
    results: Sequence[dict[str, Any]],
    sweep: Sequence[dict[str, Any]],
    systems: Sequence[str],
    path: Path,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r["system"], r.get("label", r["workload"])): r for r in results}
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    flat = list(axes.flat)
    for ax, (name, workload, keys) in zip(flat[:3] + flat[4:7], BARS, strict=True):
        vals = [dig(by_key.get((s, workload), {}), keys) for s in systems]
        shown = [(s, v) for s, v in zip(systems, vals, strict=True) if isinstance(v, int | float)]
        bars = ax.bar([s for s, _ in shown], [v for _, v in shown],
                      color=[_color(s) for s, _ in shown])  # fmt: skip
        ax.bar_label(bars, fmt=_label, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.margins(y=0.15)

    ax = flat[3]  # CPU per job of the drain: total bars, the split in the label
    cpu = [(s, dig(by_key.get((s, "drain"), {}), ("extra", "cpu")) or {}) for s in systems]
    cpu = [(s, c) for s, c in cpu if "total_us_per_job" in c]
    bars = ax.bar([s for s, _ in cpu], [c["total_us_per_job"] for _, c in cpu],
                  color=[_color(s) for s, _ in cpu])  # fmt: skip
    labels = [
        f"{_label(c['total_us_per_job'])}\n({_label(c['client_us_per_job'])}"
        f" + {_label(c['server_us_per_job'])})"
        for _, c in cpu
    ]
    ax.bar_label(bars, labels=labels, fontsize=7)
    if cpu:
        ax.set_yscale("log")
    ax.set_title("drain, CPU us/job, workers + server (lower is better)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.margins(y=0.3)

    ax = flat[7]  # best drain throughput at each process count
    for s in systems:
        points: dict[int, float] = {}
        for r in sweep:
            if r["system"] == s and r.get("jobs_per_s") and not r.get("error"):
                p = int(r.get("processes", 1))
                points[p] = max(points.get(p, 0.0), r["jobs_per_s"])
        if points:
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=s, color=LINE_COLORS.get(s))
            ax.set_xticks(xs)
    ax.set_title("drain sweep: best jobs/s by worker processes", fontsize=10)
    ax.set_xlabel("worker processes", fontsize=8)
    if ax.get_lines():
        ax.set_yscale("log")
        ax.legend(fontsize=7)

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
