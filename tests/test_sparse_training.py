"""PST, MaP and MvP: the cubic schedule, exact mask sparsity at every update, gradients through
the straight-through estimator, the paper's trainable counts, and the sparse export."""

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from dsee_cli.errors import DSEEError
from dsee_cli.measure.accounting import scope_size, trainable_counts
from dsee_cli.run.export import export_merged, load_merged
from dsee_cli.tuning import AdapterConfig, prepare_method
from dsee_cli.tuning.sparse_training import ScheduleConfig, SparseTrainingConfig, sparse_layers, update_masks

from .helpers import batch, logits, tiny


def test_cubic_schedule_at_start_warmup_end_middle_and_end():
    s = ScheduleConfig(initial=0.0, warmup=0.1, cooldown=0.3, every=1)
    total = 1000
    assert s.at(0, total, 0.9) == 0.0
    assert s.at(99, total, 0.9) == 0.0  # warm-up: the first 10 % of the steps
    assert s.at(100, total, 0.9) == 0.0  # the ramp starts at the initial value
    assert s.at(400, total, 0.9) == pytest.approx(0.9 - 0.9 * 0.5**3)  # halfway through the ramp
    assert s.at(700, total, 0.9) == 0.9 and s.at(999, total, 0.9) == 0.9  # cool-down: the last 30 %
    values = [s.at(t, total, 0.9) for t in range(total)]
    assert all(a <= b for a, b in zip(values, values[1:]))  # never decreases
    coarse = ScheduleConfig(every=50)
    assert len({coarse.at(t, total, 0.9) for t in range(total)}) <= 600 // 50 + 2  # changes every 50 steps only


def test_bad_schedules_are_clear_errors():
    with pytest.raises(DSEEError, match="warmup"):
        ScheduleConfig(warmup=0.5, cooldown=0.5).check(0.9)
    with pytest.raises(DSEEError, match="initial"):
        ScheduleConfig(initial=0.5).check(0.3)


def _pst(name="tiny-bert", **kw):
    model, tok = tiny(name)
    prepare_method(model, AdapterConfig(method="pst", sparse_training=SparseTrainingConfig(**kw)))
    return model, tok


@pytest.mark.parametrize("method", ["pst", "map", "mvp"])
@pytest.mark.parametrize("topk", ["layer", "global"])
def test_mask_sparsity_equals_the_schedule_at_every_update(method, topk):
    model, tok = tiny()
    prepare_method(model, AdapterConfig(method=method, sparse_training=SparseTrainingConfig(topk=topk)))
    schedule = ScheduleConfig(every=3)
    total, updates = 40, 0
    for step in range(total):
        target = schedule.at(step + 1, total, 0.8)
        if update_masks(model, target, topk):
            updates += 1
            layers = sparse_layers(model).values()
            pruned = [int((~m.mask).sum()) for m in layers]
            sizes = [m.mask.numel() for m in layers]
            if topk == "layer":
                assert pruned == [round(target * n) for n in sizes]
            else:
                assert sum(pruned) == round(target * sum(sizes))
            assert all(m.sparsity == target for m in layers)
    assert updates >= 3 and schedule.at(total, total, 0.8) == 0.8


def test_on_change_keeps_the_mask_while_the_sparsity_holds():
    model, _ = _pst()
    update_masks(model, 0.5)
    layer = next(iter(sparse_layers(model).values()))
    before = layer.mask.clone()
    with torch.no_grad():
        layer.R.add_(torch.randn_like(layer.R) * 10)  # the scores move...
    assert not update_masks(model, 0.5)  # ...but on_change waits for the schedule
    assert torch.equal(layer.mask, before)


@pytest.mark.parametrize("refresh,changes", [("every", True), ("on_change", False)])
def test_a_score_change_during_the_cool_down_changes_the_mask(refresh, changes):
    """The training loop's hook (run.pipeline): in the cool-down the sparsity holds at its final
    value; with refresh=every the top-v of the moved scores is taken again every `every` steps."""
    from dsee_cli.run.pipeline import Run
    from dsee_cli.run.train import ProgressSink

    from .helpers import compose

    cfg = compose("adapter=pst", "sparsity=0.5", f"adapter.sparse_training.schedule.refresh={refresh}",
                  "adapter.sparse_training.schedule.every=2")
    run = Run(cfg, Path("unused"), ProgressSink(), lambda text: None)
    run.model, run.method, run.pruning = tiny()[0], cfg.adapter, cfg.pruning
    prepare_method(run.model, cfg.adapter)
    before_step = run.hooks("phase1").before_step
    total = 100
    before_step(80, total)  # step 81 of 100: in the cool-down (the last 30 %)
    layer = next(iter(sparse_layers(run.model).values()))
    assert layer.sparsity == 0.5
    before = layer.mask.clone()
    with torch.no_grad():
        layer.R.add_(torch.randn(layer.R.shape, generator=torch.Generator().manual_seed(0)) * 10)
    before_step(82, total)
    assert layer.sparsity == 0.5 and int((~layer.mask).sum()) == int((~before).sum())  # still 50 %
    assert (not torch.equal(layer.mask, before)) == changes


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_gradients_reach_u_v_a_b_r_c_through_the_straight_through_estimator(name):
    model, tok = _pst(name)
    update_masks(model, 0.5)
    enc = batch(tok)
    labels = torch.tensor([0, 1, 1])
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=0.5)
    for _ in range(2):  # U = 0 and B = 0 at the start (W = W₀, equal importance); one step moves them
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
    opt.zero_grad()
    model(**enc, labels=labels).loss.backward()
    for layer_name, layer in sparse_layers(model).items():
        for t in ("U", "V", "A", "B", "R", "C"):
            grad = getattr(layer, t).grad
            assert grad is not None and grad.abs().sum() > 0, f"{layer_name}.{t} got no gradient"


def test_the_forward_uses_the_masked_weight():
    model, tok = _pst()
    enc = batch(tok)
    dense = logits(model, enc)
    update_masks(model, 0.0)
    assert torch.allclose(logits(model, enc), dense, atol=1e-6)  # U = 0: W = W₀, nothing masked
    update_masks(model, 0.6)
    assert not torch.allclose(logits(model, enc), dense)
    total, nonzero = scope_size(model)
    assert nonzero == total - sum(round(0.6 * m.mask.numel()) for m in sparse_layers(model).values())


@pytest.mark.parametrize("cls,config,per_matrix_total,paper", [
    # PST Table 2: 2.91M (BERT-base), 7.77M (RoBERTa-large). (n + k)(r1 + r2 + 1) over every block
    # linear gives 2.82M / 7.52M; with the blocks' biases trained too it is 2.90M / 7.74M.
    (BertForSequenceClassification, BertConfig(), 2_820_096, 2.91),
    (RobertaForSequenceClassification,
     RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
     7_520_256, 7.77),
])
def test_pst_trainable_count_is_n_plus_k_times_r1_r2_1(cls, config, per_matrix_total, paper):
    with torch.device("meta"):
        model = cls(config)
    prepare_method(model, AdapterConfig(method="pst"))
    counts = trainable_counts(model)
    expected = sum((m.out_features + m.in_features) * (8 + 8 + 1) for m in sparse_layers(model).values())
    assert counts.other == expected == per_matrix_total
    assert abs(per_matrix_total / 1e6 - paper) / paper < 0.04


def test_pst_export_holds_the_sparse_final_weights(tmp_path):
    model, tok = _pst()
    enc = batch(tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    update_masks(model, 0.7)
    expected = logits(model, enc)
    export_merged(model, tok, tmp_path / "merged")
    merged = load_merged(tmp_path / "merged")
    assert torch.allclose(logits(merged, enc), expected, atol=1e-5)
    total, nonzero = scope_size(merged)
    assert nonzero <= round(0.3 * total) + 1


def test_mvp_scores_start_at_the_weight_magnitudes():
    model, _ = tiny()
    prepare_method(model, AdapterConfig(method="mvp"))
    layer = next(iter(sparse_layers(model).values()))
    assert torch.equal(layer.scores.detach(), layer.base.weight.detach().abs())
    assert layer.base.weight.requires_grad and layer.scores.requires_grad


@pytest.mark.parametrize("method,expected", [("map", 109_482_240), ("mvp", 109_482_240 + 84_934_656)])
def test_map_and_mvp_counts_match_the_pst_paper(method, expected):
    # PST Table 2, BERT-base: MaP 110.00M (every weight), MvP 194.93M (every weight + a score per block weight)
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig())
    prepare_method(model, AdapterConfig(method=method))
    assert trainable_counts(model).other == expected
