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

from dsee_cli.errors import DSEEError
from dsee_cli.measure.accounting import trainable_counts
from dsee_cli.tuning.adapters import LowRankConfig, adapters_of, inject_adapters, omega_keys, set_omegas

from .helpers import batch, logits, tiny, with_random_adapters


def _meta_model(cls, config):
    with torch.device("meta"):
        return cls(config)


def _with_omega(model, rank, omega):
    inject_adapters(model, LowRankConfig(rank=rank, alpha=2 * rank, omega_size=omega))
    adapters = adapters_of(model)
    set_omegas(adapters, {k: torch.arange(omega) for k in omega_keys(adapters)})
    return trainable_counts(model)


@pytest.mark.parametrize(
    "cls,config,rank,low_rank,sparse",
    [
        (BertForSequenceClassification, BertConfig(), 16, 589_824, 384),
        (BertForSequenceClassification, BertConfig(), 8, 294_912, 384),
        (RobertaForSequenceClassification, RobertaConfig(hidden_size=1024, num_hidden_layers=24,
                                                          num_attention_heads=16, intermediate_size=4096), 8,
         786_432, 768),
        (GPT2ForSequenceClassification, GPT2Config(n_embd=1024, n_layer=24, n_head=16), 4, 393_216, 768),
        (GPT2ForSequenceClassification, GPT2Config(n_embd=1024, n_layer=24, n_head=16), 2, 196_608, 768),
    ],
)
def test_trainable_counts_match_the_paper(cls, config, rank, low_rank, sparse):
    counts = _with_omega(_meta_model(cls, config), rank, 16)
    assert counts.adapter_low_rank == low_rank
    assert counts.adapter_sparse == sparse
    assert counts.other == 0


def test_bert_base_total_is_590208_and_head_is_counted_apart():
    counts = _with_omega(_meta_model(BertForSequenceClassification, BertConfig(num_labels=2)), 16, 16)
    assert counts.adapter == 590_208
    assert counts.task_head == 768 * 2 + 2


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_output_at_step_zero_equals_pretrained(name):
    model, tok = tiny(name)
    enc = batch(tok)
    before = logits(model, enc)
    inject_adapters(model, LowRankConfig(rank=4, omega_size=6))
    adapters = adapters_of(model)
    set_omegas(adapters, {k: torch.arange(6) * 7 for k in omega_keys(adapters)})
    assert torch.equal(logits(model, enc), before)
    for a in adapters.values():
        assert float(a.delta_weight().abs().max()) == 0.0


def test_gpt2_adapts_only_the_q_and_v_slices_of_c_attn():
    model, tok = tiny("tiny-gpt2")
    adapters = with_random_adapters(model)
    a = adapters["transformer.h.0.attn.c_attn"]
    hidden = a.in_features
    assert a.slices == [(0, hidden), (2 * hidden, 3 * hidden)]
    delta = a.delta_weight()
    assert delta[hidden : 2 * hidden].abs().max() == 0  # k rows untouched
    assert delta[:hidden].abs().max() > 0 and delta[2 * hidden :].abs().max() > 0


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_adapter_forward_equals_merged_weight(name):
    model, tok = tiny(name)
    enc = batch(tok)
    with_random_adapters(model)
    unmerged = logits(model, enc)
    for a in adapters_of(model).values():
        a.merge()
    assert torch.allclose(logits(model, enc), unmerged, atol=1e-5)
    for a in adapters_of(model).values():
        a.unmerge()
    assert torch.allclose(logits(model, enc), unmerged, atol=1e-5)


def test_omega_zero_is_exactly_peft_lora():
    peft = pytest.importorskip("peft")
    ours, tok = tiny("tiny-bert")
    theirs, _ = tiny("tiny-bert")
    enc = batch(tok)
    inject_adapters(ours, LowRankConfig(rank=4, alpha=16, omega_size=0))
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    theirs = peft.get_peft_model(theirs, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, a in adapters_of(ours).items():
            a.lora_B[0].copy_(torch.randn(a.lora_B[0].shape, generator=gen))
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(a.lora_A[0])
            peft_layer.lora_B["default"].weight.copy_(a.lora_B[0])
    ours_out, theirs_out = logits(ours, enc), logits(theirs, enc)
    assert not torch.allclose(ours_out, logits(tiny("tiny-bert")[0], enc))  # ΔW really acts
    assert torch.allclose(ours_out, theirs_out, atol=1e-6)


def test_sparse_part_is_stored_as_n_values_not_a_dense_matrix():
    model, _ = tiny("tiny-bert")
    adapters = with_random_adapters(model, omega=5)
    for a in adapters.values():
        assert [tuple(v.shape) for v in a.sparse_values] == [(5,)]
        assert a.omega(0).dtype == torch.long and not a.omega(0).requires_grad
        dense = a.delta_weight() - (a.lora_B[0] @ a.lora_A[0]) * a.scaling
        assert int(dense.ne(0).sum()) == 5


def test_unknown_target_pattern_names_the_choices():
    model, _ = tiny("tiny-bert")
    with pytest.raises(DSEEError, match="query.*value|matches no linear layer"):
        inject_adapters(model, LowRankConfig(), ["qeury"])


def test_only_adapters_and_head_train():
    model, _ = tiny("tiny-bert")
    inject_adapters(model, LowRankConfig(rank=2))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n or "sparse_values" in n or n.startswith("classifier")) for n in names)


def test_weights_missing_from_the_checkpoint_train_with_the_head(tmp_path):
    """A checkpoint without a pooler (as sentence-transformers saves BERT) gets a fresh one: it must train."""
    from transformers import BertModel

    from dsee_cli.core.models import load_model

    model, _ = tiny("tiny-bert")
    base = BertModel(model.config, add_pooling_layer=False)
    base.save_pretrained(tmp_path)
    loaded = load_model("local", str(tmp_path), 2, seed=0).model
    assert "bert.pooler.dense.weight" in loaded.dsee_fresh_params
    inject_adapters(loaded, LowRankConfig(rank=2))
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= trainable
    assert "bert.encoder.layer.0.attention.self.query.base.weight" not in trainable


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_gradients_reach_a_b_and_the_sparse_values(name):
    model, tok = tiny(name)
    adapters = with_random_adapters(model, omega=6)
    enc = batch(tok)
    model.train()
    model(**enc, labels=torch.tensor([0, 1, 0])).loss.backward()
    for a in adapters.values():
        for p in a.adapter_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize("trained,setting,trains", [(False, None, True), (True, None, False), (False, False, False),
                                                    (True, True, True)])
def test_a_pooler_the_checkpoint_never_trained_trains_with_the_head(tmp_path, trained, setting, trains):
    """all-MiniLM-L6-v2 ships a pooler whose bias is all zeros (sentence-transformers pool by mean):
    frozen, it would be a random projection in front of the head. model.train_pooler decides."""
    from transformers import BertModel

    from dsee_cli.core.models import load_model

    model, _ = tiny("tiny-bert")
    base = BertModel(model.config)
    torch.nn.init.zeros_(base.pooler.dense.bias)
    if trained:
        torch.nn.init.constant_(base.pooler.dense.bias, 0.1)
    base.save_pretrained(tmp_path)
    loaded = load_model("local", str(tmp_path), 2, seed=0, train_pooler=setting).model
    assert ("bert.pooler.dense.weight" in loaded.dsee_fresh_params) is trains


@pytest.mark.parametrize("scale", ["none", "lowrank"])
def test_the_sparse_term_is_scaled_as_configured_in_the_forward_and_the_merged_weight(scale):
    """ΔW = (α/r)·B·A + c·P_Ω(S) with c = 1 (none) or α/r (lowrank: the reference code). Checked
    against ΔW written out by hand, and the forward against F.linear with W + ΔW (fp32: 1e-5)."""
    model, tok = tiny("tiny-bert")
    inject_adapters(model, LowRankConfig(rank=4, alpha=32, omega_size=3, sparse_scale=scale))
    adapters = adapters_of(model)
    gen = torch.Generator().manual_seed(0)
    set_omegas(adapters, {key: torch.tensor([0, 7, 40]) for key in omega_keys(adapters)})
    with torch.no_grad():
        for a in adapters.values():
            for p in a.adapter_parameters():  # ΔW of the size of W, so fp32 sums stay within 1e-5
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    c = 8.0 if scale == "lowrank" else 1.0  # α/r = 32/4
    x = torch.randn(2, 5, 32, generator=gen)
    for a in adapters.values():
        by_hand = (a.lora_B[0] @ a.lora_A[0]) * 8.0
        by_hand.view(-1)[torch.tensor([0, 7, 40])] += c * a.sparse_values[0]
        assert torch.allclose(a.delta_weight(), by_hand, atol=1e-5)
        expected = torch.nn.functional.linear(x, a.base.weight + by_hand, a.base.bias)
        assert torch.allclose(a(x), expected, atol=1e-5)
    enc = batch(tok)
    unmerged = logits(model, enc)
    for a in adapters.values():
        a.merge()
    assert torch.allclose(logits(model, enc), unmerged, atol=1e-5)


def test_the_paper_profile_scales_the_sparse_term_as_the_reference_code():
    from .helpers import compose

    assert compose("profile=paper").adapter.sparse_scale == "lowrank"
    assert compose().adapter.sparse_scale == "none"
    with pytest.raises(DSEEError, match="adapter.sparse_scale"):
        LowRankConfig(sparse_scale="alpha").check()


def test_a_target_that_does_not_exist_fails_before_any_weights_load(tmp_path):
    """preflight builds the architecture on the meta device: seconds, whatever the model's size."""
    import time

    from dsee_cli.run.pipeline import preflight

    from .helpers import compose

    model, tok = tiny("tiny-bert")
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()  # no weights at all: only the architecture is read
    for extra in ([], [f"model.path={tmp_path / 'model'}"]):
        started = time.perf_counter()
        with pytest.raises(DSEEError, match="no_such_module.*matches no linear layer"):
            preflight(compose("adapter.targets=[no_such_module]", *extra))
        assert time.perf_counter() - started < 5.0
