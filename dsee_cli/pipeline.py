"""One DSEE experiment, phase by phase, in one direction:

config → model + data → Ω (cached) → adapters → phase I → pruning → recovery → evaluation
→ export → metrics.json

A checkpoint is written after each phase and every ``trainer.checkpoint_every`` steps; the
same command in the same run directory resumes where it stopped and ends with the same
metrics as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import omega as omega_lib
from .accounting import inference_flops, scope_size, trainable_counts
from .adapters import adapters_of, omega_keys, set_omegas, slice_pretrained_weight
from .arch import attention_units
from .atomic import atomic_write_text
from .config import RunConfig, method_settings, pruning_settings, sparsity_schedule, task_hparams, validate
from .costs import TimingSettings, measure_savings, semi_structured
from .data import check_data_files, load_task
from .errors import DSEEError
from .export import (
    STATE_META,
    clean_state_dir,
    export_compressed,
    export_merged,
    load_state_dir,
    merged_copy,
    model_state,
    restore_state,
    save_adapter,
    save_state_dir,
)
from .hub_data import uses_mirror
from .methods import MERGEABLE, SPARSE_TRAINING, prepare_method
from .models import TINY_MODELS, hub_reachable, resolve_source
from .nlg import NLG_TASKS, check_nlg_files, load_nlg
from .precision import Precision, resolve_precision
from .pruning import (
    PruningSettings,
    apply_masks,
    compute_masks,
    head_scores,
    lowest_heads,
    prune_heads,
    reapply_masks,
)
from .slimming import add_slimming, slim_and_prune, slimming_penalty
from .sparse_training import sparse_layers, update_masks
from .steps import StepLock, StepRecord, StepStore, step_fingerprint
from .tasks import data_settings, load_pretrained, nlg_settings, prepare_task
from .train import (
    PhaseSettings,
    PhaseState,
    ProgressSink,
    StepHooks,
    summarize,
    train_phase,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DSEEError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu or auto.")
    return torch.device(name)


def config_fingerprint(cfg: RunConfig) -> str:
    """What must match for a run directory's checkpoint or metrics.json to be this run's: every
    setting that changes its numbers (not logging, where it runs, how often it saves or prints)."""
    d = asdict(cfg)
    # measuring is redone on a finished run that lacks it; per_task is applied and empty here
    for key in ("logger", "resume", "measure", "reuse", "per_task"):
        d.pop(key)
    for key in ("checkpoint_every", "device", "threads", "log_every_seconds"):
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


def write_failure(run_dir: Path, exc: BaseException, stage: str, sweep_run: str | None = None) -> Path:
    """failed.json: what stopped this run, so that a sweep can go on and be reported honestly.
    Call it from the ``except`` block (the traceback is the one being handled)."""
    record = {"error": str(exc), "type": type(exc).__name__, "stage": stage, "sweep_run": sweep_run,
              "traceback": None if isinstance(exc, DSEEError) else traceback.format_exc()}
    path = Path(run_dir) / "failed.json"
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


class Checkpoint:
    """run_dir/checkpoint: the model's state (export.model_state), optimizer, RNG and progress."""

    def __init__(self, run_dir: Path, fingerprint: str):
        self.dir = Path(run_dir) / "checkpoint"
        self.fingerprint = fingerprint

    def load(self, say=lambda text: None) -> tuple[dict, dict] | None:
        """This configuration's checkpoint; another configuration's is removed (the run starts over)."""
        if not (self.dir / "meta.json").is_file():
            return None
        tensors, meta = load_state_dir(self.dir)
        if meta.get("fingerprint") != self.fingerprint:
            say(f"the checkpoint here is from a different configuration (fingerprint {meta.get('fingerprint')}, "
                f"this run {self.fingerprint}): starting over")
            self.clear()
            return None
        return tensors, meta

    def save(self, model, stage: str, progress: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
        tensors, model_meta = model_state(model)
        meta = {"fingerprint": self.fingerprint, "stage": stage, "model": model_meta, **progress}
        save_state_dir(self.dir, {**tensors, **(extra or {})}, meta)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def omega_settings(cfg: RunConfig) -> omega_lib.GreBsmoSettings:
    o = cfg.omega
    overrides = {k: getattr(o, k) for k in ("rank", "rank_start", "rank_step", "outer_iters", "inner_iters",
                                            "threshold", "soft", "reset_sparse", "tol")}
    settings = omega_lib.settings_for(o.preset, seed=o.seed, **overrides)
    if o.sparse_card is not None:
        settings = replace(settings, sparse_card=o.sparse_card or None)
    return settings


def omega_cache_dir(cfg: RunConfig) -> Path | None:
    if not cfg.omega.cache:
        return None
    if cfg.omega.cache_dir:
        return Path(cfg.omega.cache_dir).expanduser()
    root = os.environ.get("DSEE_CACHE") or Path.home() / ".cache" / "dsee-cli"
    return Path(root) / "omega"


def round_of(cfg: RunConfig, phase: str) -> int:
    """Which round a recovery phase trains: IMP's ``retrain<r>`` is round r, ``recovery`` the last."""
    if phase == "recovery":
        return cfg.pruning.rounds if cfg.pruning.method == "imp" else 1
    return int(phase.removeprefix("retrain"))


def phase_of_round(r: int, rounds: int) -> str:
    return "recovery" if r == rounds else f"retrain{r}"


def rename_rounds(meta: dict, rounds: int, to_store: bool) -> dict:
    """A checkpoint's phase names made independent of the run's number of rounds (``round<r>``,
    to store a step) or back to this run's (``retrain<r>`` / ``recovery``, to use one)."""
    def rename(name: str) -> str:
        if to_store:
            if name == "recovery":
                return f"round{rounds}"
            return f"round{name[7:]}" if name.startswith("retrain") else name
        return phase_of_round(int(name[5:]), rounds) if name.startswith("round") and name[5:].isdigit() else name
    out = {rename(k): v for k, v in meta.items()}
    out["stage"] = rename(meta.get("stage", ""))
    return out


def phase_settings(cfg: RunConfig, phase: str, precision: Precision) -> PhaseSettings:
    """Phase I, or a recovery phase (``recovery``, and IMP's ``retrain<r>`` between rounds)."""
    t, task, per_model = cfg.trainer, cfg.task, task_hparams(cfg)
    p = t.phase1 if phase == "phase1" else t.recovery
    if phase == "phase1":
        epochs, lr = p.epochs or task.epochs, p.lr or per_model.lr
    else:
        epochs, lr = p.epochs or task.recovery_epochs, p.lr or task.recovery_lr or per_model.lr
    return PhaseSettings(
        name=phase, epochs=epochs, lr=lr, batch_size=per_model.batch_size, eval_batch_size=t.eval_batch_size,
        warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        eval_every=t.eval_every, checkpoint_every=t.checkpoint_every, max_steps=t.max_steps, precision=precision,
        keep_best=t.keep_best,
        # round r trains from the same seed whether it is a run's last round or not, so that
        # IMP's rounds are one chain of steps (steps.py)
        seed=cfg.seed * 1000 + (0 if phase == "phase1" else round_of(cfg, phase)),
    )


def _state(meta: dict, phase: str) -> PhaseState:
    return PhaseState(**meta[phase]) if phase in meta else PhaseState()


def preflight(cfg: RunConfig) -> None:
    """The checks that fail fast (config values, where the model and data come from), before
    anything slow starts: W&B, model weights, Ω."""
    validate(cfg)
    if cfg.model.name not in TINY_MODELS or cfg.model.path:
        resolve_source(cfg.model.name, cfg.model.path)
    uses_hub_data = not (cfg.task.name == "synthetic" or cfg.task.synthetic_standin or cfg.task.data_dir
                         or cfg.task.train_file)
    if uses_hub_data and not uses_mirror() and not hub_reachable():  # offline: the hint, at once
        if cfg.task.name in NLG_TASKS:
            load_nlg(nlg_settings(cfg))
        else:
            load_task(data_settings(cfg))
    elif cfg.task.name in NLG_TASKS:
        check_nlg_files(nlg_settings(cfg))
    else:
        check_data_files(data_settings(cfg))


def run_experiment(cfg: RunConfig, run_dir: Path, sink: ProgressSink, say=lambda text: None) -> dict:
    """Run (or resume) one experiment in run_dir; returns what it writes to metrics.json."""
    locks: list[StepLock] = []  # steps this run is computing for others to reuse (steps.py)
    try:
        return _run_experiment(cfg, run_dir, sink, say, locks)
    finally:
        for lock in locks:
            lock.release()


def _run_experiment(cfg: RunConfig, run_dir: Path, sink: ProgressSink, say, locks: list[StepLock]) -> dict:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    validate(cfg)
    fingerprint = config_fingerprint(cfg)
    clean_leftovers(run_dir)
    if cfg.resume and (done := finished_metrics(run_dir, fingerprint, say, cfg.measure)) is not None:
        say("already complete: metrics.json exists (resume=false starts over)")
        return done
    metrics_path.unlink(missing_ok=True)
    (run_dir / "failed.json").unlink(missing_ok=True)  # an earlier attempt's; this one is under way
    shutil.rmtree(run_dir / "export", ignore_errors=True)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    device = pick_device(cfg.trainer.device)
    precision = resolve_precision(cfg.trainer.precision, device)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.seed)

    say(f"Model and data (on {device}, precision {precision.name})")
    task = prepare_task(cfg, say, sink)
    loaded, model, tokenizer = task.loaded, task.loaded.model, task.loaded.tokenizer
    train_enc, eval_enc, pad_id = task.train, task.evals, tokenizer.pad_token_id

    scope_total, _ = scope_size(model)
    model_total = sum(p.numel() for p in model.parameters())
    dense_flops = inference_flops(model, cfg.flops_seq_len)
    method = method_settings(cfg)
    pruning = pruning_settings(cfg)
    prepare_method(model, method)
    adapters = adapters_of(model)
    if pruning.method in ("structured", "earlybert"):
        heads = attention_units(model)[0].num_heads
        if not 0 <= pruning.heads_to_remove < heads:
            raise DSEEError(f"pruning.heads_to_remove={pruning.heads_to_remove} is out of range: this model has "
                            f"{heads} heads per layer, so it must be between 0 and {heads - 1}.")

    ckpt = Checkpoint(run_dir, fingerprint)
    if not cfg.resume:
        ckpt.clear()
    saved = ckpt.load(say)
    meta: dict = {}
    omega_info: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    store, steps = StepStore(), {}
    imp_rounds = pruning.method == "imp"
    fp_phase1 = step_fingerprint(cfg, "phase1")
    if saved is None and cfg.reuse:  # phase I as another run computed it (or wait while one does)
        saved = reused_step(store, "phase1", fp_phase1, locks, say)
        if saved is not None:
            steps["phase1"] = saved[2]
            saved = (saved[0], {**saved[1], "fingerprint": fingerprint})
            say(f"Phase I: reused (step phase1-{fp_phase1}, computed in {steps['phase1'].source})")
    stage = saved[1]["stage"] if saved else None
    if pruning.method == "earlybert" and stage in (None, "phase1"):
        add_slimming(model)  # its coefficients train in phase I; pruning folds them in
    # IMP with rewinding resets the trained tensors to where they started (the same for a resumed run).
    start_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} \
        if pruning.rewind else {}
    if saved is not None:
        tensors, meta = saved
        restore_state(model, tensors, meta["model"])
        omega_info = meta.get("omega", {})
        if "phase1" not in steps:  # this run's own checkpoint: what it computed and reused so far
            steps.update({k: StepRecord(**v) for k, v in meta.get("steps", {}).items()})
            say(f"Resuming from the checkpoint after stage {stage!r} (step {_resume_step(meta)})")
    elif method.method == "dsee" and cfg.adapter.omega_size > 0:
        say("Ω: sparse positions from the pretrained weights")
        keys = omega_keys(adapters)
        weights = {k: slice_pretrained_weight(a, s) for k, (a, s) in keys.items()}
        result = omega_lib.cached_omega(weights, cfg.adapter.omega_size, cfg.omega.method, omega_settings(cfg),
                                        omega_cache_dir(cfg))
        set_omegas(adapters, result.indices)
        omega_info = {"method": cfg.omega.method, "seconds": round(result.seconds, 3),
                      "from_cache": result.from_cache, "cache_path": str(result.cache_path or "")}
    seconds["omega"] = omega_info.get("seconds", 0.0)
    model.to(device)
    rounds = pruning.round_sparsities()
    sparse_hooks: dict = {}
    if method.method in SPARSE_TRAINING:  # PST / MaP / MvP: the mask follows the schedule in phase I
        schedule, topk = sparsity_schedule(cfg), method.sparse.topk
        sparse_hooks = {
            "before_step": lambda step, total: update_masks(model, schedule.at(step + 1, total), topk),
            "best_eligible": lambda: all(abs(m.sparsity - schedule.final) < 1e-9
                                         for m in sparse_layers(model).values()),
            "lr_by_suffix": {".scores": method.sparse.score_lr} if method.method == "mvp" else {},
        }
    retrain_phases = [f"retrain{r}" for r in range(1, len(rounds))] + ["recovery"] if rounds else []

    def progress_meta(**states: PhaseState) -> dict:
        keep = {k: v for k, v in meta.items() if k in ("phase1", "pruning", "round", *retrain_phases)}
        keep.update({k: s.as_meta() for k, s in states.items()})
        return {**keep, "omega": omega_info, "steps": {k: r.as_dict() for k, r in steps.items()}}

    def run_phase(name: str) -> PhaseState:
        resume = (_state(meta, name), tensors) if stage == name else None
        l1 = pruning.slimming_l1
        return train_phase(
            model, train_enc, eval_enc, task.ops, phase_settings(cfg, name, precision), pad_id, device,
            save=lambda st, extra: ckpt.save(model, name, progress_meta(**{name: st}), extra),
            sink=sink, resume=resume, hooks=StepHooks(
                regularizer=(lambda: l1 * slimming_penalty(model)) if hasattr_slimming(model) else None,
                after_step=(lambda: reapply_masks(model)) if getattr(model, "dsee_other_masks", None) else None,
                **(sparse_hooks if name == "phase1" else {}),
            ),
        )

    # Phase I: tuning (sparse + low-rank for DSEE; whatever the method trains otherwise)
    phase1 = _state(meta, "phase1")
    if stage in (None, "phase1"):
        say(f"Phase I: {_PHASE1_TITLE.get(method.method, method.method + ' tuning')}")
        phase1 = run_phase("phase1")
        meta.update(progress_meta(phase1=phase1))
        if "phase1" not in steps:  # computed here: offer it to the runs that share it
            steps["phase1"] = StepRecord(fp_phase1, False, str(run_dir))
            store.publish("phase1", fp_phase1, ckpt.dir, json.loads((ckpt.dir / STATE_META).read_text()), run_dir)
        release(locks)
        stage = "phase1-done"
    seconds["phase1"] = phase1.seconds

    # Phase II and III, once per round (IMP: prune a further fraction, retrain, repeat)
    pruning_info = meta.get("pruning", {"method": pruning.method})
    done_round = meta.get("round", 0)
    states: dict[str, PhaseState] = {}
    for r, (target, phase) in enumerate(zip(rounds, retrain_phases), start=1):
        if stage == "done" or r < done_round:
            states[phase] = _state(meta, phase)
            continue
        fp_round = step_fingerprint(cfg, f"round{r}") if imp_rounds else ""
        if r > done_round and imp_rounds and cfg.reuse:  # this round as a run with as many or more computed it
            found = reused_step(store, f"round{r}", fp_round, locks, say)
            if found is not None:
                tensors, meta = found[0], rename_rounds(found[1], len(rounds), to_store=False)
                restore_state(model, tensors, meta["model"])
                steps[f"round{r}"], stage, done_round = found[2], phase, r
                pruning_info = meta.get("pruning", pruning_info)
                say(f"IMP round {r}: reused (step round{r}-{fp_round}, computed in {found[2].source})")
        if r > done_round:
            say(f"Phase II: {pruning.method} pruning" + (f", round {r} of {len(rounds)}" if len(rounds) > 1 else ""))
            started = time.perf_counter()
            pruning_info = prune_step(model, replace(pruning, sparsity=target), start_state)
            earlier = meta.get("pruning", {}).get("seconds", 0.0)
            pruning_info["seconds"] = round(time.perf_counter() - started + earlier, 3)
            meta["pruning"], meta["round"] = pruning_info, r
            ckpt.save(model, "pruned", progress_meta())
            stage = "pruned"
        say(f"Phase III: recovery tuning{f' (round {r})' if len(rounds) > 1 else ''}")
        states[phase] = run_phase(phase)
        meta.update(progress_meta(**{phase: states[phase]}))
        if imp_rounds and f"round{r}" not in steps:
            steps[f"round{r}"] = StepRecord(fp_round, False, str(run_dir))
            saved_meta = rename_rounds(json.loads((ckpt.dir / STATE_META).read_text()), len(rounds), to_store=True)
            store.publish(f"round{r}", fp_round, ckpt.dir, saved_meta, run_dir)
        release(locks)
        stage = f"{phase}-done"
    seconds["pruning"] = pruning_info.get("seconds", 0.0)
    recovery = states.get("recovery", PhaseState())
    if rounds:
        seconds["recovery"] = sum(st.seconds for st in states.values())

    say("Evaluation and export")
    final_phase = recovery if pruning.method != "none" else phase1
    final_eval = task.ops.evaluate(model, eval_enc, pad_id, device, cfg.trainer.eval_batch_size, precision)
    generation = task.generate(model, device, precision, run_dir / f"generations-{cfg.task.eval_split}.jsonl") \
        if task.generate else None
    _, scope_nonzero = scope_size(model)
    started = time.perf_counter()
    export_info, final_model = export_run(cfg, model, tokenizer, run_dir, method, loaded.source)
    seconds["export"] = round(time.perf_counter() - started, 3)
    savings = {}
    if cfg.measure:
        say("Measuring what the result costs and saves (final model against the dense one)")
        started = time.perf_counter()
        savings = measure_run(cfg, final_model, device, precision, export_info, pruning)
        seconds["measure"] = round(time.perf_counter() - started, 3)
    model_nonzero = model_total - (scope_total - scope_nonzero)
    phase_states = {"phase1": phase1, **states}
    metrics = {
        "task": cfg.task.name,
        "data_source": task.data_source,
        "model": loaded.source,
        "main_metric": task.ops.main,
        "trivial": task.trivial,  # majority class (regression: the mean) on the same evaluation
        "final": summarize(final_phase) | {"eval": final_eval} | ({"generation": generation} if generation else {}),
        "phases": {"phase1": summarize(phase1)} | {name: summarize(st) for name, st in states.items()},
        "trainable_params": trainable_counts(model).as_dict(),
        "total_params_pct": round(100 * scope_nonzero / scope_total, 4),
        "model_nonzero_pct": round(100 * model_nonzero / model_total, 4),
        "flops_seq_len": cfg.flops_seq_len,
        "flops_ratio": round(inference_flops(model, cfg.flops_seq_len) / dense_flops, 4),
        "flops_ratio_unmerged": round(inference_flops(model, cfg.flops_seq_len, True) / dense_flops, 4),
        "pruning": pruning_info,
        "omega": omega_info,
        "seconds": {k: round(v, 3) for k, v in seconds.items()} | {"total": round(time.perf_counter() - t_start, 3)},
        "export": export_info,
        "cost": training_cost(phase_states, device),
        "savings": savings,
        "config": asdict(cfg),
        "fingerprint": fingerprint,
        "steps": {name: record.as_dict() for name, record in steps.items()},  # computed here or reused
        "precision": precision.name,
        "device": str(device),
    }
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2, sort_keys=True, default=str))
    ckpt.save(model, "done", progress_meta(phase1=phase1, **states))
    return metrics


def reused_step(store: StepStore, step: str, fingerprint: str, locks: list[StepLock], say
                ) -> tuple[dict, dict, StepRecord] | None:
    """A stored step, or None after taking its lock (added to ``locks``): this run computes it,
    and runs that need it meanwhile wait. A run that finds the lock taken waits for it first."""
    lock = StepLock(store.root / f"{step}-{fingerprint}.lock")
    lock.acquire(on_wait=lambda: say(f"waiting: another run is computing step {step}-{fingerprint}"))
    found = store.load(step, fingerprint)
    if found is None:
        locks.append(lock)
        return None
    lock.release()
    tensors, meta, entry = found
    return tensors, meta, StepRecord(fingerprint, True, entry.get("source", ""))


def release(locks: list[StepLock]) -> None:
    while locks:
        locks.pop().release()


def export_run(cfg: RunConfig, model: torch.nn.Module, tokenizer, run_dir: Path, method, base_model: str
               ) -> tuple[dict, torch.nn.Module]:
    """export/adapter always; export/merged for methods that merge into the weights, and
    export/compressed (bit-packed masks + non-zero values) where pruning left zeros in them.
    Returns what was written and the final model as a user would ship it."""
    export_info: dict = {}
    mergeable = method.method in MERGEABLE
    if not cfg.export:  # the merged copy is only needed to measure it
        return export_info, merged_copy(model) if mergeable and cfg.measure else model
    final = merged_copy(model) if mergeable else model
    save_adapter(model, run_dir / "export" / "adapter", method, base_model)
    export_info["adapter"] = str(run_dir / "export" / "adapter")
    if not mergeable:
        export_info["merged"] = f"none: adapter={method.method} adds modules that cannot be merged into the weights"
        return export_info, final
    export_merged(model, tokenizer, run_dir / "export" / "merged", final)
    export_info["merged"] = str(run_dir / "export" / "merged")
    compressed = export_compressed(final, tokenizer, run_dir / "export" / "compressed")
    if compressed is not None:
        dense, packed = compressed["linears_dense_bytes"], compressed["linears_compressed_bytes"]
        export_info["compressed"] = str(run_dir / "export" / "compressed")
        export_info["compression"] = {**compressed, "linears_ratio": round(packed / dense, 4) if dense else None}
    return export_info, final


def measure_run(cfg: RunConfig, final: torch.nn.Module, device: torch.device, precision: Precision,
                export_info: dict, pruning: PruningSettings) -> dict:
    """The final model against the dense pretrained one, in this process, on this device."""
    dense = load_pretrained(cfg).model
    files = {name: Path(export_info[name]) / "model.safetensors" for name in ("merged", "compressed")
             if name in export_info and Path(str(export_info[name])).is_dir()}
    sizes = {f"export_{name}": path.stat().st_size for name, path in files.items()}
    savings = measure_savings(final, dense, device, precision, TimingSettings(seq_len=cfg.flops_seq_len), sizes)
    if pruning.method == "nm":
        savings["two_four"] = semi_structured(final, device, precision, pruning.n, pruning.m,
                                              TimingSettings(seq_len=cfg.flops_seq_len))
    return savings


def training_cost(states: dict[str, PhaseState], device: torch.device) -> dict:
    """What training took: time, speed and peak memory per phase, the optimizer's state."""
    seconds = sum(s.seconds for s in states.values())
    return {
        "device": str(device),
        "train_seconds": round(seconds, 3),
        "steps": sum(s.step for s in states.values()),
        "peak_memory_bytes": max((s.peak_memory_bytes for s in states.values()), default=0),
        "optimizer_bytes": max((s.optimizer_bytes for s in states.values()), default=0),
        "per_phase": {name: {"seconds": round(s.seconds, 3), "steps_per_second":
                             round(s.step / s.seconds, 3) if s.seconds else None,
                             "peak_memory_bytes": s.peak_memory_bytes} for name, s in states.items()},
    }


_PHASE1_TITLE = {"dsee": "sparse + low-rank tuning", "lora": "low-rank tuning", "full": "full fine-tuning",
                 "pst": "PST sparse training on the cubic schedule", "map": "fine-tuning with magnitude pruning",
                 "mvp": "fine-tuning with movement pruning"}


def hasattr_slimming(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "dsee_slim") for m in model.modules())


def prune_step(model: torch.nn.Module, pruning: PruningSettings, start_state: dict[str, torch.Tensor]) -> dict:
    """One Phase II step; ``pruning.sparsity`` is this round's target. Returns what it did."""
    if pruning.method == "structured":
        removed = lowest_heads(head_scores(model, pruning.criterion, pruning.seed), pruning.heads_to_remove)
        prune_heads(model, removed)
        return {"method": "structured", "criterion": pruning.criterion,
                "heads_removed": {str(k): v for k, v in removed.items()}}
    if pruning.method == "earlybert":
        return {"method": "earlybert", **slim_and_prune(model, pruning.heads_to_remove, pruning.ffn_fraction)}
    masks = compute_masks(model, pruning)
    if start_state:  # rewind (IMP / BERT tickets): the pruned network restarts from the start
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in start_state.items():
                if value.shape != params[name].shape:  # S is sized when Ω is set, and starts at 0
                    value = torch.zeros_like(params[name])
                params[name].copy_(value.to(params[name].device))
    apply_masks(model, masks, pruning.mask_delta)
    return {"method": pruning.method, "sparsity": round(pruning.sparsity, 6), "criterion": pruning.criterion,
            "granularity": pruning.granularity, "scope": pruning.scope}


def _resume_step(meta: dict) -> int:
    stage = meta["stage"]
    return meta.get(stage, {}).get("step", 0) if stage in meta else 0
