"""The shapes structured pruning leaves: servable (every layer alike, counts the family's config
class accepts and kernels like) or free (the counts asked for).

Serving stacks (vLLM, TGI, llama.cpp, plain transformers) build a model from its config: one head
count, one key/value head count, one MLP width and one hidden size for every layer. Under
``pruning.shapes=servable`` the counts are chosen so that the export states them in its config:

* query heads: the same number from every key/value group (``pruning.unit=query-heads``) or whole
  groups (``kv-group``), and a count the config class accepts with the hidden size it will have
  (LlamaConfig wants the hidden size a multiple of the head count; Qwen2's, Qwen3's, Mistral's not);
* MLP channels and hidden width: multiples of ``pruning.multiple_of`` (64: what tensor cores and
  the kernels prefer), and a hidden size the config class accepts with the head count.

The rule where a request cannot be met exactly: the nearest servable count to the one asked for;
a tie keeps fewer (at least the reduction asked for). Each rounding is stated (the plan and the
run's banner print it). Which config keys a family has is read from its ``Family.shape_keys`` and
its config class's own validation, never from its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dsee_cli.core.arch import attention_units, config_accepts, family_of, hidden_width, mlp_units
from dsee_cli.errors import DSEEError

SHAPES = ("auto", "servable", "free")


@dataclass
class ShapePlan:
    """What structured pruning keeps per layer, and how the request was rounded."""

    shapes: str  # servable or free (auto resolved)
    heads: int  # query heads kept per layer
    kv_heads: int  # key/value heads kept per layer
    channels: int  # MLP channels kept per layer
    hidden: int  # residual width kept
    dense: tuple[int, int, int, int]  # (heads, kv heads, channels, hidden) before pruning
    notes: list[str] = field(default_factory=list)  # one line per rounding, for the plan and the banner

    @property
    def heads_removed(self) -> int:
        return self.dense[0] - self.heads

    @property
    def channels_removed(self) -> int:
        return self.dense[2] - self.channels

    @property
    def hidden_removed(self) -> int:
        return self.dense[3] - self.hidden

    def describe(self) -> str:
        q, kv, c, h = self.dense
        return (f"{self.shapes} shapes: {q}→{self.heads} query heads over {kv}→{self.kv_heads} key/value heads, "
                f"{c}→{self.channels} MLP channels per layer, hidden width {h}→{self.hidden}")


def removed_count(amount: float, total: int, what: str, key: str) -> int:
    """A setting that is a count (>= 1) or a fraction (< 1) of ``total`` as the number removed;
    an error where it would remove every unit."""
    if amount < 0:
        raise DSEEError(f"{key}={amount:g} must be >= 0 (a fraction below 1, or a count).")
    removed = round(amount * total) if amount < 1 else int(amount)
    if amount >= 1 and amount != int(amount):
        raise DSEEError(f"{key}={amount:g} is neither a fraction below 1 nor a whole count of {what}.")
    if removed >= total:
        raise DSEEError(f"{key}={amount:g} would remove every one of the {total} {what}; it must leave at least one "
                        f"(a fraction below 1, or a count up to {total - 1}).")
    return removed


def _nearest(candidates: list[int], wanted: int) -> int:
    """The candidate nearest to ``wanted``; a tie keeps fewer (the reduction asked for is met)."""
    return min(candidates, key=lambda c: (abs(c - wanted), c))


def resolve_shapes(shapes: str, model: nn.Module) -> str:
    """auto: servable where the family's config can state pruned shapes, else free."""
    if shapes not in SHAPES:
        from dsee_cli.errors import choice_error

        raise choice_error("shape rule (pruning.shapes)", shapes, SHAPES)
    if shapes == "auto":
        return "servable" if family_of(model).shape_keys is not None else "free"
    return shapes


def _head_candidates(unit: str, heads: int, kv: int) -> list[tuple[int, int]]:
    """(query heads, key/value heads) a layer may keep under this removal unit."""
    size = heads // kv
    if size == 1:  # every head its own group
        return [(h, h) for h in range(1, heads + 1)]
    if unit == "kv-group":
        return [(g * size, g) for g in range(1, kv + 1)]
    return [(kv * j, kv) for j in range(1, size + 1)]


def plan_shapes(model: nn.Module, unit: str, heads_removed: int, ffn_channels: float, hidden_channels: float,
                shapes: str = "auto", multiple_of: int = 64) -> ShapePlan:
    """The shapes structured pruning keeps: ``heads_removed`` query heads per layer (already a count
    the unit allows), ``ffn_channels`` and ``hidden_channels`` as counts or fractions; rounded to
    servable shapes under ``shapes=servable`` (see the module's docstring)."""
    fam = family_of(model)
    shapes = resolve_shapes(shapes, model)
    first = attention_units(model)[0]
    heads, kv, head_dim = first.num_heads, first.num_kv_heads, first.head_dim
    channels, hidden = mlp_units(model)[0].channels, hidden_width(model)
    wanted_channels = channels - removed_count(ffn_channels, channels, "MLP channels", "pruning.ffn_channels")
    if hidden_channels and fam.residual is None:
        raise DSEEError(f"pruning.hidden_channels={hidden_channels:g}: the {fam.name} family's blocks cannot shrink "
                        f"their residual width here (its embeddings, LayerNorms and pooler or position embeddings "
                        f"are not described for it); hidden-channel pruning is for decoders built like Llama "
                        f"(Llama, Mistral, Qwen2, Qwen3: RMSNorm, self_attn.*_proj, mlp.*_proj). Use "
                        f"pruning.hidden_channels=0 with {fam.name}.")
    wanted_hidden = hidden - removed_count(hidden_channels, hidden, "hidden channels", "pruning.hidden_channels")
    kept = [(heads - heads_removed, kv)]
    if heads_removed:
        kept = [c for c in _head_candidates(unit, heads, kv) if c[0] == heads - heads_removed] or kept
    plan = ShapePlan(shapes, kept[0][0], kept[0][1], wanted_channels, wanted_hidden, (heads, kv, channels, hidden))
    if shapes == "free":
        return plan
    keys = fam.shape_keys
    needed = [what for what, asked in (("heads", heads_removed), ("ffn", wanted_channels != channels),
                                       ("hidden", wanted_hidden != hidden)) if asked]
    missing = [what for what in needed if keys is None or what not in keys]
    if missing:
        have = ", ".join(f"{k}: {v}" for k, v in (keys or {}).items()) or "none"
        raise DSEEError(f"pruning.shapes=servable: the {fam.name} family's config ({type(model.config).__name__}) "
                        f"has no field for the pruned {' and '.join(missing)} count (fields it can state: {have}; "
                        f"BERT and GPT-2 derive the head size from hidden_size / heads), so no stack could load the "
                        f"pruned model from its config. Use pruning.shapes=free (exported for dsee's load_merged).")
    if multiple_of < 1:
        raise DSEEError(f"pruning.multiple_of={multiple_of} must be >= 1 (64: what tensor cores prefer; 1: any count).")

    def accepts(q: int, k: int, h: int) -> bool:
        return config_accepts(model.config, keys, {"heads": q, "kv_heads": k, "head_dim": head_dim,
                                                   "ffn": plan.channels, "hidden": h})

    def widths(q: int, k: int) -> list[int]:  # the hidden sizes this head count can go with
        asked = range(multiple_of, hidden + 1, multiple_of) if wanted_hidden != hidden else ()
        return [h for h in (*asked, hidden) if accepts(q, k, h)]

    config_name = type(model.config).__name__
    if wanted_channels != channels:
        c = _nearest([c for c in range(multiple_of, channels + 1, multiple_of)] or [channels], wanted_channels)
        if c != wanted_channels:
            plan.notes.append(f"{channels - wanted_channels} of {channels} MLP channels requested: {wanted_channels} "
                              f"kept is not a multiple of pruning.multiple_of={multiple_of}; {c} kept per layer"
                              + (" (nothing removed)" if c == channels else ""))
        plan.channels = c
    if heads_removed:  # the head count first: the hidden size's rule may depend on it
        options = [(q, k) for q, k in _head_candidates(unit, heads, kv) if widths(q, k)]
        q, k = min(options, key=lambda o: (abs(o[0] - plan.heads), o[0]))
        if q != plan.heads:
            plan.notes.append(f"{heads_removed} of {heads} query heads requested: {plan.heads} query heads do not "
                              f"divide any servable hidden size ({config_name} wants the hidden size a multiple of "
                              f"the head count); {q} kept per layer")
        plan.heads, plan.kv_heads = q, k
    if wanted_hidden != hidden:
        h = _nearest(widths(plan.heads, plan.kv_heads), wanted_hidden)
        if h != wanted_hidden:
            divides = all(x % plan.heads == 0 for x in widths(plan.heads, plan.kv_heads))
            plan.notes.append(f"{hidden - wanted_hidden} of {hidden} hidden channels requested: {wanted_hidden} kept "
                              f"is not a multiple of pruning.multiple_of={multiple_of}"
                              + (f" and of the {plan.heads} heads ({config_name})" if divides and plan.heads > 1
                                 and multiple_of % plan.heads else "")
                              + f"; {h} kept" + (" (nothing removed)" if h == hidden else ""))
        plan.hidden = h
    return plan
