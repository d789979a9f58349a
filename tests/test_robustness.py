"""What long unattended sweeps need: a failing job does not stop the others, reruns never return
another configuration's numbers, writes survive a kill, logs are readable in a file, bad data is
never dropped silently, and the make targets really run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsee_cli.data.classification import DataSource, load_task
from dsee_cli.errors import DSEEError
from dsee_cli.reporting.report import build_report
from dsee_cli.run.checkpoint import clean_state_dir, load_state_dir, save_state_dir
from dsee_cli.run.pipeline import clean_leftovers, write_failure

from .conftest import FAST, run_dsee
from .helpers import run_in_process

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_a_sweep_survives_a_failing_job_and_its_rerun_retries_only_that_one(workdir, launcher):
    extra = {"basic": [], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
             "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]}[launcher]
    # 4 heads per layer: removing 9 fails inside the job before its weights load (preflight, on a meta-device
    # model), 1 works
    args = ["-m", *FAST, *extra, "name=sweep", "pruning=structured", "pruning.heads_to_remove=9,1",
            "trainer.max_steps=2"]
    out = run_dsee(args, workdir, timeout=600)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = workdir / "multirun" / "sweep"
    failed, done = (_job(sweep, f"pruning.heads_to_remove={k}") for k in (9, 1))
    record = json.loads((failed / "failed.json").read_text())
    assert record["type"] == "DSEEError" and "between 0 and 3" in record["error"] and record["traceback"] is None
    assert record["stage"] == "preflight"
    assert (done / "metrics.json").is_file() and not (done / "failed.json").exists()
    assert "1 failed job(s)" in " ".join(out.stdout.split())

    report = build_report(sweep)
    assert sorted(c.failed for c in report.cells.values()) == [0, 1]

    again = run_dsee(args, workdir, timeout=600)
    assert again.returncode == 1
    # the finished job is skipped, the failed one retried (each job's log: worker processes print elsewhere)
    assert "already complete" in (done / "dsee.log").read_text()
    assert "already complete" not in (failed / "dsee.log").read_text()
    assert json.loads((failed / "failed.json").read_text())["sweep_run"] != record["sweep_run"]


def _job(sweep: Path, override: str) -> Path:
    return next(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml") if override in p.read_text())


def test_a_failure_that_is_not_a_user_error_keeps_its_traceback(tmp_path):
    try:
        raise ValueError("a bug")
    except ValueError as exc:
        path = write_failure(tmp_path, exc, "Phase I: sparse + low-rank tuning")
    record = json.loads(path.read_text())
    assert record["type"] == "ValueError" and "raise ValueError" in record["traceback"]


def test_a_rerun_with_another_config_starts_over_and_the_same_config_is_reused(tmp_path):
    run = tmp_path / "run"
    first = run_in_process(run, "sparsity=0.3")
    said: list[str] = []
    reused = run_in_process(run, "sparsity=0.3", messages=said)
    assert reused["fingerprint"] == first["fingerprint"] and reused["final"]["eval"] == first["final"]["eval"]
    assert any("already complete" in s for s in said)
    said.clear()
    changed = run_in_process(run, "sparsity=0.5", messages=said)
    assert any("different configuration" in s for s in said)
    assert changed["total_params_pct"] == pytest.approx(50.0, abs=0.01)
    assert first["total_params_pct"] == pytest.approx(70.0, abs=0.01)
    assert changed["fingerprint"] != first["fingerprint"]


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path):
    from dsee_cli.run.checkpoint import Checkpoint

    run = tmp_path / "run"
    first = run_in_process(run, "sparsity=0.3")
    (run / "metrics.json").unlink()  # as if it had been killed after its last checkpoint
    said: list[str] = []
    second = run_in_process(run, "sparsity=0.5", messages=said)
    assert any("checkpoint here is from a different configuration" in s for s in said)
    assert not any("Resuming" in s for s in said)
    assert second["total_params_pct"] == pytest.approx(50.0, abs=0.01)
    assert Checkpoint(run, first["fingerprint"]).load() is None  # it was replaced by this run's


def test_a_checkpoint_of_another_format_is_not_resumed(tmp_path):
    from dsee_cli.run.checkpoint import STATE_META, Checkpoint

    run = tmp_path / "run"
    first = run_in_process(run)
    meta_path = run / "checkpoint" / STATE_META
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == 2 and meta["done"] == 4 and meta["in_progress"] is None  # Ω, phase I, prune, recovery
    meta_path.write_text(json.dumps({**meta, "format": 1}))
    said: list[str] = []
    assert Checkpoint(run, first["fingerprint"]).load(said.append) is None
    assert "another dsee-cli version (format 1" in said[0] and not meta_path.exists()


def test_the_checkpoint_commit_leaves_the_old_or_the_new_state(tmp_path):
    target = tmp_path / "checkpoint"
    save_state_dir(target, {"x": torch.zeros(3)}, {"stage": "old"})
    # a kill after the new tensors were written, before meta.json was switched
    (target / "state-99.safetensors").write_bytes(b"half")
    (target / ".meta.json.abc.tmp").write_text("{")
    tensors, meta = load_state_dir(target)
    assert meta["stage"] == "old" and torch.equal(tensors["x"], torch.zeros(3))
    clean_state_dir(target)
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", meta["state_file"]]
    save_state_dir(target, {"x": torch.ones(3)}, {"stage": "new"})
    tensors, meta = load_state_dir(target)
    assert meta["stage"] == "new" and torch.equal(tensors["x"], torch.ones(3))
    assert len(list(target.iterdir())) == 2


def test_leftovers_of_a_killed_run_are_cleaned_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    for leftover in (run / ".checkpoint.tmp-123", run / "export" / ".merged.tmp-4", run / "export" / ".merged.old-4"):
        leftover.mkdir(parents=True)
        (leftover / "model.safetensors").write_bytes(b"partial")
    (run / ".metrics.json.x1.tmp").write_text("{")
    clean_leftovers(run)
    assert sorted(p.name for p in run.rglob("*")) == ["export"]


def test_every_rng_is_saved_and_restored(monkeypatch):
    from dsee_cli.run import train

    cpu = train.rng_tensors()
    a = torch.rand(3)
    train.restore_rng(cpu)
    assert torch.equal(torch.rand(3), a)

    # The CUDA branch on a machine without one: the job's own GPU's state is saved and put back into it
    # (cuda:3, say, where the job leased GPU 3), never the other GPUs' (that would start a context on each).
    state = torch.tensor([7], dtype=torch.uint8)
    restored = {}
    gpu3 = torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: state if device == gpu3 else None)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(str(device), s))
    saved = train.rng_tensors(torch.device("cuda", 3))
    assert set(saved) == {"rng::torch", "rng::cuda"}
    assert train.restore_rng(saved, torch.device("cuda", 3))
    assert restored == {"cuda:3": state}
    # rank 1's generators live under rng::r1::; a checkpoint written by one rank has none for it
    assert not train.restore_rng(saved, torch.device("cpu"), rank=1)
    assert train.restore_rng({"rng::r1::torch": cpu["rng::torch"]}, torch.device("cpu"), rank=1)
    assert torch.equal(torch.rand(3), a)


@pytest.mark.slow
def test_unattended_runs_print_timed_progress_lines_to_stdout_and_the_log(workdir):
    out = run_dsee([*FAST, "hydra.run.dir=run", "trainer.log_every_seconds=0", "export=false"], workdir)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "steps/s" in line]
    assert any("phase1" in line and "step 1/10" in line and "ETA" in line and "loss" in line for line in lines)
    assert any("recovery" in line and "step 10/10" in line for line in lines)
    log = (workdir / "run" / "dsee.log").read_text()
    assert "phase1  step 10/10  epoch" in log and "lr " in log


def _glue_dir(root: Path, dev_rows: list[str], train_rows: list[str]) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(r + "\n" for r in train_rows))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(r + "\n" for r in dev_rows))
    return root


def test_an_unparsable_dev_row_is_an_error_naming_its_line(tmp_path):
    data = _glue_dir(tmp_path, ["good one\t1", "no label here", "fine\t0"], ["a\t1", "b\t0"])
    with pytest.raises(DSEEError, match=r"dev.tsv, line 3, cannot be parsed: it has 1 tab-separated column"):
        load_task(DataSource(name="sst2", data_dir=str(data)), 0)


def test_unparsable_training_rows_are_counted_in_a_warning(tmp_path, caplog):
    data = _glue_dir(tmp_path, ["good\t1", "fine\t0"], ["a\t1", "broken", "b\tmaybe", "c\t0"])
    with caplog.at_level("WARNING", logger="dsee"):
        task = load_task(DataSource(name="sst2", data_dir=str(data)), 0)
    assert len(task.train) == 2
    assert "skipped 2 line(s)" in caplog.text and "line 3" in caplog.text


def test_the_hub_check_is_bounded_and_asked_once(monkeypatch):
    import socket

    from dsee_cli.core import models

    calls = []

    def hanging_lookup(*args, **kwargs):
        calls.append(args)
        time.sleep(30)  # as a DNS lookup can, offline
        raise OSError("unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    monkeypatch.setattr(models, "_HUB_ANSWER", {})
    started = time.time()
    assert models.hub_reachable(timeout=1.0) is False
    assert models.hub_reachable(timeout=1.0) is False
    assert time.time() - started < 2.5 and len(calls) == 1


@pytest.mark.slow
def test_make_reproduce_runs_the_sweep_and_writes_its_report(workdir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DSEE_CACHE": str(workdir / ".cache")}
    make = ["make", "-f", str(REPO / "Makefile"), f"DSEE={sys.executable} -m dsee_cli"]
    out = subprocess.run([*make, "reproduce-table1", "PROFILE=smoke", "ARGS=trainer.max_steps=2 trainer.threads=1"],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = workdir / "multirun" / "table1" / "report-table1.md"
    assert report.is_file() and "paper" in report.read_text()
    # 4 tasks x (LoRA, DSEE, DoRA, SHiRA, HiRA) x r = 16, 8
    assert len(list((workdir / "multirun" / "table1").glob("*/metrics.json"))) == 40
    bad = subprocess.run([*make, "reproduce-tabel1"], cwd=workdir, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown experiment 'tabel1'" in bad.stderr and "table1" in bad.stderr


@pytest.mark.slow
def test_make_lists_every_experiment():
    experiments = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if p.stem != "demo")
    out = subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), *(f"reproduce-{e}" for e in experiments)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for e in experiments:
        assert f"experiment={e} " in out.stdout and f"report multirun/{e}" in out.stdout
