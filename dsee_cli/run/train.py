"""One training phase: AdamW, linear decay with optional warm-up, gradient clipping, mixed
precision (autocast, and a gradient scaler for fp16), evaluation every N steps with
best-by-task-metric selection, and a state that can be saved at any step and resumed to the
same result (data order, every RNG, optimizer, loss scale)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dsee_cli.core import dist
from dsee_cli.core.devices import check_device_name
from dsee_cli.core.precision import FP32, PRECISIONS, Precision
from dsee_cli.data.classification import Encoded, TaskSpec, collate
from dsee_cli.data.metrics import task_metrics
from dsee_cli.errors import DSEEError, choice_error
from dsee_cli.measure.costs import optimizer_bytes, peak_memory_bytes, reset_peak_memory


@dataclass
class PhaseConfig:
    epochs: float | None = None  # None: the task's default; 0: no such phase (one-shot pruning of the model as loaded)
    lr: float | None = None  # None: the task's (Table 11)
    epochs_scale: float = 1.0  # times the phase's epochs, wherever they come from (a tuning-budget ablation: 2)
    # recovery: also learn the model before pruning (phase I's adapters included): + distill_weight · T² · KL
    distill: bool = False
    distill_weight: float = 1.0  # recovery.distill: the KL term's weight beside the task's loss
    temperature: float = 1.0  # recovery.distill: both distributions softened by T (the term scaled by T²)


@dataclass
class TrainerConfig:
    """The ``trainer`` section: how every phase trains (its epochs and lr: ``phase1`` / ``recovery``)."""

    batch_size: int = 32  # training batch (a model's Table 11 value in task.per_model wins)
    eval_batch_size: int = 128  # evaluation batch
    warmup_ratio: float = 0.0  # fraction of each phase's steps with a linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    eval_every: int = 0  # steps; 0: every epoch
    checkpoint_every: int = 200  # steps; 0: only at the end of a phase
    max_steps: int = 0  # per phase; 0: from epochs
    precision: str = "auto"  # 32-true, bf16-mixed, 16-mixed; auto: bf16-mixed (or 16-mixed) on GPU, 32-true on CPU
    device: str = "auto"  # auto (a free GPU if there is one), cpu, cuda (a free GPU) or cuda:K (GPU K)
    devices: int = 1  # processes for one run (torch.distributed data parallel), one GPU each where there are GPUs
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size stays the global batch)
    jobs_per_gpu: int = 1  # parallel sweep jobs that may share one GPU
    dist_timeout: float = 300.0  # seconds a rank waits for the others before the run fails (a dead rank)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, one more forward
    threads: int = 0  # torch CPU threads; 0: the cores shared out among the jobs running side by side
    log_every_seconds: float = 30.0  # a plain progress line this often when stdout is not a terminal
    keep_best: bool = False  # each phase ends with its best evaluation's weights (the paper profile's protocol)
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    recovery: PhaseConfig = field(default_factory=PhaseConfig)

    def check(self) -> None:
        check_device_name(self.device)
        if self.precision not in PRECISIONS:
            raise choice_error("precision (trainer.precision)", self.precision, PRECISIONS)
        if self.batch_size < 1:
            raise DSEEError(f"trainer.batch_size={self.batch_size} must be >= 1.")
        for key in ("devices", "grad_accum", "jobs_per_gpu"):
            if getattr(self, key) < 1:
                raise DSEEError(f"trainer.{key}={getattr(self, key)} must be >= 1.")
        if self.phase1.distill:
            raise DSEEError("trainer.phase1.distill=true: distillation's teacher is the model as it was before "
                            "pruning, so it belongs to recovery: trainer.recovery.distill=true.")
        if self.dist_timeout <= 0:
            raise DSEEError(f"trainer.dist_timeout={self.dist_timeout} must be > 0 (seconds).")
        for name in ("phase1", "recovery"):
            p = getattr(self, name)
            if p.lr is not None and p.lr <= 0:
                raise DSEEError(f"trainer.{name}.lr={p.lr} must be > 0.")
            if p.epochs is not None and p.epochs < 0:
                raise DSEEError(f"trainer.{name}.epochs={p.epochs} must be >= 0 (0: skip the phase).")
            if p.distill_weight < 0 or p.temperature <= 0:
                raise DSEEError(f"trainer.{name}.distill_weight={p.distill_weight} must be >= 0 and trainer.{name}."
                                f"temperature={p.temperature} > 0.")
            if p.epochs_scale <= 0:
                raise DSEEError(f"trainer.{name}.epochs_scale={p.epochs_scale} must be > 0 (set trainer.{name}."
                                f"epochs=0 to skip the phase).")


@dataclass(frozen=True)
class Phase:
    """One phase's own values, resolved from the task's defaults and the trainer section."""

    name: str  # phase1, recovery, or IMP's retrain<r>
    epochs: float
    lr: float
    lr_from: str = ""  # where the learning rate came from, for people (plan.phase_settings)
    batch_size: int = 32
    seed: int = 1  # data order and every generator of the phase
    precision: Precision = FP32


@dataclass
class PhaseState:
    """Everything that changes during a phase besides the model's tensors."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # the evaluation with the best main metric
    seconds: float = 0.0
    finished: bool = False
    peak_memory_bytes: int = 0  # the phase's peak: GPU allocator, or the process's resident set on CPU
    optimizer_bytes: int = 0  # the optimizer's state (AdamW: two moments per trained value)
    weights: str = "last"  # which weights the phase ended with: "last", or "best (step N)"

    def as_meta(self) -> dict:
        return {"step": self.step, "history": self.history, "best": self.best, "seconds": self.seconds,
                "finished": self.finished, "peak_memory_bytes": self.peak_memory_bytes,
                "optimizer_bytes": self.optimizer_bytes, "weights": self.weights}


class ProgressSink:
    """What the loop reports to; the CLI gives a rich progress bar, tests give nothing."""

    def start(self, phase: str, total: int, done: int, per_epoch: int = 0) -> None: ...
    def advance(self, loss: float, lr: float) -> None: ...
    def log(self, values: dict, step: int) -> None: ...
    def stop(self) -> None: ...


def main_metric(spec: TaskSpec, split: str) -> str:
    return f"{split}/{spec.metric}"


@dataclass
class TaskOps:
    """How a kind of task batches, computes its loss and evaluates (classification, generation)."""

    collate: Callable[..., dict[str, torch.Tensor]]  # (data, indices, pad_id)
    evaluate: Callable[..., dict[str, float]]  # (model, evals, pad_id, device, batch_size, precision)
    main: str  # the metric that picks the best evaluation
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = lambda model, batch: model(**batch).loss
    # how many terms the batch's mean loss averages (examples; target tokens for a causal LM), so that
    # micro-batches and ranks weigh theirs to the global batch's mean exactly
    loss_terms: Callable[[dict[str, torch.Tensor]], int] = lambda batch: int(batch["labels"].shape[0])
    higher_is_better: bool = True  # False for a loss or a perplexity

    def better(self, score: float, best: float) -> bool:
        return score > best if self.higher_is_better else score < best


def classification_ops(spec: TaskSpec, first_split: str, select_metric: str | None = None) -> TaskOps:
    return TaskOps(
        collate=collate,
        evaluate=lambda model, evals, pad_id, device, bs, precision: evaluate(model, evals, spec, pad_id, device, bs,
                                                                              precision),
        main=f"{first_split}/{select_metric}" if select_metric else main_metric(spec, first_split),
    )


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, spec: TaskSpec, pad_id: int, device: torch.device, batch_size: int,
            precision: Precision = FP32) -> torch.Tensor:
    """One prediction per example: the class index, or the score for regression (STS-B)."""
    model.eval()
    preds = {}
    for i, start, end in dist.my_batches(len(data.input_ids), batch_size):  # each rank its share of the batches
        batch = {k: v.to(device) for k, v in collate(data, list(range(start, end)), pad_id).items() if k != "labels"}
        with precision.autocast():
            logits = model(**batch).logits.float()
        preds[i] = (logits.squeeze(-1) if spec.num_labels == 1 else logits.argmax(-1)).cpu()
    return torch.cat(dist.gather_in_order(preds))


def evaluate(model: nn.Module, evals: dict[str, Encoded], spec: TaskSpec, pad_id: int, device: torch.device,
             batch_size: int, precision: Precision = FP32) -> dict[str, float]:
    out: dict[str, float] = {}
    for split, data in evals.items():
        predictions = predict(model, data, spec, pad_id, device, batch_size, precision).numpy()
        for name, value in task_metrics(spec.name, predictions, data.labels.numpy()).items():
            out[f"{split}/{name}"] = value
    return out


def linear_schedule(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            out[f"optim::{names[id(p)]}::{key}"] = torch.as_tensor(value)
    return out


def load_optimizer_tensors(optimizer, params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        if not key.startswith("optim::"):
            continue
        _, name, slot = key.split("::")
        optimizer.state[params[name]][slot] = value.to(params[name].device) if slot != "step" else value


RANK_SEED_STRIDE = 1_000_003  # rank r of a distributed run draws its dropout from seed + r * stride


def rng_tensors(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every generator the training step draws from (dropout): the CPU one and this process's GPU's."""
    out = {"rng::torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        out["rng::cuda"] = torch.cuda.get_rng_state(device)
    return out


def all_ranks_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's generators, rank 0's under ``rng::``, rank r's under ``rng::r<r>::``."""
    out = {}
    for rank, states in enumerate(dist.all_gather_object(rng_tensors(device))):
        out.update({k if rank == 0 else k.replace("rng::", f"rng::r{rank}::", 1): v for k, v in states.items()})
    return out


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device | None = None, rank: int = 0) -> bool:
    """This rank's generators as saved; False if the checkpoint has none for this rank (it was
    written by fewer ranks)."""
    prefix = "rng::" if rank == 0 else f"rng::r{rank}::"
    if prefix + "torch" not in tensors:
        return False
    torch.set_rng_state(tensors[prefix + "torch"])
    if device is not None and device.type == "cuda" and prefix + "cuda" in tensors:
        torch.cuda.set_rng_state(tensors[prefix + "cuda"], device)
    return True


def scaler_tensors(scaler: torch.amp.GradScaler | None) -> dict[str, torch.Tensor]:
    if scaler is None:
        return {}
    state = scaler.state_dict()
    return {"scaler::scale": torch.tensor(float(state["scale"]), dtype=torch.float64),
            "scaler::growth_tracker": torch.tensor(int(state["_growth_tracker"]))}


def load_scaler_tensors(scaler: torch.amp.GradScaler | None, tensors: dict[str, torch.Tensor]) -> None:
    if scaler is None or "scaler::scale" not in tensors:
        return
    state = scaler.state_dict()
    state.update(scale=float(tensors["scaler::scale"]), _growth_tracker=int(tensors["scaler::growth_tracker"]))
    scaler.load_state_dict(state)


SaveFn = Callable[[PhaseState, dict[str, torch.Tensor]], None]


@dataclass
class StepHooks:
    """What methods add to the loop."""

    regularizer: Callable[[], torch.Tensor] | None = None  # added to the loss (EarlyBERT's L1)
    before_step: Callable[[int, int], None] | None = None  # (step, total): sparsity schedules
    after_update: Callable[[int], None] | None = None  # (step): after the update, gradients still there (AdaLoRA)
    after_step: Callable[[], None] | None = None  # re-zero pruned weights that train
    best_eligible: Callable[[], bool] | None = None  # may this evaluation be the best? (final sparsity only)
    lr_by_part: dict[str, float] = field(default_factory=dict)  # a part of parameter names (.scores) -> peak lr
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None  # instead of the task's (distill)


def _optimizer(named: dict[str, nn.Parameter], phase: Phase, trainer: TrainerConfig, hooks: StepHooks
               ) -> torch.optim.Optimizer:
    """AdamW with one group per peak learning rate (MvP's scores have their own)."""
    groups: dict[float, list[nn.Parameter]] = {}
    for n, p in named.items():
        peak = next((lr for part, lr in hooks.lr_by_part.items() if part in n), phase.lr)
        groups.setdefault(peak, []).append(p)
    return torch.optim.AdamW([{"params": ps, "peak_lr": peak} for peak, ps in groups.items()],
                             lr=phase.lr, weight_decay=trainer.weight_decay)


@functools.lru_cache(maxsize=2)
def _epoch_order(n_train: int, seed: int) -> torch.Tensor:
    """One epoch's seeded permutation, drawn once per epoch rather than at every step."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))


def batch_indices(step: int, n_train: int, per_epoch: int, phase: Phase) -> list[int]:
    """The examples of ``step``: a fresh seeded permutation per epoch, so a resumed run sees the same."""
    epoch, position = divmod(step, per_epoch)
    order = _epoch_order(n_train, phase.seed * 7919 + epoch)
    return order[position * phase.batch_size : (position + 1) * phase.batch_size].tolist()


def micro_batches(indices: list[int], world: int, accum: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: the batch cut into world x accum contiguous,
    near-equal pieces; rank r takes pieces r*accum .. (r+1)*accum - 1 (some empty at an epoch's tail)."""
    pieces = world * accum
    bounds = [len(indices) * i // pieces for i in range(pieces + 1)]
    return [indices[bounds[i] : bounds[i + 1]] for i in range(rank * accum, (rank + 1) * accum)]


def sync_gradients(params: list[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) the trainable parameters' gradients and the loss over the ranks, in one
    flat buffer. A gradient no rank has stays None (AdamW then skips that parameter, as one
    process would). Returns the summed loss."""
    if not dist.active():
        return loss
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=loss.device)
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    flat = dist.all_reduce_sum_(torch.cat([*parts, present, loss.reshape(1).float()]))
    offset = 0
    for p, part in zip(params, parts):
        p.grad = flat[offset : offset + part.numel()].view_as(p).to(p.dtype).clone()
        offset += part.numel()
    for p, seen in zip(params, flat[offset : offset + len(params)].tolist()):
        if not seen:
            p.grad = None
    return flat[-1]


def _update(model: nn.Module, micro: list[dict], ops: TaskOps, params: list[nn.Parameter],
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, phase: Phase,
            trainer: TrainerConfig, hooks: StepHooks, step: int, lr: float) -> float:
    """Forward and backward of each micro-batch, weighted to the global batch's mean loss;
    gradients summed over the ranks; clip; step: one optimizer update. Returns the loss."""
    counts = [ops.loss_terms(b) if b else 0 for b in micro]
    terms = sum(counts)
    if dist.active():  # the global batch's loss terms, so each piece weighs its share
        terms = float(dist.all_reduce_sum_(torch.tensor([float(terms)], device=params[0].device))[0])
    pieces = trainer.grad_accum * dist.world().size
    total = torch.zeros((), device=params[0].device)
    for batch, count in zip(micro, counts):
        with phase.precision.autocast():
            loss = (hooks.loss or ops.loss)(model, batch) * (count / terms) if count else None
            if hooks.regularizer is not None:  # once per optimizer step, spread over the pieces
                loss = (0.0 if loss is None else loss) + hooks.regularizer() / pieces
        if loss is None:
            continue
        (loss if scaler is None else scaler.scale(loss)).backward()  # fp16: scaled against underflow
        total = total + loss.detach().float()
    total = sync_gradients(params, total)
    if not torch.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        raise DSEEError(
            f"The loss became {total.item()} at step {step + 1} of phase {phase.name!r} "
            f"(learning rate {lr:.3g}). The run stopped; lower the learning rate "
            f"(trainer.{phase.name}.lr) or enable clipping (trainer.max_grad_norm)."
        )
    if scaler is not None:
        scaler.unscale_(optimizer)  # before clipping
    if trainer.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(params, trainer.max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then backs off
        scaler.update()
    if hooks.after_update is not None:
        hooks.after_update(step)
    optimizer.zero_grad(set_to_none=True)
    if hooks.after_step is not None:
        hooks.after_step()
    return total.item()


def _evaluate(model: nn.Module, evals: dict[str, Encoded], ops: TaskOps, pad_id: int, device: torch.device,
              phase: Phase, trainer: TrainerConfig, hooks: StepHooks, state: PhaseState, sink: ProgressSink) -> bool:
    """Evaluate and record it in ``state``; returns whether it is the phase's best so far."""
    scores = ops.evaluate(model, evals, pad_id, device, trainer.eval_batch_size, phase.precision)
    model.train()
    state.history.append({"step": state.step, **scores})
    sink.log({f"{phase.name}/{k}": v for k, v in scores.items()}, state.step)
    eligible = hooks.best_eligible is None or hooks.best_eligible()
    if eligible and (state.best is None or ops.better(scores[ops.main], state.best[ops.main])):
        state.best = state.history[-1]
        return True
    return False


def _resume(resume: tuple[PhaseState, dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
            named: dict[str, nn.Parameter], scaler: torch.amp.GradScaler | None, phase: Phase, device: torch.device
            ) -> tuple[PhaseState, dict[str, torch.Tensor]]:
    """A saved phase back: optimizer, loss scale, this rank's generators; returns the state and
    keep_best's weights."""
    state, tensors = resume
    load_optimizer_tensors(optimizer, named, tensors)
    load_scaler_tensors(scaler, tensors)
    rank = dist.world().rank
    if not restore_rng(tensors, device, rank):  # a checkpoint of fewer ranks: a fresh stream for this one
        torch.manual_seed(phase.seed + RANK_SEED_STRIDE * rank + state.step)
    return state, {k.split("::", 1)[1]: v.to(device) for k, v in tensors.items() if k.startswith("best::")}


def train_phase(
    model: nn.Module,
    train: Encoded,
    evals: dict[str, Encoded],
    ops: TaskOps,
    phase: Phase,
    trainer: TrainerConfig,
    pad_id: int,
    device: torch.device,
    save: SaveFn,
    sink: ProgressSink,
    resume: tuple[PhaseState, dict[str, torch.Tensor]] | None = None,
    hooks: StepHooks | None = None,
) -> PhaseState:
    """Train the parameters that require grad. ``save(state, extra_tensors)`` is called every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from such a save."""
    hooks = hooks or StepHooks()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    names = {id(p): n for n, p in named.items()}
    optimizer = _optimizer(named, phase, trainer, hooks)
    n_train = len(train.input_ids)
    per_epoch = math.ceil(n_train / phase.batch_size)
    total = trainer.max_steps or max(1, math.ceil(phase.epochs * per_epoch))
    warmup = int(trainer.warmup_ratio * total)
    eval_every = trainer.eval_every or per_epoch
    scaler = phase.precision.grad_scaler()
    state = PhaseState()
    best_weights: dict[str, torch.Tensor] = {}  # keep_best: the trained tensors at the best evaluation
    world = dist.world()
    torch.manual_seed(phase.seed + RANK_SEED_STRIDE * world.rank)  # seeds every device's generator
    if resume is not None:
        state, best_weights = _resume(resume, optimizer, named, scaler, phase, device)
    if state.finished:
        return state

    def checkpoint() -> None:  # a resumed phase keeps the larger of its peaks
        state.peak_memory_bytes = max(state.peak_memory_bytes, peak_memory_bytes(device))
        state.optimizer_bytes = max(state.optimizer_bytes, optimizer_bytes(optimizer))
        best = {f"best::{n}": t for n, t in best_weights.items()}
        rng = all_ranks_rng(device)  # collective: every rank gets here at the same step
        dist.on_main(lambda: save(state, optimizer_tensors(optimizer, names) | scaler_tensors(scaler) | rng | best))

    reset_peak_memory(device)
    sink.start(phase.name, total, state.step, per_epoch)
    started = time.perf_counter() - state.seconds
    model.train()
    while state.step < total:
        indices = batch_indices(state.step, n_train, per_epoch, phase)
        micro = [{k: v.to(device) for k, v in ops.collate(train, piece, pad_id).items()} if piece else {}
                 for piece in micro_batches(indices, world.size, trainer.grad_accum, world.rank)]
        factor = linear_schedule(state.step, total, warmup)
        lr = phase.lr * factor
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        if hooks.before_step is not None:
            hooks.before_step(state.step, total)
        loss = _update(model, micro, ops, params, optimizer, scaler, phase, trainer, hooks, state.step, lr)
        state.step += 1
        sink.advance(loss, lr)
        sink.log({f"{phase.name}/loss": loss, f"{phase.name}/lr": lr}, state.step)
        if (state.step % eval_every == 0 or state.step == total) and \
                _evaluate(model, evals, ops, pad_id, device, phase, trainer, hooks, state, sink) and trainer.keep_best:
            best_weights = {n: p.detach().clone() for n, p in named.items()}
        state.seconds = time.perf_counter() - started
        if trainer.checkpoint_every and state.step % trainer.checkpoint_every == 0 and state.step < total:
            checkpoint()
    state.finished = True
    sink.stop()
    model.eval()
    if trainer.keep_best and best_weights and state.best is not None:
        with torch.no_grad():  # the reported model is the one that is kept and exported
            for n, value in best_weights.items():
                named[n].copy_(value)
        state.weights = f"best (step {state.best['step']})"
        best_weights = {}
    checkpoint()
    return state


def summarize(state: PhaseState) -> dict:
    """best and last evaluations of a phase, and what it cost, for metrics.json."""
    last = state.history[-1] if state.history else {}
    return {"best": state.best, "last": last, "evaluations": len(state.history), "steps": state.step,
            "seconds": round(state.seconds, 3),
            "steps_per_second": round(state.step / state.seconds, 3) if state.seconds else None,
            "weights": state.weights, "peak_memory_bytes": state.peak_memory_bytes,
            "optimizer_bytes": state.optimizer_bytes}


