"""Which DSEE works on LLMs (experiment=dsee-llm): each new score and grouping on planted layers,
the decoders' default that `auto` resolves to, the warning before a configuration known to
collapse a decoder, and the tuning-budget scale."""

from __future__ import annotations

import copy

import pytest
import torch

from dsee_cli.core.arch import block_linears, weight_out_in
from dsee_cli.data.calibration import CalibrationInputs
from dsee_cli.errors import DSEEError
from dsee_cli.pruning import DECODER_DEFAULT, PRUNERS, PruningConfig, collapse_warning, compute_masks, score_pieces
from dsee_cli.pruning.calibrated import prune_block_by_block
from dsee_cli.pruning.oneshot import wanda_masks
from dsee_cli.run.plan import build_plan, plan_warnings

from .conftest import FAST, run_dsee
from .helpers import compose, tiny, with_random_adapters
from .test_calibration import _adapted_llama


@pytest.mark.parametrize("criterion", ["delta", "delta_plus_weight", "weight"])
def test_row_grouping_prunes_exactly_the_lowest_scores_of_every_row(criterion):
    model, _ = tiny("tiny-llama")
    with_random_adapters(model, targets=["q", "v"])
    masks = compute_masks(model, PruningConfig(criterion=criterion, granularity="row"), 0.37)
    for p in score_pieces(model, criterion, 0):
        scores, keep = p.scores(), masks[p.module][p.rows[0]:p.rows[1]]
        k = round(0.37 * scores.shape[1])
        assert set((~keep).sum(1).tolist()) == {k}, p.module  # exactly k in every row
        for row in range(scores.shape[0]):  # and they are the row's k lowest
            assert scores[row][keep[row]].min() >= scores[row][~keep[row]].max()


def test_matrix_grouping_keeps_a_planted_matrix_whole_where_global_prunes_it():
    """A matrix whose every |ΔW| is tiny: a global threshold takes it all, a per-matrix one exactly
    the requested share of it, a per-row one the share of each row."""
    model, _ = tiny("tiny-llama")
    adapters = with_random_adapters(model, targets=["q", "v"])
    tiny_one = next(iter(adapters))
    with torch.no_grad():
        for p in adapters[tiny_one].adapter_parameters():
            p.mul_(1e-3)
    pruned = {g: ~compute_masks(model, PruningConfig(granularity=g), 0.4)[tiny_one]
              for g in ("global", "matrix", "row")}
    assert pruned["global"].float().mean() > 0.95
    assert int(pruned["matrix"].sum()) == round(0.4 * pruned["matrix"].numel())
    assert set(pruned["row"].sum(1).tolist()) == {round(0.4 * pruned["row"].shape[1])}


def _prune(model, batches, **settings):
    return PRUNERS["unstructured"].prune(model, PruningConfig(**settings), 0.5, 0, lambda: None,
                                         lambda: CalibrationInputs(batches, {"source": "test"}))


def test_tuned_wanda_scores_the_tuned_weight_by_the_input_norms():
    """|W + ΔW|·‖X‖: planted entries where ΔW cancels W go (whatever |W| is), entries whose W is
    small but W + ΔW large stay; per row it is exactly Wanda's mask on the tuned weight."""
    model, batches = _adapted_llama()
    q = "model.layers.0.self_attn.q_proj"
    adapter = model.get_submodule(q)
    w = weight_out_in(adapter.base)
    with torch.no_grad():  # plant: row 0's largest |W| cancelled by S, its smallest raised
        adapter.lora_B[0].zero_()
        big, small = w[0].abs().topk(4).indices, (-w[0].abs()).topk(4).indices
        adapter.set_omega(0, torch.cat([big, small]))
        adapter.sparse_values[0].copy_(torch.cat([-w[0, big], torch.full((4,), 5.0)]))
    recorded = {}

    def record(name, module, stats):  # the first block's statistics, nothing pruned
        recorded[name] = stats
        return torch.ones(weight_out_in(getattr(module, "base", module)).shape, dtype=torch.bool)

    prune_block_by_block(copy.deepcopy(model), batches, record, hessian=False)
    tuned = w.float() + adapter.delta_weight().float()
    expected = wanda_masks(tuned, recorded[q], 0.5)
    info = _prune(model, batches, criterion="tuned_wanda", granularity="row")
    kept = w != 0
    assert torch.equal(kept, expected)
    assert not kept[0, big].any() and kept[0, small].all()
    assert info["score"] == "|W + ΔW|·‖X‖" and info["granularity"] == "row"


def test_tuned_wanda_per_row_is_wanda_on_the_tuned_model():
    model, batches = _adapted_llama()
    twin = copy.deepcopy(model)
    _prune(model, batches, criterion="tuned_wanda", granularity="row")
    PRUNERS["wanda"].prune(twin, PruningConfig(method="wanda"), 0.5, 0, lambda: None,
                           lambda: CalibrationInputs(batches, {"source": "test"}))
    for name, module in block_linears(model).items():
        theirs = block_linears(twin)[name]
        assert torch.equal(weight_out_in(getattr(module, "base", module)) != 0,
                           weight_out_in(getattr(theirs, "base", theirs)) != 0), name


@pytest.mark.parametrize("criterion", ["delta_wanda", "tuned_wanda"])
def test_calibrated_criteria_per_matrix_prune_exactly_the_share_of_each_matrix(criterion):
    model, batches = _adapted_llama()
    info = _prune(model, batches, criterion=criterion, granularity="matrix")
    rows_differ = False
    for name, module in block_linears(model).items():
        zero = weight_out_in(getattr(module, "base", module)) == 0
        assert int(zero.sum()) == round(0.5 * zero.numel()), name
        rows_differ |= len(set(zero.sum(1).tolist())) > 1  # not a per-row mask in disguise
    assert rows_differ and info["granularity"] == "matrix"


def test_scope_adapted_keeps_every_weight_of_the_layers_without_an_adapter_under_calibrated_criteria():
    model, batches = _adapted_llama()
    _prune(model, batches, criterion="delta_wanda", granularity="row", scope="adapted")
    for name, module in block_linears(model).items():
        zeros = int((weight_out_in(getattr(module, "base", module)) == 0).sum())
        assert (zeros > 0) == hasattr(module, "base"), name


@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_a_calibrated_criterion_with_a_threshold_across_blocks_is_refused_naming_the_choices(granularity):
    with pytest.raises(DSEEError, match=rf"granularity={granularity}.*tuned_wanda.*Valid choices.*matrix, row"):
        PruningConfig(criterion="tuned_wanda", granularity=granularity).check(0.5)


def test_auto_is_the_decoders_default_and_the_papers_on_encoders_and_paper_recipes_keep_the_paper():
    decoder = compose("task=wikitext2", "profile=smoke", "sparsity=0.5")
    encoder = compose("task=rte", "profile=smoke", "sparsity=0.5")
    paper = compose("task=wikitext2", "profile=smoke", "recipe=dsee-paper")
    table4 = compose("task=e2e", "profile=smoke", "recipe=dsee-50")
    for cfg in (decoder, encoder, paper, table4):
        build_plan(cfg)  # validates, resolving auto
    from dsee_cli.config import validate
    for cfg in (decoder, encoder, paper, table4):
        validate(cfg)
    assert (decoder.pruning.criterion, decoder.pruning.granularity) == DECODER_DEFAULT
    assert (encoder.pruning.criterion, encoder.pruning.granularity) == ("delta", "global")
    assert (paper.pruning.criterion, paper.pruning.granularity) == ("delta", "global")
    assert (table4.pruning.criterion, table4.pruning.granularity) == ("delta", "global")
    assert decoder.pruning.calibrated and decoder.pruning.reconstructs and not paper.pruning.calibrated
    delta_wanda = compose("task=wikitext2", "profile=smoke", "pruning.criterion=delta_wanda")
    validate(delta_wanda)
    assert delta_wanda.pruning.granularity == "row"
    dora = compose("task=wikitext2", "profile=smoke", "adapter=dora", "sparsity=0.5")
    validate(dora)  # OBS cannot store its update for a ΔW that reads W: Wanda's score on the tuned weight
    assert (dora.pruning.criterion, dora.pruning.granularity) == ("tuned_wanda", "row")


def test_the_warning_fires_for_the_collapsing_configuration_and_not_for_the_default():
    from dsee_cli.config import validate

    def warnings(*overrides):
        cfg = compose("task=wikitext2", "profile=smoke", *overrides)
        validate(cfg)
        return plan_warnings(cfg)

    (paper,) = warnings("recipe=dsee-paper", "sparsity=0.5")
    assert "criterion=delta" in paper and "412" in paper and "collapse" in paper
    (nm,) = warnings("recipe=dsee-paper", "pattern=2of4")
    assert "2:4" in nm and "599" in nm
    (row,) = warnings("recipe=dsee-llm-row", "sparsity=0.6")
    assert "363 at 50 %" in row and "14.4" in row
    assert warnings("sparsity=0.5") == [] and warnings("pattern=2of4") == []  # the default
    assert warnings("recipe=dsee-paper", "sparsity=0.3") == []  # below what was measured
    assert warnings("recipe=dsee-paper", "sparsity=0.5", "pruning.scope=adapted") == []
    encoder = PruningConfig(criterion="delta", granularity="global")
    assert collapse_warning(encoder, 0.5, decoder=False) is None


def test_plan_warns_before_any_work(tmp_path):
    out = run_dsee(["task=wikitext2", "profile=smoke", "recipe=dsee-paper", "sparsity=0.5", "--plan"], tmp_path,
                   env_extra={"COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "warning: pruning.criterion=delta with granularity=global at sparsity 0.5 is known to collapse" in text
    assert "by |ΔW|" in text  # the prune step names its score
    assert not (tmp_path / "outputs").exists()


def test_epochs_scale_multiplies_a_phase_and_is_checked():
    base = compose("task=wikitext2", "profile=smoke", "trainer.max_steps=0", "recipe=dsee-paper")
    twice = compose("task=wikitext2", "profile=smoke", "trainer.max_steps=0", "recipe=dsee-llm-phase1x2")
    steps = {cfg_name: {s.name: s.optimizer_steps for s in build_plan(cfg)}
             for cfg_name, cfg in (("base", base), ("twice", twice))}
    assert steps["twice"]["phase1"] == 2 * steps["base"]["phase1"]
    assert steps["twice"]["recovery"] == steps["base"]["recovery"]
    with pytest.raises(DSEEError, match=r"trainer.recovery.epochs_scale=0.0 must be > 0"):
        compose("trainer.recovery.epochs_scale=0").trainer.check()


def test_obs_is_sparsegpt_on_the_tuned_weight_and_the_layer_computes_its_update():
    """criterion=obs: the same masks and the same computed weights as pruning=sparsegpt on the tuned model;
    each adapted layer computes M⊙(W + ΔW) = W', the OBS-updated weight (not the tuned weight masked)."""
    from dsee_cli.pruning.calibrated import effective_weight

    model, batches = _adapted_llama()
    twin, before = copy.deepcopy(model), copy.deepcopy(model)
    info = _prune(model, batches, criterion="obs", granularity="row")
    PRUNERS["sparsegpt"].prune(twin, PruningConfig(method="sparsegpt"), 0.5, 0, lambda: None,
                               lambda: CalibrationInputs(batches, {"source": "test"}))
    changed = 0
    for name, module in block_linears(model).items():
        theirs, original = block_linears(twin)[name], block_linears(before)[name]
        ours_w = effective_weight(module) * (module.mask if hasattr(module, "base") else 1)
        their_w = effective_weight(theirs) * (theirs.mask if hasattr(theirs, "base") else 1)
        torch.testing.assert_close(ours_w, their_w)
        kept = ours_w != 0
        changed += int((ours_w - effective_weight(original))[kept].abs().gt(1e-6).sum())
    assert changed > 0  # kept weights were updated, as OBS does
    assert info["score"].startswith("OBS") and info["granularity"] == "blocks of 128 columns"


def test_obs_is_refused_with_a_delta_that_reads_the_weight_and_per_matrix():
    from dsee_cli.config import validate

    cfg = compose("task=wikitext2", "profile=smoke", "adapter=dora", "pruning.criterion=obs")
    with pytest.raises(DSEEError, match=r"pruning.criterion=obs rewrites the kept weights.*reads W"):
        validate(cfg)
    with pytest.raises(DSEEError, match=r"granularity=matrix cannot go with pruning.criterion=obs"):
        PruningConfig(criterion="obs", granularity="matrix").check(0.5)


@pytest.mark.slow
def test_the_run_warns_on_its_terminal_and_in_its_log_and_the_banner_names_the_score(tmp_path):
    out = run_dsee([*FAST, "task=wikitext2", "profile=smoke", "recipe=dsee-paper", "sparsity=0.5",
                    "trainer.max_steps=2", "export=false", "hydra.run.dir=run"], tmp_path, env_extra={"COLUMNS": "100"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = " ".join(out.stdout.split())
    assert text.index("warning: pruning.criterion=delta") < text.index("Phase I")  # before any work
    assert "Phase II: unstructured pruning by |ΔW| (delta), one global threshold" in text
    assert "known to collapse" in (tmp_path / "run" / "dsee.log").read_text()
