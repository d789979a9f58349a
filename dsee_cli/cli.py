"""The `dsee` command. Hydra lives here and nowhere below.

    dsee train [hydra overrides...]      one run, or a sweep with -m
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path

USAGE = """usage: dsee <command> [options]

commands:
  train    run DSEE (Ω → sparse + low-rank tuning → pruning → recovery → export) with Hydra
           overrides, e.g. `dsee train task=rte sparsity=0.3`; `dsee train --help` lists the
           config groups and their options; `-m` runs a sweep.
  report   `dsee report <sweep dir> [--table NAME]`: a sweep's runs as the paper's table, the
           median over seeds beside the paper's number; writes report-<table>.md and .csv.
"""
COMMANDS = ("train", "report")


def config_dir() -> Path:
    """conf/ ships inside the wheel as dsee_cli/conf; in a source checkout it is ../conf."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"dsee-cli's conf/ directory is missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


def dirname_for(overrides: str) -> str:
    """A run directory name from the overrides: safe characters, bounded length."""
    if not overrides:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,.+_@-]", "_", overrides)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(overrides.encode()).hexdigest()[:12]
    return name


def _register() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from .config import RunConfig

    ConfigStore.instance().store(name="config_schema", node=RunConfig)
    if not OmegaConf.has_resolver("dsee_dirname"):
        OmegaConf.register_new_resolver("dsee_dirname", dirname_for)


def _default_group(name: str) -> str:
    import os

    sweep = os.environ.get("DSEE_SWEEP_GROUP")
    return f"{name}/{sweep}" if sweep else name


def train_job(cfg) -> float | None:
    """The Hydra task: typed config in, metrics.json out. Returns the main metric (for sweepers)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .errors import DSEEError
    from .pipeline import preflight, run_experiment
    from .tracking import RichSink, Tracker, banner, console, results_table

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    typed = OmegaConf.to_object(cfg)
    tracker = None
    try:
        preflight(typed)
        tracker = Tracker(
            typed.logger.backend, typed.logger.mode, typed.logger.project, typed.logger.entity,
            typed.logger.group or _default_group(typed.name), run_dir.name, list(typed.logger.tags),
            OmegaConf.to_container(cfg, resolve=True), run_dir,
        )
        metrics = run_experiment(typed, run_dir, RichSink(tracker), say=banner)
    except DSEEError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        logging.getLogger("dsee").error("%s", exc, extra={"file_only": True})
        if tracker is not None:
            tracker.finish(exit_code=2)
        raise SystemExit(2) from None
    except BaseException:
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    tracker.summary({"metrics": metrics["final"], "trainable_params": metrics["trainable_params"],
                     "total_params_pct": metrics["total_params_pct"], "flops_ratio": metrics["flops_ratio"]})
    tracker.finish()
    console.print(results_table(metrics))
    console.print(f"metrics: {run_dir / 'metrics.json'}")
    best = metrics["final"].get("best") or {}
    return best.get(metrics["main_metric"])


def sweep_group(args: list[str]) -> str | None:
    """A W&B group shared by every job of one sweep command (the same command, the same group)."""
    if not {"-m", "--multirun"} & set(args):
        return None
    return "sweep-" + hashlib.sha1(" ".join(sorted(args)).encode()).hexdigest()[:10]


def run_train(args: list[str]) -> None:
    import os

    import hydra

    _register()
    group = sweep_group(args)
    if group:  # inherited by launcher workers (joblib, submitit)
        os.environ["DSEE_SWEEP_GROUP"] = group
    sys.argv = ["dsee train", *args]
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(train_job)()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dsee: unknown command {command!r}. Valid commands: {', '.join(COMMANDS)}.\n\n{USAGE}",
              file=sys.stderr)
        return 2
    if command == "report":
        return run_report(rest)
    run_train(rest)
    return 0


def run_report(args: list[str]) -> int:
    import argparse

    from rich.console import Console
    from rich.markdown import Markdown

    from .errors import DSEEError
    from .report import build_report, write_report

    parser = argparse.ArgumentParser(prog="dsee report", description="A sweep's runs as the paper's table.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--table", default=None, help="which paper table to compare with (default: the sweep's name)")
    opts = parser.parse_args(args)
    try:
        report = build_report(opts.sweep_dir, opts.table)
    except DSEEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_report(report, opts.sweep_dir)
    Console().print(Markdown(report.markdown()))
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
