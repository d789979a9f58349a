"""`dsee report <sweep dir>`: one experiment's runs as the paper's table, ours beside theirs.

The expected grid comes from Hydra's ``multirun.yaml`` (the sweeper's params and comma lists
on the command line); each job directory holds ``.hydra/overrides.yaml`` and, when it
finished, ``metrics.json``. Runs are grouped by every swept key but the seed; each cell is
the median over seeds (the paper reports medians) with the standard deviation, the paper's
number and the difference. Failed and missing runs are counted in the cell, never dropped.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from dsee_cli.atomic import atomic_write_text
from dsee_cli.errors import DSEEError

SEED = "seed"
# The paper reports accuracy, Matthews correlation (CoLA) and Pearson (STS-B).
PAPER_METRIC = {"cola": "matthews_correlation", "stsb": "pearson"}


def paper_metric(task: str, overrides: dict[str, str] | None = None) -> str:
    """The metric a table reports for a task (a table may override it: PST reports MRPC and QQP F1)."""
    split = "validation_matched" if task == "mnli" else "validation"
    return f"{split}/{(overrides or {}).get(task) or PAPER_METRIC.get(task, 'accuracy')}"


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    by_seed: dict[str, float] = field(default_factory=dict)  # seed -> the best evaluation's score
    last_by_seed: dict[str, float] = field(default_factory=dict)  # seed -> the last evaluation's
    evaluations: list[int] = field(default_factory=list)  # periodic evaluations each run chose its best among
    failed: int = 0
    missing: int = 0
    unmeasured: int = 0  # finished runs that did not measure it (e.g. zero-shot accuracy without task.lm_eval)
    paper: float | None = None
    # what the paper's tables print beside the scores, from each finished run's metrics.json
    last: list[float] = field(default_factory=list)  # the last evaluation's score (values: the best's)
    trainable: list[int] = field(default_factory=list)
    total_pct: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    # what it cost and saves (APT's layout), where the runs measured it
    train_seconds: list[float] = field(default_factory=list)
    train_memory: list[float] = field(default_factory=list)
    speedup: list[float] = field(default_factory=list)  # dense latency / ours, batch 32
    memory_ratio: list[float] = field(default_factory=list)  # inference peak memory, ours / dense
    prune_seconds: list[float] = field(default_factory=list)  # phase II (Wanda, SparseGPT: calibration included)
    prune_memory: list[float] = field(default_factory=list)  # phase II's peak memory

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else None)

    def text(self) -> str:
        digits = 3 if self.paper is not None and abs(self.paper) < 1 else 2  # METEOR / TER are fractions
        if self.median is None:
            ours = "—"
        else:
            ours = f"{self.median:.{digits}f} ({self.std:.{digits}f})"
        extra = []
        if self.paper is not None:
            extra.append(f"paper {self.paper:.{digits}f}")
            if self.median is not None:
                extra.append(f"Δ {self.median - self.paper:+.{digits}f}")
        if self.failed:
            extra.append(f"{self.failed} failed")
        if self.missing:
            extra.append(f"{self.missing} missing")
        if self.unmeasured:
            extra.append(f"{self.unmeasured} not measured")
        return ours + (f" [{', '.join(extra)}]" if extra else "")


def short_name(key: str) -> str:
    """The name a user typed for a swept key: omega_size for adapter.omega_size."""
    return key.rsplit(".", 1)[-1]


@dataclass
class Point:
    """One finished job's score in one report column, with where it sits in the sweep."""

    grid: dict[str, str]  # every swept key's value, the seed included
    column: str  # the report column (a task, task:metric, or the value of the column key)
    panel: str  # the task (or task:metric) it belongs to, however the table is pivoted
    score: float
    total_pct: float
    flops: float
    speedup: float | None = None  # measured inference speed-up over the dense model (batch 32)


@dataclass
class Report:
    table: str
    row_keys: list[str]
    column_key: str
    rows: list[tuple[str, ...]]
    columns: list[str]
    cells: dict[tuple[tuple[str, ...], str], Cell]
    paper_row_info: dict[tuple[str, ...], dict[str, str]] = field(default_factory=dict)
    grid: dict[str, list[str]] = field(default_factory=dict)  # what the sweep varies (seed included)
    points: list[Point] = field(default_factory=list)
    note: str = ""  # the paper's note on this table
    claims: list[dict] = field(default_factory=list)  # the paper's qualitative claims (paper_numbers.yaml)
    trivial: dict[str, float] = field(default_factory=dict)  # column -> the input-blind predictor's score
    protocol: dict[str, str] = field(default_factory=dict)  # column -> which split and metric selected, which reported
    pruning_cost: bool = False  # the cost table shows each row's pruning time and peak memory (the LLM pruners)
    serving: str = ""  # what the sweep's exports gain in serving (zeros: nothing, on today's stacks)

    def protocol_line(self) -> str:
        """Which split (and metric) chose each run's best evaluation, and which one the cells report."""
        if not self.protocol:
            return ""
        kinds = sorted(set(self.protocol.values()))
        if len(kinds) == 1:
            return f"protocol: {kinds[0]}"
        return "protocol: " + "; ".join(f"{c}: {p}" for c, p in self.protocol.items())

    def trivial_row(self, digits_of) -> tuple[str, ...] | None:
        """The row that says what a score must beat to mean anything (None if no run recorded it)."""
        if not self.trivial:
            return None
        return tuple(_number(self.trivial.get(c), digits_of(c)) for c in self.columns)

    def row_of(self, grid: dict[str, str]) -> tuple[str, ...]:
        return tuple(grid[k] for k in self.row_keys)

    def row_info(self, row: tuple[str, ...], columns: list[str] | None = None) -> dict[str, str]:
        """Trainable parameters, % of block weights left, FLOPs: ours (the paper's), over the row's
        cells (or those of ``columns``)."""
        cells = [self.cells[(row, c)] for c in (self.columns if columns is None else columns)]
        paper = self.paper_row_info.get(row, {})
        out = {}
        for key, label, fmt in (("trainable", "# trainable", lambda v: f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v:,.0f}"),
                                ("total_pct", "# total", lambda v: f"{v:.1f}%"),
                                ("flops", "FLOPs", lambda v: f"{v:.2f}x")):
            values = [v for c in cells for v in getattr(c, key)]
            ours = fmt(statistics.median(values)) if values else "—"
            theirs = paper.get({"total_pct": "total"}.get(key, key))
            out[label] = ours + (f" ({theirs})" if theirs else "")
        return out

    def markdown(self) -> str:
        info_keys = ["# trainable", "# total", "FLOPs"]
        head = " | ".join([*self.row_keys, *info_keys, *(f"{self.column_key}={c}" for c in self.columns)])
        out = [f"# {self.table}: ours median (std) over seeds [paper, Δ]; counts: ours (paper)", "",
               "| " + head + " |", "|" + "---|" * (len(self.row_keys) + len(info_keys) + len(self.columns))]
        for row in self.rows:
            info = self.row_info(row)
            cells = [self.cells[(row, c)].text() for c in self.columns]
            out.append("| " + " | ".join([*row, *(info[k] for k in info_keys), *cells]) + " |")
        if self.protocol:
            out[1:1] = ["", self.protocol_line()]
        trivial = self.trivial_row(lambda c: _digits(self, c))
        if trivial:
            label = [TRIVIAL_LABEL, *[""] * (len(self.row_keys) - 1), "", "", ""]
            out.append("| " + " | ".join([*label, *trivial]) + " |")
            out += ["", f"{TRIVIAL_LABEL}: {TRIVIAL_MEANING}."]
        if self.serving:
            out += ["", f"serving: {self.serving}"]
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([*self.row_keys, self.column_key, "median", "std", "n", "failed", "missing", "paper", "delta",
                    "train_seconds", "train_peak_memory_bytes", "inference_speedup_b32", "inference_memory_ratio",
                    "prune_seconds", "prune_peak_memory_bytes"])
        for row in self.rows:
            for c in self.columns:
                cell = self.cells[(row, c)]
                delta = None if cell.median is None or cell.paper is None else cell.median - cell.paper
                costs = [statistics.median(v) if v else None for v in (
                    cell.train_seconds, cell.train_memory, cell.speedup, cell.memory_ratio, cell.prune_seconds,
                    cell.prune_memory)]
                w.writerow([*row, c, cell.median, cell.std, len(cell.values), cell.failed, cell.missing,
                            cell.paper, delta, *costs])
        for c, value in self.trivial.items():
            w.writerow([TRIVIAL_LABEL, *[""] * (len(self.row_keys) - 1), c, value, *[""] * 12])
        return buf.getvalue()


TRIVIAL_LABEL = "trivial"
TRIVIAL_MEANING = "the score of always predicting the training set's majority class (STS-B: its mean label)"


def _number(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _digits(report: Report, column: str) -> int:
    paper = [c.paper for (_, col), c in report.cells.items() if col == column and c.paper is not None]
    values = [v for (_, col), c in report.cells.items() if col == column for v in c.values]
    return 3 if any(abs(v) < 1 for v in (paper or values)) and all(abs(v) <= 1 for v in (paper or values)) else 2


def wide_table(report: Report):
    """Rows × columns as the paper prints them; each cell ours ± spread (paper)."""
    from rich.table import Table

    table = Table(title=f"{report.table}: median ± std over seeds (paper)", title_justify="left")
    for key in report.row_keys:
        table.add_column(short_name(key), no_wrap=True)
    for label in ("# trainable", "# total", "FLOPs"):
        table.add_column(label, justify="right", no_wrap=True)
    for column in report.columns:
        table.add_column(column if report.column_key == "task" else f"{short_name(report.column_key)}={column}",
                         justify="right", no_wrap=True)
    for row in report.rows:
        info = report.row_info(row)
        cells = []
        for column in report.columns:
            cell, digits = report.cells[(row, column)], _digits(report, column)
            text = "—" if cell.median is None else f"{cell.median:.{digits}f}±{cell.std:.{digits}f}"
            if cell.paper is not None:
                text += f" ({cell.paper:.{digits}f})"
            if cell.failed:
                text += f" [{cell.failed} failed]"
            if cell.missing:
                text += f" [{cell.missing} missing]"
            cells.append(text)
        table.add_row(*row, *(info[k] for k in ("# trainable", "# total", "FLOPs")), *cells)
    trivial = report.trivial_row(lambda c: _digits(report, c))
    if trivial:
        table.add_section()
        table.add_row(TRIVIAL_LABEL, *[""] * (len(report.row_keys) - 1 + 3), *trivial, style="dim")
    return table


def long_table(report: Report):
    """One row per row × column, grouped by column (task): ours, spread, seeds, paper, Δ."""
    from rich.table import Table

    table = Table(title=f"{report.table}: median over seeds, best dev evaluation", title_justify="left")
    group = "task" if report.column_key == "task" else short_name(report.column_key)
    table.add_column(group, no_wrap=True)
    for key in report.row_keys:
        table.add_column(short_name(key), no_wrap=True)
    for label in ("ours", "spread", "seeds", "paper", "Δ", "last"):
        table.add_column(label, justify="right", no_wrap=True)
    problems = any(c.failed or c.missing for c in report.cells.values())
    if problems:
        table.add_column("not run", no_wrap=True)
    for i, column in enumerate(report.columns):
        if i:
            table.add_section()
        digits = _digits(report, column)
        for j, row in enumerate(report.rows):
            cell = report.cells[(row, column)]
            delta = None if cell.median is None or cell.paper is None else cell.median - cell.paper
            last = statistics.median(cell.last) if cell.last else None
            values = [_number(cell.median, digits), _number(cell.std, digits), str(len(cell.values)),
                      _number(cell.paper, digits), _number(delta, digits, signed=True), _number(last, digits)]
            extra = [", ".join(x for x in (f"{cell.failed} failed" if cell.failed else "",
                                           f"{cell.missing} missing" if cell.missing else "") if x)] if problems else []
            table.add_row(column if j == 0 else "", *row, *values, *extra)
        if column in report.trivial:
            keys, rest = [""] * (len(report.row_keys) - 1), [""] * (5 + (1 if problems else 0))
            table.add_row("", TRIVIAL_LABEL, *keys, _number(report.trivial[column], digits), *rest, style="dim")
    return table


def info_table(report: Report):
    """Per row: trainable parameters, % of block weights left and FLOPs, ours (the paper's)."""
    from rich.table import Table

    table = Table(title="counts: ours (paper)", title_justify="left")
    # columns that are tasks share a row's counts; any other swept key (a method) has counts of its own
    per_column = report.column_key != "task"
    for key in ([report.column_key] if per_column else []) + list(report.row_keys):
        table.add_column(short_name(key), no_wrap=True)
    for label in ("# trainable", "# total", "FLOPs"):
        table.add_column(label, justify="right", no_wrap=True)
    for column in report.columns if per_column else [None]:
        for row in report.rows:
            info = report.row_info(row, None if column is None else [column])
            table.add_row(*([column] if per_column else []), *row, *(info[k] for k in ("# trainable", "# total",
                                                                                        "FLOPs")))
    return table


@dataclass
class ClaimCheck:
    """One of the paper's qualitative claims, checked on one column (task) of our runs."""

    claim: str
    column: str
    ours: float | None  # mean of the paired per-seed differences better − worse (best evaluations)
    spread: float | None  # half-width of its 90 % t-interval
    paper: float | None  # the same difference in the paper's numbers
    seeds: int  # seeds both rows ran (the pairs)
    margin: float
    verdict: str  # the best evaluations' and the last evaluations' verdicts, "unresolved" where they differ
    best: str = ""  # the verdict on the best evaluations
    last: str = ""  # the verdict on the last evaluations
    evaluations: str = ""  # how many evaluations each side's best was chosen among (better / worse)


def paired_interval(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, int] | None:
    """Mean and 90 % t half-width of the per-seed differences a − b over the seeds both ran."""
    from scipy.stats import t

    diffs = [a[s] - b[s] for s in a if s in b]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), 1
    return mean, float(t.ppf(0.95, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs)


def _verdict(interval: tuple[float, float, int] | None, margin: float) -> str:
    if interval is None:
        return "no runs"
    mean, half, n = interval
    if n < 2:
        return "unresolved: < 2 seeds"
    if mean + margin - half > 0:
        return "holds"
    if mean + margin + half < 0:
        return "fails"
    return "unresolved: in interval"


def _matching_rows(report: Report, match: dict) -> list[tuple[str, ...]]:
    """The rows whose keys equal the match's values (a list: any of them)."""
    match = {k: [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in match.items()}
    return [row for row in report.rows if all(dict(zip(report.row_keys, row)).get(k) in v for k, v in match.items())]


def _best_row(report: Report, rows: list[tuple[str, ...]], column: str, lower: bool) -> tuple[str, ...] | None:
    """Of several rows, the one whose median in ``column`` is best (a claim's ``pick: best`` side)."""
    scored = [(report.cells[(row, column)].median, row) for row in rows if report.cells[(row, column)].median
              is not None]
    if not scored:
        return None
    return (min if lower else max)(scored, key=lambda item: item[0])[1]


def check_claims(report: Report, claims: list[dict]) -> list[ClaimCheck]:
    """Each claim says ``better`` ≥ ``worse`` − ``margin`` (``lower: true``: ``better`` ≤ ``worse`` +
    ``margin``, for perplexity; ``columns``: only those; ``pick: best``: the better side is the best,
    per column, of the rows it matches, and the verdict names it — chosen on the same runs it is
    tested on, so a holding verdict is optimistic by that selection). Runs of one sweep share their seeds, so
    the test is paired: the per-seed differences' mean and 90 % t-interval, on the best evaluation
    (the paper's protocol) and on the last one. A verdict holds when the interval clears −margin,
    fails when it lies below it, and is unresolved otherwise, with fewer than 2 paired seeds, or
    when the best and the last evaluations disagree (best-of-N favours rows evaluated more often)."""
    out = []
    for claim in claims:
        sides = _matching_rows(report, claim["better"]), _matching_rows(report, claim["worse"])
        margin = float(claim.get("margin", 0.0))
        pick = claim.get("pick") == "best"  # the better side: the best of the rows it matches, per column
        if not sides[0] or len(sides[1]) != 1 or (len(sides[0]) > 1 and not pick):
            why = "not in this sweep" if any(not rows for rows in sides) else "several rows match"
            out.append(ClaimCheck(claim["text"], "—", None, None, None, 0, margin, why))
            continue
        (worse,) = sides[1]
        for column in [c for c in claim.get("columns") or report.columns if c in report.columns]:  # swept ones
            better = _best_row(report, sides[0], column, bool(claim.get("lower"))) if pick else sides[0][0]
            if better is None:
                out.append(ClaimCheck(claim["text"], column, None, None, None, 0, margin, "no runs"))
                continue
            text = f"{claim['text']} (best: {'/'.join(better)})" if pick else claim["text"]
            a, b = report.cells[(better, column)], report.cells[(worse, column)]
            if claim.get("lower"):  # lower is better (perplexity): the difference is worse − better
                a, b = b, a
            paper = a.paper - b.paper if a.paper is not None and b.paper is not None else None
            best = paired_interval(a.by_seed, b.by_seed)
            if best is None:
                out.append(ClaimCheck(text, column, None, None, paper, 0, margin, "no runs"))
                continue
            on_best = _verdict(best, margin)
            on_last = _verdict(paired_interval(a.last_by_seed, b.last_by_seed), margin)
            verdict = on_best if on_best == on_last or on_last == "no runs" else \
                f"unresolved: best {on_best}, last {on_last}"
            counts = "/".join(f"{statistics.median(c.evaluations):g}" if c.evaluations else "?" for c in (a, b))
            out.append(ClaimCheck(text, column, best[0], best[1], paper, best[2], margin, verdict,
                                  on_best, on_last, counts))
    return out


def _ours(c: ClaimCheck) -> str:
    if c.ours is None:
        return "—"
    return f"{c.ours:+.2f}" if math.isnan(c.spread) else f"{c.ours:+.2f} ± {c.spread:.2f}"


def claims_table(checks: list[ClaimCheck], column_label: str = "task"):
    from rich.table import Table

    table = Table(title="claims: ours (better − worse, paired over seeds, 90 % t) against the paper's",
                  title_justify="left")
    table.add_column("claim", max_width=20, overflow="fold")  # with the verdict folded: fits 100 columns
    table.add_column(column_label, max_width=12, overflow="fold")
    for label in ("paper", "ours", "seeds", "evals"):
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("verdict: best / last", max_width=20, overflow="fold")
    for c in checks:
        verdict = f"{c.best} / {c.last}" if c.best and c.last and c.best != c.last else c.verdict
        table.add_row(c.claim, c.column, _number(c.paper, 2, signed=True), _ours(c), str(c.seeds), c.evaluations,
                      verdict)
    return table


def claims_markdown(checks: list[ClaimCheck]) -> str:
    lines = ["", "## Claims", "", "Paired per-seed differences (better − worse), mean ± 90 % t half-width, on the "
             "best evaluation; the verdict is unresolved where the best and the last evaluations disagree.", "",
             "| claim | task | paper | ours (best) | seeds | evaluations | best | last | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.claim} | {c.column} | {_number(c.paper, 2, signed=True)} | {_ours(c)} | {c.seeds} | "
                     f"{c.evaluations} | {c.best} | {c.last} | {c.verdict} |")
    return "\n".join(lines) + "\n"


FULL_FINE_TUNING = {"recipe": "finetune", "adapter": "full"}  # the row training costs are relative to


def cost_table(report: Report):
    """APT's layout: training time and peak memory relative to full fine-tuning (when the table has
    that row), inference speed-up and memory relative to the dense model; medians over runs."""
    from rich.table import Table

    def median_of(row, attribute):
        values = [v for c in report.columns for v in getattr(report.cells[(row, c)], attribute)]
        return statistics.median(values) if values else None

    if not any(median_of(row, "speedup") or median_of(row, "train_seconds")
               or (report.pruning_cost and median_of(row, "prune_memory")) for row in report.rows):
        return None
    reference = next((row for row in report.rows if any(dict(zip(report.row_keys, row)).get(k) == v
                                                        for k, v in FULL_FINE_TUNING.items())), None)
    table = Table(title="cost and savings (medians)", title_justify="left")
    for key in report.row_keys:
        table.add_column(short_name(key), no_wrap=True)
    versus = " ×FT" if reference else ""
    pruned = report.pruning_cost and any(median_of(row, "prune_memory") for row in report.rows)
    labels = [f"train time{versus}", f"train mem{versus}", "inf. speed-up", "inf. mem ×dense"]
    if pruned:  # two more columns: shorter names, so that the table still fits 100 columns
        labels = [f"train{versus}", f"train mem{versus}", "prune", "prune mem", "inf. ×", "inf. mem"]
    for label in labels:
        table.add_column(label, justify="right", no_wrap=True)
    for row in report.rows:
        cells = []
        for attribute in ("train_seconds", "train_memory"):
            ours = median_of(row, attribute)
            base = median_of(reference, attribute) if reference else None
            if ours is None:
                cells.append("—")
            elif base:
                cells.append(f"{ours / base:.2f}x")
            else:  # no full fine-tuning row to compare with: absolute
                cells.append(_seconds_or_mib(ours, attribute == "train_seconds"))
        if pruned:
            for attribute in ("prune_seconds", "prune_memory"):
                ours = median_of(row, attribute)
                cells.append("—" if ours is None else _seconds_or_mib(ours, attribute == "prune_seconds"))
        speed, memory = median_of(row, "speedup"), median_of(row, "memory_ratio")
        cells += ["—" if speed is None else f"{speed:.2f}x", "—" if memory is None else f"{memory:.2f}x"]
        table.add_row(*row, *cells)
    return table


def _seconds_or_mib(value: float, seconds: bool) -> str:
    return f"{value:.1f} s" if seconds else f"{value / 2**20:.0f} MiB"


LAYOUTS = ("auto", "wide", "long")


def terminal_tables(report: Report, width: int, layout: str = "auto") -> tuple[str, list]:
    """(the layout used, the rich tables to print): wide when it fits ``width``, else long."""
    from rich.console import Console

    if layout not in LAYOUTS:
        raise DSEEError(f"Unknown layout {layout!r}. Valid choices: {', '.join(LAYOUTS)}.")
    wide = wide_table(report)
    if layout == "auto":
        layout = "wide" if Console(width=100_000).measure(wide).maximum <= width else "long"
    tables = [wide] if layout == "wide" else [info_table(report), long_table(report)]
    costs = cost_table(report)
    label = "task" if report.column_key == "task" else short_name(report.column_key)
    claims = [claims_table(check_claims(report, report.claims), label)] if report.claims else []
    return layout, tables + ([costs] if costs is not None else []) + claims


def _values(spec: object) -> list[str]:
    return [v.strip() for v in str(spec).split(",")]


def expected_grid(sweep_dir: Path) -> dict[str, list[str]]:
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        raise DSEEError(f"{sweep_dir} is not a sweep directory: it has no multirun.yaml (written by `dsee train -m`).")
    conf = yaml.safe_load(path.read_text())
    grid = {k: _values(v) for k, v in (conf["hydra"]["sweeper"].get("params") or {}).items()}
    for override in conf["hydra"]["overrides"]["task"]:  # the command line wins over the params
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if "," in value or key in grid:
            grid[key] = _values(value)
    return grid


def load_paper_numbers() -> dict:
    return yaml.safe_load(resources.files("dsee_cli.reporting").joinpath("paper_numbers.yaml").read_text())


def _score(metrics: dict, column: str, paper: dict, which: str = "best") -> float | None:
    """The number a cell shows: a generation metric (``task:metric``), else the task's paper metric
    at the phase's best periodic evaluation (the paper's protocol), its ``last`` one, or the
    ``trivial`` predictor's score."""
    final = metrics["final"]
    if ":" in column:
        if which == "trivial":
            return None
        metric = column.split(":", 1)[1]
        generation = final.get("generation") or {}
        return next((v for k, v in generation.items() if k.endswith("/" + metric)), None)
    scores = (metrics.get("trivial") if which == "trivial" else final.get(which)) or {}
    return scores.get(paper_metric(metrics["task"], paper.get("metrics")), scores.get(metrics["main_metric"]))


def _add_run(cell: Cell, metrics: dict, column: str, paper: dict, seed: str, value: float) -> float | None:
    """One finished run's numbers into its cell (its score ``value`` at ``seed``); returns its speed-up."""
    cell.values.append(value)
    cell.by_seed[seed] = value
    if metrics["final"].get("evaluations"):
        cell.evaluations.append(int(metrics["final"]["evaluations"]))
    last = _score(metrics, column, paper, "last")
    if last is not None:
        cell.last.append(float(last))
        cell.last_by_seed[seed] = float(last)
    cell.trainable.append(int(metrics["trainable_params"]["total"]))
    cell.total_pct.append(float(metrics["total_params_pct"]))
    cell.flops.append(float(metrics["flops_ratio_unmerged"]))
    cost, savings = metrics.get("cost") or {}, metrics.get("savings") or {}
    pruning = metrics.get("pruning") or {}
    if "seconds" in pruning:
        cell.prune_seconds.append(float(pruning["seconds"]))
    if pruning.get("peak_memory_bytes"):
        cell.prune_memory.append(float(pruning["peak_memory_bytes"]))
    if cost:
        cell.train_seconds.append(float(cost["train_seconds"]))
        cell.train_memory.append(float(cost["peak_memory_bytes"]))
    speedup = (savings.get("speedup") or {}).get("batch32")
    if speedup:
        cell.speedup.append(float(speedup))
    if savings.get("memory_ratio"):
        cell.memory_ratio.append(float(savings["memory_ratio"]))
    return float(speedup) if speedup else None


def _protocol(metrics: dict, column: str, paper: dict) -> str:
    """'selected by <split/metric>, reported <split/metric>' for one run of a column."""
    if ":" in column:  # a generation metric: the reported split was decoded once with the selected weights
        metric = column.split(":", 1)[1]
        split = (metrics.get("config") or {}).get("task", {}).get("eval_split", "test")
        name = next((k for k in (metrics["final"].get("generation") or {}) if k.endswith("/" + metric)),
                    f"{split}/{metric}")  # zero-shot scores: zero_shot/<metric>
        window = (metrics["final"].get("generation") or {}).get(name.rsplit("/", 1)[0] + "/seq_len")
        setting = f", windows of {window:g} tokens of {metrics.get('data_source', '?')}" if window else ""
        reported = f"{name} (scored once, with the selected weights{setting})"
    else:
        reported = paper_metric(metrics["task"], paper.get("metrics")) + " at that evaluation"
    return f"selected by {metrics['main_metric']}, reported {reported}"


def build_report(sweep_dir: Path, table: str | None = None) -> Report:
    sweep_dir = Path(sweep_dir)
    grid = expected_grid(sweep_dir)
    jobs: list[tuple[dict, dict | None]] = []
    first_config = None
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = dict(o.lstrip("+~").split("=", 1) for o in yaml.safe_load(overrides_file.read_text()))
        metrics_file = job_dir / "metrics.json"
        jobs.append((overrides, json.loads(metrics_file.read_text()) if metrics_file.is_file() else None))
        if first_config is None:
            first_config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
    defaults: dict[str, str] = {}
    if "task" not in grid and len([k for k in grid if k != SEED]) <= 1 and first_config:
        # one swept key (or only seeds) and one task: the key's values are the rows, the task the column
        defaults["task"] = str(first_config["task"]["name"])
        grid = {"task": [defaults["task"]], **grid}
    swept = [k for k in grid if k != SEED]
    column_key = "task" if "task" in grid else swept[-1]
    row_keys = [k for k in swept if k != column_key]
    found = {tuple(o.get(k, defaults.get(k, "")) for k in grid): (o, m) for o, m in jobs}
    table = table or (first_config or {}).get("name") or sweep_dir.name
    paper = load_paper_numbers().get(table, {})
    rows = list(dict.fromkeys(tuple(combo) for combo in itertools.product(*(grid[k] for k in row_keys))))
    # Generation tables print several metrics per task: one column per (task, metric).
    per_task = paper.get("metrics_by_task", {})
    sub = {c: [f"{c}:{m}" for m in per_task[c]] if c in per_task else [c] for c in grid[column_key]}
    columns = [name for c in grid[column_key] for name in sub[c]]
    cells = {(row, col): Cell() for row in rows for col in columns}
    points: list[Point] = []
    report_trivial: dict[str, float] = {}
    report_protocol: dict[str, str] = {}
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        row = tuple(point[k] for k in row_keys)
        job = found.get(tuple(combo))
        for col in sub[point[column_key]]:
            cell = cells[(row, col)]
            if job is None:
                cell.missing += 1
            elif job[1] is None:
                cell.failed += 1
            else:
                value = _score(job[1], col, paper)
                if value is None:
                    cell.unmeasured += 1
                    continue
                metrics = job[1]
                speedup = _add_run(cell, metrics, col, paper, point.get(SEED, "1"), float(value))
                report_protocol.setdefault(col, _protocol(metrics, col, paper))
                trivial = _score(metrics, col, paper, "trivial")
                if trivial is not None:
                    report_trivial.setdefault(col, float(trivial))
                panel = col if column_key == "task" else metrics["task"]
                points.append(Point(point, col, panel, float(value), cell.total_pct[-1], cell.flops[-1], speedup))
    # a column no run measured (zero-shot accuracy where no lm-eval task was run) is not shown at all
    columns = [c for c in columns if any(cells[(r, c)].values or cells[(r, c)].failed or cells[(r, c)].missing
                                         for r in rows)]
    cells = {(r, c): cell for (r, c), cell in cells.items() if c in columns}
    paper_row_info = {}
    note, reference = paper.get("note", ""), _reference_holds(paper.get("reference_config"), next(
        (m["config"] for _, m in jobs if m and m.get("config")), first_config or {}))
    if not reference[0]:
        note += f" The reference column is for {reference[1]}; this sweep differs, so it is not shown."
    for entry in paper.get("rows", []) if reference[0] else []:
        match = {k: str(v) for k, v in entry["match"].items()}
        for row in rows:
            if all(dict(zip(row_keys, row)).get(k, v) == v for k, v in match.items()):
                paper_row_info[row] = {k: str(v) for k, v in entry.get("paper", {}).items()}
                for col, value in entry["values"].items():
                    if (row, str(col)) in cells:
                        cells[(row, str(col))].paper = float(value)
    return Report(table, row_keys, column_key, rows, columns, cells, paper_row_info, grid, points,
                  note, paper.get("claims", []), report_trivial, report_protocol, bool(paper.get("pruning_cost")),
                  serving_note([m for _, m in jobs if m is not None]))


# the pruners whose result is zeros inside dense matrices (unstructured, N:M)
ZERO_PRUNERS = ("unstructured", "nm", "imp", "magnitude", "wanda", "sparsegpt")
SPARSE_SERVING = ("the unstructured and N:M rows export zeros in dense matrices (export/merged; export/compressed "
                  "adds a 1-bit mask): research artefacts that current serving stacks run no faster than the dense "
                  "model, since vLLM, compressed-tensors, transformers and torchao dropped sparse checkpoints in "
                  "2026 (docs/llm.md). pruning=structured exports a smaller dense model any stack serves.")


def serving_note(metrics: list[dict]) -> str:
    """The sparse formats' end, said where a sweep exported zero-holding models."""
    zeros = any(m.get("config", {}).get("pruning", {}).get("method") in ZERO_PRUNERS
                and (m.get("pruning") or {}).get("method") not in (None, "none") for m in metrics)
    return SPARSE_SERVING if zeros else ""


def _reference_holds(required: dict | None, config: dict) -> tuple[bool, str]:
    """Whether the sweep's config has the settings the published figures were measured with
    (``reference_config``: dotted keys, e.g. model.name: llama-2-7b), and those settings in words."""
    if not required:
        return True, ""

    def value(key: str):
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    words = " ".join(f"{k}={v}" for k, v in required.items())
    return all(str(value(k)) == str(v) for k, v in required.items()), words


def write_report(report: Report, sweep_dir: Path) -> list[Path]:
    """report-<table>.md and .csv (the figure is plots.write_figure's)."""
    md, csv_path = sweep_dir / f"report-{report.table}.md", sweep_dir / f"report-{report.table}.csv"
    claims = claims_markdown(check_claims(report, report.claims)) if report.claims else ""
    atomic_write_text(md, report.markdown() + claims)
    atomic_write_text(csv_path, report.csv())
    return [md, csv_path]
