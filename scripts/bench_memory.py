"""Peak memory and step time of one LoRA training step on a RoBERTa-large-sized model (built from
its config, random weights) with and without trainer.gradient_checkpointing and a bf16 base
(model.dtype=bfloat16: the frozen weights in bf16 under bf16 autocast, LoRA and AdamW in fp32).
Each configuration runs in a fresh process (peak resident memory is per process); the table
gives the ratios against the fp32 baseline, side by side.

    python scripts/bench_memory.py [--batch 4] [--seq 128] [--steps 2] [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)]


def one(dtype: str, checkpointing: bool, opts) -> dict:
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from dsee_cli.cli import typed_config
    from dsee_cli.core.models import DTYPES, enable_gradient_checkpointing, trainable_in_fp32
    from dsee_cli.core.precision import resolve_precision
    from dsee_cli.tuning import prepare_method

    torch.manual_seed(0)
    config = RobertaConfig(hidden_size=1024, num_hidden_layers=opts.layers, num_attention_heads=16,
                           intermediate_size=4096, max_position_embeddings=514, vocab_size=50265, num_labels=2)
    model = RobertaForSequenceClassification(config).to(DTYPES[dtype])
    prepare_method(model, typed_config(["adapter=lora"]).adapter)
    trainable_in_fp32(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    precision = resolve_precision("auto", torch.device("cpu"), dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(5, 50000, (opts.batch, opts.seq))
    labels = torch.randint(0, 2, (opts.batch,))
    model.train()
    times = []
    for _ in range(opts.steps + 1):  # the first is a warm-up
        started = time.perf_counter()
        with precision.autocast():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak, "step_s": statistics.median(times[1:]), "weights_mib": weights / 2**20,
            "precision": precision.name, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        print(json.dumps(one(opts.one[0], opts.one[1] == "1", opts)))
        return
    rows = []
    for dtype, ckpt in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", dtype, str(int(ckpt)), f"--batch={opts.batch}",
                              f"--seq={opts.seq}", f"--steps={opts.steps}", f"--layers={opts.layers}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        rows.append((dtype, ckpt, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[0][2]
    print(f"RoBERTa-large size ({opts.layers} layers, 355M params at 24), LoRA r=16 on q,v, batch {opts.batch} x "
          f"{opts.seq} tokens, CPU")
    print(f"{'base dtype':10}{'checkpointing':>15}{'precision':>12}{'weights MiB':>13}{'peak MiB':>10}{'x':>7}"
          f"{'step s':>9}{'x':>7}")
    for dtype, ckpt, r in rows:
        print(f"{dtype:10}{'yes' if ckpt else 'no':>15}{r['precision']:>12}{r['weights_mib']:13.0f}"
              f"{r['peak_mib']:10.0f}{r['peak_mib'] / base['peak_mib']:7.2f}{r['step_s']:9.2f}"
              f"{r['step_s'] / base['step_s']:7.2f}")


if __name__ == "__main__":
    main()
