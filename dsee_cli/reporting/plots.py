"""The report's figures (PNG, written atomically).

Each figure takes its axes from what the sweep varies, not from how the table is pivoted: one
panel per task, one series per value of the other swept keys (method, Ω method, model...), the
seeds aggregated. Where the paper has a number for a point it is drawn as a hollow marker of
the series' colour beside ours (filled). A figure with nothing to draw is not written; the
reason is returned instead.

* card(Ω) figures (Fig. 2, Table 12): mean and 90 % t-confidence band over seeds, log₂ axis.
* score against what is left (Tables 3, 14, PST Table 2: % of block weights; Table 6: FLOPs):
  the median over seeds, as the paper's tables.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scipy import stats

from dsee_cli.reporting.report import SEED, Point, Report


def confidence_band(values: list[float], level: float = 0.90) -> tuple[float, float]:
    """(mean, half-width) of the two-sided t confidence interval; half-width 0 for one run."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * sem)


@dataclass
class Series:
    label: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    half: list[float] = field(default_factory=list)  # the band's half-width (0: none)
    paper: list[tuple[float, float, float]] = field(default_factory=list)  # (x, y, x half-range)


@dataclass
class Figure:
    title: str
    xlabel: str
    ylabel: str
    panels: dict[str, list[Series]]  # panel title -> series
    log2_x: bool = False
    invert_x: bool = False
    caption: str = ""
    marks: list[tuple[float, str]] = field(default_factory=list)  # vertical reference lines

    def series_labels(self) -> set[str]:
        """The series with at least one drawn point."""
        return {s.label for series in self.panels.values() for s in series if s.x}


# Keys that move a point along the x axis rather than name a series.
_X_KEYS = {"sparsity", "pruning.rounds", "pruning.heads_to_remove", "adapter.omega_size"}


def _series_keys(report: Report, exclude: set[str]) -> list[str]:
    return [k for k in report.grid if k not in {SEED, "task", *exclude}]


def _label(point: Point, keys: list[str], default: str) -> str:
    return "/".join(point.grid[k] for k in keys) or default


def _groups(report: Report, keys: list[str], default: str) -> dict[str, dict[str, dict[tuple, list[Point]]]]:
    """panel -> series label -> the point's grid without the seed -> its seeds' points."""
    out: dict[str, dict[str, dict[tuple, list[Point]]]] = {}
    for p in report.points:
        where = tuple((k, v) for k, v in p.grid.items() if k != SEED)
        out.setdefault(p.panel, {}).setdefault(_label(p, keys, default), {}).setdefault(where, []).append(p)
    return out


def _paper_x(text: str | None) -> tuple[float, float] | None:
    """"70%" -> (70, 0); "30~50%" -> (40, 10); "0.92x" -> (0.92, 0); anything else -> None."""
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text or "")]
    if len(numbers) == 1:
        return numbers[0], 0.0
    if len(numbers) == 2 and "~" in (text or ""):
        return (numbers[0] + numbers[1]) / 2, abs(numbers[1] - numbers[0]) / 2
    return None


def omega_size_figure(report: Report) -> Figure | str:
    """Score against card(Ω): one line per Ω method (our presets kept apart), mean and 90 % band."""
    size = "adapter.omega_size"
    if len(report.grid.get(size, [])) < 2:
        return "card(Ω) is not swept (adapter.omega_size has fewer than two values), so there is no curve to draw"
    keys = _series_keys(report, {size})
    panels: dict[str, list[Series]] = {}
    for panel, by_label in _groups(report, keys, "DSEE").items():
        panels[panel] = []
        for label, by_point in by_label.items():
            series = Series(label)
            for points in sorted(by_point.values(), key=lambda ps: float(ps[0].grid[size])):
                mean, half = confidence_band([p.score for p in points])
                x = float(points[0].grid[size])
                series.x.append(x)
                series.y.append(mean)
                series.half.append(half)
                paper = report.cells[(report.row_of(points[0].grid), points[0].column)].paper
                if paper is not None:
                    series.paper.append((x, paper, 0.0))
            panels[panel].append(series)
    figure = Figure(f"{report.table}: score against card(Ω) (mean, 90% CI over seeds)", "card(Ω)", "score", panels,
                    log2_x=True)
    if report.table == "fig2":
        figure.caption = ("The paper gives Fig. 2 as a plot only, without numbers: no hollow markers. Its text states "
                          "that GreBsmo's Ω is best at every size and that 16 is the best size (dotted line).")
        figure.marks = [(16.0, "paper: best card(Ω)")]
    elif any(s.paper for series in panels.values() for s in series):
        figure.caption = "Filled: ours. Hollow: the paper's numbers."
    return figure


def _against(report: Report, attribute: str, paper_key: str, xlabel: str, invert: bool) -> Figure | str:
    keys = _series_keys(report, _X_KEYS)
    panels: dict[str, list[Series]] = {}
    for panel, by_label in _groups(report, keys, "DSEE").items():
        panels[panel] = []
        for label, by_point in by_label.items():
            series = Series(label)
            for points in by_point.values():
                x = statistics.median(getattr(p, attribute) for p in points)
                series.x.append(x)
                series.y.append(statistics.median(p.score for p in points))
                series.half.append(0.0)
                row = report.row_of(points[0].grid)
                paper = report.cells[(row, points[0].column)].paper
                if paper is not None:
                    px = _paper_x(report.paper_row_info.get(row, {}).get(paper_key))
                    series.paper.append((px[0], paper, px[1]) if px else (x, paper, 0.0))
            order = sorted(range(len(series.x)), key=lambda i: series.x[i])
            series.x, series.y, series.half = ([v[i] for i in order] for v in (series.x, series.y, series.half))
            panels[panel].append(series)
    if not any(s.x for series in panels.values() for s in series):
        return "no finished run to draw"
    paper = any(s.paper for series in panels.values() for s in series)
    return Figure(f"{report.table}: score against {xlabel} (median over seeds)", xlabel, "score", panels,
                  invert_x=invert, caption="Filled: ours. Hollow: the paper's numbers (at the paper's "
                                           f"{'FLOPs' if attribute == 'flops' else '% of weights'} where it gives "
                                           "one; a bar spans a range)." if paper else "")


def weights_left_figure(report: Report) -> Figure | str:
    return _against(report, "total_pct", "total", "block weights left (%)", invert=True)


def flops_figure(report: Report) -> Figure | str:
    return _against(report, "flops", "flops", "inference FLOPs (× dense, unmerged)", invert=True)


def speedup_figure(report: Report) -> Figure | str:
    """Score against the measured inference speed-up over the dense model (batch 32)."""
    if not any(p.speedup for p in report.points):
        return "no run measured its inference speed (measure=false)"
    kept = [p for p in report.points if p.speedup]
    view = Report(report.table, report.row_keys, report.column_key, report.rows, report.columns, report.cells,
                  report.paper_row_info, report.grid, kept, report.note)
    figure = _against(view, "speedup", "", "measured inference speed-up (× dense, batch 32)", invert=False)
    if isinstance(figure, Figure):
        figure.panels = {k: [Series(s.label, s.x, s.y, s.half) for s in v] for k, v in figure.panels.items()}
        figure.caption = "Ours only: the paper reports FLOPs, not measured speed."
    return figure


# The second figure of the pruning tables: what the pruning buys in measured speed.
SPEED_FIGURES = ("table3", "table6", "table14")

FIGURES: dict[str, Callable[[Report], Figure | str]] = {
    "fig2": omega_size_figure,
    "table12": omega_size_figure,
    "table3": weights_left_figure,
    "table14": weights_left_figure,
    "pst-table2": weights_left_figure,
    "table6": flops_figure,
}


def draw(figure: Figure, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    labels = list(dict.fromkeys(s.label for series in figure.panels.values() for s in series if s.x))  # sweep order
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    n = len(figure.panels)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 2.2, 3.4 * rows + (0.5 if figure.caption else 0)),
                             squeeze=False)
    for ax, (panel, series_list) in zip(axes.flat, figure.panels.items()):
        for s in series_list:
            if not s.x:
                continue
            c = colour[s.label]
            ax.plot(s.x, s.y, marker="o", color=c, linestyle="-" if len(s.x) > 1 else "none")
            if any(s.half):
                ax.fill_between(s.x, [y - h for y, h in zip(s.y, s.half)], [y + h for y, h in zip(s.y, s.half)],
                                color=c, alpha=0.15)
            for x, y, xr in s.paper:
                ax.scatter([x], [y], s=70, facecolors="none", edgecolors=c, linewidths=1.6, zorder=3)
                if xr:
                    ax.errorbar([x], [y], xerr=[xr], fmt="none", ecolor=c, capsize=3, linewidth=1)
        for x, text in figure.marks:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
            ax.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, color="grey",
                        xytext=(3, -10), textcoords="offset points")
        if figure.log2_x:
            ax.set_xscale("log", base=2)
        if figure.invert_x:
            ax.invert_xaxis()
        ax.set_title(panel)
        ax.set_xlabel(figure.xlabel)
        ax.set_ylabel(figure.ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [Line2D([], [], color=colour[label], marker="o", label=label) for label in labels]
    if any(s.paper for series in figure.panels.values() for s in series):
        handles += [Line2D([], [], color="black", marker="o", linestyle="none", label="ours"),
                    Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="none", label="paper")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(figure.title)
    if figure.caption:
        fig.text(0.01, 0.0, figure.caption, fontsize=8, wrap=True, va="top")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)


def write_figure(report: Report, path: Path, make: Callable[[Report], Figure | str] | None = None
                 ) -> tuple[Figure | None, str]:
    """(the figure drawn, "") or (None, why nothing was drawn)."""
    make = make or FIGURES.get(report.table)
    if make is None:
        return None, f"{report.table} has no figure (figures are drawn for {', '.join(FIGURES)})"
    figure = make(report)
    if isinstance(figure, str):
        return None, figure
    draw(figure, path)
    return figure, ""

