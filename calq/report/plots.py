"""PNG charts for the reports, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

Reliability bins are the list `CalibrationStats.reliability()` returns (token level: calq.evaluation.tokens;
answer level: calq.evaluation.answers): [{"lo", "hi", "count", "confidence", "accuracy"}, ...].
"""

from __future__ import annotations

import io
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def reliability_diagram(series: dict[str, list[dict]], title: str) -> bytes:
    """Accuracy against mean confidence per bin for each series (one line each), over the share of
    predictions per bin. Points on the diagonal are calibrated; below it, overconfident."""
    fig = Figure(figsize=(5.2, 5.2), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="calibrated")
    for label, bins in series.items():
        filled = [b for b in bins if b["count"]]
        total = sum(b["count"] for b in bins) or 1
        line, = top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o", markersize=3,
                         label=label)
        bottom.stairs([b["count"] / total for b in bins], [bins[0]["lo"], *(b["hi"] for b in bins)],
                      color=line.get_color())
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(fontsize=7, loc="upper left")
    top.grid(alpha=0.3)
    bottom.set(xlabel="confidence", ylabel="share")
    bottom.grid(alpha=0.3)
    return _png(fig)


def task_chart(rows: list[dict], metrics: tuple[str, ...] = ("accuracy", "ece")) -> bytes:
    """One panel per metric: a bar group per task, a bar per variant (colour) and calibrator (hatching), whiskers =
    `<metric>_ci`; the legend sits to the right. Rows without the metric (ECE of a generative task) leave a gap."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    series = list(dict.fromkeys((r["variant"], r["calibrator"]) for r in rows))
    variants = list(dict.fromkeys(v for v, _ in series))
    calibrators = list(dict.fromkeys(c for _, c in series))
    by_key = {(r["variant"], r["calibrator"], r["task"]): r for r in rows}
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(4.0, 1.1 * len(tasks) + 1.5) + 2.6, 3.0 * len(metrics)), dpi=100, layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        for i, (variant, calibrator) in enumerate(series):
            xs, values, low, high = [], [], [], []
            for t, task in enumerate(tasks):
                row = by_key.get((variant, calibrator, task))
                if row is None or row.get(metric) is None:
                    continue
                ci = row.get(f"{metric}_ci") or [row[metric], row[metric]]
                xs.append(t - 0.4 + width * (i + 0.5))
                values.append(row[metric])
                low.append(row[metric] - ci[0])
                high.append(ci[1] - row[metric])
            ax.bar(xs, values, width, yerr=[low, high], capsize=2, label=f"{variant} / {calibrator}",
                   color=f"C{variants.index(variant) % 10}",
                   hatch=HATCHES[calibrators.index(calibrator) % len(HATCHES)], edgecolor="white", linewidth=0,
                   error_kw={"linewidth": 0.8})
        ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    return _png(fig)


def risk_coverage(rows: list[dict]) -> bytes:
    """One panel per task: the error rate among the answered questions against the share answered (most confident
    first), a line per variant / calibrator. A useful confidence falls to the left; a flat line ranks no better than
    chance."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(min(3.2 * len(tasks), 16) + 2.6, 3.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    for ax, task in zip(axes, tasks):
        for r in (r for r in rows if r["task"] == task):
            ax.plot(r["risk_coverage"]["coverage"], r["risk_coverage"]["risk"], linewidth=1.2,
                    label=f"{r['variant']} / {r['calibrator']}", linestyle="--" if r["calibrator"] == "none" else "-")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="coverage", title=task)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("risk (error rate)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    return _png(fig)


HATCHES = ("", "///", "...", "xxx", "\\\\\\")


def sensitivity_heatmap(layers: dict[str, dict], title: str) -> bytes:
    """Mean KLD per Linear (log colour scale) as decoder block x projection; Linears outside a numbered block get
    their own row at the bottom."""
    from matplotlib.colors import LogNorm

    cells = {}
    for name, m in layers.items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        row, column = (int(match.group(1)), match.group(2)) if match else ("other", name)
        cells[row, column] = m["mean_kld"]
    rows = sorted({r for r, _ in cells if r != "other"}) + (["other"] if any(r == "other" for r, _ in cells) else [])
    columns = list(dict.fromkeys(c for _, c in cells))
    grid = np.full((len(rows), len(columns)), np.nan)
    for (r, c), value in cells.items():
        grid[rows.index(r), columns.index(c)] = value
    positive = grid[grid > 0]
    fig = Figure(figsize=(1.0 * len(columns) + 2.5, 0.22 * len(rows) + 1.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    norm = LogNorm(positive.min(), positive.max()) if positive.size and positive.min() < positive.max() else None
    image = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(columns)), [c.split(".")[-1] for c in columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    ax.set(ylabel="decoder block", title=title)
    fig.colorbar(image, ax=ax, label="mean KLD, this layer alone quantized")
    return _png(fig)


def size_quality(points: list[dict], metrics: dict[str, str]) -> bytes:
    """One panel per metric (key -> axis label): each point's size against the metric, the Pareto front (smaller
    and lower is better) joined and ringed."""
    fig = Figure(figsize=(5.0 * len(metrics), 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, label) in zip(axes, metrics.items()):
        shown = [p for p in points if p.get(metric) is not None and p.get("bytes")]
        front = pareto_front([(p["bytes"], p[metric]) for p in shown])
        for i, p in enumerate(shown):
            ax.scatter(p["bytes"] / 2**20, p[metric], color=f"C{i % 10}", zorder=3, label=p["label"],
                       edgecolors="black" if i in front else "none", linewidths=1.5, s=50)
        on_front = sorted((shown[i]["bytes"] / 2**20, shown[i][metric]) for i in front)
        if len(on_front) > 1:
            ax.step(*zip(*on_front), where="post", color="0.5", linestyle="--", linewidth=1, label="Pareto front")
        ax.set(xlabel="size (MiB)", ylabel=label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    return _png(fig)


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points no other point beats: none is at most as large and as bad, and better in one."""
    return {i for i, (size, value) in enumerate(points)
            if not any(s <= size and v <= value and (s, v) != (size, value) for s, v in points)}
