"""Structured pruning: attention heads and MLP channels removed for real (transformers 5.x has
no prune_heads).

Heads are scored by the criterion (|ΔW|) summed over their rows in the adapted projections:
a query head by its q rows, a key/value head by its k and v rows. Under grouped-query attention
(several query heads share one key/value head) the unit removed is one of ``HEAD_UNITS``:

* ``heads``: the k lowest heads of each layer where every head is its own group (BERT, GPT-2);
  under grouped-query attention the same as ``query-heads``.
* ``query-heads``: k / groups query heads from every group, keeping every key/value head, so
  each layer keeps one shape (the export loads with plain ``from_pretrained``).
* ``kv-group``: k / group-size whole groups (a key/value head and its query heads).

Removing query heads drops their q rows and o_proj columns; a key/value head goes with the last
of its query heads (k and v rows). B rows and Ω follow their rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsee_cli.core.arch import (
    AttentionUnit,
    attention_units,
    mlp_units,
    shrink_layer_inputs,
    shrink_layer_outputs,
    weight_out_in,
)
from dsee_cli.errors import DSEEError, choice_error
from dsee_cli.pruning.masks import criterion_scores
from dsee_cli.tuning.adapters import DeltaLayer

HEAD_UNITS = ("heads", "query-heads", "kv-group")


@dataclass
class HeadScores:
    """Per layer: the score of each query head (its q rows) and of each key/value head (k, v rows)."""

    q: torch.Tensor  # (layers, query heads)
    kv: torch.Tensor  # (layers, key/value heads)
    q_scored: bool = True  # the query rows were scored (q adapted): what tells the heads of one group apart

    def per_head(self) -> torch.Tensor:
        """(layers, query heads): a head's own rows plus its group's key/value rows (without
        grouped-query attention: all of the head's q, k and v rows)."""
        group = self.q.shape[1] // self.kv.shape[1]
        return self.q + self.kv.repeat_interleave(group, dim=1)


def _row_scores(modules: dict, name_row: tuple[str, int], heads: int, head_dim: int, criterion: str,
                gen: torch.Generator) -> torch.Tensor | None:
    """The criterion summed over each head's rows of one projection; None where it is not adapted (|W| or
    random rows of a plain projection under criterion weight / random, which read no ΔW)."""
    name, first = name_row
    module = modules[name]
    last = first + heads * head_dim
    if not isinstance(module, DeltaLayer):
        if criterion not in ("weight", "random"):
            return None
        w = weight_out_in(module)[first:last].detach().float().cpu()
        rows = w.abs() if criterion == "weight" else torch.rand(w.shape, generator=gen)
        return rows.view(heads, head_dim, -1).sum(dim=(1, 2))
    for k, (start, end) in enumerate(module.slices):  # the slice holding these rows (a PEFT layer: all rows)
        if start <= first and last <= end:
            rows = criterion_scores(module, k, criterion, gen)[first - start : last - start]
            return rows.float().cpu().view(heads, head_dim, -1).sum(dim=(1, 2))
    return None


def head_scores(model: nn.Module, criterion: str = "delta", seed: int = 0) -> HeadScores:
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    qs, kvs, q_scored = [], [], True
    for unit in attention_units(model):
        hd = unit.head_dim
        q = _row_scores(modules, unit.q, unit.num_heads, hd, criterion, gen)
        k = _row_scores(modules, unit.k, unit.num_kv_heads, hd, criterion, gen)
        v = _row_scores(modules, unit.v, unit.num_kv_heads, hd, criterion, gen)
        if q is None and k is None and v is None:
            raise DSEEError(
                f"Structured pruning scores heads by ΔW of the adapted attention projections, but no "
                f"query/key/value projection of layer {unit.layer} is adapted. Add one to adapter.targets "
                f"(e.g. q,v: query,value for BERT/RoBERTa, c_attn:q,c_attn:v for GPT-2, q_proj,v_proj for Llama)."
            )
        q_scored = q_scored and q is not None
        qs.append(q if q is not None else torch.zeros(unit.num_heads))
        kvs.append(sum(x for x in (k, v) if x is not None) if (k is not None or v is not None)
                   else torch.zeros(unit.num_kv_heads))
    return HeadScores(torch.stack(qs), torch.stack(kvs), q_scored)


def lowest_heads(scores: torch.Tensor, k: int) -> dict[int, list[int]]:
    """The k lowest-scoring heads of each layer (ties to the lower head index)."""
    if not 0 <= k < scores.shape[1]:
        raise DSEEError(
            f"pruning.heads_to_remove={k} is out of range: each layer has {scores.shape[1]} heads, "
            f"so it must be between 0 and {scores.shape[1] - 1}."
        )
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return {layer: sorted(order[layer].tolist()) for layer in range(scores.shape[0]) if k}


def heads_to_remove(unit: AttentionUnit, how: str, k: int, fraction: float = 0.0) -> int:
    """The query heads removed per layer: ``k``, or with ``fraction`` > 0 that share of the heads,
    rounded to the nearest count the unit allows (query-heads: a multiple of the key/value heads;
    kv-group: of the group size), at least one allowed step."""
    if fraction <= 0:
        return k
    step = 1 if unit.group_size == 1 else unit.num_kv_heads if how != "kv-group" else unit.group_size
    return max(step, round(fraction * unit.num_heads / step) * step)


def check_head_removal(unit: AttentionUnit, how: str, k: int) -> None:
    """A removal that cannot be honoured is an error before any training: a count that does not
    divide across the key/value groups, or one that leaves a layer without heads."""
    if how not in HEAD_UNITS:
        raise choice_error("head pruning unit (pruning.unit)", how, HEAD_UNITS)
    heads, groups, size = unit.num_heads, unit.num_kv_heads, unit.group_size
    if size == 1 or k == 0:
        if not 0 <= k < heads:
            raise DSEEError(f"pruning.heads_to_remove={k} is out of range: this model has {heads} heads per layer, "
                            f"so it must be between 0 and {heads - 1}.")
        return
    gqa = f"this model has {heads} query heads over {groups} key/value heads ({size} per group)"
    if how == "kv-group":
        if k % size or not 0 < k // size < groups:
            raise DSEEError(f"pruning.unit=kv-group pruning.heads_to_remove={k}: {gqa}, so whole groups are "
                            f"multiples of {size} query heads, from {size} to {size * (groups - 1)}.")
    elif k % groups or not 0 < k // groups < size:
        raise DSEEError(f"pruning.unit={how} pruning.heads_to_remove={k}: {gqa}; the same number of query heads "
                        f"goes from every group, so it must be a multiple of {groups} from {groups} to "
                        f"{groups * (size - 1)} (or pruning.unit=kv-group removes whole groups).")


def choose_heads(scores: HeadScores, how: str, k: int) -> dict[int, list[int]]:
    """The query heads to remove from each layer, ``k`` per layer, by unit (``HEAD_UNITS``)."""
    layers, heads = scores.q.shape
    groups = scores.kv.shape[1]
    size = heads // groups
    if size == 1 or k == 0:
        return lowest_heads(scores.per_head(), k)
    if how == "kv-group":
        group_score = scores.q.view(layers, groups, size).sum(-1) + scores.kv
        dropped = lowest_heads(group_score, k // size)
        return {layer: [g * size + j for g in gs for j in range(size)] for layer, gs in dropped.items()}
    if not scores.q_scored:
        raise DSEEError("pruning.unit=query-heads tells the query heads of a group apart by |ΔW| of their q rows, "
                        "but q is not adapted (its key/value rows are shared by the whole group). Add q to "
                        "adapter.targets, or use pruning.unit=kv-group.")
    per_group = torch.sort(scores.q.view(layers, groups, size), dim=-1, stable=True).indices[..., : k // groups]
    first = torch.arange(groups)[:, None] * size  # group g's heads are g·size .. g·size + size − 1
    return {layer: sorted((first + per_group[layer]).flatten().tolist()) for layer in range(layers)}


def channel_scores(model: nn.Module, criterion: str = "delta", seed: int = 0) -> list[torch.Tensor]:
    """Per layer, one score per MLP channel: the criterion over its rows of the expanding projections
    (SwiGLU's gate and up) and its column of the contracting one, from the adapted ones among them;
    |W| of all of them where none is adapted."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for unit in mlp_units(model):
        modules = {n: model.get_submodule(n) for n in (*unit.expand, unit.contract)}
        adapted = {n for n, m in modules.items() if isinstance(m, DeltaLayer) and len(m.slices) == 1}
        score = torch.zeros(unit.channels)
        for name, module in modules.items():
            if adapted and name not in adapted:
                continue
            s = criterion_scores(module, 0, criterion, gen) if adapted else \
                _plain_scores(weight_out_in(getattr(module, "base", module)), criterion, gen)
            score += (s.sum(dim=0) if name == unit.contract else s.sum(dim=1)).float().cpu()
        out.append(score)
    return out


def _plain_scores(w: torch.Tensor, criterion: str, gen: torch.Generator) -> torch.Tensor:
    """A projection that is not adapted: random scores under criterion=random, else |W|."""
    return torch.rand(w.shape, generator=gen) if criterion == "random" else w.detach().abs().float().cpu()


@torch.no_grad()
def shrink_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the given output rows (sorted) of a Linear/Conv1D or of a ΔW layer around one.

    ``keep`` lives on the CPU: index bookkeeping stays there (also for meta-device models).
    """
    if isinstance(module, DeltaLayer):
        module.shrink_outputs(keep)
    else:
        shrink_layer_outputs(module, keep)


@torch.no_grad()
def shrink_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the given input columns (sorted)."""
    if isinstance(module, DeltaLayer):
        module.shrink_inputs(keep)
    else:
        shrink_layer_inputs(module, keep)


def prune_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """Really remove the given query heads of each layer, and each key/value head whose group
    loses all of its query heads (transformers 5.x has no prune_heads)."""
    if getattr(model.config, "dsee_pruned_heads", None):
        raise DSEEError("this model already had heads pruned; prune once, from the dense model")
    modules = dict(model.named_modules())
    for unit in attention_units(model):
        dropped = set(heads.get(unit.layer, heads.get(str(unit.layer), [])))
        if dropped:
            _remove_heads(modules, unit, dropped)
    model.config.dsee_pruned_heads = {str(k): sorted(v) for k, v in heads.items() if v}


def _remove_heads(modules: dict, unit: AttentionUnit, dropped: set[int]) -> None:
    size, hd = unit.group_size, unit.head_dim
    kept = [h for h in range(unit.num_heads) if h not in dropped]
    per_group = {g: sum(h // size == g for h in kept) for g in range(unit.num_kv_heads)}
    kept_kv = [g for g, n in per_group.items() if n]
    if not kept or len({per_group[g] for g in kept_kv}) != 1:
        raise DSEEError(f"Cannot remove query heads {sorted(dropped)} of layer {unit.layer}: every layer keeps at "
                        f"least one head, and every key/value group it keeps the same number of query heads "
                        f"({unit.num_heads} heads, {size} per group).")

    def rows(kept_heads: list[int], first: int) -> torch.Tensor:
        return torch.tensor([first + h * hd + d for h in kept_heads for d in range(hd)], dtype=torch.long)

    by_module: dict[str, list[torch.Tensor]] = {}
    for (name, first), kept_heads in ((unit.q, kept), (unit.k, kept_kv), (unit.v, kept_kv)):
        by_module.setdefault(name, []).append(rows(kept_heads, first))
    for name, parts in by_module.items():
        shrink_outputs(modules[name], torch.cat(parts))
    shrink_inputs(modules[unit.output], rows(kept, 0))
    unit.set_heads(unit.attention, len(kept), len(kept_kv), hd)


def prune_ffn(model: nn.Module, removed: dict[int, list[int]]) -> None:
    """Really remove MLP channels: rows of the expanding projections (SwiGLU: gate and up),
    input columns of the contracting one."""
    for unit in mlp_units(model):
        dropped = set(removed.get(unit.layer, removed.get(str(unit.layer), [])))
        if not dropped:
            continue
        keep = torch.tensor([i for i in range(unit.channels) if i not in dropped], dtype=torch.long)
        if not len(keep):
            raise DSEEError(f"Cannot remove every MLP channel of layer {unit.layer}.")
        for name in unit.expand:
            shrink_outputs(model.get_submodule(name), keep)
        shrink_inputs(model.get_submodule(unit.contract), keep)
    model.config.dsee_pruned_ffn = {str(k): sorted(v) for k, v in removed.items() if v}
