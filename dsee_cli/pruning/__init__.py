"""Phase II: prune the pretrained weights using ΔW (Algorithm 2), and its peers.

A pruning method is declared once, in ``PRUNERS``: its name, what the terminal calls it, the
function that prunes, and what the rest of the run needs to know of it (does it remove heads,
prune in rounds, need ΔW, train slimming coefficients in phase I). Adding one is a function
``prune(model, settings, sparsity, seed, rewind) -> what it did`` plus one ``register`` call.

* ``masks``: unstructured (global or per layer, per pool) and N:M masks from |ΔW|.
* ``heads``: attention heads scored by |ΔW| and removed for real.
* ``slimming``: EarlyBERT's learned head and FFN-neuron coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dsee_cli.core import dist
from dsee_cli.core.arch import attention_units, block_linears, dims, hidden_width, mlp_units, weight_out_in
from dsee_cli.core.selection import smallest_k_mask
from dsee_cli.data.calibration import CalibrationConfig, CalibrationInputs
from dsee_cli.errors import DSEEError, choice_error
from dsee_cli.pruning.calibrated import effective_weight, prune_block_by_block, set_effective_weight
from dsee_cli.pruning.heads import (
    HEAD_UNITS,
    channel_scores,
    check_head_removal,
    choose_heads,
    head_scores,
    heads_to_remove,
    lowest_heads,
    prune_ffn,
    prune_heads,
)
from dsee_cli.pruning.masks import apply_masks, nm_masks, reapply_masks, score_pieces, unstructured_masks
from dsee_cli.pruning.oneshot import sparsegpt, wanda_masks, wanda_scores
from dsee_cli.pruning.residual import activation_scores, delta_hidden_scores, hidden_keep, prune_hidden
from dsee_cli.pruning.shapes import SHAPES, ShapePlan, plan_shapes
from dsee_cli.pruning.slimming import FROZEN_CHANGED, slim_and_prune
from dsee_cli.tuning.adapters import DeltaLayer

SCOPES = ("blocks", "adapted")
# what each criterion scores, as the terminal and metrics.json say it (|W| where a layer is not adapted)
CRITERION_SCORES = {"delta": "|ΔW|", "delta_plus_weight": "|W + ΔW|", "weight": "|W|", "random": "random",
                    "delta_wanda": "|ΔW|·‖X‖", "tuned_wanda": "|W + ΔW|·‖X‖",
                    "obs": "OBS on W + ΔW",  # SparseGPT's: the kept weights are updated
                    # structured: each unit's contribution on the calibration data (pruning/residual.py)
                    "activation": "each unit's contribution on calibration data"}
# Calibrated criteria read calibration inputs: delta_wanda |ΔW|·‖X‖, tuned_wanda |W + ΔW|·‖X‖ (Wanda on the
# tuned weight; |W|·‖X‖ where not adapted), obs: SparseGPT's OBS reconstruction of the tuned weight W + ΔW.
CALIBRATED_CRITERIA = ("delta_wanda", "tuned_wanda", "obs")
CRITERIA = ("delta", "delta_plus_weight", "weight", "random", *CALIBRATED_CRITERIA, "activation")
# pruning=structured ranks heads, MLP channels and hidden channels by one of these; activation (each unit's
# contribution on the calibration tokens, pruning/residual.py) is the decoders' default, |ΔW| (delta) the encoders'
STRUCTURED_CRITERIA = ("delta", "delta_plus_weight", "weight", "random", "activation")
STRUCTURED_DECODER_DEFAULT = "activation"
GRANULARITIES = ("global", "layer", "matrix", "row")
# block by block, a block's scores exist only once the blocks before it are pruned: no threshold spans blocks
CALIBRATED_GRANULARITIES = ("matrix", "row")
AUTO = "auto"  # pruning.criterion / granularity: chosen by the model family (resolve_auto)
# The decoders' default (criterion, granularity), from experiment=dsee-llm on SmolLM2-135M (docs/llm.md): OBS on
# the tuned weight; Wanda's score on it where ΔW reads W (DoRA, HiRA: OBS's update cannot be stored for them).
# Encoders keep the paper's |ΔW| under one global threshold.
DECODER_DEFAULT = ("obs", "row")
DECODER_DEFAULT_WHEN_DELTA_READS_W = ("tuned_wanda", "row")
ENCODER_DEFAULT = ("delta", "global")


@dataclass
class PruningConfig:
    """The ``pruning`` section: Phase II (and IMP's rounds). The run's ``sparsity`` and ``seed``
    are passed alongside: they are run-level settings other phases read too."""

    method: str = "unstructured"  # unstructured, nm, structured (heads), imp, earlybert or none
    # the score: auto (decoders: obs, encoders: delta), delta |ΔW|, delta_plus_weight |W + ΔW|, weight |W|, random;
    # calibrated: delta_wanda |ΔW|·‖X‖, tuned_wanda |W + ΔW|·‖X‖, obs (SparseGPT's OBS on W + ΔW)
    criterion: str = "delta"
    # auto (decoders and calibrated criteria: row, encoders: global), global: one threshold per pool; layer: per
    # transformer block; matrix: per matrix; row: per output row
    granularity: str = "global"
    n: int = 2  # nm: keep n of every m
    m: int = 4  # nm: the group size
    heads_to_remove: int = 3  # structured / earlybert: query heads removed per layer
    # structured / earlybert under grouped-query attention: query-heads (the same number from every
    # key/value group: one shape for every layer) or kv-group (whole groups); heads: every head its own
    # group (BERT, GPT-2), query-heads where heads share key/value heads
    unit: str = "heads"
    # structured / earlybert: a fraction of each layer's query heads instead of heads_to_remove (0: the count),
    # rounded to what the unit allows (query-heads: multiples of the key/value heads; kv-group: of the group size)
    head_fraction: float = 0.0
    ffn_channels: float = 0.0  # structured: MLP channels removed per layer, a fraction (< 1) or a count (SwiGLU)
    # structured: residual-stream channels removed (the hidden width: embeddings, every norm, every projection's
    # input or output, the LM head), a fraction (< 1) or a count; decoders built like Llama
    hidden_channels: float = 0.0
    # structured: servable (every layer alike, counts the family's config class accepts, MLP and hidden widths in
    # multiples of multiple_of: any serving stack loads the export), free (the counts asked for; exported for
    # dsee's load_merged where the config cannot state them), auto (servable for decoder families)
    shapes: str = "auto"
    multiple_of: int = 64  # structured, servable shapes: MLP channels and hidden width kept in multiples of this
    mask_delta: bool = True  # false: the reference behaviour, ΔW stays dense in recovery
    scope: str = "blocks"  # blocks: every linear in the blocks; adapted: only the adapted matrices (Table 7)
    rounds: int = 1  # imp: prune-retrain rounds
    rate: float = 0.1  # imp: fraction of the remaining weights pruned per round
    rewind: bool = False  # imp: reset the trained tensors to their start after each pruning
    ffn_fraction: float = 0.4  # earlybert: fraction of each FFN's neurons removed
    slimming_l1: float = 1e-4  # earlybert: L1 weight on the slimming coefficients
    # wanda / sparsegpt / criterion=delta_wanda: N samples of L tokens (source: the run's training data, c4, ...)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    percdamp: float = 0.01  # sparsegpt: damping, as a fraction of the Hessian's mean diagonal
    blocksize: int = 128  # sparsegpt: columns updated lazily together
    nm: bool = False  # unstructured / wanda / sparsegpt: the N:M pattern (pruning.n, pruning.m) instead of sparsity

    @property
    def pruner(self) -> Pruner:
        return PRUNERS[self.method]

    @property
    def pattern(self) -> tuple[int, int] | None:
        """(n, m) when the masks keep n of every m (pruning=nm, or pruning.nm=true), else None."""
        return (self.n, self.m) if self.method == "nm" or self.nm else None

    @property
    def reconstructs(self) -> bool:
        """Rewrites the kept weights (OBS): pruning=sparsegpt, or a mask pruner with criterion=obs."""
        return self.method == "sparsegpt" or (self.pruner.prune is _prune_by_masks and self.criterion == "obs")

    @property
    def calibrated(self) -> bool:
        """Reads calibration inputs: Wanda, SparseGPT, a mask pruner with a calibrated criterion,
        structured pruning by activations."""
        return self.pruner.calibrated or (self.pruner.prune is _prune_by_masks and self.criterion in
                                          CALIBRATED_CRITERIA) or (self.structured and self.criterion == "activation")

    @property
    def structured(self) -> bool:
        return self.pruner.prune is _prune_structured

    @property
    def reads_delta(self) -> bool:
        """The criterion reads ΔW (so the tuning method must have one)."""
        return self.criterion in ("delta", "delta_plus_weight", "delta_wanda")

    def resolve_auto(self, decoder: bool, delta_reads_weight: bool = False) -> None:
        """Fill ``auto`` criterion / granularity in: the decoders' default (``delta_reads_weight``:
        DoRA's or HiRA's ΔW, which OBS cannot store) or the paper's (encoders); a calibrated
        criterion's grouping is per row (Wanda's) unless set."""
        criterion, granularity = ENCODER_DEFAULT if not decoder else \
            DECODER_DEFAULT_WHEN_DELTA_READS_W if delta_reads_weight else DECODER_DEFAULT
        if self.method in PRUNERS and self.structured:  # units, not weights: Minitron's activations on decoders
            criterion = STRUCTURED_DECODER_DEFAULT if decoder else ENCODER_DEFAULT[0]
        if self.criterion == AUTO:
            self.criterion = criterion
        if self.granularity == AUTO:
            self.granularity = "row" if self.criterion in CALIBRATED_CRITERIA else granularity

    def round_sparsities(self, sparsity: float) -> list[float]:
        """The sparsity after each prune step: none → [], one-shot → [s], IMP → 1 − (1 − rate)^r."""
        if self.pruner.prune is None:
            return []
        if self.pruner.rounds:
            return [1.0 - (1.0 - self.rate) ** r for r in range(1, self.rounds + 1)]
        return [sparsity]

    def check(self, sparsity: float) -> None:
        if self.method not in PRUNERS:
            raise choice_error("pruning method (pruning.method)", self.method, tuple(PRUNERS))
        if self.criterion not in CRITERIA:
            raise choice_error("pruning criterion (pruning.criterion)", self.criterion, (*CRITERIA, AUTO))
        if self.granularity not in GRANULARITIES:
            raise choice_error("pruning granularity (pruning.granularity)", self.granularity, (*GRANULARITIES, AUTO))
        if not 0.0 <= sparsity < 1.0:
            raise DSEEError(f"sparsity={sparsity} is out of range: it must be in [0, 1).")
        if self.pattern and not 0 < self.n < self.m:
            raise DSEEError(f"N:M pruning needs 0 < n < m, got pruning.n={self.n}, pruning.m={self.m}.")
        if self.reconstructs and (self.blocksize < 1 or (self.pattern and self.blocksize % self.m)):
            raise DSEEError(f"pruning.blocksize={self.blocksize} is invalid for SparseGPT"
                            + (f" with N:M: its lazy blocks of columns must hold whole groups of m={self.m} inputs "
                               f"(a multiple of {self.m}, e.g. 128)." if self.blocksize >= 1 else ": it must be >= 1."))
        if self.scope not in SCOPES:
            raise choice_error("pruning scope (pruning.scope)", self.scope, SCOPES)
        if self.rounds < 1:
            raise DSEEError(f"pruning.rounds={self.rounds} is invalid: IMP needs at least one round.")
        if not 0.0 < self.rate < 1.0:
            raise DSEEError(f"pruning.rate={self.rate} is out of range: it must be in (0, 1).")
        if not 0.0 <= self.ffn_fraction < 1.0:
            raise DSEEError(f"pruning.ffn_fraction={self.ffn_fraction} is out of range: it must be in [0, 1).")
        if self.slimming_l1 < 0:
            raise DSEEError(f"pruning.slimming_l1={self.slimming_l1} must be >= 0.")
        if self.unit not in HEAD_UNITS:
            raise choice_error("head pruning unit (pruning.unit)", self.unit, HEAD_UNITS)
        if not 0.0 <= self.head_fraction < 1.0:
            raise DSEEError(f"pruning.head_fraction={self.head_fraction} is out of range: it must be in [0, 1).")
        for key in ("ffn_channels", "hidden_channels"):
            value = getattr(self, key)
            if value < 0 or (value >= 1 and value != int(value)):
                raise DSEEError(f"pruning.{key}={value:g} is invalid: a fraction in [0, 1) or a whole count.")
        if self.shapes not in SHAPES:
            raise choice_error("shape rule (pruning.shapes)", self.shapes, SHAPES)
        if self.multiple_of < 1:
            raise DSEEError(f"pruning.multiple_of={self.multiple_of} must be >= 1 (64: what tensor cores prefer; 1: "
                            f"any count).")
        if self.hidden_channels and not self.structured:
            raise DSEEError(f"pruning.hidden_channels={self.hidden_channels:g} removes residual channels, which only "
                            f"pruning=structured does; not pruning={self.method}.")
        if self.structured and self.criterion not in STRUCTURED_CRITERIA:
            raise DSEEError(f"pruning.criterion={self.criterion} scores single weights; pruning=structured ranks "
                            f"heads and channels. Valid choices: {', '.join(STRUCTURED_CRITERIA)}, auto.")
        if self.criterion == "activation" and not self.structured:
            raise DSEEError(f"pruning.criterion=activation ranks heads, MLP channels and hidden channels by their "
                            f"outputs on calibration data (Minitron's); it goes with pruning=structured, not "
                            f"pruning={self.method}.")
        if self.heads_to_remove < 0:
            raise DSEEError(f"pruning.heads_to_remove={self.heads_to_remove} must be >= 0.")
        if self.criterion in CALIBRATED_CRITERIA and self.pruner.prune is not _prune_by_masks and \
                not self.structured:
            raise DSEEError(f"pruning.criterion={self.criterion} scores single weights from calibration inputs; use "
                            f"it with pruning=unstructured or nm, not pruning={self.method}.")
        if self.criterion == "obs" and self.granularity == "matrix" and not self.pattern:
            raise DSEEError("pruning.granularity=matrix cannot go with pruning.criterion=obs: OBS chooses its mask per "
                            "block of pruning.blocksize columns, as SparseGPT. Leave pruning.granularity=auto.")
        if (self.criterion in CALIBRATED_CRITERIA and self.pruner.prune is _prune_by_masks and not self.pattern
                and self.granularity not in CALIBRATED_GRANULARITIES):
            raise DSEEError(f"pruning.granularity={self.granularity} cannot go with pruning.criterion="
                            f"{self.criterion}: calibrated scores are computed block by block, each block from the "
                            f"outputs of the blocks already pruned, so no threshold can span blocks. Valid choices "
                            f"with a calibrated criterion: {', '.join(CALIBRATED_GRANULARITIES)} (row is Wanda's).")
        if self.calibrated:
            self.calibration.check()


# prune(model, settings, this round's sparsity, seed, rewind, calibration) -> what it did (metrics.json "pruning").
# ``rewind()`` resets the trained tensors (IMP with pruning.rewind); mask pruners call it
# between scoring the trained weights and applying the masks.
# ``calibration()`` gives the calibration batches, what they were and the run's autocast (Wanda, SparseGPT,
# delta_wanda).
PruneFn = Callable[[nn.Module, PruningConfig, float, int, Callable[[], None], Callable[[], CalibrationInputs]], dict]


@dataclass(frozen=True)
class Pruner:
    """A pruning method, declared once: the rest of the code reads these attributes."""

    name: str
    title: str  # what Phase II is called on the terminal
    prune: PruneFn | None  # None: no pruning phase at all
    removes_heads: bool = False  # attention heads go (so prompts, shaped by the head count, cannot be used)
    needs_delta: bool = False  # scores by ΔW of the adapted attention projections (dsee / lora only)
    rounds: bool = False  # prunes in rounds with retraining between them (pruning.rounds, pruning.rate)
    slimming: bool = False  # slimming coefficients train in phase I under pruning.slimming_l1
    calibrated: bool = False  # reads calibration inputs (pruning.calibration)


PRUNERS: dict[str, Pruner] = {}


def register(pruner: Pruner) -> Pruner:
    """Declare a pruning method (pruning.method): one call, in one place."""
    PRUNERS[pruner.name] = pruner
    return pruner


# Configurations measured to collapse a pretrained decoder (experiment=dsee-llm profile=mini, SmolLM2-135M, phase I
# and recovery a quarter epoch each; docs/llm.md): (criterion, grouping) -> (the lowest sparsity measured, the
# perplexity after recovery). Grouping: the granularity, or "n:m" for the N:M patterns. Dense, tuned: 10.9; the
# decoders' default (obs): 14.4 at 50 %.
DECODER_COLLAPSES: dict[tuple[str, str], tuple[float, str]] = {
    ("delta", "global"): (0.5, "412 at 50 % (294,153 with all seven linears adapted)"),
    ("delta", "matrix"): (0.5, "362 at 50 %"),
    ("delta", "row"): (0.5, "363 at 50 %"),
    ("delta", "n:m"): (0.5, "599 at 2:4"),
    ("delta_plus_weight", "global"): (0.5, "199 at 50 %"),
    ("weight", "matrix"): (0.5, "172 at 50 % (magnitude pruning)"),
}


def describe_score(s: PruningConfig) -> str:
    """What a mask pruner removes by, as the plan and the run's banner say it: '|ΔW|, one global threshold'."""
    grouping = {"global": "one global threshold", "layer": "a threshold per block", "matrix": "a threshold per matrix",
                "row": "compared within each output row"}.get(s.granularity, s.granularity)
    if s.criterion == "obs":
        grouping = f"per block of {s.blocksize} columns"
    if s.pattern:
        grouping = f"{s.n} of every {s.m} inputs kept"
    return f"{CRITERION_SCORES.get(s.criterion, s.criterion)} ({s.criterion}), {grouping}"


def collapse_warning(s: PruningConfig, sparsity: float, decoder: bool) -> str | None:
    """A warning where this configuration is known to collapse a pretrained decoder, citing the measurement."""
    if not decoder or s.pruner.prune is not _prune_by_masks or s.scope != "blocks":
        return None
    grouping = "n:m" if s.pattern else s.granularity
    amount = 1 - s.n / s.m if s.pattern else sparsity
    known = DECODER_COLLAPSES.get((s.criterion, grouping))
    if known is None or amount < known[0]:
        return None
    what = f"{s.n}:{s.m}" if s.pattern else f"granularity={s.granularity} at sparsity {sparsity:g}"
    return (f"pruning.criterion={s.criterion} with {what} is known to collapse a pretrained decoder: perplexity "
            f"{known[1]} after recovery, against 10.9 dense and 14.4 for the decoders' default (pruning.criterion="
            f"auto: {DECODER_DEFAULT[0]}) on SmolLM2-135M (experiment=dsee-llm profile=mini; docs/llm.md).")


def compute_masks(model: nn.Module, settings: PruningConfig, sparsity: float = 0.3, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """Keep-masks of a mask pruner (unstructured, imp, nm) for every block linear."""
    if settings.pattern:
        return nm_masks(model, settings.criterion, settings.n, settings.m, seed, settings.scope)
    return unstructured_masks(model, settings.criterion, settings.granularity, settings.scope, sparsity, seed)


def _prune_by_masks(model: nn.Module, s: PruningConfig, sparsity: float, seed: int, rewind, calibration) -> dict:
    if s.criterion in CALIBRATED_CRITERIA:
        return _prune_calibrated(model, s, sparsity, seed, rewind, calibration)
    masks = dist.on_main(lambda: compute_masks(model, s, sparsity, seed))  # decided once, the same on every rank
    rewind()
    apply_masks(model, masks, s.mask_delta)
    pattern = {"pattern": f"{s.n}:{s.m}", "sparsity": round(1 - s.n / s.m, 6)} if s.pattern else {}
    return {"method": s.method, "sparsity": round(sparsity, 6), "criterion": s.criterion,
            "granularity": s.granularity, "scope": s.scope, **pattern}


def head_count(model: nn.Module, s: PruningConfig) -> int:
    """The query heads this configuration removes per layer (checked: it can be honoured)."""
    unit = attention_units(model)[0]
    k = heads_to_remove(unit, s.unit, s.heads_to_remove, s.head_fraction)
    check_head_removal(unit, s.unit, k)
    return k


def structure_plan(model: nn.Module, s: PruningConfig) -> ShapePlan:
    """The shapes this structured configuration keeps (servable rounding stated in its notes);
    an error where it cannot be honoured. Works on a model with no weights (meta device)."""
    k = head_count(model, s)
    plan = plan_shapes(model, s.unit, k, s.ffn_channels, s.hidden_channels, s.shapes, s.multiple_of)
    heads = attention_units(model)[0].num_heads
    if s.head_fraction and k != round(s.head_fraction * heads):  # the unit's step rounded the share
        plan.notes.insert(0, f"{s.head_fraction:.0%} of {heads} query heads requested: pruning.unit={s.unit} removes "
                             f"them in steps of whole groups or the same number per group; {k} removed per layer")
    return plan


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.sort(scores, stable=True).indices[:k].tolist()) if k else []


def _structured_choice(model: nn.Module, s: PruningConfig, seed: int, calibration) -> tuple[dict, dict, list, dict]:
    """What goes: query heads and MLP channels per layer, residual channels; all scored on the model
    before any of them is removed."""
    plan = structure_plan(model, s)
    info: dict = {"shapes": plan.shapes, "rounding": plan.notes}
    if s.criterion == "activation":
        inputs = calibration()
        scores = activation_scores(model, inputs.batches, inputs.autocast)
        heads_s, channels_s, hidden_s = scores.heads, scores.channels, scores.hidden
        info |= {"calibration": inputs.info, "calibration_tokens": scores.tokens,
                 "hidden_score": "each channel's share of the stream at every RMSNorm's input and output, summed"}
    else:
        heads_s = head_scores(model, s.criterion, seed) if plan.heads_removed else None
        channels_s = channel_scores(model, s.criterion, seed) if plan.channels_removed else []
        hidden_s = delta_hidden_scores(model, s.criterion, seed) if plan.hidden_removed else None
        if plan.hidden_removed:
            info["hidden_score"] = f"{CRITERION_SCORES[s.criterion]} of the adapted projections reading or writing " \
                                   f"the stream (columns of q, k, v, gate, up; rows of o, down)"
    heads = choose_heads(heads_s, s.unit, plan.heads_removed) if plan.heads_removed else {}
    channels = {layer: _lowest(c, plan.channels_removed) for layer, c in enumerate(channels_s)} \
        if plan.channels_removed else {}
    hidden = _lowest(hidden_s, plan.hidden_removed) if plan.hidden_removed else []
    return heads, channels, hidden, info


def _prune_structured(model: nn.Module, s: PruningConfig, sparsity: float, seed: int, rewind, calibration) -> dict:
    heads, channels, hidden, info = dist.on_main(lambda: _structured_choice(model, s, seed, calibration))
    if heads:
        prune_heads(model, heads)
    if channels:
        prune_ffn(model, channels)
    if hidden:
        prune_hidden(model, hidden_keep(model, hidden))
    return {"method": s.method, "criterion": s.criterion, "score": CRITERION_SCORES[s.criterion], "unit": s.unit,
            "heads_removed": {str(k): v for k, v in heads.items()},
            "heads_per_layer": {str(u.layer): [u.num_heads, u.num_kv_heads] for u in attention_units(model)},
            "ffn_removed": {str(k): len(v) for k, v in channels.items()},
            "ffn_channels_per_layer": mlp_units(model)[0].channels, "hidden_removed": len(hidden),
            "hidden_size": hidden_width(model), **info}


def _delta_or_weight(module: nn.Module) -> torch.Tensor:
    """delta_wanda's weight term: ΔW on the adapted rows, W elsewhere (as the delta criterion)."""
    if not isinstance(module, DeltaLayer):
        return weight_out_in(module).float()
    w = weight_out_in(module.base).float().clone()
    delta = module.delta_weight().float()
    for start, end in module.slices:  # the rows outside every slice (GPT-2's fused k) keep |W|
        w[start:end] = delta[start:end]
    return w


def _calibrated_keep(w: torch.Tensor, stats, s: PruningConfig, sparsity: float) -> torch.Tensor:
    """A mask pruner's calibrated criterion: the score's lowest go per row (Wanda's), per matrix, or N:M."""
    if s.pattern or s.granularity != "matrix":  # row, or auto in direct library use
        return wanda_masks(w, stats, sparsity, s.pattern)
    scores = wanda_scores(w, stats.column_norms())
    return ~smallest_k_mask(scores.flatten()[None], round(sparsity * scores.numel()))[0].view_as(scores)


def _prune_calibrated(model: nn.Module, s: PruningConfig, sparsity: float, seed: int, rewind, calibration) -> dict:
    """Wanda, SparseGPT or delta_wanda, block by block from the calibration inputs (pruning/calibrated.py)."""
    nm = s.pattern

    def prune_linear(name, module, stats) -> torch.Tensor:
        if s.reconstructs:
            updated, keep = sparsegpt(effective_weight(module), stats.hessian_matrix(), sparsity, nm, s.percdamp,
                                      s.blocksize)
            set_effective_weight(module, updated, keep)
            return keep
        if s.method == "wanda":
            return wanda_masks(effective_weight(module), stats, sparsity, nm)
        if s.scope == "adapted" and not isinstance(module, DeltaLayer):  # Table 7: the other pool keeps all
            return torch.ones(dims(module), dtype=torch.bool)
        w = effective_weight(module) if s.criterion == "tuned_wanda" else _delta_or_weight(module)
        return _calibrated_keep(w, stats, s, sparsity)

    inputs = calibration()
    masks, stats_bytes = prune_block_by_block(model, inputs.batches, prune_linear, hessian=s.reconstructs,
                                              autocast=inputs.autocast, mask_delta=s.mask_delta)
    changed = {f"{n}.{m.base_path}.weight" if isinstance(m, DeltaLayer) else f"{n}.weight"
               for n, m in block_linears(model).items()} if s.reconstructs else set()
    setattr(model, FROZEN_CHANGED, set(getattr(model, FROZEN_CHANGED, ())) | changed)  # checkpoints keep W'
    apply_masks(model, masks, s.mask_delta)
    score = {"wanda": "|W|·‖X‖", "sparsegpt": "OBS"}.get(s.method) or CRITERION_SCORES[s.criterion]
    grouping = "matrix" if s.method not in ("wanda", "sparsegpt") and not nm and s.granularity == "matrix" else "row"
    if s.reconstructs and not nm:
        grouping = f"blocks of {s.blocksize} columns"
    return {"method": s.method, "criterion": s.criterion if s.method not in ("wanda", "sparsegpt") else None,
            "score": score, "granularity": grouping, "sparsity": round(1 - nm[0] / nm[1] if nm else
            sparsity, 6), "pattern": f"{s.n}:{s.m}" if nm else "unstructured", "calibration": inputs.info,
            "block_statistics_bytes": stats_bytes}


def _prune_slimmed(model: nn.Module, s: PruningConfig, sparsity: float, seed: int, rewind, calibration) -> dict:
    return {"method": s.method, "unit": s.unit, **slim_and_prune(model, head_count(model, s), s.ffn_fraction, s.unit)}


for _pruner in (
    Pruner("none", "no pruning", None),
    Pruner("unstructured", "unstructured pruning", _prune_by_masks),
    Pruner("nm", "N:M pruning", _prune_by_masks),
    Pruner("structured", "structured pruning", _prune_structured, removes_heads=True, needs_delta=True),
    Pruner("imp", "IMP pruning", _prune_by_masks, rounds=True),
    Pruner("earlybert", "EarlyBERT pruning", _prune_slimmed, removes_heads=True, slimming=True),
    Pruner("wanda", "Wanda pruning (|W|·‖X‖, per output row)", _prune_calibrated, calibrated=True),
    Pruner("sparsegpt", "SparseGPT pruning (OBS reconstruction)", _prune_calibrated, calibrated=True),
):
    register(_pruner)

__all__ = ["CALIBRATED_CRITERIA", "CRITERIA", "CRITERION_SCORES", "DECODER_COLLAPSES", "DECODER_DEFAULT",
           "HEAD_UNITS", "PRUNERS",
           "STRUCTURED_CRITERIA", "Pruner", "PruningConfig", "apply_masks", "check_head_removal", "choose_heads",
           "collapse_warning", "compute_masks", "describe_score", "head_count", "head_scores", "lowest_heads",
           "prune_ffn", "prune_heads", "reapply_masks", "register", "score_pieces", "structure_plan"]
