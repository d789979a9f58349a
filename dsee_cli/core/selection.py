"""Exact k-of-n selection with deterministic ties, without sorting everything."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def smallest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape as the 2-D ``scores``) of exactly k smallest entries per row.

    Ties at the k-th value go to the lowest column index. One k-th value pass plus a few
    element-wise passes: far cheaper than a stable sort of the whole row.
    """
    rows, n = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < kth
    equal = scores == kth
    need = k - below.sum(1, keepdim=True)
    return below | (equal & (equal.cumsum(1) <= need))


def n_of_m_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool keep-mask of the n highest scores in every m consecutive columns of each row (ties to
    the lower index); the column count must be a multiple of m."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).view(rows, cols)


def largest_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) column indices of the k largest entries per row, ascending; ties to the lowest index."""
    values, idx = scores.topk(k, dim=1)
    kth = values[:, -1:]
    # topk's set is already the unique answer unless entries equal to the k-th value were left out
    if bool(((scores == kth).sum(1) == (values == kth).sum(1)).all()):
        return idx.sort(dim=1).values
    mask = smallest_k_mask(-scores, k)
    return mask.nonzero()[:, 1].view(scores.shape[0], k)


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2^32) ordered as the float32 scores are (-0.0 counted as +0.0)."""
    bits = (scores.detach().float().flatten() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31


def smallest_k_masks(pieces: Iterable[Callable[[], torch.Tensor]], k: int) -> list[torch.Tensor]:
    """``smallest_k_mask`` over the concatenation of several tensors, without concatenating them:
    each piece's scores are computed (by its callable) one at a time, and the k-th value is found
    by a radix select on the float bits (four passes of 256-bin histograms), so the largest tensor
    ever held is one piece. Exactly k entries are selected, ties to the earlier piece and index."""
    pieces = list(pieces)
    prefix, need = 0, k
    for shift in (24, 16, 8, 0):  # the threshold's key, 8 bits at a time from the top
        counts = torch.zeros(256, dtype=torch.int64)
        for compute in pieces:
            keys = _order_keys(compute())
            keys = keys[(keys >> (shift + 8)) == prefix] if shift < 24 else keys
            counts += torch.bincount(((keys >> shift) & 255).cpu(), minlength=256)
        below = torch.cumsum(counts, 0)
        digit = int(torch.searchsorted(below, torch.tensor(max(need, 1)))) if need > 0 else 0
        need -= int(below[digit - 1]) if digit else 0
        prefix = (prefix << 8) | digit
    masks = []
    for compute in pieces:  # below the threshold: all; equal to it: the first `need` in order
        scores = compute()
        keys = _order_keys(scores).view(scores.shape)
        equal = keys == prefix
        take = equal.flatten().cumsum(0).view(scores.shape) <= need
        need -= int(min(int(equal.sum()), max(need, 0)))
        masks.append((keys < prefix) | (equal & take) if k > 0 else torch.zeros_like(keys, dtype=torch.bool))
    return masks
