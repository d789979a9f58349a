"""What dsee-cli needs to know about each supported architecture, in one place.

BERT and RoBERTa have separate ``query/key/value`` ``nn.Linear`` layers (stored out x in);
GPT-2 has a fused ``c_attn`` ``Conv1D`` (stored in x out) holding q, k and v side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_cli.errors import DSEEError

LinearLike = (nn.Linear, Conv1D)


class WrappedLayer(nn.Module):
    """A method's module that stands for the pretrained layer it wraps (``self.base``): to
    pruning, accounting and export it is that layer (DSEELinear, SparseTrainLinear)."""

    base: nn.Module


class AddedModule(nn.Module):
    """A module a method adds inside a block (Houlsby / MAM bottlenecks): trainable, and not a
    pretrained weight, so outside the pruning scope."""


@dataclass(frozen=True)
class Family:
    name: str
    default_targets: tuple[str, ...]
    task_head: tuple[str, ...]  # module-name prefixes of the task head (always trained)


BERT = Family("bert", ("query", "value"), ("classifier",))
GPT2 = Family("gpt2", ("c_attn:q", "c_attn:v"), ("score",))
FAMILIES = {"bert": BERT, "roberta": BERT, "xlm-roberta": BERT, "gpt2": GPT2}


def family_of(model: nn.Module) -> Family:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise DSEEError(
            f"Model type {model_type!r} is not supported. Supported model types: {', '.join(FAMILIES)}."
        )
    return FAMILIES[model_type]


def takes_segments(model: nn.Module) -> bool:
    """Whether the model embeds segment ids (BERT: sentence A / B of a pair). RoBERTa has one
    segment embedding and GPT-2 none, so their inputs carry no token_type_ids."""
    import inspect

    return getattr(model.config, "type_vocab_size", 0) > 1 and \
        "token_type_ids" in inspect.signature(model.forward).parameters


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    base = model.base_model
    if hasattr(base, "encoder"):
        return base.encoder.layer
    return base.h


def layer_prefix(model: nn.Module) -> str:
    """Module-name prefix of the transformer blocks, e.g. ``bert.encoder.layer``."""
    layers = transformer_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise DSEEError("could not locate the transformer blocks of the model")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as out x in, whatever the layer stores (a view, no copy)."""
    w = module.weight
    return w.t() if isinstance(module, Conv1D) else w


def dims(module: nn.Module) -> tuple[int, int]:
    w = weight_out_in(module)
    return int(w.shape[0]), int(w.shape[1])


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every pretrained Linear / Conv1D inside the transformer blocks (the pruning scope).

    A wrapper (DSEELinear, SparseTrainLinear) stands for the layer it wraps; layers that methods add (Houlsby and MAM
    bottlenecks, which live under the layer they modify) are not pretrained weights."""
    prefix = layer_prefix(model)
    found: dict[str, nn.Module] = {}
    added: list[str] = []
    for name, module in model.named_modules():
        if not name.startswith(prefix + "."):
            continue
        if any(name.startswith(a + ".") for a in added):
            continue
        if isinstance(module, WrappedLayer):
            found[name] = module
            added.append(name)  # a wrapper stands for its base; A/B etc. are not separate layers
        elif isinstance(module, AddedModule):
            added.append(name)
        elif isinstance(module, LinearLike):
            found[name] = module
    return found


@dataclass(frozen=True)
class Target:
    """One adapted module, and which output-row slices of it are adapted."""

    name: str
    slices: tuple[tuple[int, int], ...]
    slice_names: tuple[str, ...]


def fused_qkv_slices(out_features: int) -> dict[str, tuple[int, int]]:
    third = out_features // 3
    return {"q": (0, third), "k": (third, 2 * third), "v": (2 * third, 3 * third)}


def resolve_targets(model: nn.Module, patterns: list[str] | tuple[str, ...] | None) -> list[Target]:
    """Map target patterns to modules.

    A pattern is a module-name component (``query``), a regular expression matched against
    the whole module name, optionally followed by ``:q``, ``:k`` or ``:v`` to select the
    slice of a fused ``c_attn``. Several slices of one module are gathered into one Target.
    """
    patterns = list(patterns or family_of(model).default_targets)
    linears = block_linears(model)
    gathered: dict[str, dict[str, tuple[int, int]]] = {}
    for pattern in patterns:
        module_pattern, _, part = pattern.partition(":")
        matched = [n for n in linears if n.split(".")[-1] == module_pattern or re.fullmatch(module_pattern, n)]
        if not matched:
            names = sorted({n.split(".")[-1] for n in linears})
            raise DSEEError(
                f"Target module pattern {pattern!r} matches no linear layer of this "
                f"{model.config.model_type} model. Layers inside its transformer blocks are named: "
                f"{', '.join(names)} (fused GPT-2 c_attn takes a slice suffix :q, :k or :v)."
            )
        for name in matched:
            out_features, _ = dims(linears[name])
            if part:
                slices = fused_qkv_slices(out_features)
                if part not in slices:
                    raise DSEEError(f"Target slice {part!r} in {pattern!r} is not one of q, k, v.")
                gathered.setdefault(name, {})[part] = slices[part]
            else:
                gathered.setdefault(name, {})["all"] = (0, out_features)
    targets = []
    for name, parts in gathered.items():
        if "all" in parts:
            parts = {"all": parts["all"]}
        ordered = sorted(parts.items(), key=lambda kv: kv[1][0])
        targets.append(Target(name, tuple(s for _, s in ordered), tuple(p for p, _ in ordered)))
    return targets


@dataclass
class AttentionUnit:
    """The modules of one layer's attention that head pruning must shrink."""

    layer: int
    attention: nn.Module  # holds head-count attributes to update
    qkv: list[tuple[str, tuple[int, int]]]  # (module name, row slice) for q, k, v
    output: str  # module whose *input* columns follow the heads
    num_heads: int
    head_dim: int


def attention_units(model: nn.Module) -> list[AttentionUnit]:
    prefix = layer_prefix(model)
    fam = family_of(model)
    units = []
    for i, layer in enumerate(transformer_layers(model)):
        p = f"{prefix}.{i}"
        if fam is GPT2:
            attn = layer.attn
            hidden = attn.split_size
            qkv = [(f"{p}.attn.c_attn", (k * hidden, (k + 1) * hidden)) for k in range(3)]
            units.append(AttentionUnit(i, attn, qkv, f"{p}.attn.c_proj", attn.num_heads, attn.head_dim))
        else:
            sa = layer.attention.self
            heads, hd = sa.num_attention_heads, sa.attention_head_size
            qkv = [(f"{p}.attention.self.{n}", (0, heads * hd)) for n in ("query", "key", "value")]
            units.append(AttentionUnit(i, sa, qkv, f"{p}.attention.output.dense", heads, hd))
    return units


def set_head_count(unit: AttentionUnit, heads: int) -> None:
    attn = unit.attention
    if hasattr(attn, "split_size"):  # GPT-2
        attn.num_heads = heads
        attn.split_size = heads * unit.head_dim
        attn.embed_dim = heads * unit.head_dim
    else:
        attn.num_attention_heads = heads
        attn.all_head_size = heads * unit.head_dim


def task_head_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The task head, plus any weights the checkpoint did not have (initialised fresh)."""
    prefixes = family_of(model).task_head
    fresh = set(getattr(model, "dsee_fresh_params", ()))
    return [(n, p) for n, p in model.named_parameters() if n.split(".")[0] in prefixes or n in fresh]
