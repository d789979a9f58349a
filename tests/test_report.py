"""Every experiment runs end to end under profile=smoke, and `dsee report` reads it back."""

import itertools
import os
import shutil
import subprocess
import sys

import pytest
from rich.console import Console

from dsee_cli.cli import config_dir
from dsee_cli.reporting.plots import FIGURES, write_figure
from dsee_cli.reporting.report import (
    Cell,
    Report,
    build_report,
    check_claims,
    load_paper_numbers,
    long_table,
    terminal_tables,
)

from .conftest import run_dsee

# dsee-llm's 15 recipes x 3 patterns: its patterns are llm-pruning's, which its smoke sweep runs; one here
NARROWED = {"dsee-llm": ["pattern=50pct"]}
EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml") if p.stem != "demo")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_under_smoke_and_reports(workdir, experiment):
    out = run_dsee(["-m", f"experiment={experiment}", "profile=smoke", "trainer.max_steps=4", "trainer.threads=1",
                    *NARROWED.get(experiment, [])], workdir, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = workdir / "multirun" / experiment
    report = subprocess.run([sys.executable, "-m", "dsee_cli", "report", str(sweep)], capture_output=True,
                            text=True, check=False)
    assert report.returncode == 0, report.stderr
    built = build_report(sweep)
    assert all(c.values and not c.failed and not c.missing for c in built.cells.values())
    assert (sweep / f"report-{experiment}.md").is_file() and (sweep / f"report-{experiment}.csv").is_file()
    png = sweep / f"report-{experiment}.png"
    if experiment in FIGURES:  # a figure: at least one drawn series for every swept method
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        figure, why = write_figure(built, png)
        assert figure is not None, why
        swept = [k for k in built.grid if k not in ("seed", "task", "sparsity", "pruning.rounds",
                                                     "adapter.omega_size", "pruning.heads_to_remove")]
        expected = {"/".join(combo) for combo in itertools.product(*(built.grid[k] for k in swept))} - {""} or {"DSEE"}
        assert figure.series_labels() == expected
        assert all(len(series) >= 1 for series in figure.panels.values())
    else:
        assert not png.exists()
    assert all(c.verdict not in ("not in this sweep", "several rows match")  # each claim names one row per side
               for c in check_claims(built, built.claims))
    # the long layout fits a 100-column terminal, and auto picks it when the wide one does not
    assert Console(width=100_000).measure(long_table(built)).maximum <= 100
    layout, tables = terminal_tables(built, 100)
    assert all(Console(width=100_000).measure(t).maximum <= 100 for t in tables), layout


@pytest.mark.slow
def test_report_layout_with_paper_numbers_and_missing_or_failed_runs(workdir):
    out = run_dsee(["-m", "experiment=table12", "profile=smoke", "task=stsb,mrpc", "adapter.omega_size=8,16",
                    "trainer.max_steps=2"], workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = workdir / "multirun" / "table12"
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 4
    failed = next(j for j in jobs if "adapter.omega_size=8," in j.name and "task=stsb" in j.name)
    (failed / "metrics.json").unlink()  # started, never finished
    missing = next(j for j in jobs if "adapter.omega_size=16," in j.name and "task=mrpc" in j.name)
    shutil.rmtree(missing)  # never ran
    report = build_report(sweep)
    assert report.column_key == "task" and report.row_keys == ["adapter.omega_size"]
    assert report.columns == ["stsb", "mrpc"] and report.rows == [("8",), ("16",)]
    assert report.cells[(("8",), "stsb")].failed == 1 and not report.cells[(("8",), "stsb")].values
    assert report.cells[(("16",), "mrpc")].missing == 1
    assert report.cells[(("16",), "stsb")].paper == 89.28 and report.cells[(("8",), "mrpc")].paper == 85.38
    md = report.markdown()
    assert "| adapter.omega_size | # trainable | # total | FLOPs | task=stsb | task=mrpc |" in md
    assert "1 failed" in md and "1 missing" in md and "paper 89.28" in md
    lines = report.csv().splitlines()
    assert lines[0].startswith("adapter.omega_size,task,median,std,n,failed,missing,paper,delta")
    # a row per cell, then each task's trivial baseline (the synthetic stand-ins record one too)
    assert len(lines) == 1 + 4 + 2 and [line.split(",")[:2] for line in lines[-2:]] == [["trivial", "stsb"],
                                                                                      ["trivial", "mrpc"]]


@pytest.mark.slow
def test_report_on_a_non_sweep_directory_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsee_cli", "report", str(tmp_path)], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 2 and "not a sweep directory" in out.stderr


def test_command_line_values_replace_the_sweeps_params(tmp_path):
    from dsee_cli.reporting.report import expected_grid

    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      task: sst2,mrpc\n      seed: 1,2\n"
        "  overrides:\n    task:\n    - experiment=table1\n    - seed=1\n    - adapter.rank=16,8\n")
    assert expected_grid(tmp_path) == {"task": ["sst2", "mrpc"], "seed": ["1"], "adapter.rank": ["16", "8"]}


def test_ninety_percent_confidence_band():
    from dsee_cli.reporting.plots import confidence_band

    mean, half = confidence_band([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(half - 2.919986 / 3**0.5) < 1e-5  # t(0.95, 2) · s / √n with s = 1
    assert confidence_band([5.0]) == (5.0, 0.0)


@pytest.mark.slow
def test_a_figure_with_nothing_to_draw_is_not_written_and_the_report_says_why(workdir):
    out = run_dsee(["-m", "experiment=fig2", "profile=smoke", "adapter.omega_size=16", "omega=grebsmo,random",
                    "trainer.max_steps=2", "trainer.threads=1"], workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    sweep = workdir / "multirun" / "fig2"
    report = subprocess.run([sys.executable, "-m", "dsee_cli", "report", str(sweep), "--layout", "wide"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert report.returncode == 0, report.stderr
    text = " ".join(report.stdout.split())
    assert "no figure: card(Ω) is not swept" in text and not (sweep / "report-fig2.png").exists()
    assert "median ± std over seeds" in text  # the wide layout, as asked
    assert max(len(line) for line in report.stdout.splitlines() if str(sweep) not in line) <= 100


def test_claims_are_paired_over_seeds_on_the_best_and_the_last_evaluation():
    """Per-seed differences, mean and 90 % t-interval: a constant gap holds, a reversed one fails,
    a gap inside its interval and one seed stay unresolved, and a best-of-evaluations gap that the
    last evaluation reverses is unresolved, naming both verdicts."""
    values = {"dsee": [70.0, 71.0, 72.0], "lora": [65.0, 66.0, 67.0], "bad": [60.0, 61.0, 59.0],
              "close": [70.5, 71.5, 69.5], "one": [90.0], "lucky": [75.0, 76.0, 77.0]}
    last = {**values, "lucky": [60.0, 61.0, 62.0]}  # its best evaluations were high, its last ones low

    def cell(name):
        return Cell(values=values[name], by_seed={str(i): v for i, v in enumerate(values[name], 1)},
                    last_by_seed={str(i): v for i, v in enumerate(last[name], 1)}, evaluations=[5])
    cells = {((k,), "rte"): cell(k) for k in values}
    cells[(("dsee",), "rte")].paper, cells[(("lora",), "rte")].paper = 70.04, 68.95
    report = Report("t", ["method"], "task", [(k,) for k in values], ["rte"], cells)
    checks = check_claims(report, [
        {"text": "a clear gap", "better": {"method": "dsee"}, "worse": {"method": "lora"}},
        {"text": "the other way", "better": {"method": "bad"}, "worse": {"method": "lora"}},
        {"text": "within noise", "better": {"method": "close"}, "worse": {"method": "dsee"}},
        {"text": "within a margin", "better": {"method": "lora"}, "worse": {"method": "dsee"}, "margin": 8.0},
        {"text": "one seed", "better": {"method": "one"}, "worse": {"method": "dsee"}},
        {"text": "best of many", "better": {"method": "lucky"}, "worse": {"method": "dsee"}},
    ])
    assert [c.verdict for c in checks] == ["holds", "fails", "unresolved: in interval", "holds",
                                           "unresolved: < 2 seeds", "unresolved: best holds, last fails"]
    assert checks[0].ours == 5.0 and checks[0].spread == 0.0 and checks[0].paper == pytest.approx(1.09)
    assert checks[0].seeds == 3 and checks[0].evaluations == "5/5"
    # close − dsee = 0.5, 0.5, −2.5: mean −0.5, 90 % half-width t(0.95, 2)·1.732/√3 = 2.92
    assert checks[2].ours == pytest.approx(-0.5) and checks[2].spread == pytest.approx(2.92, abs=0.01)
    missing = check_claims(report, [{"text": "x", "better": {"method": "nope"}, "worse": {"method": "dsee"}}])
    assert [c.verdict for c in missing] == ["not in this sweep"]  # a sweep of part of the table still reports


def test_perplexity_claims_are_lower_is_better_and_the_reference_needs_its_config():
    from dsee_cli.reporting.report import _reference_holds, load_paper_numbers

    ppl = {"wanda": [6.4, 6.5, 6.3], "magnitude": [14.9, 15.1, 14.7]}
    cells = {((k,), "50pct:ppl"): Cell(values=v, by_seed={str(i): x for i, x in enumerate(v, 1)},
                                                 last_by_seed={str(i): x for i, x in enumerate(v, 1)})
             for k, v in ppl.items()}
    report = Report("llm-pruning", ["recipe"], "pattern", [(k,) for k in ppl], ["50pct:ppl"], cells)
    checks = check_claims(report, [
        {"text": "Wanda ≪ magnitude", "better": {"recipe": "wanda"}, "worse": {"recipe": "magnitude"}, "lower": True},
        {"text": "the other way", "better": {"recipe": "magnitude"}, "worse": {"recipe": "wanda"}, "lower": True},
    ])
    assert [c.verdict for c in checks] == ["holds", "fails"] and checks[0].ours == pytest.approx(8.5)
    paper = load_paper_numbers()["llm-pruning"]
    wanda = {r["match"]["recipe"]: r["values"] for r in paper["rows"]}
    assert wanda["llm-wanda"] == {"50pct:ppl": 6.42, "2of4:ppl": 11.02}  # Wanda's README, Llama-2-7B
    assert wanda["llm-sparsegpt"]["2of4:ppl"] == 10.17 and wanda["llm-magnitude"]["50pct:ppl"] == 14.89
    required = paper["reference_config"]
    seven_b = {"model": {"name": "llama-2-7b"}, "task": {"seq_len": 4096}, "pruning": {"calibration": {"source": "c4"}}}
    assert _reference_holds(required, seven_b)[0]
    assert not _reference_holds(required, {**seven_b, "task": {"seq_len": 2048}})[0]


def test_a_best_of_claim_picks_the_best_row_per_column_and_names_it():
    """experiment=dsee-llm's claims: the best DSEE row of each pattern against Wanda, paired by seed."""
    ppl = {"dsee-paper": ([400.0, 420.0, 410.0], [600.0, 650.0, 640.0]),
           "dsee-llm": ([18.0, 18.5, 18.2], [30.0, 31.0, 30.5]),
           "dsee-llm-row": ([19.0, 19.5, 19.1], [29.0, 29.5, 29.2]),
           "llm-wanda": ([19.0, 19.2, 18.9], [38.0, 37.5, 38.2])}
    cells = {((k,), col): Cell(values=v, by_seed={str(i): x for i, x in enumerate(v, 1)},
                               last_by_seed={str(i): x for i, x in enumerate(v, 1)})
             for k, cols in ppl.items() for col, v in zip(("50pct:ppl", "2of4:ppl"), cols)}
    report = Report("dsee-llm", ["recipe"], "pattern", [(k,) for k in ppl], ["50pct:ppl", "2of4:ppl"], cells)
    rows = ["dsee-paper", "dsee-llm", "dsee-llm-row"]
    checks = check_claims(report, [{"text": "best DSEE ≤ Wanda", "pick": "best", "better": {"recipe": rows},
                                    "worse": {"recipe": "llm-wanda"}, "lower": True}])
    assert [c.claim for c in checks] == ["best DSEE ≤ Wanda (best: dsee-llm)", "best DSEE ≤ Wanda (best: dsee-llm-row)"]
    assert [c.verdict for c in checks] == ["holds", "holds"]
    assert checks[0].ours == pytest.approx((19.0 + 19.2 + 18.9 - 18.0 - 18.5 - 18.2) / 3)
    plain = check_claims(report, [{"text": "t", "better": {"recipe": rows}, "worse": {"recipe": "llm-wanda"}}])
    assert [c.verdict for c in plain] == ["several rows match"]  # without pick: best, one row per side
    paper = load_paper_numbers()["dsee-llm"]
    assert all(c.get("lower") for c in paper["claims"]) and paper["claims"][0]["pick"] == "best"


def _hand_made_run(sweep, overrides: dict, best: float, task: str = "sst2") -> None:
    """A finished job as `dsee train -m` leaves it, with made-up numbers."""
    import json

    import yaml

    job = sweep / ",".join(f"{k}={v}" for k, v in overrides.items())
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"name": "table7", "task": {"name": task}}))
    metric = "validation/accuracy"
    (job / "metrics.json").write_text(json.dumps({
        "task": task, "main_metric": metric, "trivial": {metric: 50.92},
        "final": {"best": {metric: best}, "last": {metric: best - 1}, "evaluations": 4},
        "trainable_params": {"total": 1000}, "total_params_pct": 70.0, "flops_ratio_unmerged": 1.0}))


def test_claims_and_the_trivial_baseline_from_hand_made_run_directories(tmp_path):
    """Table 7's claims on three seeds of made-up runs: |ΔW| clearly above random (holds), |W + ΔW|
    within 3 points of |ΔW| (holds), random above |W + ΔW| (fails), structured |ΔW| vs |W + ΔW|
    within the paired interval (unresolved); the report shows what a score must beat."""
    import yaml

    sweep = tmp_path / "table7"
    scores = {("unstructured", "delta"): [90.0, 91.0, 92.0], ("unstructured", "delta_plus_weight"): [90.5, 90.0, 91.5],
              ("unstructured", "random"): [80.0, 81.0, 79.0], ("structured", "delta"): [85.0, 88.0, 86.0],
              ("structured", "delta_plus_weight"): [87.0, 84.0, 86.5], ("structured", "random"): [75.0, 74.0, 76.0]}
    for (pruning, criterion), values in scores.items():
        for seed, value in enumerate(values, 1):
            _hand_made_run(sweep, {"task": "sst2", "pruning": pruning, "pruning.criterion": criterion,
                                   "seed": seed}, value)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"params": {"task": "sst2", "pruning": "unstructured,structured",
                               "pruning.criterion": "delta,delta_plus_weight,random", "seed": "1,2,3"}},
        "overrides": {"task": []}}}))
    report = build_report(sweep)
    assert report.trivial == {"sst2": 50.92}
    verdicts = {c.claim: c.verdict for c in check_claims(report, [
        {"text": "delta beats random", "better": {"pruning": "unstructured", "pruning.criterion": "delta"},
         "worse": {"pruning": "unstructured", "pruning.criterion": "random"}},
        {"text": "close", "better": {"pruning": "unstructured", "pruning.criterion": "delta_plus_weight"},
         "worse": {"pruning": "unstructured", "pruning.criterion": "delta"}, "margin": 3.0},
        {"text": "random beats |W + ΔW|", "better": {"pruning": "unstructured", "pruning.criterion": "random"},
         "worse": {"pruning": "unstructured", "pruning.criterion": "delta_plus_weight"}},
        {"text": "structured", "better": {"pruning": "structured", "pruning.criterion": "delta"},
         "worse": {"pruning": "structured", "pruning.criterion": "delta_plus_weight"}},
    ])}
    assert verdicts == {"delta beats random": "holds", "close": "holds", "random beats |W + ΔW|": "fails",
                        "structured": "unresolved: in interval"}
    console = Console(width=100, record=True)
    for table in terminal_tables(report, 100)[1]:
        console.print(table)
    text = console.export_text()
    assert "trivial" in text and "50.92" in text and "claims" in text.lower()
    assert "protocol: selected by validation/accuracy, reported validation/accuracy at that evaluation" in \
        report.markdown()
    assert "| trivial |" in report.markdown() and "trivial,,sst2,50.92," in report.csv().replace("\r", "")
