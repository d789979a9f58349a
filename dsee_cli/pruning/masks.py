"""Unstructured and N:M pruning masks (Algorithm 2, Phase II).

Adapted slices are scored by the criterion (|ΔW| by default), everything else in the
transformer blocks by |W|; each pool (adapted, other) gets exactly the requested sparsity,
globally or per layer. N:M keeps the N best of every M consecutive inputs. A pool's threshold
is found matrix by matrix (core.selection.smallest_k_masks): no tensor ever holds every score
of the model, so a global threshold over a 7B model costs one matrix of memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dsee_cli.core.arch import block_linears, dims, weight_out_in
from dsee_cli.core.selection import n_of_m_keep, smallest_k_mask, smallest_k_masks
from dsee_cli.errors import DSEEError
from dsee_cli.tuning.adapters import DeltaLayer

_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)  # the first entry in the highest bit, as numpy.packbits


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 bytes, 8 entries each (numpy.packbits's layout), on the mask's device."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    values = torch.tensor(_BIT_VALUES, dtype=torch.int32, device=flat.device)
    return (flat.view(-1, 8).to(torch.int32) * values).sum(1).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= int(d)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return ((bits[:, None] >> shifts) & 1).flatten()[:n].bool().view(*shape)


@dataclass
class PackedMask:
    """The keep-mask of a frozen weight that pruning already zeroed, at one bit per weight: training
    never reads it (the weight does not change), checkpoints, export and IMP's next round do. As a
    bool tensor it would cost half of a bf16 base's memory."""

    bits: torch.Tensor
    shape: tuple[int, ...]

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.shape)


def mask_tensor(mask: torch.Tensor | PackedMask) -> torch.Tensor:
    return mask.unpack() if isinstance(mask, PackedMask) else mask


@dataclass
class Piece:
    """A block of rows of one module's out x in weight, scored as one unit of a pool. Its scores
    are computed when asked (``scores()``), so no more than one matrix's are held at a time."""

    module: str
    rows: tuple[int, int]
    pool: str  # "adapted" or "other"
    layer: int
    compute: Callable[[], torch.Tensor]
    kept: torch.Tensor | PackedMask | None = None  # an earlier round's keep-mask of the module (IMP)

    def scores(self) -> torch.Tensor:
        s = self.compute()
        if self.kept is None:
            return s
        # entries an earlier round pruned score below everything, so they stay pruned
        kept = mask_tensor(self.kept)[self.rows[0]:self.rows[1]]
        return torch.where(kept.to(s.device), s, torch.full_like(s, -1.0))


def criterion_scores(adapter: DeltaLayer, k: int, criterion: str, gen: torch.Generator) -> torch.Tensor:
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


def _weight_rows(w: torch.Tensor, start: int, end: int) -> Callable[[], torch.Tensor]:
    return lambda: w[start:end].detach().abs().float()


def _adapted_rows(module: DeltaLayer, k: int, criterion: str, seed: int) -> Callable[[], torch.Tensor]:
    # the random criterion draws from a generator of its own per piece: the same numbers however often asked
    return lambda: criterion_scores(module, k, criterion, torch.Generator().manual_seed(seed))


def score_pieces(model: nn.Module, criterion: str, seed: int) -> list[Piece]:
    pieces = []
    for name, module in block_linears(model).items():
        layer = _layer_of(name)
        if isinstance(module, DeltaLayer):
            w = weight_out_in(module.base)
            cursor = 0
            for k, (start, end) in enumerate(module.slices):
                if start > cursor:
                    pieces.append(Piece(name, (cursor, start), "other", layer, _weight_rows(w, cursor, start)))
                pieces.append(Piece(name, (start, end), "adapted", layer,
                                    _adapted_rows(module, k, criterion, seed * 100_003 + len(pieces))))
                cursor = end
            if cursor < module.out_features:
                pieces.append(Piece(name, (cursor, module.out_features), "other", layer,
                                    _weight_rows(w, cursor, module.out_features)))
        else:
            w = weight_out_in(module)
            pieces.append(Piece(name, (0, w.shape[0]), "other", layer, _weight_rows(w, 0, w.shape[0])))
    masks = {**getattr(model, "dsee_other_masks", {}),
             **{n: m.mask for n, m in block_linears(model).items() if isinstance(m, DeltaLayer) and m.mask is not None}}
    for p in pieces:
        p.kept = masks.get(p.module)
    return pieces


def _columns(model: nn.Module, piece: Piece) -> int:
    return dims(model.get_submodule(piece.module))[1]


def _in_scope(piece: Piece, scope: str) -> bool:
    """scope=adapted (Table 7) prunes the adapted matrices only; the other pool keeps every weight."""
    return not (scope == "adapted" and piece.pool == "other")


def unstructured_masks(model: nn.Module, criterion: str, granularity: str, scope: str, sparsity: float,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Keep-masks (out x in, bool) for every linear in the blocks, ``sparsity`` of each pool pruned:
    under one threshold per pool (global), per pool and block (layer), per pool and matrix (matrix),
    or in every output row of each piece (row: Wanda's grouping, exactly round(sparsity·in) per row)."""
    pieces = score_pieces(model, criterion, seed)
    if granularity == "row":
        keep = {id(p): ~smallest_k_mask(p.scores(), round((sparsity if _in_scope(p, scope) else 0.0)
                                                          * _columns(model, p))) for p in pieces}
        return _assemble(model, pieces, keep)
    groups: dict[object, list[Piece]] = {}
    for p in pieces:  # one threshold per pool, per pool and transformer block, or per pool and matrix
        key = {"global": p.pool, "layer": (p.pool, p.layer), "matrix": (p.pool, p.module)}[granularity]
        groups.setdefault(key, []).append(p)
    keep_by_piece: dict[int, torch.Tensor] = {}
    for members in groups.values():  # exactly round(sparsity·n) of each pool, ties to the earlier entry
        pool_sparsity = sparsity if _in_scope(members[0], scope) else 0.0
        n = sum((p.rows[1] - p.rows[0]) * _columns(model, p) for p in members)
        pruned = smallest_k_masks([p.scores for p in members], round(pool_sparsity * n))
        for p, mask in zip(members, pruned):
            keep_by_piece[id(p)] = ~mask
    return _assemble(model, pieces, keep_by_piece)


def nm_masks(model: nn.Module, criterion: str, n: int, m: int, seed: int = 0, scope: str = "blocks"
             ) -> dict[str, torch.Tensor]:
    """N:M keep-masks along the input dimension (what sparse tensor cores accelerate); with
    scope=adapted only the adapted rows take the pattern and every other weight is kept."""
    pieces = score_pieces(model, criterion, seed)
    keep_by_piece = {}
    for p in pieces:
        scores = p.scores()
        if not _in_scope(p, scope):
            keep_by_piece[id(p)] = torch.ones_like(scores, dtype=torch.bool)
            continue
        if scores.shape[1] % m:
            raise DSEEError(f"N:M pruning needs in_features divisible by m={m}; {p.module} has {scores.shape[1]}.")
        keep_by_piece[id(p)] = n_of_m_keep(scores, n, m)
    return _assemble(model, pieces, keep_by_piece)


def _assemble(model, pieces, keep_by_piece) -> dict[str, torch.Tensor]:
    linears = block_linears(model)
    masks: dict[str, torch.Tensor] = {}
    for p in pieces:
        if p.module not in masks:
            w = weight_out_in(linears[p.module].base if isinstance(linears[p.module], DeltaLayer)
                              else linears[p.module])
            masks[p.module] = torch.ones(w.shape, dtype=torch.bool, device=w.device)
        masks[p.module][p.rows[0] : p.rows[1]] = keep_by_piece[id(p)]
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], mask_delta: bool = True) -> None:
    """Zero the pruned pretrained weights; adapters keep the mask for the recovery forward.

    Masks of layers without an adapter are kept on ``model.dsee_other_masks`` for checkpoints
    and export: as bool tensors where the weight trains (re-applied after each step), bit-packed
    where it is frozen (zeroing it once suffices for training).
    """
    linears = block_linears(model)
    others = {}
    for name, mask in masks.items():
        module = linears[name]
        if isinstance(module, DeltaLayer):
            module.set_mask(mask, mask_delta)
        else:
            w = weight_out_in(module)
            w.mul_(mask)
            others[name] = mask if w.requires_grad else PackedMask(pack_bits(mask), tuple(mask.shape))
    model.dsee_other_masks = others


@torch.no_grad()
def reapply_masks(model: nn.Module) -> None:
    """Zero pruned entries of weights that train (full fine-tuning, FT-top): after each step."""
    for name, mask in getattr(model, "dsee_other_masks", {}).items():
        w = weight_out_in(model.get_submodule(name))
        if w.requires_grad:
            w.mul_(mask_tensor(mask))


