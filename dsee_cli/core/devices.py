"""Which device a job computes on, so that parallel jobs on one node do not pile onto one GPU
or oversubscribe the CPU cores.

* A GPU job leases a slot: an exclusive ``flock`` on ``<root>/gpu<d>.slot<j>.lock``. The kernel
  drops the lock when the process exits, a crash or ``kill -9`` included, so a dead job's GPU is
  free again at once. ``jobs_per_gpu`` slots per GPU; free GPUs are filled before shared ones.
  A job that finds every slot taken waits for one.
* A CPU job takes ``cores / parallel jobs`` threads unless told otherwise: two torch processes
  with default threads on the same cores slow each other down many times over.

The device is chosen by index (``cuda:3``) rather than by changing ``CUDA_VISIBLE_DEVICES``: a
joblib worker runs several jobs one after another and CUDA's visibility cannot change once it
has started. Processes a job starts (``trainer.devices=K``) get the leased GPUs as their
``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dsee_cli.errors import DSEEError

DEVICE_HELP = "auto (a free GPU if there is one, else the CPU), cpu, cuda (a free GPU) or cuda:K (GPU K)"


def check_device_name(name: str) -> None:
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise DSEEError(f"trainer.device={name!r} is not a device. Valid choices: {DEVICE_HELP}.")


class GpuLease:
    """Slots on ``count`` distinct GPUs, held until ``release`` (or the process's end)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.gpus: list[int] = []
        self.slots: list[int] = []
        self._files: list = []

    def _try(self, gpu: int, slot: int) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / f"gpu{gpu}.slot{slot}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.gpus.append(gpu)
        self.slots.append(slot)
        self._files.append(fh)
        return True

    def acquire(self, visible: int, count: int = 1, jobs_per_gpu: int = 1, on_wait: Callable[[], None] = lambda: None,
                poll_seconds: float = 1.0) -> GpuLease:
        if count > visible:
            raise DSEEError(f"trainer.devices={count} GPUs asked for, but {visible} are visible.")
        waited = False
        while True:
            for slot in range(jobs_per_gpu):  # every GPU's first slot, then their second, ...
                for gpu in range(visible):
                    if len(self.gpus) < count and gpu not in self.gpus:
                        self._try(gpu, slot)
            if len(self.gpus) == count:
                return self
            self.release()  # all or nothing: two jobs each holding half of what they need would wait forever
            if not waited:
                on_wait()
                waited = True
            time.sleep(poll_seconds)

    def release(self) -> None:
        for fh in self._files:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        self._files, self.gpus, self.slots = [], [], []

    def describe(self) -> dict:
        return {"gpus": list(self.gpus), "slots": list(self.slots)}


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_type(name: str) -> str:
    """What trainer.device resolves to, without leasing anything: "cpu" or "cuda"."""
    return "cpu" if name == "cpu" or (name == "auto" and cuda_count() == 0) else "cuda"


def pick_device(name: str, lease_root: Path, jobs_per_gpu: int = 1, local_rank: int | None = None,
                say: Callable[[str], None] = lambda text: None, visible: int | None = None
                ) -> tuple[torch.device, GpuLease | None]:
    """The device of this process and the lease that holds it (None when nothing is leased:
    the CPU, a pinned ``cuda:K``, or a rank of a distributed run, which uses its local rank's GPU)."""
    check_device_name(name)
    visible = cuda_count() if visible is None else visible
    if name == "cpu" or (name == "auto" and visible == 0):
        return torch.device("cpu"), None
    if visible == 0:
        raise DSEEError(f"trainer.device={name} but no CUDA GPU is visible; use trainer.device=cpu or auto.")
    if local_rank is not None:  # a rank of a distributed run: its local rank's GPU, whatever one job would pin
        return torch.device("cuda", local_rank % visible), None
    if name.startswith("cuda:"):
        index = int(name.split(":")[1])
        if index >= visible:
            raise DSEEError(f"trainer.device={name} but only {visible} GPU(s) are visible "
                            f"(cuda:0 .. cuda:{visible - 1}).")
        return torch.device(name), None
    waiting = (f"waiting for a free GPU: all {visible} x {jobs_per_gpu} slots are taken by other jobs "
               "(trainer.jobs_per_gpu packs more)")
    lease = GpuLease(lease_root).acquire(visible, 1, jobs_per_gpu, on_wait=lambda: say(waiting))
    return torch.device("cuda", lease.gpus[0]), lease


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def threads_per_job(parallel_jobs: int, cores: int | None = None) -> int:
    """CPU threads for one of ``parallel_jobs`` jobs sharing this machine's cores."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, parallel_jobs))
