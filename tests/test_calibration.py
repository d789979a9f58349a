"""Calibration text for the one-shot pruners (data/calibration.py), delta_wanda, and one-shot
pruning of the model as loaded (trainer.phase1.epochs=0), end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch

from dsee_cli.core.models import TinySize, load_model, tiny_decoder_tokenizer
from dsee_cli.data.calibration import (
    CalibrationConfig,
    CalibrationInputs,
    calibration_windows,
    sample_windows,
    window_length,
)
from dsee_cli.errors import DSEEError
from dsee_cli.pruning import PRUNERS, PruningConfig
from dsee_cli.pruning.calibrated import effective_weight, prune_block_by_block
from dsee_cli.pruning.oneshot import wanda_masks
from dsee_cli.tuning.adapters import LowRankConfig, adapters_of, inject_adapters

from .conftest import FAST, run_dsee


def _docs(n: int, words: int, start: int = 0) -> list[str]:
    return [" ".join(f"w{(start + d * 7 + k) % 500}" for k in range(words)) for d in range(n)]


def _is_slice(window: list[int], docs_ids: list[list[int]]) -> bool:
    n = len(window)
    return any(d[i:i + n] == window for d in docs_ids for i in range(len(d) - n + 1))


def test_windows_are_seeded_slices_of_documents_longer_than_the_window():
    tok = tiny_decoder_tokenizer()
    docs = _docs(20, 40) + _docs(30, 5, start=3)  # 20 long documents, 30 too short to hold a window
    w = sample_windows(docs, tok, 16, 24, seed=3, join=False)
    assert w.shape == (16, 24)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert all(_is_slice(row, [d for d in ids if len(d) > 24]) for row in w.tolist())
    assert torch.equal(w, sample_windows(docs, tok, 16, 24, seed=3, join=False))
    assert not torch.equal(w, sample_windows(docs, tok, 16, 24, seed=4, join=False))
    # fewer long documents than samples: more windows from those found, not a search for ever
    assert sample_windows(docs[:2], tok, 10, 24, seed=0, join=False).shape == (10, 24)


def test_documents_too_short_fail_fast_naming_the_fix_or_join():
    tok = tiny_decoder_tokenizer()
    docs = _docs(2000, 6)
    started = time.perf_counter()
    with pytest.raises(DSEEError, match=r"none of the 2000 documents has more than 64 tokens.*join=true"):
        sample_windows(docs, tok, 8, 64, seed=0, join=False)
    assert time.perf_counter() - started < 10
    joined = sample_windows(docs, tok, 8, 64, seed=0, join=True)
    assert joined.shape == (8, 64)
    with pytest.raises(DSEEError, match="joined text has"):
        sample_windows(docs[:3], tok, 8, 64, seed=0, join=True)


def test_window_length_is_bounded_by_the_task_and_the_model_context():
    assert window_length(0, 2048, 131072) == 2048
    assert window_length(4096, 2048, None) == 2048
    assert window_length(512, 2048, 256) == 256


def test_windows_are_cached_by_content(tmp_path):
    tok = tiny_decoder_tokenizer()
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(12, 50)))
    cfg = CalibrationConfig(source=str(path), samples=6)
    first, info = calibration_windows(cfg, tok, 32, 1, tmp_path / "cache")
    again, info2 = calibration_windows(cfg, tok, 32, 1, tmp_path / "cache")
    assert (info["cached"], info2["cached"]) == (False, True) and torch.equal(first, again)
    assert info["seq_len"] == 32 and info["samples"] == 6 and not info["joined"]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(12, 50, start=100)))
    changed, info3 = calibration_windows(cfg, tok, 32, 1, tmp_path / "cache")
    assert not info3["cached"] and info3["fingerprint"] != info["fingerprint"] and not torch.equal(first, changed)


def test_c4_reads_the_first_train_shard_as_wanda_and_sparsegpt_do(tmp_path, monkeypatch):
    """en/c4-train.00000-of-01024.json.gz of allenai/c4 (not the validation split, not the Parquet
    export); the cache key and the record name the repository, revision and file."""
    import gzip

    tok = tiny_decoder_tokenizer()
    root = tmp_path / "mirror" / "allenai/c4/main/en"
    root.mkdir(parents=True)
    for name, docs in (("c4-train.00000-of-01024.json.gz", _docs(10, 60)),
                       ("c4-train.00001-of-01024.json.gz", ["w499 " * 80] * 10),
                       ("c4-validation.00000-of-00008.json.gz", ["w498 " * 80] * 10)):
        with gzip.open(root / name, "wt") as fh:
            fh.write("".join(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs))
    monkeypatch.setenv("DSEE_HUB_MIRROR", str(tmp_path / "mirror"))
    w, info = calibration_windows(CalibrationConfig(source="c4", samples=8), tok, 32, 0, tmp_path / "cache")
    assert w.shape == (8, 32) and info["from"] == "hub:allenai/c4@main/en/c4-train.00000-of-01024.json.gz"
    seen = set(w.unique().tolist())
    assert not seen & {tok.convert_tokens_to_ids("w499"), tok.convert_tokens_to_ids("w498")}  # no other file read


def test_wikitext2_is_joined_with_a_space_as_the_reference_loaders_join_it(monkeypatch):
    from dsee_cli.data import calibration

    tok = tiny_decoder_tokenizer()
    monkeypatch.setattr(calibration, "_hub_documents", lambda source: (["w1 w2", "w3 w4"] * 40, "hub:test"))
    joined = []
    monkeypatch.setattr(calibration, "sample_windows", lambda docs, tok, n, length, seed, join, joiner:
                        joined.append((join, joiner)) or torch.zeros(n, length, dtype=torch.long))
    calibration_windows(CalibrationConfig(source="wikitext2", samples=2), tok, 8, 0, None)
    calibration_windows(CalibrationConfig(source="c4", samples=2, join=True), tok, 8, 0, None)
    assert joined == [(True, " "), (True, "\n\n")]


def test_c4_offline_fails_within_seconds_with_the_local_way(monkeypatch):
    monkeypatch.delenv("DSEE_HUB_MIRROR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(DSEEError, match=r"(?s)Hub is unreachable.*pruning.calibration.source=/path"):
        calibration_windows(CalibrationConfig(source="c4"), tiny_decoder_tokenizer(), 32, 0, None)
    assert time.perf_counter() - started < 10


def test_a_bad_calibration_source_names_the_choices():
    with pytest.raises(DSEEError, match=r"(?s)c4.*wikitext2.*\.jsonl"):
        PruningConfig(method="wanda", calibration=CalibrationConfig(source="pile")).check(0.5)
    with pytest.raises(DSEEError, match="does not exist"):
        PruningConfig(method="wanda", calibration=CalibrationConfig(source="/nowhere/c.jsonl")).check(0.5)
    with pytest.raises(DSEEError, match="delta_wanda scores single weights"):
        PruningConfig(method="structured", criterion="delta_wanda").check(0.5)


def _adapted_llama():
    lm = load_model("tiny-llama", None, 2, 0, TinySize(hidden=64, layers=2, heads=8, kv_heads=2, intermediate=48,
                                                       dropout=0.0), causal_lm=True)
    model = lm.model
    inject_adapters(model, LowRankConfig(rank=4, alpha=16, omega_size=0), ["q", "v"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in adapters_of(model).values():
            a.lora_B[0].copy_(torch.randn(a.lora_B[0].shape, generator=gen))
    batches = [{"input_ids": torch.randint(5, 200, (4, 24), generator=gen)} for _ in range(2)]
    return model, batches


def test_delta_wanda_scores_delta_by_the_input_norms_where_adapted_and_is_wanda_elsewhere():
    model, batches = _adapted_llama()
    recorded = {}

    def record(name, module, stats):  # the first block's statistics, nothing pruned
        recorded[name] = stats
        return torch.ones_like(module.weight if not hasattr(module, "base") else module.base.weight, dtype=torch.bool)

    prune_block_by_block(model, batches, record, hessian=False)
    q = "model.layers.0.self_attn.q_proj"
    k = "model.layers.0.self_attn.k_proj"
    adapter = model.get_submodule(q)
    expected_q = wanda_masks(adapter.delta_weight().float(), recorded[q], 0.5)
    expected_k = wanda_masks(model.get_submodule(k).weight.float(), recorded[k], 0.5)
    plain_wanda_q = wanda_masks(effective_weight(adapter), recorded[q], 0.5)
    info = PRUNERS["unstructured"].prune(model, PruningConfig(criterion="delta_wanda"), 0.5, 0, lambda: None,
                                         lambda: CalibrationInputs(batches, {"source": "test"}))
    kept_q, kept_k = adapter.base.weight != 0, model.get_submodule(k).weight != 0
    assert torch.equal(kept_q, expected_q) and torch.equal(kept_k, expected_k)
    assert not torch.equal(expected_q, plain_wanda_q)  # ΔW, not W + ΔW, chose q's weights
    assert set(kept_q.sum(1).tolist()) == {kept_q.shape[1] // 2}  # exactly half of every row kept
    assert (info["criterion"], info["score"], info["granularity"]) == ("delta_wanda", "|ΔW|·‖X‖", "row")


def test_one_shot_wanda_from_a_local_file_without_training_records_the_calibration(tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(40, 80)))
    args = [*FAST, "task=wikitext2", "profile=smoke", "task.seq_len=32", "pruning=wanda", "sparsity=0.5",
            f"pruning.calibration.source={calib}", "pruning.calibration.samples=8", "pruning.calibration.seq_len=48",
            "trainer.phase1.epochs=0", "trainer.recovery.epochs=0", "export=false", "measure=false"]
    proc = run_dsee(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next(tmp_path.glob("outputs/*/metrics.json")).read_text())
    calibration = metrics["pruning"]["calibration"]
    assert (calibration["samples"], calibration["seq_len"], calibration["source"]) == (8, 32, str(calib))
    assert metrics["phases"] == {} and metrics["final"]["eval"]["validation/ppl"] > 1
    assert 49 < 100 - metrics["total_params_pct"] < 51
    bad = run_dsee([*args, "pruning.calibration.source=/nowhere/c4.jsonl"], tmp_path, timeout=60)
    assert bad.returncode != 0 and "does not exist" in bad.stdout + bad.stderr


@pytest.mark.parametrize("recipe, recovery, steps", [
    ("llm-dense", "none", []),
    ("llm-dense", "tuned", ["phase1"]),  # the dense model tuned as the pruned ones recover
    ("llm-wanda", "none", ["prune1"]),
    ("llm-sparsegpt", "tuned", ["prune1", "recovery"]),
    ("llm-magnitude", "tuned", ["prune1", "recovery"]),
    ("llm-dsee-delta", "none", ["phase1", "prune1"]),
    ("llm-delta-wanda", "tuned", ["phase1", "prune1", "recovery"]),
])
def test_llm_pruning_rows_plan_what_they_say(recipe, recovery, steps):
    from dsee_cli.run.plan import build_plan

    from .helpers import compose

    cfg = compose("experiment=llm-pruning", "profile=smoke", f"recipe={recipe}", f"recovery={recovery}",
                  "pattern=4of8")
    assert [s.name for s in build_plan(cfg) if s.kind in ("train", "prune")] == steps
    assert cfg.pruning.pattern == (4, 8) or cfg.pruning.method == "none"
    assert cfg.pruning.calibrated == (recipe in ("llm-wanda", "llm-sparsegpt", "llm-delta-wanda"))
    assert cfg.pruning.calibration.source == "c4" and cfg.task.lm_eval[0] == "boolq"


@pytest.mark.parametrize("nm", [False, True])
def test_magnitude_is_the_weight_criterion_per_matrix_exact_and_n_of_m(nm):
    """pruning=magnitude: |W| with one threshold per matrix (50 % of each), or 2 of every 4 inputs kept."""
    from dsee_cli.core.arch import block_linears, weight_out_in

    from .helpers import compose

    settings = compose("pruning=magnitude", f"pruning.nm={str(nm).lower()}").pruning
    assert (settings.method, settings.criterion, settings.granularity) == ("unstructured", "weight", "matrix")
    model, batches = _adapted_llama()
    before = {n: weight_out_in(getattr(m, "base", m)).detach().clone() for n, m in block_linears(model).items()}
    info = settings.pruner.prune(model, settings, 0.5, 0, lambda: None, lambda: CalibrationInputs(batches, {}))
    for name, module in block_linears(model).items():
        w = weight_out_in(getattr(module, "base", module))
        kept = w != 0
        if nm:
            assert set(kept.reshape(w.shape[0], -1, 4).sum(2).flatten().tolist()) == {2}
        else:
            assert int(kept.sum()) == w.numel() // 2
        smallest_kept = before[name].abs()[kept].min()
        assert bool((before[name].abs()[~kept] <= smallest_kept).all()) or nm  # the largest |W| stay
    assert info["pattern" if nm else "criterion"] == ("2:4" if nm else "weight")
