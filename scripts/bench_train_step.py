"""One training step (forward + backward + AdamW) of a BERT-base-sized model: our DSEE
adapters vs PEFT LoRA (same r, same modules) vs a dense masked S as the reference code
stored it, measured side by side in one run (interleaved, median of repeats).

    python scripts/bench_train_step.py [--batch 8] [--seq 128] [--repeats 7] [--layers 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from dsee_cli.tuning.adapters import LowRankConfig, adapters_of, inject_adapters, omega_keys, set_omegas


class DenseMaskedS(nn.Module):
    """The reference code's storage: LoRA plus a dense m x n trainable S times a fixed mask."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, omega: torch.Tensor):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.S = nn.Parameter(torch.zeros(base.out_features, base.in_features))
        mask = torch.zeros(base.out_features * base.in_features)
        mask[omega] = 1
        self.register_buffer("mask", mask.view_as(self.S))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling + x @ (self.S * self.mask).t()


def build(kind: str, layers: int, rank: int, omega: int) -> nn.Module:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=layers))
    if kind == "peft-lora":
        import peft

        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], lora_dropout=0.0,
                              modules_to_save=["classifier"])
        return peft.get_peft_model(model, cfg)
    if kind == "dense-S":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.bert.encoder.layer:
            sa = layer.attention.self
            sa.query = DenseMaskedS(sa.query, rank, 2 * rank, torch.arange(omega) * 7)
            sa.value = DenseMaskedS(sa.value, rank, 2 * rank, torch.arange(omega) * 7)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        return model
    inject_adapters(model, LowRankConfig(rank=rank, alpha=2 * rank, omega_size=omega))
    adapters = adapters_of(model)
    set_omegas(adapters, {k: torch.arange(omega) * 7 for k in omega_keys(adapters)})
    return model


def optimizer_state_numel(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() for st in opt.state.values() for k, v in st.items() if k != "step")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--omega", type=int, default=16)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kinds = ["dsee", "peft-lora", "dense-S"]
    models = {k: build(k, args.layers, args.rank, args.omega).to(device).train() for k in kinds}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30000, (args.batch, args.seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)

    def step(kind: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = models[kind](input_ids=ids, labels=labels).loss
        loss.backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for k in kinds:  # warm-up, and creates the optimizer state
        step(k)
    times = {k: [] for k in kinds}
    for _ in range(args.repeats):  # interleaved, so drift hits all three alike
        for k in kinds:
            times[k].append(step(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    state = {k: optimizer_state_numel(o) for k, o in opts.items()}
    print(f"BERT-base-sized ({args.layers} layers), batch {args.batch} x {args.seq}, r={args.rank}, "
          f"card(Ω)={args.omega}, {device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for k in kinds:
        print(f"  {k:10s} step {med[k] * 1000:8.1f} ms   trainable {trainable[k]:>11,}   AdamW state {state[k]:>11,}")
    print(f"step time  DSEE / PEFT LoRA = {med['dsee'] / med['peft-lora']:.3f}x")
    print(f"step time  DSEE / dense masked S = {med['dsee'] / med['dense-S']:.3f}x")
    print(f"optimizer state  DSEE / PEFT LoRA = {state['dsee'] / state['peft-lora']:.4f}")
    print(f"optimizer state  dense masked S / DSEE = {state['dense-S'] / state['dsee']:.1f}x")


if __name__ == "__main__":
    main()
