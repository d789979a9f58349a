"""Phase II: prune the pretrained weights using ΔW (Algorithm 2).

Unstructured: adapted slices are scored by the criterion (|ΔW| by default), everything else
in the transformer blocks by |W|; each pool (adapted, other) gets exactly the requested
sparsity, globally or per layer. N:M keeps the N best of every M consecutive inputs.
Structured: per layer, the k heads with the least summed |ΔW| over their rows in the adapted
projections are removed for real: q/k/v rows, attention-output input columns, B rows and Ω.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import DSEELinear
from .arch import attention_units, block_linears, set_head_count, weight_out_in
from .errors import DSEEError, choice_error
from .selection import smallest_k_mask

METHODS = ("none", "unstructured", "nm", "structured", "imp", "earlybert")
SCOPES = ("blocks", "adapted")
CRITERIA = ("delta", "delta_plus_weight", "weight", "random")
GRANULARITIES = ("global", "layer")


@dataclass(frozen=True)
class PruningSettings:
    method: str = "unstructured"
    sparsity: float = 0.3
    criterion: str = "delta"
    granularity: str = "global"
    n: int = 2  # N:M — keep n of every m
    m: int = 4
    heads_to_remove: int = 3
    mask_delta: bool = True  # False reproduces the reference code: ΔW stays dense in recovery
    seed: int = 0
    scope: str = "blocks"  # adapted: prune only the adapted matrices (the other pool keeps everything)
    rounds: int = 1  # imp
    rate: float = 0.1  # imp: fraction of the remaining weights removed per round
    rewind: bool = False  # imp: reset the trained tensors after each pruning (BERT tickets)
    ffn_fraction: float = 0.4  # earlybert
    slimming_l1: float = 1e-4  # earlybert

    def round_sparsities(self) -> list[float]:
        """The sparsity after each prune step: none → [], one-shot → [s], IMP → 1 − (1 − rate)^r."""
        if self.method == "none":
            return []
        if self.method == "imp":
            return [1.0 - (1.0 - self.rate) ** r for r in range(1, self.rounds + 1)]
        return [self.sparsity]

    def check(self) -> None:
        if self.method not in METHODS:
            raise choice_error("pruning method (pruning.method)", self.method, METHODS)
        if self.criterion not in CRITERIA:
            raise choice_error("pruning criterion (pruning.criterion)", self.criterion, CRITERIA)
        if self.granularity not in GRANULARITIES:
            raise choice_error("pruning granularity (pruning.granularity)", self.granularity, GRANULARITIES)
        if not 0.0 <= self.sparsity < 1.0:
            raise DSEEError(f"sparsity={self.sparsity} is out of range: it must be in [0, 1).")
        if self.method == "nm" and not 0 < self.n < self.m:
            raise DSEEError(f"N:M pruning needs 0 < n < m, got pruning.n={self.n}, pruning.m={self.m}.")
        if self.scope not in SCOPES:
            raise choice_error("pruning scope (pruning.scope)", self.scope, SCOPES)
        if self.rounds < 1:
            raise DSEEError(f"pruning.rounds={self.rounds} is invalid: IMP needs at least one round.")
        if not 0.0 < self.rate < 1.0:
            raise DSEEError(f"pruning.rate={self.rate} is out of range: it must be in (0, 1).")
        if not 0.0 <= self.ffn_fraction < 1.0:
            raise DSEEError(f"pruning.ffn_fraction={self.ffn_fraction} is out of range: it must be in [0, 1).")
        if self.slimming_l1 < 0:
            raise DSEEError(f"pruning.slimming_l1={self.slimming_l1} must be >= 0.")


@dataclass
class Piece:
    """A block of rows of one module's out x in weight, scored as one unit of a pool."""

    module: str
    rows: tuple[int, int]
    pool: str  # "adapted" or "other"
    layer: int
    scores: torch.Tensor


def _criterion_scores(adapter: DSEELinear, k: int, criterion: str, gen: torch.Generator) -> torch.Tensor:
    start, end = adapter.slices[k]
    with torch.no_grad():
        delta = adapter.slice_delta(k).float()
        w = weight_out_in(adapter.base)[start:end].float()
        if criterion == "delta":
            return delta.abs()
        if criterion == "delta_plus_weight":
            return (w + delta).abs()
        if criterion == "weight":
            return w.abs()
        return torch.rand(delta.shape, generator=gen).to(delta.device)


def _layer_of(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return -1


def score_pieces(model: nn.Module, criterion: str, seed: int) -> list[Piece]:
    gen = torch.Generator().manual_seed(seed)
    pieces = []
    for name, module in block_linears(model).items():
        layer = _layer_of(name)
        if isinstance(module, DSEELinear):
            w = weight_out_in(module.base).detach()
            cursor = 0
            for k, (start, end) in enumerate(module.slices):
                if start > cursor:
                    pieces.append(Piece(name, (cursor, start), "other", layer, w[cursor:start].abs().float()))
                scores = _criterion_scores(module, k, criterion, gen)
                pieces.append(Piece(name, (start, end), "adapted", layer, scores))
                cursor = end
            if cursor < module.out_features:
                rest = w[cursor:].abs().float()
                pieces.append(Piece(name, (cursor, module.out_features), "other", layer, rest))
        else:
            w = weight_out_in(module).detach()
            pieces.append(Piece(name, (0, w.shape[0]), "other", layer, w.abs().float()))
    # Entries an earlier round pruned (IMP) score below everything, so they stay pruned.
    masks = {**getattr(model, "dsee_other_masks", {}),
             **{n: m.mask for n, m in block_linears(model).items() if isinstance(m, DSEELinear) and m.mask is not None}}
    for p in pieces:
        if p.module in masks:
            kept = masks[p.module][p.rows[0] : p.rows[1]].to(p.scores.device)
            p.scores = torch.where(kept, p.scores, torch.full_like(p.scores, -1.0))
    return pieces


def _keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Exactly round(sparsity·numel) entries pruned: the lowest scores, ties to the lower index."""
    flat = scores.flatten()
    n_prune = round(sparsity * flat.numel())
    return ~smallest_k_mask(flat[None], n_prune)[0].view(scores.shape)


def unstructured_masks(model: nn.Module, settings: PruningSettings) -> dict[str, torch.Tensor]:
    """Keep-masks (out x in, bool) for every linear in the blocks."""
    pieces = score_pieces(model, settings.criterion, settings.seed)
    if settings.granularity == "global":
        groups: dict[object, list[Piece]] = {}
        for p in pieces:
            groups.setdefault(p.pool, []).append(p)
    else:
        groups = {}
        for p in pieces:
            groups.setdefault((p.pool, p.layer), []).append(p)
    keep_by_piece: dict[int, torch.Tensor] = {}
    for members in groups.values():
        # scope=adapted (Table 7) prunes the adapted matrices only; the other pool keeps all.
        sparsity = 0.0 if settings.scope == "adapted" and members[0].pool == "other" else settings.sparsity
        keep = _keep_mask(torch.cat([p.scores.flatten() for p in members]), sparsity)
        offset = 0
        for p in members:
            n = p.scores.numel()
            keep_by_piece[id(p)] = keep[offset : offset + n].view(p.scores.shape)
            offset += n
    return _assemble(model, pieces, keep_by_piece)


def nm_masks(model: nn.Module, settings: PruningSettings) -> dict[str, torch.Tensor]:
    """N:M keep-masks along the input dimension (what sparse tensor cores accelerate)."""
    pieces = score_pieces(model, settings.criterion, settings.seed)
    keep_by_piece = {}
    for p in pieces:
        rows, cols = p.scores.shape
        if cols % settings.m:
            raise DSEEError(f"N:M pruning needs in_features divisible by m={settings.m}; {p.module} has {cols}.")
        groups = p.scores.reshape(rows, cols // settings.m, settings.m)
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., : settings.n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
        keep_by_piece[id(p)] = keep.view(rows, cols)
    return _assemble(model, pieces, keep_by_piece)


def _assemble(model, pieces, keep_by_piece) -> dict[str, torch.Tensor]:
    linears = block_linears(model)
    masks: dict[str, torch.Tensor] = {}
    for p in pieces:
        if p.module not in masks:
            w = weight_out_in(linears[p.module].base if isinstance(linears[p.module], DSEELinear)
                              else linears[p.module])
            masks[p.module] = torch.ones(w.shape, dtype=torch.bool, device=w.device)
        masks[p.module][p.rows[0] : p.rows[1]] = keep_by_piece[id(p)]
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], mask_delta: bool = True) -> None:
    """Zero the pruned pretrained weights; adapters keep the mask for the recovery forward.

    Masks of layers without an adapter are kept on ``model.dsee_other_masks`` for checkpoints
    and export (those weights are frozen, so zeroing them once suffices for training).
    """
    linears = block_linears(model)
    others = {}
    for name, mask in masks.items():
        module = linears[name]
        if isinstance(module, DSEELinear):
            weight_out_in(module.base).mul_(mask)
            module.mask = mask
            module.mask_delta = mask_delta
        else:
            weight_out_in(module).mul_(mask)
            others[name] = mask
    model.dsee_other_masks = others


def compute_masks(model: nn.Module, settings: PruningSettings) -> dict[str, torch.Tensor]:
    if settings.method in ("unstructured", "imp"):
        return unstructured_masks(model, settings)
    if settings.method == "nm":
        return nm_masks(model, settings)
    raise ValueError(settings.method)


@torch.no_grad()
def reapply_masks(model: nn.Module) -> None:
    """Zero pruned entries of weights that train (full fine-tuning, FT-top): after each step."""
    for name, mask in getattr(model, "dsee_other_masks", {}).items():
        w = weight_out_in(model.get_submodule(name))
        if w.requires_grad:
            w.mul_(mask)


# -- structured: attention heads ----------------------------------------------------------------
def head_scores(model: nn.Module, criterion: str = "delta", seed: int = 0) -> torch.Tensor:
    """(layers, heads): the criterion summed over each head's rows in the adapted projections."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    rows = []
    for unit in attention_units(model):
        score = torch.zeros(unit.num_heads)
        adapted_any = False
        for name, (start, end) in unit.qkv:
            module = modules[name]
            if not isinstance(module, DSEELinear):
                continue
            for k, sl in enumerate(module.slices):
                if sl == (start, end):
                    s = _criterion_scores(module, k, criterion, gen).cpu()
                    score += s.view(unit.num_heads, unit.head_dim, -1).sum(dim=(1, 2))
                    adapted_any = True
        if not adapted_any:
            raise DSEEError(
                f"Structured pruning scores heads by ΔW of the adapted attention projections, but no "
                f"query/key/value projection of layer {unit.layer} is adapted. Add one to adapter.targets "
                f"(e.g. query,value for BERT/RoBERTa, c_attn:q,c_attn:v for GPT-2)."
            )
        rows.append(score)
    return torch.stack(rows)


def lowest_heads(scores: torch.Tensor, k: int) -> dict[int, list[int]]:
    """The k lowest-scoring heads of each layer (ties to the lower head index)."""
    if not 0 <= k < scores.shape[1]:
        raise DSEEError(
            f"pruning.heads_to_remove={k} is out of range: each layer has {scores.shape[1]} heads, "
            f"so it must be between 0 and {scores.shape[1] - 1}."
        )
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return {layer: sorted(order[layer].tolist()) for layer in range(scores.shape[0]) if k}


def _replace_param(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(owner, name)
    setattr(owner, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


@torch.no_grad()
def shrink_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the given output rows (sorted) of a Linear/Conv1D or of an adapter around one.

    ``keep`` lives on the CPU: index bookkeeping stays there (also for meta-device models).
    """
    base = module.base if isinstance(module, DSEELinear) else module
    if isinstance(base, Conv1D):
        _replace_param(base, "weight", base.weight[:, keep])
        base.nf = len(keep)
    else:
        _replace_param(base, "weight", base.weight[keep])
        base.out_features = len(keep)
    if base.bias is not None:
        _replace_param(base, "bias", base.bias[keep])
    if not isinstance(module, DSEELinear):
        return
    new_pos = torch.full((module.out_features,), -1, dtype=torch.long)
    new_pos[keep] = torch.arange(len(keep))
    new_slices = []
    for k, (start, end) in enumerate(module.slices):
        local_keep = keep[(keep >= start) & (keep < end)] - start
        _replace_param(module.lora_B, str(k), module.lora_B[k][local_keep])
        local_pos = torch.full((end - start,), -1, dtype=torch.long)
        local_pos[local_keep] = torch.arange(len(local_keep))
        _remap_omega(module, k, row_map=local_pos, col_map=None, new_in=module.in_features)
        first = int(new_pos[start : end][new_pos[start:end] >= 0].min()) if len(local_keep) else 0
        new_slices.append((first, first + len(local_keep)))
    module.slices = new_slices
    if module.mask is not None:
        module.mask = module.mask[keep]
    module.out_features = len(keep)


@torch.no_grad()
def shrink_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the given input columns (sorted)."""
    base = module.base if isinstance(module, DSEELinear) else module
    if isinstance(base, Conv1D):
        _replace_param(base, "weight", base.weight[keep])
        base.nx = len(keep)
    else:
        _replace_param(base, "weight", base.weight[:, keep])
        base.in_features = len(keep)
    if not isinstance(module, DSEELinear):
        return
    old_in = module.in_features
    pos = torch.full((old_in,), -1, dtype=torch.long)
    pos[keep] = torch.arange(len(keep))
    for k in range(len(module.slices)):
        _replace_param(module.lora_A, str(k), module.lora_A[k][:, keep])
        _remap_omega(module, k, row_map=None, col_map=pos, new_in=len(keep))
    if module.mask is not None:
        module.mask = module.mask[:, keep]
    module.in_features = len(keep)


def _remap_omega(module: DSEELinear, k: int, row_map, col_map, new_in: int) -> None:
    """Drop Ω entries in removed rows/columns and re-index the rest (maps: old -> new or -1)."""
    if module.omega(k).numel() == 0:
        return
    idx = module.omega(k).cpu()
    r, c = idx // module.in_features, idx % module.in_features
    if row_map is not None:
        r = row_map[r]
    if col_map is not None:
        c = col_map[c]
    alive = (r >= 0) & (c >= 0)
    values = module.sparse_values[k].detach()[alive.to(module.sparse_values[k].device)]
    module.set_omega(k, r[alive] * new_in + c[alive])
    module.sparse_values[k].data.copy_(values)


def prune_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """Really remove the given heads of each layer (transformers 5.x has no prune_heads)."""
    if getattr(model.config, "dsee_pruned_heads", None):
        raise DSEEError("this model already had heads pruned; prune once, from the dense model")
    modules = dict(model.named_modules())
    for unit in attention_units(model):
        dropped = set(heads.get(unit.layer, heads.get(str(unit.layer), [])))
        if not dropped:
            continue
        kept_heads = [h for h in range(unit.num_heads) if h not in dropped]
        cols = torch.tensor([h * unit.head_dim + d for h in kept_heads for d in range(unit.head_dim)],
                            dtype=torch.long)
        by_module: dict[str, list[torch.Tensor]] = {}
        for name, (start, _end) in unit.qkv:
            by_module.setdefault(name, []).append(cols + start)
        for name, parts in by_module.items():
            shrink_outputs(modules[name], torch.cat(parts))
        shrink_inputs(modules[unit.output], cols)
        set_head_count(unit, len(kept_heads))
    model.config.dsee_pruned_heads = {str(k): sorted(v) for k, v in heads.items() if v}
