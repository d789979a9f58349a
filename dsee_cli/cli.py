"""The `dsee` command. Hydra lives here and nowhere below.

    dsee train [hydra overrides...]      one run, or a sweep with -m
    dsee report <sweep dir>              a sweep as the paper's table
    dsee eval <run or export dir>        an export, evaluated again (and its predictions)
    dsee cache ls|size|prune             the steps runs share (phase I, IMP rounds) and Ω
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
  eval     `dsee eval <run dir | export dir> [--from merged|compressed|adapter] [--split validation|test]
           [--predictions FILE] [key=value ...]`: load what a run exported, evaluate it on the
           run's task (dotted overrides change it, e.g. task.data_dir=...), print the metrics.
  config   `dsee config [SECTION] [key=value ...]`: every setting (or one section's, e.g. trainer),
           its value for these overrides, and what it does.
  cache    `dsee cache ls | size | prune [--older-than DAYS]`: the finished steps (phase I, IMP
           rounds) that runs with the same settings reuse, and the Ω cache, in $DSEE_CACHE
           (default ~/.cache/dsee-cli); prune removes them (all, or those older than DAYS).
"""
COMMANDS = ("train", "report", "eval", "config", "cache")


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

    from dsee_cli.config import RunConfig

    ConfigStore.instance().store(name="config_schema", node=RunConfig)
    if not OmegaConf.has_resolver("dsee_dirname"):
        OmegaConf.register_new_resolver("dsee_dirname", dirname_for)


def _default_group(name: str) -> str:
    import os

    sweep = os.environ.get("DSEE_SWEEP_GROUP")
    return f"{name}/{sweep}" if sweep else name


def apply_per_task(cfg, command_line: list[str]):
    """The config with its ``per_task`` entry for this task merged in (typed: a misspelt key is an
    error), except the values the command line sets, which win; ``per_task`` is then emptied, so
    a run's config and fingerprint hold only what applies to it."""
    from omegaconf import OmegaConf

    patch = OmegaConf.to_container(cfg.per_task.get(cfg.task.name) or OmegaConf.create({}))
    for override in command_line:  # a value set on the command line (not a group choice) wins
        *parents, leaf = override.split("=", 1)[0].lstrip("+~").split(".")
        node = patch
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and not isinstance(node[leaf], dict):
            del node[leaf]
    cfg = OmegaConf.merge(cfg, patch)
    cfg.per_task = {}
    return cfg


def typed_config(overrides: list[str]):
    """The RunConfig `dsee train <overrides>` would run, composed outside a Hydra app (per_task applied)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    _register()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return OmegaConf.to_object(apply_per_task(compose(config_name="config", overrides=overrides), overrides))


def train_job(cfg) -> float | None:
    """The Hydra task: typed config in, metrics.json out. Returns the main metric (for sweepers).

    A job that fails writes failed.json in its run directory. In a sweep it then returns, so
    the sweep goes on to its next job (SweepOutcome reports the failures at the end); a single
    run exits non-zero: 2 for a user error (a DSEEError), 1 for anything else."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from dsee_cli.core.devices import threads_per_job
    from dsee_cli.core.dist import world_from_env
    from dsee_cli.errors import DSEEError
    from dsee_cli.reporting.tracking import RichSink, Tracker, banner, console, results_table
    from dsee_cli.run.pipeline import preflight, run_experiment, write_failure
    from dsee_cli.run.train import ProgressSink

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    cfg = apply_per_task(cfg, list(hc.overrides.task))
    typed = OmegaConf.to_object(cfg)
    world = world_from_env()
    side_by_side = parallel_jobs(hc) if in_sweep else 1
    if typed.trainer.devices > 1 and world.size == 1:
        return launch_job(typed, hc, run_dir, in_sweep, side_by_side)
    if not typed.trainer.threads and (in_sweep or world.size > 1):  # jobs and ranks side by side share the
        typed.trainer.threads = threads_per_job(side_by_side * world.local_size)  # cores: oversubscribed, each
        # is many times slower
    tracker = None
    stage = ["preflight"]

    def say(text: str) -> None:
        stage[0] = text
        if world.main:
            banner(text)

    log = logging.getLogger("dsee")
    try:
        preflight(typed)
        warn_before_work(typed, world.main)
        tracker = Tracker(
            typed.logger.backend if world.main else "none", typed.logger.mode, typed.logger.project,
            typed.logger.entity, typed.logger.group or _default_group(typed.name), run_dir.name,
            list(typed.logger.tags), OmegaConf.to_container(cfg, resolve=True), run_dir,
        )
        sink = RichSink(tracker, typed.trainer.log_every_seconds) if world.main else ProgressSink()
        metrics = run_experiment(typed, run_dir, sink, say=say)
    except Exception as exc:
        user_error = isinstance(exc, DSEEError)
        path = write_failure(run_dir, exc, stage[0], os.environ.get("DSEE_SWEEP_RUN"), world.rank, world.size > 1)
        if tracker is not None:
            tracker.finish(exit_code=2 if user_error else 1)
        if user_error:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            log.error("%s", exc, extra={"file_only": True})
        else:
            log.exception("the run failed during %r%s", stage[0], f" on rank {world.rank}" if world.size > 1 else "")
        if in_sweep:
            console.print(f"[bold red]job failed[/] ({path}); the sweep goes on", highlight=False)
            return None
        if user_error:
            raise SystemExit(2) from None
        raise
    except BaseException:  # Ctrl-C, SystemExit: stop, the sweep too
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    if not world.main:  # rank 0 reports
        tracker.finish()
        return None
    tracker.summary({"metrics": metrics["final"], **{k: metrics[k] for k in (
        "trainable_params", "total_params_pct", "flops_ratio", "cost", "savings")}})
    tracker.finish()
    console.print(results_table(metrics))
    console.print(f"metrics: {run_dir / 'metrics.json'}")
    best = metrics["final"].get("best") or {}
    return best.get(metrics["main_metric"])


def parallel_jobs(hc) -> int:
    """How many jobs of this sweep run side by side on this machine: joblib's n_jobs (negative:
    cores + 1 + n_jobs, as joblib counts); submitit_local runs them all (at most one per core counts);
    a cluster's job has its node to itself."""
    from dsee_cli.core.devices import available_cores

    launcher = hc.launcher
    target = str(launcher.get("_target_", ""))
    if "Joblib" in target:
        n = int(launcher.get("n_jobs") or -1)
        return max(1, available_cores() + 1 + n if n < 0 else n)
    if "LocalLauncher" in target and "submitit" in target:  # submitit runs a local sweep's jobs all at once
        return available_cores()
    return 1


def launch_job(typed, hc, run_dir: Path, in_sweep: bool, side_by_side: int) -> float | None:
    """``trainer.devices=K`` in a plain process: lease K GPUs (where there are any), start the K
    ranks (run.launch), and report as a single run would."""
    import json
    import os

    from dsee_cli.core.cache import cache_root
    from dsee_cli.core.devices import GpuLease, cuda_count, threads_per_job
    from dsee_cli.errors import DSEEError
    from dsee_cli.reporting.tracking import banner, console
    from dsee_cli.run.launch import launch_ranks, record_rank_failure
    from dsee_cli.run.pipeline import preflight

    k, lease = typed.trainer.devices, None
    try:
        preflight(typed)
        visible = cuda_count() if typed.trainer.device != "cpu" else 0
        if visible:
            lease = GpuLease(cache_root() / "devices").acquire(
                visible, k, typed.trainer.jobs_per_gpu,
                on_wait=lambda: banner(f"waiting for {k} free GPUs (of {visible})"))
        threads = typed.trainer.threads or threads_per_job(side_by_side * k)
        banner(f"One run on {k} processes ({'GPUs ' + ','.join(map(str, lease.gpus)) if lease else 'CPU, gloo'})")
        overrides = [*(o for o in hc.overrides.task if not o.startswith("trainer.threads=")),
                     f"trainer.threads={threads}"]
        result = launch_ranks(overrides, run_dir, k, lease.gpus if lease else None, typed.trainer.dist_timeout)
    except DSEEError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        if in_sweep:
            return None
        raise SystemExit(2) from None
    finally:
        if lease is not None:
            lease.release()
    if result.failed_rank is not None:
        path = record_rank_failure(run_dir, result, os.environ.get("DSEE_SWEEP_RUN"))
        console.print(f"[bold red]error:[/] {json.loads(path.read_text())['error']} ({path})", highlight=False,
                      soft_wrap=True)
        if in_sweep:
            return None
        raise SystemExit(1)
    metrics = json.loads((run_dir / "metrics.json").read_text())  # rank 0 printed its results table
    return (metrics["final"].get("best") or {}).get(metrics["main_metric"])


class SweepOutcome:
    """A Hydra callback: at the end of a sweep, list the jobs that failed in it (their
    failed.json carries this sweep invocation's id) and make the command exit non-zero."""

    failures: list[dict] = []

    def on_multirun_start(self, config, **kwargs) -> None:
        SweepOutcome.failures = []

    def on_multirun_end(self, config, **kwargs) -> None:
        import json
        import os

        from dsee_cli.reporting.tracking import failures_table

        invocation = os.environ.get("DSEE_SWEEP_RUN")
        found = []
        for path in sorted(Path(str(config.hydra.sweep.dir)).glob("*/failed.json")):
            record = json.loads(path.read_text())
            if invocation is None or record.get("sweep_run") == invocation:
                found.append({"job": path.parent.name, **record})
        SweepOutcome.failures = found
        if found:
            from dsee_cli.reporting.tracking import console

            console.print(failures_table(found, str(config.hydra.sweep.dir)))

    # the other hooks Hydra calls
    def on_run_start(self, config, **kwargs) -> None: ...
    def on_run_end(self, config, **kwargs) -> None: ...
    def on_job_start(self, config, **kwargs) -> None: ...
    def on_job_end(self, config, job_return, **kwargs) -> None: ...


def sweep_group(args: list[str]) -> str | None:
    """A W&B group shared by every job of one sweep command (the same command, the same group)."""
    if not {"-m", "--multirun"} & set(args):
        return None
    return "sweep-" + hashlib.sha1(" ".join(sorted(args)).encode()).hexdigest()[:10]


PAPER_PROFILE_EXCEPT = ("demo",)  # experiments that are not a paper table


def with_default_profile(args: list[str]) -> list[str]:
    """A paper table (experiment=table1, ...) runs as the paper ran it unless a profile is given:
    profile=paper. A single run keeps the tool's defaults (profile=tool). Hydra cannot let the
    experiment choose it, because the profile comes after the experiment in the defaults list."""
    experiment = next((a.split("=", 1)[1] for a in args if a.startswith("experiment=")), None)
    if experiment is None or experiment in PAPER_PROFILE_EXCEPT or any(a.startswith("profile=") for a in args):
        return args
    return ["profile=paper", *args]


def run_train(args: list[str]) -> int:
    import os
    import uuid

    import hydra

    _register()
    args = with_default_profile(args)
    from dsee_cli.core.dist import world_from_env

    if world_from_env().size > 1 and {"-m", "--multirun"} & set(args):
        print("error: torchrun (or SLURM tasks) run one run on several processes, not a sweep (-m). For a sweep "
              "whose jobs each use several GPUs, give the sweep trainer.devices=K: each job then starts its K "
              "processes.", file=sys.stderr)
        return 2
    if "--plan" in args:
        return print_plan([a for a in args if a != "--plan"])
    group = sweep_group(args)
    if group:  # inherited by launcher workers (joblib, submitit)
        os.environ["DSEE_SWEEP_GROUP"] = group
        os.environ["DSEE_SWEEP_RUN"] = uuid.uuid4().hex[:12]  # marks this invocation's failed.json files
    sys.argv = ["dsee train", *args]
    SweepOutcome.failures = []
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(train_job)()
    return 1 if SweepOutcome.failures else 0


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The overrides of each job `dsee train <args>` runs: one job, or with -m the product of
    the sweeper's params and the command line's comma lists (the command line wins)."""
    import itertools

    from hydra import compose, initialize_config_dir

    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if len(overrides) == len(args):
        return [overrides]
    fixed = [o for o in overrides if "," not in o.split("=", 1)[-1]]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    grid = {k: str(v).split(",") for k, v in (cfg.hydra.sweeper.params or {}).items()}
    for o in overrides:
        key, _, value = o.partition("=")
        if "," in value or key in grid:
            grid[key] = value.split(",")
    fixed = [o for o in fixed if o.partition("=")[0] not in grid]
    return [[*fixed, *(f"{k}={v.strip()}" for k, v in zip(grid, combo))] for combo in itertools.product(*grid.values())]


def warn_before_work(cfg, main: bool, console=None) -> None:
    """The plan's warnings (a configuration known to fail), on the terminal and in dsee.log, before any
    work: by the main process only. ``console``: --plan's (no run, no dsee.log), else the run's."""
    from dsee_cli.reporting.tracking import console as run_console
    from dsee_cli.run.plan import plan_warnings

    for warning in plan_warnings(cfg) if main else []:
        (console or run_console).print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        if console is None:
            logging.getLogger("dsee").warning("%s", warning, extra={"file_only": True})


def print_plan(args: list[str]) -> int:
    """`dsee train ... --plan`: each job's steps, and which the step store would let it reuse."""
    from rich.console import Console
    from rich.table import Table

    from dsee_cli.config import validate
    from dsee_cli.errors import DSEEError
    from dsee_cli.run.pipeline import ModelUnavailable, shape_plan
    from dsee_cli.run.plan import build_plan, will_reuse
    from dsee_cli.run.steps import StepStore

    console = Console(width=None if sys.stdout.isatty() else 100)
    store, computed = StepStore(), set()
    jobs = sweep_jobs(args)
    total = {"all": 0, "computed": 0}
    try:
        for i, overrides in enumerate(jobs):
            cfg = typed_config(overrides)
            validate(cfg)
            plan = build_plan(cfg)
            reuse = will_reuse(plan, cfg, store, computed)
            swept = " ".join(o for o in overrides if o not in args) or " ".join(overrides) or "(defaults)"
            table = Table(title=f"job {i + 1} of {len(jobs)}: {swept}", title_justify="left")
            for column in ("step", "what", "optimizer steps", "store"):
                table.add_column(column, justify="right" if column == "optimizer steps" else "left")
            for step in plan:
                status = "" if step.name not in reuse else ("reused" if reuse[step.name] else "computed, then shared")
                table.add_row(step.name, step.what, f"{step.optimizer_steps:,}" if step.optimizer_steps else "", status)
                total["all"] += step.optimizer_steps
                total["computed"] += 0 if reuse.get(step.name) else step.optimizer_steps
            console.print(table)
            try:
                shapes = shape_plan(cfg)
            except ModelUnavailable as exc:  # the plan runs offline; bad counts still fail here where it can look
                shapes = None
                console.print(f"structured pruning's shapes: decided once the model's config loads ({exc.why})",
                              highlight=False)
            if shapes is not None:
                console.print(f"structured pruning keeps {shapes.describe()}", highlight=False)
                for note in shapes.notes:
                    console.print(f"  rounded: {note}", highlight=False)
            warn_before_work(cfg, True, console)
    except DSEEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    saved = 1 - total["computed"] / total["all"] if total["all"] else 0.0
    console.print(f"{len(jobs)} job(s): {total['all']:,} optimizer steps, {total['computed']:,} to compute "
                  f"with the step store ({saved:.0%} reused); nothing was run.", highlight=False)
    return 0


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
    if command == "eval":
        return run_eval(rest)
    if command == "cache":
        return run_cache(rest)
    if command == "config":
        return run_config(rest)
    return run_train(rest)


def run_report(args: list[str]) -> int:
    import argparse
    import shutil

    from rich.console import Console

    from dsee_cli.errors import DSEEError
    from dsee_cli.reporting.plots import SPEED_FIGURES, speedup_figure, write_figure
    from dsee_cli.reporting.report import (
        LAYOUTS,
        TRIVIAL_LABEL,
        TRIVIAL_MEANING,
        build_report,
        terminal_tables,
        write_report,
    )

    parser = argparse.ArgumentParser(prog="dsee report", description="A sweep's runs as the paper's table.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--table", default=None, help="which paper table to compare with (default: the sweep's name)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="wide: the paper's rows × columns; long: one row per row × task; auto: wide if it fits")
    opts = parser.parse_args(args)
    try:
        report = build_report(opts.sweep_dir, opts.table)
    except DSEEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_report(report, opts.sweep_dir)
    png = opts.sweep_dir / f"report-{report.table}.png"
    figure, why = write_figure(report, png)
    width = Console().width if sys.stdout.isatty() else shutil.get_terminal_size((100, 24)).columns
    console = Console(width=width)
    _, tables = terminal_tables(report, width, opts.layout)
    for table in tables:
        console.print(table)
    if report.note:
        console.print(f"paper: {report.note}", highlight=False)
    if report.protocol:
        console.print(report.protocol_line(), highlight=False)
    if report.trivial:
        console.print(f"{TRIVIAL_LABEL}: {TRIVIAL_MEANING}", highlight=False)
    if report.serving:
        console.print(f"serving: {report.serving}", highlight=False)
    if figure is not None:
        written.append(png)
        if figure.caption:
            console.print(f"figure: {figure.caption}", highlight=False)
    else:
        png.unlink(missing_ok=True)
        console.print(f"no figure: {why}", highlight=False)
    if report.table in SPEED_FIGURES:
        speed_png = opts.sweep_dir / f"report-{report.table}-speed.png"
        speed, why = write_figure(report, speed_png, speedup_figure)
        if speed is not None:
            written.append(speed_png)
        else:
            speed_png.unlink(missing_ok=True)
            console.print(f"no speed figure: {why}", highlight=False)
    console.print(f"written in {opts.sweep_dir}: " + ", ".join(p.name for p in written), highlight=False,
                  soft_wrap=True)
    return 0


def eval_config(saved: dict, overrides: list[str]):
    """The run's config (from its metrics.json) with dotted overrides, typed by the schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dsee_cli.config import RunConfig
    from dsee_cli.errors import DSEEError

    bad = [o for o in overrides if "=" not in o or o.startswith(("+", "~", "-"))]
    if bad:
        raise DSEEError(f"dsee eval takes overrides as key=value with dotted keys (task.data_dir=..., "
                        f"trainer.device=cpu); got {' '.join(bad)}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), saved, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise DSEEError(f"Invalid override for dsee eval: {str(exc).splitlines()[0]}. Keys are those of "
                        f"`dsee train --cfg job` (task.data_dir, task.max_eval_samples, trainer.device).") from None


def run_eval(args: list[str]) -> int:
    import argparse

    from dsee_cli.errors import DSEEError

    parser = argparse.ArgumentParser(
        prog="dsee eval", description="Evaluate what a run exported (export/merged, or export/adapter re-applied "
                                      "onto the pretrained model) on the run's task.")
    parser.add_argument("path", type=Path, help="a run directory, or its export/merged or export/adapter folder")
    parser.add_argument("--from", dest="source", choices=("merged", "compressed", "adapter"), default=None,
                        help="which export (default: the folder given, else merged where the run wrote one)")
    parser.add_argument("--split", choices=("validation", "test"), default=None,
                        help="evaluation split (default: the run's: validation, or task.eval_split for generation)")
    parser.add_argument("--predictions", default=None,
                        help="write one prediction per example: a file, or a folder for GLUE's submission names")
    parser.add_argument("--lm-eval", dest="lm_eval", default=None, metavar="TASKS",
                        help="decoders: also zero-shot accuracy through lm-eval-harness, comma-separated, e.g. "
                             "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa (pip install "
                             "'dsee-cli[llm]'; task.lm_eval_include=<folder of task YAMLs> for local tasks)")
    parser.add_argument("--speed", action="store_true",
                        help="decoders: time export/merged against the dense model instead of evaluating (prefill "
                             "of task.seq_len tokens, decode of 128 with the KV cache, batch 1 and 16); written to "
                             "metrics.json as savings.serving")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. task.data_dir=/path/to/glue")
    opts = parser.parse_intermixed_args(args)
    if opts.speed:
        return run_speed(opts.path, opts.overrides)
    try:
        from rich.table import Table

        from dsee_cli.reporting.tracking import banner, console
        from dsee_cli.run.evaluation import evaluate_export, find_run, pick_source, run_metrics
        from dsee_cli.run.pipeline import preflight

        run_dir = find_run(opts.path)
        cfg = eval_config(run_metrics(run_dir)["config"], opts.overrides)
        cfg.logger.backend = "none"
        if opts.lm_eval:
            cfg.task.lm_eval = [t.strip() for t in opts.lm_eval.split(",") if t.strip()]
        preflight(cfg)
        source, export_dir = pick_source(opts.path, run_dir, opts.source)
        result = evaluate_export(cfg, run_dir, source, export_dir, opts.split, opts.predictions, say=banner)
    except DSEEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = Table(title=f"dsee eval — {cfg.task.name}, export/{result.source}, {result.split} "
                        f"({result.examples} examples)")
    table.add_column("metric")
    table.add_column("export", justify="right")
    table.add_column("run (final.eval)", justify="right")
    for key, value in result.metrics.items():
        ref = result.reference.get(key)
        table.add_row(key, f"{value:.4f}", "" if ref is None else f"{ref:.4f}")
    if not result.metrics:
        table.add_row("(unlabelled split: predictions only)", "", "")
    console.print(table)
    for path in result.predictions:
        console.print(f"predictions: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run_speed(path: Path, overrides: list[str]) -> int:
    """`dsee eval <run> --speed`: the export timed against the dense model; the numbers go to the
    run's metrics.json (savings.serving), written atomically."""
    import json

    from dsee_cli.atomic import atomic_write_text
    from dsee_cli.core.cache import cache_root
    from dsee_cli.core.devices import pick_device
    from dsee_cli.errors import DSEEError
    from dsee_cli.reporting.tracking import banner, console
    from dsee_cli.run.evaluation import find_run, measure_export_speed, run_metrics

    try:
        run_dir = find_run(path)
        metrics = run_metrics(run_dir)
        cfg = eval_config(metrics["config"], overrides)
        device, _ = pick_device(cfg.trainer.device, cache_root() / "devices", cfg.trainer.jobs_per_gpu, say=banner)
        serving = measure_export_speed(cfg, run_dir, device, say=banner)
    except DSEEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics.setdefault("savings", {})["serving"] = serving
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True, default=str))
    console.print(serving_table(serving, f"dsee eval --speed — export/merged vs dense on {serving['device']} "
                                         f"({serving['dtype']})"))
    return 0


def serving_table(s: dict, title: str):
    """savings.serving as a table: tokens per second of the export and the dense model, and the speed-up."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("measured", "export tok/s", "dense tok/s", "speed-up"):
        table.add_column(column, justify="left" if column == "measured" else "right")
    for what, label in (("prefill", f"prefill {s['prompt_tokens']} tokens"), ("decode", f"decode {s['new_tokens']}")):
        for batch, row in s[what].items():
            table.add_row(f"{label}, {batch.replace('batch', 'batch ')}", f"{row['tokens_per_second']:,.0f}",
                          f"{row['dense_tokens_per_second']:,.0f}", f"{row['speedup']:.2f}×")
    table.add_row("FLOPs per token (blocks + LM head)", "", "", f"{1 / s['flops_ratio']:.2f}× fewer")
    table.add_row("parameters", f"{s['params'] / 1e6:.1f} M", f"{s['dense_params'] / 1e6:.1f} M",
                  f"{s['params_ratio']:.2f} of dense")
    table.add_row("on disk", f"{s['export_bytes'] / 2**20:.1f} MiB", f"{s['dense_bytes'] / 2**20:.1f} MiB",
                  f"{s['bytes_ratio']:.2f} of dense")
    table.caption = f"export loaded with {s['loaded_with']}"
    return table


def run_cache(args: list[str]) -> int:
    import argparse
    import time

    from rich.console import Console
    from rich.table import Table

    from dsee_cli import results_version
    from dsee_cli.run.steps import StepStore, steps_dir
    from dsee_cli.tuning.omega import omega_file_version

    parser = argparse.ArgumentParser(prog="dsee cache", description="The steps runs share, and the Ω cache.")
    parser.add_argument("action", choices=("ls", "size", "prune"))
    parser.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                        help="prune: only entries older than this many days (default: all)")
    parser.add_argument("--stale", action="store_true",
                        help="prune: only entries another version of dsee-cli computed (never reused)")
    opts = parser.parse_args(args)
    store = StepStore()
    omega_dir = steps_dir().parent / "omega"
    omega_files = sorted(omega_dir.glob("omega-*.safetensors")) if omega_dir.is_dir() else []
    console = Console(width=100 if not sys.stdout.isatty() else None)
    current = results_version()
    if opts.action == "prune":
        removed = store.prune(opts.older_than, stale_only=opts.stale)
        cutoff = time.time() - 86400 * (opts.older_than or 0)
        stale = [f for f in omega_files if (opts.older_than is None or f.stat().st_mtime < cutoff)
                 and not (opts.stale and omega_file_version(f) == current)]
        for f in stale:
            f.unlink(missing_ok=True)
        freed = sum(e["bytes"] for e in removed)
        console.print(f"removed {len(removed)} steps ({freed / 2**20:,.1f} MiB) and {len(stale)} Ω files "
                      f"from {store.root.parent}", highlight=False)
        return 0
    entries = store.entries()
    total = sum(e["bytes"] for e in entries) + sum(f.stat().st_size for f in omega_files)
    if opts.action == "size":
        console.print(f"{len(entries)} steps and {len(omega_files)} Ω files, {total / 2**20:,.1f} MiB in "
                      f"{store.root.parent}", highlight=False)
        return 0
    table = Table(title=f"steps in {store.root} (this is dsee-cli {current})", title_justify="left")
    for column, justify in (("step", "left"), ("MiB", "right"), ("version", "left"), ("created", "left"),
                            ("computed in", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for e in entries:
        version = e["version"] if e["current"] else f"{e['version']} (stale: never reused)"
        table.add_row(e["name"], f"{e['bytes'] / 2**20:,.1f}", version, e["created"], e["source"])
    console.print(table)
    stale_omega = sum(omega_file_version(f) != current for f in omega_files)
    stale_steps = sum(not e["current"] for e in entries)
    console.print(f"{len(entries)} steps and {len(omega_files)} Ω files, {total / 2**20:,.1f} MiB"
                  + (f"; {stale_steps} steps and {stale_omega} Ω files of other versions (dsee cache prune --stale)"
                     if stale_steps or stale_omega else ""), highlight=False)
    return 0


def run_config(args: list[str]) -> int:
    """`dsee config [SECTION] [key=value ...]`: the settings, their values and their help."""
    from rich.console import Console
    from rich.table import Table

    from dsee_cli.config import RunConfig, describe

    _register()
    sections = [f.name for f in __import__("dataclasses").fields(RunConfig)]
    section = args[0] if args and "=" not in args[0] else None
    overrides = with_default_profile([a for a in args if "=" in a])
    if section is not None and section not in sections:
        print(f"dsee config: unknown section {section!r}. Valid sections: {', '.join(sections)}.", file=sys.stderr)
        return 2
    try:
        cfg = typed_config(overrides)
    except Exception as exc:  # a bad override: Hydra's message names it
        print(f"dsee config: {exc}", file=sys.stderr)
        return 2
    table = Table(title="settings (key=value on the dsee train command line)", title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold", max_width=22)
    table.add_column("what it does", overflow="fold", ratio=1)
    for key, value, help_text in describe(cfg):
        if section is None or key == section or key.startswith(section + "."):
            table.add_row(key, repr(value) if isinstance(value, str) else str(value), help_text)
    Console(width=None if sys.stdout.isatty() else 100).print(table)
    return 0
