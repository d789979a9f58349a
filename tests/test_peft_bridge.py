"""PEFT's methods as peers (tuning/peft_bridge.py): PEFT's own counts, ΔW equal to PEFT's own merge,
pruning from that ΔW with exact sparsity, structured pruning that drops the factors' rows, PEFT's
format loaded by PeftModel.from_pretrained, and clear refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from dsee_cli.config import validate
from dsee_cli.core.arch import attention_units, block_linears, task_head_params, weight_out_in
from dsee_cli.errors import DSEEError
from dsee_cli.measure.accounting import trainable_counts
from dsee_cli.pruning import PruningConfig, apply_masks, compute_masks, prune_heads
from dsee_cli.run.export import load_merged
from dsee_cli.tuning import AdapterConfig, prepare_method
from dsee_cli.tuning.adapters import adapters_of, unwrap_adapters
from dsee_cli.tuning.peft_bridge import SHRINKABLE_TYPES, PeftSection, target_modules

from .helpers import batch, compose, logits, run_in_process, tiny

PRESETS = ["dora", "shira", "hira", "adalora", "vera", "loha", "lokr"]


def preset(name: str) -> AdapterConfig:
    """The adapter section exactly as `adapter=<name>` composes it (its yaml), with a small rank."""
    adapter = compose(f"adapter={name}").adapter
    args = dict(adapter.peft.args)
    for key in ("r", "init_r"):
        if key in args:
            args[key] = 4
    if "target_r" in args:
        args["target_r"] = 2
    adapter.peft = PeftSection(adapter.peft.type, args)
    return adapter


def prepared(name: str, model_name: str = "tiny-bert", perturb: bool = True):
    model, tok = tiny(model_name)
    settings = preset(name)
    prepare_method(model, settings)
    if perturb:  # non-zero ΔW (every method starts at ΔW = 0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in adapters_of(model).values():
                for p in layer.adapter_parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, tok, settings


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
def test_trainable_counts_equal_peft_own(name, model_name):
    model, _, settings = prepared(name, model_name, perturb=False)
    ours = trainable_counts(model).as_dict()["total"]
    fresh, _ = tiny(model_name)
    heads = sorted({n.rsplit(".", 1)[0] for n, _ in task_head_params(fresh)})
    config = settings.peft.build(target_modules(fresh, None), modules_to_save=heads or None)
    theirs, _ = get_peft_model(fresh, config).get_nb_trainable_parameters()
    assert ours == theirs, (ours, theirs)


# GPT-2's fused Conv1D (stored in x out) too, for the methods PEFT takes it with
@pytest.mark.parametrize("name,model_name", [*((n, "tiny-bert") for n in PRESETS),
                                             *((n, "tiny-gpt2") for n in ("dora", "hira", "adalora", "vera"))])
def test_delta_is_zero_at_step_0_and_equals_peft_merge(name, model_name):
    model, tok = tiny(model_name)
    enc = batch(tok)
    before = logits(model, enc)
    prepare_method(model, preset(name))
    assert torch.allclose(logits(model, enc), before, atol=1e-6)  # ΔW = 0 at step 0
    model, tok, _ = prepared(name, model_name)
    for layer in adapters_of(model).values():
        w = weight_out_in(layer.base).detach().clone()
        delta = layer.delta_weight().detach()
        assert delta.abs().max() > 1e-4  # the perturbed adapter changes W
        merged = copy.deepcopy(layer.tuner)
        merged.merge(safe_merge=True)
        peft_delta = weight_out_in(merged.get_base_layer()) - w
        assert (delta - peft_delta).abs().max() < 1e-5, (name, (delta - peft_delta).abs().max())
        assert torch.equal(weight_out_in(layer.base), w)  # computed without merging in place
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():  # the PEFT forward computes with W + ΔW
            assert torch.allclose(layer(x), F.linear(x, w + delta, layer.base.bias), atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_a_few_steps_lower_the_loss(name):
    model, tok = tiny()
    prepare_method(model, preset(name))
    enc = batch(tok)
    labels = torch.tensor([0, 1, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.eval()  # no dropout: the same batch, a falling loss
    losses = []
    for _ in range(20):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0] and losses[-1] < losses[len(losses) // 2], losses
    assert all(layer.delta_weight().abs().max() > 0 for layer in adapters_of(model).values())  # ΔW itself trained


def _independent_delta_masks(deltas: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The |ΔW| criterion written out: one global ranking of every adapted entry (a stable sort,
    ties to the earlier layer and index), the lowest round(sparsity·n) pruned."""
    flat = torch.cat([d.abs().flatten() for d in deltas.values()])
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[: round(sparsity * flat.numel())]] = True
    out, offset = {}, 0
    for name, d in deltas.items():
        out[name] = ~pruned[offset:offset + d.numel()].view_as(d)
        offset += d.numel()
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_unstructured_pruning_from_peft_delta_has_exact_sparsity_and_masked_forward(name, tmp_path):
    """After pruning, each layer computes M⊙(W + ΔW) with W and ΔW as they were before pruning and M
    from the |ΔW| ranks written out here: DoRA's row norm is that of the pruned weight, its magnitude
    rescaled so that pruning changes nothing but the pruned entries (HiRA's W ⊙ BA needs nothing)."""
    model, tok, _ = prepared(name)
    enc = batch(tok)
    adapters = adapters_of(model)
    before = {n: (weight_out_in(a.base).detach().clone(), a.delta_weight().detach().clone())
              for n, a in adapters.items()}
    masks = compute_masks(model, PruningConfig(method="unstructured", criterion="delta"), 0.5)
    independent = _independent_delta_masks({n: d for n, (_, d) in before.items()}, 0.5)
    apply_masks(model, masks)
    for module_name, layer in adapters.items():
        assert torch.equal(layer.mask, independent[module_name]), module_name
        w, delta = before[module_name]
        expected = (w + delta) * independent[module_name]
        x = torch.randn(2, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, expected, layer.base.bias), atol=1e-5, rtol=1e-5)
    model.train()  # recovery trains the same adapter through M ⊙ (W + ΔW)
    model(**enc).logits.square().sum().backward()
    grads = [p.grad for layer in adapters.values() for p in layer.adapter_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    reference = logits(model, enc)
    merged = copy.deepcopy(model)
    unwrap_adapters(merged)
    assert torch.allclose(logits(merged, enc), reference, atol=1e-5)  # the export is M ⊙ (W + ΔW)
    zeros = sum(int(weight_out_in(m).eq(0).sum()) for m in block_linears(merged).values())
    total = sum(weight_out_in(m).numel() for m in block_linears(merged).values())
    assert zeros == sum(int((~m).sum()) for m in masks.values()) and abs(zeros / total - 0.5) < 1e-3


@pytest.mark.parametrize("name", ["peft", "dora", "hira"])  # adapter=peft: PEFT's LoRA
def test_sparsegpt_stores_w_prime_exactly_where_delta_does_not_read_w_and_is_refused_where_it_does(name):
    """SparseGPT's W' is stored as W' − M⊙ΔW: LoRA then computes W' exactly; DoRA's and HiRA's ΔW
    read W, so the stored base moves ΔW (measured ~0.03 on W' of ~0.5) and the run refuses them."""
    from dsee_cli.pruning.calibrated import mask_linear, set_effective_weight

    model, _, _ = prepared(name)
    layer = next(iter(adapters_of(model).values()))
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(weight_out_in(layer.base).shape, generator=gen) > 0.5
    w_prime = torch.randn(keep.shape, generator=gen) * 0.5 * keep
    set_effective_weight(layer, w_prime, keep)
    mask_linear(layer, keep)
    with torch.no_grad():
        computed = (weight_out_in(layer.base) + layer.delta_weight()) * layer.mask
    error = float((computed - w_prime).abs().max())
    if name == "peft":
        assert error < 1e-6
    else:
        assert error > 1e-3
        with pytest.raises(DSEEError, match=r"pruning=sparsegpt rewrites the kept weights.*reads W"):
            validate(compose(f"adapter={name}", "pruning=sparsegpt"))


@pytest.mark.parametrize("name", [n for n in PRESETS if compose(f"adapter={n}").adapter.peft.type in SHRINKABLE_TYPES])
def test_structured_pruning_drops_the_factors_rows(name):
    model, tok, _ = prepared(name)
    before = {n: (weight_out_in(layer.base).detach().clone(), layer.delta_weight().detach().clone())
              for n, layer in adapters_of(model).items()}
    unit = attention_units(model)[0]
    prune_heads(model, {0: [1], 1: [2]})
    hd = unit.head_dim
    for n, layer in adapters_of(model).items():
        dropped = 1 if ".0." in n else 2
        keep = torch.tensor([i for i in range(unit.num_heads * hd) if not dropped * hd <= i < (dropped + 1) * hd])
        w0, d0 = before[n]
        assert weight_out_in(layer.base).shape == (len(keep), w0.shape[1])
        assert torch.allclose(layer.delta_weight(), d0[keep], atol=1e-6)  # ΔW of the kept rows, unchanged
    assert logits(model, batch(tok)).isfinite().all()


@pytest.mark.parametrize("name", [n if n == "dora" else pytest.param(n, marks=pytest.mark.slow) for n in PRESETS])
def test_peft_export_loads_in_peft_and_equals_the_run(tmp_path, name):
    run = tmp_path / "run"
    metrics = run_in_process(run, f"adapter={name}", "pruning=none", "trainer.max_steps=6", messages=[])
    assert metrics["export"]["adapter_peft_format"].startswith("PeftModel")
    base, tok = tiny_from(compose(f"adapter={name}"))  # the same pretrained model: the tiny one is seeded
    loaded = PeftModel.from_pretrained(base, str(run / "export" / "adapter")).eval()
    merged = load_merged(run / "export" / "merged")
    enc = batch(tok)
    assert torch.allclose(logits(loaded, enc), logits(merged, enc), atol=1e-5)


def tiny_from(cfg):
    from dsee_cli.core.models import load_model

    lm = load_model(cfg.model.name, None, 2, cfg.seed, cfg.model.tiny)
    return lm.model, lm.tokenizer


def test_pruned_runs_of_peft_methods_say_where_the_pruned_model_is(tmp_path):
    metrics = run_in_process(tmp_path / "run", "adapter=shira", "sparsity=0.5", messages=[])
    assert "export/merged" in metrics["export"]["adapter_peft_format"]
    merged = load_merged(tmp_path / "run" / "export" / "merged")
    zeros = sum(int(weight_out_in(m).eq(0).sum()) for m in block_linears(merged).values())
    total = sum(weight_out_in(m).numel() for m in block_linears(merged).values())
    assert abs(zeros / total - 0.5) < 1e-3


@pytest.mark.parametrize("overrides,message", [
    (["adapter=peft", "adapter.peft.type=nosuch"], "adapter.peft.type"),
    (["adapter=peft", "+adapter.peft.args.rank=4"], "adapter.peft.args.rank"),
    (["adapter=peft", "adapter.peft.type=ia3"], "no ΔW"),
    (["adapter=vera", "pruning=structured"], "vera"),
])
def test_bad_peft_settings_fail_before_anything_runs(overrides, message):
    with pytest.raises(DSEEError, match=message):
        validate(compose(*overrides))


def test_a_method_without_a_delta_still_trains(tmp_path):
    metrics = run_in_process(tmp_path / "run", "adapter=peft", "adapter.peft.type=ia3", "pruning=none",
                             messages=[])
    assert metrics["trainable_params"]["adapter"] > 0 and metrics["phases"]["phase1"]["steps"] == 3


def test_adalora_cuts_its_ranks_to_the_budget_over_phase_one(tmp_path):
    from safetensors.torch import load_file

    run_in_process(tmp_path / "run", "adapter=adalora", "pruning=none", "trainer.max_steps=12", messages=[])
    adapter = tmp_path / "run" / "export" / "adapter"
    state = load_file(str(adapter / "adapter_model.safetensors"))
    singular = [t for k, t in state.items() if "lora_E" in k]
    kept = sum(int(t.ne(0).sum()) for t in singular)
    # init_r = 16 per matrix to start; the budget ends near target_r = 8 on average
    assert len(singular) == 4 and kept <= 8 * len(singular) + 2, kept


def test_adalora_keeps_the_ranks_it_reached_through_recovery(tmp_path):
    """The singular values AdaLoRA's budget zeroed by the end of phase I (its state in the step
    store) stay zero through recovery (its hooks ran in phase I only, so recovery's gradients
    brought them back)."""
    from safetensors.torch import load_file

    from dsee_cli.run.checkpoint import load_state_dir
    from dsee_cli.run.steps import steps_dir

    metrics = run_in_process(tmp_path / "run", "adapter=adalora", "sparsity=0.3", "trainer.max_steps=12",
                             messages=[])
    assert metrics["phases"]["recovery"]["steps"] == 12

    def singular_values(tensors):
        return {n: t for n, t in tensors.items() if n.endswith("lora_E.default") and "::" not in n}

    (phase1,) = steps_dir().glob("phase1-*/state-*.safetensors")
    after_phase1 = singular_values(load_file(str(phase1)))
    after_recovery = singular_values(load_state_dir(tmp_path / "run" / "export" / "adapter")[0])
    assert set(after_phase1) == set(after_recovery) and len(after_phase1) == 4
    assert sum(int((t == 0).sum()) for t in after_phase1.values()) > 0  # the budget had cut some ranks
    for name, value in after_phase1.items():
        assert torch.equal(after_recovery[name] != 0, value != 0), name
        assert not torch.equal(after_recovery[name], value), name  # the kept ones trained on


def test_the_peft_config_and_version_are_in_phase_one_fingerprint():
    from dsee_cli.run.steps import step_fingerprint

    dora = step_fingerprint(compose("adapter=dora"), "phase1")
    assert step_fingerprint(compose("adapter=dora", "adapter.peft.args.r=8"), "phase1") != dora
    assert step_fingerprint(compose("adapter=hira"), "phase1") != dora
    assert step_fingerprint(compose("adapter=dora", "sparsity=0.7"), "phase1") == dora  # pruning comes after
    # DSEE's own fingerprint ignores the (unused) peft section
    assert step_fingerprint(compose("+adapter.peft.args.r=8"), "phase1") == step_fingerprint(compose(), "phase1")


def test_structured_pruning_of_a_peft_method_removes_heads_end_to_end(tmp_path):
    metrics = run_in_process(tmp_path / "run", "adapter=hira", "pruning=structured", "pruning.heads_to_remove=1",
                             messages=[])
    assert metrics["pruning"]["heads_removed"] and metrics["flops_ratio"] < 1.0
    assert metrics["phases"]["recovery"]["steps"] == 3
    merged = load_merged(tmp_path / "run" / "export" / "merged")
    assert all(u.num_heads == 3 for u in attention_units(merged))


def test_a_layer_peft_cannot_adapt_is_named_with_the_method_and_peft_version():
    import peft

    model, _ = tiny("tiny-gpt2")  # GPT-2's fused c_attn is a Conv1D, which PEFT's SHiRA does not take
    with pytest.raises(DSEEError) as error:
        prepare_method(model, preset("shira"))
    text = str(error.value)
    assert "shira" in text and "c_attn" in text and peft.__version__ in text


def test_decoder_kv_groups_are_pruned_by_a_peft_delta(tmp_path):
    metrics = run_in_process(tmp_path / "run", "task=wikitext2", "profile=smoke", "model.tiny.hidden=96",
                             "model.tiny.heads=12", "task.seq_len=32", "adapter=dora", "adapter.targets=[q,k,v]",
                             "pruning=structured", "pruning.unit=kv-group", "pruning.head_fraction=0.25",
                             "pruning.criterion=delta", "pruning.shapes=free", "trainer.max_steps=3", messages=[])
    # 12 query heads over 4 groups: one group gone by DoRA's |ΔW| (9 heads: shapes=free, LlamaConfig wants 96 % 9)
    assert metrics["pruning"]["heads_per_layer"]["0"] == [9, 3] and metrics["pruning"]["criterion"] == "delta"
    assert metrics["final"]["eval"]
