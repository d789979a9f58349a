"""Structured pruning as the deployment path (issue 35): servable shapes, hidden-width (residual)
pruning, activation scores, and exports that plain transformers loads."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from dsee_cli.core.arch import attention_units, hidden_width, mlp_units, weight_out_in
from dsee_cli.core.models import TinySize, load_model
from dsee_cli.errors import DSEEError
from dsee_cli.pruning import PruningConfig, choose_heads, prune_ffn, prune_heads, structure_plan
from dsee_cli.pruning.residual import activation_scores, prune_hidden, residual_sites
from dsee_cli.pruning.shapes import plan_shapes
from dsee_cli.run.export import export_merged, load_merged

from .helpers import with_random_adapters

SIZE = TinySize(hidden=64, layers=2, heads=8, kv_heads=2, intermediate=48, dropout=0.0)
DECODERS = ["tiny-llama", "tiny-qwen2"]  # Llama unties its LM head, Qwen2 ties it


def decoder(name: str, seed: int = 0):
    lm = load_model(name, None, 2, seed, SIZE, causal_lm=True)
    return lm.model.eval(), lm.tokenizer


def enc(tok):
    return tok(["w1 w2 w3 w4 w5", "w7 w9 w11", "w5 w6 w8 w10 w12 w14"], padding=True, return_tensors="pt")


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def meta_model(config_class, hidden=4096, heads=32, kv=8, ffn=14336, head_dim=128):
    config = config_class(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=ffn, head_dim=head_dim, vocab_size=128)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# -- servable shapes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_class,kept", [(LlamaConfig, 16), (Qwen2Config, 24), (Qwen3Config, 24),
                                               (MistralConfig, 24)])
def test_servable_heads_follow_the_config_class_not_the_family_name(config_class, kept):
    """25 % of Llama-3-8B's 32 heads: 24 do not divide 4096, which LlamaConfig refuses (16 kept, the
    nearer of 16 and 32 on a tie keeping fewer); Qwen2's, Qwen3's and Mistral's accept 24."""
    plan = plan_shapes(meta_model(config_class), "query-heads", 8, 0.0, 0.0, "servable", 64)
    assert (plan.heads, plan.kv_heads) == (kept, 8)
    assert bool(plan.notes) == (kept != 24)
    if plan.notes:
        assert "24 query heads do not divide" in plan.notes[0] and "16 kept per layer" in plan.notes[0]
    # with the hidden width pruned to 3072 as well, 24 heads divide it: LlamaConfig accepts them
    plan = plan_shapes(meta_model(config_class), "query-heads", 8, 0.0, 0.25, "servable", 64)
    assert (plan.heads, plan.hidden) == (24, 3072) and not plan.notes


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config, Qwen3Config, MistralConfig])
def test_servable_widths_are_multiples_of_multiple_of_and_a_request_that_fits_is_kept(config_class):
    model = meta_model(config_class, hidden=576, heads=9, kv=3, ffn=1536, head_dim=64)  # SmolLM2-135M's shapes
    fits = plan_shapes(model, "query-heads", 3, 0.25, 0.0, "servable", 64)  # 1152 = 18 x 64 kept: exact
    assert (fits.heads, fits.channels, fits.hidden, fits.notes) == (6, 1152, 576, [])
    rounded = plan_shapes(model, "query-heads", 3, 0.2, 0.25, "servable", 64)
    assert rounded.channels == 1216 and "1229 kept is not a multiple of pruning.multiple_of=64" in rounded.notes[0]
    # the hidden size: a multiple of 64, and under LlamaConfig of the 6 kept heads too (lcm 192)
    assert rounded.hidden == (384 if config_class is LlamaConfig else 448)
    free = plan_shapes(model, "query-heads", 3, 0.2, 0.25, "free", 64)
    assert (free.channels, free.hidden, free.notes) == (1229, 432, [])


def test_servable_kv_groups_and_nothing_left_to_remove_are_stated():
    model = meta_model(LlamaConfig, hidden=576, heads=9, kv=3, ffn=1536, head_dim=64)
    plan = plan_shapes(model, "kv-group", 3, 0.0, 0.0, "servable", 64)
    assert (plan.heads, plan.kv_heads) == (6, 2)
    nine = plan_shapes(model, "query-heads", 0, 0.0, 0.1, "servable", 64)  # lcm(9, 64) = 576: no smaller width
    assert nine.hidden == 576 and "(nothing removed)" in nine.notes[0]


@pytest.mark.parametrize("settings,message", [
    ({"ffn_channels": 48}, "would remove every one of the 48 MLP channels"),
    ({"hidden_channels": 0.9999}, "would remove every one of the 64 hidden channels"),
    ({"hidden_channels": 64}, "would remove every one of the 64 hidden channels"),
])
def test_a_request_that_removes_every_unit_is_refused(settings, message):
    model, _ = decoder("tiny-llama")
    s = PruningConfig(method="structured", criterion="weight", heads_to_remove=0, shapes="free", **settings)
    with pytest.raises(DSEEError, match=message):
        structure_plan(model, s)


def test_servable_on_a_family_without_config_fields_and_hidden_width_on_bert_are_refused():
    bert = load_model("tiny-bert", None, 2, 0, TinySize()).model
    with pytest.raises(DSEEError, match="has no field for the pruned heads.*pruning.shapes=free"):
        structure_plan(bert, PruningConfig(method="structured", criterion="weight", heads_to_remove=1,
                                           shapes="servable"))
    with pytest.raises(DSEEError, match="bert family's blocks cannot shrink their residual width"):
        structure_plan(bert, PruningConfig(method="structured", criterion="weight", heads_to_remove=0,
                                           hidden_channels=0.25, shapes="free"))
    auto = structure_plan(bert, PruningConfig(method="structured", criterion="weight", heads_to_remove=1))
    assert auto.shapes == "free"  # BERT's config cannot state pruned heads: free by default


# -- hidden width ---------------------------------------------------------------------------------------------

def masked_reference(model, removed: list[int]):
    """The dense model computing what hidden-channel pruning computes: every RMSNorm masks the removed channels
    out of its input and takes its mean square over the kept channels only (sum / kept count, not the mean over
    all channels), and masks its output. Removed channels then never reach a kept one: each block reads the stream
    through a norm, and the LM head through the final one."""
    ref = copy.deepcopy(model)
    mask = torch.ones(hidden_width(model))
    mask[removed] = 0
    kept = int(mask.sum())

    def masked_norm(norm):
        def forward(x):
            x32 = x.float() * mask
            var = x32.pow(2).sum(-1, keepdim=True) / kept
            return (norm.weight * (x32 * torch.rsqrt(var + norm.variance_epsilon)).to(x.dtype)) * mask
        return forward

    for name in residual_sites(ref).norms:
        norm = ref.get_submodule(name)
        norm.forward = masked_norm(norm)
    return ref


@pytest.mark.parametrize("name", DECODERS)
def test_hidden_pruning_equals_the_masked_dense_model_and_exports_a_plain_model(name, tmp_path):
    model, tok = decoder(name)
    with_random_adapters(model, targets=["q", "k", "v", "o", "gate", "up", "down"])
    removed = [1, 5, 6, 17, 30, 31, 40, 63]
    ref = masked_reference(model, removed)
    prune_hidden(model, torch.tensor([i for i in range(64) if i not in removed]))
    inputs = enc(tok)
    assert hidden_width(model) == 56
    assert torch.allclose(logits(model, inputs), logits(ref, inputs), atol=1e-5)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name == "tiny-qwen2")
    merged = export_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # no dsee code: the config states 56
    assert (plain.config.hidden_size, plain.config.head_dim) == (56, 8)
    assert torch.allclose(logits(plain, inputs), logits(ref, inputs), atol=1e-5)
    assert torch.allclose(logits(merged, inputs), logits(plain, inputs), atol=1e-6)


@pytest.mark.parametrize("name", DECODERS)
def test_heads_channels_and_hidden_in_one_step_export_one_shape_for_every_layer(name, tmp_path):
    model, tok = decoder(name)
    with_random_adapters(model, targets=["q", "v"])
    scores = activation_scores(model, [dict(enc(tok))])
    assert scores.tokens == int(enc(tok)["attention_mask"].sum())
    heads = choose_heads(scores.heads, "query-heads", 4)
    channels = {layer: sorted(torch.argsort(c)[:16].tolist()) for layer, c in enumerate(scores.channels)}
    hidden_keep = torch.sort(torch.argsort(scores.hidden, descending=True)[:48]).values
    prune_heads(model, heads)
    prune_ffn(model, channels)
    prune_hidden(model, hidden_keep)
    export_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads, plain.config.intermediate_size,
            plain.config.hidden_size) == (4, 2, 32, 48)
    shapes = {(tuple(weight_out_in(plain.get_submodule(u.q[0])).shape), u.num_heads) for u in attention_units(plain)}
    assert shapes == {((32, 48), 4)} and {u.channels for u in mlp_units(plain)} == {32}
    inputs = enc(tok)
    assert torch.allclose(logits(plain, inputs), logits(model, inputs), atol=1e-5)


def test_free_shapes_that_the_config_refuses_are_replayed_by_load_merged(tmp_path):
    """Llama with 4 heads kept and a hidden size of 50: LlamaConfig refuses 50 % 4; the export keeps the dense
    config with the removed units recorded, and load_merged rebuilds the shapes."""
    model, tok = decoder("tiny-llama")
    with_random_adapters(model, targets=["q", "v"])
    prune_heads(model, {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]})
    prune_hidden(model, torch.arange(50))
    export_merged(model, tok, tmp_path / "merged")
    loaded = load_merged(tmp_path / "merged")
    assert hidden_width(loaded) == 50 and loaded.config.dsee_pruned_hidden == list(range(50, 64))
    inputs = enc(tok)
    assert torch.allclose(logits(loaded, inputs), logits(model, inputs), atol=1e-5)
    from dsee_cli.run.evaluation import load_as_served

    served, how = load_as_served(tmp_path / "merged")  # --speed times it as dsee loads it, and says so
    assert how.startswith("load_merged (pruning.shapes=free") and hidden_width(served) == 50


def test_activation_scores_rank_a_silenced_unit_last():
    """A head whose v rows are zero outputs nothing; a channel whose up row is zero likewise; a residual channel
    nothing writes (its embedding column and its o, down rows zero): each scores 0 and is the first removed. A
    head whose o_proj columns are zero contributes nothing either, however large its output."""
    model, tok = decoder("tiny-llama")
    sites = residual_sites(model)
    with torch.no_grad():
        unit = attention_units(model)[1]
        model.get_submodule(unit.v[0]).weight[: unit.head_dim] = 0  # key/value head 0: query heads 0-3 silent
        model.get_submodule(unit.output).weight[:, 5 * unit.head_dim:6 * unit.head_dim] = 0  # head 5 unread
        model.get_submodule(mlp_units(model)[0].expand[1]).weight[7] = 0
        model.get_submodule(sites.embedding).weight[:, 11] = 0
        for name in sites.writers:
            model.get_submodule(name).weight[11] = 0
    scores = activation_scores(model, [dict(enc(tok))])
    assert scores.heads.q[1, [0, 1, 2, 3, 5]].abs().max() < 1e-6 < scores.heads.q[1, [4, 6, 7]].min()
    assert torch.argmin(scores.channels[0]) == 7 and scores.hidden[11] < 1e-6 < scores.hidden[:11].min()


# -- recovery by distillation ---------------------------------------------------------------------------------

def _lm_batch(tok):
    inputs = dict(enc(tok))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return {**inputs, "labels": labels}


@pytest.mark.parametrize("name", DECODERS)
def test_the_distillation_term_is_zero_for_an_equal_teacher_and_trains_only_what_trains(name):
    from dsee_cli.data.generation import lm_loss
    from dsee_cli.run.distill import distill_lm_loss, share_frozen

    model, tok = decoder(name)
    with_random_adapters(model, targets=["q", "v"])
    teacher = copy.deepcopy(model)
    shared, extra = share_frozen(teacher, model)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert shared == frozen and extra == sum(p.numel() * p.element_size() for p in model.parameters()
                                             if p.requires_grad)  # only the adapters (and Ω values) are copies
    batch = _lm_batch(tok)
    model.train()
    for m in model.modules():  # no dropout: the student computes what the teacher does
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    plain = lm_loss(model, batch)
    with_kl = distill_lm_loss(model, teacher, batch, 0.0, 5.0, 2.0)
    assert torch.allclose(with_kl, plain, atol=1e-6)  # KL(p ‖ p) = 0
    with torch.no_grad():  # move the student: now the term is positive
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.5)
    loss = distill_lm_loss(model, teacher, batch, 0.0, 5.0, 2.0)
    assert loss > lm_loss(model, batch) + 1e-4
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and grads <= {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.slow
def test_a_structured_run_with_distillation_exports_a_plain_smaller_model(tmp_path):
    """tiny-llama: phase I, heads + channels + hidden width by activations (the decoders' default) to servable
    shapes, recovery with distillation, an export plain from_pretrained loads with the logits of the run's model."""
    from dsee_cli.run.export import load_merged

    from .helpers import run_in_process

    said: list[str] = []
    metrics = run_in_process(tmp_path / "run", "model=tiny-llama", "model.tiny.hidden=64", "model.tiny.heads=4",
                             "model.tiny.kv_heads=2", "model.tiny.intermediate=64", "model.tiny.dropout=0",
                             "task=pydoc",
                             "pruning=structured", "pruning.unit=query-heads", "pruning.head_fraction=0.25",
                             "pruning.ffn_channels=0.3", "pruning.hidden_channels=0.3", "pruning.multiple_of=16",
                             "trainer.recovery.distill=true", "trainer.recovery.temperature=2", "model.dtype=float32",
                             messages=said)
    p = metrics["pruning"]
    assert (p["criterion"], p["shapes"], p["hidden_size"], p["ffn_channels_per_layer"]) == \
        ("activation", "servable", 48, 48)  # 45 kept of each, rounded to multiples of 16
    assert p["heads_per_layer"] == {"0": [2, 2], "1": [2, 2]}  # 1 of 4 asked: one from each of the 2 groups
    assert sum("rounded:" in line for line in said) == 3 and p["rounding"][2].endswith("48 kept")
    assert p["rounding"][0].startswith("25% of 4 query heads requested")
    d = metrics["distill"]
    assert d["temperature"] == 2 and d["teacher_extra_bytes"] > 0 and d["teacher_shared_bytes"] == 0
    assert any("distilling from the model before pruning" in line for line in said)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / "merged")
    assert (plain.config.hidden_size, plain.config.num_attention_heads, plain.config.intermediate_size) == (48, 2, 48)
    merged = load_merged(tmp_path / "run" / "export" / "merged")
    ids = {"input_ids": torch.tensor([[2, 9, 10, 11, 12]])}
    assert torch.allclose(logits(plain, ids), logits(merged, ids), atol=1e-6)


# -- serving: speed measured on the export, and what the report says of zeros ---------------------------------

@pytest.mark.slow
def test_speed_times_the_export_as_served_and_refuses_a_run_without_one(tmp_path, capsys):
    """dsee eval <run> --speed on a structured tiny-llama run: prefill and decode at batch 1 and 16, the export
    loaded with plain from_pretrained, written to metrics.json (savings.serving); a run without export/merged
    and a classifier run each get a one-paragraph error and exit 2."""
    import json

    from dsee_cli.cli import main

    from .helpers import run_in_process

    common = ["model=tiny-llama", "model.tiny.hidden=64", "model.tiny.heads=4", "model.tiny.kv_heads=2",
              "model.tiny.intermediate=64", "task=pydoc", "task.seq_len=16", "model.dtype=float32"]
    run_in_process(tmp_path / "run", *common, "pruning=structured", "pruning.head_fraction=0.5",
                   "pruning.hidden_channels=0.25", "pruning.multiple_of=16", "export=true")
    assert main(["eval", str(tmp_path / "run"), "--speed"]) == 0
    shown = capsys.readouterr().out
    assert "decode 128, batch 16" in shown and "from_pretrained" in shown
    serving = json.loads((tmp_path / "run" / "metrics.json").read_text())["savings"]["serving"]
    assert serving["loaded_with"] == "from_pretrained" and serving["prompt_tokens"] == 16
    assert set(serving["decode"]) == set(serving["prefill"]) == {"batch1", "batch16"}
    assert all(row["speedup"] > 0 and row["tokens_per_second"] > 0 for what in ("prefill", "decode")
               for row in serving[what].values())
    assert serving["params"] < serving["dense_params"] and serving["flops_ratio"] < 1
    assert serving["export_bytes"] < serving["dense_bytes"]

    run_in_process(tmp_path / "bare", *common, "pruning=none", "export=false")
    assert main(["eval", str(tmp_path / "bare"), "--speed"]) == 2
    assert "export/merged, and" in capsys.readouterr().err
    run_in_process(tmp_path / "cls", "pruning=none", "export=true")
    assert main(["eval", str(tmp_path / "cls"), "--speed"]) == 2
    assert "trains a classifier" in capsys.readouterr().err


def test_the_report_says_zero_holding_exports_gain_nothing_in_serving():
    from dsee_cli.reporting.report import serving_note

    def metrics(method):
        return {"config": {"pruning": {"method": method}}, "pruning": {"method": method}}

    assert "no faster than the dense" in serving_note([metrics("structured"), metrics("wanda")])
    assert serving_note([metrics("structured"), metrics("none")]) == ""


@pytest.mark.parametrize("overrides,message", [
    (["trainer.phase1.distill=true"], "belongs to recovery: trainer.recovery.distill=true"),
    (["pruning=imp", "trainer.recovery.distill=true"], "several pruning rounds"),
    (["task=stsb", "task.synthetic_standin=true", "trainer.recovery.distill=true"], "regression with one output"),
    (["pruning=unstructured", "pruning.hidden_channels=0.25"], "only pruning=structured does"),
    (["pruning=unstructured", "pruning.criterion=activation"], "it goes with pruning=structured"),
    (["pruning=structured", "pruning.criterion=obs"], "pruning=structured ranks heads and channels"),
    (["pruning=structured", "pruning.shapes=tidy"], "Valid choices: auto, servable, free"),
    (["pruning=structured", "pruning.ffn_channels=2.5"], "a fraction in \\[0, 1\\) or a whole count"),
])
def test_bad_structured_and_distillation_settings_fail_before_any_work(overrides, message):
    from dsee_cli.config import validate

    from .helpers import compose

    with pytest.raises(DSEEError, match=message):
        validate(compose(*overrides))
