"""Serving speed measured on the export, as a user would run it (``dsee eval <run> --speed``, and
the measure step of a decoder run): the exported model loaded back from disk (plain
``from_pretrained`` where its config states its shapes) against the dense pretrained model, in one
process, alternated so that both see the same machine.

* prefill: one forward of a ``prompt_len``-token prompt (the LM head on the last position, as
  generation runs it), at each batch size;
* decode: ``new_tokens`` greedy steps with the KV cache after that prompt (the prefill untimed);

both as tokens per second (median of the repeats) and the speed-up, beside the FLOPs ratio
(blocks and LM head, per token of a ``prompt_len`` sequence), parameters and bytes on disk. On a GPU
the models run in bf16 with SDPA attention; on a CPU in the dtype they were exported in.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from dsee_cli.measure.accounting import inference_flops
from dsee_cli.measure.costs import _inputs, _ratio, _sync, count


@dataclass(frozen=True)
class ServingSettings:
    prompt_len: int = 128  # task.seq_len
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 16)
    repeats: int = 5  # at most; rounds stop once a measurement has taken budget_seconds (both models)
    budget_seconds: float = 30.0  # a slow measurement (a CPU at batch 16) is timed once per model


def _prompt(model: nn.Module, batch: int, length: int, device: torch.device) -> torch.Tensor:
    return _inputs(model, batch, length, device)["input_ids"]  # the latency measurement's seeded random ids


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - started


def _cache_key(model: nn.Module) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Seconds for ``new_tokens`` greedy steps with the KV cache, after an untimed prefill of ``ids``."""
    key = _cache_key(model)  # transformers 5.25 renamed past_key_values to cache
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
    _sync(device)
    started = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{key: cache})
        cache, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - started


def _alternated(timed: dict[str, callable], settings: ServingSettings) -> dict[str, float]:
    """Median seconds of each measurement: rounds of one run per model, alternated, until
    ``repeats`` rounds or ``budget_seconds`` spent (the models are warmed up before)."""
    times: dict[str, list[float]] = {name: [] for name in timed}
    spent, rounds = 0.0, 0
    while rounds < settings.repeats and (rounds == 0 or spent < settings.budget_seconds):
        for name, fn in timed.items():
            times[name].append(fn())
            spent += times[name][-1]
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


def serving_flops(model: nn.Module, seq_len: int) -> int:
    """inference_flops (the blocks) plus the LM head, which hidden-width pruning shrinks too."""
    head = model.get_output_embeddings()
    vocab, hidden = head.weight.shape
    return inference_flops(model, seq_len) + 2 * seq_len * vocab * hidden


def measure_serving(export: nn.Module, dense: nn.Module, device: torch.device, settings: ServingSettings,
                    export_bytes: int, dense_bytes: int) -> dict:
    """Prefill and decode tokens per second of the export and the dense model, alternated, and the speed-ups."""
    export, dense = export.to(device).eval(), dense.to(device).eval()
    models = {"export": export, "dense": dense}
    out: dict = {"device": str(device), "dtype": str(next(export.parameters()).dtype).removeprefix("torch."),
                 "prompt_tokens": settings.prompt_len, "new_tokens": settings.new_tokens}
    for m in models.values():  # warm-up: kernels, allocator pools, the cache's code paths
        warm = _prompt(m, 1, min(16, settings.prompt_len), device)
        prefill_seconds(m, warm, device)
        decode_seconds(m, warm, 4, device)
    for batch in settings.batches:
        prompts = {name: _prompt(m, batch, settings.prompt_len, device) for name, m in models.items()}
        prefill = _alternated({name: (lambda m=m, p=prompts[name]: prefill_seconds(m, p, device))
                               for name, m in models.items()}, settings)
        decode = _alternated({name: (lambda m=m, p=prompts[name]: decode_seconds(m, p, settings.new_tokens, device))
                              for name, m in models.items()}, settings)
        for what, seconds, tokens in (("prefill", prefill, batch * settings.prompt_len),
                                      ("decode", decode, batch * settings.new_tokens)):
            out.setdefault(what, {})[f"batch{batch}"] = {
                "tokens_per_second": round(tokens / seconds["export"], 2),
                "dense_tokens_per_second": round(tokens / seconds["dense"], 2),
                "speedup": _ratio(seconds["dense"], seconds["export"])}
    params, _ = count(export)
    dense_params, _ = count(dense)
    length = settings.prompt_len
    out.update(flops_ratio=_ratio(serving_flops(export, length), serving_flops(dense, length)),
               params=params, dense_params=dense_params, params_ratio=_ratio(params, dense_params),
               export_bytes=export_bytes, dense_bytes=dense_bytes, bytes_ratio=_ratio(export_bytes, dense_bytes))
    return out
