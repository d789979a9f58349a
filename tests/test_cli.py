import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsee_cli.run.export import load_merged, load_merged_tokenizer

from .conftest import FAST, run_dsee, start_dsee, wait_in_phase

pytestmark = pytest.mark.slow  # every test here runs `dsee` in a subprocess


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_unstructured_end_to_end(workdir):
    out = run_dsee([*FAST, "sparsity=0.5", "hydra.run.dir=run"], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    m = _metrics(workdir / "run")
    assert m["total_params_pct"] == pytest.approx(50.0, abs=0.01)
    assert m["phases"]["phase1"]["steps"] == 10 and m["phases"]["recovery"]["steps"] == 10
    assert set(m["final"]["best"]) >= {"step", "validation/accuracy"}
    assert m["trainable_params"]["adapter_sparse"] == 2 * 2 * 16  # 2 layers x (q, v) x card(Ω)
    assert "results" in out.stdout and "metrics.json" in out.stdout
    # the exported merged model reloads, is 50 % sparse in the blocks, and classifies
    model = load_merged(workdir / "run" / "export" / "merged")
    tok = load_merged_tokenizer(workdir / "run" / "export" / "merged")
    weights = [p for n, p in model.named_parameters() if ".layer." in n and n.endswith("weight") and p.dim() == 2]
    zeros = sum(int(w.eq(0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.001)
    assert model(**tok(["w1 w2"], return_tensors="pt")).logits.shape == (1, 2)
    assert (workdir / "run" / "dsee.log").is_file()


def test_structured_end_to_end_shrinks_heads(workdir):
    out = run_dsee([*FAST, "pruning=structured", "pruning.heads_to_remove=2", "hydra.run.dir=run"], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    m = _metrics(workdir / "run")
    assert all(len(v) == 2 for v in m["pruning"]["heads_removed"].values())
    assert m["flops_ratio"] < 0.8
    model = load_merged(workdir / "run" / "export" / "merged")
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 16  # 2 of 4 heads of 8 dims


def test_gpt2_structured_end_to_end(workdir):
    out = run_dsee([*FAST, "model=tiny-gpt2", "pruning=structured", "pruning.heads_to_remove=1",
                    "hydra.run.dir=run"], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    # 2 layers x (q, v) slices x r=16 x (in 32 + rows 24): B lost the removed head's 8 rows
    assert _metrics(workdir / "run")["trainable_params"]["adapter_low_rank"] == 2 * 2 * 16 * (32 + 24)


def test_same_seed_gives_identical_metrics(workdir):
    a = run_dsee([*FAST, "hydra.run.dir=a", "export=false"], workdir)
    b = run_dsee([*FAST, "hydra.run.dir=b", "export=false"], workdir)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert _strip(_metrics(workdir / "a")) == _strip(_metrics(workdir / "b"))


def _strip(m: dict) -> dict:
    phases = {k: {"best": v["best"], "last": v["last"], "steps": v["steps"]} for k, v in m["phases"].items()}
    return {"phases": phases, "final": m["final"]["eval"]}


# The reference run offers its phase I and IMP rounds to the step store: the first case resumes a run
# that reused them; the next two compute their own (reuse=false), so that the kill lands mid-step.
@pytest.mark.parametrize("extra,kill_at", [
    ([], "recovery"),
    (["pruning=imp", "pruning.rounds=3", "pruning.rewind=true", "reuse=false"], "retrain2"),  # mid-IMP, rewinding
    (["adapter=full", "pruning=earlybert", "pruning.heads_to_remove=1", "reuse=false"], "phase1"),  # slimming
    # after EarlyBERT's pruning with an adapter: the folded, frozen projections come back from the checkpoint
    (["pruning=earlybert", "pruning.heads_to_remove=1", "pruning.slimming_l1=0.01"], "recovery"),
    # PEFT's methods: SHiRA's fixed indices, AdaLoRA's importance averages mid-schedule
    (["adapter=shira", "reuse=false"], "recovery"),
    (["adapter=adalora", "pruning=none", "reuse=false"], "phase1"),
])
def test_resume_after_kill_9_gives_the_same_metrics(workdir, extra, kill_at):
    args = [*FAST, "trainer.max_steps=60", "trainer.checkpoint_every=4", "trainer.eval_every=20", "export=false",
            *extra]
    reference = run_dsee([*args, "hydra.run.dir=ref"], workdir)
    assert reference.returncode == 0, reference.stderr
    proc = start_dsee([*args, "hydra.run.dir=crash"], workdir)
    wait_in_phase(workdir / "crash", kill_at, timeout=120)  # kill once that phase has started and checkpointed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "crash" / "metrics.json").exists()
    resumed = run_dsee([*args, "hydra.run.dir=crash"], workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout
    assert _strip(_metrics(workdir / "crash")) == _strip(_metrics(workdir / "ref"))


def test_rerun_of_a_finished_run_does_not_redo_it(workdir):
    first = run_dsee([*FAST, "hydra.run.dir=run", "export=false"], workdir)
    assert first.returncode == 0
    again = run_dsee([*FAST, "hydra.run.dir=run", "export=false"], workdir)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_the_glue_tsv_layout_loads_from_a_fixture(workdir):
    """The classic download's quirks: no header (CoLA), BOM (MRPC), 10 columns (STS-B), bare quotes."""
    glue = workdir / "glue_data"
    (glue / "CoLA").mkdir(parents=True)
    cola = "".join(f"gj04\t{i % 2}\t\tThe \"w{i}\" sentence w{i + 1} .\n" for i in range(40))
    (glue / "CoLA" / "train.tsv").write_text(cola)
    (glue / "CoLA" / "dev.tsv").write_text(cola[: len(cola) // 2])
    (glue / "MRPC").mkdir()
    mrpc = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
        f"{i % 2}\t{i}\t{i + 1}\tw{i} \" w3\tw{i + 2} w4\n" for i in range(40))
    (glue / "MRPC" / "train.tsv").write_text(mrpc, encoding="utf-8")
    (glue / "MRPC" / "dev.tsv").write_text(mrpc, encoding="utf-8")
    (glue / "STS-B").mkdir()
    stsb = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n" + "".join(
        f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tw{i} w2\tw{i} w3\t{(i % 6):.3f}\n" for i in range(40))
    (glue / "STS-B" / "train.tsv").write_text(stsb)
    (glue / "STS-B" / "dev.tsv").write_text(stsb)

    from dsee_cli.data.classification import DataSource, load_task

    cola_data = load_task(DataSource(name="cola", data_dir=str(glue)), 0)
    assert len(cola_data.train) == 40 and cola_data.train[1].label == 1.0
    assert cola_data.train[0].texts == ('The "w0" sentence w1 .',)
    mrpc_data = load_task(DataSource(name="mrpc", data_dir=str(glue)), 0)
    assert mrpc_data.train[0].texts == ('w0 " w3', "w2 w4") and mrpc_data.train[1].label == 1.0
    stsb_data = load_task(DataSource(name="stsb", data_dir=str(glue)), 0)
    assert stsb_data.train[5].label == 5.0 and stsb_data.train[5].texts == ("w5 w2", "w5 w3")
    for task, metric in (("cola", "matthews_correlation"), ("stsb", "pearson")):
        out = run_dsee([*FAST, f"task={task}", "model=tiny-bert", f"task.data_dir={glue}",
                        f"hydra.run.dir={task}", "export=false"], workdir)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"validation/{metric}" in _metrics(workdir / task)["final"]["eval"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["sparsity=1.5"], "sparsity=1.5 is out of range"),
        (["adapter.rank=0"], "adapter.rank=0 is invalid"),
        (["adapter.omega_size=-1"], "card(Ω) must be >= 0"),
        (["adapter.targets=[qeury]"], "matches no linear layer"),
        (["pruning=structured", "pruning.heads_to_remove=4"], "between 0 and 3"),
        (["pruning.criterion=biggest"], "Valid choices: delta, delta_plus_weight, weight, random"),
        (["task.data_dir=/nonexistent", "task=rte", "model=tiny-bert"], "task.data_dir='/nonexistent' does not exist"),
        (["task.data_dir=.", "task=rte", "model=tiny-bert"], "lacks RTE/train.tsv"),
        (["task=sst2", "model=tiny-bert", "task.train_file=nope.csv", "task.validation_file=dev.csv"],
         "task.train_file='nope.csv' does not exist"),
        (["trainer.precision=bf16"], "Valid choices: auto, 32-true, bf16-mixed, 16-mixed"),
        (["model=local", "model.path=/nonexistent"], "is not a Hugging Face model directory"),
        (["trainer.device=cuda"], "no CUDA GPU"),
        (["adapter=pst", "pruning=unstructured"], "prunes while it trains"),
        (["adapter=ptuning-v2", "pruning=structured"], "prompts are shaped by the head count"),
        (["adapter=pst", "adapter.sparse_training.schedule.warmup=0.8"], "warmup + cooldown < 1"),
        (["adapter=pst", "adapter.sparse_training.score_terms=[magic]"],
         "choose one or more of weight, lowrank, structured"),
        (["pruning=imp", "pruning.rate=1.5"], "pruning.rate=1.5 is out of range"),
        (["task=e2e", "model=tiny-bert", "task.synthetic_standin=true"], "need a decoder"),
        (["task=e2e", "model=tiny-gpt2", "task.data_dir=/nonexistent"], "task.data_dir='/nonexistent' does not exist"),
        (["task=e2e", "model=tiny-gpt2", "task.data_dir=."], "needs a training file"),
    ],
)
def test_bad_input_gives_one_clear_paragraph(workdir, args, needle):
    if "trainer.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    started = time.time()
    out = run_dsee([*FAST, *args, "hydra.run.dir=bad"], workdir)
    assert out.returncode != 0
    assert needle in out.stdout.replace("\n", " ") + out.stderr.replace("\n", " ")
    assert "Traceback" not in out.stdout + out.stderr
    assert not (workdir / "bad" / "metrics.json").exists() and not (workdir / "bad" / "export").exists()
    if "data_dir" in " ".join(args) or "train_file" in " ".join(args):  # local data is checked before any model
        assert "Model and data" not in out.stdout
    assert time.time() - started < 60


@pytest.mark.parametrize("args,needle", [(["sparsity=abc"], "sparsity"), (["task=nope"], "Available options"),
                                         (["trainer.batchsize=3"], "batchsize")])
def test_typos_and_wrong_types_are_rejected_by_the_schema(workdir, args, needle):
    out = run_dsee([*FAST, *args], workdir)
    assert out.returncode != 0 and needle in out.stdout + out.stderr


@pytest.mark.parametrize("args,repo", [(["task=rte", "sparsity=0.3"], "bert-base-uncased"),
                                       (["task=instruct", "model=llama-3.2-1b"], "meta-llama/Llama-3.2-1B")])
def test_hub_model_offline_fails_fast_with_a_way_out(workdir, args, repo):
    started = time.time()
    out = run_dsee([*args, "logger=none"], workdir)
    assert out.returncode != 0
    text = " ".join((out.stdout + out.stderr).split())
    assert "model.path=" in text and "task.data_dir=" in text and repo in text
    assert time.time() - started < 30  # within 10 s of the start of work; the rest is Python start-up


def test_unknown_command_and_help(workdir):
    bad = subprocess.run([sys.executable, "-m", "dsee_cli", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Valid commands: train" in bad.stderr
    help_ = run_dsee(["--help"], workdir)
    assert help_.returncode == 0 and "pruning: " in help_.stdout and "structured" in help_.stdout


def test_wandb_offline_logs_config_and_summary(workdir):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    out = subprocess.run(
        [sys.executable, "-m", "dsee_cli", "train", *[a for a in FAST if a != "logger=none"], "logger=wandb",
         "logger.mode=offline", "name=mysweep", "hydra.run.dir=run", "export=false"],
        cwd=workdir, env={**env, "HF_HUB_OFFLINE": "1", "DSEE_CACHE": str(workdir / ".cache")},
        capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    records = list((workdir / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    blob = records[0].read_bytes()
    assert b"total_params_pct" in blob  # the summary
    assert b"sparsity" in blob and b"mysweep" in blob  # the resolved config and the group
    assert b"phase1/loss" in blob and b"phase1/lr" in blob and b"recovery/loss" in blob  # per training step


def test_multirun_sweep_writes_one_run_per_job(workdir):
    out = run_dsee(["-m", *FAST, "seed=1,2", "export=false"], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = sorted(p.parent.name for p in (workdir / "multirun" / "dsee").glob("*/metrics.json"))
    assert len(runs) == 2 and all("seed=" in r for r in runs)


def test_nan_loss_stops_with_a_clear_message(workdir):
    out = run_dsee([*FAST, "trainer.phase1.lr=1e25", "trainer.max_grad_norm=0", "hydra.run.dir=nan"], workdir)
    assert out.returncode == 2
    assert "The loss became" in " ".join(out.stdout.split())
    assert not (workdir / "nan" / "metrics.json").exists()


def test_local_csv_and_jsonl_files(workdir):
    from dsee_cli.data.classification import DataSource, load_task

    (workdir / "train.csv").write_text("text,label\n" + "".join(f"w{i} w2,{i % 2}\n" for i in range(20)))
    (workdir / "dev.jsonl").write_text("".join(f'{{"text": "w{i}", "label": {i % 2}}}\n' for i in range(6)))
    data = load_task(DataSource(name="sst2", train_file=str(workdir / "train.csv"),
                                  validation_file=str(workdir / "dev.jsonl"), text_fields=("text",)), 0)
    assert len(data.train) == 20 and data.train[3].label == 1.0 and data.evals["validation"][0].texts == ("w0",)
    from dsee_cli.errors import DSEEError

    with pytest.raises(DSEEError, match="has no column"):
        load_task(DataSource(name="sst2", train_file=str(workdir / "train.csv"),
                               validation_file=str(workdir / "dev.jsonl")), 0)


def test_wheel_ships_the_configs(tmp_path):
    """A non-editable install finds conf/ inside the package."""
    root = Path(__file__).resolve().parents[1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(root)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "dsee_cli/conf/config.yaml" in names and "dsee_cli/conf/task/rte.yaml" in names
    assert "dsee_cli/conf/hydra/job_logging/rich.yaml" in names
