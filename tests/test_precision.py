"""Mixed precision, as on a GPU, through CPU autocast: every method and every pruning mode trains,
prunes, recovers and evaluates under bf16-mixed; fp16 runs with its gradient scaler; parameters,
optimizer state and exports stay fp32."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from dsee_cli.core.precision import resolve_precision
from dsee_cli.errors import DSEEError
from dsee_cli.pruning import PruningConfig, apply_masks, compute_masks
from dsee_cli.run.export import load_merged

from .helpers import GPT2_E2E, METHOD_OVERRIDES, batch, compose, run_in_process, tiny, with_random_adapters


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_dsee_forward_under_autocast_matches_fp32(dtype, masked):
    model, tok = tiny()
    with_random_adapters(model, rank=4, omega=6)
    if masked:  # the recovery forward: M⊙(W+ΔW) through slice_delta
        apply_masks(model, compute_masks(model, PruningConfig(), 0.5))
    enc = batch(tok)
    model.eval()
    with torch.no_grad():
        reference = model(**enc).logits
        with torch.autocast("cpu", dtype=dtype):
            mixed = model(**enc).logits
    assert mixed.dtype == dtype
    # 16-bit matmuls round each product to 2^-8 (bf16) / 2^-11 (fp16) relative; over two blocks of
    # attention and FFN on logits of order 1 that is a few hundredths at most: 0.05 absolute and relative
    assert torch.allclose(mixed.float(), reference, atol=0.05, rtol=0.05)


def test_auto_precision_is_fp32_on_cpu_and_names_are_checked():
    assert resolve_precision("auto", torch.device("cpu")).name == "32-true"
    assert resolve_precision("bf16-mixed", torch.device("cpu")).mixed
    assert resolve_precision("16-mixed", torch.device("cpu")).grad_scaler() is not None
    with pytest.raises(DSEEError, match="32-true, bf16-mixed, 16-mixed"):
        resolve_precision("bf16", torch.device("cpu"))


# Every method with its default pruning (sparse-training ones prune while training), every
# pruning mode with DSEE, and GPT-2 generation with beam decoding.
MATRIX = {
    **METHOD_OVERRIDES,
    "nm": ["pruning=nm"],
    "structured": ["pruning=structured", "pruning.heads_to_remove=1"],
    "imp": ["pruning=imp", "pruning.rounds=2"],
    "earlybert": ["pruning=earlybert", "pruning.heads_to_remove=1"],
    "gpt2-e2e": GPT2_E2E,
}


FAST_TIER = ("dsee", "prefix", "pst", "structured", "earlybert", "gpt2-e2e")


@pytest.mark.parametrize("name", [n if n in FAST_TIER else pytest.param(n, marks=pytest.mark.slow) for n in MATRIX])
def test_every_method_and_pruning_mode_runs_under_bf16_mixed(name, tmp_path):
    metrics = run_in_process(tmp_path / "run", "trainer.precision=bf16-mixed", "trainer.device=cpu", *MATRIX[name],
                             messages=[])
    assert metrics["precision"] == "bf16-mixed"
    scores = metrics["final"]["eval"] | (metrics["final"].get("generation") or {})
    assert scores and all(torch.isfinite(torch.tensor(v)) for v in scores.values())
    phases = metrics["phases"]
    assert all(p["steps"] == 3 and p["last"] for p in phases.values()), phases  # each phase trained, then evaluated
    sparse_training = name in ("pst", "map", "mvp")
    if metrics["pruning"]["method"] != "none" or sparse_training:  # the mask (or the removed heads) is applied
        assert metrics["total_params_pct"] < 100.0 or metrics["flops_ratio"] < 1.0, metrics["pruning"]
        if not sparse_training:  # they prune while they train: no recovery phase
            assert phases["recovery"]["last"], "recovery was not evaluated"
    if name == "gpt2-e2e":
        assert "validation/bleu" in metrics["final"]["generation"] or "test/bleu" in metrics["final"]["generation"]
    merged = tmp_path / "run" / "export" / "merged"
    if merged.is_dir():  # exports keep the model's dtype
        assert all(p.dtype == torch.float32 for p in load_merged(merged).parameters())


def _phase1_setup(*overrides):
    from dsee_cli.run.pipeline import seed_everything
    from dsee_cli.run.plan import phase_settings
    from dsee_cli.run.task import prepare_task
    from dsee_cli.run.train import ProgressSink
    from dsee_cli.tuning import prepare_method

    cfg = compose(*overrides)
    seed_everything(cfg.seed)
    task = prepare_task(cfg, lambda text: None, ProgressSink())
    prepare_method(task.loaded.model, cfg.adapter)
    precision = resolve_precision(cfg.trainer.precision, torch.device("cpu"))
    return task, phase_settings(cfg, "phase1", precision), cfg.trainer


def test_fp16_mixed_scales_the_loss_keeps_fp32_state_and_resumes_exactly():
    from dsee_cli.run.checkpoint import model_state, restore_state
    from dsee_cli.run.train import PhaseState, ProgressSink, train_phase

    overrides = ("trainer.precision=16-mixed", "trainer.device=cpu", "adapter=lora", "adapter.dropout=0.1")
    task, settings, trainer = _phase1_setup(*overrides)
    trainer = replace(trainer, max_steps=6, checkpoint_every=3)
    model, pad = task.loaded.model, task.loaded.tokenizer.pad_token_id
    saves = []

    def save(state, extra):
        tensors, meta = model_state(model)
        snapshot = {k: v.clone() for k, v in (tensors | extra).items()}  # as written to disk at that step
        saves.append((PhaseState(**copy.deepcopy(state.as_meta())), snapshot, meta))

    train_phase(model, task.train, task.evals, task.ops, settings, trainer, pad, torch.device("cpu"), save,
                ProgressSink())
    state, tensors, meta = saves[0]  # after step 3 of 6
    # the scaler took part in every step: 3 steps without an overflow since its scale was last set
    # (a loop that bypassed it would leave the tracker at 0), at a power of two up to its 2^16 start
    scale = float(tensors["scaler::scale"])
    assert int(tensors["scaler::growth_tracker"]) == 3 and scale <= 2.0**16 and scale == 2.0 ** round(math.log2(scale))
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if k.endswith(("exp_avg", "exp_avg_sq")))
    assert all(p.dtype == torch.float32 for p in model.parameters())

    task2, _, _ = _phase1_setup(*overrides)
    restore_state(task2.loaded.model, tensors, meta)
    train_phase(task2.loaded.model, task2.train, task2.evals, task2.ops, settings, trainer, pad, torch.device("cpu"),
                lambda s, e: None, ProgressSink(), resume=(state, tensors))
    for (name, a), b in zip(model.named_parameters(), task2.loaded.model.parameters()):
        assert torch.equal(a, b), name  # the same data order, dropout and loss scale after the resume


LLM_PRUNERS = ("llm-magnitude", "llm-wanda", "llm-sparsegpt", "llm-dsee-delta", "llm-delta-wanda", "llm-dsee-kv-group")


@pytest.mark.parametrize("recipe", LLM_PRUNERS)
def test_a_bf16_base_tunes_prunes_and_recovers_with_every_llm_pruner_on_the_cpu(recipe, tmp_path):
    """The LLM presets' frozen base in bf16 (profile=smoke alone keeps fp32): every pruner calibrates,
    prunes and recovers under CPU autocast (Wanda stopped at once with 'expected m1 and m2 to have the
    same dtype'), and the merged export is bf16 with exactly the sparsity asked for."""
    from dsee_cli.core.arch import block_linears, weight_out_in

    metrics = run_in_process(tmp_path / "run", "task=wikitext2", "profile=smoke", f"recipe={recipe}", "recovery=tuned",
                             "pattern=50pct", "model.dtype=bfloat16", "task.seq_len=32", "trainer.max_steps=2",
                             "pruning.calibration.samples=8", "export=true", messages=[])
    assert metrics["precision"] == "bf16-mixed"
    assert all(math.isfinite(v) for v in metrics["final"]["generation"].values())
    assert metrics["phases"]["recovery"]["steps"] == 2
    merged = load_merged(tmp_path / "run" / "export" / "merged")
    linears = block_linears(merged)
    assert {weight_out_in(m).dtype for m in linears.values()} == {torch.bfloat16}
    zeros = {n: int((weight_out_in(m) == 0).sum()) for n, m in linears.items()}
    if recipe == "llm-dsee-delta":  # one threshold per pool (adapted, not adapted): half of all the weights
        assert sum(zeros.values()) == sum(weight_out_in(m).numel() for m in linears.values()) // 2
    elif "kv-group" not in recipe:  # per matrix or per row: half of each
        assert all(zeros[n] == weight_out_in(m).numel() // 2 for n, m in linears.items())
