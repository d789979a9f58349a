"""The one-shot LLM pruners side by side on a decoder with real structure to find: a Llama built from
config (4 blocks of 128, 8 query / 2 key-value heads, SwiGLU) first trained on a synthetic language
(ascending runs of words, the wikitext2 stand-in) until its perplexity is low, then pruned without
any recovery by magnitude (|W|, one threshold per matrix as Wanda's baseline: pruning=magnitude), Wanda
and SparseGPT at 50 %
unstructured and 2:4, calibrated on 32 training windows. Test perplexity of each, dense first.

    python scripts/bench_llm_pruners.py [--steps 400] [--seq 64]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main() -> None:
    from dsee_cli.core.models import TinySize, load_model
    from dsee_cli.data.generation import lm_loss
    from dsee_cli.data.lm_tasks import perplexity, synthetic_text, windows
    from dsee_cli.pruning import PRUNERS, PruningConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    opts = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("tiny-llama", None, 1, 0, TinySize(hidden=128, layers=4, heads=8, kv_heads=2,
                                                           intermediate=256, dropout=0.0), causal_lm=True)
    model, tok = loaded.model, loaded.tokenizer
    train = windows(tok, synthetic_text(40_000, 0), opts.seq)
    test = windows(tok, synthetic_text(4_000, 20_000), opts.seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    started = time.perf_counter()
    for step in range(opts.steps):
        rows = train[torch.randint(0, len(train), (opts.batch,))]
        batch = {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows}
        loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = torch.device("cpu")
    dense = perplexity(model, test, device, 32)["ppl"]
    print(f"tiny Llama (4 x 128, GQA 8/2, SwiGLU) trained {opts.steps} steps in {time.perf_counter() - started:.0f} s "
          f"on a synthetic language; test perplexity over {len(test)} windows of {opts.seq} tokens")
    print(f"  {'dense':28s} {dense:8.2f}")
    calib = [{"input_ids": train[i:i + 8], "attention_mask": torch.ones_like(train[i:i + 8])} for i in range(0, 32, 8)]
    settings = {
        "magnitude": lambda nm: PruningConfig(method="unstructured", criterion="weight", granularity="matrix", nm=nm),
        "wanda": lambda nm: PruningConfig(method="wanda", nm=nm),
        "sparsegpt": lambda nm: PruningConfig(method="sparsegpt", nm=nm),
    }
    for pattern, nm in (("50 %", False), ("2:4", True)):
        for name, make in settings.items():
            pruned = copy.deepcopy(model)
            s = make(nm)
            started = time.perf_counter()
            PRUNERS[s.method].prune(pruned, s, 0.5, 0, lambda: None, lambda: (calib, {}))
            seconds = time.perf_counter() - started
            ppl = perplexity(pruned, test, device, 32)["ppl"]
            print(f"  {name + ' ' + pattern:28s} {ppl:8.2f}   ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
