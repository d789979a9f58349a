"""Saving and reloading, safetensors + JSON only (nothing is ever unpickled).

* ``save_adapter`` / ``apply_adapter``: a small checkpoint (A, B, S values, Ω indices, masks,
  task head, pruned heads) that re-applies onto the pretrained model. The training
  checkpoints use the same tensors, so resuming and re-applying are one code path.
* ``export_merged`` / ``load_merged``: a model directory whose weights are M⊙(W+ΔW), whose
  config records the removed heads, so that ``load_merged`` rebuilds the shrunk shapes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from dsee_cli.atomic import atomic_write_text, fsync_dir, fsync_file
from dsee_cli.core.arch import block_linears, weight_out_in
from dsee_cli.pruning import apply_masks, prune_heads
from dsee_cli.pruning.slimming import FROZEN_CHANGED, prune_ffn
from dsee_cli.tuning import AdapterConfig, prepare_method
from dsee_cli.tuning.adapters import adapters_of, set_omegas, unwrap_adapters
from dsee_cli.tuning.sparse_training import finalize_sparse_training, sparse_layers

MASK_PREFIX = "mask::"
SPARSE_MASK_PREFIX = "sparsemask::"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().ravel()))


def unpack_mask(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy())[:n].astype(bool)).view(*shape)


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything that differs from the pretrained model: trainable tensors, frozen ones that
    pruning changed (EarlyBERT folds its coefficients into them), Ω, masks, removed units."""
    params = dict(model.named_parameters())
    frozen_changed = sorted(n for n in getattr(model, FROZEN_CHANGED, ()) if not params[n].requires_grad)
    tensors = {n: p.detach() for n, p in params.items() if p.requires_grad or n in frozen_changed}
    adapters = adapters_of(model)
    for name, a in adapters.items():
        for k in range(len(a.slices)):
            tensors[f"{name}.omega_{k}"] = a.omega(k)
    masks = {n: a.mask for n, a in adapters.items() if a.mask is not None}
    mask_delta = all(a.mask_delta for a in adapters.values())
    extra_masks = getattr(model, "dsee_other_masks", {})
    shapes = {}
    for name, mask in {**extra_masks, **masks}.items():
        tensors[MASK_PREFIX + name] = pack_mask(mask)
        shapes[name] = list(mask.shape)
    sparse = {}
    for name, layer in sparse_layers(model).items():  # sparse training: the current top-v masks
        tensors[SPARSE_MASK_PREFIX + name] = pack_mask(layer.mask)
        sparse[name] = {"shape": list(layer.mask.shape), "sparsity": layer.sparsity}
    meta = {
        "pruned_heads": getattr(model.config, "dsee_pruned_heads", None) or {},
        "pruned_ffn": getattr(model.config, "dsee_pruned_ffn", None) or {},
        "mask_shapes": shapes,
        "mask_delta": mask_delta,
        "sparse_masks": sparse,
        "frozen_changed": frozen_changed,
    }
    return tensors, meta


def restore_state(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Rebuild the state ``model_state`` described, onto the model as the method prepared it."""
    if meta.get("pruned_heads"):
        prune_heads(model, {int(k): v for k, v in meta["pruned_heads"].items()})
    if meta.get("pruned_ffn"):
        prune_ffn(model, {int(k): v for k, v in meta["pruned_ffn"].items()})
    adapters = adapters_of(model)
    set_omegas(adapters, {
        k.rsplit(".omega_", 1)[0] + "#" + k.rsplit(".omega_", 1)[1]: v
        for k, v in tensors.items() if ".omega_" in k and not k.startswith(MASK_PREFIX)
    })
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
            if "::" in name or ".omega_" in name:  # masks, and the trainer's optim::/rng:: entries
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in this model")
            params[name].copy_(value)
            params[name].requires_grad_(name not in frozen)
    if frozen:
        setattr(model, FROZEN_CHANGED, frozen)


def _atomic_dir(target: Path):
    """A temporary sibling directory that ``_commit_dir`` renames onto ``target``."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, target: Path) -> None:
    """Swap a finished export directory in. Its files are on disk before the switch; a kill
    between the two renames leaves no export, which the rerun (no metrics.json yet) writes again."""
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


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


def save_adapter(model: nn.Module, target: Path, method: AdapterConfig, base_model: str) -> None:
    """What the method trained (and the masks, Ω, removed units), to re-apply onto the base model."""
    tensors, meta = model_state(model)
    meta.update(method=asdict(method), base_model=base_model)
    save_state_dir(target, tensors, meta)


def apply_adapter(model: nn.Module, target: Path) -> None:
    """Re-apply a ``save_adapter`` directory onto the pretrained model it came from."""
    tensors, meta = load_state_dir(target)
    prepare_method(model, AdapterConfig.from_dict(meta["method"]))
    restore_state(model, tensors, meta)


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of the model as it computes, on the CPU: ΔW merged, M⊙(W+ΔW), sparse-training
    wrappers replaced by their masked weights, pruned weights of unadapted layers zeroed."""
    merged = copy.deepcopy(model).cpu()
    unwrap_adapters(merged)
    finalize_sparse_training(merged)
    for name, mask in getattr(model, "dsee_other_masks", {}).items():
        with torch.no_grad():
            weight_out_in(merged.get_submodule(name)).mul_(mask.cpu())
    merged.config.architectures = [type(merged).__name__]  # load_merged picks the model class from it
    return merged


def _write_model_dir(target: Path, write_weights, config, tokenizer) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(target)
    write_weights(tmp)
    config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _commit_dir(tmp, target)


def export_merged(model: nn.Module, tokenizer, target: Path, merged: nn.Module | None = None) -> nn.Module:
    """A plain model directory with weights M⊙(W+ΔW) and the removed heads in its config."""
    merged = merged if merged is not None else merged_copy(model)
    # save_model stores tied weights (GPT-2's LM head) once
    _write_model_dir(target, lambda d: save_model(merged, str(d / "model.safetensors"), metadata={"format": "pt"}),
                     merged.config, tokenizer)
    return merged


COMPRESSION_META = "compression.json"
MIN_ZERO_FRACTION = 1 / 32  # below this a bit mask costs more than the zeros it saves (fp32)


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (GPT-2's tied LM head), and the aliases."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def export_compressed(merged: nn.Module, tokenizer, target: Path) -> dict | None:
    """Like export/merged, but every block linear weight that pruning left with zeros is stored as
    a bit-packed mask plus its non-zero values. Returns the sizes of what it compressed (None, and
    nothing written, where no weight has enough zeros to gain from it)."""
    tensors, aliases = _unique_state(merged)
    compressed, dense_bytes, packed_bytes = {}, 0, 0
    for module_name in block_linears(merged):
        name = f"{module_name}.weight"
        w = tensors.get(name)
        if w is None or w.dim() != 2:
            continue
        keep = w.ne(0)
        if 1 - keep.float().mean().item() < MIN_ZERO_FRACTION:
            continue
        del tensors[name]
        tensors[f"{name}::mask"], tensors[f"{name}::values"] = pack_mask(keep), w[keep]
        compressed[name] = {"shape": list(w.shape)}
        dense_bytes += w.numel() * w.element_size()
        packed_bytes += tensors[f"{name}::mask"].numel() + tensors[f"{name}::values"].numel() * w.element_size()

    if not compressed:
        return None

    def write(d: Path) -> None:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / COMPRESSION_META).write_text(json.dumps({"format": 1, "compressed": compressed, "aliases": aliases},
                                                     indent=2, sort_keys=True))

    _write_model_dir(target, write, merged.config, tokenizer)
    return {"tensors": len(compressed), "linears_dense_bytes": dense_bytes, "linears_compressed_bytes": packed_bytes}


def _compressed_state(source: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((source / COMPRESSION_META).read_text())
    tensors = load_file(str(source / "model.safetensors"))
    for name, info in meta["compressed"].items():
        keep = unpack_mask(tensors.pop(f"{name}::mask"), info["shape"])
        values = tensors.pop(f"{name}::values")
        dense = torch.zeros(info["shape"], dtype=values.dtype)
        dense[keep] = values
        tensors[name] = dense
    for alias, name in meta["aliases"].items():
        tensors[alias] = tensors[name]
    return tensors


def load_merged(source: Path) -> nn.Module:
    """Rebuild an exported model (export/merged or export/compressed): same shapes (heads and FFN
    neurons removed again), identical weights."""
    source = Path(source)
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    heads = getattr(config, "dsee_pruned_heads", None) or {}
    ffn = getattr(config, "dsee_pruned_ffn", None) or {}
    config.dsee_pruned_heads = config.dsee_pruned_ffn = None
    causal = any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in (config.architectures or []))
    model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    if heads:
        prune_heads(model, {int(k): v for k, v in heads.items()})
    if ffn:
        prune_ffn(model, {int(k): v for k, v in ffn.items()})
    if (source / COMPRESSION_META).is_file():
        model.load_state_dict(_compressed_state(source), strict=True)
    else:
        load_model(model, str(source / "model.safetensors"), strict=True)
    return model.eval()


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def load_merged_tokenizer(source: Path):
    return AutoTokenizer.from_pretrained(source, local_files_only=True)
