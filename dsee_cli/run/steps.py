"""Finished steps of runs, shared between runs: phase I, and each round of IMP.

Runs of one sweep often share their first steps: `table3`'s dsee-80 / 70 / 50 train the same
phase I and differ from pruning on; `table14`'s 4-round job repeats the 1-, 2- and 3-round jobs.
A finished step's state (the run's checkpoint at that moment: trained tensors, masks, optimizer
and RNG state, history) is stored under a fingerprint of exactly the settings it depends on, in
``$DSEE_CACHE/steps`` (default ``~/.cache/dsee-cli/steps``), and any later run whose plan has the
same step starts from it: exact resume makes the result the one it would have computed.

- An entry is a directory ``<step>-<fingerprint>/`` with ``meta.json``, one ``state-*.safetensors``
  and ``entry.json`` (format version, SHA-256 of the state file, where it was computed). It is
  written under a temporary name and renamed into place, so a crash leaves no entry.
- Two runs that need one step at once compute it once: the first holds ``<step>-<fp>.lock``
  (flock, released if the process dies) while it computes; the second waits, then reads.
- An entry that fails its checks (format, checksum, unreadable) is removed and recomputed.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import dsee_cli
from dsee_cli.atomic import atomic_write_text, fsync_dir, fsync_file
from dsee_cli.config import RunConfig
from dsee_cli.core.cache import cache_root
from dsee_cli.core.devices import device_type
from dsee_cli.core.precision import resolve_precision
from dsee_cli.run.checkpoint import HOW_IT_RUNS, STATE_META, load_state_dir

log = logging.getLogger("dsee")
STEP_FORMAT = 2  # bump when what a step's state means changes: older entries are then recomputed
ENTRY = "entry.json"


def steps_dir() -> Path:
    return cache_root() / "steps"


def _outcome_independent(d: dict) -> dict:
    """The config without what never changes a step's numbers (where and how it runs, what it
    writes afterwards, what it is called)."""
    for key in ("logger", "resume", "measure", "export", "name", "flops_seq_len", "per_task", "reuse"):
        d.pop(key, None)
    for key in ("checkpoint_every", "device", "threads", "log_every_seconds", *HOW_IT_RUNS):
        d["trainer"].pop(key, None)
    for key in ("cache", "cache_dir"):
        d["omega"].pop(key, None)
    return d


def step_fingerprint(cfg: RunConfig, step: str) -> str:
    """What ``step`` (``phase1`` or IMP's ``round<r>``) depends on, hashed. Phase I: the model,
    task and data slice, the adapter, Ω, the seed and phase I's trainer settings; not the pruning,
    recovery or export settings (except EarlyBERT's slimming, which trains in phase I, and the
    sparsity and schedule that PST / MaP / MvP prune to while they train). IMP round r: phase I's
    and the pruning settings but the number of rounds, so round r of a 4-round job is round r
    of an r-round job. Where it runs counts as far as it changes the numbers: the device type
    and the resolved precision (``numerics``), not which GPU or how many."""
    d = _outcome_independent(asdict(cfg))
    if step == "phase1":
        d["trainer"].pop("recovery")
        d["task"].pop("recovery_lr")
        d["task"].pop("recovery_epochs")
        if not cfg.adapter.tuning_method.sparse_training:
            d.pop("sparsity")
            d["adapter"].pop("sparse_training")
        d["pruning"] = {"slimming_l1": cfg.pruning.slimming_l1} if cfg.pruning.pruner.slimming else {}
    elif step.startswith("round"):
        d["pruning"].pop("rounds")
    else:
        raise ValueError(f"unknown step {step!r}")
    d["computed_with"] = numerics(cfg)
    d["trainer"].pop("precision")
    if cfg.adapter.tuning_method.peft:  # PEFT's methods are PEFT's code: another release may train otherwise
        d["peft_version"] = importlib.metadata.version("peft")
    else:
        d["adapter"].pop("peft")
    payload = json.dumps({"format": STEP_FORMAT, "results": dsee_cli.results_version(), "step": step, "config": d},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def numerics(cfg: RunConfig) -> dict[str, str]:
    """What changes a step's numbers about where it runs: the device type and the precision that
    trainer.precision resolves to there (auto: fp32 on a CPU, bf16-mixed on a recent GPU)."""
    kind = device_type(cfg.trainer.device)
    return {"device_type": kind,
            "precision": resolve_precision(cfg.trainer.precision, torch.device(kind), cfg.model.dtype).name}


@dataclass
class StepRecord:
    """What metrics.json says of a step: computed here or reused, and under which fingerprint."""

    fingerprint: str
    reused: bool
    source: str = ""  # the run directory that computed it

    def as_dict(self) -> dict:
        return asdict(self)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StepStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else steps_dir()

    def path(self, step: str, fingerprint: str) -> Path:
        return self.root / f"{step}-{fingerprint}"

    def lock(self, step: str, fingerprint: str) -> StepLock:
        return StepLock(self.root / f"{step}-{fingerprint}.lock")

    def load(self, step: str, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict, dict] | None:
        """(tensors, checkpoint meta, entry info) of a stored step, or None. A damaged or
        incompatible entry is removed, with one log line, so that the step is recomputed."""
        path = self.path(step, fingerprint)
        if not path.is_dir():
            return None
        try:
            entry = json.loads((path / ENTRY).read_text())
            if entry.get("format") != STEP_FORMAT:
                raise ValueError(f"format {entry.get('format')}, this version reads {STEP_FORMAT}")
            if entry.get("version") != dsee_cli.results_version():
                raise ValueError(f"computed by dsee-cli {entry.get('version')}, this is {dsee_cli.results_version()}")
            state = path / json.loads((path / STATE_META).read_text())["state_file"]
            if _sha256(state) != entry["sha256"]:
                raise ValueError("its checksum does not match")
            tensors, meta = load_state_dir(path)
        except Exception as exc:
            log.warning("step %s-%s in %s is unusable (%s): removed, it will be computed again",
                        step, fingerprint, self.root, exc)
            shutil.rmtree(path, ignore_errors=True)
            return None
        return tensors, meta, entry

    def publish(self, step: str, fingerprint: str, checkpoint_dir: Path, meta: dict, source: Path) -> None:
        """Store a finished step: the checkpoint's state file and ``meta`` (its meta.json, with
        phase names made independent of the run's length). Written aside, then renamed in."""
        target = self.path(step, fingerprint)
        if target.is_dir():
            return
        state_name = meta["state_file"]
        tmp = self.root / f".tmp-{step}-{fingerprint}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            shutil.copyfile(Path(checkpoint_dir) / state_name, tmp / state_name)
            fsync_file(tmp / state_name)
            atomic_write_text(tmp / STATE_META, json.dumps(meta, indent=2, sort_keys=True))
            atomic_write_text(tmp / ENTRY, json.dumps({
                "format": STEP_FORMAT, "version": dsee_cli.results_version(), "step": step, "fingerprint": fingerprint,
                "sha256": _sha256(tmp / state_name),
                "source": str(source), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
            os.rename(tmp, target)
            fsync_dir(self.root)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def entries(self) -> list[dict]:
        """Every stored step: its name, size, age, the version that computed it and where."""
        out, current = [], dsee_cli.results_version()
        for path in sorted(self.root.glob("*-*")) if self.root.is_dir() else []:
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                entry = json.loads((path / ENTRY).read_text())
            except (OSError, ValueError):
                entry = {}
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            out.append({"name": path.name, "step": entry.get("step", "?"), "bytes": size,
                        "version": entry.get("version", "older"), "current": entry.get("version") == current,
                        "created": entry.get("created", "?"), "source": entry.get("source", "?"),
                        "age_days": (time.time() - path.stat().st_mtime) / 86400, "path": path})
        return out

    def prune(self, older_than_days: float | None = None, stale_only: bool = False) -> list[dict]:
        """Remove entries (all; those older than ``older_than_days``; or with ``stale_only`` those another
        version of the code computed, which are never reused) and leftovers of killed writes."""
        removed = [e for e in self.entries() if (older_than_days is None or e["age_days"] > older_than_days)
                   and not (stale_only and e["current"])]
        for e in removed:
            shutil.rmtree(e["path"], ignore_errors=True)
        for leftover in self.root.glob(".tmp-*") if self.root.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        return removed


class StepLock:
    """An exclusive flock on a step's lock file; a process that dies releases it."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def acquire(self, on_wait=lambda: None) -> StepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
