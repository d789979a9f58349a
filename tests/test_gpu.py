"""The GPU tier (`make test-gpu`, under 8 minutes on one GPU): what only CUDA runs. Skipped with
the reason where there is no GPU; the CPU tiers cover the same code paths through CPU autocast,
faked device counts and gloo."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from tests.conftest import FAST, run_dsee, start_dsee, wait_in_phase
from tests.helpers import METHOD_OVERRIDES, run_in_process

pytestmark = pytest.mark.gpu
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ON_GPU = ["trainer.device=cuda", "trainer.max_steps=6", "trainer.eval_every=3"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_every_method_trains_in_mixed_precision_on_the_gpu(tmp_path, method, precision):
    m = run_in_process(tmp_path / "run", *METHOD_OVERRIDES[method], *ON_GPU, f"trainer.precision={precision}")
    assert m["precision"] == precision and m["device"].startswith("cuda")
    assert m["device_lease"]["gpus"] == [int(m["device"].split(":")[1])]
    for name, phase in m["phases"].items():  # every phase trained its steps and was evaluated, with no NaN
        assert phase["steps"] == 6 and phase["last"], (method, name, phase)
        assert all(math.isfinite(v) for v in phase["last"].values()), (method, name, phase["last"])
    assert m["final"]["eval"] and all(math.isfinite(v) for v in m["final"]["eval"].values())


def test_two_four_is_converted_checked_and_timed(tmp_path):
    size = ["model.tiny.hidden=256", "model.tiny.intermediate=1024", "model.tiny.heads=4"]  # shapes the kernels take
    m = run_in_process(tmp_path / "run", "pruning=nm", *ON_GPU, *size, "trainer.precision=bf16-mixed", "measure=true")
    verdict = m["savings"]["two_four"]
    if torch.cuda.get_device_capability() < (8, 0):
        assert verdict["used"] is False and "8.0" in verdict["why"]
        return
    assert "max_logit_difference" in verdict, verdict
    assert verdict["max_logit_difference"] <= verdict["tolerance"], verdict
    assert set(verdict["speedup"]) and all(v is not None for v in verdict["speedup"].values())
    print("2:4 on this GPU:", json.dumps(verdict))


def test_resume_after_kill_9_on_the_gpu_is_exact(workdir):
    """Dropout on: the resumed run's CUDA generator must continue where it stopped."""
    args = [*FAST, "trainer.device=cuda", "trainer.max_steps=60", "trainer.checkpoint_every=4",
            "trainer.eval_every=20", "export=false", "reuse=false"]
    ref = run_dsee([*args, "hydra.run.dir=ref"], workdir)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = start_dsee([*args, "hydra.run.dir=crash"], workdir)
    wait_in_phase(workdir / "crash", "recovery")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_dsee([*args, "hydra.run.dir=crash"], workdir)
    assert resumed.returncode == 0 and "Resuming" in resumed.stdout, resumed.stderr[-2000:]
    a, b = (json.loads((workdir / d / "metrics.json").read_text()) for d in ("ref", "crash"))
    assert {k: (v["best"], v["last"]) for k, v in a["phases"].items()} == \
        {k: (v["best"], v["last"]) for k, v in b["phases"].items()}


@pytest.mark.skipif(GPUS < 2, reason="2-process DDP needs 2 GPUs")
def test_two_gpus_match_one(workdir):
    args = [*FAST, "model.tiny.dropout=0", "measure=false", "reuse=false", "trainer.max_steps=12"]
    one = run_dsee([*args, "hydra.run.dir=one"], workdir)
    two = run_dsee([*args, "trainer.devices=2", "hydra.run.dir=two"], workdir)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = (json.loads((workdir / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert b["world_size"] == 2 and b["devices"] == ["cuda:0", "cuda:1"]
    assert b["final"]["eval"] == a["final"]["eval"]


def test_sweep_jobs_lease_their_own_gpus(workdir):
    """A 4-job joblib sweep: each job on its own GPU where there are 4, queued for a free one where
    there are fewer; the assignment is printed for the record."""
    jobs = min(4, max(GPUS, 1))
    args = [*FAST, "measure=false", "export=false", "trainer.device=auto", "seed=1,2,3,4"]
    out = run_dsee(["-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", *args], workdir, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = [json.loads(p.read_text()) for p in (workdir / "multirun").rglob("metrics.json")]
    assignment = sorted((m["config"]["seed"], m["device"]) for m in found)
    print("per-job devices:", assignment)
    assert len(found) == 4 and all(d.startswith("cuda:") for _, d in assignment)
    if GPUS >= 4:
        assert len({d for _, d in assignment}) == 4


@pytest.mark.parametrize("recipe", ["llm-dsee-50", "llm-dsee-kv-group", "llm-dsee-query-heads"])
def test_a_decoder_llm_tunes_prunes_and_recovers_with_a_bf16_base_on_the_gpu(tmp_path, recipe):
    """tiny-llama with its frozen base in bf16 (as the LLM presets load it) under bf16 autocast."""
    m = run_in_process(tmp_path / "run", "task=instruct", "profile=smoke", f"recipe={recipe}", "model.dtype=bfloat16",
                       "model.tiny.hidden=96", "model.tiny.heads=12", *ON_GPU, "trainer.precision=auto")
    assert m["precision"] == "bf16-mixed" and m["device"].startswith("cuda")
    assert all(v == v for v in m["final"]["eval"].values())  # no NaN


@pytest.mark.parametrize("recipe", ["llm-wanda", "llm-sparsegpt"])
def test_one_shot_llm_pruners_calibrate_on_the_gpu_and_record_their_peak(tmp_path, recipe):
    m = run_in_process(tmp_path / "run", "experiment=llm-pruning", "profile=smoke", f"recipe={recipe}",
                       "recovery=none", "pattern=2of4", "trainer.device=cuda", "trainer.precision=bf16-mixed",
                       "model.dtype=bfloat16")
    assert m["device"].startswith("cuda") and m["pruning"]["pattern"] == "2:4"
    assert 0 < m["pruning"]["peak_memory_bytes"] < torch.cuda.get_device_properties(0).total_memory
    assert m["final"]["generation"]["test/ppl"] > 1


def test_the_two_four_benchmark_runs_and_its_products_match():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "scripts/bench_two_four.py", "--repeats", "5"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [float(line.rsplit("rel. err ", 1)[1]) for line in out.stdout.splitlines() if "rel. err" in line]
    assert errors and max(errors) < 2e-2, out.stdout
