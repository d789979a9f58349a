"""The typed configuration of one run, assembled from the sections the library owns.

Each section is the dataclass of the module that reads it (``pruning.PruningConfig``,
``tuning.AdapterConfig``, ``tuning.omega.OmegaConfig``, ``run.train.TrainerConfig``, ...), with its
own ``check()``; ``RunConfig`` puts them together with the run-level settings, and is the
schema Hydra validates overrides against (registered in the ConfigStore by ``cli.py``). The
library never imports Hydra. ``validate`` runs every section's check and the checks that
span sections, before any work. Adding a setting is one field (with its one-line comment,
which ``dsee config`` shows as its help) plus its yaml default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsee_cli.core.gguf import GGUF_PRESETS, check_gguf
from dsee_cli.core.models import DTYPES, HUB_MODELS, TINY_MODELS, ModelConfig
from dsee_cli.data.answer_tasks import ANSWER_TASKS
from dsee_cli.data.classification import TASKS, DataSource
from dsee_cli.data.generation import NLG_TASKS, DecodeConfig
from dsee_cli.data.lm_tasks import LM_TASKS, PERPLEXITY_TASKS
from dsee_cli.data.zero_shot import tasks_to_run
from dsee_cli.errors import DSEEError, choice_error
from dsee_cli.pruning import PruningConfig
from dsee_cli.reporting.tracking import LoggerConfig
from dsee_cli.run.train import TrainerConfig
from dsee_cli.tuning import AdapterConfig
from dsee_cli.tuning.omega import OmegaConfig
from dsee_cli.tuning.peft_bridge import DELTA_TYPES, SHRINKABLE_TYPES

CAUSAL_TASKS = (*NLG_TASKS, *LM_TASKS, *ANSWER_TASKS)  # the tasks that train a causal LM (a decoder model)


@dataclass
class ModelTaskHparams:
    """Table 11 values that depend on the model as well as the task (null: the task's default)."""

    lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None


@dataclass
class MethodTaskHparams:
    """A task's own values for one tuning method, where the method's usual ones do not fit the task
    (the synthetic task's tiny random-init model is not a pretrained one). null: the method's."""

    lr: float | None = None  # both phases
    epochs: float | None = None  # phase I


@dataclass
class TaskConfig(DataSource):
    """The ``task`` section: the task and its data (data.DataSource's fields), its lengths and
    decoding, and its per-task defaults (paper Table 11 and the reference scripts)."""

    max_length: int = 128  # tokens per example (longer ones are truncated)
    smoke_model: str = "tiny-bert"  # the model the smoke profile uses (tiny-gpt2 for generation tasks)
    # classification: the metric that picks the best evaluation (null: the task's main one, e.g. MRPC's F1);
    # DSEE's tables report MRPC / QQP accuracy, the PST paper's F1: select by what the table reports
    select_metric: str | None = None
    # Per-task defaults; trainer.* overrides them.
    lr: float = 5e-4  # the learning rate of phase I (and of recovery, without recovery_lr)
    epochs: float = 5.0  # phase I epochs (trainer.phase1.epochs overrides)
    recovery_lr: float | None = None  # None: the same as lr
    recovery_epochs: float = 5.0  # recovery epochs, per round (trainer.recovery.epochs overrides)
    sparse_training_epochs: float = 20.0  # pst / map / mvp: the PST paper's (the low end of its search)
    per_model: dict[str, ModelTaskHparams] = field(default_factory=dict)  # keyed by model.name
    per_method: dict[str, MethodTaskHparams] = field(default_factory=dict)  # keyed by adapter.method
    label_smoothing: float = 0.0  # generation tasks: label smoothing of the LM loss
    seq_len: int = 2048  # perplexity tasks (wikitext2): the window length, tokens (Wanda / SparseGPT: the context)
    # decoder runs of any task: also the perplexity on this corpus's test text at the end (wikitext2), from
    # the Hub or perplexity_file; in metrics.json's final.generation as <corpus>/ppl
    perplexity: str | None = None
    perplexity_file: str | None = None  # a local text (or Parquet with a text column) for task.perplexity
    # decoder runs: zero-shot accuracy through lm-eval-harness at the end (pip install 'dsee-cli[llm]'), e.g.
    # [boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa]; ascending: a built-in local task
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None  # a folder of lm-eval task YAMLs (local data, offline)
    lm_eval_limit: int | None = None  # examples per lm-eval task (null: all)
    # exact-match tasks (gsm8k, viggo, sql, metamath): the prompt as the user's turn of the tokenizer's chat template
    chat: bool = False
    answer_pattern: str | None = None  # exact-match tasks: a regex whose first group is the answer (null: the task's)

    @property
    def zero_shot_tasks(self) -> list[str]:
        """The lm-eval tasks a run scores (the smoke profile's stand-in for the Hub's ones)."""
        return tasks_to_run(self.lm_eval, self.synthetic_standin, self.lm_eval_include)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    omega: OmegaConfig = field(default_factory=OmegaConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "dsee"  # the W&B group and sweep folder (experiments set it to the table's name)
    sparsity: float = 0.3  # fraction of the transformer blocks' weights removed (unstructured, N:M, pst / map / mvp)
    seed: int = 1  # one seed for everything (model head, data order, dropout, Ω)
    flops_seq_len: int = 128  # the sequence length FLOPs are counted at
    export: bool = True  # write export/ (adapter, merged, compressed)
    measure: bool = True  # time and memory of the final model against the dense one (metrics.json "savings")
    resume: bool = True  # false: start over in the same run directory
    reuse: bool = True  # phase I / IMP rounds another run computed with the same settings (steps.py); false: recompute
    # Settings for one task, keyed by task name, as nested config ({cola: {task: {lr: 1e-3}}}):
    # profiles tune each task this way. Applied at the command line's edge (cli.apply_per_task),
    # where the command line still wins; emptied once applied.
    per_task: dict[str, Any] = field(default_factory=dict)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DSEEError(message)


def validate(cfg: RunConfig) -> None:
    """Checks that need no model: each section's own, then those across sections. Resolves
    ``pruning.criterion`` / ``granularity`` ``auto`` from the family (a causal-LM task: a decoder)."""
    known_models = (*HUB_MODELS, *GGUF_PRESETS, *TINY_MODELS, "local")
    if cfg.model.gguf_file:
        check_gguf(cfg.model.gguf_file)
    elif cfg.model.name == "local" or cfg.model.path:
        _require(bool(cfg.model.path), "model=local needs model.path=/path/to/a/hugging_face_model_dir.")
    elif "/" not in cfg.model.name and cfg.model.name not in known_models:
        raise choice_error("model (model=...)", cfg.model.name, (*known_models, "<hub org/name>"))
    if cfg.task.name not in (*TASKS, *CAUSAL_TASKS):
        raise choice_error("task (task=...)", cfg.task.name, (*TASKS, *CAUSAL_TASKS))
    if cfg.model.dtype not in DTYPES:
        raise choice_error("model dtype (model.dtype)", cfg.model.dtype, tuple(DTYPES))
    _require(cfg.model.dtype == "float32" or cfg.trainer.precision != "32-true",
             f"model.dtype={cfg.model.dtype} keeps the frozen base in half precision, which needs a mixed "
             f"precision: trainer.precision=auto, bf16-mixed or 16-mixed, not 32-true.")
    for section in (cfg.adapter, cfg.omega, cfg.trainer, cfg.logger):
        section.check()
    reads_w = cfg.adapter.tuning_method.peft and cfg.adapter.peft.delta_reads_weight
    cfg.pruning.resolve_auto(decoder=cfg.task.name in CAUSAL_TASKS, delta_reads_weight=reads_w)  # or the paper's
    cfg.pruning.check(cfg.sparsity)
    method, pruner = cfg.adapter.tuning_method, cfg.pruning.pruner
    _check_sparse_part(cfg)
    _require(not (pruner.removes_heads and method.prompts),
             f"pruning={cfg.pruning.method} removes attention heads, but adapter={cfg.adapter.method}'s prompts "
             f"are shaped by the head count; use pruning=unstructured, nm or none with prompt methods.")
    _require(not (method.sparse_training and pruner.prune is not None),
             f"adapter={cfg.adapter.method} prunes while it trains (up to sparsity={cfg.sparsity} on the cubic "
             f"schedule), so it takes no separate pruning phase: use pruning=none, not pruning={cfg.pruning.method}.")
    if method.sparse_training:
        cfg.adapter.sparse_training.schedule.check(cfg.sparsity)
    _check_structured(cfg)
    if method.peft and pruner.prune is not None:
        peft_method = cfg.adapter.peft
        _require(peft_method.has_delta,
                 f"pruning={cfg.pruning.method} reads the tuned weight W + ΔW, but PEFT method {peft_method.type} has "
                 f"no ΔW that dsee-cli can read (its merge is not W + a weight of its own). It trains with "
                 f"pruning=none; pruning works after: {', '.join(DELTA_TYPES)}.")
        _require(not (cfg.pruning.reconstructs and peft_method.delta_reads_weight),
                 f"{'pruning=sparsegpt' if cfg.pruning.method == 'sparsegpt' else 'pruning.criterion=obs'} rewrites "
                 f"the kept weights (W' = its OBS update) and stores W' − M⊙ΔW as the "
                 f"base, so that M⊙(W + ΔW) computes W'; PEFT method {peft_method.label}'s ΔW reads W itself "
                 f"(DoRA: the row norm of W + BA; HiRA: W ⊙ BA), so the stored base would change ΔW and the "
                 f"layer would not compute W'. Use pruning=wanda or pruning.criterion=tuned_wanda (which change no "
                 f"kept weight), or adapter=lora or dsee with OBS.")
        _require(not pruner.removes_heads or peft_method.shrinkable,
                 f"pruning={cfg.pruning.method} removes heads and channels, so every adapter factor must lose their "
                 f"rows; PEFT method {peft_method.type}'s cannot (shared or Kronecker factors). Use "
                 f"pruning=unstructured or nm, or one of: {', '.join(SHRINKABLE_TYPES)}.")
    _check_distill(cfg)
    _require(cfg.task.max_length >= 8, f"task.max_length={cfg.task.max_length} is too short (>= 8).")
    _require(cfg.task.seq_len >= 8, f"task.seq_len={cfg.task.seq_len} is too short (>= 8).")
    _check_answer_pattern(cfg.task)
    if cfg.task.name in (*NLG_TASKS, *PERPLEXITY_TASKS, *ANSWER_TASKS):
        for key in ("eval_split", "select_split"):
            _require(getattr(cfg.task, key) in ("validation", "test"),
                     f"task.{key}={getattr(cfg.task, key)!r} is invalid; valid choices: validation, test.")
        _require(cfg.task.select_split != cfg.task.eval_split,
                 f"task.select_split and task.eval_split are both {cfg.task.eval_split!r}: the split that picks the "
                 f"model (periodic evaluation, trainer.keep_best) would be the split it reports. Select on one split "
                 f"and report the other (the papers: task.select_split=validation task.eval_split=test).")
    if cfg.task.perplexity is not None:
        if cfg.task.perplexity not in PERPLEXITY_TASKS:
            raise choice_error("perplexity corpus (task.perplexity)", cfg.task.perplexity, tuple(PERPLEXITY_TASKS))
        _require(cfg.task.name in CAUSAL_TASKS, f"task.perplexity={cfg.task.perplexity} scores a language model; "
                 f"task={cfg.task.name} trains a classifier. Use it with {', '.join(CAUSAL_TASKS)}.")
    if cfg.task.lm_eval:
        _require(cfg.task.name in CAUSAL_TASKS, f"task.lm_eval={list(cfg.task.lm_eval)} scores a language model; "
                 f"task={cfg.task.name} trains a classifier. Use it with {', '.join(CAUSAL_TASKS)}.")
        _require(not cfg.task.lm_eval_include or Path(cfg.task.lm_eval_include).is_dir(),
                 f"task.lm_eval_include={cfg.task.lm_eval_include!r} is not a folder (of lm-eval task YAMLs).")
    if cfg.task.name in CAUSAL_TASKS:
        _require(0.0 <= cfg.task.label_smoothing < 1.0, f"task.label_smoothing={cfg.task.label_smoothing} must "
                 f"be in [0, 1).")
        cfg.task.decode.check()


def _check_sparse_part(cfg: RunConfig) -> None:
    """card(Ω) and omega=fisher need a method with a sparse part (dsee, rosa)."""
    method = cfg.adapter.tuning_method
    _require(method.sparse or not cfg.adapter.has_sparse,
             f"adapter={cfg.adapter.method} has no sparse part, but adapter.omega_size={cfg.adapter.omega_size} "
             f"(adapter.density={cfg.adapter.density:g}); use adapter=dsee or rosa, or adapter.omega_size=0.")
    _require(cfg.omega.method != "fisher" or method.sparse,
             f"omega=fisher picks Ω from gradients for a sparse part; adapter={cfg.adapter.method} has none. Use "
             f"adapter=rosa or dsee.")


def _check_answer_pattern(task: TaskConfig) -> None:
    """task.answer_pattern: a regular expression, for an exact-match task."""
    if task.answer_pattern is None:
        return
    import re

    try:
        re.compile(task.answer_pattern)
    except re.error as exc:
        raise DSEEError(f"task.answer_pattern={task.answer_pattern!r} is not a regular expression ({exc}).") from None
    _require(task.name in ANSWER_TASKS, f"task.answer_pattern finds the answer of an exact-match task "
             f"({', '.join(ANSWER_TASKS)}); task={task.name} is scored otherwise.")


def _check_structured(cfg: RunConfig) -> None:
    """pruning=structured by |ΔW| needs a tuning method with a ΔW."""
    _require(not (cfg.pruning.pruner.needs_delta and cfg.pruning.reads_delta and not cfg.adapter.tuning_method.delta),
             f"pruning=structured with pruning.criterion={cfg.pruning.criterion} scores heads by |ΔW| of the adapted "
             f"projections, which adapter={cfg.adapter.method} does not have; use adapter=dsee, lora or a PEFT method "
             f"(adapter=dora, shira, hira, ...), pruning.criterion=activation (calibration activations), or "
             f"pruning=earlybert (learned head importance).")


def _check_distill(cfg: RunConfig) -> None:
    """trainer.recovery.distill needs one pruning step (the teacher is the model just before it) and a
    distribution to match."""
    if not cfg.trainer.recovery.distill:
        return
    pruner = cfg.pruning.pruner
    _require(pruner.prune is not None and not pruner.rounds,
             f"trainer.recovery.distill=true distils the model as it was before pruning into the pruned one in "
             f"recovery; pruning={cfg.pruning.method} has "
             + ("no pruning step" if pruner.prune is None else "several pruning rounds (no single teacher)")
             + ". Use it with pruning=structured, unstructured, nm, wanda or sparsegpt.")
    spec = TASKS.get(cfg.task.name)
    _require(cfg.task.name in CAUSAL_TASKS or spec is None or spec.num_labels > 1,
             f"trainer.recovery.distill=true matches the teacher's output distribution; task={cfg.task.name} is a "
             f"regression with one output and no distribution. Use it with a classification or language task.")


def task_hparams(cfg: RunConfig) -> ModelTaskHparams:
    """The task's learning rate, batch size and max length for this model (Table 11)."""
    own = cfg.task.per_model.get(cfg.model.name) or ModelTaskHparams()
    return ModelTaskHparams(lr=own.lr or cfg.task.lr, batch_size=own.batch_size or cfg.trainer.batch_size,
                            max_length=own.max_length or cfg.task.max_length)


def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line help: its trailing comment, or the comment lines just above it
    (fields a section inherits, e.g. TaskConfig's from data.DataSource, included)."""
    import inspect
    import re

    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if k is not object]):
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# "))
                continue
            match = re.match(r"(\w+): [^#]+?(?:\s+#\s*(.*))?$", stripped)
            if match:
                out[match.group(1)] = match.group(2) or " ".join(above)
            above = []
    return out


def describe(cfg: object, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, value, help) of every setting of a config, nested sections flattened."""
    from dataclasses import fields, is_dataclass

    helps = field_help(type(cfg))
    rows = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value, helps.get(f.name, "")))
    return rows
