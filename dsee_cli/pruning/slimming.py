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
from dsee_cli.core.arch import attention_units, mlp_units, transformer_layers, weight_out_in
from dsee_cli.errors import DSEEError
from dsee_cli.pruning.heads import HeadScores, choose_heads, prune_ffn, prune_heads
from dsee_cli.tuning.adapters import DeltaLayer

# The model attribute naming frozen parameters that pruning changed (the folded projections):
# checkpoints and export/adapter must save them although they do not train.
FROZEN_CHANGED = "dsee_frozen_changed"


def _scale_inputs(module: nn.Module, args):
    scale = module.dsee_slim.repeat_interleave(module.dsee_slim_group)
    return (args[0] * scale.to(args[0].dtype), *args[1:])


def _consumers(model: nn.Module) -> list[tuple[nn.Module, int, int]]:
    """(module whose inputs are scaled, number of units, inputs per unit) for heads then FFNs."""
    out = []
    for unit in attention_units(model):
        out.append((model.get_submodule(unit.output), unit.num_heads, unit.head_dim))
    for unit in mlp_units(model):
        out.append((model.get_submodule(unit.contract), unit.channels, 1))
    return out


def add_slimming(model: nn.Module) -> None:
    for module, units, group in _consumers(model):
        if isinstance(module, DeltaLayer):
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


def has_slimming(model: nn.Module) -> bool:
    return any(hasattr(m, "dsee_slim") for m in model.modules())


def slim_and_prune(model: nn.Module, heads_to_remove: int, ffn_fraction: float, unit: str = "heads") -> dict:
    """Fold the learned coefficients in, then remove the weakest heads and FFN neurons per layer."""
    n_layers = len(transformer_layers(model))
    consumers = [m for m, _, _ in _consumers(model)]
    names = {id(m): n for n, m in model.named_modules()}
    setattr(model, FROZEN_CHANGED, set(getattr(model, FROZEN_CHANGED, ())) |
            {f"{names[id(m)]}.weight" for m in consumers})
    coeffs = [_fold_and_remove(m) for m in consumers]
    q = torch.stack(coeffs[:n_layers])  # a coefficient per query head; key/value heads have none
    scores = HeadScores(q, torch.zeros(n_layers, attention_units(model)[0].num_kv_heads))
    ffn_scores = coeffs[n_layers:]
    heads, ffn = dist.on_main(lambda: (choose_heads(scores, unit, heads_to_remove),  # decided once, on rank 0
                                       {layer: lowest_units(s, ffn_fraction) for layer, s in enumerate(ffn_scores)}))
    if heads:
        prune_heads(model, heads)
    prune_ffn(model, ffn)
    return {"heads_removed": {str(k): v for k, v in heads.items()},
            "ffn_removed": {str(k): len(v) for k, v in ffn.items()}}
