"""``trainer.devices=K``: one run on K processes, started for the user (what torchrun does, with
the failure of one rank turned into the failure of the job, named, in seconds).

The K ranks run ``python -m dsee_cli train <the same overrides>`` in the same run directory with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) and,
on GPUs, the leased devices as their ``CUDA_VISIBLE_DEVICES``. When a rank exits with an error
the others get ``grace`` seconds to stop on their own (they fail at their next collective, at the
latest after ``trainer.dist_timeout``), then are killed; ``failed.json`` names the rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dsee_cli.atomic import atomic_write_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@dataclass
class LaunchResult:
    codes: list[int]
    failed_rank: int | None  # the first rank that failed, None when all succeeded


def rank_env(rank: int, world: int, port: int, gpus: list[int] | None) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONUNBUFFERED": "1"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return env


def launch_ranks(overrides: list[str], run_dir: Path, world: int, gpus: list[int] | None, timeout_s: float,
                 grace_s: float = 10.0, poll_s: float = 0.2) -> LaunchResult:
    """Start the K ranks and wait for them; on the first failure, stop the rest (see the module doc)."""
    port = free_port()
    command = [sys.executable, "-m", "dsee_cli", "train", *overrides, f"hydra.run.dir={run_dir}"]
    procs = [subprocess.Popen(command, env=rank_env(r, world, port, gpus),
                              stdout=None if r == 0 else subprocess.DEVNULL, start_new_session=True)
             for r in range(world)]
    failed, failed_at = None, None
    try:
        while any(p.poll() is None for p in procs):
            if failed is None:
                failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                failed_at = time.perf_counter() if failed is not None else None
            elif time.perf_counter() - failed_at > min(grace_s, timeout_s):
                _stop(procs)
            time.sleep(poll_s)
    except BaseException:  # Ctrl-C: take the ranks down with us
        _stop(procs)
        raise
    codes = [p.returncode for p in procs]
    if failed is None:
        failed = next((r for r, c in enumerate(codes) if c != 0), None)
    return LaunchResult(codes, failed)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def record_rank_failure(run_dir: Path, result: LaunchResult, sweep_run: str | None) -> Path:
    """failed.json for a distributed run: the rank that failed first, how, and what it said (its
    own failed.json record, when it lived to write one)."""
    path = Path(run_dir) / "failed.json"
    own = json.loads(path.read_text()) if path.is_file() else {}
    rank = result.failed_rank
    how = _exit_text(result.codes[rank])
    said = own.get("error") if own.get("rank") == rank else None
    record = {
        "error": f"rank {rank} of {len(result.codes)} failed ({how})" + (f": {said}" if said else "")
                 + "; the other ranks were stopped.",
        "type": own.get("type", "RankFailure") if said else "RankFailure",
        "stage": own.get("stage", "distributed run"), "sweep_run": sweep_run, "rank": rank,
        "exit_codes": result.codes, "traceback": own.get("traceback") if said else None,
    }
    atomic_write_text(path, json.dumps(record, indent=2))
    return path
