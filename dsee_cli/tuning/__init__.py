"""What each fine-tuning method trains, and what it adds to the model.

* ``dsee`` / ``lora``: our sparse + low-rank ``DSEELinear`` (adapters.py); LoRA is card(Ω) = 0.
* ``rosa``: the same layer with RoSA's Ω from gradients (omega=fisher), density and rates.
* ``full``, ``bitfit`` (biases), ``ft-top`` (the top k blocks): which pretrained tensors train.
* ``houlsby``: bottleneck adapters (bottleneck.py).
* ``prefix`` / ``ptuning-v2``: PEFT's prefix encoder, deep prompts (prompts.py).
* ``mam``: the MAM adapter (He et al. 2021): prefix tuning on attention plus a scaled parallel
  bottleneck adapter on the FFN.
* ``pst``, ``map``, ``mvp``: sparse training on a sparsity schedule (sparse_training.py).
* ``peft`` and its presets ``dora``, ``shira``, ``hira``, ``adalora``, ``vera``, ``loha``, ``lokr``: PEFT's
  own method on the targets, its layers wrapped so that pruning reads their ΔW (peft_bridge.py).

``TUNING_METHODS`` declares each method once; ``AdapterConfig`` is the ``adapter`` section.

Everything is attached with forward hooks and submodules *under* the layer it modifies, so
the original module names stay valid for pruning, accounting and export. The task head (and
any weight the checkpoint lacked) always trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from dsee_cli.core.arch import task_head_params, transformer_layers
from dsee_cli.errors import DSEEError, choice_error
from dsee_cli.tuning.adapters import LowRankConfig, inject_adapters
from dsee_cli.tuning.bottleneck import BottleneckConfig, add_houlsby, add_parallel_ffn
from dsee_cli.tuning.peft_bridge import PeftSection, inject_peft
from dsee_cli.tuning.prompts import PromptConfig, add_prefix
from dsee_cli.tuning.sparse_training import ScheduleConfig, SparseTrainingConfig, inject_sparse_training


@dataclass
class AdapterConfig(LowRankConfig):
    """The ``adapter`` section: the tuning method and its settings. The low-rank fields
    (rank, alpha, omega_size, dropout, init) are adapters.LowRankConfig's, for dsee / lora;
    ``peft`` is the PEFT method's, for peft and its presets."""

    method: str = "dsee"  # the tuning method (adapter=... picks it with its defaults; see TUNING_METHODS)
    targets: list[str] | None = None  # dsee / lora: the adapted projections; null: the architecture's q, v
    top_layers: int = 2  # ft-top: how many of the last blocks train
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sparse_training: SparseTrainingConfig = field(default_factory=SparseTrainingConfig)
    peft: PeftSection = field(default_factory=PeftSection)  # peft and its presets: the PEFT method and its args

    @property
    def tuning_method(self) -> TuningMethod:
        return TUNING_METHODS[self.method]

    def check(self) -> None:
        if self.method not in TUNING_METHODS:
            raise choice_error("adapter method (adapter=... / adapter.method)", self.method, tuple(TUNING_METHODS))
        LowRankConfig.check(self)
        self.bottleneck.check()
        self.prompt.check()
        if self.top_layers < 1:
            raise DSEEError(f"adapter.top_layers={self.top_layers} is invalid: it must be >= 1.")
        if self.tuning_method.sparse_training:
            self.sparse_training.check(self.method)
        if self.tuning_method.peft:
            self.peft.check()

    @classmethod
    def from_dict(cls, saved: dict) -> AdapterConfig:
        """The section as ``dataclasses.asdict`` wrote it (export/adapter's meta.json)."""
        d = dict(saved)
        if "adapter" in d or "prefix_length" in d:
            raise DSEEError("this adapter export was written by dsee-cli before the adapter section was split "
                            "(adapter.bottleneck, adapter.prompt, adapter.sparse_training); export it again.")
        sparse = dict(d.get("sparse_training", {}))
        sparse["schedule"] = ScheduleConfig(**sparse.get("schedule", {}))
        d.update(bottleneck=BottleneckConfig(**d.get("bottleneck", {})), prompt=PromptConfig(**d.get("prompt", {})),
                 sparse_training=SparseTrainingConfig(**sparse), peft=PeftSection(**d.get("peft", {})))
        return cls(**d)


def _attach_lowrank(model: nn.Module, s: AdapterConfig) -> None:
    inject_adapters(model, s, list(s.targets) if s.targets else None)


def _freeze_all_but(model: nn.Module, trains: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(trains)


def _attach_bitfit(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, False)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)


def _attach_ft_top(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, False)
    layers = transformer_layers(model)
    if s.top_layers > len(layers):
        raise DSEEError(f"adapter.top_layers={s.top_layers} is out of range: this model has {len(layers)} blocks.")
    for layer in list(layers)[len(layers) - s.top_layers:]:
        layer.requires_grad_(True)
    base = model.base_model
    for after_blocks in ("pooler", "ln_f"):  # what sits between the blocks and the head
        if getattr(base, after_blocks, None) is not None:
            getattr(base, after_blocks).requires_grad_(True)


def _attach_houlsby(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, False)
    add_houlsby(model, s.bottleneck)


def _attach_prefix(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, False)
    add_prefix(model, s.prompt)


def _attach_mam(model: nn.Module, s: AdapterConfig) -> None:
    _attach_prefix(model, s)
    add_parallel_ffn(model, s.bottleneck)


def _attach_peft(model: nn.Module, s: AdapterConfig) -> None:
    inject_peft(model, s.peft, list(s.targets) if s.targets else None)


def _attach_sparse(model: nn.Module, s: AdapterConfig) -> None:
    _freeze_all_but(model, s.method != "pst")  # MaP and MvP train every weight, as their papers did
    inject_sparse_training(model, s.sparse_training, s.method)


@dataclass(frozen=True)
class TuningMethod:
    """A fine-tuning method, declared once: the rest of the code reads these attributes."""

    name: str
    title: str  # what phase I is called on the terminal
    attach: Callable[[nn.Module, AdapterConfig], None]  # what trains, and what is added to the model
    merges: bool  # the tuned model is a plain HF model again (export/merged)
    prompts: bool = False  # adds virtual tokens to every layer (no head pruning)
    sparse_training: bool = False  # prunes while it trains, on the cubic schedule (no pruning phase)
    # adds a ΔW layer on the targets, DSEELinear or a PEFT method's (|ΔW| pruning criteria, head scores)
    delta: bool = False
    peft: bool = False  # PEFT's method, adapter.peft (export/adapter is also in PEFT's format)
    # The method's usual peak learning rate (both phases), used unless the command line, a recipe or a
    # profile sets trainer.<phase>.lr, or the task names one for this method (task.per_method).
    # None: the task's own rate (Table 11), which the paper tuned for LoRA / DSEE.
    lr: float | None = None
    sparse: bool = False  # ΔW has a sparse part P_Ω(S) on positions Ω found before training (dsee, rosa)


TUNING_METHODS: dict[str, TuningMethod] = {}


def register(method: TuningMethod) -> TuningMethod:
    """Declare a tuning method (adapter.method): one call, in one place."""
    TUNING_METHODS[method.name] = method
    return method


# Usual rates, as the methods' papers ran BERT-sized models: full fine-tuning 2e-5 (BERT, RoBERTa),
# BitFit 1e-3 (Ben Zaken et al.), FT-top and prefix tuning 1e-4 (LoRA's GPT-2 baselines; Li & Liang),
# P-tuning v2 5e-3 (Liu et al.), Houlsby 3e-4 (LoRA's RoBERTa adapters), MAM 1e-4 (He et al.),
# PST 5e-4 (PST's search grid), MaP / MvP 3e-5 (full fine-tuning with a mask; Sanh et al.).
for _method in (
    TuningMethod("dsee", "sparse + low-rank tuning", _attach_lowrank, merges=True, delta=True, sparse=True),
    # RoSA (Nikdan et al. 2024): DSEE's ΔW with Ω from gradients (omega=fisher); its rate 2e-4 (S), B·A at lora_lr
    TuningMethod("rosa", "RoSA: low-rank + gradient-chosen sparse tuning", _attach_lowrank, merges=True, delta=True,
                 sparse=True, lr=2e-4),
    TuningMethod("lora", "low-rank tuning", _attach_lowrank, merges=True, delta=True),
    TuningMethod("full", "full fine-tuning", lambda model, s: _freeze_all_but(model, True), merges=True, lr=2e-5),
    TuningMethod("bitfit", "BitFit: biases only", _attach_bitfit, merges=True, lr=1e-3),
    TuningMethod("ft-top", "fine-tuning the top blocks", _attach_ft_top, merges=True, lr=1e-4),
    TuningMethod("houlsby", "bottleneck adapters", _attach_houlsby, merges=False, lr=3e-4),
    TuningMethod("prefix", "prefix tuning", _attach_prefix, merges=False, prompts=True, lr=1e-4),
    TuningMethod("ptuning-v2", "P-tuning v2", _attach_prefix, merges=False, prompts=True, lr=5e-3),
    TuningMethod("mam", "MAM adapter", _attach_mam, merges=False, prompts=True, lr=1e-4),
    TuningMethod("pst", "PST sparse training on the cubic schedule", _attach_sparse, merges=True,
                 sparse_training=True, lr=5e-4),
    TuningMethod("map", "fine-tuning with magnitude pruning", _attach_sparse, merges=True, sparse_training=True,
                 lr=3e-5),
    TuningMethod("mvp", "fine-tuning with movement pruning", _attach_sparse, merges=True, sparse_training=True,
                 lr=3e-5),
):
    register(_method)

# PEFT's methods, each one entry here and one conf/adapter yaml (which sets adapter.peft). The rates are the
# task's (tuned for LoRA) except VeRA's, whose paper trains its scaling vectors at 4e-3 to 1e-2 (RoBERTa).
for _name, _title, _lr in (
    ("peft", "a PEFT method (adapter.peft)", None),
    ("dora", "DoRA (PEFT): weight-decomposed low-rank tuning", None),
    ("shira", "SHiRA (PEFT): a fixed sparse high-rank adapter", None),
    ("hira", "HiRA (PEFT): W0 ⊙ B·A, high-rank", None),
    ("adalora", "AdaLoRA (PEFT): SVD-shaped ranks on a budget", None),
    ("vera", "VeRA (PEFT): shared random projections, trained scales", 4e-3),
    ("loha", "LoHa (PEFT): Hadamard product of low-rank pairs", None),
    ("lokr", "LoKr (PEFT): Kronecker product of low-rank factors", None),
):
    register(TuningMethod(_name, _title, _attach_peft, merges=True, delta=True, peft=True, lr=_lr))


def prepare_method(model: nn.Module, s: AdapterConfig) -> None:
    """Set up the model for training with method ``s.method`` (in place)."""
    s.check()
    s.tuning_method.attach(model, s)
    for _, p in task_head_params(model):  # the task head (and weights the checkpoint lacked) always trains
        p.requires_grad_(True)
