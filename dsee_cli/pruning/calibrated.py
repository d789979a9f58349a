"""Calibration-driven pruning, one transformer block at a time (Wanda, SparseGPT, delta_wanda).

The calibration batches run up to the first block, whose inputs are kept; then each block in
turn: its linears' inputs are accumulated (``oneshot.InputStats``) while the block runs on every
calibration input, its linears are pruned, and the block runs again so that the next block's
inputs come through the already-pruned ones (SparseGPT's and Wanda's sequential mode). Only one
block's statistics (SparseGPT: its Hessians) live at a time.

What the blocks see is what the pruned model will compute, exactly:

* no KV cache: the forward runs with ``use_cache=False`` and no cache reaches a block (a cache in
  the captured arguments made the output pass attend to the statistics pass's unpruned keys
  and values, and crashed on padded batches);
* padding positions enter neither ‖X_j‖ nor H (each input's attention mask goes with it);
* an adapted layer computes with M⊙(W + ΔW) (its mask is set as soon as its block is pruned,
  not after the last block), as the recovery forward and the merged export do;
* under a half-precision base the blocks run in the run's autocast, as training does.

Where a linear is adapted, the weight pruned is the one the model computes with, W + ΔW (for
``delta_wanda``: |ΔW|·‖X‖ scores it). SparseGPT's updated weight W' goes back into the base as
W' − M⊙ΔW, so that the forward M⊙(W + ΔW) computes W' exactly; that needs a ΔW that does not read
W (LoRA, DSEE, ...), which ``PruningConfig`` checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dsee_cli.core.arch import block_linears, dims, layer_prefix, transformer_layers, weight_out_in
from dsee_cli.errors import DSEEError
from dsee_cli.pruning.oneshot import InputStats
from dsee_cli.tuning.adapters import DeltaLayer

# (module name, module, its input statistics) -> the keep-mask; may update the weight in place
PruneLinear = Callable[[str, nn.Module, InputStats], torch.Tensor]
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class BlockInput:
    """One calibration batch as a block receives it, and which of its positions are real tokens."""

    args: tuple
    kwargs: dict
    tokens: torch.Tensor | None  # (batch, seq) bool; None: every position is a token

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        """The same call with its hidden states replaced (passed first, or by name)."""
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs, self.tokens)
        return BlockInput(self.args, {**self.kwargs, "hidden_states": hidden}, self.tokens)

    def run(self, block: nn.Module) -> torch.Tensor:
        out = block(*self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


class _Captured(Exception):
    """Stops the forward at the first block once its inputs are kept."""


def first_block_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[BlockInput]:
    captured: list[BlockInput] = []
    current: list[torch.Tensor | None] = [None]

    def keep(module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGS and k != "use_cache"}
        captured.append(BlockInput(args, kwargs, current[0]))
        raise _Captured

    handle = transformer_layers(model)[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            current[0] = None if mask is None or bool(mask.all()) else mask.bool()
            try:
                model(**batch, use_cache=False)  # a cache would carry keys and values from one pass to the next
            except _Captured:
                pass
    finally:
        handle.remove()
    if not captured:
        raise DSEEError("calibration: no batch reached the first transformer block.")
    return captured


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
def mask_linear(module: nn.Module, keep: torch.Tensor, mask_delta: bool = True) -> None:
    """The layer computes with its pruned weight from now on: W zeroed where not kept and, where
    adapted, the mask set so that the forward is M⊙(W + ΔW) (M⊙W + ΔW without ``mask_delta``)."""
    if isinstance(module, DeltaLayer):
        module.set_mask(keep, mask_delta)
    else:
        weight_out_in(module).mul_(keep)


def _statistics(block: nn.Module, inputs: list[BlockInput], linears: dict[str, nn.Module], hessian: bool
                ) -> dict[str, InputStats]:
    """The block's linears' input statistics over every calibration input (real tokens only)."""
    stats = {n: InputStats(dims(m)[1], hessian) for n, m in linears.items()}
    tokens: list[torch.Tensor | None] = [None]
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: stats[n].add(a[0], tokens[0]))
             for n, m in linears.items()]
    try:
        for x in inputs:
            tokens[0] = x.tokens
            x.run(block)
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def prune_block_by_block(model: nn.Module, batches: list[dict[str, torch.Tensor]], prune_linear: PruneLinear,
                         hessian: bool, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                         mask_delta: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """Keep-masks of every block linear, and the largest statistics one block held (bytes).
    ``autocast``: the run's precision context (a half-precision base computes under it)."""
    was_training = model.training
    model.eval()
    # autocast reconciles fp32 adapters with a half-precision base; a model of one dtype computes without it
    mixed = len({p.dtype for p in model.parameters() if p.is_floating_point()}) > 1
    context = autocast if autocast is not None and mixed else contextlib.nullcontext
    with context():
        inputs = first_block_inputs(model, batches)
    prefix, linears = layer_prefix(model), block_linears(model)
    masks: dict[str, torch.Tensor] = {}
    peak_stats = 0
    for i, block in enumerate(transformer_layers(model)):
        mine = {n: m for n, m in linears.items() if n.startswith(f"{prefix}.{i}.")}
        with context():
            stats = _statistics(block, inputs, mine, hessian)
        peak_stats = max(peak_stats, sum(s.nbytes for s in stats.values()))
        for n, module in mine.items():
            keep = prune_linear(n, module, stats[n]).to(weight_out_in(getattr(module, "base", module)).device)
            mask_linear(module, keep, mask_delta)  # before the next block sees this one's outputs
            masks[n] = keep
        del stats  # this block's statistics (SparseGPT: its Hessians) go before the next block's
        with context():
            inputs = [x.with_hidden(x.run(block)) for x in inputs]
    model.train(was_training)
    return masks, peak_stats
