import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from dsee_cli.core.arch import attention_units, block_linears, weight_out_in
from dsee_cli.errors import DSEEError
from dsee_cli.measure.accounting import inference_flops, scope_size
from dsee_cli.pruning import (
    PruningConfig,
    apply_masks,
    choose_heads,
    compute_masks,
    head_scores,
    prune_heads,
    score_pieces,
)
from dsee_cli.run.export import apply_adapter, export_merged, load_merged, save_adapter
from dsee_cli.tuning.adapters import LowRankConfig, adapters_of, inject_adapters

from .helpers import batch, logits, tiny, with_random_adapters


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("granularity", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["delta", "delta_plus_weight", "weight", "random"])
def test_masks_have_exact_sparsity_per_pool(name, granularity, criterion):
    model, _ = tiny(name)
    with_random_adapters(model)
    settings = PruningConfig(criterion=criterion, granularity=granularity)
    masks = compute_masks(model, settings, 0.37)
    pools: dict = {}
    for p in score_pieces(model, "delta", 0):
        key = p.pool if granularity == "global" else (p.pool, p.layer)
        keep = masks[p.module][p.rows[0] : p.rows[1]]
        total, kept = pools.get(key, (0, 0))
        pools[key] = (total + keep.numel(), kept + int(keep.sum()))
    assert len({k if granularity == "global" else k[0] for k in pools}) == 2  # adapted and other pools
    for total, kept in pools.values():
        assert total - kept == round(0.37 * total)


def test_delta_criterion_keeps_the_largest_delta():
    model, _ = tiny("tiny-bert")
    adapters = with_random_adapters(model)
    masks = compute_masks(model, PruningConfig(), 0.5)
    for name, a in adapters.items():
        d = a.delta_weight().abs()
        assert d[masks[name]].min() >= d[~masks[name]].max()


def test_nm_masks_are_exactly_n_of_m():
    model, _ = tiny("tiny-bert")
    with_random_adapters(model)
    masks = compute_masks(model, PruningConfig(method="nm", n=2, m=4))
    for mask in masks.values():
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert torch.all(groups == 2)


def test_nm_with_scope_adapted_prunes_only_the_adapted_matrices():
    model, _ = tiny("tiny-bert")
    adapters = with_random_adapters(model)  # query, value
    masks = compute_masks(model, PruningConfig(method="nm", n=2, m=4, scope="adapted"))
    for name, mask in masks.items():
        if name in adapters:
            assert torch.all(mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2), name
        else:
            assert bool(mask.all()), name  # key, attention output, FFN: every weight kept
    assert set(adapters) < set(masks)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_recovery_forward_and_merged_export_are_really_sparse(name, tmp_path):
    model, tok = tiny(name)
    enc = batch(tok)
    with_random_adapters(model)
    masks = compute_masks(model, PruningConfig(), 0.3)
    apply_masks(model, masks)
    total, nonzero = scope_size(model)
    assert abs(1 - nonzero / total - 0.3) < 1e-3
    before = logits(model, enc)
    export_merged(model, tok, tmp_path / "merged")
    reloaded = load_merged(tmp_path / "merged")
    assert torch.allclose(logits(reloaded, enc), before, atol=1e-5)
    zeros = sum(int(weight_out_in(m).eq(0).sum()) for m in block_linears(reloaded).values())
    size = sum(weight_out_in(m).numel() for m in block_linears(reloaded).values())
    assert zeros / size == pytest.approx(0.3, abs=1e-3)


def test_reference_flag_keeps_delta_dense():
    model, tok = tiny("tiny-bert")
    with_random_adapters(model)
    apply_masks(model, compute_masks(model, PruningConfig(), 0.3), mask_delta=False)
    total, nonzero = scope_size(model)
    assert 1 - nonzero / total < 0.3  # ΔW refills pruned positions of the adapted layers


def _zero_heads_dense(model, heads):
    modules = dict(model.named_modules())
    with torch.no_grad():
        for unit in attention_units(model):
            out = modules[unit.output]
            w = weight_out_in(out.base if hasattr(out, "base") else out)
            for h in heads.get(unit.layer, []):
                w[:, h * unit.head_dim : (h + 1) * unit.head_dim] = 0


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_head_pruned_model_equals_dense_model_with_heads_zeroed(name, tmp_path):
    model, tok = tiny(name)
    enc = batch(tok)
    with_random_adapters(model, omega=40)
    heads = choose_heads(head_scores(model), "heads", 2)
    assert all(len(v) == 2 for v in heads.values())
    dense = __import__("copy").deepcopy(model)
    _zero_heads_dense(dense, heads)
    n_omega_before = sum(v.numel() for a in adapters_of(model).values() for v in a.sparse_values)
    prune_heads(model, heads)
    assert torch.allclose(logits(model, enc), logits(dense, enc), atol=1e-5)
    for unit in attention_units(model):
        assert unit.num_heads == 2
    n_omega_after = sum(v.numel() for a in adapters_of(model).values() for v in a.sparse_values)
    assert n_omega_after < n_omega_before  # Ω entries in removed rows were dropped
    # merged export rebuilds the shrunk shapes and gives identical logits
    export_merged(model, tok, tmp_path / "merged")
    assert torch.allclose(logits(load_merged(tmp_path / "merged"), enc), logits(model, enc), atol=1e-5)


@pytest.mark.parametrize("structured", [False, True])
def test_adapter_checkpoint_reapplies_onto_the_pretrained_model(structured, tmp_path):
    model, tok = tiny("tiny-bert", seed=0)
    enc = batch(tok)
    with_random_adapters(model)
    if structured:
        prune_heads(model, choose_heads(head_scores(model), "heads", 1))
    else:
        apply_masks(model, compute_masks(model, PruningConfig(), 0.4))
    from dsee_cli.tuning import AdapterConfig

    save_adapter(model, tmp_path / "adapter", AdapterConfig(method="dsee", rank=4, alpha=8, omega_size=5),
                 "tiny-bert")
    fresh, _ = tiny("tiny-bert", seed=0)
    apply_adapter(fresh, tmp_path / "adapter")
    assert torch.allclose(logits(fresh, enc), logits(model, enc), atol=1e-6)
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert size < 100_000


def test_heads_to_remove_out_of_range_is_a_clear_error():
    model, _ = tiny("tiny-bert")
    with_random_adapters(model)
    with pytest.raises(DSEEError, match="between 0 and 3"):
        choose_heads(head_scores(model), "heads", 4)


@pytest.mark.parametrize("removed,paper", [(0, 1.01), (3, 0.92), (6, 0.84), (9, 0.75)])
def test_flops_ratio_of_head_pruned_bert_base_is_near_the_paper(removed, paper):
    """The paper counts the adapters unmerged (its LoRA row is 1.01x); merged is 0.01 lower."""
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig())
    dense = inference_flops(model, 128)
    inject_adapters(model, LowRankConfig(rank=16, alpha=32))
    if removed:
        prune_heads(model, {layer: list(range(removed)) for layer in range(12)})
    assert inference_flops(model, 128, unmerged_adapters=True) / dense == pytest.approx(paper, abs=0.012)
    merged = inference_flops(model, 128) / dense
    assert merged == pytest.approx(1 - removed / 12 * 0.3515, abs=0.002)


def test_masked_recovery_with_dropout_drops_only_the_delta_path():
    model, _ = tiny("tiny-bert")
    adapters = with_random_adapters(model)
    apply_masks(model, compute_masks(model, PruningConfig(), 0.3))
    for a in adapters.values():
        a.dropout = torch.nn.Dropout(1.0)  # drops every input of the ΔW path
    model.train()
    with torch.no_grad():
        dropped = model.bert.encoder.layer[0].attention.self.query(torch.ones(1, 32))
        base = model.bert.encoder.layer[0].attention.self.query.base(torch.ones(1, 32))
    assert torch.allclose(dropped, base)


@pytest.mark.parametrize("granularity", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["delta", "weight"])
def test_streamed_threshold_equals_one_threshold_over_every_score_concatenated(granularity, criterion):
    """The pool's k-th score is found matrix by matrix (radix select); the masks are exactly those of
    one smallest-k over all scores concatenated (ties included: rounded scores make many)."""
    from dsee_cli.core.selection import smallest_k_mask

    model, _ = tiny("tiny-bert")
    with_random_adapters(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 20).round() / 20)  # coarse values: many ties at the threshold
    masks = compute_masks(model, PruningConfig(criterion=criterion, granularity=granularity), 0.45)
    pieces = score_pieces(model, criterion, 0)
    groups: dict = {}
    for p in pieces:
        groups.setdefault(p.pool if granularity == "global" else (p.pool, p.layer), []).append(p)
    for members in groups.values():
        scores = [p.scores() for p in members]
        flat = torch.cat([s.flatten() for s in scores])
        expected = ~smallest_k_mask(flat[None], round(0.45 * flat.numel()))[0]
        got = torch.cat([masks[p.module][p.rows[0]:p.rows[1]].flatten() for p in members])
        assert torch.equal(got, expected)


def test_masks_of_frozen_unadapted_weights_are_kept_at_one_bit_per_weight(tmp_path):
    from dsee_cli.pruning.masks import PackedMask

    model, tok = tiny("tiny-bert")
    with_random_adapters(model)
    masks = compute_masks(model, PruningConfig(), 0.4)
    apply_masks(model, masks)
    others = model.dsee_other_masks
    assert others and all(isinstance(m, PackedMask) for m in others.values())
    for name, packed in others.items():
        assert packed.bits.numel() == -(-masks[name].numel() // 8) and torch.equal(packed.unpack(), masks[name])
    merged = export_merged(model, tok, tmp_path / "merged")
    for name, mask in masks.items():
        assert bool((weight_out_in(merged.get_submodule(name))[~mask] == 0).all())
