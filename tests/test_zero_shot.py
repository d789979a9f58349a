"""Zero-shot accuracy through the real lm-eval-harness on the model in memory (data/zero_shot.py),
at the end of a run (task.lm_eval) and from `dsee eval --lm-eval` with a local task YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lm_eval  # noqa: F401  (the [test] extra installs the harness: without it these tests fail, not skip)
import pytest
import torch

from dsee_cli.core.models import TinySize, load_model
from dsee_cli.data.generation import lm_loss
from dsee_cli.data.lm_tasks import synthetic_text, windows
from dsee_cli.data.zero_shot import check_tasks, zero_shot
from dsee_cli.errors import DSEEError

from .conftest import FAST, run_dsee


def _tiny_llama():
    lm = load_model("tiny-llama", None, 1, 0, TinySize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                                       dropout=0.0), causal_lm=True)
    return lm.model, lm.tokenizer


def test_the_harness_scores_the_model_in_memory_a_trained_one_well_above_chance():
    torch.manual_seed(0)
    model, tok = _tiny_llama()
    cpu = torch.device("cpu")
    before = zero_shot(model, tok, ["ascending"], cpu, 32)
    train = windows(tok, synthetic_text(20_000, 0), 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        rows = train[torch.randint(0, len(train), (16,))]
        lm_loss(model, {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows}).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = zero_shot(model, tok, ["ascending"], cpu, 32)
    assert set(after) == {"zero_shot/ascending_acc", "zero_shot/ascending_acc_norm", "zero_shot/mean_acc"}
    assert before["zero_shot/ascending_acc"] < 0.5 < 0.8 < after["zero_shot/ascending_acc"]  # chance: 0.25
    assert after["zero_shot/mean_acc"] == after["zero_shot/ascending_acc"]
    assert model.training  # the model is left as it was found


def test_an_unknown_task_is_named_before_any_training(tmp_path):
    with pytest.raises(DSEEError, match=r"\['boolqq'\] are not known to lm-eval-harness.*boolq, piqa"):
        check_tasks(["ascending", "boolqq"], None)


@pytest.mark.slow
def test_an_unknown_task_fails_before_training_under_the_smoke_profile_too(tmp_path):
    """The smoke profile runs the built-in stand-in instead of the Hub's tasks, but the names asked for
    are checked first: `dsee train` exits non-zero, naming the task, with nothing written (it ran a
    complete run and exited 0)."""
    result = run_dsee(["task=wikitext2", "profile=smoke", "task.lm_eval=[no_such_lm_task]", "trainer.threads=1"],
                      tmp_path, timeout=120)
    assert result.returncode != 0
    assert "['no_such_lm_task'] are not known to lm-eval-harness" in " ".join((result.stdout + result.stderr).split())
    assert not list(tmp_path.glob("outputs/*/metrics.json")) and not list(tmp_path.glob("outputs/*/checkpoint"))


def test_without_the_harness_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(DSEEError, match=r"needs lm-eval-harness: pip install 'dsee-cli\[llm\]'"):
        check_tasks(["ascending"], None)


def _local_task(folder):
    folder.mkdir()
    rows = [{"q": "w10 w11 w12", "choices": ["w13", "w90"], "label": 0},
            {"q": "w50 w51", "choices": ["w7", "w52"], "label": 1},
            {"q": "w60 w61 w62 w63", "choices": ["w64", "w20"], "label": 0}]
    (folder / "mc.json").write_text(json.dumps(rows))
    (folder / "tinymc.yaml").write_text(
        f"task: tinymc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.json'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")


@pytest.mark.slow
def test_lm_eval_at_the_end_of_a_run_and_from_dsee_eval_with_a_local_task(tmp_path):
    _local_task(tmp_path / "tasks")
    args = [*FAST, "task=wikitext2", "profile=smoke", "task.seq_len=32", "pruning=wanda", "sparsity=0.5",
            "trainer.phase1.epochs=0", "trainer.recovery.epochs=0", "measure=false", "export=true",
            "task.lm_eval=[ascending]"]
    proc = run_dsee(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "not a git repository" not in proc.stdout + proc.stderr  # the harness's noise stays off the terminal
    run_dir = next(tmp_path.glob("outputs/*/metrics.json")).parent
    generation = json.loads((run_dir / "metrics.json").read_text())["final"]["generation"]
    assert 0 <= generation["zero_shot/ascending_acc"] <= 1 and "zero_shot/mean_acc" in generation
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DSEE_CACHE": str(tmp_path / ".cache"), "COLUMNS": "160"}
    out = subprocess.run([sys.executable, "-m", "dsee_cli", "eval", str(run_dir), "--lm-eval", "tinymc",
                          f"task.lm_eval_include={tmp_path / 'tasks'}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "zero_shot/tinymc_acc" in out.stdout and "zero_shot/mean_acc" in out.stdout
