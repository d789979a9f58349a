"""One run on several processes (torch.distributed data parallel), as plain functions that are
no-ops in a single process, so the training loop and the pipeline have one code path.

Where a process learns its rank, in this order: torchrun's ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; submitit's local executor
(``SUBMITIT_LOCAL_*``); SLURM (``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``, the
master being the first host of ``SLURM_JOB_NODELIST`` and the port derived from the job id, so
every task of a job agrees without talking). A process with none of these is rank 0 of 1.

What the ranks share is decided on rank 0 and broadcast (``on_main``); tensors travel with
``broadcast`` on the backend's device, small values as pickled objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as td

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single process"  # which environment named the ranks (torchrun, slurm, submitit)
    local_size: int = 1  # ranks on this machine (they share its cores)

    @property
    def main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,07],cpu1`` -> ``gpu03``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        return "127.0.0.1"
    if head.group(3) is None:
        return head.group(1)
    return head.group(1) + re.split(r"[-,]", head.group(3))[0]


def _port_of(job_id: str) -> int:
    return 20000 + int(hashlib.sha1(job_id.encode()).hexdigest(), 16) % 20000


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The ranks as the launcher set them (see the module doc)."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                     env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
                     int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
    if "SUBMITIT_LOCAL_NTASKS" in env and "SUBMITIT_LOCAL_GLOBALID" in env:
        return World(int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env["SUBMITIT_LOCAL_NTASKS"]),
                     int(env.get("SUBMITIT_LOCAL_LOCALID", 0)), "127.0.0.1",
                     _port_of(env.get("SUBMITIT_LOCAL_JOB_ID", "local")), "submitit", int(env["SUBMITIT_LOCAL_NTASKS"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                     env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                     int(env.get("MASTER_PORT") or _port_of(env.get("SLURM_JOB_ID", "0"))), "slurm",
                     int(re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"])).group()))
    return World()


_WORLD = World()


def world() -> World:
    """This process's place in the run (rank 0 of 1 until ``init``)."""
    return _WORLD


def active() -> bool:
    return _WORLD.size > 1 and td.is_available() and td.is_initialized()


def init(w: World, device: torch.device, timeout_s: float) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPU. A collective that waits more
    than ``timeout_s`` (a dead peer) raises instead of hanging."""
    global _WORLD
    _WORLD, _TIMEOUT[0] = w, timeout_s
    if w.size == 1 or td.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", w.master_addr)
    os.environ.setdefault("MASTER_PORT", str(w.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    td.init_process_group(backend, rank=w.rank, world_size=w.size, timeout=timedelta(seconds=timeout_s),
                          **({"device_id": device} if device.type == "cuda" else {}))


def shutdown() -> None:
    global _WORLD
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
    _WORLD = World()


def _comm_device() -> torch.device:
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        td.barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled: small things)."""
    if not active():
        return value
    box = [value if _WORLD.main else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Rank 0's named tensors on every rank (the others pass None): names, shapes and dtypes as
    one object, then each tensor with ``broadcast``; they arrive on the backend's device (the
    rank's GPU under NCCL, the CPU under gloo)."""
    if not active():
        return tensors or {}
    layout = broadcast_object({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} if _WORLD.main else None)
    dev, out = _comm_device(), {}
    for name, (shape, dtype) in layout.items():
        t = tensors[name].to(dev).contiguous() if _WORLD.main else torch.empty(shape, dtype=dtype, device=dev)
        wire = t.to(torch.uint8) if dtype == torch.bool else t  # gloo has no bool
        td.broadcast(wire, src=0)
        out[name] = wire.bool() if dtype == torch.bool else wire
    return out


_calls = [0]  # on_main calls so far: the same sequence on every rank, which names each call's store keys


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0 only, its result on every rank: a dict of tensors (masks) travels
    as tensors, anything else pickled.

    The others wait for as long as rank 0 computes (Ω on a large model, writing a checkpoint, a
    step another job is computing): rank 0 beats a counter in the store every second meanwhile,
    and a rank fails only when the beat stops for ``dist_timeout`` seconds (rank 0 is gone)."""
    if not active():
        return compute()
    _calls[0] += 1
    key = f"dsee/on_main/{_calls[0]}"
    if _WORLD.main:
        with _heartbeat(key):
            result = compute()
    else:
        _wait_for(key)
        result = None
    as_tensors = broadcast_object(_all_tensors(result) if _WORLD.main else None)
    return broadcast_tensors(result) if as_tensors else broadcast_object(result)


_TIMEOUT = [300.0]


@contextlib.contextmanager
def _heartbeat(key: str):
    store, stop = td.distributed_c10d._get_default_store(), threading.Event()

    def beat() -> None:
        while not stop.wait(1.0):
            store.add(key + "/beat", 1)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        store.set(key + "/done", "1")


def _wait_for(key: str) -> None:
    store = td.distributed_c10d._get_default_store()
    last, since = -1, time.monotonic()
    while not store.check([key + "/done"]):
        beat = store.add(key + "/beat", 0)
        if beat != last:
            last, since = beat, time.monotonic()
        elif time.monotonic() - since > _TIMEOUT[0]:
            raise RuntimeError(f"rank 0 stopped answering for {_TIMEOUT[0]:.0f} s (trainer.dist_timeout) while "
                               "the other ranks waited for it")
        time.sleep(0.2)


def _all_tensors(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def all_reduce_sum_(flat: torch.Tensor) -> torch.Tensor:
    """Sum ``flat`` over the ranks, in place."""
    if active():
        td.all_reduce(flat, op=td.ReduceOp.SUM)
    return flat


def all_gather_object(value: T) -> list[T]:
    if not active():
        return [value]
    out: list = [None] * _WORLD.size
    td.all_gather_object(out, value)
    return out


def my_batches(n: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of the evaluation batches this rank computes: the single-process
    batches, dealt round-robin, so each is computed exactly as one process would."""
    starts = range(0, n, batch_size)
    return [(i, s, min(s + batch_size, n)) for i, s in enumerate(starts) if i % _WORLD.size == _WORLD.rank]


def gather_in_order(mine: dict[int, T]) -> list[T]:
    """Every rank's per-batch results, in batch order (each batch once, none dropped)."""
    merged: dict[int, T] = {}
    for part in all_gather_object(mine):
        merged.update(part)
    return [merged[i] for i in sorted(merged)]


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update((t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same(what: str, tensors: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Every rank holds the same ``tensors()`` (the model after load, after pruning), or a clear
    error; in one process nothing is computed."""
    if not active():
        return
    digests = all_gather_object(digest(tensors()))
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"{what}: ranks {differ} hold a different model than rank 0 (digests {digests}).")
