"""What a run does, step by step: the plan it executes, and prints before (`dsee train ... --plan`).

The plan is a pure function of the config: Ω (DSEE), phase I, then per pruning round a prune and
a training (IMP: ``round<r>``; one-shot pruning: ``recovery``), then evaluation, export and
measurement. ``run.pipeline`` executes it in order and its checkpoint records how many steps are
done. Phase I and IMP rounds carry the fingerprint under which the step store (steps.py) shares
them, so a sweep's plan shows which steps its jobs will compute and which they will reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsee_cli.config import CAUSAL_TASKS, RunConfig, task_hparams
from dsee_cli.core.precision import Precision
from dsee_cli.data.answer_tasks import ANSWER_TASKS
from dsee_cli.pruning import PRUNERS, collapse_warning, describe_score
from dsee_cli.run.steps import StepStore, step_fingerprint
from dsee_cli.run.train import Phase

# Training-set sizes of the GLUE tasks (for step counts when no slice is set)
GLUE_TRAIN = {"mnli": 392_702, "qqp": 363_846, "qnli": 104_743, "sst2": 67_349, "cola": 8_551, "stsb": 5_749,
              "mrpc": 3_668, "rte": 2_490}
CHANGES_MODEL = ("omega", "train", "prune")  # the steps after which the run checkpoints


@dataclass(frozen=True)
class Step:
    name: str  # omega, phase1, prune<r>, round<r> / recovery, evaluate, export, measure
    kind: str  # omega, train, prune, evaluate, export, measure
    what: str  # one line for people
    phase: str = ""  # train: the phase it trains (phase1, IMP's retrain<r>, recovery)
    round: int = 0  # prune / train after phase I: which pruning round (1, ...)
    target: float = 0.0  # prune: the sparsity after this round
    optimizer_steps: int = 0  # train: epochs x examples / batch (or trainer.max_steps)
    fingerprint: str = ""  # a step the store shares (phase I, IMP rounds)


def phase_of_round(r: int, rounds: int) -> str:
    """The phase that trains after pruning round r: IMP's ``retrain<r>``, and ``recovery`` last."""
    return "recovery" if r == rounds else f"retrain{r}"


def round_of(cfg: RunConfig, phase: str) -> int:
    """Which round a recovery phase trains: IMP's ``retrain<r>`` is round r, ``recovery`` the last."""
    if phase == "recovery":
        return cfg.pruning.rounds if cfg.pruning.pruner.rounds else 1
    return int(phase.removeprefix("retrain"))


def phase_lr(cfg: RunConfig, phase: str) -> tuple[float, str]:
    """A phase's peak learning rate and where it came from. First found wins: trainer.<phase>.lr
    (the command line, a recipe or a profile), the task's rate for this method (task.per_method),
    the method's usual rate (its registry entry), then the task's (Table 11, tuned for LoRA / DSEE;
    recovery: task.recovery_lr first)."""
    t, task, method = cfg.trainer, cfg.task, cfg.adapter.method
    key = "phase1" if phase == "phase1" else "recovery"
    own = task.per_method.get(method)
    per_model = task.per_model.get(cfg.model.name)
    for lr, where in (
        (getattr(t, key).lr, f"trainer.{key}.lr"),
        (own.lr if own else None, f"task {task.name}'s rate for adapter={method}"),
        (cfg.adapter.tuning_method.lr, f"adapter={method}'s usual rate"),
        (task.recovery_lr if key == "recovery" else None, f"task {task.name}'s recovery_lr"),
        (per_model.lr if per_model else None, f"task {task.name} with model {cfg.model.name} (Table 11)"),
    ):
        if lr is not None:
            return lr, where
    return task.lr, f"task {task.name} (Table 11)" if task.name in GLUE_TRAIN else f"task {task.name}"


def phase_epochs(cfg: RunConfig, phase: str) -> float:
    """trainer.<phase>.epochs, else the task's for this method, else the task's (sparse-training
    methods: task.sparse_training_epochs, the PST paper's), times trainer.<phase>.epochs_scale."""
    t, task = cfg.trainer, cfg.task
    if phase != "phase1":
        return (task.recovery_epochs if t.recovery.epochs is None else t.recovery.epochs) * t.recovery.epochs_scale
    if t.phase1.epochs is not None:
        return t.phase1.epochs * t.phase1.epochs_scale
    own = task.per_method.get(cfg.adapter.method)
    default = task.sparse_training_epochs if cfg.adapter.tuning_method.sparse_training else task.epochs
    return ((own.epochs if own else None) or default) * t.phase1.epochs_scale


def skipped(cfg: RunConfig, phase: str) -> bool:
    """trainer.<phase>.epochs=0: no such phase (one-shot pruning of the model as loaded; no recovery)."""
    return phase_epochs(cfg, phase) == 0


def phase_settings(cfg: RunConfig, phase: str, precision: Precision) -> Phase:
    """Phase I, or a recovery phase (``recovery``, and IMP's ``retrain<r>`` between rounds)."""
    lr, lr_from = phase_lr(cfg, phase)
    return Phase(
        name=phase, epochs=phase_epochs(cfg, phase), lr=lr, lr_from=lr_from,
        batch_size=task_hparams(cfg).batch_size, precision=precision,
        # round r trains from the same seed whether it is a run's last round or not, so that
        # IMP's rounds are one chain of steps (steps.py)
        seed=cfg.seed * 1000 + (0 if phase == "phase1" else round_of(cfg, phase)),
    )


def train_size(cfg: RunConfig) -> int:
    answers = ANSWER_TASKS.get(cfg.task.name)
    n = GLUE_TRAIN.get(cfg.task.name) or (answers.train_rows if answers and not cfg.task.synthetic_standin else 0) \
        or cfg.task.synthetic_train
    return min(n, cfg.task.max_train_samples) if cfg.task.max_train_samples else n


def _amount(cfg: RunConfig, target: float) -> str:
    """What a prune step removes, in the units it removes."""
    p = cfg.pruning
    if p.pruner.removes_heads:
        heads = f"{p.head_fraction:.0%} of the query heads" if p.head_fraction else f"{p.heads_to_remove} heads"
        unit = f" ({p.unit})" if p.unit != "heads" else ""
        def share(v: float) -> str:
            return f"{v:.0%}" if v < 1 else f"{v:g}"
        channels = f", {share(p.ffn_channels)} of the MLP channels" if p.ffn_channels else ""
        hidden = f", {share(p.hidden_channels)} of the hidden width" if p.hidden_channels else ""
        return f"{heads} per layer{unit}{channels}{hidden}"
    if p.pattern:
        return f"{p.n}:{p.m}"
    return f"sparsity {target:.3g}"


def build_plan(cfg: RunConfig) -> list[Step]:
    n = train_size(cfg)
    precision = Precision("32-true", "cpu")  # the plan does not depend on where it runs

    def steps(phase: str) -> int:
        s = phase_settings(cfg, phase, precision)
        return cfg.trainer.max_steps or max(1, math.ceil(s.epochs * math.ceil(n / s.batch_size)))

    def lr(phase: str) -> str:
        s = phase_settings(cfg, phase, precision)
        own = f", B·A at {cfg.adapter.lora_lr:g} (adapter.lora_lr)" if phase == "phase1" and cfg.adapter.lora_lr else ""
        return f"; lr {s.lr:g} ({s.lr_from}){own}"

    plan: list[Step] = []
    if cfg.adapter.tuning_method.sparse and cfg.adapter.has_sparse:
        a, o = cfg.adapter, cfg.omega
        size = f"density {a.density:g} of each matrix" if a.density else f"{a.omega_size} per matrix"
        how = {"grebsmo": f" ({o.preset})",
               "fisher": f" ({o.grad_stat} of {o.grad_batches} batch gradient(s) after {o.warmup_steps} LoRA steps; "
                         f"{'restart' if o.restart else 'keep the warm-up'}{lr('phase1')})"}.get(o.method, "")
        plan.append(Step("omega", "omega", f"Ω: {size}, {o.method}{how}",
                         optimizer_steps=o.warmup_steps if o.method == "fisher" else 0))
    if not skipped(cfg, "phase1"):
        plan.append(Step("phase1", "train", f"phase I: {cfg.adapter.tuning_method.title}{lr('phase1')}",
                         phase="phase1", optimizer_steps=steps("phase1"), fingerprint=step_fingerprint(cfg, "phase1")))
    pruner = cfg.pruning.pruner
    rounds = cfg.pruning.round_sparsities(cfg.sparsity)
    for r, target in enumerate(rounds, start=1):
        amount = _amount(cfg, target)
        by = describe_score(cfg.pruning) if pruner.prune is PRUNERS["unstructured"].prune else cfg.pruning.criterion
        plan.append(Step(f"prune{r}", "prune", f"{pruner.title}: {amount}, by {by}",
                         round=r, target=target))
        phase = phase_of_round(r, len(rounds))
        if pruner.rounds:
            plan.append(Step(f"round{r}", "train", f"IMP round {r}: retrain{lr(phase)}", phase=phase, round=r,
                             optimizer_steps=steps(phase), fingerprint=step_fingerprint(cfg, f"round{r}")))
        elif not skipped(cfg, phase):
            plan.append(Step("recovery", "train", f"recovery tuning{lr(phase)}", phase=phase, round=r,
                             optimizer_steps=steps(phase)))
    plan.append(Step("evaluate", "evaluate", f"evaluate on {cfg.task.name}"))
    if cfg.export:
        plan.append(Step("export", "export", "export: adapter, merged, compressed"))
    if cfg.measure:
        plan.append(Step("measure", "measure", "latency, memory, size vs dense"))
    return plan


def plan_warnings(cfg: RunConfig) -> list[str]:
    """What --plan and the run's start warn of before any work: configurations known to fail."""
    warning = collapse_warning(cfg.pruning, cfg.sparsity, decoder=cfg.task.name in CAUSAL_TASKS)
    return [warning] if warning else []


def will_reuse(plan: list[Step], cfg: RunConfig, store: StepStore, computed: set[str]) -> dict[str, bool]:
    """For each shared step: will it be reused (stored already, or computed by an earlier job of
    the sweep: ``computed``, which this call extends with this job's steps)?"""
    out: dict[str, bool] = {}
    for step in plan:
        if step.fingerprint:
            key = f"{step.name}-{step.fingerprint}"
            out[step.name] = cfg.reuse and (key in computed or store.path(step.name, step.fingerprint).is_dir())
            computed.add(key)
    return out
