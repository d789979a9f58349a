"""The typed configuration of one run.

These dataclasses are the schema Hydra validates overrides against (registered in the
ConfigStore by ``cli.py``); the library receives them as plain objects and never imports
Hydra. ``validate`` does the semantic checks that types cannot express, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .adapters import AdapterSettings
from .data import TASKS
from .errors import DSEEError, choice_error
from .methods import METHODS as ADAPTER_METHODS
from .methods import PROMPT_METHODS, SPARSE_TRAINING, MethodSettings
from .models import HUB_MODELS, TINY_MODELS
from .nlg import NLG_TASKS
from .omega import METHODS as OMEGA_METHODS
from .omega import PRESETS
from .precision import PRECISIONS
from .pruning import PruningSettings
from .sparse_training import Schedule, SparseTrainingSettings

LOGGER_BACKENDS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    # a preset (bert-base, roberta-large, gpt2-medium, tiny-bert, tiny-gpt2), "local" or a Hub id
    name: str = "tiny-bert"
    path: str | None = None  # a local Hugging Face model directory (overrides name)
    # the pooler trains with the task head: true / false; null: if the checkpoint's was never trained
    train_pooler: bool | None = None
    tiny_hidden: int = 64  # tiny-bert / tiny-gpt2 (built in code): hidden size
    tiny_layers: int = 2  # tiny models: blocks
    tiny_heads: int = 4  # tiny models: attention heads
    tiny_intermediate: int = 128  # tiny models: FFN size


@dataclass
class ModelTaskHparams:
    """Table 11 values that depend on the model as well as the task (null: the task's default)."""

    lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None


@dataclass
class TaskConfig:
    name: str = "synthetic"  # the task: a GLUE task, synthetic, or e2e / webnlg / dart (task=... picks its defaults)
    data_dir: str | None = None  # the classic GLUE download (folder holding CoLA/, SST-2/, ...)
    train_file: str | None = None  # CSV / JSON lines, with validation_file
    validation_file: str | None = None  # the evaluation file that goes with train_file
    test_file: str | None = None  # for `dsee eval --split test` with train_file / validation_file
    # The Hub source, for a fork, a pinned commit or another config (null: the README's default per task)
    hub_repo: str | None = None
    hub_revision: str | None = None  # a branch, tag or commit of hub_repo
    hub_config: str | None = None  # the dataset config (subset) on the Hub
    text_fields: list[str] | None = None  # the columns holding the text (one, or two for pairs); null: the task's
    label_field: str = "label"  # the column holding the label
    max_length: int = 128  # tokens per example (longer ones are truncated)
    max_train_samples: int | None = None  # use only this many training examples (a fixed random slice); null: all
    max_eval_samples: int | None = None  # evaluate on only this many examples; null: all
    synthetic_train: int = 2000  # synthetic task / stand-ins: training examples
    synthetic_eval: int = 500  # synthetic task / stand-ins: evaluation examples
    synthetic_standin: bool = False  # smoke profile: synthetic data shaped like this task (labels, fields)
    smoke_model: str = "tiny-bert"  # the model the smoke profile uses (tiny-gpt2 for generation tasks)
    # Per-task defaults (paper Table 11 and the reference scripts); trainer.* overrides them.
    lr: float = 5e-4
    epochs: float = 5.0  # phase I epochs (trainer.phase1.epochs overrides)
    recovery_lr: float | None = None  # None: the same as lr
    recovery_epochs: float = 5.0  # recovery epochs, per round (trainer.recovery.epochs overrides)
    sparse_training_epochs: float = 20.0  # pst / map / mvp: the PST paper's (the low end of its search)
    per_model: dict[str, ModelTaskHparams] = field(default_factory=dict)  # keyed by model.name
    # Generation tasks (e2e, webnlg, dart): the split that is decoded and scored, the loss, decoding.
    eval_split: str = "validation"  # or test (the papers report test)
    label_smoothing: float = 0.0  # generation tasks: label smoothing of the LM loss
    num_beams: int = 10  # generation: beam size
    length_penalty: float = 0.8  # generation: beam search length penalty
    no_repeat_ngram_size: int = 4  # generation: no repeated n-grams of this size
    max_new_tokens: int = 64  # generation: the longest output
    decode_batch_size: int = 16  # generation: inputs decoded at once


@dataclass
class AdapterConfig:
    """The fine-tuning method (dsee_cli.methods): what trains and what is added."""

    method: str = "dsee"  # the tuning method (adapter=... picks it with its defaults; dsee_cli.methods)
    rank: int = 16  # dsee / lora: the rank r of B·A
    alpha: float = 32.0  # dsee / lora: B·A is scaled by alpha / r
    omega_size: int = 16  # card(Ω) per adapted matrix; 0 is LoRA
    dropout: float = 0.0  # dsee / lora: dropout on the adapter's input
    init: str = "kaiming"  # dsee / lora: A's start, kaiming (LoRA, PEFT) or normal (N(0, 0.02), the paper)
    targets: list[str] | None = None  # None: the architecture's default (q, v)
    bottleneck: int = 64  # houlsby / mam
    placement: str = "both"  # houlsby: both (Houlsby) or ffn (Pfeiffer)
    adapter_scale: float = 4.0  # mam
    prefix_length: int = 16  # prefix / ptuning-v2 / mam
    prefix_projection: bool = False  # prefix: reparameterise the prompts through an MLP
    prefix_hidden: int = 512  # prefix: that MLP's hidden size
    top_layers: int = 2  # ft-top
    train_layer_norms: bool = False  # houlsby
    r1: int = 8  # pst: rank of the importance's A·B
    r2: int = 8  # pst: rank of the weight update U·V
    beta: float = 1.0  # pst: W = W₀ + β·U·V
    alpha1: float = 1.0  # pst: weight of α₁·A·B in the importance
    alpha2: float = 1.0  # pst: weight of α₂·(R + C)
    score_terms: list[str] = field(default_factory=lambda: ["weight", "lowrank", "structured"])  # pst ablations
    topk: str = "layer"  # pst / map / mvp: top-v per layer or global
    score_lr: float = 1e-4  # mvp: the scores' learning rate


@dataclass
class OmegaConfig:
    method: str = "grebsmo"  # grebsmo, magnitude (largest |W|) or random
    preset: str = "fast"  # grebsmo: fast (ours) or reference (the paper's code)
    # Any of these overrides the preset's value.
    rank: int | None = None
    rank_start: int | None = None  # grebsmo: the rank of UV at the start
    rank_step: int | None = None  # grebsmo: its growth per outer iteration
    outer_iters: int | None = None  # grebsmo: outer iterations
    inner_iters: int | None = None  # grebsmo: inner iterations per outer one
    threshold: float | None = None  # grebsmo: |S| below this is 0 (without sparse_card)
    soft: bool | None = None  # grebsmo: soft instead of hard thresholding
    sparse_card: int | None = None  # 0: threshold instead of a card constraint
    reset_sparse: bool | None = None  # grebsmo: S = 0 at each outer iteration (the reference code)
    tol: float | None = None  # grebsmo: stop at this relative error (0: never)
    seed: int = 0  # the random draws of grebsmo and of random Ω
    cache: bool = True  # keep Ω on disk, computed once per weights and settings
    cache_dir: str | None = None  # default: $DSEE_CACHE or ~/.cache/dsee-cli, then /omega


@dataclass
class PruningConfig:
    method: str = "unstructured"  # unstructured, nm, structured (heads), imp, earlybert or none
    criterion: str = "delta"  # the score: delta |ΔW|, delta_plus_weight |W + ΔW|, weight |W|, random
    granularity: str = "global"  # global: one threshold per pool; layer: per matrix
    n: int = 2  # nm: keep n of every m
    m: int = 4  # nm: the group size
    heads_to_remove: int = 3  # structured / earlybert: heads removed per layer
    mask_delta: bool = True  # false: the reference behaviour, ΔW stays dense in recovery
    scope: str = "blocks"  # blocks: every linear in the blocks; adapted: only the adapted matrices (Table 7)
    rounds: int = 1  # imp: prune-retrain rounds
    rate: float = 0.1  # imp: fraction of the remaining weights pruned per round
    rewind: bool = False  # imp: reset the trained tensors to their start after each pruning
    ffn_fraction: float = 0.4  # earlybert: fraction of each FFN's neurons removed
    slimming_l1: float = 1e-4  # earlybert: L1 weight on the slimming coefficients


@dataclass
class ScheduleConfig:
    """Cubic sparsity schedule of pst / map / mvp (Zhu & Gupta), up to the top-level `sparsity`."""

    initial: float = 0.0  # the sparsity the schedule starts from
    warmup: float = 0.1  # fraction of phase I held at `initial`
    cooldown: float = 0.3  # fraction held at the final sparsity
    every: int = 10  # steps between mask updates during the ramp


@dataclass
class PhaseConfig:
    epochs: float | None = None  # None: the task's default
    lr: float | None = None  # None: the task's (Table 11)


@dataclass
class TrainerConfig:
    batch_size: int = 32  # training batch (a model's Table 11 value in task.per_model wins)
    eval_batch_size: int = 128  # evaluation batch
    warmup_ratio: float = 0.0  # fraction of each phase's steps with a linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    eval_every: int = 0  # steps; 0: every epoch
    checkpoint_every: int = 200  # steps
    max_steps: int = 0  # per phase; 0: from epochs
    precision: str = "auto"  # 32-true, bf16-mixed, 16-mixed; auto: bf16-mixed (or 16-mixed) on GPU, 32-true on CPU
    device: str = "auto"  # auto (a GPU if there is one), cpu or cuda
    threads: int = 0  # torch CPU threads; 0: torch's default
    log_every_seconds: float = 30.0  # a plain progress line this often when stdout is not a terminal
    keep_best: bool = False  # each phase ends with its best evaluation's weights (the paper profile's protocol)
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    recovery: PhaseConfig = field(default_factory=PhaseConfig)


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb or none
    mode: str = "offline"  # online needs WANDB_API_KEY (or `wandb login`)
    project: str = "dsee-cli"  # W&B project
    entity: str | None = None  # W&B entity (team or user)
    group: str | None = None  # default: the run's name
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    omega: OmegaConfig = field(default_factory=OmegaConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    name: str = "dsee"  # the W&B group and sweep folder (experiments set it to the table's name)
    sparsity: float = 0.3  # fraction of the transformer blocks' weights removed (unstructured, N:M)
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
    """Checks that need no model: ranges and choices, one clear paragraph each."""
    known_models = (*HUB_MODELS, *TINY_MODELS, "local")
    if cfg.model.name == "local" or cfg.model.path:
        _require(bool(cfg.model.path), "model=local needs model.path=/path/to/a/hugging_face_model_dir.")
    elif "/" not in cfg.model.name and cfg.model.name not in known_models:
        raise choice_error("model (model=...)", cfg.model.name, (*known_models, "<hub org/name>"))
    _require(cfg.adapter.rank >= 1, f"adapter.rank={cfg.adapter.rank} is invalid: the rank must be >= 1.")
    _require(cfg.adapter.omega_size >= 0,
             f"adapter.omega_size={cfg.adapter.omega_size} is invalid: card(Ω) must be >= 0 (0 is LoRA).")
    _require(cfg.adapter.init in ("kaiming", "normal"),
             f"adapter.init={cfg.adapter.init!r} is invalid; valid choices: kaiming, normal.")
    _require(0.0 <= cfg.adapter.dropout < 1.0, f"adapter.dropout={cfg.adapter.dropout} must be in [0, 1).")
    pruning_settings(cfg).check()
    method_settings(cfg).check()
    _require(cfg.adapter.method == "dsee" or cfg.adapter.omega_size == 0,
             f"adapter={cfg.adapter.method} has no sparse part, but adapter.omega_size={cfg.adapter.omega_size}; "
             f"use adapter=dsee, or adapter.omega_size=0.")
    _require(not (cfg.pruning.method in ("structured", "earlybert") and cfg.adapter.method in PROMPT_METHODS),
             f"pruning={cfg.pruning.method} removes attention heads, but adapter={cfg.adapter.method}'s prompts "
             f"are shaped by the head count; use pruning=unstructured, nm or none with prompt methods.")
    _require(not (cfg.adapter.method in SPARSE_TRAINING and cfg.pruning.method != "none"),
             f"adapter={cfg.adapter.method} prunes while it trains (up to sparsity={cfg.sparsity} on the cubic "
             f"schedule), so it takes no separate pruning phase: use pruning=none, not pruning={cfg.pruning.method}.")
    if cfg.adapter.method in SPARSE_TRAINING:
        sparsity_schedule(cfg).check()
    _require(not (cfg.pruning.method == "structured" and cfg.adapter.method not in ("dsee", "lora")),
             f"pruning=structured scores heads by |ΔW| of the adapted projections, which adapter="
             f"{cfg.adapter.method} does not have; use adapter=dsee or lora, or pruning=earlybert (learned head "
             f"importance).")
    _require(cfg.pruning.heads_to_remove >= 0,
             f"pruning.heads_to_remove={cfg.pruning.heads_to_remove} must be >= 0.")
    _require(cfg.task.max_length >= 8, f"task.max_length={cfg.task.max_length} is too short (>= 8).")
    if cfg.task.name in NLG_TASKS:
        _require(cfg.task.eval_split in ("validation", "test"),
                 f"task.eval_split={cfg.task.eval_split!r} is invalid; valid choices: validation, test.")
        _require(0.0 <= cfg.task.label_smoothing < 1.0, f"task.label_smoothing={cfg.task.label_smoothing} must "
                 f"be in [0, 1).")
        _require(cfg.task.num_beams >= 1 and cfg.task.max_new_tokens >= 1,
                 f"task.num_beams={cfg.task.num_beams} and task.max_new_tokens={cfg.task.max_new_tokens} must be >= 1.")
    _require(cfg.trainer.batch_size >= 1, f"trainer.batch_size={cfg.trainer.batch_size} must be >= 1.")
    for phase in ("phase1", "recovery"):
        p = getattr(cfg.trainer, phase)
        _require(p.lr is None or p.lr > 0, f"trainer.{phase}.lr={p.lr} must be > 0.")
        _require(p.epochs is None or p.epochs > 0, f"trainer.{phase}.epochs={p.epochs} must be > 0.")
    for what, value, valid in (
        ("task (task=...)", cfg.task.name, (*TASKS, *NLG_TASKS)),
        ("adapter method (adapter.method)", cfg.adapter.method, ADAPTER_METHODS),
        ("Ω method (omega.method)", cfg.omega.method, OMEGA_METHODS),
        ("GreBsmo preset (omega.preset)", cfg.omega.preset, PRESETS),
        ("device (trainer.device)", cfg.trainer.device, DEVICES),
        ("precision (trainer.precision)", cfg.trainer.precision, PRECISIONS),
        ("logger (logger=...)", cfg.logger.backend, LOGGER_BACKENDS),
        ("W&B mode (logger.mode)", cfg.logger.mode, LOGGER_MODES),
    ):
        if value not in valid:
            raise choice_error(what, value, valid)


def pruning_settings(cfg: RunConfig) -> PruningSettings:
    p = cfg.pruning
    return PruningSettings(
        method=p.method, sparsity=cfg.sparsity, criterion=p.criterion, granularity=p.granularity, n=p.n, m=p.m,
        heads_to_remove=p.heads_to_remove, mask_delta=p.mask_delta, seed=cfg.seed, scope=p.scope,
        rounds=p.rounds, rate=p.rate, rewind=p.rewind, ffn_fraction=p.ffn_fraction, slimming_l1=p.slimming_l1,
    )


def method_settings(cfg: RunConfig) -> MethodSettings:
    a = cfg.adapter
    return MethodSettings(
        method=a.method, adapter=AdapterSettings(a.rank, a.alpha, a.omega_size, a.dropout, a.init),
        targets=tuple(a.targets) if a.targets else None, bottleneck=a.bottleneck, placement=a.placement,
        adapter_scale=a.adapter_scale, prefix_length=a.prefix_length, prefix_projection=a.prefix_projection,
        prefix_hidden=a.prefix_hidden, top_layers=a.top_layers, train_layer_norms=a.train_layer_norms,
        sparse=SparseTrainingSettings(
            method=a.method if a.method in SPARSE_TRAINING else "pst", r1=a.r1, r2=a.r2, beta=a.beta,
            alpha1=a.alpha1, alpha2=a.alpha2, score_terms=tuple(a.score_terms), topk=a.topk, score_lr=a.score_lr),
    )


def sparsity_schedule(cfg: RunConfig) -> Schedule:
    s = cfg.schedule
    return Schedule(final=cfg.sparsity, initial=s.initial, warmup=s.warmup, cooldown=s.cooldown, every=s.every)


def task_hparams(cfg: RunConfig) -> ModelTaskHparams:
    """The task's learning rate, batch size and max length for this model (Table 11)."""
    own = cfg.task.per_model.get(cfg.model.name) or ModelTaskHparams()
    return ModelTaskHparams(lr=own.lr or cfg.task.lr, batch_size=own.batch_size or cfg.trainer.batch_size,
                            max_length=own.max_length or cfg.task.max_length)


def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line help: its trailing comment, or the comment lines just above it."""
    import inspect
    import re

    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
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
