"""What a run costs and saves, measured: the compressed export, training cost, inference savings
against the dense model, and the report's APT columns."""

import pytest
import torch

from dsee_cli.core.precision import FP32
from dsee_cli.measure.costs import TimingSettings, compare_latency, semi_structured
from dsee_cli.pruning import PruningConfig, apply_masks, compute_masks
from dsee_cli.reporting.report import build_report, cost_table
from dsee_cli.run.export import export_compressed, load_merged, merged_copy

from .conftest import FAST, run_dsee
from .helpers import batch, run_in_process, tiny, with_random_adapters


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_compressed_export_reloads_to_the_same_logits_at_the_expected_size(name, sparsity, tmp_path):
    model, tok = tiny(name)
    with_random_adapters(model)
    apply_masks(model, compute_masks(model, PruningConfig(), sparsity))
    merged = merged_copy(model)
    info = export_compressed(merged, tok, tmp_path / "compressed")
    ratio = info["linears_compressed_bytes"] / info["linears_dense_bytes"]
    assert ratio == pytest.approx((1 - sparsity) + 1 / 32, abs=0.02)  # values + one bit per weight, fp32
    enc = batch(tok)
    with torch.no_grad():
        assert torch.equal(load_merged(tmp_path / "compressed")(**enc).logits, merged.eval()(**enc).logits)


def test_nothing_is_compressed_without_zeros(tmp_path):
    model, tok = tiny()
    assert export_compressed(merged_copy(model), tok, tmp_path / "c") is None and not (tmp_path / "c").exists()


def test_a_run_measures_its_cost_and_savings(tmp_path):
    metrics = run_in_process(tmp_path / "run", "measure=true", "export=true", "sparsity=0.5",
                             "pruning=structured", "pruning.heads_to_remove=2", messages=[])
    cost, savings, phases = metrics["cost"], metrics["savings"], metrics["phases"]
    assert set(cost["per_phase"]) == {"phase1", "recovery"}
    assert cost["train_seconds"] == pytest.approx(sum(p["seconds"] for p in phases.values()), abs=2e-3)
    assert cost["steps"] == sum(p["steps"] for p in phases.values()) == 6  # 3 + 3 (trainer.max_steps)
    phase1 = cost["per_phase"]["phase1"]
    # seconds are recorded to the millisecond: at ~40 ms a phase that rounding alone moves the rate by ~1 %
    assert phase1["steps_per_second"] == pytest.approx(3 / phase1["seconds"], rel=1e-2 + 5e-4 / phase1["seconds"])
    # AdamW: two fp32 moments per trained value and a step count per tensor; phase I trains the most
    assert cost["optimizer_bytes"] == phases["phase1"]["optimizer_bytes"] >= phases["recovery"]["optimizer_bytes"]
    assert cost["optimizer_bytes"] >= 8 * metrics["trainable_params"]["total"]
    for b in ("batch1", "batch32"):  # each ratio is what it says, of the two measured numbers
        assert savings["speedup"][b] == pytest.approx(savings["dense_latency_ms"][b] / savings["latency_ms"][b],
                                                      rel=1e-2)
    assert savings["memory_ratio"] == pytest.approx(savings["memory_bytes"] / savings["dense_memory_bytes"], rel=1e-3)
    assert savings["params"] < savings["dense_params"]  # two of four heads are really gone
    assert savings["export_merged_bytes"] < savings["dense_bytes"]


def test_unstructured_runs_write_the_compressed_export(tmp_path):
    metrics = run_in_process(tmp_path / "run", "measure=true", "export=true", "sparsity=0.5", messages=[])
    compression = metrics["export"]["compression"]
    assert compression["linears_ratio"] == pytest.approx(0.5 + 1 / 32, abs=0.02)
    assert metrics["savings"]["export_compressed_bytes"] < metrics["savings"]["export_merged_bytes"]
    assert (tmp_path / "run" / "export" / "compressed" / "compression.json").is_file()


def test_measuring_a_finished_run_later_does_not_train_it_again(tmp_path):
    run = tmp_path / "run"
    first = run_in_process(run, "measure=false", messages=[])
    assert first["savings"] == {}
    said: list[str] = []
    second = run_in_process(run, "measure=true", messages=said)
    assert set(second["savings"]["speedup"]) == {"batch1", "batch32"}
    assert any("Resuming" in s and "at evaluate" in s for s in said)  # every training step was done
    assert not any(s.startswith("Phase") for s in said)
    assert second["final"]["eval"] == first["final"]["eval"]


def test_two_four_is_not_used_on_a_cpu_and_says_why():
    model, _ = tiny()
    cpu = semi_structured(model, torch.device("cpu"), FP32, 2, 4, TimingSettings())
    assert cpu["used"] is False and "no speed-up on a CPU" in cpu["why"]
    assert "not the 2:4 pattern" in semi_structured(model, torch.device("cpu"), FP32, 1, 4, TimingSettings())["why"]


def test_latency_is_measured_for_each_model_and_batch():
    a, _ = tiny()
    b, _ = tiny(seed=1)
    # 32 x 64 tokens against 1 x 64: a gap no scheduler noise on a busy machine closes (16 tokens did not)
    times = compare_latency({"a": a, "b": b}, torch.device("cpu"), FP32, TimingSettings(seq_len=64, repeats=3))
    assert set(times) == {"a", "b"} and all(set(t) == {1, 32} for t in times.values())
    assert all(t[32] > t[1] for t in times.values())  # 32 sequences take longer than one


@pytest.mark.slow
def test_the_report_shows_training_cost_against_full_fine_tuning_and_inference_against_dense(workdir):
    out = run_dsee(["-m", *FAST, "name=costs", "recipe=finetune,dsee-50", "measure=true", "trainer.max_steps=2"],
                   workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    report = build_report(workdir / "multirun" / "costs")
    table = cost_table(report)
    assert table is not None
    headers = [c.header for c in table.columns]
    assert headers[-4:] == ["train time ×FT", "train mem ×FT", "inf. speed-up", "inf. mem ×dense"]
    finetune = [list(c._cells) for c in table.columns]
    assert finetune[1][0] == "1.00x"  # full fine-tuning is the training reference
    assert "inference_speedup_b32" in report.csv().splitlines()[0]


def test_a_semi_structured_model_that_computes_something_else_is_not_used():
    """The GPU path's decision, on numbers: faster but beyond the dtype's tolerance is refused."""
    from dsee_cli.measure.costs import two_four_verdict

    fast = {"batch1": 1.2, "batch32": 1.3}
    ok = two_four_verdict(0.01, 5.0, "bf16-mixed", fast)
    assert ok["used"] and ok["tolerance"] == pytest.approx(5 * 8 * 2**-8)
    off = two_four_verdict(0.5, 5.0, "bf16-mixed", fast)
    assert not off["used"] and "differ from the dense masked model's by 0.5" in off["why"]
    assert not two_four_verdict(float("nan"), 5.0, "16-mixed", fast)["used"]
    slow = two_four_verdict(0.0, 5.0, "16-mixed", {"batch1": 0.9, "batch32": 1.1})
    assert not slow["used"] and "no faster" in slow["why"]
