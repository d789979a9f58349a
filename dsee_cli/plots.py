"""The report's figures (PNG, written atomically): Fig. 2, and score against weights left."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path

from scipy import stats

from .report import Report


def confidence_band(values: list[float], level: float = 0.90) -> tuple[float, float]:
    """(mean, half-width) of the two-sided t confidence interval; half-width 0 for one run."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * sem)


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_omega_sizes(report: Report, path: Path) -> None:
    """Fig. 2: the score against card(Ω), one line per Ω method, mean and 90 % CI band."""
    plt = _figure()
    size_key = "adapter.omega_size"
    method_key = next((k for k in report.row_keys if k != size_key), None)
    fig, axes = plt.subplots(1, len(report.columns), figsize=(5 * len(report.columns), 3.6), squeeze=False)
    for ax, column in zip(axes[0], report.columns):
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for row in report.rows:
            keys = dict(zip(report.row_keys, row))
            cell = report.cells[(row, column)]
            if cell.values and size_key in keys:
                mean, half = confidence_band(cell.values)
                lines.setdefault(keys.get(method_key, ""), []).append((float(keys[size_key]), mean, half))
        for label, points in lines.items():
            points.sort()
            xs, ys, hs = zip(*points)
            ax.plot(xs, ys, marker="o", label=label or None)
            ax.fill_between(xs, [y - h for y, h in zip(ys, hs)], [y + h for y, h in zip(ys, hs)], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("card(Ω)")
        ax.set_ylabel(f"{column}: mean, 90% CI")
        if any(lines):
            ax.legend(title=method_key)
    fig.suptitle(f"{report.table}: score against the size of Ω")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_against_weights_left(report: Report, path: Path) -> None:
    """Each row's median score against the % of block weights it keeps, one panel per column."""
    plt = _figure()
    n = len(report.columns)
    cols = min(4, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, column in zip(axes.flat, report.columns):
        for row in report.rows:
            cell = report.cells[(row, column)]
            if cell.values and cell.total_pct:
                x, y = statistics.median(cell.total_pct), statistics.median(cell.values)
                ax.scatter([x], [y])
                ax.annotate("/".join(row), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(column)
        ax.set_xlabel("block weights left (%)")
        ax.invert_xaxis()
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{report.table}: score against sparsity (median over seeds)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


PLOTS: dict[str, Callable[[Report, Path], None]] = {
    "fig2": plot_omega_sizes,
    "table3": plot_against_weights_left,
    "table14": plot_against_weights_left,
}
