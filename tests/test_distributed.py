"""Scaling out: a GPU per sweep job (the lease), the cores shared among side-by-side jobs, the
ranks a launcher names (torchrun, SLURM, submitit), micro-batches and gradient accumulation,
and one run on two processes (gloo on CPU, the slow tier) against the same run on one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsee_cli.core import dist
from dsee_cli.core.devices import GpuLease, pick_device, threads_per_job
from dsee_cli.errors import DSEEError
from dsee_cli.run.train import micro_batches
from tests.conftest import FAST, run_dsee, start_dsee, wait_in_phase
from tests.helpers import run_in_process

LEASE_SCRIPT = """
import sys, time
from dsee_cli.core.devices import GpuLease
lease = GpuLease(sys.argv[1]).acquire(int(sys.argv[2]), 1, 1, on_wait=lambda: print("waiting", flush=True),
                                      poll_seconds=0.1)
print("gpu", lease.gpus[0], flush=True)
time.sleep(120)
"""


def _line(proc: subprocess.Popen) -> str:
    return proc.stdout.readline().strip()


def test_concurrent_jobs_lease_distinct_gpus_and_a_killed_holders_gpu_is_taken_over(tmp_path):
    """Three jobs, two (faked) GPUs: two hold one each, the third waits; kill -9 a holder and
    the waiting job gets its GPU within a second or so."""
    start = [sys.executable, "-c", LEASE_SCRIPT, str(tmp_path / "devices"), "2"]
    procs = []
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(start, stdout=subprocess.PIPE, text=True))
            assert _line(procs[-1]).startswith("gpu")  # one at a time, so that the third surely waits
        third = subprocess.Popen(start, stdout=subprocess.PIPE, text=True)
        procs.append(third)
        assert _line(third) == "waiting"
        victim = procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        t0 = time.time()
        assert _line(third) == "gpu 0" and time.time() - t0 < 10  # the first holder had GPU 0
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_free_gpus_fill_before_shared_ones_and_a_lease_is_all_or_nothing(tmp_path):
    leases = [GpuLease(tmp_path).acquire(2, 1, jobs_per_gpu=2) for _ in range(4)]
    assert [(lease.gpus[0], lease.slots[0]) for lease in leases] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for lease in leases:
        lease.release()
    two = GpuLease(tmp_path).acquire(3, 2)
    assert sorted(two.gpus) == [0, 1]
    assert GpuLease(tmp_path).acquire(3, 1).gpus == [2]
    with pytest.raises(DSEEError, match="trainer.devices=4 GPUs asked for, but 3 are visible"):
        GpuLease(tmp_path).acquire(3, 4)


def test_device_names_and_pinning(tmp_path):
    assert pick_device("auto", tmp_path, visible=0) == (torch.device("cpu"), None)
    assert pick_device("cuda:1", tmp_path, visible=2) == (torch.device("cuda", 1), None)
    assert pick_device("auto", tmp_path, local_rank=3, visible=2) == (torch.device("cuda", 1), None)
    assert pick_device("cuda:1", tmp_path, local_rank=0, visible=2)[0] == torch.device("cuda", 0)  # ranks: their own
    device, lease = pick_device("cuda", tmp_path, visible=2)
    assert device == torch.device("cuda", 0) and lease.gpus == [0]
    assert pick_device("auto", tmp_path, visible=2)[0] == torch.device("cuda", 1)  # GPU 0 is leased
    lease.release()
    with pytest.raises(DSEEError, match=r"trainer.device=cuda:2 but only 2 GPU\(s\) are visible"):
        pick_device("cuda:2", tmp_path, visible=2)
    with pytest.raises(DSEEError, match="trainer.device='gpu' is not a device. Valid choices: auto"):
        pick_device("gpu", tmp_path, visible=0)
    with pytest.raises(DSEEError, match="no CUDA GPU is visible"):
        pick_device("cuda", tmp_path, visible=0)


def test_side_by_side_jobs_split_the_cores():
    from omegaconf import OmegaConf

    from dsee_cli.cli import parallel_jobs

    assert threads_per_job(2, cores=2) == 1 and threads_per_job(3, cores=16) == 5 and threads_per_job(8, cores=2) == 1
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    hc = OmegaConf.create({"launcher": {"_target_": joblib, "n_jobs": 4}})
    assert parallel_jobs(hc) == 4
    hc.launcher.n_jobs = -1  # joblib's "every core"
    assert parallel_jobs(hc) == len(os.sched_getaffinity(0))
    submitit = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
                                                          "LocalLauncher"}})
    assert parallel_jobs(submitit) == len(os.sched_getaffinity(0))


def test_launchers_name_the_ranks():
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
                "LOCAL_WORLD_SIZE": "2", "SLURM_PROCID": "3", "SLURM_NTASKS": "8"}  # torchrun in SLURM: torchrun's
    assert dist.world_from_env(torchrun) == dist.World(1, 4, 1, "n1", 1234, "torchrun", local_size=2)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-05,07]",
             "SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "2(x4)"}
    w = dist.world_from_env(slurm)
    assert (w.rank, w.size, w.local_rank, w.master_addr, w.source, w.local_size) == (5, 8, 1, "gpu03", "slurm", 2)
    assert dist.world_from_env({**slurm, "SLURM_PROCID": "0"}).master_port == w.master_port  # every task agrees
    assert 20000 <= w.master_port < 40000
    local = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1",
             "SUBMITIT_LOCAL_JOB_ID": "777"}
    w = dist.world_from_env(local)
    assert (w.rank, w.size, w.local_rank, w.master_addr, w.source) == (1, 2, 1, "127.0.0.1", "submitit")
    assert dist.world_from_env({}) == dist.World()
    assert dist.first_host("node7") == "node7" and dist.first_host("a[1,4],b2") == "a1"


def test_micro_batches_partition_the_global_batch():
    batch = list(range(10))
    for world, accum in ((1, 1), (2, 1), (1, 3), (2, 2), (4, 3)):
        pieces = [micro_batches(batch, world, accum, rank) for rank in range(world)]
        assert all(len(p) == accum for p in pieces)
        flat = [i for rank in pieces for piece in rank for i in piece]
        assert flat == batch  # each example once, in order
        sizes = [len(piece) for rank in pieces for piece in rank]
        assert max(sizes) - min(sizes) <= 1


def test_evaluation_batches_are_dealt_round_robin(monkeypatch):
    monkeypatch.setattr(dist, "_WORLD", dist.World(rank=1, size=2))
    assert dist.my_batches(10, 3) == [(1, 3, 6), (3, 9, 10)]
    monkeypatch.setattr(dist, "_WORLD", dist.World(rank=0, size=2))
    assert dist.my_batches(10, 3) == [(0, 0, 3), (2, 6, 9)]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    [state] = (run_dir / "export" / "adapter").glob("state-*.safetensors")
    return {k: v for k, v in load_file(state).items() if v.is_floating_point()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel())


NO_DROPOUT = ["model.tiny.dropout=0", "trainer.max_steps=8", "trainer.eval_every=4"]


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    """Accumulating 2 (or 3, uneven) micro-batches is the same optimizer step as the batch at once,
    up to the order of floating-point sums (dropout off: its masks are drawn per micro-batch)."""
    whole = run_in_process(tmp_path / "whole", *NO_DROPOUT)
    for accum in (2, 3):
        split = run_in_process(tmp_path / f"accum{accum}", *NO_DROPOUT, f"trainer.grad_accum={accum}")
        assert split["final"]["eval"] == whole["final"]["eval"]
        assert _max_diff(_adapter(tmp_path / f"accum{accum}"), _adapter(tmp_path / "whole")) < 1e-5
        assert split["fingerprint"] == whole["fingerprint"]  # how a run is computed is not what it computes


def test_gradient_checkpointing_and_a_bf16_base(tmp_path):
    plain = run_in_process(tmp_path / "plain", *NO_DROPOUT)
    ckpt = run_in_process(tmp_path / "ckpt", *NO_DROPOUT, "trainer.gradient_checkpointing=true")
    assert ckpt["final"]["eval"] == plain["final"]["eval"]
    assert _max_diff(_adapter(tmp_path / "ckpt"), _adapter(tmp_path / "plain")) < 1e-6
    half = run_in_process(tmp_path / "bf16", *NO_DROPOUT, "model.dtype=bfloat16", "adapter=lora")
    assert half["precision"] == "bf16-mixed"  # auto, over a bf16 base, on the CPU too
    assert all(v.dtype == torch.float32 for v in _adapter(tmp_path / "bf16").values())  # trained in fp32
    with pytest.raises(DSEEError, match="model.dtype=bfloat16 keeps the frozen base in half precision"):
        run_in_process(tmp_path / "bad", "model.dtype=bfloat16", "trainer.precision=32-true")


def test_trainer_settings_are_checked(tmp_path):
    for bad, message in (("trainer.devices=0", "trainer.devices=0 must be >= 1"),
                         ("trainer.grad_accum=0", "trainer.grad_accum=0 must be >= 1"),
                         ("trainer.dist_timeout=0", "trainer.dist_timeout=0.0 must be > 0"),
                         ("trainer.device=cuda:x", "trainer.device='cuda:x' is not a device")):
        with pytest.raises(DSEEError, match=message):
            run_in_process(tmp_path / "bad", bad)


def test_a_failed_rank_is_named_in_failed_json(tmp_path):
    from dsee_cli.run.launch import LaunchResult, record_rank_failure

    path = record_rank_failure(tmp_path, LaunchResult([-9, -9], 1), "sweep1")
    record = json.loads(path.read_text())
    assert record["rank"] == 1 and "rank 1 of 2 failed (killed by signal SIGKILL)" in record["error"]
    (tmp_path / "failed.json").write_text(json.dumps({"error": "CUDA out of memory", "rank": 0, "type": "OOM"}))
    record = json.loads(record_rank_failure(tmp_path, LaunchResult([1, -9], 0), None).read_text())
    assert record["error"].startswith("rank 0 of 2 failed (exit status 1): CUDA out of memory")


PATIENT_SCRIPT = """
import os, sys, time
import torch
from dsee_cli.core import dist
w = dist.world_from_env()
dist.init(w, torch.device("cpu"), timeout_s=2.0)
def compute():
    if sys.argv[1] == "die":
        os._exit(3)
    time.sleep(5)  # longer than the timeout: rank 0 is busy, not gone
    return {"omega": torch.arange(4)}, {"w": torch.ones(2, dtype=torch.bool)}
started = time.time()
try:
    info, tensors = dist.on_main(compute)
    print("got", info["omega"].tolist(), tensors["w"].tolist(), flush=True)
except RuntimeError as exc:
    print("failed after", round(time.time() - started), "s:", exc, flush=True)
"""


@pytest.mark.parametrize("case", ["slow", "die"])
def test_ranks_wait_for_rank_0_as_long_as_it_lives(tmp_path, case):
    """Rank 0's own work (Ω, a checkpoint) may take longer than trainer.dist_timeout; a rank 0
    that dies is noticed within about that timeout (here at once: it hosted the store)."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", PATIENT_SCRIPT, case], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    if case == "slow":
        assert outs == ["got [0, 1, 2, 3] [True, True]\n"] * 2
    else:
        assert procs[0].returncode == 3
        # rank 1 fails at once where rank 0 hosted the store (the connection drops), else when its beat stops
        assert outs[1].startswith("failed after"), outs[1]
        assert int(outs[1].split()[2]) <= 6


def _free_port() -> int:
    from dsee_cli.run.launch import free_port

    return free_port()


# -- two processes for real: gloo on CPU (the slow tier) ---------------------------------------------------

TWO = [*FAST, "model.tiny.dropout=0", "measure=false", "reuse=false", "trainer.max_steps=12", "trainer.eval_every=6",
       "trainer.checkpoint_every=4", "task.synthetic_eval=50"]  # 50: the last evaluation batch is a short one


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DSEE_CACHE": str(cwd / ".cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dsee_cli", "train", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _history(m: dict) -> dict:
    """Each phase's best and last evaluations."""
    return {name: (p["best"], p["last"]) for name, p in m["phases"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["adapter=dsee"],  # Ω, phase I, unstructured pruning from |ΔW|, recovery
    ["adapter=lora", "pruning=structured", "pruning.heads_to_remove=1"],  # heads removed, decided on rank 0
    ["adapter=pst", "sparsity=0.5"],  # sparse training: the masks follow the all-reduced scores
])
def test_two_processes_match_one(workdir, extra):
    one = run_dsee([*TWO, *extra, "hydra.run.dir=one"], workdir)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*TWO, *extra, "hydra.run.dir=two"], workdir)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _metrics(workdir / "one"), _metrics(workdir / "two")
    assert (a["world_size"], b["world_size"], b["devices"]) == (1, 2, ["cpu", "cpu"])
    assert b["final"]["eval"] == a["final"]["eval"]  # sharded evaluation: every example once
    assert _history(b) == _history(a)
    assert {k: v for k, v in b["pruning"].items() if k not in ("seconds", "peak_memory_bytes")} == \
        {k: v for k, v in a["pruning"].items() if k not in ("seconds", "peak_memory_bytes")}
    assert _max_diff(_adapter(workdir / "two"), _adapter(workdir / "one")) < 1e-4
    assert b["fingerprint"] == a["fingerprint"]


def _rank_pid(parent: int, rank: int) -> int | None:
    for child in Path("/proc").glob("[0-9]*"):
        try:
            env = (child / "environ").read_bytes().split(b"\0")
            stat = (child / "stat").read_text().split()
        except OSError:
            continue
        if int(stat[3]) == parent and f"RANK={rank}".encode() in env:
            return int(child.name)
    return None


def _kill_rank_1_in_recovery(args: list[str], workdir: Path, run: str) -> tuple[subprocess.Popen, float]:
    parent = start_dsee([*args, f"hydra.run.dir={run}"], workdir)
    wait_in_phase(workdir / run, "recovery")  # once recovery has started and checkpointed
    victim = _rank_pid(parent.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    parent.wait(timeout=90)
    return parent, time.time() - killed


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_naming_it_and_the_rerun_resumes(workdir):
    args = [*TWO, "trainer.max_steps=40", "trainer.dist_timeout=20"]
    reference = run_dsee([*args, "trainer.devices=2", "hydra.run.dir=ref"], workdir, timeout=400)
    assert reference.returncode == 0, reference.stderr[-3000:]
    parent, seconds = _kill_rank_1_in_recovery([*args, "trainer.devices=2"], workdir, "crash")
    assert parent.returncode == 1 and seconds < 20 + 10  # within trainer.dist_timeout, never a hang
    record = json.loads((workdir / "crash" / "failed.json").read_text())
    assert record["rank"] == 1 and "rank 1 of 2 failed (killed by signal SIGKILL)" in record["error"]
    assert not (workdir / "crash" / "metrics.json").exists()
    resumed = run_dsee([*args, "trainer.devices=2", "hydra.run.dir=crash"], workdir, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint" in resumed.stdout
    a, b = _metrics(workdir / "ref"), _metrics(workdir / "crash")
    assert b["final"]["eval"] == a["final"]["eval"] and _history(b) == _history(a)
    assert _max_diff(_adapter(workdir / "crash"), _adapter(workdir / "ref")) == 0.0  # the same run, bit for bit

    # killed again, and continued on one process: it says so, and ends where two processes would, but for
    # the order of floating-point sums (dropout is off here; with it on, the ranks' streams would differ)
    parent, _ = _kill_rank_1_in_recovery([*args, "trainer.devices=2"], workdir, "other")
    assert parent.returncode == 1
    one = run_dsee([*args, "hydra.run.dir=other"], workdir, timeout=400)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed on 1 process(es); the checkpoint was written by 2" in one.stdout
    c = _metrics(workdir / "other")
    assert c["world_size"] == 1 and c["final"]["eval"] == a["final"]["eval"]
    assert _max_diff(_adapter(workdir / "other"), _adapter(workdir / "ref")) < 1e-4


@pytest.mark.slow
def test_slurm_tasks_form_one_run(workdir):
    """What SLURM gives the tasks of a 2-task job: each reads its rank, the world size and the
    master (the first host of the node list, a port from the job id) from the environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DSEE_CACHE": str(workdir / ".cache"),
           "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(os.getpid())}
    command = [sys.executable, "-m", "dsee_cli", "train", *TWO, "hydra.run.dir=slurm"]
    tasks = [subprocess.Popen(command, cwd=workdir, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [t.communicate(timeout=300) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    m = _metrics(workdir / "slurm")
    assert m["world_size"] == 2 and m["devices"] == ["cpu", "cpu"]
    assert "dsee-cli results" in outs[0][0] and "dsee-cli results" not in outs[1][0]  # rank 0 reports


@pytest.mark.slow
def test_submitit_local_runs_a_sweep_job_on_two_tasks(workdir):
    """hydra/launcher=submitit_local with 2 tasks per job, as SLURM would run trainer.devices=2:
    each job's tasks are the ranks of one run; the jobs and their ranks share the cores."""
    args = [a for a in TWO if not a.startswith("trainer.threads")]
    out = run_dsee(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *args, "seed=1,2"],
                   workdir, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    found = [json.loads(p.read_text()) for p in (workdir / "multirun").rglob("metrics.json")]
    assert len(found) == 2 and all(m["world_size"] == 2 for m in found)
    assert all(m["config"]["trainer"]["threads"] == 1 for m in found)
