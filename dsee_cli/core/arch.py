"""What dsee-cli needs to know about each supported architecture, in one place.

A family is one ``Family`` description: where its blocks are, its attention (the q, k, v and
output projections, how many query and key/value heads, how to set a shrunk head count), its
MLP (the expanding projections, one or SwiGLU's gate and up, and the contracting one), the
short names of its projections, and its task head. Adapters, pruning, accounting, costs and
export read these descriptions; nothing outside this module asks which family a model is.

* BERT and RoBERTa: separate ``query/key/value`` ``nn.Linear`` layers (stored out x in).
* GPT-2: a fused ``c_attn`` ``Conv1D`` (stored in x out) holding q, k and v side by side.
* Decoder LLMs (Llama, Mistral, Qwen2, Qwen3 and any model built like them, recognised by
  ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` in its blocks): grouped-query
  attention (several query heads share one key/value head) and a SwiGLU MLP.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_cli.errors import DSEEError

LinearLike = (nn.Linear, Conv1D)


class WrappedLayer(nn.Module):
    """A method's module that stands for the pretrained layer it wraps (``self.base``): to
    pruning, accounting and export it is that layer (DeltaLayer, SparseTrainLinear)."""

    base: nn.Module


class AddedModule(nn.Module):
    """A module a method adds inside a block (Houlsby / MAM bottlenecks): trainable, and not a
    pretrained weight, so outside the pruning scope."""


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as out x in, whatever the layer stores (a view, no copy)."""
    w = module.weight
    return w.t() if isinstance(module, Conv1D) else w


def dims(module: nn.Module) -> tuple[int, int]:
    w = weight_out_in(getattr(module, "base", module))
    return int(w.shape[0]), int(w.shape[1])


def replace_param(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a new tensor (a different shape) in place of a parameter, keeping whether it trains."""
    old = getattr(owner, name)
    setattr(owner, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


@torch.no_grad()
def shrink_layer_outputs(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the given output rows (sorted) of a plain Linear / Conv1D."""
    if isinstance(layer, Conv1D):
        replace_param(layer, "weight", layer.weight[:, keep])
        layer.nf = len(keep)
    else:
        replace_param(layer, "weight", layer.weight[keep])
        layer.out_features = len(keep)
    if layer.bias is not None:
        replace_param(layer, "bias", layer.bias[keep])


@torch.no_grad()
def shrink_layer_inputs(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the given input columns (sorted) of a plain Linear / Conv1D."""
    if isinstance(layer, Conv1D):
        replace_param(layer, "weight", layer.weight[keep])
        layer.nx = len(keep)
    else:
        replace_param(layer, "weight", layer.weight[:, keep])
        layer.in_features = len(keep)


@dataclass(frozen=True)
class Attention:
    """Where a block's attention is, relative to the block."""

    module: str  # the attention module (holds the head-count attributes)
    q: str
    k: str
    v: str  # the same module three times where q, k, v are fused (GPT-2's c_attn, cut in thirds)
    output: str  # the projection whose input columns follow the query heads
    # (query heads, key/value heads, head dim) of one attention module
    heads: Callable[[nn.Module], tuple[int, int, int]]
    # set the attention module's head counts after pruning (query heads, key/value heads)
    set_heads: Callable[[nn.Module, int, int, int], None]


@dataclass(frozen=True)
class Mlp:
    """A block's MLP: the projections that expand to its channels and the one that contracts them."""

    expand: tuple[str, ...]  # one (GELU) or two (SwiGLU: gate, up), each with a row per channel
    contract: str  # its input columns follow the channels
    module: str | None  # the MLP as one module mapping the block's hidden state (None: BERT splits it)


@dataclass(frozen=True)
class Residual:
    """Where a family's residual stream (hidden width) lives, for hidden-channel pruning: the token
    embedding (a column per channel), the RMSNorms of each block and the final one (a weight per
    channel), relative to the base model and to a block. The projections that read the stream
    (q, k, v, the expanding MLP ones, the task head) and write it (o, the contracting MLP one)
    come from ``Attention`` and ``Mlp``."""

    embedding: str
    block_norms: tuple[str, ...]
    final_norm: str


@dataclass(frozen=True)
class Family:
    name: str
    layers: str  # the ModuleList of blocks, from the base model
    attention: Attention
    mlp: Mlp
    default_targets: tuple[str, ...]
    task_head: tuple[str, ...]  # module-name prefixes of the task head (always trained)
    aliases: dict[str, str] = field(default_factory=dict)  # adapter.targets short names: q k v o gate up down
    # the config keys that state pruned shapes (heads, kv heads, head dim, FFN channels), where the
    # family's config can: then a uniformly pruned export loads with plain from_pretrained
    shape_keys: dict[str, str] | None = None
    residual: Residual | None = None  # None: the blocks cannot shrink their residual width here


def _bert_heads(sa: nn.Module) -> tuple[int, int, int]:
    return sa.num_attention_heads, sa.num_attention_heads, sa.attention_head_size


def _set_bert_heads(sa: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    sa.num_attention_heads, sa.all_head_size = heads, heads * head_dim


def _gpt2_heads(attn: nn.Module) -> tuple[int, int, int]:
    return attn.num_heads, attn.num_heads, attn.head_dim


def _set_gpt2_heads(attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    attn.num_heads, attn.split_size, attn.embed_dim = heads, heads * head_dim, heads * head_dim


def _decoder_heads(attn: nn.Module) -> tuple[int, int, int]:
    """Read from the projections' shapes: a pruned layer has fewer heads than the config says."""
    hd = attn.head_dim
    return dims(attn.q_proj)[0] // hd, dims(attn.k_proj)[0] // hd, hd


def _set_decoder_heads(attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    attn.num_key_value_groups = heads // kv_heads  # q, k, v are reshaped with -1 heads: only the grouping is stored


BERT = Family(
    "bert", "encoder.layer",
    Attention("attention.self", "attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", _bert_heads, _set_bert_heads),
    Mlp(("intermediate.dense",), "output.dense", None),
    ("query", "value"), ("classifier",),
    {"q": "query", "k": "key", "v": "value", "o": r".*attention\.output\.dense", "up": r".*intermediate\.dense",
     "down": r".*\.\d+\.output\.dense"},
)
GPT2 = Family(
    "gpt2", "h",
    Attention("attn", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj", _gpt2_heads, _set_gpt2_heads),
    Mlp(("mlp.c_fc",), "mlp.c_proj", "mlp"),
    ("c_attn:q", "c_attn:v"), ("score",),
    {"q": "c_attn:q", "k": "c_attn:k", "v": "c_attn:v", "o": r".*attn\.c_proj", "up": "c_fc",
     "down": r".*mlp\.c_proj"},
)
DECODER = Family(
    "decoder", "layers",
    Attention("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              _decoder_heads, _set_decoder_heads),
    Mlp(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp"),
    ("q_proj", "v_proj"), ("score",),
    {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
     "down": "down_proj"},
    {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
     "ffn": "intermediate_size", "hidden": "hidden_size"},
    Residual("embed_tokens", ("input_layernorm", "post_attention_layernorm"), "norm"),
)
# By model type; decoder LLMs (llama, mistral, qwen2, qwen3, ...) by their modules (_built_like_decoder)
FAMILIES = {"bert": BERT, "roberta": BERT, "xlm-roberta": BERT, "gpt2": GPT2}
ALL_LINEAR = "all-linear"  # adapter.targets: every linear layer of the blocks (PEFT's name)


def _built_like_decoder(model: nn.Module) -> bool:
    """Blocks with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj: the Llama layout, whatever
    the model type is called."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return False
    names = {n for n, _ in layers[0].named_modules()}
    wanted = {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    return wanted <= names


def family_of(model: nn.Module) -> Family:
    model_type = model.config.model_type
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if _built_like_decoder(model):
        return DECODER
    raise DSEEError(
        f"Model type {model_type!r} is not supported. Supported model types: {', '.join(FAMILIES)}, and any "
        f"decoder whose blocks have self_attn.q_proj/k_proj/v_proj/o_proj and mlp.gate_proj/up_proj/down_proj."
    )


def takes_segments(model: nn.Module) -> bool:
    """Whether the model embeds segment ids (BERT: sentence A / B of a pair). RoBERTa has one
    segment embedding and GPT-2 none, so their inputs carry no token_type_ids."""
    import inspect

    return getattr(model.config, "type_vocab_size", 0) > 1 and \
        "token_type_ids" in inspect.signature(model.forward).parameters


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.get_submodule(family_of(model).layers)


def layer_prefix(model: nn.Module) -> str:
    """Module-name prefix of the transformer blocks, e.g. ``bert.encoder.layer``."""
    layers = transformer_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise DSEEError("could not locate the transformer blocks of the model")


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every pretrained Linear / Conv1D inside the transformer blocks (the pruning scope).

    A wrapper (DeltaLayer, SparseTrainLinear) stands for the layer it wraps; layers that methods add (Houlsby and MAM
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


def _expand(model: nn.Module, patterns: list[str]) -> list[str]:
    """Short names (q, k, v, o, gate, up, down) and all-linear as the family spells them."""
    fam = family_of(model)
    out: list[str] = []
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            out += [re.escape(n) for n in block_linears(model)]
        else:
            out.append(fam.aliases.get(pattern, pattern))
    return out


def resolve_targets(model: nn.Module, patterns: list[str] | tuple[str, ...] | None) -> list[Target]:
    """Map target patterns to modules.

    A pattern is a short name (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``), ``all-linear``,
    a module-name component (``query``, ``q_proj``), or a regular expression matched against the
    whole module name, optionally followed by ``:q``, ``:k`` or ``:v`` to select the slice of a
    fused ``c_attn``. Several slices of one module are gathered into one Target.
    """
    patterns = _expand(model, list(patterns or family_of(model).default_targets))
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
                f"{', '.join(names)}; short names: {', '.join(family_of(model).aliases)}, {ALL_LINEAR} "
                f"(fused GPT-2 c_attn takes a slice suffix :q, :k or :v)."
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
    """One layer's attention as head pruning sees it. Query head h belongs to key/value group
    h // (num_heads / num_kv_heads); without grouped-query attention every head is its own group."""

    layer: int
    attention: nn.Module  # holds the head-count attributes to update
    q: tuple[str, int]  # (module name, first row): the query heads' rows, head_dim each
    k: tuple[str, int]  # the key/value heads' rows
    v: tuple[str, int]
    output: str  # module whose *input* columns follow the query heads
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    set_heads: Callable[[nn.Module, int, int, int], None]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def attention_units(model: nn.Module) -> list[AttentionUnit]:
    prefix, at = layer_prefix(model), family_of(model).attention
    units = []
    for i, layer in enumerate(transformer_layers(model)):
        p = f"{prefix}.{i}."
        attn = layer.get_submodule(at.module)
        heads, kv_heads, hd = at.heads(attn)
        fused = at.q == at.k  # GPT-2: q, k, v side by side in one projection
        offsets = (0, heads * hd, (heads + kv_heads) * hd) if fused else (0, 0, 0)
        q, k, v = ((p + name, off) for name, off in zip((at.q, at.k, at.v), offsets))
        units.append(AttentionUnit(i, attn, q, k, v, p + at.output, heads, kv_heads, hd, at.set_heads))
    return units


@dataclass(frozen=True)
class MlpUnit:
    """One layer's MLP as channel pruning sees it: channel c is row c of every expanding
    projection and input column c of the contracting one."""

    layer: int
    expand: tuple[str, ...]
    contract: str
    channels: int


def mlp_units(model: nn.Module) -> list[MlpUnit]:
    prefix, mlp = layer_prefix(model), family_of(model).mlp
    units = []
    for i in range(len(transformer_layers(model))):
        p = f"{prefix}.{i}."
        expand = tuple(p + e for e in mlp.expand)
        units.append(MlpUnit(i, expand, p + mlp.contract, dims(model.get_submodule(expand[0]))[0]))
    return units


def hidden_width(model: nn.Module) -> int:
    """The residual stream's width as the weights have it (the config's before hidden pruning)."""
    return dims(model.get_submodule(attention_units(model)[0].q[0]))[1]


def config_accepts(config, keys: dict[str, str], values: dict[str, int]) -> bool:
    """Whether the config class accepts these shapes (its own validation: LlamaConfig wants the
    hidden size a multiple of the head count; Qwen2's and Mistral's do not)."""
    stated = copy.deepcopy(config)
    for key, value in values.items():
        setattr(stated, keys[key], value)
    try:
        getattr(stated, "validate", lambda: None)()
    except Exception:
        return False
    return True


def state_pruned_shapes(model: nn.Module) -> bool:
    """Write the pruned head counts, FFN width and hidden size into the config where the family's
    config can state them, every layer has the same shapes and the config class accepts them (then
    the model loads with plain ``from_pretrained``). False where it cannot: the removed units must
    then be replayed (``load_merged``). LlamaConfig, for one, wants the hidden size a multiple of
    the head count: 32 heads of Llama-3.2-1B can become 16 or 8 that way, not 24."""
    keys = family_of(model).shape_keys
    if keys is None:
        return False
    heads = {(u.num_heads, u.num_kv_heads, u.head_dim) for u in attention_units(model)}
    ffn = {u.channels for u in mlp_units(model)}
    if len(heads) != 1 or len(ffn) != 1:
        return False
    ((q, kv, hd),), (channels,) = heads, ffn
    values = {"heads": q, "kv_heads": kv, "head_dim": hd, "ffn": channels, "hidden": hidden_width(model)}
    if not config_accepts(model.config, keys, values):
        return False
    for name, value in values.items():  # head_dim stated even where the class derives it (Qwen2's reads it)
        setattr(model.config, keys[name], value)
    return True


def task_head_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The task head, plus any weights the checkpoint did not have (initialised fresh)."""
    prefixes = family_of(model).task_head
    fresh = set(getattr(model, "dsee_fresh_params", ()))
    return [(n, p) for n, p in model.named_parameters() if n.split(".")[0] in prefixes or n in fresh]
