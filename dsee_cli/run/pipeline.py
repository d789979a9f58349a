"""One DSEE experiment, phase by phase, in one direction:

config → model + data → Ω (cached) → adapters → phase I → pruning → recovery → evaluation
→ export → metrics.json

A checkpoint is written after each phase and every ``trainer.checkpoint_every`` steps; the
same command in the same run directory resumes where it stopped and ends with the same
metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dsee_cli.atomic import atomic_write_text
from dsee_cli.config import CAUSAL_TASKS, RunConfig, validate
from dsee_cli.core import dist
from dsee_cli.core.cache import cache_root
from dsee_cli.core.devices import GpuLease, pick_device
from dsee_cli.core.models import (
    TINY_MODELS,
    enable_gradient_checkpointing,
    hub_reachable,
    resolve_source,
    trainable_in_fp32,
)
from dsee_cli.core.precision import Precision, resolve_precision
from dsee_cli.data.answer_tasks import ANSWER_TASKS, load_answers
from dsee_cli.data.calibration import CalibrationInputs, calibration_windows, window_batches, window_length
from dsee_cli.data.classification import check_data_files, load_task
from dsee_cli.data.generation import NLG_TASKS, check_nlg_files, load_nlg
from dsee_cli.data.hub import uses_mirror
from dsee_cli.data.lm_tasks import LM_TASKS, check_lm_files, load_lm_data
from dsee_cli.data.zero_shot import check_tasks
from dsee_cli.errors import DSEEError
from dsee_cli.measure.accounting import inference_flops, scope_size, trainable_counts
from dsee_cli.measure.costs import (
    TimingSettings,
    measure_savings,
    peak_memory_bytes,
    reset_peak_memory,
    semi_structured,
)
from dsee_cli.pruning import CRITERION_SCORES, PRUNERS, describe_score, head_count, reapply_masks, structure_plan
from dsee_cli.pruning.shapes import ShapePlan
from dsee_cli.pruning.slimming import add_slimming, has_slimming, slimming_penalty
from dsee_cli.run.checkpoint import (
    STATE_META,
    Checkpoint,
    clean_leftovers,
    config_fingerprint,
    finished_metrics,
    load_state_dir,
    model_state,
    restore_state,
    save_state_dir,
)
from dsee_cli.run.distill import distill_lm_loss, distill_logits_loss, share_frozen
from dsee_cli.run.evaluation import measure_export_speed
from dsee_cli.run.export import export_compressed, export_merged, merged_copy, save_adapter
from dsee_cli.run.fisher_step import check_gradient_batches, fisher_omega
from dsee_cli.run.plan import CHANGES_MODEL, Step, build_plan, phase_of_round, phase_settings
from dsee_cli.run.steps import StepLock, StepRecord, StepStore
from dsee_cli.run.task import load_pretrained, prepare_task
from dsee_cli.run.train import (
    PhaseState,
    ProgressSink,
    StepHooks,
    summarize,
    train_phase,
)
from dsee_cli.tuning import omega as omega_lib
from dsee_cli.tuning import prepare_method
from dsee_cli.tuning.adapters import adapters_of, omega_keys, set_omegas, slice_pretrained_weight
from dsee_cli.tuning.peft_bridge import peft_step_hooks
from dsee_cli.tuning.sparse_training import sparse_layers, update_masks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_failure(run_dir: Path, exc: BaseException, stage: str, sweep_run: str | None = None, rank: int = 0,
                  first_only: bool = False) -> Path:
    """failed.json: what stopped this run, so that a sweep can go on and be reported honestly.
    Call it from the ``except`` block (the traceback is the one being handled). ``first_only``:
    a rank of a distributed run leaves the first failure's record (the cause) in place."""
    path = Path(run_dir) / "failed.json"
    if first_only and path.is_file():
        return path
    record = {"error": str(exc), "type": type(exc).__name__, "stage": stage, "sweep_run": sweep_run, "rank": rank,
              "traceback": None if isinstance(exc, DSEEError) else traceback.format_exc()}
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


def omega_cache_dir(cfg: RunConfig) -> Path | None:
    if not cfg.omega.cache:
        return None
    if cfg.omega.cache_dir:
        return Path(cfg.omega.cache_dir).expanduser()
    return cache_root() / "omega"


def rename_rounds(meta: dict, rounds: int, to_store: bool) -> dict:
    """A checkpoint's phase names made independent of the run's number of rounds (``round<r>``,
    to store a step) or back to this run's (``retrain<r>`` / ``recovery``, to use one)."""
    def rename(name: str | None) -> str | None:
        if name is None:
            return None
        if to_store:
            if name == "recovery":
                return f"round{rounds}"
            return f"round{name[7:]}" if name.startswith("retrain") else name
        return phase_of_round(int(name[5:]), rounds) if name.startswith("round") and name[5:].isdigit() else name
    out = {rename(k): v for k, v in meta.items()}
    out["in_progress"] = rename(meta.get("in_progress"))
    return out


def check_numerics(meta: dict, device_type: str, precision: str, run_dir: Path) -> None:
    """A checkpoint resumes only where it computes as it did: on the same device type, in the same
    precision (trainer.precision=auto resolves to fp32 on a CPU, bf16-mixed on a GPU)."""
    was = meta.get("numerics")
    if was and (was["device_type"], was["precision"]) != (device_type, precision):
        raise DSEEError(f"{run_dir} holds a checkpoint computed on {was['device_type']} in {was['precision']}; this "
                        f"process runs on {device_type} in {precision}, so resuming would change the numbers mid-run. "
                        f"Resume it where it ran (trainer.device={was['device_type']} "
                        f"trainer.precision={was['precision']}), or start over with resume=false.")


def preflight(cfg: RunConfig) -> None:
    """The checks that fail fast (config values, where the model and data come from), before
    anything slow starts: W&B, model weights, Ω."""
    validate(cfg)
    if cfg.model.name not in TINY_MODELS or cfg.model.path or cfg.model.gguf_file:
        resolve_source(cfg.model.name, cfg.model.path, cfg.model.gguf_file)
    if cfg.adapter.tuning_method.delta and cfg.adapter.targets:
        check_targets(cfg)
    if cfg.adapter.tuning_method.sparse and cfg.adapter.has_sparse:
        check_omega_counts(cfg)
    shape_plan(cfg)
    if cfg.task.lm_eval:  # the names asked for, under every profile (the smoke profile runs its stand-in after)
        check_tasks(list(dict.fromkeys([*cfg.task.lm_eval, *cfg.task.zero_shot_tasks])), cfg.task.lm_eval_include)
    uses_hub_data = not (cfg.task.name == "synthetic" or cfg.task.synthetic_standin or cfg.task.data_dir
                         or cfg.task.train_file)
    if uses_hub_data and not uses_mirror() and not hub_reachable():  # offline: the hint, at once
        if cfg.task.name in NLG_TASKS:
            load_nlg(cfg.task, cfg.seed)
        elif cfg.task.name in ANSWER_TASKS:
            load_answers(cfg.task, cfg.seed, cfg.task.answer_pattern)
        elif cfg.task.name in LM_TASKS:
            load_lm_data(cfg.task, cfg.seed)
        else:
            load_task(cfg.task, cfg.seed)
    elif cfg.task.name in NLG_TASKS:
        check_nlg_files(cfg.task)
    elif cfg.task.name in ANSWER_TASKS:  # local files are small: read them, and check the answer pattern on them
        check_lm_files(cfg.task)
        if not uses_hub_data:
            load_answers(cfg.task, cfg.seed, cfg.task.answer_pattern)
    elif cfg.task.name in LM_TASKS:
        check_lm_files(cfg.task)
    else:
        check_data_files(cfg.task)


class ModelUnavailable(DSEEError):
    """The model's config cannot be read here (offline, not cached): ``why`` says it in one line."""

    def __init__(self, message: str):
        super().__init__(message)
        self.why = message.split(". ")[0]


def meta_model(cfg: RunConfig) -> torch.nn.Module:
    """The run's model built from its config alone, with no weights (meta device): architecture checks in seconds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from dsee_cli.core.models import TINY_DECODERS, tiny_config, tiny_decoder_tokenizer, tiny_tokenizer

    if cfg.model.name in TINY_MODELS and not (cfg.model.path or cfg.model.gguf_file):
        tok = tiny_decoder_tokenizer() if cfg.model.name in TINY_DECODERS else tiny_tokenizer()
        config = tiny_config(cfg.model.name, len(tok), 2, cfg.model.tiny, tok.pad_token_id)
    else:
        try:
            source, local_only = resolve_source(cfg.model.name, cfg.model.path, cfg.model.gguf_file)
        except DSEEError as exc:
            raise ModelUnavailable(str(exc)) from None
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    auto = AutoModelForCausalLM if cfg.task.name in CAUSAL_TASKS else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


def check_targets(cfg: RunConfig) -> None:
    """adapter.targets against the model's architecture, on a model with no weights: a wrong name
    fails in seconds, not after the weights load."""
    from dsee_cli.core.arch import resolve_targets

    resolve_targets(meta_model(cfg), list(cfg.adapter.targets))


def check_omega_counts(cfg: RunConfig) -> None:
    """card(Ω) (adapter.omega_size, or adapter.density of each matrix) against the adapted matrices'
    shapes, on a model with no weights: a count of zero or beyond a matrix fails in seconds."""
    from dsee_cli.core.arch import dims, resolve_targets

    model = meta_model(cfg)
    shapes = {}
    for t in resolve_targets(model, list(cfg.adapter.targets) if cfg.adapter.targets else None):
        in_features = dims(model.get_submodule(t.name))[1]
        shapes |= {f"{t.name}#{k}": (end - start, in_features) for k, (start, end) in enumerate(t.slices)}
    omega_lib.omega_counts(shapes, cfg.adapter.omega_size, cfg.adapter.density)


def shape_plan(cfg: RunConfig) -> ShapePlan | None:
    """What structured pruning will keep (servable rounding stated), from the config alone; None
    for the other pruners. Bad counts fail here, before any weights load."""
    return structure_plan(meta_model(cfg), cfg.pruning) if cfg.pruning.structured else None


def run_experiment(cfg: RunConfig, run_dir: Path, sink: ProgressSink, say=lambda text: None) -> dict:
    """Run (or resume) one experiment in run_dir: execute its plan (plan.build_plan: Ω, phase I,
    per round prune + train, evaluate, export, measure) from the first step not yet done, with
    a checkpoint after each step that changes the model. Returns what it writes to metrics.json."""
    validate(cfg)
    run = Run(cfg, Path(run_dir), sink, say)
    try:
        run.connect()
        done = dist.on_main(run.finished)  # rank 0 looks; every rank learns the answer
        if done is not None:
            say("already complete: metrics.json exists (resume=false starts over)")
            return done
        run.setup()
        run.start()
        for i, step in enumerate(run.plan):
            if i < run.done or not (run.world.main or step.kind in EVERY_RANK):
                continue
            run.execute(step)
            run.done = max(run.done, i + 1)
            if step.kind in CHANGES_MODEL:
                run.save()
        return run.write_metrics() if run.world.main else {}
    finally:
        release(run.locks)
        if run.lease is not None:
            run.lease.release()
        dist.shutdown()


TEACHER = "teacher"  # <run>/teacher: recovery.distill's teacher state (the model just before pruning)
EVERY_RANK = ("omega", "train", "prune", "evaluate")  # the others (export, measure) are rank 0's alone


class Run:
    """What the steps of one run share: the plan and how many of its steps are ``done``, the
    model and data, each phase's state, what pruning did, what each step took (``seconds``)
    and where shared steps came from (``steps``)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, sink: ProgressSink, say):
        self.cfg, self.dir, self.sink, self.say = cfg, run_dir, sink, say
        self.fingerprint = config_fingerprint(cfg)
        self.ckpt = Checkpoint(run_dir, self.fingerprint)
        self.store = StepStore()
        self.locks: list[StepLock] = []  # steps this run computes for others to reuse (steps.py)
        self.world = dist.world_from_env()
        self.lease: GpuLease | None = None
        self.plan: list[Step] = build_plan(cfg)
        self.done = 0  # plan steps finished
        self.tensors: dict[str, torch.Tensor] = {}  # the checkpoint's, while a phase in progress resumes from it
        self.in_progress: str | None = None  # the phase the checkpoint stopped inside
        self.states: dict[str, PhaseState] = {}  # phase1, retrain<r>, recovery
        self.steps: dict[str, StepRecord] = {}
        self.omega_info: dict = {}
        self.pruning_info: dict = {"method": cfg.pruning.method}
        self.teacher: torch.nn.Module | None = None  # recovery.distill: the model before pruning, while recovery runs
        self.distill_info: dict = {}
        self.seconds: dict[str, float] = {}
        self.result: dict = {"eval": {}, "generation": None, "export": {}, "final_model": None, "savings": {}}
        self.started = time.perf_counter()

    # -- set-up ----------------------------------------------------------------------------
    def connect(self) -> None:
        """This process's device (a leased GPU in a sweep), its threads, and in a distributed run
        the process group (every rank then knows every rank's device)."""
        cfg, w = self.cfg, self.world
        local = w.local_rank if w.size > 1 else None
        self.device, self.lease = pick_device(cfg.trainer.device, cache_root() / "devices", cfg.trainer.jobs_per_gpu,
                                              local, self.say)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.trainer.threads:  # the command line shares the cores out among jobs and ranks
            torch.set_num_threads(cfg.trainer.threads)
        dist.init(w, self.device, cfg.trainer.dist_timeout)
        self.devices = dist.all_gather_object(str(self.device))

    def finished(self) -> dict | None:
        """This configuration's metrics.json if it is complete (rank 0 looks)."""
        clean_leftovers(self.dir)
        if self.cfg.resume:
            return finished_metrics(self.dir, self.fingerprint, self.say, self.cfg.measure)
        return None

    def setup(self) -> None:
        """Data, the model with the method attached; checks that need the model."""
        cfg = self.cfg
        if self.world.main:
            (self.dir / "metrics.json").unlink(missing_ok=True)
            (self.dir / "failed.json").unlink(missing_ok=True)  # an earlier attempt's; this one is under way
            shutil.rmtree(self.dir / "export", ignore_errors=True)
        dist.barrier()
        self.precision = resolve_precision(cfg.trainer.precision, self.device, cfg.model.dtype)
        seed_everything(cfg.seed)
        self.say(f"Model and data (on {self.device}, precision {self.precision.name})")
        self.task = prepare_task(cfg, self.say, self.sink)
        self.model = self.task.loaded.model
        self.scope_total, _ = scope_size(self.model)
        self.model_total = sum(p.numel() for p in self.model.parameters())
        self.dense_flops = inference_flops(self.model, cfg.flops_seq_len)
        self.method, self.pruning = cfg.adapter, cfg.pruning
        prepare_method(self.model, self.method)
        trainable_in_fp32(self.model)
        if cfg.trainer.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        dist.check_same("the model as loaded",
                        lambda: {n: p for n, p in self.model.named_parameters() if p.requires_grad})
        if self.pruning.pruner.removes_heads:  # a removal that cannot be honoured fails before any training
            head_count(self.model, self.pruning)
        self.shapes = structure_plan(self.model, self.pruning) if self.pruning.structured else None
        check_gradient_batches(cfg, len(self.task.train.input_ids))
        self.rounds = sum(step.kind == "prune" for step in self.plan)

    def start(self) -> None:
        """Where this run starts: its own checkpoint, a phase I another run computed, or step 0."""
        cfg, model = self.cfg, self.model
        if not cfg.resume and self.world.main:
            self.ckpt.clear()
        own = dist.on_main(lambda: self.ckpt.load(self.say) is not None)  # rank 0 checks (and clears a stale one)
        saved = self.ckpt.load() if own else None
        if saved is not None:
            check_numerics(saved[1], self.device.type, self.precision.name, self.dir)
        phase1 = next((step for step in self.plan if step.name == "phase1"), None)  # None: trainer.phase1.epochs=0
        # phase I as another run computed it (or wait while one does)
        if saved is None and cfg.reuse and phase1 is not None:
            found = self.reused("phase1", phase1.fingerprint)
            if found is not None:
                self.steps["phase1"] = found[2]
                saved = found[:2]
                self.say(f"Phase I: reused (step phase1-{phase1.fingerprint}, computed in {found[2].source})")
        if saved is not None and saved[1].get("world_size", 1) != self.world.size:
            self.say(f"resumed on {self.world.size} process(es); the checkpoint was written by "
                     f"{saved[1].get('world_size', 1)}: the data order is the same, the ranks' dropout draws differ "
                     "from here on (the metrics move by up to what another seed moves them; without dropout, "
                     "not at all)")
        done = saved[1]["done"] if saved else 0
        if self.pruning.pruner.slimming and not any(step.kind == "prune" for step in self.plan[:done]):
            add_slimming(model)  # its coefficients train in phase I; pruning folds them in
        # IMP with rewinding resets the trained tensors to where they started (also in a resumed run)
        self.start_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} \
            if self.pruning.rewind else {}
        if saved is not None:
            self.restore(*saved)
            if own:  # this run's own checkpoint: what it computed and reused so far
                self.steps.update({k: StepRecord(**v) for k, v in saved[1].get("steps", {}).items()})
                where = self.plan[self.done].name if self.done < len(self.plan) else "the end"
                step = self.states[self.in_progress].step if self.in_progress in self.states else 0
                self.say(f"Resuming from the checkpoint: {self.done} of {len(self.plan)} steps done, at {where}"
                         + (f" (optimizer step {step})" if self.in_progress else ""))
        model.to(self.device)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """The model and the progress a checkpoint (this run's, or a stored step's) holds."""
        restore_state(self.model, tensors, meta["model"])
        self.tensors, self.done, self.in_progress = tensors, meta["done"], meta.get("in_progress")
        self.states = {s.phase: PhaseState(**meta[s.phase]) for s in self.plan if s.kind == "train" and s.phase in meta}
        self.omega_info = meta.get("omega", self.omega_info)
        self.pruning_info = meta.get("pruning", self.pruning_info)
        self.distill_info = meta.get("distill", self.distill_info)

    def reused(self, step: str, fingerprint: str) -> tuple[dict, dict, StepRecord] | None:
        """A stored step: rank 0 looks it up (or takes its lock to compute it); the other ranks
        read the entry it found."""
        record = dist.on_main(lambda: self._reused_on_main(step, fingerprint))
        if record is None:
            return None
        if self.world.main:
            return self._found
        tensors, meta, _ = self.store.load(step, fingerprint)
        return tensors, meta, StepRecord(**record)

    def _reused_on_main(self, step: str, fingerprint: str) -> dict | None:
        self._found = reused_step(self.store, step, fingerprint, self.locks, self.say)
        return None if self._found is None else self._found[2].as_dict()

    def progress(self, in_progress: str | None = None, **states: PhaseState) -> dict:
        """What the checkpoint records besides tensors."""
        return {"done": self.done, "in_progress": in_progress, "world_size": self.world.size,
                "numerics": {"device_type": self.device.type, "precision": self.precision.name},
                **{name: st.as_meta() for name, st in {**self.states, **states}.items()},
                "pruning": self.pruning_info, "omega": self.omega_info, "distill": self.distill_info,
                "steps": {k: r.as_dict() for k, r in self.steps.items()}}

    def save(self) -> None:  # rank 0 writes; the others wait, so that none runs ahead of the checkpoint
        dist.on_main(lambda: self.ckpt.save(self.model, self.progress()))

    # -- the steps -------------------------------------------------------------------------
    def execute(self, step: Step) -> None:
        if step.kind == "omega":
            self.find_omega()
        elif step.kind == "train":
            self.train(step)
        elif step.kind == "prune":
            self.prune(step)
        elif step.kind == "evaluate":
            self.evaluate()
        elif step.kind == "export":
            self.export()
        elif step.kind == "measure":
            self.measure()
        else:
            raise ValueError(f"unknown step kind {step.kind!r}")

    def find_omega(self) -> None:
        cfg = self.cfg
        adapters = adapters_of(self.model)
        if cfg.omega.method == "fisher":  # every rank trains the warm-up and takes its share of the gradients
            self.say("Ω: sparse positions from gradients after a LoRA warm-up (RoSA)")
            self.omega_info, indices = fisher_omega(cfg, self.model, self.task, self.precision, self.device,
                                                    self.hooks("phase1"), self.sink, self.say, omega_cache_dir(cfg))
            set_omegas(adapters, indices)
            dist.check_same("Ω and the adapters after the warm-up", lambda: model_state(self.model)[0])
            return
        self.say("Ω: sparse positions from the pretrained weights")
        keys = omega_keys(adapters)
        weights = {k: slice_pretrained_weight(a, s) for k, (a, s) in keys.items()}
        counts = omega_lib.omega_counts({k: tuple(w.shape) for k, w in weights.items()}, cfg.adapter.omega_size,
                                        cfg.adapter.density)
        n = cfg.adapter.omega_size if not cfg.adapter.density else counts  # an int keeps older cache keys
        settings = cfg.omega.grebsmo(cfg.seed)

        def compute() -> tuple[dict, dict[str, torch.Tensor]]:  # rank 0 (or the cache); the indices are small
            result = omega_lib.cached_omega(weights, n, cfg.omega.method, settings,
                                            omega_cache_dir(cfg), cfg.omega.preset)
            return {"method": cfg.omega.method, "seed": settings.seed, "seconds": round(result.seconds, 3),
                    "from_cache": result.from_cache, "cache_path": str(result.cache_path or "")}, result.indices

        self.omega_info, indices = dist.on_main(compute)
        set_omegas(adapters, indices)

    def hooks(self, name: str) -> StepHooks:
        model, method = self.model, self.method
        own: dict = {}  # what the tuning method adds to phase I's loop
        if name == "phase1" and method.tuning_method.sparse_training:  # PST / MaP / MvP: masks follow the schedule
            settings, final = method.sparse_training, self.cfg.sparsity
            schedule, topk = settings.schedule, settings.topk
            own = {
                "before_step": lambda step, total: update_masks(model, schedule.at(step + 1, total, final), topk,
                                                                schedule.refreshes(step)),
                "best_eligible": lambda: all(abs(m.sparsity - final) < 1e-9 for m in sparse_layers(model).values()),
                "lr_by_part": {".scores": settings.score_lr} if method.method == "mvp" else {},
            }
        if name == "phase1" and method.lora_lr is not None:  # RoSA: B·A at their own rate, S at the phase's
            own = {**own, "lr_by_part": {".lora_A.": method.lora_lr, ".lora_B.": method.lora_lr}}
        if method.tuning_method.peft:  # AdaLoRA's rank budget over phase I's steps, kept in recovery
            own = peft_step_hooks(model, method.peft, "phase1" if name == "phase1" else "recovery")
        l1 = self.pruning.slimming_l1
        return StepHooks(**{
            "regularizer": (lambda: l1 * slimming_penalty(model)) if has_slimming(model) else None,
            "after_step": (lambda: reapply_masks(model)) if getattr(model, "dsee_other_masks", None) else None,
            **own,
        })

    def train(self, step: Step) -> None:
        """A training phase, from inside it where the checkpoint stopped; then offered to the
        runs that share it (phase I, IMP rounds) unless it came from the store."""
        name, task = step.phase, self.task
        phase = phase_settings(self.cfg, name, self.precision)
        lr = f"lr {phase.lr:g}: {phase.lr_from}"
        if name == "phase1":
            self.say(f"Phase I: {self.method.tuning_method.title} ({lr})")
        else:
            self.say(f"Phase III: recovery tuning{f' (round {step.round})' if self.rounds > 1 else ''} ({lr})")
        resume = (self.states[name], self.tensors) if self.in_progress == name and name in self.states else None
        hooks = self.hooks(name)
        if name != "phase1" and self.cfg.trainer.recovery.distill:
            hooks.loss = self.distillation()
        self.states[name] = train_phase(
            self.model, task.train, task.evals, task.ops, phase,
            self.cfg.trainer, task.loaded.tokenizer.pad_token_id, self.device,
            save=lambda st, extra: self.ckpt.save(self.model, self.progress(name, **{name: st}), extra),
            sink=self.sink, resume=resume, hooks=hooks,
        )
        self.teacher = None  # its memory back
        self.tensors, self.in_progress = {}, None
        if step.fingerprint and step.name not in self.steps:
            self.share(step)

    def distillation(self):
        """Recovery's loss with the KL term to the teacher (run/distill.py), rebuilt from the pretrained
        weights and the state written at the prune step, sharing the student's unchanged frozen tensors."""
        settings = self.cfg.trainer.recovery
        tensors, meta = load_state_dir(self.dir / TEACHER)
        teacher = load_pretrained(self.cfg).model
        prepare_method(teacher, self.method)
        trainable_in_fp32(teacher)
        restore_state(teacher, tensors, meta)
        teacher.to(self.device).eval()
        shared, extra = share_frozen(teacher, self.model)
        self.teacher = teacher
        self.distill_info = {"weight": settings.distill_weight, "temperature": settings.temperature,
                             "teacher_shared_bytes": shared, "teacher_extra_bytes": extra}
        self.say(f"  distilling from the model before pruning (weight {settings.distill_weight:g}, T "
                 f"{settings.temperature:g}): the teacher shares {shared / 2**20:.1f} MiB of frozen weights and adds "
                 f"{extra / 2**20:.1f} MiB")
        w, t = settings.distill_weight, settings.temperature
        if self.cfg.task.name in CAUSAL_TASKS:
            smoothing = self.cfg.task.label_smoothing
            return lambda model, batch: distill_lm_loss(model, teacher, batch, smoothing, w, t)
        return lambda model, batch: distill_logits_loss(model, teacher, batch, w, t)

    def share(self, step: Step) -> None:
        """This run computed ``step``: offer its checkpoint (the phase's last save) to the runs that share it."""
        self.steps[step.name] = StepRecord(step.fingerprint, False, str(self.dir))
        meta = json.loads((self.ckpt.dir / STATE_META).read_text())
        if step.name != "phase1":
            meta = rename_rounds(meta, self.rounds, to_store=True)
        if self.world.main:
            self.store.publish(step.name, step.fingerprint, self.ckpt.dir, meta, self.dir)
        release(self.locks)

    def prune(self, step: Step) -> None:
        """Phase II: one pruning round (IMP's round as a run with as many rounds or more stored it, if one did)."""
        shared = next((s for s in self.plan if s.kind == "train" and s.round == step.round and s.fingerprint), None)
        if shared is not None and self.cfg.reuse:
            found = self.reused(shared.name, shared.fingerprint)
            if found is not None:
                self.restore(found[0], rename_rounds(found[1], self.rounds, to_store=False))
                self.steps[shared.name] = found[2]
                self.say(f"IMP round {step.round}: reused (step {shared.name}-{shared.fingerprint}, computed in "
                         f"{found[2].source})")
                return
        by = f" by {describe_score(self.pruning)}" if self.pruning.pruner.prune is PRUNERS["unstructured"].prune else ""
        if self.shapes is not None:
            by = f" by {self.pruning.criterion}"
        self.say(f"Phase II: {self.pruning.pruner.title}{by}"
                 + (f", round {step.round} of {self.rounds}" if self.rounds > 1 else ""))
        if self.shapes is not None:
            self.say(f"  keeps {self.shapes.describe()}; scored by {CRITERION_SCORES[self.pruning.criterion]}")
        for note in self.shapes.notes if self.shapes is not None else []:
            self.say(f"  rounded: {note}")
        if self.cfg.trainer.recovery.distill:  # the teacher: the model as it is now (its state: adapters, masks)
            dist.on_main(lambda: save_state_dir(self.dir / TEACHER, *model_state(self.model)))
        started = time.perf_counter()
        reset_peak_memory(self.device)
        info = self.pruning.pruner.prune(self.model, self.pruning, step.target, self.cfg.seed, self.rewind,
                                         self.calibration)
        info["seconds"] = round(time.perf_counter() - started + self.pruning_info.get("seconds", 0.0), 3)
        # the peak while pruning (CPU: the process's resident set, model included; CUDA: allocated memory)
        info["peak_memory_bytes"] = max(peak_memory_bytes(self.device), self.pruning_info.get("peak_memory_bytes", 0))
        self.pruning_info = info
        dist.check_same(f"the model after pruning (round {step.round})", lambda: model_state(self.model)[0])

    def calibration(self) -> CalibrationInputs:
        """pruning.calibration, on this process's device (the same on every rank), what it was
        (examples of the training data without their labels, or N windows of L tokens of a text),
        and the run's precision (a half-precision base calibrates under its autocast, as it trains)."""
        c, tok = self.pruning.calibration, self.task.loaded.tokenizer
        if c.from_text:
            length = window_length(c.seq_len, self.cfg.task.seq_len,
                                   getattr(self.model.config, "max_position_embeddings", None))
            cache, standin = cache_root() / "calibration", self.cfg.task.synthetic_standin
            w, info = dist.on_main(lambda: calibration_windows(c, tok, length, self.cfg.seed, cache, standin))
            batches = window_batches(w)
        else:
            data = self.task.train
            n = len(data.input_ids)
            chosen = sorted(random.Random(self.cfg.seed).sample(range(n), min(n, c.samples)))
            size = self.cfg.trainer.eval_batch_size
            batches = [self.task.ops.collate(data, chosen[i:i + size], tok.pad_token_id)
                       for i in range(0, len(chosen), size)]
            info = {"source": "train", "samples": len(chosen), "seed": self.cfg.seed,
                    "tokens": sum(int(b.get("attention_mask", b["input_ids"]).ne(0).sum()) for b in batches)}
        return CalibrationInputs([{k: v.to(self.device) for k, v in b.items() if k != "labels"} for b in batches],
                                 info, self.precision.autocast)

    @torch.no_grad()
    def rewind(self) -> None:
        """IMP with pruning.rewind (BERT tickets): the trained tensors back to where they started."""
        params = dict(self.model.named_parameters())
        for name, value in self.start_state.items():
            if value.shape != params[name].shape:  # S is sized when Ω is set, and starts at 0
                value = torch.zeros_like(params[name])
            params[name].copy_(value.to(params[name].device))

    def evaluate(self) -> None:
        cfg, model, task = self.cfg, self.model, self.task
        self.say("Evaluation and export")
        last = self.last_evaluation()
        self.result["eval"] = last if last is not None else task.ops.evaluate(
            model, task.evals, task.loaded.tokenizer.pad_token_id, self.device, cfg.trainer.eval_batch_size,
            self.precision)
        if task.generate:
            out = self.dir / f"generations-{cfg.task.eval_split}.jsonl" if self.world.main else None
            self.result["generation"] = task.generate(model, self.device, self.precision, out)

    def last_evaluation(self) -> dict | None:
        """The final phase's evaluation at its last step, when the model still has those weights
        (not keep_best's: a sparse-training method's masks may have moved since its best step)."""
        final = self.states.get("recovery" if self.rounds else "phase1")
        if final is None or not final.history or final.weights != "last" or final.history[-1]["step"] != final.step:
            return None
        return {k: v for k, v in final.history[-1].items() if k != "step"}

    def export(self) -> None:
        started = time.perf_counter()
        self.result["export"], self.result["final_model"] = export_run(
            self.model, self.task.loaded.tokenizer, self.dir, self.method, self.task.loaded.source)
        self.seconds["export"] = round(time.perf_counter() - started, 3)

    def measure(self) -> None:
        self.say("Measuring what the result costs and saves (final model against the dense one)")
        started = time.perf_counter()
        final = self.result["final_model"] or shipped_model(self.model, self.method)
        self.result["savings"] = measure_run(self.cfg, final, self.device, self.precision, self.result["export"])
        if self.cfg.task.name in CAUSAL_TASKS and (self.dir / "export" / "merged").is_dir():
            self.result["savings"]["serving"] = measure_export_speed(self.cfg, self.dir, self.device, self.say)
        self.seconds["measure"] = round(time.perf_counter() - started, 3)

    # -- the result ------------------------------------------------------------------------
    def reused_phases(self) -> set[str]:
        return _reused_phases_of(self.plan, self.steps)

    def write_metrics(self) -> dict:
        metrics = self.metrics()
        atomic_write_text(self.dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True, default=str))
        return metrics

    def metrics(self) -> dict:
        """metrics.json: scores, counts, FLOPs, times, costs and savings, and the config."""
        cfg, model, task, result = self.cfg, self.model, self.task, self.result
        _, scope_nonzero = scope_size(model)
        model_nonzero = self.model_total - (self.scope_total - scope_nonzero)
        phases = {s.phase: self.states.get(s.phase, PhaseState()) for s in self.plan if s.kind == "train"}
        # the phase that trained last (none: one-shot pruning of the model as loaded, no recovery)
        final_phase = phases.get("recovery" if self.rounds else "phase1") or PhaseState()
        generation = {"generation": result["generation"]} if result["generation"] else {}
        seconds = {"omega": self.omega_info.get("seconds", 0.0),
                   "phase1": phases["phase1"].seconds if "phase1" in phases else 0.0,
                   "pruning": self.pruning_info.get("seconds", 0.0),
                   **({"recovery": sum(st.seconds for n, st in phases.items() if n != "phase1")}
                      if self.rounds else {}),
                   **self.seconds, "total": time.perf_counter() - self.started}
        return {
            "task": cfg.task.name,
            "data_source": task.data_source,
            "model": task.loaded.source,
            "main_metric": task.ops.main,
            "trivial": task.trivial,  # majority class (regression: the mean) on the same evaluation
            "final": summarize(final_phase) | {"eval": result["eval"]} | generation,
            "phases": {name: summarize(st) for name, st in phases.items()},
            "trainable_params": trainable_counts(model).as_dict(),
            "total_params_pct": round(100 * scope_nonzero / self.scope_total, 4),
            "model_nonzero_pct": round(100 * model_nonzero / self.model_total, 4),
            "flops_seq_len": cfg.flops_seq_len,
            "flops_ratio": round(inference_flops(model, cfg.flops_seq_len) / self.dense_flops, 4),
            "flops_ratio_unmerged": round(inference_flops(model, cfg.flops_seq_len, True) / self.dense_flops, 4),
            "pruning": self.pruning_info,
            "distill": self.distill_info or None,
            "omega": self.omega_info,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "export": result["export"],
            "cost": training_cost(phases, self.device, self.reused_phases()),
            "savings": result["savings"],
            "config": asdict(cfg),
            "fingerprint": self.fingerprint,
            "steps": {name: record.as_dict() for name, record in self.steps.items()},  # computed here or reused
            "precision": self.precision.name,
            "device": str(self.device),
            "world_size": self.world.size,  # processes of a torch.distributed run
            "devices": self.devices,  # every rank's device
            "device_lease": self.lease.describe() if self.lease is not None else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }


def _reused_phases_of(plan: list[Step], steps: dict[str, StepRecord]) -> set[str]:
    """The training phases this job took from the step store (their time was spent by another run)."""
    reused = [i for i, s in enumerate(plan) if s.kind == "train" and s.name in steps and steps[s.name].reused]
    last = max(reused, default=-1)  # a reused round carries every phase before it
    return {s.phase for s in plan[: last + 1] if s.kind == "train"}


def reused_step(store: StepStore, step: str, fingerprint: str, locks: list[StepLock], say
                ) -> tuple[dict, dict, StepRecord] | None:
    """A stored step, or None after taking its lock (added to ``locks``): this run computes it,
    and runs that need it meanwhile wait. A run that finds the lock taken waits for it first."""
    lock = store.lock(step, fingerprint)
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


def shipped_model(model: torch.nn.Module, method) -> torch.nn.Module:
    """The final model as a user would ship it: a merged plain copy where the method merges."""
    return merged_copy(model) if method.tuning_method.merges else model


def export_run(model: torch.nn.Module, tokenizer, run_dir: Path, method, base_model: str
               ) -> tuple[dict, torch.nn.Module]:
    """export/adapter always; export/merged for methods that merge into the weights, and
    export/compressed (bit-packed masks + non-zero values) where pruning left zeros in them.
    Returns what was written and the final model as a user would ship it."""
    export_info: dict = {}
    mergeable = method.tuning_method.merges
    final = shipped_model(model, method)
    peft_note = save_adapter(model, run_dir / "export" / "adapter", method, base_model)
    export_info["adapter"] = str(run_dir / "export" / "adapter")
    if method.tuning_method.peft:
        export_info["adapter_peft_format"] = peft_note or "PeftModel.from_pretrained(base, export/adapter)"
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
                export_info: dict) -> dict:
    """The final model against the dense pretrained one, in this process, on this device."""
    dense = load_pretrained(cfg).model
    files = {name: Path(export_info[name]) / "model.safetensors" for name in ("merged", "compressed")
             if name in export_info and Path(str(export_info[name])).is_dir()}
    sizes = {f"export_{name}": path.stat().st_size for name, path in files.items()}
    savings = measure_savings(final, dense, device, precision, TimingSettings(seq_len=cfg.flops_seq_len), sizes)
    if cfg.pruning.pattern:
        savings["two_four"] = semi_structured(final, device, precision, cfg.pruning.n, cfg.pruning.m,
                                              TimingSettings(seq_len=cfg.flops_seq_len))
    return savings


def training_cost(states: dict[str, PhaseState], device: torch.device, reused: set[str] = frozenset()) -> dict:
    """What training took: time, speed and peak memory per phase, the optimizer's state. The result
    cost ``train_seconds``; this job spent ``this_job_train_seconds`` (phases reused from the step
    store were trained, and timed, by the run that computed them)."""
    seconds = sum(s.seconds for s in states.values())
    return {
        "device": str(device),
        "train_seconds": round(seconds, 3),
        "this_job_train_seconds": round(sum(s.seconds for n, s in states.items() if n not in reused), 3),
        "reused_phases": sorted(reused),
        "steps": sum(s.step for s in states.values()),
        "peak_memory_bytes": max((s.peak_memory_bytes for s in states.values()), default=0),
        "optimizer_bytes": max((s.optimizer_bytes for s in states.values()), default=0),
        "per_phase": {name: {"seconds": round(s.seconds, 3), "steps_per_second":
                             round(s.step / s.seconds, 3) if s.seconds else None,
                             "peak_memory_bytes": s.peak_memory_bytes} for name, s in states.items()},
    }
