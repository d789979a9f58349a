"""Every tuning method and every pruning mode learns, with the defaults a user gets: `dsee train
task=synthetic adapter=X` (or pruning=Y) and nothing else, but for logging and measuring. A method
whose gradients are cut, or whose default learning rate diverges, ends on the trivial baseline
(the majority class) that the run records, and fails here."""

import pytest

from dsee_cli.run.pipeline import run_experiment
from dsee_cli.run.train import ProgressSink

# Best dev accuracy of the final phase over the run's own trivial score (48.6 % at seed 1). Measured
# at seeds 1-3 when written (the test's seed is 1): every method and mode passed at each seed; the
# closest were P-tuning v2 (+11.6 at seed 2) and full fine-tuning (+14.6 at seed 3).
MARGIN = 8.0
METHODS = ["dsee", "rosa", "lora", "full", "bitfit", "ft-top2", "houlsby", "prefix", "ptuning-v2", "mam", "pst", "map",
           "mvp", "dora", "shira", "hira", "adalora", "vera", "loha", "lokr"]  # the last seven: PEFT's
# DSEE with each pruning mode (unstructured is adapter=dsee's default, above); EarlyBERT removes 4 heads
# by default (4 of BERT's 12), and tiny-bert has 4
PRUNING = [["pruning=nm"], ["pruning=structured"], ["pruning=imp"],
           ["pruning=earlybert", "pruning.heads_to_remove=1"], ["pruning=none"]]


def _learns(tmp_path, *overrides: str) -> tuple[float, float, dict]:
    from dsee_cli.cli import typed_config, with_default_profile

    cfg = typed_config(with_default_profile(["logger=none", "measure=false", "export=false", "trainer.threads=2",
                                             *overrides]))
    cfg.omega.cache_dir = str(tmp_path / "omega")
    metrics = run_experiment(cfg, tmp_path / "run", ProgressSink())
    main = metrics["main_metric"]
    return metrics["final"]["best"][main], metrics["trivial"][main], metrics


@pytest.mark.parametrize("method", METHODS)
def test_every_tuning_method_learns_with_its_defaults(tmp_path, method):
    score, trivial, metrics = _learns(tmp_path, f"adapter={method}")
    assert score >= trivial + MARGIN, f"adapter={method}: {score:.1f} against the trivial {trivial:.1f}"
    assert all(state["steps"] > 0 for state in metrics["phases"].values())


@pytest.mark.parametrize("pruning", PRUNING, ids=lambda p: p[0].split("=")[1])
def test_every_pruning_mode_learns_with_its_defaults(tmp_path, pruning):
    score, trivial, metrics = _learns(tmp_path, *pruning)
    assert score >= trivial + MARGIN, f"{pruning}: {score:.1f} against the trivial {trivial:.1f}"
    if pruning[0] != "pruning=none":  # it pruned, and recovery evaluated the pruned model
        assert metrics["total_params_pct"] < 100.0 or metrics["flops_ratio"] < 1.0
        assert metrics["phases"]["recovery"]["steps"] > 0 and metrics["phases"]["recovery"]["last"]
