"""Bottleneck adapters: Houlsby's serial ones after the attention-output and FFN-output
projections (Houlsby et al. 2019; ``placement=ffn`` is Pfeiffer's single adapter), and MAM's
scaled parallel adapter on the FFN (He et al. 2021). Ours: AdapterHub's ``adapters`` pins
transformers 4.x. They hang under the layer they modify, so module names stay valid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsee_cli.core.arch import AddedModule, family_of, transformer_layers
from dsee_cli.errors import DSEEError, choice_error

PLACEMENTS = ("both", "ffn")


@dataclass
class BottleneckConfig:
    """``adapter.bottleneck``: houlsby's serial and mam's parallel bottleneck adapters."""

    size: int = 64  # houlsby / mam: the adapter's hidden size
    placement: str = "both"  # houlsby: after attention and FFN (both, Houlsby) or after the FFN only (ffn, Pfeiffer)
    scale: float = 4.0  # mam: the parallel adapter's output scale
    train_layer_norms: bool = False  # houlsby: also train the blocks' LayerNorms (Houlsby's recipe)

    def check(self) -> None:
        if self.placement not in PLACEMENTS:
            raise choice_error("adapter placement (adapter.bottleneck.placement)", self.placement, PLACEMENTS)
        if self.size < 1:
            raise DSEEError(f"adapter.bottleneck.size={self.size} is invalid: it must be >= 1.")


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


def _parallel_ffn_hook(module: nn.Module, args, output):
    return output + module.mam(args[0])


def _hidden_size(model: nn.Module) -> int:
    c = model.config
    return getattr(c, "hidden_size", None) or c.n_embd


def _ffn_and_attention_outputs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention-output projection, FFN-output projection) of each block."""
    fam = family_of(model)
    return [(layer.get_submodule(fam.attention.output), layer.get_submodule(fam.mlp.contract))
            for layer in transformer_layers(model)]


def add_houlsby(model: nn.Module, s: BottleneckConfig) -> None:
    dim = _hidden_size(model)
    for attn_out, ffn_out in _ffn_and_attention_outputs(model):
        for module in (attn_out, ffn_out) if s.placement == "both" else (ffn_out,):
            module.add_module("houlsby", Bottleneck(dim, s.size))
            module.register_forward_hook(_serial_adapter_hook)
    if s.train_layer_norms:
        for layer in transformer_layers(model):
            for m in layer.modules():
                if isinstance(m, nn.LayerNorm):
                    m.requires_grad_(True)


def add_parallel_ffn(model: nn.Module, s: BottleneckConfig) -> None:
    dim = _hidden_size(model)
    for layer in transformer_layers(model):
        adapter = Bottleneck(dim, s.size, activation="relu", scale=s.scale)
        mlp = family_of(model).mlp.module
        if mlp is not None:  # the MLP is one module of the hidden state (GPT-2, Llama): beside it
            layer.get_submodule(mlp).add_module("mam", adapter)
            layer.get_submodule(mlp).register_forward_hook(_parallel_ffn_hook)
        else:
            layer.output.add_module("mam", adapter)
            layer.output.register_forward_pre_hook(_parallel_ffn_hook_bert, with_kwargs=True)
