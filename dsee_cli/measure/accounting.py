"""Counting what the paper reports: trainable parameters, non-zero parameters, FLOPs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from dsee_cli.core.arch import attention_units, block_linears, dims, task_head_params, weight_out_in
from dsee_cli.tuning.adapters import DeltaLayer, adapters_of
from dsee_cli.tuning.sparse_training import SparseTrainLinear


@dataclass(frozen=True)
class TrainableCounts:
    adapter_low_rank: int
    adapter_sparse: int
    task_head: int
    other: int  # anything else left trainable (full fine-tuning, BitFit, ...)

    @property
    def adapter(self) -> int:
        return self.adapter_low_rank + self.adapter_sparse

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "adapter": self.adapter, "total": self.adapter + self.task_head + self.other}


def trainable_counts(model: nn.Module) -> TrainableCounts:
    low = sparse = 0
    adapter_ids = set()
    for adapter in adapters_of(model).values():
        a, s = adapter.num_adapter_parameters()
        low, sparse = low + a, sparse + s
        adapter_ids.update(id(p) for p in adapter.adapter_parameters())
    head_ids = {id(p) for _, p in task_head_params(model)}
    head = sum(p.numel() for _, p in task_head_params(model) if p.requires_grad)
    other = sum(p.numel() for p in model.parameters()
                if p.requires_grad and id(p) not in adapter_ids and id(p) not in head_ids)
    return TrainableCounts(low, sparse, head, other)


def scope_size(model: nn.Module) -> tuple[int, int]:
    """(total entries, non-zero entries) of the block linears' weights, as the model computes.

    For adapters with a mask, the effective weight is M⊙(W+ΔW), whose zeros are the mask's.
    """
    total = nonzero = 0
    for module in block_linears(model).values():
        w = weight_out_in(getattr(module, "base", module))
        total += w.numel()
        if isinstance(module, SparseTrainLinear):  # sparse training: the weight is M ⊙ W
            nonzero += int(module.mask.sum())
        elif isinstance(module, DeltaLayer) and module.mask is not None and module.mask_delta:
            nonzero += int(module.mask.sum())
        elif isinstance(module, DeltaLayer) and not module.merged:
            nonzero += int((w + module.delta_weight()).ne(0).sum())
        else:
            nonzero += int(w.ne(0).sum())
    return total, nonzero


def inference_flops(model: nn.Module, seq_len: int, unmerged_adapters: bool = False) -> int:
    """Dense multiply-add FLOPs (2 per MAC) of the transformer blocks for one sequence.

    Linear layers count 2·L·in·out; attention scores and the weighted sum of values count
    2·2·L²·(heads·head_dim). Embeddings and the task head are left out: they are the same
    for every method compared. ``unmerged_adapters`` adds the adapters' own FLOPs, the
    paper's convention (its LoRA row reads 1.01×); merged, as exported, they cost nothing.
    """
    flops = 0
    if unmerged_adapters:
        flops += sum(a.adapter_flops(seq_len) for a in adapters_of(model).values())
    for module in block_linears(model).values():
        out_f, in_f = dims(getattr(module, "base", module))
        flops += 2 * seq_len * out_f * in_f
    for unit in attention_units(model):
        flops += 2 * 2 * seq_len * seq_len * unit.num_heads * unit.head_dim
    return flops
