"""Peak memory of one DSEE training step on a decoder LLM built from config at Llama-3.2-1B's
shape (16 layers, 2048 hidden, 32 query / 8 key-value heads, 8192 SwiGLU channels, 128,256
vocabulary; random weights), on the CPU, side by side:

* the frozen base in fp32 or bf16 (trained parameters and AdamW state in fp32 either way),
  with and without gradient checkpointing;
* our LM loss (the head on response positions only, in chunks) against the usual
  ``model(labels=...)`` loss, which makes fp32 logits over the vocabulary for every position;
* the recovery step under a 50 % unstructured mask, with each layer's dense M⊙ΔW rebuilt in
  backward (the default) or kept for it.

DSEE on q, v at r = 16 with card(Ω) = 16; a batch of instruction-like rows whose last half is the
response. Each configuration runs in a fresh process; the peak resident set is reset just before
the measured step (Linux clear_refs), so it is that step's peak, weights and masks included (the
allocator's slack too: differences under ~200 MiB are noise). "saved" counts exactly the bytes the
forward keeps for backward beyond the model's own tensors.

    python scripts/bench_llm_memory.py [--batch 2] [--seq 512] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

# (name, base dtype, gradient checkpointing, loss, recovery: None / "recompute" / "keep")
CONFIGS = [
    ("fp32 base", "float32", False, "ours", None),
    ("fp32 base + checkpointing", "float32", True, "ours", None),
    ("bf16 base", "bfloat16", False, "ours", None),
    ("bf16 base + checkpointing", "bfloat16", True, "ours", None),
    ("bf16 + ckpt, full-vocabulary fp32 logits loss", "bfloat16", True, "hf", None),
    ("recovery 50 %, bf16 + ckpt, M⊙ΔW rebuilt in backward", "bfloat16", True, "ours", "recompute"),
    ("recovery 50 %, bf16 + ckpt, M⊙ΔW kept for backward", "bfloat16", True, "ours", "keep"),
    ("recovery 50 %, bf16, M⊙ΔW rebuilt in backward", "bfloat16", False, "ours", "recompute"),
    ("recovery 50 %, bf16, M⊙ΔW kept for backward", "bfloat16", False, "ours", "keep"),
]


def one(index: int, opts) -> dict:
    import torch
    from bench_train_step import llama_1b  # this folder: the same model as the train-step benchmark

    from dsee_cli.core.models import DTYPES, enable_gradient_checkpointing, trainable_in_fp32
    from dsee_cli.core.precision import resolve_precision
    from dsee_cli.data.generation import lm_loss
    from dsee_cli.measure.costs import peak_memory_bytes, reset_peak_memory
    from dsee_cli.pruning import PruningConfig, apply_masks, compute_masks
    from dsee_cli.tuning.adapters import LowRankConfig, adapters_of, inject_adapters, omega_keys, set_omegas

    _, dtype, checkpointing, loss_kind, recovery = CONFIGS[index]
    torch.manual_seed(0)
    model = llama_1b(opts.layers, DTYPES[dtype])
    inject_adapters(model, LowRankConfig(rank=16, alpha=32, omega_size=16))
    adapters = adapters_of(model)
    set_omegas(adapters, {k: torch.arange(16) * 97 for k in omega_keys(adapters)})
    trainable_in_fp32(model)
    if recovery:
        with torch.no_grad():
            for a in adapters.values():
                a.lora_B[0].normal_(0, 0.01)
        started = time.perf_counter()
        apply_masks(model, compute_masks(model, PruningConfig(), 0.5))  # the global threshold, streamed
        mask_s = time.perf_counter() - started
        for a in adapters.values():
            a.recompute_masked_delta = recovery == "recompute"
    if checkpointing:
        enable_gradient_checkpointing(model)
    precision = resolve_precision("auto", torch.device("cpu"), dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 128000, (opts.batch, opts.seq), generator=gen)
    labels = ids.clone()
    labels[:, : opts.seq // 2] = -100  # the prompt half: no loss there
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model.train()
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):  # what the forward keeps for backward, beyond the model's own tensors
        if t.data_ptr() not in own:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    reset_peak_memory(torch.device("cpu"))
    started = time.perf_counter()
    with precision.autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, batch) if loss_kind == "ours" else model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_mib": peak_memory_bytes(torch.device("cpu")) / 2**20, "step_s": step_s,
            "weights_mib": weights / 2**20, "precision": precision.name, "loss": float(loss),
            "saved_mib": sum(saved.values()) / 2**20,
            "mask_s": mask_s if recovery else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--only", type=str, default="", help="comma-separated row numbers to run (default: all)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one is not None:
        print(json.dumps(one(opts.one, opts)))
        return
    wanted = [int(i) for i in opts.only.split(",")] if opts.only else range(len(CONFIGS))
    rows = []
    for i in wanted:
        out = subprocess.run([sys.executable, __file__, f"--one={i}", f"--batch={opts.batch}", f"--seq={opts.seq}",
                              f"--layers={opts.layers}"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        rows.append((i, json.loads(out.stdout.strip().splitlines()[-1])))
        print(f"  done: {CONFIGS[i][0]}", file=sys.stderr, flush=True)
    import torch

    print(f"Llama-3.2-1B shape ({opts.layers} layers), DSEE q,v r=16 card(Ω)=16, batch {opts.batch} x {opts.seq} "
          f"(loss on the last half), CPU, {torch.get_num_threads()} threads")
    base = rows[0][1]["peak_mib"]
    print(f"  {'configuration':54s} {'weights':>9s} {'step peak':>10s} {'vs row 0':>8s} {'saved':>8s} {'step':>8s}")
    for i, r in rows:
        extra = f"  (mask {r['mask_s']:.0f} s)" if r["mask_s"] else ""
        print(f"  {CONFIGS[i][0]:54s} {r['weights_mib']:7.0f} M {r['peak_mib']:8.0f} M {r['peak_mib'] / base:7.2f}x "
              f"{r['saved_mib']:6.0f} M {r['step_s']:6.1f} s{extra}")
    print("  saved: what the forward keeps for backward beyond the model's own tensors (activations; under an")
    print("  unstructured mask also each layer's M⊙ΔW where it is kept), counted exactly by saved-tensor hooks")


if __name__ == "__main__":
    main()
