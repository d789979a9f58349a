"""The step store, measured: an experiment's smoke sweep with reuse=false and with reuse=true,
side by side in one run (each in its own empty $DSEE_CACHE and output directory).

    python scripts/bench_reuse.py [table3 table6 table7 table14 ...] [--profile smoke]

Printed per experiment: jobs, the optimizer steps the sweep executed (phase I, each IMP round,
each recovery: the `steps` of every phase a job computed rather than reused) and its wall time,
without and with reuse, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def executed_steps(metrics: dict) -> int:
    """Optimizer steps this job ran itself (a reused phase I or IMP round counts 0)."""
    reused = {name for name, record in metrics.get("steps", {}).items() if record["reused"]}
    rounds = metrics["config"]["pruning"]["rounds"] if metrics["config"]["pruning"]["method"] == "imp" else 1
    total = 0
    for phase, summary in metrics["phases"].items():
        step = "phase1" if phase == "phase1" else f"round{rounds if phase == 'recovery' else phase[7:]}"
        if step not in reused:
            total += summary["steps"]
    return total


def sweep(experiment: str, profile: str, reuse: bool, extra: list[str]) -> tuple[int, int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DSEE_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "dsee_cli", "train", "-m", f"experiment={experiment}",
                                 f"profile={profile}", f"reuse={str(reuse).lower()}", *extra],
                                cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"{experiment} (reuse={reuse}) failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        files = list((Path(tmp) / "multirun" / experiment).glob("*/metrics.json"))
        return len(files), sum(executed_steps(json.loads(f.read_text())) for f in files), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiments", nargs="*", default=["table3", "table6", "table7", "table14"])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    extra = [f"trainer.threads={args.threads}"]
    print(f"profile={args.profile}, {args.threads} thread(s) per job; steps = optimizer steps executed")
    print(f"{'experiment':<12}{'jobs':>5}{'steps':>8}{'seconds':>9}{'steps, reuse':>14}{'seconds':>9}"
          f"{'steps ratio':>13}{'time ratio':>12}")
    for experiment in args.experiments:
        jobs, steps_off, secs_off = sweep(experiment, args.profile, False, extra)
        _, steps_on, secs_on = sweep(experiment, args.profile, True, extra)
        print(f"{experiment:<12}{jobs:>5}{steps_off:>8}{secs_off:>9.1f}{steps_on:>14}{secs_on:>9.1f}"
              f"{steps_on / steps_off:>13.2f}{secs_on / secs_off:>12.2f}")


if __name__ == "__main__":
    main()
