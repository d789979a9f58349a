"""One training step (forward + backward + AdamW) of a BERT-base-sized model: our DSEE
adapters vs PEFT LoRA (same r, same modules) vs a dense masked S as the reference code
stored it, measured side by side in one run (interleaved, median of repeats).

``--arch llama-1b``: a decoder LLM at Llama-3.2-1B's shape (16 layers, 2048 hidden, 32 / 8
heads, 8192 SwiGLU channels, 128k vocabulary; random weights, the frozen base in bf16 under
bf16 autocast), DSEE vs PEFT LoRA on q, v, the causal-LM loss on the batch's last half; step
time and the step's own peak memory (peak minus what was resident before it: activations,
gradients, optimizer state) side by side.

    python scripts/bench_train_step.py [--batch 8] [--seq 128] [--repeats 7] [--layers 12]
    python scripts/bench_train_step.py --arch llama-1b [--batch 1] [--seq 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from dsee_cli.core.models import trainable_in_fp32
from dsee_cli.data.generation import lm_loss
from dsee_cli.measure.costs import current_memory_bytes, peak_memory_bytes, reset_peak_memory
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


def llama_1b(layers: int = 16, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A Llama at Llama-3.2-1B's shape from config, random weights (scripts/bench_llm_memory.py uses it too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()  # as Llama-3.2-1B: the LM head is the embedding
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    return model


def build(kind: str, layers: int, rank: int, omega: int, arch: str = "bert-base") -> nn.Module:
    torch.manual_seed(0)
    llm = arch == "llama-1b"
    model = llama_1b(layers) if llm else BertForSequenceClassification(BertConfig(num_hidden_layers=layers))
    if kind == "peft-lora":
        import peft

        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"] if llm else
                              ["query", "value"], lora_dropout=0.0, modules_to_save=None if llm else ["classifier"])
        model = peft.get_peft_model(model, cfg)
        for p in model.parameters():  # trained in fp32 over the bf16 base, as ours
            if p.requires_grad:
                p.data = p.data.float()
        return model
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
    trainable_in_fp32(model)
    return model


def optimizer_state_numel(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() for st in opt.state.values() for k, v in st.items() if k != "step")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=("bert-base", "llama-1b"), default="bert-base")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--omega", type=int, default=16)
    args = ap.parse_args()
    llm = args.arch == "llama-1b"
    batch, seq = args.batch or (1 if llm else 8), args.seq or (256 if llm else 128)
    repeats, layers = args.repeats or (3 if llm else 7), args.layers or (16 if llm else 12)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kinds = ["dsee", "peft-lora"] if llm else ["dsee", "peft-lora", "dense-S"]
    models = {k: build(k, layers, args.rank, args.omega, args.arch).to(device).train() for k in kinds}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30000, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (batch,), generator=gen).to(device)
    lm_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.where(torch.arange(seq, device=device) < seq // 2, -100, ids)}
    peaks: dict[str, list[int]] = {k: [] for k in kinds}

    def step(kind: str) -> float:
        reset_peak_memory(device)
        before = current_memory_bytes(device)
        t = time.perf_counter()
        if llm:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = lm_loss(models[kind], lm_batch)
        else:
            loss = models[kind](input_ids=ids, labels=labels).loss
        loss.backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        peaks[kind].append(peak_memory_bytes(device) - before)
        return seconds

    for k in kinds:  # warm-up, and creates the optimizer state
        step(k)
    times = {k: [] for k in kinds}
    for _ in range(repeats):  # interleaved, so drift hits all alike
        for k in kinds:
            times[k].append(step(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: statistics.median(v[1:]) for k, v in peaks.items()}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    state = {k: optimizer_state_numel(o) for k, o in opts.items()}
    shape = "Llama-3.2-1B-shaped, bf16 base" if llm else "BERT-base-sized"
    print(f"{shape} ({layers} layers), batch {batch} x {seq}, r={args.rank}, card(Ω)={args.omega}, {device}, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    for k in kinds:
        print(f"  {k:10s} step {med[k] * 1000:8.1f} ms   step peak {peak[k] / 2**20:8.1f} MiB   "
              f"trainable {trainable[k]:>11,}   AdamW state {state[k]:>11,}")
    print(f"step time  DSEE / PEFT LoRA = {med['dsee'] / med['peft-lora']:.3f}x")
    print(f"step peak memory  DSEE / PEFT LoRA = {peak['dsee'] / max(1, peak['peft-lora']):.3f}x")
    print(f"optimizer state  DSEE / PEFT LoRA = {state['dsee'] / state['peft-lora']:.4f}")
    if not llm:
        print(f"step time  DSEE / dense masked S = {med['dsee'] / med['dense-S']:.3f}x")
        print(f"optimizer state  dense masked S / DSEE = {state['dense-S'] / state['dsee']:.1f}x")


if __name__ == "__main__":
    main()
