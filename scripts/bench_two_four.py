"""2:4 semi-structured sparsity on a CUDA GPU: measured, never assumed. Side by side in one run,
bf16, the dense weight against the same 2:4-pruned weight through ``torch.sparse``'s
semi-structured kernels (CUTLASS / cuSPARSELt):

* each linear of a Llama layer at 1B shape (2048 hidden, 8 KV heads, 8192 SwiGLU channels) and at
  7B shape (4096, 32 heads, 11008), at prefill token counts (2048, 8192: large matmuls, where
  A100s gain ~1.1-1.4x) and at decode (1 and 16 tokens, where it is often slower);
* one whole decoder block of the 1B shape, prefill of 2048 tokens and a one-token decode step.

Speed-up = dense time / 2:4 time (median of CUDA-event timings after warm-up); above 1 is faster.
Also checks that the sparse product equals the dense masked one (relative error). On a machine
without CUDA (or below compute capability 8.0) it says so and exits 2.

    python scripts/bench_two_four.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

SHAPES = {  # (out, in) of q, k / v, o, gate / up, down
    "1B": {"q": (2048, 2048), "k/v": (512, 2048), "o": (2048, 2048), "gate/up": (8192, 2048), "down": (2048, 8192)},
    "7B": {"q": (4096, 4096), "k/v": (4096, 4096), "o": (4096, 4096), "gate/up": (11008, 4096),
           "down": (4096, 11008)},
}
TOKENS = {"decode 1": 1, "decode 16": 16, "prefill 2048": 2048, "prefill 8192": 8192}


def two_four(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive inputs of each row."""
    groups = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    return (groups * keep).reshape(w.shape)


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def linear_rows(repeats: int) -> list[tuple[str, str, str, float | None, float | None, str]]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for model, shapes in SHAPES.items():
        for name, (out, inp) in shapes.items():
            w = two_four(torch.randn(out, inp, device="cuda", dtype=torch.bfloat16))
            try:
                sparse = to_sparse_semi_structured(w)
            except Exception as exc:  # a shape or build the kernels do not support
                rows.append((model, name, "-", None, None, f"conversion failed: {exc}"))
                continue
            for label, tokens in TOKENS.items():
                x = torch.randn(tokens, inp, device="cuda", dtype=torch.bfloat16)
                try:
                    err = ((torch.nn.functional.linear(x, sparse) - x @ w.t()).norm() / (x @ w.t()).norm()).item()
                    dense_ms = timed(lambda: torch.nn.functional.linear(x, w), repeats)
                    sparse_ms = timed(lambda: torch.nn.functional.linear(x, sparse), repeats)
                    rows.append((model, name, label, dense_ms, sparse_ms, f"rel. err {err:.1e}"))
                except Exception as exc:
                    rows.append((model, name, label, None, None, f"failed: {type(exc).__name__}: {exc}"[:80]))
    return rows


def block_rows(repeats: int) -> list[tuple[str, float | None, float | None, str]]:
    """One Llama decoder block at 1B shape: prefill 2048 tokens, and decode one token."""
    from torch.sparse import to_sparse_semi_structured
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=64, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"  # a block used on its own: no model to dispatch the attention
    dense = LlamaDecoderLayer(cfg, 0).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(two_four(module.weight))
    sparse = LlamaDecoderLayer(cfg, 0).to("cuda", torch.bfloat16).eval()
    sparse.load_state_dict(dense.state_dict())
    for module in sparse.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    rope = LlamaRotaryEmbedding(cfg).to("cuda")
    rows = []
    for label, tokens in (("prefill 2048", 2048), ("decode 1", 1)):
        x = torch.randn(1, tokens, 2048, device="cuda", dtype=torch.bfloat16)
        positions = torch.arange(tokens, device="cuda")[None]
        emb = rope(x, positions)
        with torch.inference_mode():
            try:
                ref, out = dense(x, position_embeddings=emb), sparse(x, position_embeddings=emb)
                ref, out = (ref[0] if isinstance(ref, tuple) else ref), (out[0] if isinstance(out, tuple) else out)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                d = timed(lambda: dense(x, position_embeddings=emb), repeats)
                s = timed(lambda: sparse(x, position_embeddings=emb), repeats)
                rows.append((label, d, s, f"rel. err {err:.1e}"))
            except Exception as exc:
                rows.append((label, None, None, f"failed: {type(exc).__name__}: {exc}"[:80]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_two_four: no CUDA GPU here; 2:4 kernels run on GPUs only (compute capability >= 8.0).")
        return 2
    if torch.cuda.get_device_capability() < (8, 0):
        print(f"bench_two_four: {torch.cuda.get_device_name()} is below compute capability 8.0: no 2:4 kernels.")
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16; speed-up = dense / 2:4 (>1: faster)")
    print(f"{'model':5s} {'linear':8s} {'tokens':13s} {'dense ms':>9s} {'2:4 ms':>9s} {'speed-up':>9s}  check")
    for model, name, label, d, s, note in linear_rows(opts.repeats):
        ratio = f"{d / s:8.2f}x" if d and s else "        -"
        times = f"{d:9.3f} {s:9.3f}" if d and s else f"{'-':>9s} {'-':>9s}"
        print(f"{model:5s} {name:8s} {label:13s} {times} {ratio}  {note}")
    print("one decoder block, 1B shape:")
    for label, d, s, note in block_rows(opts.repeats):
        ratio = f"{d / s:8.2f}x" if d and s else "        -"
        times = f"{d:9.3f} {s:9.3f}" if d and s else f"{'-':>9s} {'-':>9s}"
        print(f"{'1B':5s} {'block':8s} {label:13s} {times} {ratio}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
