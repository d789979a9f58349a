"""Data-to-text generation with GPT-2 (DSEE Tables 2 and 4): E2E, WebNLG and DART.

Data: the Hub (via ``datasets``), or local files in the formats people have: the E2E CSVs
(``mr,ref``), the LoRA repository's text format (``name : X | type : Y || reference``), or JSON
lines (``{"source": ..., "target": ...}``, also ``input``/``mr`` and ``references``). Training uses
one (input, reference) pair per example; evaluation groups all references of each input.

Training is causal-LM on the target only: the prompt ``<input> ||`` is masked out of the loss.
Decoding is batched beam search (left padding). The metrics are in ``nlg_metrics.py``.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsee_cli.core import dist
from dsee_cli.core.precision import FP32, Precision
from dsee_cli.data.classification import DataSource, pad, train_slice
from dsee_cli.data.hub import PARQUET_EXPORT, HubSource, read_splits, require_columns, with_overrides
from dsee_cli.errors import DSEEError

SEPARATOR = " ||"
# What each task reports (DSEE Table 4): E2E BLEU / METEOR / NIST (+ ROUGE-L, CIDEr), others TER.
# The Hub source is the GEM repository's Parquet export (its loading script is refused by
# datasets >= 4); "input" names the column that holds the structured input.
NLG_TASKS: dict[str, dict] = {
    "e2e": {"hub": HubSource("GEM/e2e_nlg", PARQUET_EXPORT, "default"), "input": "meaning_representation",
            "metrics": ("bleu", "nist", "meteor", "rouge_l", "cider", "ter")},
    "webnlg": {"hub": HubSource("GEM/web_nlg", PARQUET_EXPORT, "en"), "input": "input",
               "metrics": ("bleu", "meteor", "ter", "nist")},
    "dart": {"hub": HubSource("GEM/dart", PARQUET_EXPORT, "default"), "input": "tripleset",
             "metrics": ("bleu", "meteor", "ter", "nist")},
}
EVAL_SPLITS = ("validation", "test")


@dataclass
class NLGExample:
    source: str
    references: tuple[str, ...]


@dataclass
class NLGData:
    name: str
    train: list[tuple[str, str]]  # (source, one reference) pairs
    evals: dict[str, list[NLGExample]]  # split -> inputs with all their references
    source: str


def group(pairs: list[tuple[str, str]]) -> list[NLGExample]:
    """All references of each input, inputs in first-seen order."""
    refs: dict[str, list[str]] = {}
    for source, target in pairs:
        refs.setdefault(source, []).append(target)
    return [NLGExample(s, tuple(r)) for s, r in refs.items()]


# -- readers ------------------------------------------------------------------------------------
def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(source, reference) pairs from an E2E CSV, a LoRA-style text file or JSON lines."""
    if not path.is_file():
        raise DSEEError(f"{path} does not exist (expected an E2E CSV, a LoRA-style .txt or a .jsonl file).")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"mr", "ref"} <= set(reader.fieldnames):
                raise DSEEError(f"{path}: an E2E CSV needs the columns mr,ref; it has {reader.fieldnames}.")
            return [(row["mr"].strip(), row["ref"].strip()) for row in reader]
    if suffix in (".jsonl", ".json"):
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            source = row.get("source") or row.get("input") or row.get("mr")
            targets = row.get("references") or [row.get("target") or row.get("ref")]
            if source is None or not all(targets):
                raise DSEEError(f"{path}:{n}: a JSON line needs source (or input / mr) and target (or "
                                f"ref / references).")
            pairs += [(source.strip(), t.strip()) for t in targets]
        return pairs
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "||" not in line:
            raise DSEEError(f"{path}:{n}: a LoRA-style line is 'name : X | type : Y || reference'; this has no '||'.")
        source, _, target = line.partition("||")
        pairs.append((source.strip(), target.strip()))
    return pairs


def _find(data_dir: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for ext in (".csv", ".txt", ".jsonl", ".json"):
            if (data_dir / f"{stem}{ext}").is_file():
                return data_dir / f"{stem}{ext}"
    return None


def check_nlg_files(s: DataSource) -> None:
    """Fail before any model is loaded when the named local data is not there."""
    if s.synthetic_standin:
        return
    for what, value in (("task.train_file", s.train_file), ("task.validation_file", s.validation_file)):
        if value and not Path(value).is_file():
            raise DSEEError(f"{what}={value!r} does not exist.")
    if s.data_dir and not (s.train_file or s.validation_file):
        if not Path(s.data_dir).is_dir():
            raise DSEEError(f"task.data_dir={s.data_dir!r} does not exist: it should be a folder with train and "
                            f"valid / test files (E2E CSV, LoRA-style .txt, or JSON lines).")
        for split in dict.fromkeys((s.select_split, s.eval_split)):
            _dir_files(Path(s.data_dir), split)


def _dir_files(data_dir: Path, split: str) -> tuple[Path, Path]:
    train = _find(data_dir, ("train", "trainset"))
    wanted = ("valid", "validation", "dev", "devset") if split == "validation" else ("test", "testset_w_refs")
    evaluation = _find(data_dir, wanted)
    if train is None or evaluation is None:
        raise DSEEError(f"{data_dir} needs a training file (train.txt / trainset.csv / train.jsonl) and an "
                        f"evaluation file for split {split!r} ({' / '.join(wanted)} with .txt, .csv or .jsonl).")
    return train, evaluation


def load_dir(data_dir: Path, splits: tuple[str, ...]) -> tuple[list[tuple[str, str]], dict[str, list], str]:
    """train + the evaluation splits from a folder (LoRA's data/e2e layout or the E2E CSVs)."""
    files = {split: _dir_files(data_dir, split) for split in splits}
    train = next(iter(files.values()))[0]
    return read_pairs(train), {split: read_pairs(f[1]) for split, f in files.items()}, \
        ", ".join(str(p) for p in (train, *(f[1] for f in files.values())))


def linearize(value) -> str:
    """The structured input as one line: E2E's meaning representation as it is; WebNLG's
    "s | p | o" strings and DART's [s, p, o] lists as "s : p : o | s : p : o" (LoRA's format)."""
    if isinstance(value, str):
        return value
    triples = [t if isinstance(t, (list, tuple)) else [part.strip() for part in str(t).split(" | ")] for t in value]
    return " | ".join(" : ".join(str(x) for x in t) for t in triples)


def hub_source(s: DataSource) -> HubSource:
    return with_overrides(NLG_TASKS[s.name]["hub"], s.hub_repo, s.hub_revision, s.hub_config)


def load_hub(s: DataSource, splits: tuple[str, ...]) -> tuple[list[tuple[str, str]], dict[str, list], str]:
    """Training pairs (input, target) and each evaluation split's (input, reference) pairs, all references."""
    source, field = hub_source(s), NLG_TASKS[s.name]["input"]
    local = (f"task.data_dir=/path/to/{s.name} holding train and valid / test files (E2E CSV mr,ref; LoRA-style "
             f"'input || reference' .txt; or JSON lines), or task.train_file=... task.validation_file=...; "
             f"profile=smoke needs no data at all.")
    rows = read_splits(source, ["train", *splits], f"{s.name!r}", local)
    for split in ("train", *splits):
        require_columns(rows[split], (field, "target"), repr(s.name), source, split)

    def pairs(split: str) -> list[tuple[str, str]]:
        out = []
        for row in rows[split]:
            refs = [r for r in (row.get("references") or []) if r] or [row["target"]]  # train rows: the target
            out += [(linearize(row[field]), r) for r in refs]
        return out

    return pairs("train"), {split: pairs(split) for split in splits}, \
        f"hub:{source.repo}@{source.revision}/{source.config}"


# -- a learnable stand-in (smoke profile, tests) --------------------------------------------------
SLOTS = ("w20", "w21", "w22", "w23")  # slot names as whole words of the tiny tokenizer's vocabulary


def synthetic_pairs(n_inputs: int, seed: int, refs_per_input: int = 2) -> list[tuple[str, str]]:
    """Meaning representations of random slot values, each with a few paraphrased references."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_inputs):  # each slot draws from its own 16 values, so copying them is learnable
        values = {s: f"w{48 + 16 * SLOTS.index(s) + rng.randrange(16)}" for s in rng.sample(SLOTS, rng.randint(2, 4))}
        source = " | ".join(f"{k} : {v}" for k, v in values.items())
        for k in range(refs_per_input):
            words = [f"{values[s]} {s}" if k % 2 else f"{s} {values[s]}" for s in values]
            pairs.append((source, " , ".join(words) + " ."))
    return pairs


def load_nlg(s: DataSource, seed: int) -> NLGData:
    """The training pairs, and the selection split (task.select_split: periodic evaluation, the best
    weights) and the reported split (task.eval_split: decoded once at the end), each loaded apart."""
    for key, value in (("eval_split", s.eval_split), ("select_split", s.select_split)):
        if value not in EVAL_SPLITS:
            raise DSEEError(f"task.{key}={value!r} is invalid; valid choices: {', '.join(EVAL_SPLITS)}.")
    splits = tuple(dict.fromkeys((s.select_split, s.eval_split)))
    if s.synthetic_standin:
        train = synthetic_pairs(s.synthetic_train, seed)
        evaluation = {split: synthetic_pairs(s.synthetic_eval, seed + (10_000 if split == "validation" else 20_000))
                      for split in splits}
        source = f"synthetic stand-in for {s.name}"
    elif s.train_file or s.validation_file:
        if not (s.train_file and s.validation_file):
            raise DSEEError("task.train_file and task.validation_file go together: give both.")
        if "test" in splits and not s.test_file:
            raise DSEEError(f"task {s.name!r} reports (or selects on) the test split: give task.test_file=... beside "
                            f"task.validation_file, or task.eval_split=validation task.select_split=test.")
        files = {"validation": s.validation_file, "test": s.test_file}
        train, evaluation = read_pairs(Path(s.train_file)), {split: read_pairs(Path(files[split])) for split in splits}
        source = ", ".join([s.train_file, *(files[split] for split in splits)])
    elif s.data_dir:
        train, evaluation, source = load_dir(Path(s.data_dir), splits)
    else:
        train, evaluation, source = load_hub(s, splits)
    train = train_slice(train, s.max_train_samples, s.train_subset)
    grouped = {split: group(pairs)[: s.max_eval_samples or None] for split, pairs in evaluation.items()}
    if not train or not all(grouped.values()):
        raise DSEEError(f"task {s.name!r} from {source} has an empty training or evaluation split.")
    return NLGData(s.name, train, grouped, source)


# -- encoding: the prompt is masked out of the loss ---------------------------------------------------
@dataclass
class LMEncoded:
    input_ids: list[list[int]]
    labels: list[list[int]]  # -100 on prompt tokens
    prompts: list[list[int]]  # the prompt alone, for decoding
    references: list[tuple[str, ...]]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_lm(pairs: list[tuple[str, str]], tokenizer, max_length: int, eos_id: int) -> LMEncoded:
    ids, labels, prompts = [], [], []
    for source, target in pairs:
        prompt = _ids(tokenizer, source + SEPARATOR)[: max_length // 2]
        answer = (_ids(tokenizer, " " + target) + [eos_id])[: max_length - len(prompt)]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
        prompts.append(prompt)
    return LMEncoded(ids, labels, prompts, [(t,) for _, t in pairs])


def encode_eval(examples: list[NLGExample], tokenizer, max_length: int, eos_id: int) -> LMEncoded:
    """Teacher-forced on the first reference (token accuracy); decoding uses the prompts."""
    enc = encode_lm([(e.source, e.references[0]) for e in examples], tokenizer, max_length, eos_id)
    enc.references = [e.references for e in examples]
    return enc


def collate_lm(data: LMEncoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad([data.input_ids[i] for i in indices], pad_id)
    labels, _ = pad([data.labels[i] for i in indices], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


LOSS_CHUNK = 1024  # positions whose logits exist at once: never (batch x length x vocabulary) in fp32


def _targets_and_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states at the positions that predict a target token (labels not −100
    after the shift), and those targets: the LM head then runs on these positions only."""
    body = model.get_decoder()  # the blocks' stack under the LM head (also through a PEFT wrapper)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return hidden[:, :-1][keep], targets[keep]


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum", label_smoothing=smoothing)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0,
            chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Next-token cross-entropy on the target tokens only (labels −100 elsewhere). The LM head runs
    on target positions alone, ``chunk`` at a time, each chunk's fp32 logits recomputed in the
    backward pass rather than kept: a 128k vocabulary never sits in memory for every position."""
    hidden, targets = _targets_and_hidden(model, batch)
    head = model.get_output_embeddings()
    if not len(targets):  # no target in this batch (every response truncated away): a zero that has a graph
        return hidden.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, label_smoothing, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t, label_smoothing)
    return total / len(targets)


@torch.no_grad()
def target_nll(model: nn.Module, batch: dict[str, torch.Tensor], precision: Precision = FP32) -> tuple[float, int, int]:
    """(summed NLL, target tokens, correct argmax predictions) of one batch, the LM head on target
    positions only and a chunk at a time."""
    head = model.get_output_embeddings()
    right, loss = 0, 0.0
    with precision.autocast():
        hidden, targets = _targets_and_hidden(model, batch)
        for c in range(0, len(targets), LOSS_CHUNK):
            logits, t = head(hidden[c:c + LOSS_CHUNK]).float(), targets[c:c + LOSS_CHUNK]
            right += int((logits.argmax(-1) == t).sum())
            loss += float(F.cross_entropy(logits, t, reduction="sum"))
    return loss, len(targets), right


@torch.no_grad()
def token_accuracy(model: nn.Module, data: LMEncoded, pad_id: int, device, batch_size: int,
                   precision: Precision = FP32) -> dict[str, float]:
    """Teacher-forced next-token accuracy and loss on the targets: cheap, for evaluation while training."""
    model.eval()
    counts = {}
    for i, start, end in dist.my_batches(len(data.input_ids), batch_size):  # each rank its share of the batches
        batch = {k: v.to(device) for k, v in collate_lm(data, list(range(start, end)), pad_id).items()}
        counts[i] = target_nll(model, batch, precision)
    right = total = 0
    loss_sum = 0.0
    for loss, t, r in dist.gather_in_order(counts):  # summed in batch order: one process's numbers exactly
        right, total, loss_sum = right + r, total + t, loss_sum + loss
    return {"token_accuracy": 100.0 * right / max(1, total), "loss": loss_sum / max(1, total)}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The terms lm_loss averages: target tokens after the shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


@dataclass
class DecodeConfig:
    """``task.decode``: beam search for the generation tasks (LoRA's and PST's settings)."""

    num_beams: int = 10  # beam size
    length_penalty: float = 0.8  # beam search length penalty
    no_repeat_ngram_size: int = 4  # no repeated n-grams of this size
    max_new_tokens: int = 64  # the longest output
    batch_size: int = 16  # inputs decoded at once

    def check(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise DSEEError(f"task.decode.num_beams={self.num_beams}, .max_new_tokens={self.max_new_tokens} and "
                            f".batch_size={self.batch_size} must be >= 1.")


@torch.no_grad()
def decode(model: nn.Module, tokenizer, prompts: list[list[int]], settings: DecodeConfig, device,
           eos_id: int, pad_id: int, progress=lambda done, total: None, precision: Precision = FP32) -> list[str]:
    """Batched beam search (greedy with num_beams=1); prompts are left-padded so every row continues
    from its last token."""
    model.eval()
    outputs: dict[int, list[str]] = {}
    for i, start, end in dist.my_batches(len(prompts), settings.batch_size):  # each rank its share
        ids, mask = pad(prompts[start:end], pad_id, left=True)
        width = ids.shape[1]
        with precision.autocast():
            beam = {"length_penalty": settings.length_penalty, "early_stopping": True} if settings.num_beams > 1 else {}
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), num_beams=settings.num_beams,
                no_repeat_ngram_size=settings.no_repeat_ngram_size, max_new_tokens=settings.max_new_tokens,
                eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, **beam,  # greedy: no beam-only flags
            )
        outputs[i] = []
        for row in generated[:, width:].tolist():
            if eos_id in row:
                row = row[: row.index(eos_id)]
            outputs[i].append(tokenizer.decode(row, skip_special_tokens=True).strip())
        progress(end, len(prompts))
    return [text for batch in dist.gather_in_order(outputs) for text in batch]
