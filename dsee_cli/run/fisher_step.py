"""The Ω step of ``omega=fisher`` (RoSA): a LoRA warm-up, gradients of the adapted W on the batches
that follow it, Ω = the largest statistic of each matrix; then the adapters restart (RoSA) or keep
the warm-up's values.

The warm-up is phase I's training (its rate, batch, precision and hooks) for ``omega.warmup_steps``
steps with Ω empty, under its own seed; phase I then seeds itself as always, so a run whose Ω
came from the cache computes what a run that found it computes. The gradient batches are the
``omega.grad_batches`` batches that come after the warm-up in its data order, each one micro-step
of the trainer (a distributed run: every rank its share, gradients summed over the ranks).

Ω and, without ``omega.restart``, the warm-up's adapter values are cached under the adapted
weights' content and everything phase I depends on (its step fingerprint): the jobs of a sweep
that differ only after phase I (pruning, recovery) compute it once, waiting on a file lock.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dsee_cli
from dsee_cli.atomic import atomic_path
from dsee_cli.config import RunConfig, task_hparams
from dsee_cli.core import dist
from dsee_cli.core.precision import Precision
from dsee_cli.errors import DSEEError
from dsee_cli.run.plan import phase_settings
from dsee_cli.run.steps import StepLock, step_fingerprint
from dsee_cli.run.train import ProgressSink, StepHooks, batch_indices, micro_batches, train_phase
from dsee_cli.tuning.adapters import adapters_of, omega_keys, slice_pretrained_weight
from dsee_cli.tuning.fisher import accumulator_bytes, gradient_scores, select_by_scores
from dsee_cli.tuning.omega import cache_key, omega_counts

WARMUP = "omega-warmup"  # the warm-up's phase name (progress, W&B)


def check_gradient_batches(cfg: RunConfig, n_train: int) -> None:
    """omega.grad_batches against the training set, before any training: they must be distinct batches."""
    if cfg.omega.method != "fisher":
        return
    batch = task_hparams(cfg).batch_size
    per_epoch = math.ceil(n_train / batch)
    if cfg.omega.grad_batches > per_epoch:
        raise DSEEError(f"omega.grad_batches={cfg.omega.grad_batches} is more than the training set holds: "
                        f"{n_train} examples in batches of {batch} make {per_epoch} batch(es). Valid: 1..{per_epoch} "
                        f"(or a larger training set: task.max_train_samples).")


def _shapes(keys: dict) -> dict[str, tuple[int, int]]:
    return {key: (a.slices[k][1] - a.slices[k][0], a.in_features) for key, (a, k) in keys.items()}


def _pieces(cfg: RunConfig, task, phase, device: torch.device) -> list[tuple[dict, float]]:
    """This rank's micro-batches of the gradient batches, each with its weight in its micro-step's
    mean loss over the ranks; a micro-step that is empty on any rank (an epoch's tail) is skipped
    by all, so that every rank runs the same backward passes."""
    n_train, w = len(task.train.input_ids), dist.world()
    per_epoch = math.ceil(n_train / phase.batch_size)
    pad = task.loaded.tokenizer.pad_token_id
    out = []
    for step in range(cfg.omega.warmup_steps, cfg.omega.warmup_steps + cfg.omega.grad_batches):
        indices = batch_indices(step, n_train, per_epoch, phase)
        for piece in micro_batches(indices, w.size, cfg.trainer.grad_accum, w.rank):
            batch = task.ops.collate(task.train, piece, pad) if piece else None
            count = float(task.ops.loss_terms(batch)) if batch is not None else 0.0
            totals = dist.all_reduce_sum_(torch.tensor([count, float(count == 0)], device=device))
            if float(totals[1]) == 0 and float(totals[0]) > 0:
                out.append(({k: v.to(device) for k, v in batch.items()}, count / float(totals[0])))
    return out


def fisher_omega(cfg: RunConfig, model: torch.nn.Module, task, precision: Precision, device: torch.device,
                 hooks: StepHooks, sink: ProgressSink, say, cache_dir: Path | None) -> tuple[dict, dict]:
    """Ω by gradients for every sparse adapter of ``model`` (the same on every rank). Returns
    (what metrics.json records of it, Ω by omega key); the adapters hold the warm-up's values or
    their initial ones (omega.restart)."""
    o, started = cfg.omega, time.perf_counter()
    adapters = adapters_of(model)
    keys = omega_keys(adapters)
    counts = omega_counts(_shapes(keys), cfg.adapter.omega_size, cfg.adapter.density)
    weights = {key: slice_pretrained_weight(a, k) for key, (a, k) in keys.items()}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    path, lock = None, None
    if cache_dir is not None:
        key = cache_key(weights, counts, "fisher", o.grebsmo(cfg.seed), {"phase1": step_fingerprint(cfg, "phase1")})
        path = Path(cache_dir) / f"omega-fisher-{key}.safetensors"

    def look_up() -> dict[str, torch.Tensor]:  # rank 0: the cached result, or the lock held while all compute
        nonlocal lock
        if path is None:
            return {}
        lock = StepLock(path.with_suffix(".lock")).acquire(
            on_wait=lambda: say(f"waiting: another run is computing Ω ({path.name})"))
        if path.exists():
            lock.release()
            return load_file(path)
        return {}

    try:
        found = dist.on_main(look_up)
        if found:
            indices = {k.split("::", 1)[1]: v for k, v in found.items() if k.startswith("omega::")}
            warm = {k.split("::", 1)[1]: v for k, v in found.items() if k.startswith("adapter::")}
            with torch.no_grad():
                for name, value in warm.items():
                    trained[name].copy_(value.to(trained[name].device))
            info = {"from_cache": True}
        else:
            indices, warm, info = _compute(cfg, model, task, precision, device, hooks, sink, say, keys, counts, trained)
            if path is not None and dist.world().main:
                tensors = {f"omega::{k}": v.cpu().contiguous() for k, v in indices.items()}
                tensors |= {f"adapter::{k}": v.detach().cpu().contiguous() for k, v in warm.items()}
                with atomic_path(path) as tmp:
                    save_file(tensors, str(tmp), metadata={"method": "fisher", "version": dsee_cli.results_version()})
            info["from_cache"] = False
    finally:
        if lock is not None:
            lock.release()
    info |= {"method": "fisher", "warmup_steps": o.warmup_steps, "grad_batches": o.grad_batches,
             "grad_stat": o.grad_stat, "restart": o.restart, "passes": o.passes,
             "positions": int(sum(counts.values())), "seconds": round(time.perf_counter() - started, 3),
             "cache_path": str(path or "")}
    return info, indices


def _compute(cfg, model, task, precision, device, hooks, sink, say, keys, counts, trained) -> tuple[dict, dict, dict]:
    o = cfg.omega
    initial = {n: p.detach().clone() for n, p in trained.items()} if o.restart else {}
    phase = replace(phase_settings(cfg, "phase1", precision), name=WARMUP, seed=cfg.seed * 1000 + 999)
    info: dict = {}
    if o.warmup_steps:
        say(f"  LoRA warm-up: {o.warmup_steps} steps (lr {phase.lr:g}), Ω empty")
        trainer = replace(cfg.trainer, max_steps=o.warmup_steps, checkpoint_every=0, keep_best=False,
                          eval_every=o.warmup_steps)
        state = train_phase(model, task.train, task.evals, task.ops, phase, trainer,
                            task.loaded.tokenizer.pad_token_id, device, save=lambda st, extra: None, sink=sink,
                            hooks=hooks)
        info["warmup_eval"] = state.history[-1] if state.history else None
        info["warmup_seconds"] = round(state.seconds, 3)
    bases = {key: (a.base, a.slices[k]) for key, (a, k) in keys.items()}
    unique = list({id(layer): layer.weight for layer, _ in bases.values()}.values())
    info["accumulator_bytes"] = accumulator_bytes(unique, o.passes)
    say(f"  gradients of {len(unique)} matrices over {o.grad_batches} batch(es) ({o.grad_stat}; accumulators "
        f"{info['accumulator_bytes'] / 2**20:.1f} MiB fp32{f', {o.passes} passes' if o.passes > 1 else ''})")
    scores = gradient_scores(model, bases, _pieces(cfg, task, phase, device), task.ops.loss, o.grad_stat, o.passes,
                             precision.autocast)
    indices = dist.on_main(lambda: select_by_scores(scores, counts, "fisher"))
    warm = {} if o.restart else {n: p.detach().clone() for n, p in trained.items()}
    if o.restart:
        with torch.no_grad():
            for name, value in initial.items():
                trained[name].copy_(value)
    return indices, warm, info
