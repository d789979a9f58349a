"""Where a run reports: Weights & Biases (offline by default) and the terminal (rich)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .train import ProgressSink

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


class RichSink(ProgressSink):
    """A progress bar with loss, lr and it/s; every logged value also goes to the tracker."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.progress: Progress | None = None
        self.task = None
        self.phase = ""

    def start(self, phase: str, total: int, done: int) -> None:
        self.phase = phase
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]}"),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(phase, total=total, completed=done, loss=float("nan"), lr=0.0,
                                           speed="")

    def advance(self, loss: float, lr: float) -> None:
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


class ConsoleFilter(logging.Filter):
    """Keeps records marked file_only (the banners, already drawn as rules) off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def banner(text: str) -> None:
    console.rule(f"[bold cyan]{text}")
    log.info(text, extra={"file_only": True})


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
    tp = metrics["trainable_params"]
    table.add_row("trainable (adapter / task head)", f"{tp['adapter']:,} / {tp['task_head']:,}")
    table.add_row("total params (pruning scope)", f"{metrics['total_params_pct']:.2f} %")
    table.add_row("non-zero params (whole model)", f"{metrics['model_nonzero_pct']:.2f} %")
    table.add_row(f"FLOPs ratio (L={metrics['flops_seq_len']}, merged / unmerged)",
                  f"{metrics['flops_ratio']:.3f}x / {metrics['flops_ratio_unmerged']:.3f}x")
    for phase, seconds in metrics["seconds"].items():
        table.add_row(f"time {phase}", f"{seconds:.1f} s")
    return table
