"""What a run will do, step by step, before it does it (`dsee train ... --plan`).

The plan is a pure function of the config: Ω (DSEE), phase I, then per pruning round a prune and
a training (IMP: ``round<r>``; one-shot pruning: ``recovery``), then evaluation, export and
measurement. Phase I and IMP rounds carry the fingerprint under which the step store
(steps.py) shares them, so a sweep's plan shows which steps its jobs will compute and which they
will reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsee_cli.config import RunConfig
from dsee_cli.core.precision import Precision
from dsee_cli.run.pipeline import phase_of_round, phase_settings
from dsee_cli.run.steps import StepStore, step_fingerprint

# Training-set sizes of the GLUE tasks (for step counts when no slice is set)
GLUE_TRAIN = {"mnli": 392_702, "qqp": 363_846, "qnli": 104_743, "sst2": 67_349, "cola": 8_551, "stsb": 5_749,
              "mrpc": 3_668, "rte": 2_490}


@dataclass(frozen=True)
class Step:
    name: str  # omega, phase1, prune<r>, round<r> / recovery, evaluate, export, measure
    what: str  # one line for people
    optimizer_steps: int = 0  # for a training: epochs x examples / batch (or trainer.max_steps)
    fingerprint: str = ""  # for a step the store shares (phase I, IMP rounds)


def train_size(cfg: RunConfig) -> int:
    n = GLUE_TRAIN.get(cfg.task.name, cfg.task.synthetic_train)
    return min(n, cfg.task.max_train_samples) if cfg.task.max_train_samples else n


def build_plan(cfg: RunConfig) -> list[Step]:
    n = train_size(cfg)
    precision = Precision("32-true", "cpu")  # the plan does not depend on where it runs

    def steps(phase: str) -> int:
        s = phase_settings(cfg, phase, precision)
        return cfg.trainer.max_steps or max(1, math.ceil(s.epochs * math.ceil(n / s.batch_size)))

    plan: list[Step] = []
    if cfg.adapter.method == "dsee" and cfg.adapter.omega_size > 0:
        plan.append(Step("omega", f"Ω: {cfg.adapter.omega_size} per matrix, {cfg.omega.method}"
                                  + (f" ({cfg.omega.preset})" if cfg.omega.method == "grebsmo" else "")))
    plan.append(Step("phase1", f"phase I: {cfg.adapter.method} tuning", steps("phase1"),
                     step_fingerprint(cfg, "phase1")))
    rounds = cfg.pruning.round_sparsities(cfg.sparsity)
    for r, target in enumerate(rounds, start=1):
        plan.append(Step(f"prune{r}", f"prune: {cfg.pruning.method}, {cfg.pruning.criterion}"
                         + (f", {cfg.pruning.heads_to_remove} heads per layer" if cfg.pruning.pruner.removes_heads
                            else f", sparsity {target:.3g}")))
        phase = phase_of_round(r, len(rounds))
        if cfg.pruning.pruner.rounds:
            plan.append(Step(f"round{r}", f"IMP round {r}: retrain", steps(phase), step_fingerprint(cfg, f"round{r}")))
        else:
            plan.append(Step("recovery", "recovery tuning", steps(phase)))
    plan.append(Step("evaluate", f"evaluate on {cfg.task.name}"))
    if cfg.export:
        plan.append(Step("export", "export: adapter, merged, compressed"))
    if cfg.measure:
        plan.append(Step("measure", "latency, memory, size vs dense"))
    return plan


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
