"""Language-model tasks for decoder LLMs: instruction tuning and perplexity.

* ``instruct``: JSON lines or Parquet rows, Alpaca's ``instruction`` / ``input`` / ``output`` or a
  ``messages`` list (role, content) put through the tokenizer's chat template. The loss covers
  the response only; no packing (one example per row); BOS and EOS as the tokenizer defines them
  (its post-processor adds BOS to a plain prompt, the chat template writes its own markers, EOS
  ends every response). Selection on the validation file, never on the reported test file.
* ``pydoc``: real English text that needs no download, Python's own documentation topics
  (``pydoc_data.topics``, ~465 k characters, ~113 k SmolLM2 tokens), split by topic; the offline
  real-model substrate (profile=mini of the LLM experiments).
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
# a perplexity corpus: from the Hub, or None: built in (pydoc: Python's documentation, see pydoc_texts)
PERPLEXITY_TASKS: dict[str, HubSource | None] = {
    "wikitext2": HubSource("Salesforce/wikitext", "main", "wikitext-2-raw-v1"),
    "pydoc": None,
}
# Alpaca (52k instructions, one train split): a fixed 2,000 held out as the validation split
INSTRUCT_HUB = HubSource("tatsu-lab/alpaca", "main", "data")
INSTRUCT_HELD_OUT = 2000
LM_TASKS = ("instruct", *PERPLEXITY_TASKS)


@dataclass
class Instruction:
    prompt: list[dict] | str  # chat messages before the response, or a plain prompt
    response: str


# -- instruction data -------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
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
    local = (f"task.train_file=train.jsonl (or .parquet) and task.{split if split == 'test' else 'validation'}"
             f"_file=... (rows with instruction / input / output, or messages); profile=smoke needs none.")
    if not (s.train_file or files.get(split)):
        return _hub_instructions(s, split, local)
    if not s.train_file or not files.get(split):
        raise DSEEError(f"task=instruct reads local files: {local}")
    rows = {name: read_rows(Path(path)) for name, path in (("train", s.train_file), (split, files[split]))}
    data = {name: [to_instruction(r, f"{name} row {i + 1}") for i, r in enumerate(v)] for name, v in rows.items()}
    where = f"{s.train_file}, {files[split]}"
    return _sliced(s, data["train"], data[split], where)


def _sliced(s: DataSource, train: list[Instruction], evaluation: list[Instruction], where: str):
    train = train_slice(train, s.max_train_samples, s.train_subset)
    evaluation = evaluation[: s.max_eval_samples or None]
    if not train or not evaluation:
        raise DSEEError(f"task=instruct: {where} has an empty training or evaluation split.")
    return train, evaluation, where


def _hub_instructions(s: DataSource, split: str, local: str):
    """Alpaca from the Hub: its one split, with a fixed held-out part (the same for every seed) as validation."""
    if split == "test":
        raise DSEEError(f"task=instruct on the Hub's Alpaca has no test split; give local files: {local}")
    source = with_overrides(INSTRUCT_HUB, s.hub_repo, s.hub_revision, s.hub_config)
    rows = read_splits(source, ["train"], "'instruct'", local)["train"]
    require_columns(rows, ("instruction", "output"), "'instruct'", source, "train")
    held_out = set(random.Random(0).sample(range(len(rows)), min(INSTRUCT_HELD_OUT, len(rows) // 10)))
    data = [to_instruction(r, f"train row {i + 1}") for i, r in enumerate(rows)]
    return _sliced(s, [x for i, x in enumerate(data) if i not in held_out],
                   [x for i, x in enumerate(data) if i in held_out], f"hub:{source.repo}@{source.revision}")


def _prompt_ids(tokenizer, prompt: list[dict] | str) -> list[int]:
    if isinstance(prompt, str):  # a plain prompt (the exact-match tasks with task.chat=false)
        return tokenizer(prompt)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    instruction, _, given = prompt[-1]["content"].partition("\n\n")
    text = ALPACA_PROMPT.format(context=", paired with an input that provides further context" if given else "",
                                instruction=instruction, input=f"### Input:\n{given}\n\n" if given else "")
    return tokenizer(text)["input_ids"]  # with BOS where the tokenizer adds one


def _keep_end(ids: list[int], cap: int, bos: int | None) -> list[int]:
    """A prompt over ``cap`` tokens loses its start, not its end (where the response is asked
    for); a leading BOS stays."""
    if len(ids) <= cap:
        return ids
    return [ids[0], *ids[len(ids) - cap + 1:]] if bos is not None and ids[0] == bos else ids[len(ids) - cap:]


def encode_instructions(examples: list[Instruction], tokenizer, max_length: int) -> LMEncoded:
    """Prompt then response + EOS; the loss on the response only (labels −100 on the prompt)."""
    ids, labels, prompts = [], [], []
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt = _keep_end(_prompt_ids(tokenizer, ex.prompt), max_length // 2, tokenizer.bos_token_id)
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


def pydoc_texts() -> tuple[dict[str, str], str]:
    """Python's documentation topics (``pydoc_data.topics``, shipped with CPython) in name order,
    cut at topic boundaries into the first ~80 % of the characters (train), the next ~10 %
    (validation) and the rest (test), so no text crosses splits; each split's topics joined with
    "\n\n"."""
    import sys
    from pydoc_data.topics import topics

    names = sorted(topics)
    total, seen = sum(len(topics[n]) for n in names), 0
    parts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for name in names:
        split = "train" if seen < 0.8 * total else "validation" if seen < 0.9 * total else "test"
        parts[split].append(topics[name])
        seen += len(topics[name])
    return {split: "\n\n".join(texts) for split, texts in parts.items()}, \
        f"pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor})"


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
        offset = {"train": 0, "validation": 10_000, "test": 20_000}  # each split its own text, whatever is asked
        return {split: synthetic_text(4000 if split == "train" else 800, seed + offset[split])
                for split in splits}, f"synthetic stand-in for {s.name}"
    local = {split: _local_file(s, split) for split in splits}
    if all(local.values()):
        return {split: _text_of(Path(path)) for split, path in local.items()}, ", ".join(local.values())
    if any(local.values()):
        missing = [split for split, path in local.items() if not path]
        raise DSEEError(f"task={s.name}: give a file for every split it reads ({', '.join(splits)}); missing "
                        f"{', '.join(missing)} (task.train_file / validation_file / test_file, or task.data_dir).")
    if PERPLEXITY_TASKS[s.name] is None:
        texts, where = pydoc_texts()
        return {split: texts[split] for split in splits}, where
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
        raise DSEEError(f"the text has {ids.numel()} tokens, fewer than one window of task.seq_len={seq_len}; "
                        f"give a longer text or a shorter task.seq_len.")
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


def check_lm_files(s: DataSource) -> None:
    """Fail before any model is loaded when the named local data is not there."""
    if s.synthetic_standin:
        return
    for key in ("train_file", "validation_file", "test_file", "data_dir"):
        value = getattr(s, key)
        if value and not Path(value).exists():
            raise DSEEError(f"task.{key}={value!r} does not exist.")


def load_lm_data(s: DataSource, seed: int) -> None:
    """Read the task's data once (offline: the Hub's hint within seconds)."""
    if s.name == "instruct":
        load_instructions(s, seed, "validation")
    else:
        load_texts(s, seed, ("train",))
