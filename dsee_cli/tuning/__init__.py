"""What each fine-tuning method trains, and what it adds to the model.

* ``dsee`` / ``lora``: our sparse + low-rank ``DSEELinear`` (adapters.py); LoRA is card(Ω) = 0.
* ``full``, ``bitfit`` (biases), ``ft-top`` (the top k blocks): which pretrained tensors train.
* ``houlsby``: bottleneck adapters after the attention-output and FFN-output projections
  (Houlsby et al. 2019; ``placement=ffn`` is Pfeiffer's single adapter). Ours: AdapterHub's
  ``adapters`` pins transformers 4.x.
* ``prefix`` / ``ptuning-v2``: PEFT's prefix encoder (deep prompts in every layer's keys and
  values; prefix tuning reparameterises them through an MLP, P-tuning v2 does not).
* ``mam``: the MAM adapter (He et al. 2021): PEFT prefix tuning on attention plus our scaled
  parallel adapter on the FFN.
* ``pst``, ``map``, ``mvp``: sparse training on a sparsity schedule (sparse_training.py).

Everything is attached with forward hooks and submodules *under* the layer it modifies, so
the original module names stay valid for pruning, accounting and export. The task head (and
any weight the checkpoint lacked) always trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dsee_cli.core.arch import GPT2, AddedModule, family_of, task_head_params, transformer_layers
from dsee_cli.errors import DSEEError, choice_error
from dsee_cli.tuning.adapters import LowRankConfig, inject_adapters
from dsee_cli.tuning.sparse_training import ScheduleConfig, SparseTrainingConfig, inject_sparse_training

PLACEMENTS = ("both", "ffn")


@dataclass
class BottleneckConfig:
    """``adapter.bottleneck``: houlsby's serial and mam's parallel bottleneck adapters."""

    size: int = 64  # houlsby / mam: the adapter's hidden size
    placement: str = "both"  # houlsby: after attention and FFN (both, Houlsby) or after the FFN only (ffn, Pfeiffer)
    scale: float = 4.0  # mam: the parallel adapter's output scale
    train_layer_norms: bool = False  # houlsby: also train the blocks' LayerNorms (Houlsby's recipe)


@dataclass
class PromptConfig:
    """``adapter.prompt``: the deep prompts of prefix / ptuning-v2 / mam (PEFT's prefix encoder)."""

    length: int = 16  # virtual tokens per layer
    projection: bool = False  # prefix: reparameterise the prompts through an MLP
    hidden: int = 512  # prefix: that MLP's hidden size


@dataclass
class AdapterConfig(LowRankConfig):
    """The ``adapter`` section: the tuning method and its settings. The low-rank fields
    (rank, alpha, omega_size, dropout, init) are adapters.LowRankConfig's, for dsee / lora."""

    method: str = "dsee"  # the tuning method (adapter=... picks it with its defaults; see TUNING_METHODS)
    targets: list[str] | None = None  # dsee / lora: the adapted projections; null: the architecture's q, v
    top_layers: int = 2  # ft-top: how many of the last blocks train
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sparse_training: SparseTrainingConfig = field(default_factory=SparseTrainingConfig)

    def check(self) -> None:
        if self.method not in TUNING_METHODS:
            raise choice_error("adapter method (adapter=... / adapter.method)", self.method, tuple(TUNING_METHODS))
        LowRankConfig.check(self)
        if self.bottleneck.placement not in PLACEMENTS:
            raise choice_error("adapter placement (adapter.bottleneck.placement)", self.bottleneck.placement,
                               PLACEMENTS)
        for name, value in (("bottleneck.size", self.bottleneck.size), ("prompt.length", self.prompt.length),
                            ("prompt.hidden", self.prompt.hidden), ("top_layers", self.top_layers)):
            if value < 1:
                raise DSEEError(f"adapter.{name}={value} is invalid: it must be >= 1.")
        if TUNING_METHODS[self.method].sparse_training:
            self.sparse_training.check(self.method)

    @classmethod
    def from_dict(cls, saved: dict) -> AdapterConfig:
        """The section as ``dataclasses.asdict`` wrote it (export/adapter's meta.json)."""
        d = dict(saved)
        if "adapter" in d or "prefix_length" in d:
            raise DSEEError("this adapter export was written by dsee-cli before the adapter section was split "
                            "(adapter.bottleneck, adapter.prompt, adapter.sparse_training); export it again.")
        sparse = dict(d.get("sparse_training", {}))
        sparse["schedule"] = ScheduleConfig(**sparse.get("schedule", {}))
        d.update(bottleneck=BottleneckConfig(**d.get("bottleneck", {})), prompt=PromptConfig(**d.get("prompt", {})),
                 sparse_training=SparseTrainingConfig(**sparse))
        return cls(**d)


class Bottleneck(AddedModule):
    """x ↦ scale · up(act(down(x))), with up = 0 at the start so the model is unchanged.

    Its Linears are trainable additions, not pretrained weights to prune."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.scale = scale
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(x)))


# Hooks are module-level functions so that deep copies of a model (export) keep working.
def _serial_adapter_hook(module: nn.Module, args, output):
    return output + module.houlsby(output)


def _parallel_ffn_hook_bert(module: nn.Module, args, kwargs):
    """BertOutput(hidden, input_tensor) computes LN(dense(hidden) + input_tensor): adding the
    adapter's output of the FFN input to input_tensor puts it in parallel with the FFN."""
    if len(args) >= 2:
        hidden, residual, *rest = args
        return (hidden, residual + module.mam(residual), *rest), kwargs
    kwargs["input_tensor"] = kwargs["input_tensor"] + module.mam(kwargs["input_tensor"])
    return args, kwargs


def _parallel_ffn_hook_gpt2(module: nn.Module, args, output):
    return output + module.mam(args[0])


def _hidden_size(model: nn.Module) -> int:
    c = model.config
    return getattr(c, "hidden_size", None) or c.n_embd


def _ffn_and_attention_outputs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention-output projection, FFN-output projection) of each block."""
    if family_of(model) is GPT2:
        return [(layer.attn.c_proj, layer.mlp.c_proj) for layer in transformer_layers(model)]
    return [(layer.attention.output.dense, layer.output.dense) for layer in transformer_layers(model)]


def _add_houlsby(model: nn.Module, s: AdapterConfig) -> None:
    dim = _hidden_size(model)
    for attn_out, ffn_out in _ffn_and_attention_outputs(model):
        for module in (attn_out, ffn_out) if s.bottleneck.placement == "both" else (ffn_out,):
            module.add_module("houlsby", Bottleneck(dim, s.bottleneck.size))
            module.register_forward_hook(_serial_adapter_hook)
    if s.bottleneck.train_layer_norms:
        for layer in transformer_layers(model):
            for m in layer.modules():
                if isinstance(m, nn.LayerNorm):
                    m.requires_grad_(True)


def _add_parallel_ffn(model: nn.Module, s: AdapterConfig) -> None:
    dim = _hidden_size(model)
    for layer in transformer_layers(model):
        adapter = Bottleneck(dim, s.bottleneck.size, activation="relu", scale=s.bottleneck.scale)
        if family_of(model) is GPT2:
            layer.mlp.add_module("mam", adapter)
            layer.mlp.register_forward_hook(_parallel_ffn_hook_gpt2)
        else:
            layer.output.add_module("mam", adapter)
            layer.output.register_forward_pre_hook(_parallel_ffn_hook_bert, with_kwargs=True)


class _PrefixInjector:
    """A forward pre-hook: PEFT's prompt as past keys/values, the attention mask extended."""

    def __init__(self, peft_model, length: int):
        self.peft_model = peft_model
        self.length = length

    def __call__(self, module: nn.Module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = ids.shape[0]
        cache = kwargs.get("past_key_values")
        if cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
            # the first forward (training, or generation's first step); later decoding steps
            # already carry the prompt in their cache
            kwargs["past_key_values"] = self.peft_model.get_prompt(batch_size=batch)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, self.length), mask], dim=1)
        return args, kwargs


def _add_prefix(model: nn.Module, s: AdapterConfig) -> None:
    from peft import PeftModel, PrefixTuningConfig

    config = PrefixTuningConfig(num_virtual_tokens=s.prompt.length, prefix_projection=s.prompt.projection,
                                encoder_hidden_size=s.prompt.hidden, task_type=None)
    peft_model = PeftModel(model, config)  # builds the prompt encoder; freezes the model
    model.add_module("prefix_encoder", peft_model.prompt_encoder)
    model.register_forward_pre_hook(_PrefixInjector(peft_model, s.prompt.length), with_kwargs=True)


def _attach_lowrank(model: nn.Module, s: AdapterConfig) -> None:
    inject_adapters(model, s, list(s.targets) if s.targets else None)


def _freeze_all_but(model: nn.Module, trains: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(trains)


def _attach_bitfit(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, False)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)


def _attach_ft_top(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, False)
    layers = transformer_layers(model)
    if s.top_layers > len(layers):
        raise DSEEError(f"adapter.top_layers={s.top_layers} is out of range: this model has {len(layers)} blocks.")
    for layer in list(layers)[len(layers) - s.top_layers:]:
        layer.requires_grad_(True)
    base = model.base_model
    for after_blocks in ("pooler", "ln_f"):  # what sits between the blocks and the head
        if getattr(base, after_blocks, None) is not None:
            getattr(base, after_blocks).requires_grad_(True)


def _attach_houlsby(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, False)
    _add_houlsby(model, s)


def _attach_prefix(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, False)
    _add_prefix(model, s)


def _attach_mam(model: nn.Module, s: AdapterConfig) -> None:
    _attach_prefix(model, s)
    _add_parallel_ffn(model, s)


def _attach_sparse(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, s.method != "pst")  # MaP and MvP train every weight, as their papers did
    inject_sparse_training(model, s.sparse_training, s.method)


@dataclass(frozen=True)
class TuningMethod:
    """A fine-tuning method, declared once: the rest of the code reads these attributes."""

    name: str
    title: str  # what phase I is called on the terminal
    attach: Callable[[nn.Module, AdapterConfig], None]  # what trains, and what is added to the model
    merges: bool  # the tuned model is a plain HF model again (export/merged)
    prompts: bool = False  # adds virtual tokens to every layer (no head pruning)
    sparse_training: bool = False  # prunes while it trains, on the cubic schedule (no pruning phase)
    lowrank: bool = False  # adds ΔW through DSEELinear on the targets (Ω, |ΔW| pruning criteria, head scores)


TUNING_METHODS: dict[str, TuningMethod] = {}


def register(method: TuningMethod) -> TuningMethod:
    """Declare a tuning method (adapter.method): one call, in one place."""
    TUNING_METHODS[method.name] = method
    return method


for _method in (
    TuningMethod("dsee", "sparse + low-rank tuning", _attach_lowrank, merges=True, lowrank=True),
    TuningMethod("lora", "low-rank tuning", _attach_lowrank, merges=True, lowrank=True),
    TuningMethod("full", "full fine-tuning", lambda model, s: _freeze_all_but(model, True), merges=True),
    TuningMethod("bitfit", "BitFit: biases only", _attach_bitfit, merges=True),
    TuningMethod("ft-top", "fine-tuning the top blocks", _attach_ft_top, merges=True),
    TuningMethod("houlsby", "bottleneck adapters", _attach_houlsby, merges=False),
    TuningMethod("prefix", "prefix tuning", _attach_prefix, merges=False, prompts=True),
    TuningMethod("ptuning-v2", "P-tuning v2", _attach_prefix, merges=False, prompts=True),
    TuningMethod("mam", "MAM adapter", _attach_mam, merges=False, prompts=True),
    TuningMethod("pst", "PST sparse training on the cubic schedule", _attach_sparse, merges=True,
                 sparse_training=True),
    TuningMethod("map", "fine-tuning with magnitude pruning", _attach_sparse, merges=True, sparse_training=True),
    TuningMethod("mvp", "fine-tuning with movement pruning", _attach_sparse, merges=True, sparse_training=True),
):
    register(_method)

# Views of the registry for the code that asks one question of many methods
METHODS = tuple(TUNING_METHODS)
MERGEABLE = tuple(n for n, m in TUNING_METHODS.items() if m.merges)
PROMPT_METHODS = tuple(n for n, m in TUNING_METHODS.items() if m.prompts)
SPARSE_TRAINING = tuple(n for n, m in TUNING_METHODS.items() if m.sparse_training)


def prepare_method(model: nn.Module, s: AdapterConfig) -> None:
    """Set up the model for training with method ``s.method`` (in place)."""
    s.check()
    TUNING_METHODS[s.method].attach(model, s)
    for _, p in task_head_params(model):  # the task head (and weights the checkpoint lacked) always trains
        p.requires_grad_(True)
