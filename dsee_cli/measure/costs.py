"""What a run costs and what its result saves, measured on the run's device, never assumed.

* Memory: on a GPU the allocator's peak (``max_memory_allocated``); on the CPU the process's peak
  resident set (``VmHWM``), which the kernel lets us reset (``/proc/self/clear_refs``) so that each
  phase and each forward pass has its own peak.
* Inference: the final model against the dense pretrained model it came from, in this process:
  latency at batch 1 and 32 (median of timed runs after warm-up, the two models interleaved so
  that both see the same machine), peak memory of a batch-32 forward (the weights plus the working
  memory), parameters, non-zeros and bytes on disk.
* 2:4: on a GPU of compute capability >= 8.0, the pruned linears converted to
  ``torch.sparse.to_sparse_semi_structured`` and timed against the dense masked ones; used only
  where it measured faster. On a CPU it gives no speed-up and is not tried.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsee_cli.core.arch import block_linears, takes_segments
from dsee_cli.core.precision import FP32, Precision


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_host_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so the next peak counts what is really used
    rather than what an earlier computation left in the allocator's pools."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    _release_freed_host_memory()
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set size to the current one
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """The peak since the last reset: allocated GPU memory, or the process's resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no reset: the process's lifetime peak
    return kib * 1024


def current_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return (_status_kib("VmRSS") or 0) * 1024


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))


def tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(model: nn.Module, batch: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(6, vocab - 1), (batch, seq_len), generator=gen)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if takes_segments(model):  # a sentence pair, as the pair tasks feed it: the second half is segment B
        inputs["token_type_ids"] = (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, -1).to(device)
    return inputs


@torch.inference_mode()
def _forward_seconds(model: nn.Module, inputs: dict, device: torch.device, precision: Precision) -> float:
    _sync(device)
    started = time.perf_counter()
    with precision.autocast():
        model(**inputs)
    _sync(device)
    return time.perf_counter() - started


@dataclass(frozen=True)
class TimingSettings:
    seq_len: int = 128
    batches: tuple[int, ...] = (1, 32)
    warmup: int = 2
    repeats: int = 7
    budget_seconds: float = 20.0  # per model and batch size: fewer repeats (at least 3) for slow forwards


def compare_latency(models: dict[str, nn.Module], device: torch.device, precision: Precision = FP32,
                    settings: TimingSettings = TimingSettings()) -> dict[str, dict[int, float]]:
    """Median seconds per forward for each model and batch size, the models interleaved."""
    out: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch in settings.batches:
        inputs = {name: _inputs(m, batch, settings.seq_len, device) for name, m in models.items()}
        slowest = 0.0
        for _ in range(settings.warmup):
            for name, m in models.items():
                slowest = max(slowest, _forward_seconds(m, inputs[name], device, precision))
        affordable = int(settings.budget_seconds / max(slowest, 1e-9))
        repeats = max(min(settings.repeats, 3), min(settings.repeats, affordable))
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():
                times[name].append(_forward_seconds(m, inputs[name], device, precision))
        for name in models:
            out[name][batch] = statistics.median(times[name])
    return out


@torch.inference_mode()
def forward_peak_bytes(model: nn.Module, device: torch.device, precision: Precision, batch: int,
                       seq_len: int) -> int:
    """The weights plus the working memory of one forward pass at this batch size."""
    inputs = _inputs(model, batch, seq_len, device)
    reset_peak_memory(device)
    before = current_memory_bytes(device)
    with precision.autocast():
        model(**inputs)
    working = max(0, peak_memory_bytes(device) - before)
    return tensor_bytes(model) + working


def count(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), each shared tensor once."""
    seen, total, nonzero = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        nonzero += int(p.ne(0).sum())
    return total, nonzero


def saved_bytes(model: nn.Module) -> int:
    """The model's size as a safetensors file (written to a temporary folder and measured)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, f"{tmp}/model.safetensors")
        return Path(f"{tmp}/model.safetensors").stat().st_size


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def measure_savings(final: nn.Module, dense: nn.Module, device: torch.device, precision: Precision,
                    settings: TimingSettings, export_bytes: dict[str, int]) -> dict:
    """The final model against the dense one it came from: latency, memory, size, parameters."""
    final, dense = final.to(device).eval(), dense.to(device).eval()
    latency = compare_latency({"final": final, "dense": dense}, device, precision, settings)
    big = max(settings.batches)
    # each measured twice, in both orders, keeping the larger: what a forward needs, not what the pools held
    memory = {"final": 0, "dense": 0}
    for order in (("final", "dense"), ("dense", "final")):
        for name in order:
            m = final if name == "final" else dense
            memory[name] = max(memory[name], forward_peak_bytes(m, device, precision, big, settings.seq_len))
    params, nonzero = count(final)
    dense_params, _ = count(dense)
    dense_disk = saved_bytes(dense.cpu())
    dense.to(device)
    out = {
        "device": str(device), "precision": precision.name, "seq_len": settings.seq_len,
        "latency_ms": {f"batch{b}": round(latency["final"][b] * 1e3, 3) for b in settings.batches},
        "dense_latency_ms": {f"batch{b}": round(latency["dense"][b] * 1e3, 3) for b in settings.batches},
        "speedup": {f"batch{b}": _ratio(latency["dense"][b], latency["final"][b]) for b in settings.batches},
        "memory_bytes": memory["final"], "dense_memory_bytes": memory["dense"],
        "memory_ratio": _ratio(memory["final"], memory["dense"]),
        "params": params, "nonzero_params": nonzero, "dense_params": dense_params,
        "nonzero_ratio": _ratio(nonzero, dense_params),
        "dense_bytes": dense_disk,
    }
    for name, size in export_bytes.items():
        out[f"{name}_bytes"] = size
        out[f"{name}_ratio"] = _ratio(size, dense_disk)
    return out


def semi_structured(final: nn.Module, device: torch.device, precision: Precision, n: int, m: int,
                    settings: TimingSettings) -> dict:
    """Whether 2:4 semi-structured weights pay off here: measured, with the reason for the choice."""
    if (n, m) != (2, 4):
        return {"used": False, "why": f"{n}:{m} is not the 2:4 pattern that GPUs accelerate"}
    if device.type != "cuda":
        return {"used": False, "why": "2:4 sparsity gives no speed-up on a CPU; the export holds the dense masked "
                                      "weights"}
    if torch.cuda.get_device_capability(device) < (8, 0):
        return {"used": False, "why": "2:4 kernels need compute capability >= 8.0"}
    if precision.name not in ("bf16-mixed", "16-mixed"):
        return {"used": False, "why": "2:4 kernels take fp16 / bf16 weights; run with a mixed precision"}
    return _semi_structured_on_gpu(final, device, precision, settings)


def _semi_structured_on_gpu(final: nn.Module, device: torch.device, precision: Precision,
                            settings: TimingSettings) -> dict:  # pragma: no cover - needs an Ampere+ GPU
    import copy

    from torch.sparse import to_sparse_semi_structured

    dtype = torch.bfloat16 if precision.name == "bf16-mixed" else torch.float16
    dense = copy.deepcopy(final).to(device=device, dtype=dtype).eval()
    sparse = copy.deepcopy(dense)
    try:
        for name, module in block_linears(sparse).items():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    except Exception as exc:  # a shape or build the kernels do not support
        return {"used": False, "why": f"conversion failed: {exc}"}
    inputs = _inputs(dense, max(settings.batches), settings.seq_len, device)
    with torch.inference_mode():
        reference = dense(**inputs).logits.float()
        gap = (reference - sparse(**inputs).logits.float()).abs().max().item()
    times = compare_latency({"dense": dense, "sparse": sparse}, device, FP32, settings)
    speedup = {f"batch{b}": _ratio(times["dense"][b], times["sparse"][b]) for b in settings.batches}
    return two_four_verdict(gap, reference.abs().max().item(), precision.name, speedup)


# Largest logit difference the semi-structured model may have from the dense masked one, relative to
# the largest logit: both compute in the same 16-bit dtype and differ only in summation order, so
# a few units of the dtype's rounding (bf16 2^-8 ≈ 0.0039, fp16 2^-11 ≈ 0.0005) accumulated over the
# layers; 8 units allows for a dozen blocks. Beyond it the sparse kernel computes something else.
TWO_FOUR_TOLERANCE = {"bf16-mixed": 8 * 2**-8, "16-mixed": 8 * 2**-11}


def two_four_verdict(gap: float, scale: float, precision: str, speedup: dict[str, float | None]) -> dict:
    """Whether the semi-structured model is used: it must compute what the dense masked one does
    (within TWO_FOUR_TOLERANCE) and measure faster at every batch size."""
    tolerance = TWO_FOUR_TOLERANCE[precision] * max(1.0, scale)
    out = {"speedup": speedup, "max_logit_difference": gap, "tolerance": tolerance}
    if not gap <= tolerance:  # NaN included
        return {**out, "used": False, "why": f"its logits differ from the dense masked model's by {gap:.3g} "
                                             f"(tolerance {tolerance:.3g} in {precision}): not used"}
    faster = all(v and v > 1.0 for v in speedup.values())
    return {**out, "used": faster, "why": "measured faster than the dense masked weights" if faster else
            "measured no faster than the dense masked weights on this GPU"}
