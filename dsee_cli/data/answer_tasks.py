"""Tasks scored by the exact match of a generated answer (RoSA's and PEFT's LLM tasks).

* ``gsm8k``: grade-school maths (``openai/gsm8k``, config ``main``): train on the worked solution,
  answer = the number after ``####`` (or, where a generation has none, the last number in it),
  compared as numbers (``1,234`` = ``1234`` = ``1234.0``). Its published split: 7,473 train /
  1,319 test; the validation split is a fixed 500 of train (seed 0, the same for every run), held
  out of training.
* ``viggo``: video-game dialogue meaning representations (``GEM/viggo``): the sentence in, the
  meaning representation out (RoSA's prompt), exact match of the first generated line; GEM's
  train / validation / test. (RoSA reports its validation split; we select on it and report test.)
* ``sql``: text to SQL (``b-mc2/sql-create-context``, one train split of 78,577): the question and
  the CREATE TABLE context in, the query out, exact match from the first ``SELECT`` to the end of its
  line after whitespace normalisation (RoSA's regex). A fixed 1,000 rows are held out as test and 500
  as validation (seed 0); RoSA scores its own held-out file: give it as ``task.test_file``.
* ``pyapi``: built in, offline, from real text: a standard-library function's docstring (its first
  paragraph) in, its dotted name out (``math.acos``), exact match of the first generated word;
  624 functions of Python 3.11, a fixed 150 / 100 held out as test / validation.
* ``metamath``: MetaMathQA (``meta-math/MetaMathQA``, query / response) for training, GSM8K for
  evaluation, as PEFT's MetaMathQA benchmark: validation is GSM8K's 500 held out of its train,
  test GSM8K's test. (MetaMathQA rephrases GSM8K train questions, so validation can be optimistic;
  it only selects.)

Every split is also readable from local JSON lines (or Parquet) with the Hub's columns. The
prompt is plain text (``task.chat=false``) or the tokenizer's chat template with the prompt as
the user's turn. Decoding is greedy (``task.decode``: num_beams 1); the loss covers the response
only, as ``instruct``. ``task.answer_pattern`` (a regular expression, its first group the answer)
replaces the task's; it must find an answer in the task's own references, or the run stops before
training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from dsee_cli.data.classification import DataSource, train_slice
from dsee_cli.data.hub import PARQUET_EXPORT, HubSource, read_splits, require_columns, with_overrides
from dsee_cli.data.lm_tasks import Instruction, read_rows
from dsee_cli.errors import DSEEError

VIGGO_PROMPT = (
    "Given a target sentence construct the underlying meaning representation of the input sentence as a single "
    "function with attributes and attribute values. This function should describe the target string accurately and "
    "the function must be one of the following ['inform', 'request', 'give_opinion', 'confirm', 'verify_attribute', "
    "'suggest', 'request_explanation', 'recommend', 'request_attribute']. The attributes must be one of the "
    "following: ['name', 'exp_release_date', 'release_year', 'developer', 'esrb', 'rating', 'genres', "
    "'player_perspective', 'has_multiplayer', 'platforms', 'available_on_steam', 'has_linux_release', "
    "'has_mac_release', 'specifier']\n\n### Target sentence:\n{target}\n\n### Meaning representation:\n")
MATH_PROMPT = "Question: {question}\nAnswer:"  # GSM8K and MetaMathQA alike
NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


@dataclass(frozen=True)
class AnswerTask:
    """One exact-match task: where its rows come from, how a row becomes a prompt and a response,
    and how an answer is found in a response."""

    hub: HubSource | None  # None: built in (pyapi)
    prompt: str  # a format string over the row's columns
    response: str  # the column trained on (and scored against)
    pattern: str  # the answer: the first group of this regular expression's first match
    numeric: bool = False  # answers compared as numbers; a generation without the pattern: its last number
    hub_splits: tuple[str, ...] = ("train",)  # the hub's own splits
    held_out: dict[str, int] = field(default_factory=dict)  # split -> rows held out of the hub's train (seed 0)
    eval_task: str | None = None  # another task's rows evaluate it (metamath: gsm8k)
    builtin: Callable[[], tuple[dict[str, list[dict]], str]] | None = None  # rows of every split, no download
    train_rows: int = 0  # training examples (the step counts of --plan)

    @property
    def columns(self) -> tuple[str, ...]:
        return (*re.findall(r"{(\w+)}", self.prompt), self.response)


# the standard library's modules pyapi reads (those that import everywhere without a warning)
PYAPI_MODULES = ("math", "cmath", "os", "os.path", "shutil", "string", "json", "re", "itertools", "functools",
                 "collections", "statistics", "random", "textwrap", "difflib", "heapq", "bisect", "operator", "glob",
                 "fnmatch", "base64", "binascii", "zlib", "time", "calendar", "copy", "pprint", "struct", "codecs",
                 "unicodedata", "locale", "inspect", "dataclasses", "tempfile", "filecmp", "gzip", "bz2", "lzma",
                 "pickle", "html", "urllib.parse", "email.utils", "socket", "subprocess", "threading", "contextlib",
                 "weakref", "types", "io", "sys", "keyword", "tokenize", "ast", "dis", "traceback", "warnings",
                 "linecache", "shlex", "secrets", "hmac", "colorsys", "quopri", "getpass")
PYAPI_HELD_OUT = {"test": 150, "validation": 100}


def pyapi_rows() -> tuple[dict[str, list[dict]], str]:
    """Real English text that needs no download: the first paragraph of each documented function of
    the standard library (``PYAPI_MODULES``) and the function's dotted name, one row per distinct
    description (the first module's name where several share one; none that spells its own name).
    Sorted by description, then a fixed 150 held out as test and 100 as validation (seed 0)."""
    import importlib
    import inspect
    import sys

    found: dict[str, str] = {}
    for module_name in PYAPI_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ").strip()
            if len(doc.split()) >= 4 and len(doc) <= 200 and name.lower() not in doc.lower():
                found.setdefault(doc, f"{module_name}.{name}")
    rows = [{"doc": doc, "name": found[doc]} for doc in sorted(found)]
    order = random.Random(0).sample(range(len(rows)), sum(PYAPI_HELD_OUT.values()))
    test, validation = set(order[:PYAPI_HELD_OUT["test"]]), set(order[PYAPI_HELD_OUT["test"]:])
    return {"train": [r for i, r in enumerate(rows) if i not in test | validation],
            "validation": [rows[i] for i in sorted(validation)], "test": [rows[i] for i in sorted(test)]}, \
        f"pyapi: Python {sys.version_info.major}.{sys.version_info.minor} standard-library docstrings"


ANSWER_TASKS: dict[str, AnswerTask] = {
    "gsm8k": AnswerTask(HubSource("openai/gsm8k", "main", "main"), MATH_PROMPT.format(question="{question}"),
                        "answer", rf"####\s*({NUMBER})", numeric=True, hub_splits=("train", "test"),
                        held_out={"validation": 500}, train_rows=6973),
    "viggo": AnswerTask(HubSource("GEM/viggo", PARQUET_EXPORT, "default"), VIGGO_PROMPT, "meaning_representation",
                        r"^\s*(.+)", hub_splits=("train", "validation", "test"), train_rows=5103),
    "sql": AnswerTask(HubSource("b-mc2/sql-create-context", PARQUET_EXPORT, "default"),
                      "{context}\n\n{question}\n\n answer: ", "answer", r"(SELECT .*)",
                      held_out={"test": 1000, "validation": 500}, train_rows=77077),
    "metamath": AnswerTask(HubSource("meta-math/MetaMathQA", PARQUET_EXPORT, "default"),
                           MATH_PROMPT.format(question="{query}"), "response", rf"The answer is:?\s*({NUMBER})",
                           numeric=True, eval_task="gsm8k", train_rows=395000),
    # offline, from real text (profile=mini's stand-in for the Hub's tasks): a docstring in, the function's name out
    "pyapi": AnswerTask(None, "Which Python function does this describe?\n{doc}\nAnswer:", "name", r"^\s*([\w.]+)",
                        builtin=pyapi_rows, train_rows=374),
}


@dataclass
class AnswerExample:
    prompt: str
    response: str  # the reference response (trained on)
    answer: str  # what the response's answer is, normalised


@dataclass
class AnswerData:
    train: list[AnswerExample]
    evals: dict[str, list[AnswerExample]]  # validation / test
    source: str
    pattern: str
    numeric: bool  # the evaluated task's answers are numbers (gsm8k, metamath)


# -- answers ----------------------------------------------------------------------------------------
def normalise(text: str, numeric: bool) -> str:
    """Numbers as numbers (1,234 = 1234 = 1234.0 = $1234), text with its whitespace collapsed."""
    text = " ".join(text.split())
    if not numeric:
        return text
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(text).normalize()
    except InvalidOperation:
        return text
    return format(value, "f")


def extract(text: str, pattern: str, numeric: bool) -> str | None:
    """The answer in ``text``: the pattern's first group (or its whole match), normalised; a numeric
    task falls back to the last number in the text. None: no answer."""
    match = re.search(pattern, text, flags=re.MULTILINE)
    if match:
        return normalise(match.group(1) if match.groups() else match.group(0), numeric)
    if numeric:
        numbers = re.findall(NUMBER, text)
        if numbers:
            return normalise(numbers[-1], numeric)
    return None


def exact_match(generations: list[str], references: list[str], pattern: str, numeric: bool) -> dict[str, float]:
    """exact_match: the % of generations whose answer equals the reference's; answered: the % with any."""
    answers = [extract(g, pattern, numeric) for g in generations]
    right = sum(a is not None and a == r for a, r in zip(answers, references))
    return {"exact_match": 100.0 * right / max(1, len(references)),
            "answered": 100.0 * sum(a is not None for a in answers) / max(1, len(answers))}


# -- rows -------------------------------------------------------------------------------------------
def reference_answer(response: str, pattern: str, numeric: bool) -> str | None:
    """A reference's answer: the pattern only (GSM8K's ``####``), never a fallback number."""
    match = re.search(pattern, response, flags=re.MULTILINE)
    if match is None:
        return None
    return normalise(match.group(1) if match.groups() else match.group(0), numeric)


def _examples(spec: AnswerTask, rows: list[dict], pattern: str) -> list[AnswerExample]:
    fields = re.findall(r"{(\w+)}", spec.prompt)
    return [AnswerExample(spec.prompt.format(**{k: row[k] for k in fields}), str(row[spec.response]),
                          reference_answer(str(row[spec.response]), pattern, spec.numeric) or "") for row in rows]


def _check_columns(name: str, rows: list[dict], where: str) -> None:
    spec = ANSWER_TASKS[name]
    missing = [c for c in spec.columns if rows and c not in rows[0]]
    if missing:
        raise DSEEError(f"task {name}: {where} has no column(s) {missing}; its rows have {sorted(rows[0])}. A {name} "
                        f"row has {', '.join(spec.columns)}.")


def check_pattern(name: str, split: str, examples: list[AnswerExample], pattern: str, default: str) -> None:
    """The answer pattern finds an answer in the task's own references, or the run stops here."""
    if examples and not any(e.answer for e in examples):
        sample = examples[0].response[-120:].replace("\n", "\\n")
        what = f"task.answer_pattern={pattern!r}" if pattern != default else f"the {name} answer pattern {pattern!r}"
        hint = " A GSM8K file needs its worked answers to end in '#### <number>'." if name == "gsm8k" else ""
        raise DSEEError(f"{what} matches nothing in the {len(examples)} references of task {name}'s {split} split "
                        f"(the first ends '...{sample}').{hint} Give task.answer_pattern, a regular expression whose "
                        f"first group is the answer in these references (the task's own: {default!r}).")


def hub_rows(name: str, s: DataSource) -> tuple[dict[str, list[dict]], str]:
    """Every split of a task from the Hub: its own splits, and the held-out parts of its train (disjoint
    slices of one seeded order, the same in every run). task.hub_* override the run's own task only."""
    spec = ANSWER_TASKS[name]
    source = with_overrides(spec.hub, s.hub_repo, s.hub_revision, s.hub_config) if name == s.name else spec.hub
    local = (f"task.train_file=..., task.validation_file=... and task.test_file=... (JSON lines or Parquet with the "
             f"columns {', '.join(spec.columns)}); profile=smoke needs none.")
    rows = read_splits(source, list(spec.hub_splits), repr(name), local)
    for split, part in rows.items():
        require_columns(part, spec.columns, repr(name), source, split)
    train = rows["train"]
    order = random.Random(0).sample(range(len(train)), min(len(train) // 2, sum(spec.held_out.values())))
    start = 0
    for split, n in spec.held_out.items():
        rows[split] = [train[i] for i in sorted(order[start:start + n])]
        start += n
    taken = set(order)
    rows["train"] = [row for i, row in enumerate(train) if i not in taken]
    return rows, f"hub:{source.repo}@{source.revision}/{source.config}"


def synthetic_rows(name: str, n: int, seed: int) -> list[dict]:
    """A learnable stand-in with the task's columns (the smoke profile): small sums for the maths
    tasks, a word copied into a function or a query for the others."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, word = rng.randrange(2, 20), rng.randrange(2, 20), f"w{rng.randrange(48, 112)}"
        rows.append({
            "gsm8k": {"question": f"w{a} plus w{b}", "answer": f"w{a} w{b} #### {a + b}"},
            "metamath": {"query": f"w{a} plus w{b}", "response": f"w{a} w{b} The answer is: {a + b}"},
            "viggo": {"target": f"the game {word}", "meaning_representation": f"inform(name[{word}])"},
            "sql": {"question": f"which {word}", "context": "CREATE TABLE t (w1 VARCHAR)",
                    "answer": f"SELECT {word} FROM t"},
            "pyapi": {"doc": f"return the w{a} of w{b}", "name": f"w{a}.w{b}"},
        }[name])
    return rows


def load_answers(s: DataSource, seed: int, pattern: str | None = None) -> AnswerData:
    """Training examples, and the selection (task.select_split) and reported (task.eval_split) splits;
    the answer pattern checked against every evaluation split's references."""
    name, spec = s.name, ANSWER_TASKS[s.name]
    eval_name = spec.eval_task or name
    default = ANSWER_TASKS[eval_name].pattern
    pattern = pattern or default
    splits = tuple(dict.fromkeys((s.select_split, s.eval_split)))
    files = {"train": s.train_file, "validation": s.validation_file, "test": s.test_file}
    if s.synthetic_standin:
        rows = {"train": synthetic_rows(name, s.synthetic_train, seed),
                **{split: synthetic_rows(eval_name, s.synthetic_eval, seed + 10_000 * (1 + i))
                   for i, split in enumerate(splits)}}
        source = f"synthetic stand-in for {name}"
    elif any(files.values()):
        missing = [f"task.{k}_file" for k in ("train", *splits) if not files[k]]
        if missing:
            raise DSEEError(f"task={name} reads local files for train and for the splits it selects on and reports "
                            f"({', '.join(splits)}); missing {', '.join(missing)}.")
        rows = {k: read_rows(Path(files[k])) for k in ("train", *splits)}
        source = ", ".join(files[k] for k in ("train", *splits))
    elif spec.builtin is not None:
        rows, source = spec.builtin()
    else:
        rows, source = hub_rows(name, s)
        if spec.eval_task:
            evals, where = hub_rows(eval_name, s)
            rows = {"train": rows["train"], **{split: evals[split] for split in splits}}
            source += f"; evaluation {where}"
    for split in ("train", *splits):
        _check_columns(name if split == "train" else eval_name, rows[split], f"{source} ({split})")
    train = train_slice(_examples(spec, rows["train"], spec.pattern), s.max_train_samples, s.train_subset)
    evals = {split: _examples(ANSWER_TASKS[eval_name], rows[split], pattern)[: s.max_eval_samples or None]
             for split in splits}
    for split, part in evals.items():
        check_pattern(eval_name, split, part, pattern, default)
    if not train or not all(evals.values()):
        raise DSEEError(f"task={name} from {source} has an empty training or evaluation split.")
    return AnswerData(train, evals, source, pattern, ANSWER_TASKS[eval_name].numeric)


def as_instructions(examples: list[AnswerExample], chat: bool) -> list[Instruction]:
    """Prompt (plain text, or the user's turn of a chat) and response, for lm_tasks.encode_instructions."""
    return [Instruction([{"role": "user", "content": e.prompt}] if chat else e.prompt, e.response) for e in examples]
