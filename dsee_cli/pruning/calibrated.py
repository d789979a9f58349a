"""Calibration-driven pruning, one transformer block at a time (Wanda, SparseGPT).

The calibration batches run up to the first block, whose inputs are kept; then each block in
turn: its linears' inputs are accumulated (``oneshot.InputStats``) while the block runs on every
calibration input, its linears are pruned, and the block runs again so that the next block's
inputs come through the already-pruned ones (SparseGPT's and Wanda's sequential mode). Only one
block's statistics (SparseGPT: its Hessians) live at a time.

Where a linear is adapted, the weight pruned is the one the model computes with, W + ΔW (for
``delta_wanda``: |ΔW|·‖X‖ scores it). SparseGPT's updated weight W' goes back into the base as
W' − M⊙ΔW, so that the recovery forward M⊙(W + ΔW) computes W' exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsee_cli.core.arch import block_linears, dims, layer_prefix, transformer_layers, weight_out_in
from dsee_cli.errors import DSEEError
from dsee_cli.pruning.oneshot import InputStats
from dsee_cli.tuning.adapters import DeltaLayer

# (module name, module, its input statistics) -> the keep-mask; may update the weight in place
PruneLinear = Callable[[str, nn.Module, InputStats], torch.Tensor]


class _Captured(Exception):
    """Stops the forward at the first block once its inputs are kept."""


def first_block_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def keep(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = transformer_layers(model)[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not captured:
        raise DSEEError("calibration: no batch reached the first transformer block.")
    return captured


def _run(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The block's call with its hidden states replaced (passed first, or by name)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with (out x in): W + ΔW where adapted."""
    if isinstance(module, DeltaLayer):
        return weight_out_in(module.base).float() + module.delta_weight().float()
    return weight_out_in(module).float()


@torch.no_grad()
def set_effective_weight(module: nn.Module, new: torch.Tensor, keep: torch.Tensor) -> None:
    """Store an updated weight W' so that the layer computes M⊙(W + ΔW) = W' (SparseGPT)."""
    if isinstance(module, DeltaLayer):
        base = weight_out_in(module.base)
        base.copy_((new.float() - module.delta_weight().float() * keep).to(base.dtype))
    else:
        w = weight_out_in(module)
        w.copy_(new.to(w.dtype))


@torch.no_grad()
def prune_block_by_block(model: nn.Module, batches: list[dict[str, torch.Tensor]], prune_linear: PruneLinear,
                         hessian: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Keep-masks of every block linear, and the largest statistics one block held (bytes)."""
    was_training = model.training
    model.eval()
    inputs = first_block_inputs(model, batches)
    prefix, linears = layer_prefix(model), block_linears(model)
    masks: dict[str, torch.Tensor] = {}
    peak_stats = 0
    for i, block in enumerate(transformer_layers(model)):
        names = [n for n in linears if n.startswith(f"{prefix}.{i}.")]
        stats = {n: InputStats(dims(linears[n])[1], hessian) for n in names}
        hooks = [linears[n].register_forward_pre_hook(lambda m, a, n=n: stats[n].add(a[0])) for n in names]
        try:
            for args, kwargs in inputs:
                _run(block, args, kwargs)
        finally:
            for h in hooks:
                h.remove()
        peak_stats = max(peak_stats, sum(t.numel() * t.element_size() for s in stats.values()
                                         for t in (s.sq_norms, s.h) if t is not None))
        for n in names:
            keep = prune_linear(n, linears[n], stats[n])
            base = weight_out_in(getattr(linears[n], "base", linears[n]))
            base.mul_(keep.to(base.device))  # pruned before the next block sees this one's outputs
            masks[n] = keep.to(base.device)
        stats = {}  # this block's statistics (SparseGPT: its Hessians) go before the next block's
        inputs = [_with_hidden(args, kwargs, _run(block, args, kwargs)) for args, kwargs in inputs]
    model.train(was_training)
    return masks, peak_stats
