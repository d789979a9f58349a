"""A run's checkpoint and everything that makes it safe to resume: the model's state as
tensors + JSON (safetensors only, never unpickled), crash-safe state directories, and the
fingerprint that says whether a checkpoint (or a metrics.json) belongs to this configuration.

``model_state`` / ``restore_state`` are also what export/adapter holds, so resuming and
re-applying an adapter are one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dsee_cli.atomic import atomic_write_text, fsync_file
from dsee_cli.config import RunConfig
from dsee_cli.pruning import apply_masks
from dsee_cli.pruning.masks import PackedMask, pack_bits, unpack_bits
from dsee_cli.pruning.residual import replay_removal
from dsee_cli.pruning.slimming import FROZEN_CHANGED
from dsee_cli.tuning.adapters import adapters_of
from dsee_cli.tuning.peft_bridge import load_tuner_state, tuner_state
from dsee_cli.tuning.sparse_training import sparse_layers

MASK_PREFIX = "mask::"
SPARSE_MASK_PREFIX = "sparsemask::"


def pack_mask(mask: torch.Tensor | PackedMask) -> torch.Tensor:
    """One bit per entry (numpy.packbits's layout), on the CPU."""
    return (mask.bits if isinstance(mask, PackedMask) else pack_bits(mask)).cpu()


def unpack_mask(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return unpack_bits(packed, shape)


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything that differs from the pretrained model: trainable tensors, frozen ones that
    pruning changed (EarlyBERT folds its coefficients into them), Ω, masks, removed units."""
    params = dict(model.named_parameters())
    frozen_changed = sorted(n for n in getattr(model, FROZEN_CHANGED, ()) if not params[n].requires_grad)
    tensors = {n: p.detach() for n, p in params.items() if p.requires_grad or n in frozen_changed}
    adapters = adapters_of(model)
    for name, a in adapters.items():  # Ω, SHiRA's indices: fixed, outside the state dict
        tensors.update({f"{name}.{key}": t for key, t in a.extra_state().items()})
    tensors.update(tuner_state(model))  # AdaLoRA's importance averages
    masks = {n: a.mask for n, a in adapters.items() if a.mask is not None}
    mask_delta = all(a.mask_delta for a in adapters.values())
    extra_masks = getattr(model, "dsee_other_masks", {})
    shapes = {}
    for name, mask in {**extra_masks, **masks}.items():
        tensors[MASK_PREFIX + name] = pack_mask(mask)
        shapes[name] = list(mask.shape)  # a PackedMask has its shape too
    sparse = {}
    for name, layer in sparse_layers(model).items():  # sparse training: the current top-v masks
        tensors[SPARSE_MASK_PREFIX + name] = pack_mask(layer.mask)
        sparse[name] = {"shape": list(layer.mask.shape), "sparsity": layer.sparsity}
    meta = {
        "pruned_heads": getattr(model.config, "dsee_pruned_heads", None) or {},
        "pruned_ffn": getattr(model.config, "dsee_pruned_ffn", None) or {},
        "pruned_hidden": getattr(model.config, "dsee_pruned_hidden", None) or [],
        "mask_shapes": shapes,
        "mask_delta": mask_delta,
        "sparse_masks": sparse,
        "frozen_changed": frozen_changed,
    }
    return tensors, meta


def restore_state(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Rebuild the state ``model_state`` described, onto the model as the method prepared it."""
    replay_removal(model, meta.get("pruned_heads"), meta.get("pruned_ffn"), meta.get("pruned_hidden"))
    adapters = adapters_of(model)
    extra = set()
    for name, a in adapters.items():
        keys = {key: f"{name}.{key}" for key in a.extra_state() if f"{name}.{key}" in tensors}
        a.load_extra_state({key: tensors[full] for key, full in keys.items()})
        extra.update(keys.values())
    load_tuner_state(model, tensors)
    masks = {name: unpack_mask(tensors[MASK_PREFIX + name], shape) for name, shape in meta["mask_shapes"].items()}
    if masks:
        device = next(model.parameters()).device
        apply_masks(model, {k: v.to(device) for k, v in masks.items()}, meta.get("mask_delta", True))
    layers = sparse_layers(model)
    for name, info in meta.get("sparse_masks", {}).items():
        layers[name].mask.copy_(unpack_mask(tensors[SPARSE_MASK_PREFIX + name], info["shape"]))
        layers[name].sparsity = info["sparsity"]
    params = dict(model.named_parameters())
    frozen = set(meta.get("frozen_changed", ()))
    with torch.no_grad():
        for name, value in tensors.items():
            if "::" in name or name in extra:  # masks, the trainer's optim::/rng:: entries, Ω
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in this model")
            params[name].copy_(value)
            params[name].requires_grad_(name not in frozen)
    if frozen:
        setattr(model, FROZEN_CHANGED, frozen)


STATE_META = "meta.json"


def save_state_dir(target: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors + meta.json, crash-safe: the tensors go to a new file, then meta.json (which names
    it) is replaced in one rename. A kill at any moment leaves the old state or the new one."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    name = f"state-{time.time_ns()}.safetensors"
    tmp = target / f".{name}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, target / name)
    atomic_write_text(target / STATE_META, json.dumps({**meta, "state_file": name}, indent=2, sort_keys=True))
    clean_state_dir(target)


def clean_state_dir(target: Path) -> None:
    """Remove what a commit superseded or a killed write left behind: every file but meta.json
    and the state file it names."""
    target = Path(target)
    meta = target / STATE_META
    current = json.loads(meta.read_text()).get("state_file") if meta.is_file() else None
    for f in target.iterdir():
        if f.name not in (STATE_META, current) and (f.name.startswith((".", "state")) or f.suffix == ".tmp"):
            shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)


def load_state_dir(target: Path) -> tuple[dict[str, torch.Tensor], dict]:
    target = Path(target)
    meta = json.loads((target / STATE_META).read_text())
    return load_file(str(target / meta.get("state_file", "state.safetensors"))), meta


# trainer settings that change where and how a step is computed, not what: the processes sharing
# the batch, its micro-batches, recomputed activations (results agree up to floating-point order)
HOW_IT_RUNS = ("devices", "grad_accum", "jobs_per_gpu", "dist_timeout", "gradient_checkpointing")


def config_fingerprint(cfg: RunConfig) -> str:
    """What must match for a run directory's checkpoint or metrics.json to be this run's: every
    setting that changes its numbers (not logging, where it runs, how often it saves or prints)."""
    d = asdict(cfg)
    # measuring is redone on a finished run that lacks it; per_task is applied and empty here
    for key in ("logger", "resume", "measure", "reuse", "per_task"):
        d.pop(key)
    # nor how many processes share the batch: a run resumed on another number of GPUs is the same run
    for key in ("checkpoint_every", "device", "threads", "log_every_seconds", *HOW_IT_RUNS):
        d["trainer"].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def finished_metrics(run_dir: Path, fingerprint: str, say, measured: bool = False) -> dict | None:
    """The run directory's metrics.json if it is this configuration's (and, if ``measured``, holds
    the measured savings; else the finished run is evaluated and measured again from its last
    checkpoint); another configuration's is removed."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get("fingerprint") == fingerprint:
        return metrics if metrics.get("savings") or not measured else None
    say(f"metrics.json here is from a different configuration (fingerprint {metrics.get('fingerprint')}, "
        f"this run {fingerprint}): starting over")
    path.unlink()
    return None


def clean_leftovers(run_dir: Path) -> None:
    """Temporary files and directories a killed run left (a half-written checkpoint or export)."""
    for parent in (run_dir, run_dir / "export"):
        if parent.is_dir():
            for f in parent.glob(".*"):
                if ".tmp" in f.name or ".old-" in f.name:
                    shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
    if (run_dir / "checkpoint").is_dir():
        clean_state_dir(run_dir / "checkpoint")


CHECKPOINT_FORMAT = 2  # 2: progress is the number of plan steps done (1 named a stage)


class Checkpoint:
    """run_dir/checkpoint: the model's state (model_state), and the run's progress: how many
    steps of its plan are done, the training step in progress (its optimizer and RNG state in
    the tensors), each phase's state, what pruning did."""

    def __init__(self, run_dir: Path, fingerprint: str):
        self.dir = Path(run_dir) / "checkpoint"
        self.fingerprint = fingerprint

    def load(self, say=lambda text: None) -> tuple[dict, dict] | None:
        """This configuration's checkpoint; another configuration's is removed (the run starts over)."""
        if not (self.dir / "meta.json").is_file():
            return None
        tensors, meta = load_state_dir(self.dir)
        if meta.get("format") != CHECKPOINT_FORMAT:
            say(f"the checkpoint here was written by another dsee-cli version (format {meta.get('format', 1)}, "
                f"this one reads {CHECKPOINT_FORMAT}): starting over")
            self.clear()
            return None
        if meta.get("fingerprint") != self.fingerprint:
            say(f"the checkpoint here is from a different configuration (fingerprint {meta.get('fingerprint')}, "
                f"this run {self.fingerprint}): starting over")
            self.clear()
            return None
        return tensors, meta

    def save(self, model, progress: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
        """``progress``: ``done`` (plan steps finished), ``in_progress`` (the phase training, or None), ..."""
        tensors, model_meta = model_state(model)
        meta = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "model": model_meta, **progress}
        save_state_dir(self.dir, {**tensors, **(extra or {})}, meta)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
