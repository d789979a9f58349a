"""Ω for the 24 q,v matrices of BERT-base: our presets vs a plain per-matrix loop of the
reference algorithm, measured side by side in one run.

    python scripts/bench_omega.py [--model-path DIR] [--loop-matrices K] [--threads 2]

The plain loop (NumPy float64, one matrix at a time, dense S, as the reference scripts run it)
takes many seconds per matrix, so it runs on the first K matrices and its per-matrix time is
multiplied by 24; the printout says so. Weights: BertConfig() init, or a real model directory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import AutoModel, BertConfig, BertModel

from dsee_cli.tuning.omega import PRESETS, find_omega, top_n


def reference_loop_omega(w: np.ndarray, n: int) -> np.ndarray:
    """The reference algorithm as a plain loop: rank 1 growing by 5, 100 outer x 2 inner,
    S reset each outer step, hard threshold 0.01, then the top-n |S| positions."""
    x = w.astype(np.float64)
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1, x.shape[1]))
    s = np.zeros_like(x)
    rank = 1
    for _ in range(100):
        s = np.zeros_like(x)
        for _ in range(2):
            u, _ = np.linalg.qr((x - s) @ v.T)
            v = u.T @ (x - s)
            r = x - u @ v
            s = r * (np.abs(r) >= 0.01)
        rank = min(rank + 5, min(x.shape))
        if v.shape[0] < rank:
            v = np.vstack([v, rng.standard_normal((rank - v.shape[0], x.shape[1]))])
    return top_n(torch.from_numpy(np.abs(s))[None], n)[0].numpy()


def jaccard(a, b) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--loop-matrices", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(args.model_path) if args.model_path else BertModel(BertConfig())
    weights = {}
    for i, layer in enumerate(model.encoder.layer):
        weights[f"{i}.q"] = layer.attention.self.query.weight.detach()
        weights[f"{i}.v"] = layer.attention.self.value.weight.detach()
    print(f"{len(weights)} matrices of {tuple(next(iter(weights.values())).shape)}, "
          f"{torch.get_num_threads()} threads, N = {args.n}")

    def timed(fn, repeats):
        times, out = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    t_fast, fast = timed(lambda: find_omega(weights, args.n, "grebsmo", PRESETS["fast"]), 3)
    t_ref, ref = timed(lambda: find_omega(weights, args.n, "grebsmo", PRESETS["reference"]), 1)
    names = list(weights)[: args.loop_matrices]
    loop_times, loop = [], {}
    for name in names:
        t = time.perf_counter()
        loop[name] = reference_loop_omega(weights[name].numpy(), args.n)
        loop_times.append(time.perf_counter() - t)
    t_loop_each = statistics.mean(loop_times)
    t_loop_all = t_loop_each * len(weights)
    print(f"fast preset, all {len(weights)} matrices (batched):      {t_fast:8.2f} s")
    print(f"reference preset, all {len(weights)} matrices (batched): {t_ref:8.2f} s")
    print(f"reference plain loop: {t_loop_each:.2f} s per matrix (mean of {len(names)}) "
          f"x {len(weights)} = {t_loop_all:8.2f} s")
    print(f"speed-up, reference preset batched vs plain loop: {t_loop_all / t_ref:.2f}x")
    print(f"Jaccard(fast, reference preset) mean over matrices: "
          f"{statistics.mean(jaccard(fast[k], ref[k]) for k in weights):.3f}")
    print(f"Jaccard(reference preset, plain loop) on the looped matrices: "
          f"{statistics.mean(jaccard(ref[k], torch.from_numpy(loop[k])) for k in names):.3f}")
    mag = find_omega(weights, args.n, "magnitude", PRESETS["fast"])
    print(f"Jaccard(fast, magnitude): {statistics.mean(jaccard(fast[k], mag[k]) for k in weights):.3f}")


if __name__ == "__main__":
    main()
