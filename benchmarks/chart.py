"""The PNG chart of a benchmark run (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import dig

PANELS = (
    ("enqueue_one, jobs/s (higher is better)", "enqueue_one", ("jobs_per_s",)),
    ("enqueue_batch, jobs/s (higher is better)", "enqueue_batch", ("jobs_per_s",)),
    ("drain, jobs/s first->last start (higher is better)", "drain",
     ("extra", "steady_jobs_per_s")),
    ("latency enqueue->start p50 ms (lower is better)", "latency", ("p50_ms",)),
    ("latency enqueue->start p99 ms (lower is better)", "latency", ("p99_ms",)),
    ("drain, server CPU ms/job (lower is better)", "drain",
     ("extra", "db", "server_cpu_ms_per_job")),
    ("drain, WAL bytes/job (lower is better)", "drain", ("extra", "db", "wal_bytes_per_job")),
    ("drain, statements/job (lower is better)", "drain",
     ("extra", "db", "statements_per_job")),
)  # fmt: skip


def _label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def draw(results: Sequence[dict[str, Any]], systems: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r["system"], r.get("label", r["workload"])): r for r in results}
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (name, workload, keys) in zip(axes.flat, PANELS, strict=True):
        vals = [dig(by_key.get((s, workload), {}), keys) for s in systems]
        shown = [(s, v) for s, v in zip(systems, vals, strict=True) if isinstance(v, int | float)]
        colors = ["tab:orange" if s == "baton" else "tab:blue" for s, _ in shown]
        bars = ax.bar([s for s, _ in shown], [v for _, v in shown], color=colors)
        ax.bar_label(bars, fmt=_label, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
