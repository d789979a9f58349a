"""What the step store saves a sweep, projected from the experiment definitions alone.

    python scripts/reuse_savings.py [table3 table6 table7 table14 ...] [--profile paper]

Every job of the experiment's sweep is composed as `dsee train -m` would (nothing is trained) and
planned (dsee_cli.run.plan): phase I, then one training per IMP round or one recovery. A shared step
(phase I, an IMP round) is counted once per distinct fingerprint with reuse, once per job without.
Counts are optimizer steps (epochs x training examples / batch; GLUE's training-set sizes, or the
profile's slice), so the saving is a share of the training compute, not of the job count.
`dsee train -m experiment=<name> --plan` prints the same, job by job.
"""

from __future__ import annotations

import argparse

from dsee_cli.cli import _register, sweep_jobs, typed_config
from dsee_cli.run.plan import build_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiments", nargs="*", default=["table3", "table6", "table7", "table14"])
    ap.add_argument("--profile", default="paper")
    args = ap.parse_args()
    _register()
    print(f"profile={args.profile}: optimizer steps of every training in the sweep, without and with reuse")
    print(f"{'experiment':<12}{'jobs':>6}{'trainings':>11}{'steps':>14}{'with reuse':>12}{'steps':>14}{'saved':>8}")
    for experiment in args.experiments:
        jobs = sweep_jobs(["-m", f"experiment={experiment}", f"profile={args.profile}"])
        trainings = []
        for overrides in jobs:
            cfg = typed_config(overrides)
            trainings += [(f"{s.name}-{s.fingerprint}" if s.fingerprint else f"{len(trainings)}", s.optimizer_steps)
                          for s in build_plan(cfg) if s.optimizer_steps]
        unique = dict(trainings)
        total, kept = sum(s for _, s in trainings), sum(unique.values())
        print(f"{experiment:<12}{len(jobs):>6}{len(trainings):>11}{total:>14,}{len(unique):>12}{kept:>14,}"
              f"{1 - kept / total:>8.0%}")


if __name__ == "__main__":
    main()
