"""Inference time of exported head-pruned BERT-base models relative to the dense model, beside
their FLOPs ratios, measured side by side (interleaved, median). On a CUDA GPU that supports
it, also the speed-up of 2:4 semi-structured sparse weights (torch.sparse).

    python scripts/bench_head_pruned.py [--batch 8] [--seq 128] [--repeats 9] [--heads 3 6 9]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from dsee_cli.accounting import inference_flops
from dsee_cli.export import export_merged, load_merged
from dsee_cli.pruning import prune_heads


def timed_forward(model, ids, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def two_four(device: torch.device, batch: int, seq: int) -> None:
    if device.type != "cuda":
        print("2:4 semi-structured: skipped (no CUDA GPU here; run this script on one)")
        return
    from torch.sparse import to_sparse_semi_structured

    w = torch.randn(3072, 768, device=device, dtype=torch.float16)
    mask = torch.zeros_like(w, dtype=torch.bool).view(3072, -1, 4)
    mask[..., :2] = True
    w = w * mask.view_as(w)
    x = torch.randn(batch * seq, 768, device=device, dtype=torch.float16)
    try:
        ws = to_sparse_semi_structured(w)
    except Exception as exc:  # hardware or build without support
        print(f"2:4 semi-structured: not supported here ({exc})")
        return
    for _ in range(3):
        torch.nn.functional.linear(x, w), torch.nn.functional.linear(x, ws)
    dense = statistics.median(_cuda_time(lambda: torch.nn.functional.linear(x, w)) for _ in range(20))
    sparse = statistics.median(_cuda_time(lambda: torch.nn.functional.linear(x, ws)) for _ in range(20))
    print(f"2:4 linear 768->3072, {batch * seq} tokens: dense {dense * 1e3:.3f} ms, 2:4 {sparse * 1e3:.3f} ms, "
          f"speed-up {dense / sparse:.2f}x")


def _cuda_time(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--heads", type=int, nargs="+", default=[3, 6, 9])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dense = BertForSequenceClassification(BertConfig()).eval()
    dense_flops = inference_flops(dense, args.seq)
    models = {0: dense}
    flops = {0: 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.heads:
            model = BertForSequenceClassification(BertConfig()).eval()
            model.load_state_dict(dense.state_dict())
            prune_heads(model, {layer: list(range(k)) for layer in range(12)})
            export_merged(model, None, Path(tmp) / f"h{k}")
            models[k] = load_merged(Path(tmp) / f"h{k}")  # the exported, reloaded model
            flops[k] = inference_flops(models[k], args.seq) / dense_flops
    models = {k: m.to(device) for k, m in models.items()}
    ids = torch.randint(0, 30000, (args.batch, args.seq)).to(device)
    for m in models.values():
        timed_forward(m, ids, device)
    times = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            times[k].append(timed_forward(m, ids, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"BERT-base, batch {args.batch} x {args.seq}, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"  dense        {med[0] * 1e3:8.1f} ms")
    for k in args.heads:
        ratio = med[k] / med[0]
        print(f"  -{k} heads/layer {med[k] * 1e3:8.1f} ms   time ratio {ratio:.3f}   FLOPs ratio {flops[k]:.3f}   "
              f"difference {ratio - flops[k]:+.3f}")
    two_four(device, args.batch, args.seq)


if __name__ == "__main__":
    main()
