"""What pruning saves at inference, measured side by side in one process on one device, for
BERT-base built from its config: dense; 50 % unstructured (dense storage); the same as
export/compressed (disk size, load time); 3 / 6 / 9 heads removed per layer (the exported,
reloaded models); and 2:4 semi-structured where a GPU supports it. Latency at batch 1 and 32
(median of timed runs, the models interleaved) and peak memory of a batch-32 forward, each as a
ratio to the dense model.

    python scripts/bench_inference.py [--seq 128] [--repeats 3] [--heads 3 6 9]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from dsee_cli.core.arch import block_linears, weight_out_in
from dsee_cli.core.precision import resolve_precision
from dsee_cli.measure.costs import TimingSettings, compare_latency, forward_peak_bytes, semi_structured
from dsee_cli.pruning import prune_heads
from dsee_cli.run.export import export_compressed, export_merged, load_merged


def magnitude_prune(model: torch.nn.Module, sparsity: float) -> None:
    """Zero the smallest |W| of every block linear (per layer): unstructured, dense storage."""
    with torch.no_grad():
        for module in block_linears(model).values():
            w = weight_out_in(module)
            k = int(sparsity * w.numel())
            threshold = w.abs().flatten().kthvalue(k).values
            w.mul_(w.abs() > threshold)


def two_four_prune(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in block_linears(model).values():
            w = weight_out_in(module)
            groups = w.abs().view(w.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
            w.mul_(keep.view_as(w))


def timed_load(path: Path) -> tuple[torch.nn.Module, float]:
    started = time.perf_counter()
    model = load_merged(path)
    return model, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", type=int, nargs="+", default=[3, 6, 9])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    dense = BertForSequenceClassification(BertConfig()).eval()
    models: dict[str, torch.nn.Module] = {"dense": dense}
    disk: dict[str, int] = {}
    load: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_merged(dense, None, tmp / "dense", dense)
        models["dense"], load["dense"] = timed_load(tmp / "dense")
        disk["dense"] = (tmp / "dense" / "model.safetensors").stat().st_size
        pruned = BertForSequenceClassification(BertConfig()).eval()
        pruned.load_state_dict(dense.state_dict())
        magnitude_prune(pruned, 0.5)
        export_merged(pruned, None, tmp / "u50", pruned)
        models["50% unstructured"], load["50% unstructured"] = timed_load(tmp / "u50")
        disk["50% unstructured"] = (tmp / "u50" / "model.safetensors").stat().st_size
        info = export_compressed(pruned, None, tmp / "c50")
        models["50% compressed"], load["50% compressed"] = timed_load(tmp / "c50")
        disk["50% compressed"] = (tmp / "c50" / "model.safetensors").stat().st_size
        for k in args.heads:
            model = BertForSequenceClassification(BertConfig()).eval()
            model.load_state_dict(dense.state_dict())
            prune_heads(model, {layer: list(range(k)) for layer in range(12)})
            export_merged(model, None, tmp / f"h{k}", model)
            name = f"-{k} heads/layer"
            models[name], load[name] = timed_load(tmp / f"h{k}")
            disk[name] = (tmp / f"h{k}" / "model.safetensors").stat().st_size
    models = {name: m.to(device) for name, m in models.items()}
    settings = TimingSettings(seq_len=args.seq, warmup=1, repeats=args.repeats)
    latency = compare_latency(models, device, precision, settings)
    memory = {name: forward_peak_bytes(m, device, precision, 32, args.seq) for name, m in models.items()}
    print(f"BERT-base from its config, sequence length {args.seq}, {device} ({precision.name}), "
          f"{torch.get_num_threads()} threads,\nmedian of {args.repeats} (models interleaved); ratios to dense")
    print(f"{'variant':18} {'b1 ms':>9} {'b32 ms':>9} {'speed-up b1':>11} {'b32':>6} {'memory':>7} "
          f"{'disk':>6} {'load s':>7}")
    for name in models:
        print(f"{name:18} {latency[name][1] * 1e3:9.1f} {latency[name][32] * 1e3:9.1f} "
              f"{latency['dense'][1] / latency[name][1]:11.2f}x {latency['dense'][32] / latency[name][32]:5.2f}x "
              f"{memory[name] / memory['dense']:6.2f}x {disk[name] / disk['dense']:5.2f}x {load[name]:7.2f}")
    ratio = info["linears_compressed_bytes"] / info["linears_dense_bytes"]
    print(f"compressed: the pruned linears take {ratio:.3f}x their dense bytes ((1 - 0.5) + 1/32 = 0.531 "
          f"expected);\nthe whole file {disk['50% compressed'] / disk['50% unstructured']:.3f}x export/merged's")
    two_four = BertForSequenceClassification(BertConfig()).eval()
    two_four.load_state_dict(dense.state_dict())
    two_four_prune(two_four)
    result = semi_structured(two_four, device, precision, 2, 4, TimingSettings(seq_len=args.seq, repeats=args.repeats))
    print(f"2:4 semi-structured: {'used' if result['used'] else 'not used'}:\n  {result['why']}"
          + (f"; speed-up {result['speedup']}" if "speedup" in result else ""))


if __name__ == "__main__":
    main()
