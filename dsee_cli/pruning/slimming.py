"""EarlyBERT's structured pruning (Chen et al. 2021b, Table 6's baseline).

Slimming coefficients, one per attention head and one per FFN neuron, scale those units'
outputs (a forward pre-hook on the projection that consumes them) and train with the model
under an L1 penalty. Then, per layer, the heads and neurons with the smallest |c| are removed
for real, after folding c into the consuming projection so the kept units compute exactly
what they did with the coefficients.
"""

from __future__ import annotations

import torch
from torch import nn

from dsee_cli.core import dist
from dsee_cli.core.arch import GPT2, attention_units, family_of, layer_prefix, transformer_layers, weight_out_in
from dsee_cli.errors import DSEEError
from dsee_cli.pruning.heads import lowest_heads, prune_heads, shrink_inputs, shrink_outputs
from dsee_cli.tuning.adapters import DSEELinear

# The model attribute naming frozen parameters that pruning changed (the folded projections):
# checkpoints and export/adapter must save them although they do not train.
FROZEN_CHANGED = "dsee_frozen_changed"


def ffn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(expanding, contracting) projection names of each block's FFN."""
    prefix = layer_prefix(model)
    if family_of(model) is GPT2:
        parts = ("mlp.c_fc", "mlp.c_proj")
    else:
        parts = ("intermediate.dense", "output.dense")
    return [(f"{prefix}.{i}.{parts[0]}", f"{prefix}.{i}.{parts[1]}") for i in range(len(transformer_layers(model)))]


def _scale_inputs(module: nn.Module, args):
    scale = module.dsee_slim.repeat_interleave(module.dsee_slim_group)
    return (args[0] * scale.to(args[0].dtype), *args[1:])


def _consumers(model: nn.Module) -> list[tuple[nn.Module, int, int]]:
    """(module whose inputs are scaled, number of units, inputs per unit) for heads then FFNs."""
    out = []
    for unit in attention_units(model):
        out.append((model.get_submodule(unit.output), unit.num_heads, unit.head_dim))
    for _, contract in ffn_pairs(model):
        module = model.get_submodule(contract)
        out.append((module, weight_out_in(module).shape[1], 1))
    return out


def add_slimming(model: nn.Module) -> None:
    for module, units, group in _consumers(model):
        if isinstance(module, DSEELinear):
            raise DSEEError("pruning=earlybert folds its coefficients into the attention-output and FFN-output "
                            "projections, so those must not be adapted; drop them from adapter.targets.")
        w = weight_out_in(module)
        module.dsee_slim = nn.Parameter(torch.ones(units, device=w.device, dtype=w.dtype))
        module.dsee_slim_group = group
        module.dsee_slim_handle = module.register_forward_pre_hook(_scale_inputs)


def slimming_penalty(model: nn.Module) -> torch.Tensor:
    return sum(m.dsee_slim.abs().sum() for m, _, _ in _consumers(model))


@torch.no_grad()
def _fold_and_remove(module: nn.Module) -> torch.Tensor:
    coeff = module.dsee_slim.detach().clone()
    weight_out_in(module).mul_(coeff.repeat_interleave(module.dsee_slim_group)[None, :])
    module.dsee_slim_handle.remove()
    del module.dsee_slim, module.dsee_slim_group, module.dsee_slim_handle
    return coeff.abs().float().cpu()


def lowest_units(scores: torch.Tensor, fraction: float) -> list[int]:
    k = round(fraction * scores.numel())
    return sorted(torch.sort(scores, stable=True).indices[:k].tolist())


def prune_ffn(model: nn.Module, removed: dict[int, list[int]]) -> None:
    """Really remove FFN neurons: rows of the expanding projection, inputs of the contracting one."""
    for layer, (expand, contract) in enumerate(ffn_pairs(model)):
        dropped = set(removed.get(layer, removed.get(str(layer), [])))
        if not dropped:
            continue
        n = weight_out_in(model.get_submodule(expand)).shape[0]
        keep = torch.tensor([i for i in range(n) if i not in dropped], dtype=torch.long)
        shrink_outputs(model.get_submodule(expand), keep)
        shrink_inputs(model.get_submodule(contract), keep)
    model.config.dsee_pruned_ffn = {str(k): sorted(v) for k, v in removed.items() if v}


def has_slimming(model: nn.Module) -> bool:
    return any(hasattr(m, "dsee_slim") for m in model.modules())


def slim_and_prune(model: nn.Module, heads_to_remove: int, ffn_fraction: float) -> dict:
    """Fold the learned coefficients in, then remove the weakest heads and FFN neurons per layer."""
    n_layers = len(transformer_layers(model))
    consumers = [m for m, _, _ in _consumers(model)]
    names = {id(m): n for n, m in model.named_modules()}
    setattr(model, FROZEN_CHANGED, set(getattr(model, FROZEN_CHANGED, ())) |
            {f"{names[id(m)]}.weight" for m in consumers})
    coeffs = [_fold_and_remove(m) for m in consumers]
    head_scores, ffn_scores = torch.stack(coeffs[:n_layers]), coeffs[n_layers:]
    heads, ffn = dist.on_main(lambda: (lowest_heads(head_scores, heads_to_remove),  # decided once, on rank 0
                                       {layer: lowest_units(s, ffn_fraction) for layer, s in enumerate(ffn_scores)}))
    if heads:
        prune_heads(model, heads)
    prune_ffn(model, ffn)
    return {"heads_removed": {str(k): v for k, v in heads.items()},
            "ffn_removed": {str(k): len(v) for k, v in ffn.items()}}
