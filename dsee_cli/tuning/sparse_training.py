"""Sparse training during fine-tuning (the PST paper): PST, magnitude pruning (MaP) and
movement pruning (MvP), all driven by the cubic sparsity schedule of Zhu & Gupta.

* PST: W = W₀ + β·U·V (W₀ frozen), importance S = |W| + α₁·A·B + α₂·(R + C); the forward
  uses W ⊙ TopV(S). Trains U, V, A, B, R, C: (n + k)(r₁ + r₂ + 1) per n x k matrix.
* MaP: the weights train in full; the mask keeps the largest |W| (data-free, no gradient).
* MvP: the weights train in full, and so do scores of the same shape (initialised to |W₀|,
  as the PST paper did), with their own learning rate; the mask keeps the highest scores.

The mask is a straight-through estimator: its value is the cached binary top-v mask, its
gradient goes to the scores unchanged (mask + S − stop_grad(S)). The top-v selection of the
current scores is recomputed every ``schedule.every`` steps for the whole phase, at the final
sparsity too (the PST paper's Eq. 7 and movement pruning take it on every forward; so the
straight-through scores keep choosing the mask during the cool-down); ``schedule.refresh=on_change``
recomputes it only when the scheduled sparsity changes. The mask covers every linear layer of
the transformer blocks; top-v is per layer or global.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_cli.core.arch import WrappedLayer, block_linears, dims, weight_out_in
from dsee_cli.core.selection import smallest_k_mask
from dsee_cli.errors import DSEEError, choice_error

SCORE_TERMS = ("weight", "lowrank", "structured")  # |W₀ + βUV|, α₁AB, α₂(R + C)
TOPK = ("layer", "global")
REFRESH = ("every", "on_change")  # when the top-v mask is recomputed


@dataclass
class ScheduleConfig:
    """Cubic sparsity schedule (Zhu & Gupta 2018) up to the run's ``sparsity`` (``final``)."""

    initial: float = 0.0  # the sparsity the schedule starts from
    warmup: float = 0.1  # fraction of phase I held at `initial`
    cooldown: float = 0.3  # fraction held at the final sparsity
    every: int = 10  # steps between mask updates (and between the ramp's sparsity steps)
    # every: the top-v of the current scores every `every` steps, cool-down included (PST, MvP);
    # on_change: only when the scheduled sparsity changes (the mask then freezes in the cool-down)
    refresh: str = "every"

    def check(self, final: float) -> None:
        if not 0.0 <= self.initial <= final < 1.0:
            raise DSEEError(f"the sparsity schedule needs 0 <= initial ({self.initial}) <= final "
                            f"(sparsity={final}) < 1.")
        if self.warmup < 0 or self.cooldown < 0 or self.warmup + self.cooldown >= 1.0:
            raise DSEEError(f"adapter.sparse_training.schedule.warmup={self.warmup} and .cooldown={self.cooldown} "
                            f"must be >= 0 and leave part of training for the ramp (warmup + cooldown < 1).")
        if self.every < 1:
            raise DSEEError(f"adapter.sparse_training.schedule.every={self.every} must be >= 1 step.")
        if self.refresh not in REFRESH:
            raise choice_error("when the mask is recomputed (adapter.sparse_training.schedule.refresh)",
                               self.refresh, REFRESH)

    def refreshes(self, step: int) -> bool:
        """Whether the top-v mask is recomputed before ``step`` (0-based) even if the sparsity holds."""
        return self.refresh == "every" and step % self.every == 0

    def at(self, step: int, total: int, final: float) -> float:
        """Sparsity at ``step`` of ``total``: s_f + (s_i − s_f)(1 − (t − t_w)/(T − t_w − t_c))³."""
        start = self.warmup * total
        ramp = total - start - self.cooldown * total
        if step < start:
            return self.initial
        if step >= start + ramp:
            return final
        t = math.floor((step - start) / self.every) * self.every  # the mask changes every `every` steps
        return final + (self.initial - final) * (1.0 - t / ramp) ** 3


@dataclass
class SparseTrainingConfig:
    """``adapter.sparse_training``: PST's parametrisation and importance, and the schedule (pst / map / mvp)."""

    r1: int = 8  # pst: rank of the importance's A·B
    r2: int = 8  # pst: rank of the weight update U·V
    beta: float = 1.0  # pst: W = W₀ + β·U·V
    alpha1: float = 1.0  # pst: weight of α₁·A·B in the importance
    alpha2: float = 1.0  # pst: weight of α₂·(R + C)
    score_terms: list[str] = field(default_factory=lambda: list(SCORE_TERMS))  # pst: the importance's terms
    topk: str = "layer"  # top-v per layer or global
    score_lr: float = 1e-4  # mvp: the scores' learning rate (they start at |W₀|)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def check(self, method: str) -> None:
        """The method's own settings (the schedule is checked against the run's sparsity by the config)."""
        if self.topk not in TOPK:
            raise choice_error("top-k granularity (adapter.sparse_training.topk)", self.topk, TOPK)
        bad = [t for t in self.score_terms if t not in SCORE_TERMS]
        if bad or not self.score_terms:
            raise DSEEError(f"adapter.sparse_training.score_terms={list(self.score_terms)} is invalid: choose one "
                            f"or more of {', '.join(SCORE_TERMS)}.")
        if method == "pst" and (self.r1 < 0 or self.r2 < 1):
            raise DSEEError(f"PST needs adapter.sparse_training.r1 >= 0 and .r2 >= 1, got r1={self.r1}, r2={self.r2}.")
        if "lowrank" in self.score_terms and self.r1 < 1:
            raise DSEEError("the lowrank importance term (α₁AB) needs adapter.sparse_training.r1 >= 1.")


class _StraightThrough(torch.autograd.Function):
    """Forward: the cached binary mask. Backward: the gradient passes to the scores as is."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` highest scores (ties to the lower index), by one k-th value
    pass rather than a sort: it runs over every block weight at each schedule step."""
    flat = scores.detach().flatten()
    return smallest_k_mask(-flat[None], keep)[0].view(scores.shape)


class SparseTrainLinear(WrappedLayer):
    """A block linear trained sparse: W_eff = W ⊙ M, with W and the scores per the method."""

    def __init__(self, base: nn.Module, s: SparseTrainingConfig, method: str):
        super().__init__()
        self.base = base
        self.method = method
        self.is_conv1d = isinstance(base, Conv1D)
        self.out_features, self.in_features = dims(base)
        self.settings = s
        w = weight_out_in(base)
        dev, dt = w.device, w.dtype
        n, k = self.out_features, self.in_features
        if method == "pst":
            base.weight.requires_grad_(False)
            self.U = nn.Parameter(torch.zeros(n, s.r2, device=dev, dtype=dt))  # U = 0: W starts at W₀
            self.V = nn.Parameter(torch.empty(s.r2, k, device=dev, dtype=dt))
            nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
            if "lowrank" in s.score_terms:
                self.A = nn.Parameter(torch.empty(n, s.r1, device=dev, dtype=dt))  # Gaussian A, zero B
                nn.init.normal_(self.A, std=0.02)
                self.B = nn.Parameter(torch.zeros(s.r1, k, device=dev, dtype=dt))
            if "structured" in s.score_terms:
                self.R = nn.Parameter(torch.zeros(n, 1, device=dev, dtype=dt))
                self.C = nn.Parameter(torch.zeros(1, k, device=dev, dtype=dt))
        else:
            base.weight.requires_grad_(True)
            if method == "mvp":
                self.scores = nn.Parameter(w.detach().abs().clone())
        self.register_buffer("mask", torch.ones(n, k, dtype=torch.bool, device=dev))
        self.sparsity = 0.0

    # -- the weight and its importance -------------------------------------------------------
    def weight(self) -> torch.Tensor:
        """W (out x in): W₀ + β·U·V for PST, the trained W otherwise."""
        w = weight_out_in(self.base)
        if self.method == "pst":
            return w + self.settings.beta * (self.U @ self.V)
        return w

    def importance(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        s = self.settings
        if self.method == "map":
            return weight_out_in(self.base).detach().abs()
        if self.method == "mvp":
            return self.scores
        weight = self.weight() if weight is None else weight
        score = torch.zeros_like(weight)
        if "weight" in s.score_terms:
            score = score + weight.abs()
        if "lowrank" in s.score_terms:
            score = score + s.alpha1 * (self.A @ self.B)
        if "structured" in s.score_terms:
            score = score + s.alpha2 * (self.R + self.C)
        return score

    def effective_weight(self) -> torch.Tensor:
        weight = self.weight()
        if self.method == "map":
            return weight * self.mask
        return weight * _StraightThrough.apply(self.importance(weight), self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.base.bias)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad and p is not self.base.bias)

    @torch.no_grad()
    def final_weight(self) -> torch.Tensor:
        """M ⊙ (W₀ + β·U·V) (PST) or M ⊙ W: what the exported model holds."""
        return self.weight() * self.mask


def sparse_layers(model: nn.Module) -> dict[str, SparseTrainLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseTrainLinear)}


def inject_sparse_training(model: nn.Module, s: SparseTrainingConfig, method: str) -> dict[str, SparseTrainLinear]:
    """Wrap every linear of the transformer blocks. PST freezes W₀; MaP / MvP train it."""
    layers = {}
    for name, module in block_linears(model).items():
        wrapped = SparseTrainLinear(module, s, method)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapped)
        layers[name] = wrapped
    return layers


@torch.no_grad()
def update_masks(model: nn.Module, sparsity: float, topk: str = "layer", refresh: bool = False) -> bool:
    """Recompute the top-v masks for ``sparsity`` if it changed, or from the current scores
    anyway with ``refresh``; returns whether it did."""
    layers = sparse_layers(model)
    if not layers or (not refresh and all(abs(m.sparsity - sparsity) < 1e-12 for m in layers.values())):
        return False
    scores = {n: m.importance().detach().float() for n, m in layers.items()}
    if topk == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep_all = top_mask(flat, flat.numel() - round(sparsity * flat.numel()))
        offset = 0
        for name, m in layers.items():
            count = scores[name].numel()
            m.mask.copy_(keep_all[offset : offset + count].view_as(m.mask))
            offset += count
    else:
        for name, m in layers.items():
            count = scores[name].numel()
            m.mask.copy_(top_mask(scores[name], count - round(sparsity * count)))
    for m in layers.values():
        m.sparsity = sparsity
    return True


@torch.no_grad()
def finalize_sparse_training(model: nn.Module) -> None:
    """Put plain layers back holding M ⊙ W (the export path is then DSEE's)."""
    for name, m in sparse_layers(model).items():
        weight = m.final_weight()
        base = m.base
        target = base.weight
        target.requires_grad_(False)
        target.copy_(weight.t() if m.is_conv1d else weight)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
