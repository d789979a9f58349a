"""`dsee eval`: every method's export, loaded back (merged, and adapter re-applied onto the
pretrained model), scores what the run reported; predictions in GLUE's submission format."""

import json
import subprocess
import sys

import pytest
import torch

from dsee_cli.run.evaluation import evaluate_export, load_export, pick_source

from .conftest import FAST, run_dsee
from .helpers import GPT2_E2E, METHOD_OVERRIDES, compose, run_in_process

METHODS = {
    **{name: METHOD_OVERRIDES[name] for name in METHOD_OVERRIDES if name != "prefix"},
    "dsee-heads": ["pruning=structured", "pruning.heads_to_remove=1"],
    "shira-heads": ["adapter=shira", "pruning=structured", "pruning.heads_to_remove=1"],
    "earlybert-dsee": ["pruning=earlybert", "pruning.heads_to_remove=1", "pruning.slimming_l1=0.01"],
    "stsb-regression": ["task=stsb", "model=tiny-bert", "task.synthetic_standin=true"],
    "gpt2-e2e": [*GPT2_E2E, "export=true"],
    "llama-wikitext2-kv-group": ["task=wikitext2", "profile=smoke", "model.tiny.hidden=96", "model.tiny.heads=12",
                                 "task.seq_len=32", "pruning=structured", "pruning.unit=kv-group",
                                 "pruning.head_fraction=0.25", "export=true"],
    "llama-sparsegpt": ["task=wikitext2", "profile=smoke", "model.tiny.hidden=96", "model.tiny.heads=12",
                        "task.seq_len=32", "pruning=sparsegpt", "sparsity=0.5", "export=true"],
    "llama-wanda-2of4": ["task=wikitext2", "profile=smoke", "model.tiny.hidden=96", "model.tiny.heads=12",
                         "task.seq_len=32", "pruning=wanda", "pruning.nm=true", "export=true"],
    "llama-gsm8k-rosa": ["task=gsm8k", "profile=smoke", "adapter=rosa", "task.decode.max_new_tokens=6", "export=true"],
}


FAST_TIER = ("dsee", "ptuning-v2", "pst", "earlybert-dsee", "gpt2-e2e", "llama-wikitext2-kv-group", "llama-sparsegpt",
             "llama-wanda-2of4", "llama-gsm8k-rosa")


@pytest.mark.parametrize("name", [n if n in FAST_TIER else pytest.param(n, marks=pytest.mark.slow) for n in METHODS])
def test_every_export_scores_what_the_run_reported(name, tmp_path):
    overrides = ["trainer.max_steps=6", "trainer.eval_every=6", *METHODS[name]]
    run = tmp_path / "run"
    metrics = run_in_process(run, *overrides, messages=[])
    reported = metrics["final"]["eval"] | (metrics["final"].get("generation") or {})
    sources = [s for s in ("merged", "compressed", "adapter") if (run / "export" / s).is_dir()]
    assert "adapter" in sources
    for source in sources:
        cfg = compose(*overrides)
        result = evaluate_export(cfg, run, *pick_source(run, run, source))
        assert set(result.metrics) == set(reported)
        for key, value in reported.items():
            # merged weights round once in fp32 where the run added W and ΔW per forward: 1e-6 of a perplexity
            assert result.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-4), (source, key)
        assert set(result.reference) == set(result.metrics)  # each score shown beside the run's own
    other = compose(*overrides, "task.max_eval_samples=3")  # not the data the run evaluated: nothing to compare
    assert evaluate_export(other, run, *pick_source(run, run, "adapter")).reference == {}
    if "merged" in sources and "profile=smoke" not in overrides:  # the exports are the same model, logit for logit
        cfg = compose(*overrides)
        merged, adapter = (load_export(cfg, run / "export" / s, s) for s in ("merged", "adapter"))
        enc = merged.tokenizer(["w1 w2 w17 w3", "w20 w5 w6 w7 w8"], padding=True, return_tensors="pt")
        with torch.no_grad():
            a, b = merged.model.eval()(**enc).logits, adapter.model.eval()(**enc).logits
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.slow
def test_dsee_eval_command_prints_the_table_and_writes_glue_predictions(workdir):
    glue = workdir / "glue" / "RTE"
    glue.mkdir(parents=True)
    rows = [("w1 w2 w3", "w4 w5", "entailment"), ("w16 w17", "w18 w19 w20", "not_entailment")] * 16
    (glue / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" +
                                    "".join(f"{i}\t{a}\t{b}\t{c}\n" for i, (a, b, c) in enumerate(rows)))
    (glue / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" +
                                  "".join(f"{i}\t{a}\t{b}\t{c}\n" for i, (a, b, c) in enumerate(rows[:8])))
    (glue / "test.tsv").write_text("index\tsentence1\tsentence2\n" +
                                   "".join(f"{100 + i}\t{a}\t{b}\n" for i, (a, b, _) in enumerate(rows[:5])))
    train = run_dsee([*FAST, "task=rte", "model=tiny-bert", f"task.data_dir={workdir / 'glue'}", "hydra.run.dir=run"],
                     workdir)
    assert train.returncode == 0, train.stderr[-2000:]
    reported = json.loads((workdir / "run" / "metrics.json").read_text())["final"]["eval"]["validation/accuracy"]

    def dsee_eval(*args):
        return subprocess.run([sys.executable, "-m", "dsee_cli", "eval", *args], cwd=workdir, capture_output=True,
                              text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100"})

    out = dsee_eval("run/export/adapter")
    assert out.returncode == 0, out.stderr
    assert "export/adapter" in out.stdout and f"{reported:.4f}" in out.stdout
    test = dsee_eval("run", "--split", "test", "--predictions", "submission/")
    assert test.returncode == 0, test.stderr
    lines = (workdir / "submission" / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 6
    assert lines[1].split("\t")[0] == "100" and lines[1].split("\t")[1] in ("entailment", "not_entailment")
    bad = dsee_eval("run", "--from", "merged", "task.nope=1")
    assert bad.returncode == 2 and "Key 'nope' not in 'TaskConfig'" in bad.stderr
    missing = dsee_eval(str(workdir / "glue"))
    assert missing.returncode == 2 and "is not a finished run" in missing.stderr


def test_keep_best_exports_the_model_that_was_reported(tmp_path):
    # full fine-tuning at a rate too high for the tiny model: its best evaluation is not its last
    overrides = ["trainer.keep_best=true", "trainer.max_steps=24", "trainer.eval_every=3", "pruning=none",
                 "adapter=full", "trainer.phase1.lr=3e-2", "task.synthetic_train=256", "task.synthetic_eval=64"]
    run = tmp_path / "run"
    metrics = run_in_process(run, *overrides, messages=[])
    final = metrics["final"]
    best = {k: v for k, v in final["best"].items() if k != "step"}
    assert best != {k: v for k, v in final["last"].items() if k != "step"}
    assert final["weights"] == f"best (step {final['best']['step']})"
    assert final["eval"] == pytest.approx(best)  # the final evaluation is the best one's
    result = evaluate_export(compose(*overrides), run, *pick_source(run, run, "merged"))
    assert result.metrics == pytest.approx(best)
