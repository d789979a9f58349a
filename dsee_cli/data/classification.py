"""Tasks and their data: the GLUE tasks (Hub, classic TSV layout, or CSV/JSON) and a
synthetic task generated offline that a model can really learn."""

from __future__ import annotations

import csv
import logging
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dsee_cli.core.models import SYNTHETIC_WORDS
from dsee_cli.data.hub import HubSource, read_splits, require_columns, with_overrides
from dsee_cli.errors import DSEEError, choice_error

log = logging.getLogger("dsee")
SPLITS = ("validation", "test")
UNLABELLED = -1.0  # GLUE's test files (and the Hub's test splits) carry no labels


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
    submission: str = ""  # the file name the GLUE benchmark expects for this task's test predictions

    def files(self, split: str) -> tuple[str, ...]:
        """The classic download's files of an evaluation split (dev.tsv, or test.tsv for the test split)."""
        return self.eval_files if split == "validation" else tuple(f.replace("dev", "test") for f in self.eval_files)

    def splits(self, split: str) -> tuple[str, ...]:
        """Hub split names of an evaluation split (MNLI has a matched and a mismatched one)."""
        return self.eval_splits if split == "validation" else tuple(
            s.replace("validation", "test") for s in self.eval_splits)

    def test_text_names(self) -> tuple[str, ...]:
        """The text columns of a test.tsv: every test file has a header (CoLA's too)."""
        return self.tsv_names[:-1] if self.tsv_names else ("sentence",)


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", ("sentence",), 2, "matthews_correlation", "CoLA", tsv_columns=(3, 1),
                     submission="CoLA.tsv"),
    "sst2": TaskSpec("sst2", ("sentence",), 2, "accuracy", "SST-2", tsv_names=("sentence", "label"),
                     submission="SST-2.tsv"),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "f1", "MRPC",
                     tsv_names=("#1 String", "#2 String", "Quality"), submission="MRPC.tsv"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson", "STS-B",
                     tsv_names=("sentence1", "sentence2", "score"), submission="STS-B.tsv"),
    "qqp": TaskSpec("qqp", ("question1", "question2"), 2, "f1", "QQP",
                    tsv_names=("question1", "question2", "is_duplicate"), submission="QQP.tsv"),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), 3, "accuracy", "MNLI",
                     eval_files=("dev_matched.tsv", "dev_mismatched.tsv"),
                     eval_splits=("validation_matched", "validation_mismatched"),
                     tsv_names=("sentence1", "sentence2", "gold_label"),
                     label_names=("entailment", "neutral", "contradiction"), submission="MNLI.tsv"),
    "qnli": TaskSpec("qnli", ("question", "sentence"), 2, "accuracy", "QNLI",
                     tsv_names=("question", "sentence", "label"), label_names=("entailment", "not_entailment"),
                     submission="QNLI.tsv"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy", "RTE",
                    tsv_names=("sentence1", "sentence2", "label"), label_names=("entailment", "not_entailment"),
                    submission="RTE.tsv"),
    "synthetic": TaskSpec("synthetic", ("sentence",), 2, "accuracy"),
}


@dataclass
class Example:
    texts: tuple[str, ...]
    label: float  # UNLABELLED in test files
    key: str = ""  # the file's index / id column where it has one (GLUE submissions need it)


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    evals: dict[str, list[Example]]  # split name -> examples (MNLI has two)
    source: str = ""


@dataclass
class DataSource:
    """Which task and where its data comes from: the first fields of the ``task`` section
    (config.TaskConfig), read by the classification and the generation loaders alike."""

    name: str = "synthetic"  # the task: a GLUE task, synthetic, or e2e / webnlg / dart (task=... picks its defaults)
    data_dir: str | None = None  # a local copy: the classic GLUE download (CoLA/, SST-2/, ...) or an NLG folder
    train_file: str | None = None  # CSV / JSON lines, with validation_file
    validation_file: str | None = None  # the evaluation file that goes with train_file
    test_file: str | None = None  # for `dsee eval --split test` with train_file / validation_file
    # The Hub source, for a fork, a pinned commit or another config (null: the README's default per task)
    hub_repo: str | None = None
    hub_revision: str | None = None  # a branch, tag or commit of hub_repo
    hub_config: str | None = None  # the dataset config (subset) on the Hub
    text_fields: list[str] | None = None  # the columns holding the text (one, or two for pairs); null: the task's
    label_field: str = "label"  # the column holding the label
    max_train_samples: int | None = None  # use only this many training examples (see train_subset); null: all
    # which ones: random (a seeded subset, the same in every run and method of a sweep) or first (file order)
    train_subset: str = "random"
    max_eval_samples: int | None = None  # evaluate on only this many examples; null: all
    synthetic_train: int = 2000  # synthetic task / stand-ins: training examples
    synthetic_eval: int = 500  # synthetic task / stand-ins: evaluation examples
    synthetic_standin: bool = False  # smoke profile: synthetic data shaped like this task (labels, fields)
    eval_split: str = "validation"  # generation tasks: the split decoded and scored, or test (the papers report test)
    # generation tasks: the split that periodic evaluation and keep_best select on; never eval_split
    select_split: str = "validation"


TRAIN_SUBSETS = ("random", "first")


def train_slice(examples: list, n: int | None, how: str) -> list:
    """``n`` training examples: a random subset drawn with a fixed seed, kept in file order (the
    same examples for every seed and method, so a sweep compares like with like), or the first n."""
    if how not in TRAIN_SUBSETS:
        raise choice_error("training subset (task.train_subset)", how, TRAIN_SUBSETS)
    if not n or n >= len(examples):
        return examples
    if how == "first":
        return examples[:n]
    return [examples[i] for i in sorted(random.Random(0).sample(range(len(examples)), n))]


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
def read_glue_tsv(path: Path, spec: TaskSpec, training: bool = False, labelled: bool = True) -> list[Example]:
    """The standard GLUE download: tab-separated, quotes are literal text (no escaping),
    MRPC starts with a byte-order mark, CoLA has no header, STS-B has ten columns; test files
    have an index column and no labels.

    A row that cannot be parsed (too few columns, an unknown label) is never dropped silently:
    in a training file it is skipped with a warning that counts them (a few exist in the
    official QQP / MNLI files); in an evaluation file it is an error naming its line, since a
    score on part of the dev set is not comparable with anyone's."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    index = None
    if labelled and spec.tsv_columns is not None:
        positions, body, first_line = spec.tsv_columns, rows, 1
    else:
        header = rows[0] if rows else []
        names = spec.tsv_names if labelled else spec.test_text_names()
        missing = [n for n in names if n not in header]
        if missing:
            raise DSEEError(f"{path} has no column(s) {missing}; its header is {header}. Is this the "
                            f"{spec.glue_dir} file of the classic GLUE download?")
        positions, body, first_line = tuple(header.index(n) for n in names), rows[1:], 2
        index = next((header.index(n) for n in ("index", "id") if n in header), None)
    texts_at = positions[:-1] if labelled else positions
    out, bad = [], []
    for line, row in enumerate(body, start=first_line):
        if not row:
            continue  # a blank line holds no example
        if len(row) <= max(positions):
            bad.append((line, f"it has {len(row)} tab-separated column(s), and this task needs {max(positions) + 1}"))
            continue
        try:
            label = _label(row[positions[-1]], spec, path) if labelled else UNLABELLED
        except (ValueError, DSEEError):
            bad.append((line, f"its label {row[positions[-1]]!r} is not a valid label"))
            continue
        key = row[index] if index is not None and index < len(row) else str(len(out))
        out.append(Example(tuple(row[p] for p in texts_at), label, key))
    if bad and training:
        log.warning("%s: skipped %d line(s) that cannot be parsed (line %d: %s)", path, len(bad), *bad[0])
    elif bad:
        raise DSEEError(f"{path}, line {bad[0][0]}, cannot be parsed: {bad[0][1]} ({len(bad)} such line(s) in the "
                        f"file). Evaluation files are read whole, so that scores stay comparable: repair the file "
                        f"(one example per line, tab-separated, no quoting) or use the official GLUE download.")
    return out


def _label(raw: str, spec: TaskSpec, where: object) -> float:
    if spec.label_names:
        if raw not in spec.label_names:
            raise DSEEError(f"label {raw!r} in {where} is not one of {', '.join(spec.label_names)}")
        return float(spec.label_names.index(raw))
    return float(raw)


def glue_dir_files(data_dir: Path, spec: TaskSpec, split: str = "validation") -> tuple[Path, list[Path]]:
    """(train.tsv, the split's files) in a classic GLUE download; a clear error when one is missing."""
    if not Path(data_dir).is_dir():
        raise DSEEError(f"task.data_dir={str(data_dir)!r} does not exist. It should be the folder of the classic "
                        f"GLUE download that holds {spec.glue_dir}/train.tsv and {spec.glue_dir}/{spec.eval_files[0]}.")
    folder = Path(data_dir) / spec.glue_dir
    train, evals = folder / "train.tsv", [folder / f for f in spec.files(split)]
    missing = [str(p) for p in (train, *evals) if not p.is_file()]
    if missing:
        raise DSEEError(
            f"task.data_dir={str(data_dir)!r} lacks {', '.join(missing)}. It should be the folder of the "
            f"classic GLUE download that holds {spec.glue_dir}/train.tsv and {spec.glue_dir}/{spec.files(split)[0]}."
        )
    return train, evals


def load_glue_dir(data_dir: Path, spec: TaskSpec, split: str = "validation"
                  ) -> tuple[list[Example], dict[str, list[Example]]]:
    train, files = glue_dir_files(data_dir, spec, split)
    labelled = split == "validation"
    evals = {name: read_glue_tsv(f, spec, labelled=labelled) for name, f in zip(spec.splits(split), files)}
    return read_glue_tsv(train, spec, training=True), evals


def check_data_files(settings: DataSource, split: str = "validation") -> None:
    """Fail before any model is loaded when the named local data is not there."""
    if settings.synthetic_standin or settings.name == "synthetic":
        return
    if settings.train_file or settings.validation_file:
        for what, value in (("task.train_file", settings.train_file),
                            ("task.validation_file", settings.validation_file),
                            ("task.test_file", settings.test_file if split == "test" else "")):
            if value and not Path(value).is_file():
                raise DSEEError(f"{what}={value!r} does not exist.")
    elif settings.data_dir:
        glue_dir_files(Path(settings.data_dir), spec_for(settings.name), split)


# -- CSV / JSON files -----------------------------------------------------------------------------
def read_table(path: Path, fields: tuple[str, ...], label_field: str, spec: TaskSpec,
               require_label: bool = True) -> list[Example]:
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DSEEError(f"data file {str(path)!r} does not exist.")
    kind = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix)
    if kind is None:
        raise DSEEError(f"data file {str(path)!r}: unknown format; use .csv, .tsv, .json or .jsonl.")
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    table = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    missing = [f for f in (*fields, *([label_field] if require_label else [])) if f not in table.column_names]
    if missing:
        raise DSEEError(f"{path} has no column(s) {missing}; it has {table.column_names}. Set "
                        f"task.text_fields=[...] and task.label_field=... to its column names.")
    labelled = label_field in table.column_names  # a test file may have none
    out = []
    for row_number, r in enumerate(table, start=2 if kind == "csv" else 1):
        try:
            label = _label(str(r[label_field]), spec, path) if labelled else UNLABELLED
        except (ValueError, DSEEError):
            valid = "one of " + ", ".join(spec.label_names) if spec.label_names else "a number"
            raise DSEEError(f"{path}, row {row_number}: the label {r[label_field]!r} is not valid for task "
                            f"{spec.name!r} ({valid} expected).") from None
        key = str(r.get("idx", r.get("index", r.get("id", len(out)))))
        out.append(Example(tuple(str(r[f]) for f in fields), label, key))
    return out


# -- Hugging Face Hub ---------------------------------------------------------------------------
GLUE_HUB = HubSource("nyu-mll/glue", "main", "")  # Parquet in the repository itself; config = the task


def glue_source(spec: TaskSpec, settings: DataSource) -> HubSource:
    return with_overrides(replace(GLUE_HUB, config=spec.name), settings.hub_repo, settings.hub_revision,
                          settings.hub_config)


def load_hub(spec: TaskSpec, settings: DataSource, split: str
             ) -> tuple[list[Example], dict[str, list[Example]], str]:
    source = glue_source(spec, settings)
    local = (f"task.data_dir=/path/to/glue_data (the classic GLUE download, holding {spec.glue_dir}/train.tsv), or "
             f"CSV/JSON files with task.train_file=... task.validation_file=...; task=synthetic needs no data.")
    names = ["train", *spec.splits(split)]
    rows = read_splits(source, names, f"GLUE task {spec.name!r}", local)
    for name in names:
        require_columns(rows[name], (*spec.text_fields, "label"), f"GLUE task {spec.name!r}", source, name)

    def convert(split: list[dict]) -> list[Example]:  # test splits carry label -1: UNLABELLED
        return [Example(tuple(r[f] for f in spec.text_fields), float(r["label"]), str(r.get("idx", i)))
                for i, r in enumerate(split)]

    return convert(rows["train"]), {s: convert(rows[s]) for s in names[1:]}, f"hub:{source.repo}@{source.revision}"


def load_task(settings: DataSource, seed: int, split: str = "validation") -> TaskData:
    """The task's training split and its evaluation split(s): ``validation`` (dev) or ``test``."""
    spec = spec_for(settings.name)
    if split not in SPLITS:
        raise choice_error("evaluation split", split, SPLITS)
    if spec.name == "synthetic" or settings.synthetic_standin:
        shape = (spec.num_labels, len(spec.text_fields))
        train = synthetic_examples(settings.synthetic_train, seed, *shape)
        offset = 10_000 if split == "validation" else 20_000  # a labelled test split of its own
        evals = {name: synthetic_examples(settings.synthetic_eval, seed + offset + i, *shape)
                 for i, name in enumerate(spec.splits(split))}
        source = "synthetic" if spec.name == "synthetic" else f"synthetic stand-in for {spec.name}"
    elif settings.train_file or settings.validation_file:
        if not (settings.train_file and settings.validation_file):
            raise DSEEError("task.train_file and task.validation_file go together: give both.")
        if split == "test" and not settings.test_file:
            raise DSEEError("The test split of task.train_file / task.validation_file data needs task.test_file=...")
        fields = tuple(settings.text_fields or spec.text_fields)
        train = read_table(Path(settings.train_file), fields, settings.label_field, spec)
        eval_file = settings.validation_file if split == "validation" else settings.test_file
        evals = {split: read_table(Path(eval_file), fields, settings.label_field, spec, split == "validation")}
        source = f"{settings.train_file}, {eval_file}"
    elif settings.data_dir:
        train, evals = load_glue_dir(Path(settings.data_dir), spec, split)
        source = str(Path(settings.data_dir) / spec.glue_dir)
    else:
        train, evals, source = load_hub(spec, settings, split)
    train = train_slice(train, settings.max_train_samples, settings.train_subset)
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
    keys: list[str] | None = None  # each example's index in its file
    token_type_ids: list[list[int]] | None = None  # segment ids (BERT's sentence A / B), where the model takes them

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels != UNLABELLED).all())


def encode(examples: list[Example], tokenizer, max_length: int, regression: bool, segments: bool = True) -> Encoded:
    """Token ids, and segment ids wherever the tokenizer makes them and ``segments`` (the model
    has more than one segment embedding): BERT tells a pair's two sentences apart by them."""
    columns = list(zip(*[e.texts for e in examples]))
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    dtype = torch.float32 if regression else torch.long
    types = enc.get("token_type_ids") if segments else None
    return Encoded(enc["input_ids"], torch.tensor([e.label for e in examples], dtype=dtype),
                   [e.key or str(i) for i, e in enumerate(examples)], types)


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
    batch = {"input_ids": ids, "attention_mask": mask, "labels": data.labels[indices]}
    if data.token_type_ids is not None:
        batch["token_type_ids"] = pad([data.token_type_ids[i] for i in indices], 0)[0]
    return batch
