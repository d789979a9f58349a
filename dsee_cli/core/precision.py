"""Numerical precision of a run, with Lightning's names.

* ``32-true``: everything in fp32.
* ``bf16-mixed``: the forward pass under ``torch.autocast(dtype=bfloat16)``.
* ``16-mixed``: autocast to fp16 with a gradient scaler (GPUs without bf16).
* ``auto``: ``bf16-mixed`` on a GPU that supports it, ``16-mixed`` on one that does not, ``32-true`` on CPU.

Parameters and optimizer state stay fp32 in every mode (autocast casts per operation), so
exports keep the model's dtype. On CPU the mixed modes run CPU autocast: the same code path as
on a GPU, which is how the tests cover it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dsee_cli.errors import choice_error

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # resolved: 32-true, bf16-mixed or 16-mixed
    device_type: str  # "cpu" or "cuda"

    @property
    def mixed(self) -> bool:
        return self.name in _DTYPES

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return torch.amp.GradScaler(self.device_type) if self.name == "16-mixed" else None


FP32 = Precision("32-true", "cpu")


def resolve_precision(name: str, device: torch.device, base_dtype: str = "float32") -> Precision:
    """``auto`` as the module doc says; over a half-precision base (``model.dtype``) it is that
    dtype's mixed mode, on the CPU too (fp32 activations cannot meet bf16 weights unmixed)."""
    if name not in PRECISIONS:
        raise choice_error("precision (trainer.precision)", name, PRECISIONS)
    if name == "auto" and base_dtype != "float32":
        name = "bf16-mixed" if base_dtype == "bfloat16" else "16-mixed"
    if name == "auto":
        if device.type != "cuda":
            name = "32-true"
        else:
            name = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return Precision(name, device.type)
