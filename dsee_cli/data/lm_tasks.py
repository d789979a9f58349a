"""Language-model tasks for decoder LLMs: instruction tuning and perplexity.

* ``instruct``: JSON lines or Parquet rows, Alpaca's ``instruction`` / ``input`` / ``output`` or a
  ``messages`` list (role, content) put through the tokenizer's chat template. The loss covers
  the response only; no packing (one example per row); BOS and EOS as the tokenizer defines them
  (its post-processor adds BOS to a plain prompt, the chat template writes its own markers, EOS
  ends every response). Selection on the validation file, never on the reported test file.
* ``wikitext2``-style perplexity: the text joined with "\\n\\n", tokenised once, cut into
  non-overlapping windows of ``task.seq_len`` tokens (the tail shorter than a window dropped),
  perplexity = exp(mean token NLL over the windows). That is the token-level figure Wanda and
  SparseGPT report; lm-eval-harness's ``wikitext`` task reports a word-level perplexity, which
  is a different number. Trained as a causal LM on windows of the train text.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsee_cli.core import dist
from dsee_cli.core.precision import FP32, Precision
from dsee_cli.data.classification import DataSource, train_slice
from dsee_cli.data.generation import LMEncoded, target_nll
from dsee_cli.data.hub import HubSource, read_splits, require_columns, with_overrides
from dsee_cli.errors import DSEEError

ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
PERPLEXITY_TASKS = {"wikitext2": HubSource("Salesforce/wikitext", "main", "wikitext-2-raw-v1")}
LM_TASKS = ("instruct", *PERPLEXITY_TASKS)


@dataclass
class Instruction:
    prompt: list[dict] | str  # chat messages before the response, or a plain prompt
    response: str


# -- instruction data -------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DSEEError(f"{path} does not exist (expected a .jsonl or .parquet file of instructions).")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DSEEError(f"{path}:{n}: not a JSON line ({exc.msg}).") from None
    return rows


def to_instruction(row: dict, where: str) -> Instruction:
    """Alpaca's fields, or ``messages`` whose last turn is the assistant's response."""
    if "messages" in row:
        messages = list(row["messages"])
        if not messages or messages[-1].get("role") != "assistant":
            raise DSEEError(f"{where}: a messages row must end with the assistant's turn (the response).")
        return Instruction(messages[:-1], messages[-1]["content"])
    if "instruction" in row and "output" in row:
        return Instruction([{"role": "user", "content": "\n\n".join(x for x in (row["instruction"], row.get("input"))
                                                                     if x)}], row["output"])
    raise DSEEError(f"{where}: an instruction row has instruction / input / output (Alpaca) or messages (role, "
                    f"content); this one has {sorted(row)}.")


def synthetic_instructions(n: int, seed: int) -> list[Instruction]:
    """A learnable stand-in: copy or reverse a few synthetic words, as asked."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(48, 112)}" for _ in range(rng.randint(2, 5))]
        verb = rng.choice(("copy", "reverse"))
        answer = words if verb == "copy" else words[::-1]
        out.append(Instruction([{"role": "user", "content": f"{verb} : {' '.join(words)}"}], " ".join(answer)))
    return out


def load_instructions(s: DataSource, seed: int, split: str) -> tuple[list[Instruction], list[Instruction], str]:
    """(train, evaluation) examples: the evaluation is the validation file (selection), or with
    ``split=test`` the test file (``dsee eval --split test``)."""
    if s.synthetic_standin:
        return synthetic_instructions(s.synthetic_train, seed), \
            synthetic_instructions(s.synthetic_eval, seed + 10_000), "synthetic stand-in for instruct"
    files = {"validation": s.validation_file, "test": s.test_file}
    if not s.train_file or not files.get(split):
        raise DSEEError(f"task=instruct reads local files: task.train_file=train.jsonl (or .parquet) and "
                        f"task.{split if split == 'test' else 'validation'}_file=... (rows with instruction / input / "
                        f"output, or messages); profile=smoke needs none.")
    rows = {name: _read_rows(Path(path)) for name, path in (("train", s.train_file), (split, files[split]))}
    data = {name: [to_instruction(r, f"{name} row {i + 1}") for i, r in enumerate(v)] for name, v in rows.items()}
    train = train_slice(data["train"], s.max_train_samples, s.train_subset)
    evaluation = data[split][: s.max_eval_samples or None]
    if not train or not evaluation:
        raise DSEEError(f"task=instruct: {s.train_file} or {files[split]} has no rows.")
    return train, evaluation, f"{s.train_file}, {files[split]}"


def _prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    instruction = prompt[-1]["content"]
    text = ALPACA_PROMPT.format(context="", instruction=instruction, input="")
    return tokenizer(text)["input_ids"]  # with BOS where the tokenizer adds one


def encode_instructions(examples: list[Instruction], tokenizer, max_length: int) -> LMEncoded:
    """Prompt then response + EOS; the loss on the response only (labels −100 on the prompt)."""
    ids, labels, prompts = [], [], []
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt = _prompt_ids(tokenizer, ex.prompt)[: max_length // 2]
        answer = (tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [eos])[: max_length - len(prompt)]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
        prompts.append(prompt)
    return LMEncoded(ids, labels, prompts, [(ex.response,) for ex in examples])


# -- perplexity ------------------------------------------------------------------------------------
def _text_of(path: Path) -> str:
    if not path.is_file():
        raise DSEEError(f"{path} does not exist (expected a .txt / .raw text file, or .parquet with a text column).")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return "\n\n".join(pq.read_table(path, columns=["text"]).column("text").to_pylist())
    return path.read_text(encoding="utf-8")


def synthetic_text(n_words: int, seed: int) -> str:
    """A stand-in corpus with structure to learn: ascending runs of synthetic words."""
    rng = random.Random(seed)
    words = []
    while len(words) < n_words:
        start = rng.randrange(48, 100)
        words += [f"w{start + k}" for k in range(rng.randint(3, 8))] + ["."]
    return " ".join(words)


def _local_file(s: DataSource, split: str) -> str | None:
    named = {"train": s.train_file, "validation": s.validation_file, "test": s.test_file}[split]
    if named:
        return named
    if s.data_dir:  # the WikiText download: wiki.{train,valid,test}.{raw,tokens}
        stem = {"train": "train", "validation": "valid", "test": "test"}[split]
        for name in (f"wiki.{stem}.raw", f"wiki.{stem}.tokens", f"{stem}.txt", f"{split}.txt"):
            if Path(s.data_dir, name).is_file():
                return str(Path(s.data_dir, name))
        raise DSEEError(f"task.data_dir={s.data_dir!r} has no wiki.{stem}.raw, wiki.{stem}.tokens or {stem}.txt.")
    return None


def load_texts(s: DataSource, seed: int, splits: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """The text of each split (joined with "\\n\\n" from the Hub's rows, as Wanda / SparseGPT do)."""
    if s.synthetic_standin:
        return {split: synthetic_text(4000 if split == "train" else 800, seed + k)
                for k, split in enumerate(splits)}, f"synthetic stand-in for {s.name}"
    local = {split: _local_file(s, split) for split in splits}
    if all(local.values()):
        return {split: _text_of(Path(path)) for split, path in local.items()}, ", ".join(local.values())
    if any(local.values()):
        missing = [split for split, path in local.items() if not path]
        raise DSEEError(f"task={s.name}: give a file for every split it reads ({', '.join(splits)}); missing "
                        f"{', '.join(missing)} (task.train_file / validation_file / test_file, or task.data_dir).")
    source = with_overrides(PERPLEXITY_TASKS[s.name], s.hub_repo, s.hub_revision, s.hub_config)
    rows = read_splits(source, list(splits), repr(s.name),
                       "task.data_dir=/path/to/wikitext-2-raw (wiki.train.raw, wiki.valid.raw, wiki.test.raw) or "
                       "task.train_file / validation_file / test_file; profile=smoke needs no data at all.")
    for split in splits:
        require_columns(rows[split], ("text",), repr(s.name), source, split)
    return {split: "\n\n".join(r["text"] for r in rows[split]) for split in splits}, \
        f"hub:{source.repo}@{source.revision}/{source.config}"


def windows(tokenizer, text: str, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """(n, seq_len) non-overlapping windows of the tokenised text; the tail is dropped."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    if n == 0:
        raise DSEEError(f"the text has {ids.numel()} tokens, fewer than one window of task.seq_len={seq_len}.")
    if limit:
        n = min(n, limit)
    return ids[: n * seq_len].view(n, seq_len)


def windows_as_lm(w: torch.Tensor) -> LMEncoded:
    rows = w.tolist()
    return LMEncoded(rows, [list(r) for r in rows], [[] for _ in rows], [("",) for _ in rows])


@torch.no_grad()
def perplexity(model: nn.Module, w: torch.Tensor, device, batch_size: int, precision: Precision = FP32
               ) -> dict[str, float]:
    """Token-level perplexity over non-overlapping windows (Wanda / SparseGPT's eval_ppl): every
    token after a window's first is a target."""
    model.eval()
    sums = {}
    for i, start, end in dist.my_batches(len(w), batch_size):
        ids = w[start:end].to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        sums[i] = target_nll(model, batch, precision)[:2]
    nll = tokens = 0.0
    for loss, n in dist.gather_in_order(sums):
        nll, tokens = nll + loss, tokens + n
    return {"ppl": math.exp(nll / max(1, tokens)), "loss": nll / max(1, tokens)}
