"""Calibration text for the one-shot pruners (Wanda, SparseGPT, ``delta_wanda``): N samples of L
tokens drawn with the run's seed, as Wanda's and SparseGPT's loaders do, from

* ``train``: the run's own training examples (whatever their length: the default);
* ``c4``: the first shard of C4's English train split, ``en/c4-train.00000-of-01024.json.gz``
  (what Wanda and SparseGPT read), one window from one document per sample (theirs: a random
  document longer than L, a random window of L tokens inside it);
* ``wikitext2``: WikiText-2's train text joined with " " (as their loaders join it), a random
  window of the whole;
* a local file: ``.txt`` (one text, joined), ``.jsonl`` / ``.json`` / ``.parquet`` (one document per
  row, its ``text_column``).

Documents are walked once, in an order drawn from the seed, so a source without documents
longer than L fails with a clear error (or, with ``join=true``, is concatenated) instead of
searching for ever (wanda#82). The token windows are cached by content: the source's bytes (or
its Hub repository, revision and file), the tokenizer, N, L, the seed and the joining.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsee_cli.atomic import atomic_path
from dsee_cli.data.hub import HubSource, read_file, read_splits
from dsee_cli.data.lm_tasks import PERPLEXITY_TASKS, synthetic_text
from dsee_cli.errors import DSEEError, choice_error

C4 = HubSource("allenai/c4", "main", "en")
C4_FILE = "en/c4-train.00000-of-01024.json.gz"  # Wanda's and SparseGPT's calibration shard
WIKITEXT2 = PERPLEXITY_TASKS["wikitext2"]
# what joins a source's documents where they are joined: WikiText-2's rows with " " (Wanda's and
# SparseGPT's loaders), a local text's paragraphs as they are
JOINERS = {"wikitext2": " "}
HUB_SOURCES = ("c4", "wikitext2")
SOURCES = ("train", *HUB_SOURCES)  # or a path to a local file
LOCAL_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet")


@dataclass
class CalibrationConfig:
    """``pruning.calibration``: what Wanda / SparseGPT / delta_wanda read (metrics.json records it)."""

    source: str = "train"  # train (the run's training examples), c4, wikitext2, or a local .txt/.jsonl/.parquet
    samples: int = 128  # N: how many windows (or training examples, source=train) are drawn
    seq_len: int = 0  # L, tokens per sample; 0: task.seq_len (bounded by the model's context and task.seq_len)
    join: bool | None = None  # concatenate the documents; null: the source's usual (wikitext2 and .txt joined)
    text_column: str = "text"  # the column of a .jsonl / .parquet source

    @property
    def from_text(self) -> bool:
        return self.source != "train"

    def check(self) -> None:
        if self.samples < 1:
            raise DSEEError(f"pruning.calibration.samples={self.samples} must be >= 1.")
        if self.seq_len < 0:
            raise DSEEError(f"pruning.calibration.seq_len={self.seq_len} must be >= 0 (0: task.seq_len).")
        if self.source in SOURCES:
            return
        path = Path(self.source).expanduser()
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise choice_error("calibration source (pruning.calibration.source)", self.source,
                               (*SOURCES, "/path/to/file" + "|".join(LOCAL_SUFFIXES)))
        if not path.is_file():
            raise DSEEError(f"pruning.calibration.source={self.source!r} does not exist (a local calibration file: "
                            f"{', '.join(LOCAL_SUFFIXES)}; or one of {', '.join(SOURCES)}).")

    def joined(self) -> bool:
        if self.join is not None:
            return self.join
        return self.source == "wikitext2" or Path(self.source).suffix.lower() in (".txt", ".raw")


@dataclass
class CalibrationInputs:
    """What a calibrated pruner reads: the batches (on the model's device), what they were (for
    metrics.json), and the run's precision context that the forward passes run under."""

    batches: list[dict[str, torch.Tensor]]
    info: dict
    autocast: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)


def window_length(requested: int, task_seq_len: int, context: int | None) -> int:
    """L: the request (0: task.seq_len), bounded by task.seq_len and the model's context."""
    length = min(requested or task_seq_len, task_seq_len)
    return min(length, context) if context else length


def _local_documents(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw"):
        return [path.read_text(encoding="utf-8")]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise DSEEError(f"{path} has no column {column!r} (pruning.calibration.text_column); its columns: "
                            f"{', '.join(table.column_names)}.")
        return [t for t in table.column(column).to_pylist() if t]
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if suffix == ".json" and text.lstrip().startswith("[") else \
        [json.loads(line) for line in text.splitlines() if line.strip()]
    missing = [i for i, r in enumerate(rows) if column not in r]
    if missing:
        raise DSEEError(f"{path}: row {missing[0] + 1} has no {column!r} field (pruning.calibration.text_column).")
    return [r[column] for r in rows if r[column]]


def hub_origin(source: str) -> str:
    """Where a Hub source's text comes from, exactly (its cache key and metrics.json's record)."""
    if source == "c4":
        return f"hub:{C4.repo}@{C4.revision}/{C4_FILE}"
    return f"hub:{WIKITEXT2.repo}@{WIKITEXT2.revision}/{WIKITEXT2.config}/train"


def _hub_documents(source: str) -> tuple[list[str], str]:
    local_way = ("pruning.calibration.source=/path/to/c4-train.00000-of-01024.jsonl (or .parquet) with a text "
                 "column, or pruning.calibration.source=train (the run's own training data).")
    what = f"calibration text ({source})"
    if source == "c4":
        rows = read_file(C4, C4_FILE, what, local_way)
    else:
        rows = read_splits(WIKITEXT2, ["train"], what, local_way)["train"]
    return [r["text"] for r in rows if r.get("text")], hub_origin(source)


def documents(cfg: CalibrationConfig, standin: bool = False, seed: int = 0) -> tuple[list[str], str]:
    """The source's documents and where they came from (``standin``, profile=smoke: a Hub source's
    place is taken by documents of the synthetic language, as the task's data is)."""
    if standin and cfg.source in HUB_SOURCES:
        return [synthetic_text(300, seed + 30_000 + i) for i in range(64)], f"synthetic stand-in for {cfg.source}"
    if cfg.source in HUB_SOURCES:
        return _hub_documents(cfg.source)
    path = Path(cfg.source).expanduser()
    return _local_documents(path, cfg.text_column), str(path)


def sample_windows(docs: list[str], tokenizer, n: int, length: int, seed: int, join: bool, joiner: str = "\n\n"
                   ) -> torch.Tensor:
    """(n, length) token windows. Joined (with ``joiner``): random windows of the whole text. Per document: documents
    in a seeded order, each longer than ``length`` giving one random window, cycling over those
    found when there are fewer than n; never an unbounded search."""
    rng = random.Random(seed)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if join:
        stream = ids(joiner.join(docs))
        if len(stream) <= length:
            raise DSEEError(f"calibration: the joined text has {len(stream)} tokens, not more than one window of "
                            f"{length}; give a longer source or a shorter pruning.calibration.seq_len.")
        starts = [rng.randint(0, len(stream) - length - 1) for _ in range(n)]
        return torch.tensor([stream[s:s + length] for s in starts], dtype=torch.long)
    order = list(range(len(docs)))
    rng.shuffle(order)
    out: list[list[int]] = []
    long_enough: list[list[int]] = []
    longest = 0
    for i in order:
        if len(out) == n:
            break
        doc = ids(docs[i])
        longest = max(longest, len(doc))
        if len(doc) > length:
            long_enough.append(doc)
            start = rng.randint(0, len(doc) - length - 1)
            out.append(doc[start:start + length])
    if not long_enough:
        raise DSEEError(f"calibration: none of the {len(docs)} documents has more than {length} tokens (the longest "
                        f"has {longest}). Set pruning.calibration.join=true to concatenate the documents, or a "
                        f"shorter pruning.calibration.seq_len (or task.seq_len).")
    while len(out) < n:  # fewer long documents than samples: more windows from those found
        doc = long_enough[rng.randrange(len(long_enough))]
        start = rng.randint(0, len(doc) - length - 1)
        out.append(doc[start:start + length])
    return torch.tensor(out, dtype=torch.long)


def _fingerprint(cfg: CalibrationConfig, tokenizer, n: int, length: int, seed: int) -> str:
    h = hashlib.sha256()
    if cfg.source in HUB_SOURCES:
        h.update(hub_origin(cfg.source).encode())
    else:
        h.update(Path(cfg.source).expanduser().read_bytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(json.dumps([n, length, seed, cfg.joined(), cfg.text_column]).encode())
    return h.hexdigest()[:20]


def calibration_windows(cfg: CalibrationConfig, tokenizer, length: int, seed: int, cache_dir: Path | None,
                        standin: bool = False) -> tuple[torch.Tensor, dict]:
    """The (N, L) windows of a text source, tokenised once and cached; and what metrics.json records."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = _fingerprint(cfg, tokenizer, cfg.samples, length, seed) + ("-standin" if standin else "")
    cached = cache_dir / f"{key}.safetensors" if cache_dir else None
    info = {"source": cfg.source, "samples": cfg.samples, "seq_len": length, "joined": cfg.joined(), "seed": seed,
            "fingerprint": key}
    if cached is not None and cached.is_file():
        with safe_open(str(cached), framework="pt") as f:
            return f.get_tensor("input_ids"), {**info, "cached": True, "from": (f.metadata() or {}).get("from", "")}
    docs, where = documents(cfg, standin, seed)
    w = sample_windows(docs, tokenizer, cfg.samples, length, seed, cfg.joined(), JOINERS.get(cfg.source, "\n\n"))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            save_file({"input_ids": w.contiguous()}, str(tmp), metadata={"from": where})
    return w, {**info, "cached": False, "from": where}


def window_batches(w: torch.Tensor, tokens_per_batch: int = 16_384) -> list[dict[str, torch.Tensor]]:
    """The windows as model inputs, a few per batch (one block's activations of all of them are
    kept; a batch is bounded in tokens so that attention over long windows stays small)."""
    size = max(1, tokens_per_batch // w.shape[1])
    return [{"input_ids": w[i:i + size], "attention_mask": torch.ones_like(w[i:i + size])}
            for i in range(0, len(w), size)]
