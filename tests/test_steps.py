"""Phase I and IMP rounds computed once and shared between runs (dsee_cli/steps.py)."""

import json
import os
import subprocess
import sys

import pytest

from dsee_cli.errors import DSEEError
from dsee_cli.run.steps import StepStore, steps_dir

from .conftest import FAST, run_dsee
from .helpers import compose, run_in_process

NUMBERS = ("final", "phases", "trainable_params", "total_params_pct", "flops_ratio", "pruning")


def _numbers(metrics: dict) -> dict:
    out = {k: metrics[k] for k in NUMBERS}
    for phase in out["phases"].values():
        phase.pop("seconds"), phase.pop("steps_per_second"), phase.pop("peak_memory_bytes")
    for key in ("seconds", "steps_per_second", "peak_memory_bytes"):
        out["final"].pop(key, None)
    out["pruning"] = {k: v for k, v in out["pruning"].items() if k not in ("seconds", "peak_memory_bytes")}
    return out


def _computed(metrics: dict) -> list[str]:
    return sorted(name for name, record in metrics["steps"].items() if not record["reused"])


def test_a_run_that_reuses_phase1_ends_as_the_same_run_computed_from_scratch(tmp_path, monkeypatch):
    """dsee-70 computes phase I; dsee-50 with the random criterion (the RNG state matters) reuses it
    and ends with exactly the numbers of the same run computed from scratch."""
    first = run_in_process(tmp_path / "a", "sparsity=0.3")
    assert first["steps"]["phase1"]["reused"] is False
    reused = run_in_process(tmp_path / "b", "sparsity=0.5", "pruning.criterion=random")
    assert reused["steps"]["phase1"] == {"fingerprint": first["steps"]["phase1"]["fingerprint"], "reused": True,
                                         "source": str(tmp_path / "a")}
    scratch = run_in_process(tmp_path / "c", "sparsity=0.5", "pruning.criterion=random", "reuse=false")
    assert scratch["steps"]["phase1"]["reused"] is False
    assert _numbers(reused) == _numbers(scratch)
    # what phase I depends on changes its fingerprint; what it does not, does not
    assert run_in_process(tmp_path / "d", "sparsity=0.3", "seed=2")["steps"]["phase1"]["reused"] is False
    assert run_in_process(tmp_path / "e", "trainer.recovery.lr=0.01")["steps"]["phase1"]["reused"] is True


def test_imp_rounds_chain_across_runs_of_different_lengths(tmp_path):
    """Round r of a 3-round job is round r of an r-round job: after the 1- and 2-round jobs the
    3-round job trains only its third round, and ends as if it had computed all three."""
    imp = ["pruning=imp", "pruning.rate=0.2"]
    one = run_in_process(tmp_path / "r1", *imp, "pruning.rounds=1")
    two = run_in_process(tmp_path / "r2", *imp, "pruning.rounds=2")
    three = run_in_process(tmp_path / "r3", *imp, "pruning.rounds=3")
    assert _computed(one) == ["phase1", "round1"] and _computed(two) == ["round2"] and _computed(three) == ["round3"]
    scratch = run_in_process(tmp_path / "s3", *imp, "pruning.rounds=3", "reuse=false")
    assert _computed(scratch) == ["phase1", "round1", "round2", "round3"]
    assert _numbers(three) == _numbers(scratch)
    # the 1-round job's last round is the 2-round job's first: the same seed, the same training
    for key in ("best", "last", "steps"):
        assert one["phases"]["recovery"][key] == two["phases"]["retrain1"][key]


def test_a_failed_computation_leaves_no_entry_and_a_damaged_entry_is_recomputed(tmp_path, caplog):
    from dsee_cli.run.train import ProgressSink

    class Crash(ProgressSink):
        def advance(self, loss, lr):
            raise RuntimeError("killed in phase I")

    from dsee_cli.run.pipeline import run_experiment

    cfg = compose()
    with pytest.raises(RuntimeError, match="killed"):
        run_experiment(cfg, tmp_path / "crash", Crash())
    store = StepStore()
    assert store.entries() == []
    (store.root / ".tmp-phase1-x").mkdir(parents=True)  # what a kill during publishing leaves
    first = run_in_process(tmp_path / "a")
    [entry] = store.entries()
    state = next(entry["path"].glob("state-*.safetensors"))
    data = bytearray(state.read_bytes())
    data[-100] ^= 0xFF  # bit rot
    state.write_bytes(bytes(data))
    second = run_in_process(tmp_path / "b", "sparsity=0.5")
    assert second["steps"]["phase1"]["reused"] is False and "unusable" in caplog.text
    assert first["steps"]["phase1"]["fingerprint"] == second["steps"]["phase1"]["fingerprint"]
    assert [e["name"] for e in store.entries()] == [entry["name"]]
    assert store.prune() and store.entries() == [] and not list(store.root.glob(".tmp-*"))


@pytest.mark.slow
def test_two_concurrent_jobs_compute_a_shared_phase1_once(workdir):
    """Two processes start together and need the same phase I: one computes it, the other waits
    on its lock and reuses it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DSEE_CACHE": str(workdir / ".cache")}
    args = [*FAST, "trainer.max_steps=30", "trainer.eval_every=10"]
    procs = [subprocess.Popen([sys.executable, "-m", "dsee_cli", "train", *args, f"sparsity={s}",
                               f"hydra.run.dir=run{i}"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, s in enumerate((0.3, 0.5))]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    records = [json.loads((workdir / f"run{i}" / "metrics.json").read_text())["steps"]["phase1"] for i in range(2)]
    assert sorted(r["reused"] for r in records) == [False, True]
    assert any("waiting: another run is computing step phase1" in out for out in outs) or \
        any("Phase I: reused" in out for out in outs)


@pytest.mark.slow
def test_table14_under_smoke_trains_four_rounds_not_ten(workdir):
    result = run_dsee(["-m", "experiment=table14", "profile=smoke"], workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    computed = []
    for path in sorted((workdir / "multirun" / "table14").glob("*/metrics.json")):
        computed += _computed(json.loads(path.read_text()))
    assert sorted(computed) == ["phase1", "round1", "round2", "round3", "round4"]
    listing = subprocess.run([sys.executable, "-m", "dsee_cli", "cache", "ls"], cwd=workdir, capture_output=True,
                             text=True, env={**os.environ, "DSEE_CACHE": str(workdir / ".cache")})
    assert listing.returncode == 0 and listing.stdout.count("round") >= 4 and "phase1" in listing.stdout


def test_the_store_lives_under_dsee_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSEE_CACHE", str(tmp_path / "c"))
    assert steps_dir() == tmp_path / "c" / "steps"


def test_the_plan_names_the_steps_a_run_records_and_a_sweep_plan_runs_nothing(tmp_path, monkeypatch, capsys):
    from dsee_cli.cli import main
    from dsee_cli.run.plan import build_plan

    overrides = ("pruning=imp", "pruning.rounds=2")
    plan = build_plan(compose(*overrides))
    assert [s.name for s in plan] == ["omega", "phase1", "prune1", "round1", "prune2", "round2", "evaluate", "export",
                                      "measure"][: len(plan)]
    metrics = run_in_process(tmp_path / "run", *overrides)
    assert {s.name: s.fingerprint for s in plan if s.fingerprint} == \
        {name: record["fingerprint"] for name, record in metrics["steps"].items()}
    monkeypatch.chdir(tmp_path)
    assert main(["train", "-m", "experiment=table7", "profile=smoke", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "job 12 of 12" in out and "reused" in out and "12 job(s)" in out and "nothing was run" in out
    assert not (tmp_path / "multirun").exists()


def test_a_new_results_version_recomputes_and_prune_stale_removes_the_old(tmp_path, monkeypatch, capsys):
    """A fix that changes what a step computes bumps dsee_cli.RESULTS: neither the step store nor
    the Ω cache then answers from what the older code computed."""
    import dsee_cli
    from dsee_cli.cli import main

    monkeypatch.setenv("DSEE_CACHE", str(tmp_path / "cache"))
    first = run_in_process(tmp_path / "a", "reuse=true")  # dsee: Ω, then phase I stored
    again = run_in_process(tmp_path / "b", "reuse=true", "sparsity=0.5")
    assert again["steps"]["phase1"]["reused"] is True
    omega_cache = tmp_path / "omega-cache"
    assert len(list(omega_cache.glob("*.safetensors"))) == 1
    monkeypatch.setattr(dsee_cli, "RESULTS", dsee_cli.RESULTS + 1)
    bumped = run_in_process(tmp_path / "c", "reuse=true", "sparsity=0.5")
    assert bumped["steps"]["phase1"]["reused"] is False and bumped["omega"]["from_cache"] is False
    assert bumped["steps"]["phase1"]["fingerprint"] != first["steps"]["phase1"]["fingerprint"]
    assert len(list(omega_cache.glob("*.safetensors"))) == 2
    store = StepStore()
    assert sorted(e["current"] for e in store.entries()) == [False, True]
    assert main(["cache", "ls"]) == 0
    listing = capsys.readouterr().out
    assert "(stale: never" in listing and "1 steps and 0 Ω files of other versions" in listing
    removed = store.prune(stale_only=True)
    assert len(removed) == 1 and all(e["current"] for e in store.entries()) and store.entries()


def test_a_run_that_reused_phase1_labels_its_time_and_cost_apart(tmp_path):
    from rich.console import Console

    from dsee_cli.reporting.tracking import results_table

    root = tmp_path
    run_in_process(root / "a", "reuse=true")
    reused = run_in_process(root / "b", "reuse=true", "sparsity=0.5")
    cost = reused["cost"]
    assert cost["reused_phases"] == ["phase1"]
    assert cost["this_job_train_seconds"] == pytest.approx(reused["phases"]["recovery"]["seconds"], abs=1e-3)
    assert cost["this_job_train_seconds"] < cost["train_seconds"]
    console = Console(width=100, record=True)
    console.print(results_table(reused))
    text = console.export_text()
    assert "time phase1 (reused, not spent here)" in text and "reused steps computed in" in text


def test_stored_steps_are_keyed_by_the_device_type_and_the_resolved_precision():
    """auto on a CPU is 32-true (one key); bf16-mixed, or a GPU, computes other numbers (another key);
    which GPU, or how many, does not. Today's key hashed `auto` unresolved and dropped the device."""
    from dsee_cli.run.steps import step_fingerprint

    def key(*overrides):
        return step_fingerprint(compose(*overrides), "phase1")

    assert key("trainer.device=cpu") == key("trainer.device=cpu", "trainer.precision=32-true")
    assert key("trainer.device=cpu") != key("trainer.device=cpu", "trainer.precision=bf16-mixed")
    assert key("trainer.precision=32-true", "trainer.device=cpu") != key("trainer.precision=32-true",
                                                                          "trainer.device=cuda")
    assert key("trainer.precision=bf16-mixed", "trainer.device=cuda:0") == key("trainer.precision=bf16-mixed",
                                                                                "trainer.device=cuda:1")


def test_a_checkpoint_resumes_only_on_the_device_type_and_precision_it_was_computed_with(tmp_path):
    """A run stopped after phase I on a GPU in bf16 (its checkpoint says so) is not resumed by a CPU
    process in fp32 (what trainer.precision=auto gives there): it says where it ran, and how to go on."""
    run = tmp_path / "run"
    run_in_process(run, "trainer.checkpoint_every=1", messages=[])
    (run / "metrics.json").unlink()  # as if the process died after its last checkpoint
    meta_path = run / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["numerics"] == {"device_type": "cpu", "precision": "32-true"}
    meta["numerics"] = {"device_type": "cuda", "precision": "bf16-mixed"}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DSEEError, match=r"computed on cuda in bf16-mixed; this process runs on cpu in 32-true.*"
                                        r"trainer.device=cuda trainer.precision=bf16-mixed.*resume=false"):
        run_in_process(run, "trainer.checkpoint_every=1", messages=[])
