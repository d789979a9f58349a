"""The exact-match tasks RoSA and PEFT report (gsm8k, viggo, sql, metamath): loaders on local files and
on the Hub's Parquet layout (a mirror folder), answer extraction on hand-made cases, a model that
always answers right scoring 100 %, and the checks that stop a run before training."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from dsee_cli.data.answer_tasks import ANSWER_TASKS, exact_match, extract, load_answers
from dsee_cli.data.classification import DataSource
from dsee_cli.data.generation import DecodeConfig, decode
from dsee_cli.errors import DSEEError
from dsee_cli.run.pipeline import preflight
from tests.helpers import compose, run_in_process

GSM = ANSWER_TASKS["gsm8k"]


@pytest.mark.parametrize("text, answer", [
    ("She pays 3 + 4 = 7 dollars.\n#### 1,234", "1234"),
    ("#### 72 dollars, as computed above.", "72"),  # trailing text after the number
    ("#### $1,234.00", "1234"),
    ("#### -5", "-5"),
    ("So the answer is 18. Then we stop.", "18"),  # no ####: the last number
    ("The answer is: 0.50", "0.5"),
    ("I do not know.", None),  # no number at all
])
def test_gsm8k_answers_are_extracted_as_numbers(text, answer):
    assert extract(text, GSM.pattern, numeric=True) == answer


def test_text_answers_are_compared_after_whitespace_normalisation():
    sql = ANSWER_TASKS["sql"]
    assert extract("Sure.\nSELECT  name FROM\thead  WHERE age > 56\nmore", sql.pattern, False) == \
        "SELECT name FROM head WHERE age > 56"
    assert extract("no query here", sql.pattern, False) is None
    viggo = ANSWER_TASKS["viggo"]
    assert extract("  inform(name[Tomb Raider])\nsecond line", viggo.pattern, False) == "inform(name[Tomb Raider])"
    scores = exact_match(["#### 7", "8", "none"], ["7", "9", "3"], GSM.pattern, True)
    assert scores == {"exact_match": pytest.approx(100 / 3), "answered": pytest.approx(200 / 3)}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GSM_ROWS = [{"question": f"Tom has {a} apples and buys {b}. How many?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in ((3, 4), (10, 12), (7, 1), (2, 2))]
FILES = {
    "gsm8k": {"train": GSM_ROWS, "validation": GSM_ROWS[:2], "test": GSM_ROWS[2:]},
    "metamath": {"train": [{"query": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is: 5"}],
                 "validation": GSM_ROWS[:2], "test": GSM_ROWS[2:]},
    "viggo": {split: [{"target": "Tomb Raider is a great game.", "meaning_representation": "give_opinion(name[Tomb "
                       "Raider], rating[excellent])"}] for split in ("train", "validation", "test")},
    "sql": {split: [{"question": "How many heads are older than 56?", "context": "CREATE TABLE head (age INTEGER)",
                     "answer": "SELECT COUNT(*) FROM head WHERE age > 56"}]
            for split in ("train", "validation", "test")},
}


def _local(tmp_path: Path, task: str) -> DataSource:
    files = {split: _jsonl(tmp_path / f"{task}-{split}.jsonl", rows) for split, rows in FILES[task].items()}
    return DataSource(name=task, train_file=files["train"], validation_file=files["validation"],
                      test_file=files["test"], eval_split="test", select_split="validation")


@pytest.mark.parametrize("task", sorted(FILES))
def test_each_task_reads_local_json_lines(tmp_path, task):
    data = load_answers(_local(tmp_path, task), seed=1)
    assert len(data.train) == len(FILES[task]["train"]) and set(data.evals) == {"validation", "test"}
    ex = data.evals["test"][0]
    expected = {"gsm8k": "8", "metamath": "8", "viggo": "give_opinion(name[Tomb Raider], rating[excellent])",
                "sql": "SELECT COUNT(*) FROM head WHERE age > 56"}[task]
    assert ex.answer == expected and ex.prompt.strip() and ex.response
    if task == "metamath":  # trained on MetaMathQA's query / response, evaluated on GSM8K's questions
        assert data.train[0].prompt == "Question: What is 2 + 3?\nAnswer:" and "Tom has" in ex.prompt


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_gsm8k_and_sql_from_the_hub_layout_hold_out_fixed_splits(tmp_path, monkeypatch):
    base = tmp_path / "openai/gsm8k/main/main"
    train = [{"question": f"q{i}", "answer": f"... #### {i}"} for i in range(1200)]
    _write(base / "train-00000-of-00001.parquet", train)
    _write(base / "test-00000-of-00001.parquet", [{"question": "t", "answer": "#### 1"}] * 3)
    sql = [{"question": f"q{i}", "context": "CREATE TABLE t (a INT)", "answer": f"SELECT {i} FROM t"}
           for i in range(3000)]
    _write(tmp_path / "b-mc2/sql-create-context/refs/convert/parquet/default/train/0000.parquet", sql)
    monkeypatch.setenv("DSEE_HUB_MIRROR", str(tmp_path))
    s = DataSource(name="gsm8k", eval_split="test", select_split="validation")
    data = load_answers(s, seed=1)
    assert (len(data.train), len(data.evals["validation"]), len(data.evals["test"])) == (700, 500, 3)
    held = {e.prompt for e in data.evals["validation"]}
    assert not held & {e.prompt for e in data.train}  # validation is never trained on
    assert held == {e.prompt for e in load_answers(s, seed=2).evals["validation"]}  # the same for every seed
    q = load_answers(DataSource(name="sql", eval_split="test", select_split="validation"), seed=1)
    assert (len(q.train), len(q.evals["validation"]), len(q.evals["test"])) == (1500, 500, 1000)
    assert not {e.prompt for e in q.evals["test"]} & {e.prompt for e in q.evals["validation"]}


class Oracle(nn.Module):
    """Generates the reference response of each prompt it was given, whatever the prompt's padding."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], eos: int):
        super().__init__()
        self.answers, self.eos = answers, eos
        self.anchor = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(i for i, m in zip(ids, mask) if m)
            out = (self.answers[prompt] + [self.eos])[:max_new_tokens]
            rows.append(ids + out + [self.eos] * (max_new_tokens - len(out)))
        return torch.tensor(rows)


def byte_level_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on ``texts``: it decodes what it encodes exactly (case,
    punctuation, spaces), as real LLM tokenizers do; the tiny models' WordPiece lowercases."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("task", sorted(FILES))
def test_a_model_that_always_answers_right_scores_100(tmp_path, task):
    from dsee_cli.data.answer_tasks import as_instructions
    from dsee_cli.data.lm_tasks import encode_instructions

    data = load_answers(_local(tmp_path, task), seed=1)
    tok = byte_level_tokenizer([e.prompt + e.response for part in data.evals.values() for e in part])
    examples = data.evals["test"]
    enc = encode_instructions(as_instructions(examples, chat=False), tok, 512)
    answers = {tuple(p): tok(e.response, add_special_tokens=False)["input_ids"] for p, e in zip(enc.prompts, examples)}
    texts = decode(Oracle(answers, tok.eos_token_id), tok, enc.prompts, DecodeConfig(num_beams=1, max_new_tokens=64),
                   "cpu", tok.eos_token_id, tok.pad_token_id)
    numeric = ANSWER_TASKS[ANSWER_TASKS[task].eval_task or task].numeric
    assert exact_match(texts, [e.answer for e in examples], data.pattern, numeric)["exact_match"] == 100.0


def test_a_gsm8k_file_without_its_answers_fails_before_training(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "He has 7 apples."}]
    files = {split: _jsonl(tmp_path / f"{split}.jsonl", rows) for split in ("train", "validation", "test")}
    with pytest.raises(DSEEError, match=r"the gsm8k answer pattern .* matches nothing in the 1 references of task "
                                        r"gsm8k's validation split.*'#### <number>'"):
        preflight(compose("task=gsm8k", "model=tiny-llama", *(f"task.{k}_file={v}" for k, v in files.items())))


def test_an_answer_pattern_that_matches_no_reference_fails_before_training(tmp_path):
    files = {split: _jsonl(tmp_path / f"{split}.jsonl", FILES["sql"][split]) for split in FILES["sql"]}
    overrides = ["task=sql", "model=tiny-llama", *(f"task.{k}_file={v}" for k, v in files.items())]
    with pytest.raises(DSEEError, match=r"task.answer_pattern='\(INSERT .\*\)' matches nothing.*\(SELECT"):
        preflight(compose(*overrides, "task.answer_pattern='(INSERT .*)'"))
    with pytest.raises(DSEEError, match=r"task.answer_pattern='\(SELECT' is not a regular expression"):
        preflight(compose(*overrides, "task.answer_pattern='(SELECT'"))


def test_gsm8k_smoke_run_trains_on_the_response_and_reports_exact_match(tmp_path):
    m = run_in_process(tmp_path / "run", "task=gsm8k", "profile=smoke", "adapter=lora", "trainer.max_steps=2",
                       "task.decode.max_new_tokens=4")
    final = m["final"]
    assert m["main_metric"] == "validation/loss" and "test/exact_match" in final["generation"]
    assert 0.0 <= final["generation"]["test/exact_match"] <= 100.0
    lines = (tmp_path / "run" / "generations-test.jsonl").read_text().splitlines()
    assert len(lines) == 32 and {"prompt", "generation", "reference"} <= set(json.loads(lines[0]))


@pytest.mark.parametrize("task", ["gsm8k", "metamath"])
def test_offline_without_files_says_how_within_seconds(task, monkeypatch):
    monkeypatch.delenv("DSEE_HUB_MIRROR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DSEEError) as err:
        preflight(compose(f"task={task}", "model=tiny-llama"))
    text = str(err.value)
    assert "unreachable" in text and "task.train_file=" in text and "DSEE_HUB_MIRROR" in text
