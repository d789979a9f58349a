"""Where a run reports: Weights & Biases (offline by default) and the terminal (rich)."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dsee_cli.errors import choice_error
from dsee_cli.run.train import ProgressSink

LOGGER_BACKENDS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """The ``logger`` section: where a run's curves and summary go."""

    backend: str = "wandb"  # wandb or none
    mode: str = "offline"  # online needs WANDB_API_KEY (or `wandb login`)
    project: str = "dsee-cli"  # W&B project
    entity: str | None = None  # W&B entity (team or user)
    group: str | None = None  # default: the run's name
    tags: list[str] = field(default_factory=list)  # W&B tags

    def check(self) -> None:
        if self.backend not in LOGGER_BACKENDS:
            raise choice_error("logger (logger=...)", self.backend, LOGGER_BACKENDS)
        if self.mode not in LOGGER_MODES:
            raise choice_error("W&B mode (logger.mode)", self.mode, LOGGER_MODES)

log = logging.getLogger("dsee")
console = Console(stderr=False)


class Tracker:
    """A thin wrapper over a W&B run; backend "none" (or mode "disabled") does nothing."""

    def __init__(self, backend: str, mode: str, project: str, entity: str | None, group: str | None,
                 name: str, tags: list[str], config: dict, run_dir: Path):
        self.run = None
        if backend != "wandb" or mode == "disabled":
            return
        import wandb

        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
            log.warning("logger.mode=online but no W&B key is set: logging offline instead (wandb sync later)")
            mode = "offline"
        self.run = wandb.init(
            project=project, entity=entity, group=group, name=name, tags=tags or None, config=config,
            dir=str(run_dir), mode=mode, reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, values: dict) -> None:
        if self.run is not None:
            self.run.log(values)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


class PlainProgress:
    """For logs read later (SLURM, nohup, CI): one line every ``every`` seconds, and at the end,
    to the console and dsee.log: phase, step/total, epoch, loss, lr, steps/s, ETA."""

    def __init__(self, phase: str, total: int, done: int, per_epoch: int, every: float):
        self.phase, self.total, self.step, self.per_epoch, self.every = phase, total, done, per_epoch, every
        self.first_step = done
        self.started = self.last = time.monotonic()

    def advance(self, loss: float, lr: float) -> None:
        self.step += 1
        now = time.monotonic()
        if now - self.last >= self.every or self.step == self.total:
            self.last = now
            log.info(self.line(loss, lr, now))

    def line(self, loss: float, lr: float, now: float) -> str:
        rate = (self.step - self.first_step) / max(now - self.started, 1e-9)
        parts = [f"{self.phase}", f"step {self.step}/{self.total}"]
        if self.per_epoch:
            parts.append(f"epoch {self.step / self.per_epoch:.2f}/{self.total / self.per_epoch:.2f}")
        if math.isfinite(loss):
            parts += [f"loss {loss:.4f}", f"lr {lr:.2e}"]
        parts += [f"{rate:.2f} steps/s", f"ETA {_duration((self.total - self.step) / rate if rate else math.inf)}"]
        return "  ".join(parts)


class RichSink(ProgressSink):
    """A progress bar with loss, lr and it/s on a terminal, plain timed lines otherwise; every
    logged value (per-step loss and lr, evaluations) also goes to the tracker."""

    def __init__(self, tracker: Tracker, log_every_seconds: float = 30.0, interactive: bool | None = None):
        self.tracker = tracker
        self.every = log_every_seconds
        self.interactive = console.is_terminal if interactive is None else interactive
        self.progress: Progress | None = None
        self.plain: PlainProgress | None = None
        self.task = None
        self.phase = ""

    def start(self, phase: str, total: int, done: int, per_epoch: int = 0) -> None:
        self.phase = phase
        if not self.interactive:
            self.plain = PlainProgress(phase, total, done, per_epoch, self.every)
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]}"),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(phase, total=total, completed=done, loss=float("nan"), lr=0.0,
                                           speed="")

    def advance(self, loss: float, lr: float) -> None:
        if self.plain is not None:
            self.plain.advance(loss, lr)
            return
        task = self.progress.tasks[0]
        speed = f"{task.speed:.1f} it/s" if task.speed else ""
        self.progress.update(self.task, advance=1, loss=loss, lr=lr, speed=speed)

    def log(self, values: dict, step: int) -> None:
        self.tracker.log({**values, f"{self.phase}/step": step})
        evals = {k: v for k, v in values.items() if not k.endswith(("/loss", "/lr"))}
        if evals:
            log.info("step %d: %s", step, ", ".join(f"{k}={v:.2f}" for k, v in evals.items()))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.plain = None


class ConsoleFilter(logging.Filter):
    """Keeps records marked file_only (the banners, already drawn as rules) off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def banner(text: str) -> None:
    """A stage as a rule across the terminal; an indented line (a stage's detail) as plain text under it."""
    if text.startswith("  "):
        console.print(text, highlight=False)
    else:
        console.rule(f"[bold cyan]{text}")
    log.info(text.strip(), extra={"file_only": True})


def failures_table(failures: list[dict], sweep_dir: str) -> Table:
    table = Table(title=f"{len(failures)} failed job(s) in {sweep_dir} (failed.json in each; rerun the "
                        f"sweep to retry them)", title_justify="left")
    table.add_column("job", overflow="fold")
    table.add_column("stage")
    table.add_column("error", overflow="fold")
    for f in failures:
        table.add_row(f["job"], f.get("stage", ""), f"{f.get('type', '')}: {f.get('error', '')}")
    return table


def results_table(metrics: dict) -> Table:
    table = Table(title=f"dsee-cli results — {metrics['task']}", show_lines=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    final = metrics["final"]
    for key, value in (final.get("best") or {}).items():
        if key != "step":
            table.add_row(f"best {key}", f"{value:.2f}")
    for key, value in (final.get("last") or {}).items():
        if key != "step":
            table.add_row(f"last {key}", f"{value:.2f}")
    for key, value in {**(final.get("eval") or {}), **(final.get("generation") or {})}.items():
        if isinstance(value, (int, float)) and not key.endswith(("/windows", "/seq_len")):
            table.add_row(f"final {key}", f"{value:.2f}")
    if final.get("weights"):
        table.add_row("weights kept and exported", final["weights"])
    tp = metrics["trainable_params"]
    table.add_row("trainable (adapter / task head)", f"{tp['adapter']:,} / {tp['task_head']:,}")
    table.add_row("total params (pruning scope)", f"{metrics['total_params_pct']:.2f} %")
    table.add_row("non-zero params (whole model)", f"{metrics['model_nonzero_pct']:.2f} %")
    table.add_row(f"FLOPs ratio (L={metrics['flops_seq_len']}, merged / unmerged)",
                  f"{metrics['flops_ratio']:.3f}x / {metrics['flops_ratio_unmerged']:.3f}x")
    reused = set((metrics.get("cost") or {}).get("reused_phases") or [])
    sources = {r.get("source", "") for r in (metrics.get("steps") or {}).values() if r.get("reused")}
    for phase, seconds in metrics["seconds"].items():
        if phase in reused or (phase == "recovery" and reused - {"phase1"}):
            table.add_row(f"time {phase} (reused, not spent here)", f"{seconds:.1f} s")
        else:
            table.add_row(f"time {phase}", f"{seconds:.1f} s")
    if reused:
        table.add_row("reused steps computed in", ", ".join(sorted(sources)) or "?")
    cost = metrics.get("cost") or {}
    if cost:
        table.add_row("training peak memory / optimizer state",
                      f"{cost['peak_memory_bytes'] / 2**20:,.0f} / {cost['optimizer_bytes'] / 2**20:,.1f} MiB")
    savings = metrics.get("savings") or {}
    if savings:
        speed = savings["speedup"]
        table.add_row("inference speed-up vs dense (batch 1 / 32)",
                      " / ".join(f"{speed[k]:.2f}x" for k in ("batch1", "batch32") if k in speed))
        table.add_row("inference memory vs dense (batch 32)", f"{savings['memory_ratio']:.2f}x")
        for name in ("export_merged", "export_compressed"):
            if f"{name}_ratio" in savings:
                table.add_row(f"{name.replace('_', '/')} size vs dense", f"{savings[f'{name}_ratio']:.2f}x")
    return table
