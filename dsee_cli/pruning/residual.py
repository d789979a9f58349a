"""Hidden-width pruning: channels of the residual stream removed for real (Minitron's embedding
axis); the activation scores structured pruning ranks heads, MLP channels and hidden channels by;
the replay of removed units (checkpoints, load_merged) and the shapes an export states.

A residual channel is a column of the token embedding (and of the tied LM head), an entry of
every RMSNorm's weight, an input column of every projection that reads the stream (q, k, v, the
expanding MLP projections, the LM or task head) and an output row of every one that writes it
(o, the contracting MLP projection). Removing it changes one thing besides dropping its terms:
an RMSNorm's mean square then runs over the kept channels only (divided by the kept count), so the
pruned model is not the dense model with those channels zeroed; tests/test_structured.py writes
that reference by hand.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dsee_cli.core.arch import (
    attention_units,
    family_of,
    hidden_width,
    layer_prefix,
    mlp_units,
    replace_param,
    shrink_layer_inputs,
    state_pruned_shapes,
    transformer_layers,
    weight_out_in,
)
from dsee_cli.errors import DSEEError
from dsee_cli.pruning.heads import HeadScores, prune_ffn, prune_heads, shrink_inputs, shrink_outputs
from dsee_cli.pruning.masks import criterion_scores
from dsee_cli.tuning.adapters import DeltaLayer


@dataclass(frozen=True)
class ResidualSites:
    """Where the residual stream is read and written, by module name."""

    embedding: str
    norms: tuple[str, ...]  # every block's RMSNorms, then the final one
    readers: tuple[str, ...]  # input columns follow the channels (q, k, v, gate, up)
    writers: tuple[str, ...]  # output rows follow the channels (o, down)
    head: str | None  # the LM head or task head (input columns), None where it is tied to the embedding


def residual_sites(model: nn.Module) -> ResidualSites:
    fam = family_of(model)
    if fam.residual is None:
        raise DSEEError(f"hidden-channel pruning is for decoders built like Llama; the {fam.name} family's residual "
                        f"stream is not described (pruning.hidden_channels=0).")
    prefix = layer_prefix(model)
    dot = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""  # the base model's prefix ("model.", or none)
    norms = tuple(f"{prefix}.{i}.{n}" for i in range(len(transformer_layers(model))) for n in fam.residual.block_norms)
    readers, writers = [], []
    for unit in attention_units(model):
        readers += list(dict.fromkeys(name for name, _ in (unit.q, unit.k, unit.v)))
        writers.append(unit.output)
    for unit in mlp_units(model):
        readers += list(unit.expand)
        writers.append(unit.contract)
    embedding = f"{dot}{fam.residual.embedding}"
    head = _head_name(model)
    emb_weight = model.get_submodule(embedding).weight
    tied = head is not None and model.get_submodule(head).weight is emb_weight
    return ResidualSites(embedding, (*norms, f"{dot}{fam.residual.final_norm}"), tuple(readers), tuple(writers),
                         None if tied else head)


def _head_name(model: nn.Module) -> str | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        for prefix in family_of(model).task_head:  # a decoder's classification head (score)
            if isinstance(getattr(model, prefix, None), nn.Linear):
                return prefix
        return None
    return next(name for name, m in model.named_modules() if m is out)


@torch.no_grad()
def prune_hidden(model: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the given residual channels (sorted, on the CPU) everywhere the stream goes. The
    config records the removed ones (``dsee_pruned_hidden``) until export states the new
    hidden_size where the config class accepts it (``state_pruned_shapes``); head_dim is stated
    at once, as it is no longer hidden_size / heads."""
    if getattr(model.config, "dsee_pruned_hidden", None):
        raise DSEEError("this model already had hidden channels pruned; prune once, from the dense model")
    width = hidden_width(model)
    if not 0 < len(keep) < width + 1:
        raise DSEEError(f"Cannot keep {len(keep)} of {width} hidden channels: at least one must stay.")
    kept = set(keep.tolist())
    removed = [i for i in range(width) if i not in kept]
    sites = residual_sites(model)
    embed = model.get_submodule(sites.embedding)
    tied_head = None if sites.head is not None else _head_name(model)
    replace_param(embed, "weight", embed.weight[:, keep.to(embed.weight.device)])
    embed.embedding_dim = len(keep)
    if tied_head is not None:  # the tied LM head shares the embedding's (new) parameter
        head = model.get_submodule(tied_head)
        head.weight = embed.weight
        head.in_features = len(keep)
    elif sites.head is not None:
        shrink_layer_inputs(model.get_submodule(sites.head), keep)
    for name in sites.norms:
        norm = model.get_submodule(name)
        replace_param(norm, "weight", norm.weight[keep.to(norm.weight.device)])
    for name in sites.readers:
        shrink_inputs(model.get_submodule(name), keep)
    for name in sites.writers:
        shrink_outputs(model.get_submodule(name), keep)
    model.config.head_dim = attention_units(model)[0].head_dim  # no longer hidden_size / heads
    model.config.dsee_pruned_hidden = removed


def delta_hidden_scores(model: nn.Module, criterion: str = "delta", seed: int = 0) -> torch.Tensor:
    """One score per residual channel from the criterion (|ΔW|, |W + ΔW|): the columns of the adapted
    projections that read the stream plus the rows of those that write it; an error where none of
    them is adapted. Under weight / random every projection counts (|W|, or chance)."""
    gen = torch.Generator().manual_seed(seed)
    sites = residual_sites(model)
    plain = criterion in ("weight", "random")
    score = None
    for name in (*sites.readers, *sites.writers):
        module = model.get_submodule(name)
        if isinstance(module, DeltaLayer) and len(module.slices) == 1:
            s = criterion_scores(module, 0, criterion, gen).float().cpu()
        elif plain:
            w = weight_out_in(getattr(module, "base", module)).detach().float().cpu()
            s = w.abs() if criterion == "weight" else torch.rand(w.shape, generator=gen)
        else:
            continue
        part = s.sum(dim=0) if name in sites.readers else s.sum(dim=1)
        score = part if score is None else score + part
    if score is None:
        raise DSEEError(f"pruning.hidden_channels with pruning.criterion={criterion} scores residual channels by "
                        f"|ΔW| of the adapted projections that read or write the stream, and none is adapted. Use "
                        f"pruning.criterion=activation (calibration activations), or adapt q, k, v, o, gate, up or "
                        f"down.")
    return score


@dataclass
class ActivationScores:
    """Structured importance from one calibration pass: per layer each query head's and each MLP
    channel's contribution to the residual stream, and per residual channel what the projections
    reading the stream take from it (see ``activation_scores``)."""

    heads: HeadScores
    channels: list[torch.Tensor]
    hidden: torch.Tensor | None  # None: the family's residual stream is not described
    tokens: int


class _Moments:
    """Σ y and Σ ‖y‖² over tokens, per unit, in float64: the centered energy Σ‖y − ȳ‖² at the end."""

    def __init__(self) -> None:
        self.n, self.total, self.squares = 0, None, None

    def add(self, total: torch.Tensor, squares: torch.Tensor, n: int) -> None:
        total, squares = total.double().cpu(), squares.double().cpu()
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.n += n

    def centered(self) -> torch.Tensor:
        """Per unit: Σ‖y‖² − ‖Σy‖² / N (the last axis of ``total`` summed where a unit's y is a vector)."""
        mean_part = self.total.pow(2)
        if mean_part.dim() > self.squares.dim():
            mean_part = mean_part.sum(-1)
        return (self.squares - mean_part / max(1, self.n)).clamp_min(0)


@torch.no_grad()
def activation_scores(model: nn.Module, batches: list[dict[str, torch.Tensor]], autocast=contextlib.nullcontext
                      ) -> ActivationScores:
    """On the calibration tokens (padding excluded), each unit's contribution to what its block
    writes, around its mean over the tokens (a unit whose contribution is constant acts as a bias):

    * a query head h: ``sqrt Σ_t ‖W_o[:, h] (a_t,h − ā_h)‖²``, its output through its o_proj columns;
    * an MLP channel c: ``‖W_down[:, c]‖ · sqrt Σ_t (x_t,c − x̄_c)²``;
    * a residual channel i: its share of the stream's energy ``‖x_:,i‖ / ‖x‖`` at the input and at the
      output of every RMSNorm, summed (the input: what the norm's RMS depends on, which removing a
      channel changes; the output: what the projections read).

    Measured on SmolLM2-135M one-shot in bf16 (docs/llm.md): one query head of each KV group removed,
    perplexity 72 by this head score, 453 by the heads' output norms alone (Minitron's), 199 by chance;
    the hidden width 576 → 480, 72 by this score, 79 by the normed outputs alone."""
    from dsee_cli.pruning.calibrated import effective_weight

    units, mlps = attention_units(model), mlp_units(model)
    residual = family_of(model).residual is not None
    moments: dict[str, _Moments] = {}
    current: dict[str, torch.Tensor | None] = {}
    weights: dict[str, torch.Tensor] = {}  # the effective weights the hooks multiply by, on the model's device

    def rows(x: torch.Tensor) -> torch.Tensor:
        keep = current["mask"]
        x = x.detach()
        return (x[keep] if keep is not None and keep.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])).float()

    def head_hook(unit):
        def record(module, args):
            x, w = rows(args[0]), weights[unit.output]
            hd = unit.head_dim
            total, squares = [], []
            for h in range(unit.num_heads):
                y = x[:, h * hd:(h + 1) * hd] @ w[:, h * hd:(h + 1) * hd].t()
                total.append(y.sum(0))
                squares.append(y.pow(2).sum())
            moments.setdefault(unit.output, _Moments()).add(torch.stack(total), torch.stack(squares), len(x))
        return record

    def column_hook(name):
        def record(module, args):
            x = rows(args[0])
            moments.setdefault(name, _Moments()).add(x.sum(0), x.pow(2).sum(0), len(x))
        return record

    norms = residual_sites(model).norms if residual else ()

    def norm_hook(name):
        def record(module, args, output):
            for key, x in ((f"{name}:in", args[0]), (f"{name}:out", output)):
                x = rows(x)
                moments.setdefault(key, _Moments()).add(x.sum(0), x.pow(2).sum(0), len(x))
        return record

    handles = []
    for unit in units:
        weights[unit.output] = effective_weight(model.get_submodule(unit.output))
        handles.append(model.get_submodule(unit.output).register_forward_pre_hook(head_hook(unit)))
    for m in mlps:
        handles.append(model.get_submodule(m.contract).register_forward_pre_hook(column_hook(m.contract)))
    for name in norms:
        handles.append(model.get_submodule(name).register_forward_hook(norm_hook(name)))
    was_training, tokens = model.training, 0
    extra = _forward_extras(model)
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            current["mask"] = mask.bool() if mask is not None else None
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            with autocast():
                model(**{k: v for k, v in batch.items() if k != "labels"}, **extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        weights.clear()
    return _scores(model, moments, norms, tokens)


def _scores(model: nn.Module, moments: dict[str, _Moments], norms: tuple[str, ...], tokens: int) -> ActivationScores:
    """activation_scores' numbers from the moments its hooks gathered."""
    from dsee_cli.pruning.calibrated import effective_weight

    units, mlps = attention_units(model), mlp_units(model)
    q = torch.stack([moments[u.output].centered().sqrt().float() for u in units])
    heads = HeadScores(q, torch.zeros(len(units), units[0].num_kv_heads))
    channels = [moments[m.contract].centered().sqrt().float()
                * effective_weight(model.get_submodule(m.contract)).norm(dim=0).cpu() for m in mlps]
    hidden = None
    if norms:  # each norm's input and output count alike: a channel's share of each (means included)
        shares = [moments[key].squares.sqrt() / moments[key].squares.sum().sqrt()
                  for name in norms for key in (f"{name}:in", f"{name}:out")]
        hidden = torch.stack(shares).sum(0).float()
    return ActivationScores(heads, channels, hidden, tokens)


def _forward_extras(model: nn.Module) -> dict:
    """No KV cache, and the LM head on the last position only (no full-vocabulary logits), where the
    model's forward takes them."""
    import inspect

    params = inspect.signature(model.forward).parameters
    wanted = {"use_cache": False, "logits_to_keep": 1}
    return {k: v for k, v in wanted.items() if k in params}


PRUNED_UNITS = ("dsee_pruned_heads", "dsee_pruned_ffn", "dsee_pruned_hidden")  # config keys of removed units


def removed_units(config) -> dict[str, dict | list]:
    """The removed units a pruned model's config (or checkpoint) records: heads, ffn, hidden."""
    return {key.removeprefix("dsee_pruned_"): getattr(config, key, None) or {} for key in PRUNED_UNITS}


def replay_removal(model: nn.Module, heads: dict, ffn: dict, hidden: list | dict) -> None:
    """Remove the same units again from the dense model (a checkpoint resumed, an export loaded)."""
    if heads:
        prune_heads(model, {int(k): v for k, v in heads.items()})
    if ffn:
        prune_ffn(model, {int(k): v for k, v in ffn.items()})
    if hidden:
        prune_hidden(model, hidden_keep(model, hidden))


def hidden_keep(model: nn.Module, removed: list[int]) -> torch.Tensor:
    dropped = set(removed)
    return torch.tensor([i for i in range(hidden_width(model)) if i not in dropped], dtype=torch.long)


def stated_in_config(model: nn.Module) -> bool:
    """After pruning, for export: the shrunk shapes as config keys where the family allows it
    (then no removed units are recorded for replay)."""
    if not state_pruned_shapes(model):
        return False
    for key in PRUNED_UNITS:
        setattr(model.config, key, None)
    return True
