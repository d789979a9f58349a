"""Deep prompts through PEFT's prefix encoder: prefix tuning (reparameterised through an MLP,
Li & Liang), P-tuning v2 (without), and the prefix half of MAM. Virtual tokens go into every
layer's keys and values."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from dsee_cli.errors import DSEEError


@dataclass
class PromptConfig:
    """``adapter.prompt``: the deep prompts of prefix / ptuning-v2 / mam (PEFT's prefix encoder)."""

    length: int = 16  # virtual tokens per layer
    projection: bool = False  # prefix: reparameterise the prompts through an MLP
    hidden: int = 512  # prefix: that MLP's hidden size

    def check(self) -> None:
        if self.length < 1 or self.hidden < 1:
            raise DSEEError(f"adapter.prompt.length={self.length} and .hidden={self.hidden} must be >= 1.")


class _PrefixInjector:
    """A forward pre-hook: PEFT's prompt as past keys/values, the attention mask extended."""

    def __init__(self, peft_model, length: int, cache_key: str):
        self.peft_model = peft_model
        self.length = length
        self.cache_key = cache_key  # transformers 5 names it cache (past_key_values before)

    def __call__(self, module: nn.Module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = ids.shape[0]
        cache = kwargs.get(self.cache_key)
        if cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
            # the first forward (training, or generation's first step); later decoding steps
            # already carry the prompt in their cache
            kwargs[self.cache_key] = self.peft_model.get_prompt(batch_size=batch)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, self.length), mask], dim=1)
        return args, kwargs


def add_prefix(model: nn.Module, s: PromptConfig) -> None:
    from peft import PeftModel, PrefixTuningConfig

    config = PrefixTuningConfig(num_virtual_tokens=s.length, prefix_projection=s.projection,
                                encoder_hidden_size=s.hidden, task_type=None)
    peft_model = PeftModel(model, config)  # builds the prompt encoder; freezes the model
    model.add_module("prefix_encoder", peft_model.prompt_encoder)
    # on the base model (the blocks' stack), which the task head's and the LM loss's forwards both call
    base = model.base_model
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    base.register_forward_pre_hook(_PrefixInjector(peft_model, s.length, key), with_kwargs=True)
