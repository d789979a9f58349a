"""Small shared builders for the tests: tiny models, inputs, and adapters with non-zero ΔW."""

from __future__ import annotations

import torch

from dsee_cli.core.models import TinySize, load_model
from dsee_cli.tuning.adapters import LowRankConfig, adapters_of, inject_adapters, omega_keys, set_omegas

TINY = TinySize(hidden=32, layers=2, heads=4, intermediate=64)


def tiny(name: str = "tiny-bert", num_labels: int = 2, seed: int = 0):
    lm = load_model(name, None, num_labels, seed, TINY)
    return lm.model, lm.tokenizer


def batch(tokenizer, texts=("w1 w2 w3 hello there", "w7 w9", "a longer sentence w5 w6 w8 w10")):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def with_random_adapters(model, rank=4, omega=5, targets=None, seed=0):
    """Inject adapters with random Ω and random non-zero A, B, S (so ΔW is not zero)."""
    inject_adapters(model, LowRankConfig(rank=rank, alpha=2 * rank, omega_size=omega), targets)
    adapters = adapters_of(model)
    gen = torch.Generator().manual_seed(seed)
    omegas = {}
    for key, (a, k) in omega_keys(adapters).items():
        rows = a.slices[k][1] - a.slices[k][0]
        omegas[key] = torch.randperm(rows * a.in_features, generator=gen)[:omega]
    set_omegas(adapters, omegas)
    with torch.no_grad():
        for a in adapters.values():
            for p in a.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return adapters


def logits(model, enc):
    model.eval()
    with torch.no_grad():
        return model(**enc).logits


# In-process runs: the config composed by Hydra exactly as `dsee train` does, then the library.
# Measuring (timed forward passes, ~2 s a run) only where a test asks for it: measure=true.
QUICK = ["logger=none", "trainer=smoke", "task.synthetic_train=64", "task.synthetic_eval=32", "trainer.max_steps=3",
         "trainer.eval_every=3", "model.tiny.hidden=32", "model.tiny.heads=4", "model.tiny.intermediate=64",
         "trainer.threads=1", "trainer.checkpoint_every=0", "measure=false"]


def compose(*overrides: str):
    """A typed RunConfig from Hydra overrides (QUICK first, so the overrides win)."""
    from dsee_cli.cli import typed_config, with_default_profile

    return typed_config(with_default_profile([*QUICK, *overrides]))


def run_in_process(run_dir, *overrides: str, messages: list | None = None) -> dict:
    """run_experiment on a composed config; returns its metrics (and collects its banner lines)."""
    from dsee_cli.run.pipeline import run_experiment
    from dsee_cli.run.train import ProgressSink

    cfg = compose(*overrides)
    cfg.omega.cache_dir = str(run_dir.parent / "omega-cache")
    return run_experiment(cfg, run_dir, ProgressSink(), say=(messages.append if messages is not None else print))


# Every tuning method as overrides of the tiny in-process run (sparse-training ones prune while training).
METHOD_OVERRIDES = {
    "dsee": ["adapter=dsee"],
    "rosa": ["adapter=rosa", "omega.warmup_steps=2"],
    "lora": ["adapter=lora"],
    "full": ["adapter=full"],
    "bitfit": ["adapter=bitfit"],
    "ft-top2": ["adapter=ft-top2"],
    "houlsby": ["adapter=houlsby"],
    "prefix": ["adapter=prefix"],
    "ptuning-v2": ["adapter=ptuning-v2"],
    "mam": ["adapter=mam"],
    "pst": ["adapter=pst", "sparsity=0.5"],
    "map": ["adapter=map", "sparsity=0.5"],
    "mvp": ["adapter=mvp", "sparsity=0.5"],
    **{name: [f"adapter={name}"] for name in ("dora", "shira", "hira", "adalora", "vera", "loha", "lokr")},
}
# GPT-2 on the E2E stand-in with a short beam search.
GPT2_E2E = ["task=e2e", "profile=smoke", "model.tiny.hidden=32", "model.tiny.heads=4", "task.synthetic_train=16",
            "task.synthetic_eval=4", "task.decode.num_beams=2", "task.decode.max_new_tokens=6", "trainer.max_steps=3"]
