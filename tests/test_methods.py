"""The baselines: what each method trains (with the paper's parameter counts on models built
from configs), that added modules start as the identity, and that their pruning and export
paths keep the function the model computes."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from dsee_cli.core.arch import block_linears, weight_out_in
from dsee_cli.errors import DSEEError
from dsee_cli.measure.accounting import inference_flops, trainable_counts
from dsee_cli.pruning import PruningConfig, apply_masks, compute_masks, reapply_masks
from dsee_cli.pruning.slimming import add_slimming, slim_and_prune
from dsee_cli.run.export import apply_adapter, export_merged, load_merged, save_adapter
from dsee_cli.tuning import AdapterConfig, BottleneckConfig, PromptConfig, prepare_method

from .helpers import batch, logits, tiny, with_random_adapters

ROBERTA_LARGE = RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
GPT2_MEDIUM = GPT2Config(n_embd=1024, n_layer=24, n_head=16)


def _counts(cls, config, **settings):
    with torch.device("meta"):
        model = cls(config)
    prepare_method(model, AdapterConfig(**settings))
    return trainable_counts(model)


@pytest.mark.parametrize(
    "cls,config,settings,expected,paper",
    [
        # Table 3 (BERT-base): Fine-tune 110M, BitFit 0.1M, P-tuning v2 0.3M
        (BertForSequenceClassification, BertConfig(), {"method": "full"}, 109_482_240, "110M"),
        (BertForSequenceClassification, BertConfig(), {"method": "bitfit"}, 102_912, "0.1M"),
        (BertForSequenceClassification, BertConfig(), {"method": "ptuning-v2", "prompt": PromptConfig(length=16)},
         294_912, "0.3M"),
        # Table 5 (RoBERTa-large): Adapter 0.8M (Houlsby, bottleneck 8), Fine-tune 355M
        (RobertaForSequenceClassification, ROBERTA_LARGE, {"method": "houlsby", "bottleneck": BottleneckConfig(size=8)},
         835_968, "0.8M"),
        (RobertaForSequenceClassification, ROBERTA_LARGE, {"method": "full"}, 354_310_144, "355.0M"),
        # Table 4 (GPT-2 medium): FT-Top2 25.19M (two blocks + the final LayerNorm), Fine-tune 354.92M
        (GPT2ForSequenceClassification, GPT2_MEDIUM, {"method": "ft-top", "top_layers": 2}, 25_194_496, "25.19M"),
        (GPT2ForSequenceClassification, GPT2_MEDIUM, {"method": "full"}, 354_823_168, "354.92M"),
    ],
)
def test_baseline_counts_match_the_paper(cls, config, settings, expected, paper):
    counts = _counts(cls, config, **settings)
    assert counts.other == expected  # the method's own tensors; the task head is counted apart
    assert abs(expected / 1e6 - float(paper.rstrip("M"))) <= 0.05 * float(paper.rstrip("M"))  # as the paper rounds
    assert counts.adapter == 0


def test_bitfit_trains_only_biases_and_the_head():
    model, _ = tiny()
    prepare_method(model, AdapterConfig(method="bitfit"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(".bias") or n.startswith("classifier.") for n in trained)
    assert "classifier.weight" in trained


def test_ft_top_trains_the_last_blocks_only():
    model, _ = tiny()
    prepare_method(model, AdapterConfig(method="ft-top", top_layers=1))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("bert.encoder.layer.1.") for n in trained)
    assert not any(n.startswith(("bert.encoder.layer.0.", "bert.embeddings.")) for n in trained)
    with pytest.raises(DSEEError, match="top_layers=5 is out of range"):
        prepare_method(tiny()[0], AdapterConfig(method="ft-top", top_layers=5))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["houlsby", "mam"])
def test_added_adapters_start_as_the_identity_and_then_learn(name, method):
    model, tok = tiny(name)
    enc = batch(tok)
    before = logits(model, enc)
    prepare_method(model, AdapterConfig(method=method, bottleneck=BottleneckConfig(size=4),
                                        prompt=PromptConfig(length=3)))
    if method == "houlsby":
        assert torch.allclose(logits(model, enc), before, atol=1e-6)  # up-projections start at 0
    model.train()
    labels = torch.tensor([0, 1, 1])
    model(**enc, labels=labels).loss.backward()
    added = {n: p for n, p in model.named_parameters() if p.requires_grad and ".up." in n}
    assert added and all(p.grad is not None and p.grad.abs().sum() > 0 for p in added.values())
    # the pruning scope and FLOPs see only the pretrained layers
    assert not any(".houlsby." in n or ".mam." in n for n in block_linears(model))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_prefix_prompts_reach_every_layer_and_get_gradients(name):
    model, tok = tiny(name)
    enc = batch(tok)
    before = logits(model, enc)
    prepare_method(model, AdapterConfig(method="ptuning-v2", prompt=PromptConfig(length=4)))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    prompt = [p for n, p in trained.items() if n.startswith("prefix_encoder.")]
    assert len(prompt) == 1 and prompt[0].shape == (4, 2 * 2 * 32)  # 4 tokens x layers x (k, v) x hidden
    model(**enc, labels=torch.tensor([0, 1, 1])).loss.backward()
    assert prompt[0].grad.abs().sum() > 0
    with torch.no_grad():
        prompt[0].zero_()
    assert not torch.allclose(logits(model, enc), before)  # zero keys still take attention mass


def test_prompt_methods_refuse_head_pruning():
    from dsee_cli.config import RunConfig, validate

    cfg = RunConfig()
    cfg.adapter.method, cfg.adapter.omega_size, cfg.pruning.method = "ptuning-v2", 0, "structured"
    with pytest.raises(DSEEError, match="prompts"):
        validate(cfg)


def test_imp_rounds_are_nested_with_exact_sparsity():
    model, _ = tiny()
    with_random_adapters(model)
    scope = block_linears(model)
    total = sum(weight_out_in(m.base if hasattr(m, "base") else m).numel() for m in scope.values())
    settings = PruningConfig(method="imp", rounds=3, rate=0.1, criterion="delta_plus_weight")
    previous = None
    for target in settings.round_sparsities(0.3):
        masks = compute_masks(model, settings, target)
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert abs(pruned - target * total) <= 2  # two pools, each rounded once
        if previous is not None:
            assert all(bool((masks[n] <= previous[n]).all()) for n in masks)  # pruned stays pruned
        apply_masks(model, masks)
        previous = masks
    assert [round(s, 4) for s in settings.round_sparsities(0.3)] == [0.1, 0.19, 0.271]


def test_adapted_scope_prunes_only_the_adapted_matrices():
    model, _ = tiny()
    adapters = with_random_adapters(model)
    masks = compute_masks(model, PruningConfig(scope="adapted"), 0.5)
    adapted = torch.cat([m.flatten() for n, m in masks.items() if n in adapters])
    assert int((~adapted).sum()) == adapted.numel() // 2  # the adapted pool: exactly half, globally
    assert all(bool(m.all()) for n, m in masks.items() if n not in adapters)


def test_full_fine_tuning_keeps_pruned_weights_at_zero():
    model, tok = tiny()
    prepare_method(model, AdapterConfig(method="full"))
    apply_masks(model, compute_masks(model, PruningConfig(), 0.5))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch(tok), labels=torch.tensor([0, 1, 1])).loss.backward()
    opt.step()
    reapply_masks(model)
    for name, mask in model.dsee_other_masks.items():
        assert bool((weight_out_in(model.get_submodule(name))[~mask] == 0).all())


@pytest.mark.parametrize("name,heads", [("tiny-bert", 1), ("tiny-gpt2", 1), ("tiny-llama", 2)])
def test_earlybert_pruned_model_equals_the_slimmed_one(name, heads, tmp_path):
    """tiny-llama: 4 query heads over 2 key/value heads, one query head from each group; SwiGLU channels."""
    model, tok = tiny(name)
    enc = batch(tok)
    prepare_method(model, AdapterConfig(method="full"))
    add_slimming(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("dsee_slim"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                if p.numel() == 4:  # a layer's heads: one from each of `heads` groups goes
                    p[torch.arange(heads) * (4 // heads) + int(torch.randint(4 // heads, (1,), generator=gen))] = 0.0
                else:  # FFN units: the ones to go
                    p[torch.randperm(p.numel(), generator=gen)[: p.numel() // 4]] = 0.0
    expected = logits(model, enc)
    dense_flops = inference_flops(model, 128)
    info = slim_and_prune(model, heads_to_remove=heads, ffn_fraction=0.25)
    assert all(len(v) == heads for v in info["heads_removed"].values())
    assert all(v == 16 for v in info["ffn_removed"].values())  # 25 % of 64 neurons
    assert not any("dsee_slim" in n for n, _ in model.named_parameters())
    assert torch.allclose(logits(model, enc), expected, atol=1e-5)
    assert inference_flops(model, 128) < 0.8 * dense_flops
    export_merged(model, tok, tmp_path / "merged")
    assert torch.allclose(logits(load_merged(tmp_path / "merged"), enc), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["houlsby", "ptuning-v2", "bitfit"])
def test_method_export_reapplies_onto_the_pretrained_model(method, tmp_path):
    model, tok = tiny(seed=0)
    enc = batch(tok)
    settings = AdapterConfig(method=method, bottleneck=BottleneckConfig(size=4), prompt=PromptConfig(length=3))
    prepare_method(model, settings)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    apply_masks(model, compute_masks(model, PruningConfig(), 0.3))
    save_adapter(model, tmp_path / "adapter", settings, "tiny-bert")
    fresh, _ = tiny(seed=0)
    apply_adapter(fresh, tmp_path / "adapter")
    assert torch.allclose(logits(fresh, enc), logits(model, enc), atol=1e-6)


def test_a_tuning_method_is_one_registration():
    """A new method (here: the task head only) is declared once and prepare_method runs it."""
    from dsee_cli.core.models import load_model
    from dsee_cli.tuning import TUNING_METHODS, AdapterConfig, TuningMethod, prepare_method, register

    def head_only(model, settings):
        for p in model.parameters():
            p.requires_grad_(False)

    register(TuningMethod("head-only", "training the task head", head_only, merges=True))
    try:
        model = load_model("tiny-bert", None, 2, seed=0).model
        prepare_method(model, AdapterConfig(method="head-only"))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(n.startswith("classifier") for n in trained)
    finally:
        del TUNING_METHODS["head-only"]


def test_a_pruning_method_is_one_registration():
    """A new pruner (here: the first half of each row's inputs removed) is declared once; the config
    accepts its name and the run's prune step calls it (docs/extending.md shows this one)."""
    from dsee_cli.core.arch import block_linears, weight_out_in
    from dsee_cli.core.models import load_model
    from dsee_cli.pruning import PRUNERS, Pruner, PruningConfig, apply_masks, register

    def first_half(model, settings, sparsity, seed, rewind, calibration) -> dict:
        masks = {}
        for name, module in block_linears(model).items():
            w = weight_out_in(getattr(module, "base", module))
            keep = torch.ones_like(w, dtype=torch.bool)
            keep[:, : w.shape[1] // 2] = False
            masks[name] = keep
        apply_masks(model, masks, settings.mask_delta)
        return {"method": settings.method, "sparsity": 0.5}

    register(Pruner("first-half", "first-half pruning", first_half))
    try:
        settings = PruningConfig(method="first-half")
        settings.check(0.5)
        model = load_model("tiny-bert", None, 2, seed=0).model
        info = settings.pruner.prune(model, settings, 0.5, 0, lambda: None, lambda: ([], {}))
        w = next(iter(block_linears(model).values())).weight
        assert info["sparsity"] == 0.5 and not bool(w[:, : w.shape[1] // 2].any()) and bool(w[:, -1].all())
    finally:
        del PRUNERS["first-half"]
