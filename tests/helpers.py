"""Small shared builders for the tests: tiny models, inputs, and adapters with non-zero ΔW."""

from __future__ import annotations

import torch

from dsee_cli.adapters import AdapterSettings, adapters_of, inject_adapters, omega_keys, set_omegas
from dsee_cli.models import TinySize, load_model

TINY = TinySize(hidden=32, layers=2, heads=4, intermediate=64)


def tiny(name: str = "tiny-bert", num_labels: int = 2, seed: int = 0):
    lm = load_model(name, None, num_labels, seed, TINY)
    return lm.model, lm.tokenizer


def batch(tokenizer, texts=("w1 w2 w3 hello there", "w7 w9", "a longer sentence w5 w6 w8 w10")):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def with_random_adapters(model, rank=4, omega=5, targets=None, seed=0):
    """Inject adapters with random Ω and random non-zero A, B, S (so ΔW is not zero)."""
    inject_adapters(model, AdapterSettings(rank=rank, alpha=2 * rank, omega_size=omega), targets)
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
