"""Any PEFT method as a tuning method, and its ΔW for pruning (``adapter=peft``, ``dora``, ...).

PEFT's own tuner (LoRA / DoRA, SHiRA, HiRA, AdaLoRA, VeRA, LoHa, LoKr, ...) is injected on the
run's targets; each layer it adds is then wrapped in a ``PeftLinear``, a ``DeltaLayer`` like our
``DSEELinear``: pruning reads |ΔW| from it, recovery computes with M⊙(W+ΔW), export merges it.

ΔW is the merged weight minus the base, computed (differentiably, never merging in place) the way
each method's ``merge`` does: W + ``get_delta_weight`` for the additive ones, W + W⊙(B·A) for
HiRA, m/‖W+ΔW_lora‖·(W+ΔW_lora) per output row for DoRA. A PEFT method outside ``DELTA_TYPES``
still trains and exports (ΔW from PEFT's merge of a copy, not differentiable); pruning it, which
needs a ΔW recovery can train through, is refused (config.validate).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
from peft.config import PromptLearningConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_cli.core.arch import dims, replace_param, resolve_targets, weight_out_in
from dsee_cli.errors import DSEEError, choice_error
from dsee_cli.tuning.adapters import DeltaLayer, adapters_of, remap_flat

ADAPTER = "default"  # the PEFT adapter name
# PEFT methods that inject into a model's layers (prompt learning and adapters of a model's own kind excluded)
PEFT_TYPES = tuple(sorted(
    t.value.lower() for t in PEFT_TYPE_TO_TUNER_MAPPING
    if not issubclass(PEFT_TYPE_TO_CONFIG_MAPPING[t], PromptLearningConfig)
    and t.value not in ("ADAPTION_PROMPT", "SHADOW", "XLORA", "POLY", "CARTRIDGE", "TRAINABLE_TOKENS",
                        "MULTITASK_PROMPT_TUNING")))
# Methods whose merge dsee-cli reproduces as a ΔW (pruning by |ΔW| needs one)
DELTA_TYPES = ("adalora", "hira", "loha", "lokr", "lora", "shira", "vera")
# Methods whose factors follow removed rows / columns (structured pruning); VeRA shares its
# projections across layers and LoKr's Kronecker factors have no rows to drop
SHRINKABLE_TYPES = ("adalora", "hira", "loha", "lora", "shira")
RESERVED_ARGS = ("target_modules", "peft_type", "task_type", "modules_to_save", "inference_mode", "auto_mapping",
                 "peft_version", "base_model_name_or_path", "revision")
# factor name -> its output-row axis / its input-column axis (out x in base layers)
_ROW_AXIS = {"lora_B": 0, "lora_magnitude_vector": 0, "hira_B": 0, "hada_w1_a": 0, "hada_w2_a": 0}
_COL_AXIS = {"lora_A": 1, "hira_A": 1, "hada_w1_b": 1, "hada_w2_b": 1}


@dataclass
class PeftSection:
    """``adapter.peft``: which PEFT method, and the arguments of its PEFT config."""

    type: str = "lora"  # a PEFT method (peft.PeftType, lower case): lora, shira, hira, adalora, vera, loha, ...
    args: dict = field(default_factory=dict)  # its config's fields (r, lora_alpha, use_dora, ...)

    def check(self) -> None:
        if self.type not in PEFT_TYPES:
            raise choice_error(f"PEFT method (adapter.peft.type; PEFT {peft.__version__})", self.type, PEFT_TYPES)
        fields = {f.name for f in dataclasses.fields(self.config_class)} - set(RESERVED_ARGS)
        for key in self.args:
            if key not in fields:
                raise DSEEError(
                    f"adapter.peft.args.{key} is not a field of PEFT {peft.__version__}'s "
                    f"{self.config_class.__name__}. Valid: {', '.join(sorted(fields))}."
                    + (" (The targets come from adapter.targets.)" if key in RESERVED_ARGS else ""))

    @property
    def config_class(self) -> type:
        return PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(self.type.upper())]

    @property
    def label(self) -> str:
        return "dora" if self.type == "lora" and self.args.get("use_dora") else self.type

    @property
    def has_delta(self) -> bool:
        return self.type in DELTA_TYPES

    @property
    def delta_reads_weight(self) -> bool:
        """ΔW is a function of W (DoRA's row norm of W + ΔW, HiRA's W ⊙ BA): a weight that a pruner
        rewrites (SparseGPT's W') cannot be stored as a base that the adapter then leaves as it is."""
        return self.label in ("dora", "hira")

    @property
    def shrinkable(self) -> bool:
        return self.type in SHRINKABLE_TYPES

    def build(self, target_modules: list[str], modules_to_save: list[str] | None = None):
        """The PEFT config for these module names."""
        args = dict(self.args)
        if self.type == "adalora":
            args.setdefault("total_step", 10**9)  # the phase's real step count is set when it starts
        try:
            return self.config_class(target_modules=list(target_modules), modules_to_save=modules_to_save, **args)
        except (TypeError, ValueError) as e:
            raise DSEEError(f"PEFT {peft.__version__} refused adapter.peft (type={self.type}, args={self.args}): "
                            f"{e}") from None


class PeftLinear(DeltaLayer):
    """A PEFT tuner layer (``self.tuner``, holding the pretrained layer as its ``base_layer``)."""

    base_path = "tuner.base_layer"

    def __init__(self, tuner: nn.Module, peft_type: str):
        super().__init__()
        self.tuner = tuner
        self.peft_type = peft_type
        self.out_features, self.in_features = dims(self.base)
        self.slices = [(0, self.out_features)]
        self._init_state()

    @property
    def base(self) -> nn.Module:
        return self.tuner.get_base_layer()

    def _out_in(self, d: torch.Tensor) -> torch.Tensor:
        """A ΔW in the base layer's own layout (Conv1D: in x out) as out x in."""
        return d.t() if isinstance(self.base, Conv1D) else d

    def slice_delta(self, k: int) -> torch.Tensor:
        t, w = self.tuner, self._base_weight_out_in()
        if self.peft_type not in DELTA_TYPES:
            return self._merged_copy_delta()
        if self.peft_type == "shira":  # dense from the fixed indices (a differentiable index_put)
            rows, cols = t.shira_indices[ADAPTER].long().to(w.device)
            values = t.shira_weight[ADAPTER] * t.scaling[ADAPTER]
            return w.new_zeros(w.shape, dtype=values.dtype).index_put((rows, cols), values, accumulate=True)
        delta = self._out_in(t.get_delta_weight(ADAPTER))
        if self.peft_type == "hira":  # W' = W + W ⊙ (B·A)
            return w * delta
        if self.is_dora:  # W' = m / ‖W + ΔW‖ · (W + ΔW), per row
            magnitude = t.lora_magnitude_vector[ADAPTER].weight
            combined = w + delta
            return (magnitude / self._dora_norm(combined, self.mask))[:, None] * combined - w
        return delta

    @property
    def is_dora(self) -> bool:
        return self.peft_type == "lora" and bool(self.tuner.use_dora.get(ADAPTER))

    def _dora_norm(self, combined: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """DoRA's row norm, a constant as in PEFT's forward (DoRA §4.3). Under a mask it is the norm
        of the weight the layer computes with, M⊙(W + ΔW): a pruned DoRA layer is DoRA of its pruned
        weight, and m is the magnitude of each pruned row (``set_mask`` rescales m so that pruning
        itself changes nothing the layer computes)."""
        used = combined * mask if mask is not None and self.mask_delta else combined
        return used.norm(p=2, dim=1).detach().clamp_min(torch.finfo(used.dtype).tiny)

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor, mask_delta: bool = True) -> None:
        if self.is_dora and mask_delta:  # m ← m·‖M⊙(W+ΔW)‖ / ‖(W+ΔW) under the mask so far‖
            combined = self._base_weight_out_in().float() + self._out_in(self.tuner.get_delta_weight(ADAPTER)).float()
            before = self._dora_norm(combined, self.mask)
            after = (combined * keep).norm(p=2, dim=1)
            magnitude = self.tuner.lora_magnitude_vector[ADAPTER].weight
            magnitude.mul_((after / before).to(magnitude.dtype))
        super().set_mask(keep, mask_delta)

    @torch.no_grad()
    def _merged_copy_delta(self) -> torch.Tensor:
        """Any other method: PEFT's own merge on a copy of this layer, minus W (not differentiable, so
        enough to export and count, not to prune and recover)."""
        t = self.tuner
        if not hasattr(t, "merge"):
            raise DSEEError(f"PEFT method {self.peft_type} ({type(t).__module__}.{type(t).__name__}, PEFT "
                            f"{peft.__version__}) cannot merge into the weight; it has no ΔW.")
        merged = copy.deepcopy(t)
        merged.merge()
        return weight_out_in(merged.get_base_layer()) - self._base_weight_out_in()

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tuner(x)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.tuner.named_parameters() if not n.startswith("base_layer.")]

    def num_adapter_parameters(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.adapter_parameters() if p.requires_grad)
        return (0, n) if self.peft_type == "shira" else (n, 0)

    def adapter_flops(self, seq_len: int) -> int:
        if self.peft_type == "hira":  # W ⊙ (B·A) is a second dense out x in product
            return 2 * seq_len * self.out_features * self.in_features
        return 2 * seq_len * sum(p.numel() for p in self.adapter_parameters())

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"shira_indices": self.tuner.shira_indices[ADAPTER]} if self.peft_type == "shira" else {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "shira_indices" in tensors:
            self.tuner.shira_indices[ADAPTER] = tensors["shira_indices"].to(self.base.weight.device, torch.int)

    # -- structured pruning ---------------------------------------------------------------------
    def _shrinkable(self) -> None:
        if self.peft_type not in SHRINKABLE_TYPES:
            raise DSEEError(f"Structured pruning cannot remove rows of PEFT method {self.peft_type}'s factors "
                            f"(PEFT {peft.__version__}); it works for: {', '.join(SHRINKABLE_TYPES)}.")

    def _shrink_factors(self, keep: torch.Tensor, axes: dict[str, int]) -> None:
        for name, p in list(self.tuner.named_parameters()):  # (PEFT's LoHa takes no Conv1D: always out x in)
            factor = name.split(".")[0]
            if factor in axes:
                owner, _, leaf = name.rpartition(".")
                replace_param(self.tuner.get_submodule(owner), leaf,
                              p.detach().index_select(axes[factor], keep.to(p.device)))

    def _shrink_shira(self, keep: torch.Tensor, rows: bool) -> None:
        size = self.out_features if rows else self.in_features
        pos = torch.full((size,), -1, dtype=torch.long)
        pos[keep] = torch.arange(len(keep))
        idx = self.tuner.shira_indices[ADAPTER].long().cpu()
        flat = idx[0] * self.in_features + idx[1]
        r, c = remap_flat(flat, self.in_features, pos if rows else None, None if rows else pos)
        alive = (r >= 0) & (c >= 0)
        values = self.tuner.shira_weight[ADAPTER].detach()[alive.to(self.base.weight.device)]
        replace_param(self.tuner.shira_weight, ADAPTER, values)
        self.tuner.shira_indices[ADAPTER] = torch.stack([r[alive], c[alive]]).to(self.base.weight.device, torch.int)

    def _shrink_adapter_rows(self, keep: torch.Tensor) -> None:
        self._shrinkable()
        self._shrink_shira(keep, rows=True) if self.peft_type == "shira" else \
            self._shrink_factors(keep, _ROW_AXIS)
        self.tuner.out_features = len(keep)
        self.slices = [(0, len(keep))]

    def _shrink_adapter_cols(self, keep: torch.Tensor) -> None:
        self._shrinkable()
        self._shrink_shira(keep, rows=False) if self.peft_type == "shira" else \
            self._shrink_factors(keep, _COL_AXIS)
        self.tuner.in_features = len(keep)

    def extra_repr(self) -> str:
        return f"peft={self.peft_type}, out={self.out_features}, in={self.in_features}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def target_modules(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The adapted module names: PEFT adapts whole modules (a fused c_attn as a whole)."""
    return list(dict.fromkeys(t.name for t in resolve_targets(model, targets)))


def inject_peft(model: nn.Module, section: PeftSection, targets: list[str] | None) -> dict[str, PeftLinear]:
    """Inject the PEFT method on the targets (in place), each tuner layer wrapped as a PeftLinear;
    everything but the adapters is frozen (the caller unfreezes the task head)."""
    section.check()
    names = target_modules(model, targets)
    config = section.build(names)
    try:
        tuner_model = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](model, config, adapter_name=ADAPTER)
    except (ValueError, TypeError, NotImplementedError, KeyError) as e:
        first = model.get_submodule(names[0])
        raise DSEEError(f"PEFT {peft.__version__} cannot add {section.label} to {names[0]} "
                        f"({type(first).__name__}) and its like in {type(model).__name__}: {e}") from None
    model.__dict__["dsee_peft"] = tuner_model  # not a submodule: AdaLoRA's rank allocator, the config
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, BaseTunerLayer):
            raise DSEEError(f"PEFT {peft.__version__} did not adapt {name} with {section.label}.")
        for n, p in layer.named_parameters():
            p.requires_grad_(not n.startswith("base_layer.") and n.split(".")[0] in layer.adapter_layer_names)
        wrapped[name] = PeftLinear(layer, section.type)
        _set_submodule(model, name, wrapped[name])
    return wrapped


def peft_config_of(model: nn.Module):
    return model.__dict__["dsee_peft"].peft_config[ADAPTER]


# -- AdaLoRA: its rank budget on the run's steps --------------------------------------------------
def peft_step_hooks(model: nn.Module, section: PeftSection, phase: str) -> dict:
    """What a PEFT method adds to a phase's training loop (train.StepHooks' fields): AdaLoRA its rank
    schedule in phase I, and in recovery the ranks it reached (the singular values it zeroed stay
    zero after every update), with its orthogonality term in both; the others nothing."""
    if section.type != "adalora":
        return {}
    if phase == "phase1":
        return {"before_step": lambda step, total: adalora_start(model, total),
                "after_update": lambda step: adalora_allocate(model, step),
                "regularizer": lambda: adalora_orthogonality(model)}
    kept: dict[str, torch.Tensor] = {}  # the rank pattern as recovery (or its resume) found it
    return {"before_step": lambda step, total: kept or kept.update(adalora_ranks(model)),
            "after_update": lambda step: adalora_keep_ranks(model, kept),
            "regularizer": lambda: adalora_orthogonality(model)}


def _singular_values(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: layer.tuner.lora_E[ADAPTER] for name, layer in adapters_of(model).items()}


def adalora_ranks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Which of AdaLoRA's singular values are in use (its budget zeroed the others)."""
    return {name: e.detach() != 0 for name, e in _singular_values(model).items()}


@torch.no_grad()
def adalora_keep_ranks(model: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    for name, e in _singular_values(model).items():
        e.mul_(kept[name].to(e.dtype))


def adalora_start(model: nn.Module, total: int) -> None:
    """Set the phase's step count as AdaLoRA's total_step (its schedule needs tinit + tfinal < it)."""
    config = peft_config_of(model)
    if config.tinit + config.tfinal >= total:
        raise DSEEError(f"AdaLoRA's schedule needs tinit + tfinal < the phase's {total} steps; it has "
                        f"adapter.peft.args.tinit={config.tinit} and tfinal={config.tfinal}. Lower them.")
    config.total_step = total


def adalora_allocate(model: nn.Module, step: int) -> None:
    """After the optimizer step, before the gradients are cleared: AdaLoRA's importance and budget."""
    model.__dict__["dsee_peft"].update_and_allocate(step)


def adalora_orthogonality(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's regulariser: orth_reg_weight · mean ‖PᵀP − I‖_F over its P (A) and Q (B) factors."""
    terms = []
    for layer in adapters_of(model).values():
        a, b = layer.tuner.lora_A[ADAPTER], layer.tuner.lora_B[ADAPTER]
        for cov in (a @ a.T, b.T @ b):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return peft_config_of(model).orth_reg_weight * torch.stack(terms).mean()


ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def tuner_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the PEFT tuner keeps outside the layers (AdaLoRA's importance averages), for checkpoints."""
    allocator = getattr(model.__dict__.get("dsee_peft"), "rankallocator", None)
    if allocator is None:
        return {}
    return {f"adalora::{part}::{name}": t for part in ALLOCATOR_STATE for name, t in getattr(allocator, part).items()}


def load_tuner_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    allocator = getattr(model.__dict__.get("dsee_peft"), "rankallocator", None)
    if allocator is None:
        return
    device = next(model.parameters()).device
    for key, t in tensors.items():
        if key.startswith("adalora::"):
            _, part, name = key.split("::", 2)
            getattr(allocator, part)[name] = t.to(device)


# -- export in PEFT's own format ------------------------------------------------------------------
def save_peft_format(model: nn.Module, section: PeftSection, head_modules: list[str], target: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors into ``target``, as PEFT's
    ``save_pretrained`` does, so that ``PeftModel.from_pretrained(base, target)`` rebuilds the model
    (the task head as ``modules_to_save``). A copy of the model is made; the run's stays as it is."""
    plain = copy.deepcopy(model).cpu()
    plain.__dict__.pop("dsee_peft", None)
    layers = adapters_of(plain)
    for name, layer in layers.items():
        _set_submodule(plain, name, layer.base)
    config = section.build(list(layers), modules_to_save=head_modules or None)
    if section.type == "adalora":
        config.total_step = peft_config_of(model).total_step
    config.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
    peft_model = peft.get_peft_model(plain, config)
    for name, layer in layers.items():
        fresh = peft_model.base_model.model.get_submodule(name)
        fresh.load_state_dict(layer.tuner.state_dict())
        if section.type == "shira":
            fresh.shira_indices[ADAPTER] = layer.tuner.shira_indices[ADAPTER].clone()
    tmp = Path(target).with_name(f".{Path(target).name}.peft-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    Path(target).mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, Path(target) / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
