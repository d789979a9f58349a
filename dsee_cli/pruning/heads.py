"""Structured pruning: attention heads removed for real (transformers 5.x has no prune_heads).

Per layer, the k heads with the least summed criterion (|ΔW|) over their rows in the adapted
projections go: q/k/v rows, attention-output input columns, B rows and Ω.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_cli.core.arch import attention_units, set_head_count
from dsee_cli.errors import DSEEError
from dsee_cli.pruning.masks import criterion_scores
from dsee_cli.tuning.adapters import DSEELinear


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
                    s = criterion_scores(module, k, criterion, gen).cpu()
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
