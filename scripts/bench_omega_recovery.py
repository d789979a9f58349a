"""Which Ω finder finds what it should: planted spikes on structured synthetic matrices.

    python scripts/bench_omega_recovery.py [--matrices 4] [--n 16] [--threads 2]

Each matrix is X = L + P + E at a BERT-base (768 x 768) and a RoBERTa-large (1024 x 1024) shape:
L of rank 4 and 8 (Gaussian factors, entries of std 1), P = n planted spikes of magnitude 3 (random
signs and positions: larger than most of L's entries but smaller than L's largest), E Gaussian
noise of std 0.1. Ω should be the spikes: that is the sparse part the paper's decomposition
W ≈ UV + S' looks for. Four finders side by side, on the same matrices, in one run:
GreBsmo with the reference code's settings (the paper's), GreBsmo with our fast preset, the
largest |W| (Fig. 2's magnitude) and random positions. Printed: the fraction of the spikes each
finds (mean and worst over the matrices) and its time for the whole batch.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from dsee_cli.tuning.omega import PRESETS, find_omega

SHAPES = {"BERT-base": (768, 768), "RoBERTa-large": (1024, 1024)}
FINDERS = (("GreBsmo, reference settings", "grebsmo", "reference"), ("GreBsmo, fast preset", "grebsmo", "fast"),
           ("largest |W|", "magnitude", "fast"), ("random", "random", "fast"))


def planted(shape: tuple[int, int], n: int, rank: int, spike: float, noise: float,
            gen: torch.Generator) -> tuple[torch.Tensor, set[int]]:
    m, k = shape
    low = torch.randn(m, rank, generator=gen) @ torch.randn(rank, k, generator=gen) / rank ** 0.5
    x = low + noise * torch.randn(m, k, generator=gen)
    positions = torch.randperm(m * k, generator=gen)[:n]
    signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    x.view(-1)[positions] += spike * signs
    return x, set(positions.tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrices", type=int, default=4, help="matrices per shape")
    ap.add_argument("--n", type=int, default=16, help="card(Ω) = the number of planted spikes")
    ap.add_argument("--ranks", default="4,8", help="ranks of the low-rank part, one block of rows each")
    ap.add_argument("--spike", type=float, default=3.0)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"X = low-rank L (entries of std 1) + {args.n} spikes of ±{args.spike} + noise of std "
          f"{args.noise}; {args.matrices} matrices per shape and rank, {args.threads} threads")
    print(f"{'shape, rank of L':<24}{'finder':<30}{'spikes found':>14}{'worst':>7}{'seconds':>9}")
    for (label, shape), rank in itertools.product(SHAPES.items(), map(int, args.ranks.split(","))):
        cases = [planted(shape, args.n, rank, args.spike, args.noise, gen) for _ in range(args.matrices)]
        weights = {f"m{i}": x for i, (x, _) in enumerate(cases)}
        largest = max(float(x.abs().max()) for x, _ in cases)
        for name, method, preset in FINDERS:
            started = time.perf_counter()
            omega = find_omega(weights, args.n, method, PRESETS[preset])
            seconds = time.perf_counter() - started
            found = [len(set(omega[f"m{i}"].tolist()) & spikes) / args.n for i, (_, spikes) in enumerate(cases)]
            print(f"{label + ', ' + str(rank):<24}{name:<30}{sum(found) / len(found):>14.0%}"
                  f"{min(found):>7.0%}{seconds:>9.2f}")
        print(f"{'':<24}(the largest |X| is {largest:.1f}: a spike of {args.spike} is not the largest entry)")


if __name__ == "__main__":
    main()
