"""Tasks and their data: the GLUE tasks (Hub, classic TSV layout, or CSV/JSON) and a
synthetic task generated offline that a model can really learn."""

from __future__ import annotations

import csv
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DSEEError, choice_error
from .models import SYNTHETIC_WORDS, hub_reachable


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_fields: tuple[str, ...]
    num_labels: int  # 1 = regression
    metric: str  # main metric used for best-checkpoint selection
    glue_dir: str = ""  # folder name in the classic GLUE download
    eval_files: tuple[str, ...] = ("dev.tsv",)  # one per evaluation split
    eval_splits: tuple[str, ...] = ("validation",)  # Hub split names, same order
    tsv_columns: tuple[int, ...] | None = None  # (text..., label) positions when the TSV has no header
    tsv_names: tuple[str, ...] = ()  # (text..., label) header names otherwise
    label_names: tuple[str, ...] = ()  # string labels in the TSV, in label-id order


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", ("sentence",), 2, "matthews_correlation", "CoLA", tsv_columns=(3, 1)),
    "sst2": TaskSpec("sst2", ("sentence",), 2, "accuracy", "SST-2", tsv_names=("sentence", "label")),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "f1", "MRPC",
                     tsv_names=("#1 String", "#2 String", "Quality")),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson", "STS-B",
                     tsv_names=("sentence1", "sentence2", "score")),
    "qqp": TaskSpec("qqp", ("question1", "question2"), 2, "f1", "QQP",
                    tsv_names=("question1", "question2", "is_duplicate")),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), 3, "accuracy", "MNLI",
                     eval_files=("dev_matched.tsv", "dev_mismatched.tsv"),
                     eval_splits=("validation_matched", "validation_mismatched"),
                     tsv_names=("sentence1", "sentence2", "gold_label"),
                     label_names=("entailment", "neutral", "contradiction")),
    "qnli": TaskSpec("qnli", ("question", "sentence"), 2, "accuracy", "QNLI",
                     tsv_names=("question", "sentence", "label"), label_names=("entailment", "not_entailment")),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy", "RTE",
                    tsv_names=("sentence1", "sentence2", "label"), label_names=("entailment", "not_entailment")),
    "synthetic": TaskSpec("synthetic", ("sentence",), 2, "accuracy"),
}


@dataclass
class Example:
    texts: tuple[str, ...]
    label: float


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    evals: dict[str, list[Example]]  # split name -> examples (MNLI has two)
    source: str = ""


@dataclass(frozen=True)
class DataSettings:
    name: str = "synthetic"
    data_dir: str | None = None  # a classic GLUE download (the folder holding CoLA/, SST-2/, ...)
    train_file: str | None = None  # CSV / JSON / JSON lines
    validation_file: str | None = None
    text_fields: tuple[str, ...] | None = None  # for train_file/validation_file; default: the task's
    label_field: str = "label"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    synthetic_train: int = 2000
    synthetic_eval: int = 500
    synthetic_standin: bool = False  # generate data of the task's shape (labels, fields) instead of loading it
    seed: int = 0


def spec_for(name: str) -> TaskSpec:
    if name not in TASKS:
        raise choice_error("task (task.name)", name, TASKS)
    return TASKS[name]


# -- synthetic ----------------------------------------------------------------------------------
POSITIVE = [f"w{i}" for i in range(16)]
NEGATIVE = [f"w{i}" for i in range(16, 32)]
NEUTRAL = [f"w{i}" for i in range(32, 48)]
FILLER = [f"w{i}" for i in range(48, SYNTHETIC_WORDS)]


def synthetic_examples(n: int, seed: int, num_labels: int = 2, fields: int = 1) -> list[Example]:
    """Sentiment-like and learnable: the label is which word set (positive, negative, and for
    three classes neutral) occurs most; with one label (regression) it is 5·pos/(pos+neg).
    With two text fields the words are split between them, as in sentence-pair tasks."""
    rng = random.Random(seed)
    sets = [POSITIVE, NEGATIVE, NEUTRAL][: max(2, num_labels)]
    out = []
    for _ in range(n):
        counts = [0] * len(sets)
        if num_labels == 1:
            counts[0], counts[1] = rng.randint(0, 4), rng.randint(0, 4)
            if counts[0] + counts[1] == 0:
                counts[0] = 1
            label = 5.0 * counts[0] / (counts[0] + counts[1])
        else:
            winner = rng.randrange(len(sets))
            strong = rng.randint(2, 4)
            counts = [rng.randint(0, strong - 2) for _ in sets]
            counts[winner] = strong
            label = float(winner)
        words = rng.choices(FILLER, k=rng.randint(4, 12))
        for word_set, count in zip(sets, counts):
            words += rng.choices(word_set, k=count)
        rng.shuffle(words)
        if fields == 1:
            texts = (" ".join(words),)
        else:
            cut = len(words) // 2
            texts = (" ".join(words[:cut]), " ".join(words[cut:]))
        out.append(Example(texts, label))
    return out


# -- classic GLUE TSV ----------------------------------------------------------------------------
def read_glue_tsv(path: Path, spec: TaskSpec) -> list[Example]:
    """The standard GLUE download: tab-separated, quotes are literal text (no escaping),
    MRPC starts with a byte-order mark, CoLA has no header, STS-B has ten columns."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.tsv_columns is not None:
        positions, body = spec.tsv_columns, rows
    else:
        header = rows[0]
        missing = [n for n in spec.tsv_names if n not in header]
        if missing:
            raise DSEEError(f"{path} has no column(s) {missing}; its header is {header}. Is this the "
                            f"{spec.glue_dir} file of the classic GLUE download?")
        positions, body = tuple(header.index(n) for n in spec.tsv_names), rows[1:]
    out = []
    for row in body:
        if len(row) <= max(positions):
            continue  # a truncated line (a few exist in the official QQP/MNLI files)
        raw = row[positions[-1]]
        out.append(Example(tuple(row[p] for p in positions[:-1]), _label(raw, spec, path)))
    return out


def _label(raw: str, spec: TaskSpec, where: object) -> float:
    if spec.label_names:
        if raw not in spec.label_names:
            raise DSEEError(f"label {raw!r} in {where} is not one of {', '.join(spec.label_names)}")
        return float(spec.label_names.index(raw))
    return float(raw)


def load_glue_dir(data_dir: Path, spec: TaskSpec) -> tuple[list[Example], dict[str, list[Example]]]:
    folder = Path(data_dir) / spec.glue_dir
    needed = [folder / "train.tsv", *(folder / f for f in spec.eval_files)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DSEEError(
            f"task.data_dir={str(data_dir)!r} lacks {', '.join(missing)}. It should be the folder of the "
            f"classic GLUE download that holds {spec.glue_dir}/train.tsv and {spec.glue_dir}/{spec.eval_files[0]}."
        )
    evals = {split: read_glue_tsv(folder / f, spec) for split, f in zip(spec.eval_splits, spec.eval_files)}
    return read_glue_tsv(folder / "train.tsv", spec), evals


# -- CSV / JSON files -----------------------------------------------------------------------------
def read_table(path: Path, fields: tuple[str, ...], label_field: str, spec: TaskSpec) -> list[Example]:
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DSEEError(f"data file {str(path)!r} does not exist.")
    kind = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix)
    if kind is None:
        raise DSEEError(f"data file {str(path)!r}: unknown format; use .csv, .tsv, .json or .jsonl.")
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    table = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    missing = [f for f in (*fields, label_field) if f not in table.column_names]
    if missing:
        raise DSEEError(f"{path} has no column(s) {missing}; it has {table.column_names}. Set "
                        f"task.text_fields=[...] and task.label_field=... to its column names.")
    return [Example(tuple(str(r[f]) for f in fields), _label(str(r[label_field]), spec, path)) for r in table]


# -- Hugging Face Hub -----------------------------------------------------------------------------
def hub_data_hint(spec: TaskSpec) -> DSEEError:
    return DSEEError(
        f"Cannot load GLUE task {spec.name!r}: it is not in the local datasets cache and the Hub is "
        f"unreachable (or HF_HUB_OFFLINE=1). Use the classic GLUE download instead with "
        f"task.data_dir=/path/to/glue_data (the folder holding {spec.glue_dir}/train.tsv), or CSV/JSON "
        f"files with task.train_file=... task.validation_file=...; task=synthetic needs no data at all."
    )


def load_hub(spec: TaskSpec) -> tuple[list[Example], dict[str, list[Example]]]:
    import datasets

    def convert(split) -> list[Example]:
        return [Example(tuple(r[f] for f in spec.text_fields), float(r["label"])) for r in split]

    hint = hub_data_hint(spec)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline and not hub_reachable():
        raise hint  # rather than minutes of retries; with HF_HUB_OFFLINE=1 the local cache is tried
    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as exc:
        if offline or not hub_reachable():
            raise hint from exc
        raise
    return convert(ds["train"]), {s: convert(ds[s]) for s in spec.eval_splits}


def load_task(settings: DataSettings) -> TaskData:
    spec = spec_for(settings.name)
    if spec.name == "synthetic" or settings.synthetic_standin:
        shape = (spec.num_labels, len(spec.text_fields))
        train = synthetic_examples(settings.synthetic_train, settings.seed, *shape)
        evals = {split: synthetic_examples(settings.synthetic_eval, settings.seed + 10_000 + i, *shape)
                 for i, split in enumerate(spec.eval_splits)}
        source = "synthetic" if spec.name == "synthetic" else f"synthetic stand-in for {spec.name}"
    elif settings.train_file or settings.validation_file:
        if not (settings.train_file and settings.validation_file):
            raise DSEEError("task.train_file and task.validation_file go together: give both.")
        fields = tuple(settings.text_fields or spec.text_fields)
        train = read_table(Path(settings.train_file), fields, settings.label_field, spec)
        evals = {"validation": read_table(Path(settings.validation_file), fields, settings.label_field, spec)}
        source = f"{settings.train_file}, {settings.validation_file}"
    elif settings.data_dir:
        train, evals = load_glue_dir(Path(settings.data_dir), spec)
        source = str(Path(settings.data_dir) / spec.glue_dir)
    else:
        train, evals = load_hub(spec)
        source = "hub:nyu-mll/glue"
    if settings.max_train_samples:
        train = train[: settings.max_train_samples]
    if settings.max_eval_samples:
        evals = {k: v[: settings.max_eval_samples] for k, v in evals.items()}
    if not train or not all(evals.values()):
        raise DSEEError(f"task {spec.name!r} from {source} has an empty train or evaluation split.")
    return TaskData(spec, train, evals, source)


# -- tokenisation and batching --------------------------------------------------------------------
@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: torch.Tensor


def encode(examples: list[Example], tokenizer, max_length: int, regression: bool) -> Encoded:
    columns = list(zip(*[e.texts for e in examples]))
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    dtype = torch.float32 if regression else torch.long
    return Encoded(enc["input_ids"], torch.tensor([e.label for e in examples], dtype=dtype))


def pad(seqs: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded ids, attention mask) to the longest sequence; ``left`` for decoder-only generation."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to the longest sequence of this batch only."""
    ids, mask = pad([data.input_ids[i] for i in indices], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": data.labels[indices]}
