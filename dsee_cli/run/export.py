"""Saving and reloading, safetensors + JSON only (nothing is ever unpickled).

* ``save_adapter`` / ``apply_adapter``: a small checkpoint (A, B, S values, Ω indices, masks,
  task head, pruned heads) that re-applies onto the pretrained model. The training
  checkpoints use the same tensors, so resuming and re-applying are one code path.
* ``export_merged`` / ``load_merged``: a model directory whose weights are M⊙(W+ΔW), whose
  config records the removed heads, so that ``load_merged`` rebuilds the shrunk shapes. Decoder
  LLMs pruned alike in every layer state their shrunk head counts and MLP width as plain config
  keys instead, so ``AutoModelForCausalLM.from_pretrained`` loads them with no dsee code.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from dsee_cli.atomic import fsync_dir, fsync_file
from dsee_cli.core.arch import block_linears, task_head_params, weight_out_in
from dsee_cli.pruning.masks import mask_tensor
from dsee_cli.pruning.residual import PRUNED_UNITS, removed_units, replay_removal, stated_in_config
from dsee_cli.run.checkpoint import load_state_dir, model_state, pack_mask, restore_state, save_state_dir, unpack_mask
from dsee_cli.tuning import AdapterConfig, prepare_method
from dsee_cli.tuning.adapters import unwrap_adapters
from dsee_cli.tuning.peft_bridge import save_peft_format
from dsee_cli.tuning.sparse_training import finalize_sparse_training


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


def save_adapter(model: nn.Module, target: Path, method: AdapterConfig, base_model: str) -> str | None:
    """What the method trained (and the masks, Ω, removed units), to re-apply onto the base model.
    A PEFT method's adapter is also written in PEFT's own format, where that format holds the whole
    model (nothing pruned); returns why it was not, or None."""
    tensors, meta = model_state(model)
    meta.update(method=asdict(method), base_model=base_model)
    peft_note = None
    if method.tuning_method.peft:
        if meta["mask_shapes"] or meta["pruned_heads"] or meta["pruned_ffn"] or meta["pruned_hidden"]:
            peft_note = "not in PEFT's format: PEFT's adapter holds no pruning (export/merged is the pruned model)"
        else:
            heads = list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in task_head_params(model)))
            save_peft_format(model, method.peft, heads, Path(target))
    save_state_dir(target, tensors, meta)  # meta.json last: it marks the directory complete
    return peft_note


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
            weight_out_in(merged.get_submodule(name)).mul_(mask_tensor(mask).cpu())
    merged.config.architectures = [type(merged).__name__]  # load_merged picks the model class from it
    merged.config.dtype = next(p.dtype for p in merged.parameters() if p.is_floating_point())  # from_pretrained's
    stated_in_config(merged)  # decoder LLMs pruned alike in every layer: plain from_pretrained loads them
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


def _stored_dtype(source: Path) -> torch.dtype:
    """The floating-point dtype the export's weights were saved in (a bf16 base exports bf16)."""
    from safetensors import safe_open

    name = "model.safetensors" if (source / "model.safetensors").is_file() else None
    if name is None:
        return torch.float32
    with safe_open(str(source / name), framework="pt") as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype in ("BF16", "F16", "F32", "F64"):
                return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}[dtype]
    return torch.float32


def load_merged(source: Path) -> nn.Module:
    """Rebuild an exported model (export/merged or export/compressed): same shapes (heads and FFN
    neurons removed again), identical weights."""
    source = Path(source)
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    removed = removed_units(config)
    for key in PRUNED_UNITS:
        setattr(config, key, None)
    causal = any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in (config.architectures or []))
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=_stored_dtype(source))
    replay_removal(model, removed["heads"], removed["ffn"], removed["hidden"])
    if (source / COMPRESSION_META).is_file():
        model.load_state_dict(_compressed_state(source), strict=True)
    else:
        load_model(model, str(source / "model.safetensors"), strict=True)
    return model.eval()


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def load_merged_tokenizer(source: Path):
    return AutoTokenizer.from_pretrained(source, local_files_only=True)
