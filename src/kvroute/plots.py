"""Plots of results: quality against KV KiB per token (:func:`pareto_plot`), and bench rows (:func:`bench_plot`).

In the Pareto plot, one line per checkpoint; a plan that ran calibrated is drawn as a star
and labelled ``every:2 (cal)``.

Rendered with matplotlib's Agg backend (no display needed); matplotlib is the
``kvroute[plot]`` extra.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvroute.results import METRICS, PRIMARY, plan_label

if TYPE_CHECKING:
    from kvroute.bench import BenchReport


def pareto_plot(rows: list[dict[str, Any]], out: str | Path, metrics: dict[str, str] | None = None) -> Path:
    """Write a PNG with one panel per dataset: its main metric against KV KiB/token.

    Args:
        rows: result rows (``results.json``'s ``rows``).
        out: the PNG path.
        metrics: task -> metric to plot; default: loss (lm), f1 (qa), acc (mc).

    Returns:
        The PNG path.

    Raises:
        ValueError: when no row has a metric to plot.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'kvroute[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    chosen = {**PRIMARY, **(metrics or {})}
    panels: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if chosen.get(r["task"]) == r["metric"]:
            panels.setdefault((r["task"], r["data"], r["metric"]), []).append(r)
    if not panels:
        raise ValueError("nothing to plot: no rows with metrics " + ", ".join(sorted(set(chosen.values()))))

    cols = min(3, len(panels))
    rows_ = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.5 * cols, 4.2 * rows_), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, ((task, data, metric), panel) in zip(axes.flat, panels.items()):
        by_ckpt: dict[str, list[dict[str, Any]]] = {}
        for r in panel:
            by_ckpt.setdefault(str(r["checkpoint"]), []).append(r)
        for ckpt, points in by_ckpt.items():
            points.sort(key=lambda r: (float(r["kv_kib_per_token"]), bool(r.get("calibrated"))))
            xs = [float(r["kv_kib_per_token"]) for r in points]
            ys = [float(r["value"]) for r in points]
            (line,) = ax.plot(xs, ys, marker="o", label=ckpt)
            cal = [(x, y) for x, y, r in zip(xs, ys, points) if r.get("calibrated")]
            if cal:
                ax.plot(*zip(*cal), linestyle="none", marker="*", markersize=12, color=line.get_color())
            for x, y, r in zip(xs, ys, points):
                ax.annotate(plan_label(r), (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=line.get_color())
        if any(r.get("calibrated") for r in panel):  # a legend entry for the star
            ax.plot([], [], linestyle="none", marker="*", markersize=10, color="gray", label="calibrated plan")
        better = "higher" if METRICS.get(metric, True) else "lower"
        ax.set_title(f"{task}: {'/'.join(Path(str(data)).parts[-2:])}", fontsize=10)
        ax.margins(x=0.1, y=0.1)
        ax.set_xlabel("KV cache KiB per token")
        ax.set_ylabel(f"{metric} ({better} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bench_plot(report: BenchReport, path: str | Path) -> Path | None:
    """Write a PNG of ``kvroute bench``'s rows: KV MB, TTFT and decode tok/s per plan, one bar per (context, batch).

    Returns:
        The PNG path, or None (with a note on stderr) when matplotlib is not installed.
    """
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping bench.png", file=sys.stderr)
        return None
    cfg = report.config
    combos = [(c, b) for c in cfg.contexts for b in cfg.batches]
    specs = list(dict.fromkeys(plan_label(r) for r in report.rows))
    metrics = [("kv_mb", "KV cache (MB)"), ("ttft_ms", "TTFT (ms)"), ("decode_tok_s", "decode (tok/s)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(combos)
    by_key = {(r["context"], r["batch"], plan_label(r)): r for r in report.rows}
    for ax, (key, label) in zip(axes, metrics):
        for i, (c, b) in enumerate(combos):
            xs = [j + (i - (len(combos) - 1) / 2) * width for j in range(len(specs))]
            ax.bar(xs, [by_key[(c, b, s)][key] for s in specs], width, label=f"ctx {c}, batch {b}")
        ax.set_xticks(range(len(specs)), specs, rotation=30)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"kvroute bench: {report.meta['model']} ({report.meta['dtype']}, {report.meta['device']}, "
                 f"{report.meta['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
