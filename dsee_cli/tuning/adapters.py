"""The sparse + low-rank adapter: ΔW = (α/r)·B·A + P_Ω(S).

S is stored as N trainable values plus N fixed flat indices into the adapted slice
(never as a dense m x n parameter). ``card(Ω) = 0`` is exactly LoRA.
Works on ``nn.Linear`` (out x in) and GPT-2 ``Conv1D`` (in x out), and on output-row
slices of a fused layer (GPT-2 ``c_attn`` q and v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from dsee_cli.core.arch import (
    Target,
    WrappedLayer,
    dims,
    replace_param,
    resolve_targets,
    shrink_layer_inputs,
    shrink_layer_outputs,
    task_head_params,
    weight_out_in,
)
from dsee_cli.errors import DSEEError, choice_error

INITS = ("kaiming", "normal")
SPARSE_SCALES = ("none", "lowrank")  # P_Ω(S) as is, or times α/r as the reference code's modeling_bert.py


@dataclass
class LowRankConfig:
    """What a ``DSEELinear`` adds: the first fields of the ``adapter`` section (tuning.AdapterConfig)."""

    rank: int = 16  # dsee / lora: the rank r of B·A
    alpha: float = 32.0  # dsee / lora: B·A is scaled by alpha / r
    omega_size: int = 16  # dsee: card(Ω) per adapted matrix; 0 is LoRA
    density: float = 0.0  # dsee / rosa: card(Ω) = floor(density·m·n) per matrix (RoSA's d), over omega_size; 0: off
    lora_lr: float | None = None  # dsee / rosa: phase I's peak rate of B, A (RoSA: 7e-4, S at 2e-4); null: the phase's
    dropout: float = 0.0  # dsee / lora: dropout on the adapter's input
    init: str = "kaiming"  # dsee / lora: A's start, kaiming (LoRA, PEFT) or normal (N(0, 0.02), the paper)
    # dsee: P_Ω(S) unscaled (none), or scaled by alpha / r as B·A is (lowrank: the reference code)
    sparse_scale: str = "none"

    def check(self) -> None:
        if self.rank < 1:
            raise DSEEError(f"adapter.rank={self.rank} is invalid: the rank must be >= 1.")
        if self.omega_size < 0:
            raise DSEEError(f"adapter.omega_size={self.omega_size} is invalid: card(Ω) must be >= 0 (0 is LoRA).")
        if not 0.0 <= self.density < 1.0:
            raise DSEEError(f"adapter.density={self.density} is invalid: the fraction of each matrix in Ω must be in "
                            f"[0, 1) (0: adapter.omega_size sets card(Ω)).")
        if self.lora_lr is not None and self.lora_lr <= 0:
            raise DSEEError(f"adapter.lora_lr={self.lora_lr} must be > 0 (null: B and A at the phase's rate).")
        if self.init not in INITS:
            raise choice_error("A's initialisation (adapter.init)", self.init, INITS)
        if self.sparse_scale not in SPARSE_SCALES:
            raise choice_error("the sparse term's scale (adapter.sparse_scale)", self.sparse_scale, SPARSE_SCALES)
        if not 0.0 <= self.dropout < 1.0:
            raise DSEEError(f"adapter.dropout={self.dropout} must be in [0, 1).")

    @property
    def has_sparse(self) -> bool:
        """Whether ΔW has a sparse part P_Ω(S) (card(Ω) > 0)."""
        return self.omega_size > 0 or self.density > 0


class DeltaLayer(WrappedLayer):
    """A frozen pretrained layer plus a trained ΔW: what pruning by |ΔW|, masked recovery,
    accounting and export see. ``DSEELinear`` (ours) and ``PeftLinear`` (any mergeable PEFT
    method, tuning/peft_bridge.py) are the two kinds.

    ΔW lives on output-row ``slices`` of the layer (a PEFT layer: one slice, all rows). After
    unstructured pruning, ``mask`` (out x in) is set, W is stored masked, and the forward computes
    with M⊙(W+ΔW) (``mask_delta``) or with M⊙W + ΔW."""

    base_path = "base"  # where the pretrained layer sits under this module (checkpoint names)
    slices: list[tuple[int, int]]
    out_features: int
    in_features: int

    def _init_state(self) -> None:
        self.register_buffer("mask", None)
        self.mask_delta = True
        self.recompute_masked_delta = True  # false: keep each layer's dense M⊙ΔW for backward (faster, more memory)
        self.merged = False

    # -- what a kind provides -------------------------------------------------------------------
    def slice_delta(self, k: int) -> torch.Tensor:
        """ΔW of slice k as a dense (rows x in) matrix, differentiable."""
        raise NotImplementedError

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def num_adapter_parameters(self) -> tuple[int, int]:
        """(low-rank count, sparse count) of the trainable adapter entries."""
        raise NotImplementedError

    def adapter_flops(self, seq_len: int) -> int:
        """The adapter's own multiply-add FLOPs for one sequence, unmerged."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Fixed tensors that are neither parameters nor buffers of the state dict (Ω, SHiRA's
        indices), for checkpoints and export/adapter, keyed by a name without dots."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def _shrink_adapter_rows(self, keep: torch.Tensor) -> None:
        raise NotImplementedError

    def _shrink_adapter_cols(self, keep: torch.Tensor) -> None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The full ΔW as out x in (zero on rows that are not adapted)."""
        parts, cursor = [], 0
        w = self.base.weight
        for k, (start, end) in enumerate(self.slices):
            if start > cursor:
                parts.append(w.new_zeros(start - cursor, self.in_features))
            parts.append(self.slice_delta(k))
            cursor = end
        if cursor < self.out_features:
            parts.append(w.new_zeros(self.out_features - cursor, self.in_features))
        return torch.cat(parts, 0)

    def _base_weight_out_in(self) -> torch.Tensor:
        return weight_out_in(self.base)

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Recovery after unstructured pruning: the model really computes with M⊙(W+ΔW) (W is
        stored masked already)."""
        delta = self.delta_weight() * self.mask
        return F.linear(x, self._base_weight_out_in() + delta, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.mask is not None and self.mask_delta:
            if self.recompute_masked_delta and torch.is_grad_enabled():
                # Only x is kept for backward: the dense M⊙ΔW (and W + M⊙ΔW) of this layer exist
                # while it computes and are rebuilt in its backward, never held across the model.
                return checkpoint(self._masked_forward, x, use_reentrant=False)
            return self._masked_forward(x)
        return self._adapted_forward(x)

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor, mask_delta: bool = True) -> None:
        """Prune: W zeroed where not kept, and from now on the forward computes M⊙(W + ΔW) (M⊙W + ΔW
        without ``mask_delta``): at this moment exactly the tuned weight M⊙(W + ΔW) that was scored."""
        self._base_weight_out_in().mul_(keep)
        self.mask, self.mask_delta = keep, mask_delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW (masked when a mask is set) into the base weight (exports merge a copy)."""
        if self.merged:
            return
        delta = self.delta_weight()
        w = self._base_weight_out_in()
        if self.mask is not None:
            w.copy_((w + delta) * self.mask) if self.mask_delta else w.add_(delta)
        else:
            w.add_(delta)
        self.merged = True

    @torch.no_grad()
    def shrink_outputs(self, keep: torch.Tensor) -> None:
        """Keep only the given output rows (sorted, on the CPU): of W, of ΔW's factors, of the mask."""
        shrink_layer_outputs(self.base, keep)
        self._shrink_adapter_rows(keep)
        if self.mask is not None:
            self.mask = self.mask[keep]
        self.out_features = len(keep)

    @torch.no_grad()
    def shrink_inputs(self, keep: torch.Tensor) -> None:
        """Keep only the given input columns (sorted, on the CPU)."""
        shrink_layer_inputs(self.base, keep)
        self._shrink_adapter_cols(keep)
        if self.mask is not None:
            self.mask = self.mask[:, keep]
        self.in_features = len(keep)


class DSEELinear(DeltaLayer):
    """Wraps a frozen Linear/Conv1D and adds ΔW on some of its output-row slices."""

    def __init__(self, base: nn.Module, slices: tuple[tuple[int, int], ...], settings: LowRankConfig):
        super().__init__()
        self.base = base
        self.is_conv1d = isinstance(base, Conv1D)
        self.out_features, self.in_features = dims(base)
        self.rank = settings.rank
        self.scaling = settings.alpha / settings.rank
        self.sparse_scaling = self.scaling if settings.sparse_scale == "lowrank" else 1.0
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.slices = [tuple(s) for s in slices]
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.sparse_values = nn.ParameterList()
        for k, (start, end) in enumerate(self.slices):
            self.lora_A.append(nn.Parameter(torch.empty(self.rank, self.in_features, device=dev, dtype=dt)))
            self.lora_B.append(nn.Parameter(torch.zeros(end - start, self.rank, device=dev, dtype=dt)))
            self.sparse_values.append(nn.Parameter(torch.zeros(0, device=dev, dtype=dt)))
            self.register_buffer(f"omega_{k}", torch.zeros(0, dtype=torch.long, device=dev))
        self._init_state()
        self.reset_parameters(settings.init)

    # -- parameters ---------------------------------------------------------------------------
    def reset_parameters(self, init: str = "kaiming") -> None:
        """B = 0 and S = 0, so ΔW = 0: the wrapped model computes exactly what it did before."""
        with torch.no_grad():
            for a, b, s in zip(self.lora_A, self.lora_B, self.sparse_values):
                if init == "normal":
                    nn.init.normal_(a, std=0.02)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b.zero_()
                s.zero_()

    def omega(self, k: int) -> torch.Tensor:
        return getattr(self, f"omega_{k}")

    def set_omega(self, k: int, flat_indices: torch.Tensor) -> None:
        """Fix Ω of slice k (flat indices into its rows x in_features); its values start at 0."""
        flat_indices = flat_indices.to(device=self.base.weight.device, dtype=torch.long)
        setattr(self, f"omega_{k}", flat_indices)
        self.sparse_values[k] = nn.Parameter(
            torch.zeros(len(flat_indices), device=self.base.weight.device, dtype=self.base.weight.dtype)
        )

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"omega_{k}": self.omega(k) for k in range(len(self.slices))}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, idx in tensors.items():
            self.set_omega(int(key.rsplit("_", 1)[1]), idx)

    def slice_delta(self, k: int) -> torch.Tensor:
        start, end = self.slices[k]
        delta = (self.lora_B[k] @ self.lora_A[k]) * self.scaling
        idx = self.omega(k)
        if idx.numel():  # under autocast the low-rank product is bf16/fp16 while S stays fp32
            values = self.sparse_values[k].to(delta.dtype)
            delta = delta.flatten().index_add(0, idx, values, alpha=self.sparse_scaling).view(end - start, -1)
        return delta

    # -- forward ------------------------------------------------------------------------------
    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout, as in LoRA, acts on the ΔW path only."""
        if isinstance(self.dropout, nn.Identity):
            return super()._masked_forward(x)
        return self.base(x) + F.linear(self.dropout(x), self.delta_weight() * self.mask)

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        xd = self.dropout(x)
        pieces = []
        for k in range(len(self.slices)):
            d = (xd @ self.lora_A[k].t()) @ self.lora_B[k].t() * self.scaling
            idx = self.omega(k)
            if idx.numel():
                rows, cols = idx // self.in_features, idx % self.in_features
                sparse = (xd[..., cols] * self.sparse_values[k]).to(d.dtype)
                d = d.index_add(-1, rows, sparse, alpha=self.sparse_scaling)
            pieces.append(d)
        if len(self.slices) == 1 and self.slices[0] == (0, self.out_features):
            return out + pieces[0]
        delta = out.new_zeros(out.shape)
        for (start, end), d in zip(self.slices, pieces):
            delta[..., start:end] = d
        return out + delta

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_A, *self.lora_B, *self.sparse_values]

    def num_adapter_parameters(self) -> tuple[int, int]:
        low = sum(p.numel() for p in (*self.lora_A, *self.lora_B))
        return low, sum(p.numel() for p in self.sparse_values)

    def adapter_flops(self, seq_len: int) -> int:
        return sum(2 * seq_len * self.rank * (self.in_features + end - start) + 2 * seq_len * s.numel()
                   for (start, end), s in zip(self.slices, self.sparse_values))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo an unmasked merge (this ΔW does not read W, so subtracting it restores W)."""
        if not self.merged:
            return
        if self.mask is not None and self.mask_delta:
            raise RuntimeError("a masked merge cannot be undone: pruned weights are gone")
        self._base_weight_out_in().sub_(self.delta_weight())
        self.merged = False

    # -- structured pruning ---------------------------------------------------------------------
    def _shrink_adapter_rows(self, keep: torch.Tensor) -> None:
        """B rows and Ω follow their rows; the slices close up."""
        new_pos = torch.full((self.out_features,), -1, dtype=torch.long)
        new_pos[keep] = torch.arange(len(keep))
        new_slices = []
        for k, (start, end) in enumerate(self.slices):
            local_keep = keep[(keep >= start) & (keep < end)] - start
            replace_param(self.lora_B, str(k), self.lora_B[k][local_keep])
            local_pos = torch.full((end - start,), -1, dtype=torch.long)
            local_pos[local_keep] = torch.arange(len(local_keep))
            self._remap_omega(k, row_map=local_pos, col_map=None, new_in=self.in_features)
            first = int(new_pos[start:end][new_pos[start:end] >= 0].min()) if len(local_keep) else 0
            new_slices.append((first, first + len(local_keep)))
        self.slices = new_slices

    def _shrink_adapter_cols(self, keep: torch.Tensor) -> None:
        pos = torch.full((self.in_features,), -1, dtype=torch.long)
        pos[keep] = torch.arange(len(keep))
        for k in range(len(self.slices)):
            replace_param(self.lora_A, str(k), self.lora_A[k][:, keep])
            self._remap_omega(k, row_map=None, col_map=pos, new_in=len(keep))

    def _remap_omega(self, k: int, row_map, col_map, new_in: int) -> None:
        """Drop Ω entries in removed rows/columns and re-index the rest (maps: old -> new or -1)."""
        if self.omega(k).numel() == 0:
            return
        r, c = remap_flat(self.omega(k).cpu(), self.in_features, row_map, col_map)
        alive = (r >= 0) & (c >= 0)
        values = self.sparse_values[k].detach()[alive.to(self.sparse_values[k].device)]
        self.set_omega(k, r[alive] * new_in + c[alive])
        self.sparse_values[k].data.copy_(values)

    def extra_repr(self) -> str:
        n = sum(v.numel() for v in self.sparse_values)
        return f"slices={self.slices}, rank={self.rank}, scaling={self.scaling:g}, card(Ω)={n}, " \
               f"sparse scaling={self.sparse_scaling:g}"


def remap_flat(flat: torch.Tensor, in_features: int, row_map, col_map) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of flat out x in indices after removing rows / columns (maps: old -> new
    or -1 where removed; None: unchanged)."""
    r, c = flat // in_features, flat % in_features
    return (row_map[r] if row_map is not None else r), (col_map[c] if col_map is not None else c)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapters_of(model: nn.Module) -> dict[str, DeltaLayer]:
    """Every layer with a trained ΔW (ours or a PEFT method's), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaLayer)}


def inject_adapters(
    model: nn.Module, settings: LowRankConfig, targets: list[str] | tuple[str, ...] | None = None
) -> dict[str, DSEELinear]:
    """Wrap the target modules in place; freeze all but adapters and the task head."""
    resolved: list[Target] = resolve_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in task_head_params(model):
        p.requires_grad_(True)
    wrapped = {}
    for t in resolved:
        adapter = DSEELinear(model.get_submodule(t.name), t.slices, settings)
        _set_submodule(model, t.name, adapter)
        wrapped[t.name] = adapter
    return wrapped


def set_omegas(adapters: dict[str, DSEELinear], omegas: dict[str, torch.Tensor]) -> None:
    """omegas maps ``"<module>#<slice k>"`` to flat indices (see :func:`omega_keys`)."""
    for key, idx in omegas.items():
        name, _, k = key.rpartition("#")
        adapters[name].set_omega(int(k), idx)


def omega_keys(adapters: dict[str, DeltaLayer]) -> dict[str, tuple[DSEELinear, int]]:
    return {f"{n}#{k}": (a, k) for n, a in adapters.items() if isinstance(a, DSEELinear) for k in range(len(a.slices))}


def slice_pretrained_weight(adapter: DSEELinear, k: int) -> torch.Tensor:
    start, end = adapter.slices[k]
    return weight_out_in(adapter.base)[start:end]


def unwrap_adapters(model: nn.Module) -> None:
    """Merge every adapter and put the plain base layer back (for export)."""
    for name, adapter in adapters_of(model).items():
        adapter.merge()
        _set_submodule(model, name, adapter.base)
