"""Ω from gradients (RoSA, Nikdan et al., ICML 2024): the entries of each adapted W whose loss
gradient is largest, accumulated over a few batches once a LoRA warm-up has trained.

``gradient_scores`` makes each adapted pretrained weight require a gradient for the duration,
and consumes that gradient in a hook the moment the backward pass has produced it: summed over
the ranks (so every rank holds the statistic of the global batch), squared (``fisher``: a diagonal
Fisher estimate, RoSA's ``mean_squared``) or not (``mean``, ranked by magnitude), added to the
matrix's fp32 accumulator, and dropped. No W keeps a ``.grad``, and no two W's gradients exist at
once beyond what autograd itself holds. The accumulators are the memory this costs: one fp32
value per adapted weight (Llama-2-7B with every linear layer adapted: 6.48 G values, 25.9 GB, as
RoSA's CPU accumulators). ``passes`` splits the matrices into groups that accumulate on separate
passes over the same batches: the same statistic exactly, 1/passes of the memory, passes x the
backward passes.

The model runs in eval mode while gradients are taken (no dropout), so the statistic is a
property of the warmed-up model and the batches, and passes > 1 sees the same forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_cli.core import dist
from dsee_cli.errors import DSEEError
from dsee_cli.tuning.omega import top_n

GRAD_STATS = ("fisher", "mean")  # RoSA's grad_acc_mode: mean_squared (a diagonal Fisher), mean


def accumulator_bytes(weights: Sequence[torch.Tensor], passes: int = 1) -> int:
    """The fp32 accumulators' memory while gradients are taken: the largest pass's matrices."""
    return max((sum(4 * w.numel() for w in group) for group in _groups(list(weights), passes)), default=0)


def _groups(items: list, passes: int) -> list[list]:
    """``items`` cut into ``passes`` contiguous groups of near-equal size (some empty if fewer)."""
    bounds = [len(items) * i // passes for i in range(passes + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(passes)]


def gradient_scores(
    model: nn.Module,
    slices: dict[str, tuple[nn.Module, tuple[int, int]]],
    pieces: Sequence[tuple[dict[str, torch.Tensor], float]],
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    stat: str = "fisher",
    passes: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """For each named slice ``(layer, (start, end))`` of an adapted layer's out x in weight, the
    statistic of dL/dW over ``pieces`` ((batch, weight): one backward of ``weight · loss(model,
    batch)`` each; in a distributed run every rank passes its share of the same micro-step and the
    gradients are summed over the ranks before the statistic). ``fisher``: Σ g², ``mean``: |Σ g|."""
    if stat not in GRAD_STATS:
        raise DSEEError(f"omega.grad_stat={stat!r} is invalid; valid choices: {', '.join(GRAD_STATS)}.")
    if passes < 1:
        raise DSEEError(f"omega.passes={passes} must be >= 1.")
    layers: dict[int, nn.Module] = {}
    for layer, _ in slices.values():
        layers.setdefault(id(layer), layer)
    trains = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    totals: dict[int, torch.Tensor] = {}
    try:
        for p in trains:
            p.requires_grad_(False)
        model.eval()
        for group in _groups(list(layers.values()), passes):
            totals.update(_one_pass(model, group, pieces, loss, stat, autocast))
    finally:
        for p, flag in trains.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    out = {}
    for key, (layer, (start, end)) in slices.items():
        total = totals[id(layer)]
        total = total.t() if isinstance(layer, Conv1D) else total  # GPT-2's Conv1D stores in x out
        out[key] = (total.abs() if stat == "mean" else total)[start:end].contiguous()
    return out


def _one_pass(model, layers: list[nn.Module], pieces, loss, stat: str, autocast) -> dict[int, torch.Tensor]:
    totals = {id(layer): torch.zeros(layer.weight.shape, dtype=torch.float32, device=layer.weight.device)
              for layer in layers}
    handles = []

    def consume(total: torch.Tensor):
        def hook(weight: torch.Tensor) -> None:  # the gradient, as soon as it is complete, into the total
            g = dist.all_reduce_sum_(weight.grad.float())  # summed over the ranks (in place: the grad is dropped next)
            total.add_(g.square_() if stat == "fisher" else g)
            weight.grad = None
        return hook

    try:
        for layer in layers:
            layer.weight.requires_grad_(True)
            handles.append(layer.weight.register_post_accumulate_grad_hook(consume(totals[id(layer)])))
        for batch, weight in pieces:
            with autocast():
                value = loss(model, batch) * weight
            value.backward()
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer.weight.requires_grad_(False)
            layer.weight.grad = None
    return totals


def select_by_scores(scores: dict[str, torch.Tensor], counts: dict[str, int], what: str) -> dict[str, torch.Tensor]:
    """Ω of each matrix: the flat indices of its ``counts[key]`` largest scores (ties to the lower
    index), matrices of one shape batched. A matrix whose scores are all zero (no gradient reached
    it) is an error naming it: its Ω would be positions 0..N-1."""
    for key, s in scores.items():
        if not bool(s.any()):
            raise DSEEError(f"Ω cannot be found for {key} (shape {tuple(s.shape)}) by {what}: every score is zero (no "
                            f"gradient reached this matrix), so Ω would be positions 0..N-1.")
    by_shape: dict[tuple, list[str]] = {}
    for key, s in scores.items():
        by_shape.setdefault((tuple(s.shape), counts[key]), []).append(key)
    out = {}
    for (_, n), keys in by_shape.items():
        for key, idx in zip(keys, top_n(torch.stack([scores[k].float().cpu() for k in keys]), n)):
            out[key] = idx.clone()
    return out
