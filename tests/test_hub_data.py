"""The Hub path without the Hub: small Parquet files in the exact layout of each source (the GEM
repositories' Parquet export, GLUE's own Parquet files), read through the same code as the Hub
(DSEE_HUB_MIRROR points hub_data.hub_root at a local folder)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsee_cli.data import hub as hub_data
from dsee_cli.data.classification import UNLABELLED, DataSource, load_task
from dsee_cli.data.generation import load_nlg
from dsee_cli.data.hub import HubSource, is_connection_error
from dsee_cli.errors import DSEEError

from .helpers import run_in_process

STRINGS = pa.list_(pa.string())


def _write(path: Path, columns: dict, schema: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array(v, type=(schema or {}).get(k)) for k, v in columns.items()})
    pq.write_table(table, path)


def _e2e_rows(split: str) -> dict:
    mrs = ["name[Alimentum], area[city centre], familyFriendly[no]", "name[Aromi], eatType[coffee shop]"]
    if split == "train":  # one row per (MR, target); references empty, as GEM's training rows
        return {"gem_id": [f"e2e_nlg-train-{i}" for i in range(4)],
                "meaning_representation": [mrs[0], mrs[0], mrs[1], mrs[1]],
                "target": ["Alimentum is in the city centre.", "Alimentum is not family-friendly.",
                           "Aromi is a coffee shop.", "There is a coffee shop, Aromi."],
                "references": [[], [], [], []]}
    return {"gem_id": [f"e2e_nlg-{split}-0", f"e2e_nlg-{split}-1"], "meaning_representation": mrs,
            "target": ["Alimentum, in the city centre, is not family-friendly.", "Aromi is a coffee shop."],
            "references": [["Alimentum, in the city centre, is not family-friendly.", "Alimentum is in the centre."],
                           ["Aromi is a coffee shop."]]}


def _webnlg_rows(split: str) -> dict:
    triples = [["Aarhus | leader | Jacob_Bundsgaard"],
               ["Aarhus_Airport | cityServed | Aarhus", "Aarhus | country | Denmark"]]
    refs = [["The leader of Aarhus is Jacob Bundsgaard."], ["Aarhus Airport serves Aarhus, Denmark.",
                                                            "Aarhus airport serves the city of Aarhus in Denmark."]]
    return {"gem_id": [f"web_nlg_en-{split}-{i}" for i in range(2)], "input": triples,
            "target": [r[0] for r in refs], "references": [[] for _ in refs] if split == "train" else refs,
            "category": ["Airport", "Airport"], "webnlg_id": [f"{split}/Airport/1/Id{i}" for i in range(2)]}


def _dart_rows(split: str) -> dict:
    triples = [[["Mars Hill College", "JOINED", "1973"],
                ["Mars Hill College", "LOCATION", "Mars Hill, North Carolina"]],
               [["[TABLE_CONTEXT]", "[TITLE]", "List of lakes"]]]
    refs = [["A school from Mars Hill, North Carolina, joined in 1973."],
            ["This is a list of lakes.", "Lakes, listed."]]
    return {"gem_id": [f"dart-{split}-{i}" for i in range(2)], "dart_id": [0, 1], "tripleset": triples,
            "subtree_was_extended": [True, False], "target_sources": [["WikiSQL_decl_sents"], ["webnlg"]],
            "target": [r[0] for r in refs], "references": [[] for _ in refs] if split == "train" else refs}


# (task, repo, revision, config, rows, schema, file name of a split): the layout of each real source
NLG_LAYOUTS = {
    "e2e": ("GEM/e2e_nlg", "refs/convert/parquet", "default", _e2e_rows, {"references": STRINGS},
            "{split}/0000.parquet"),
    "webnlg": ("GEM/web_nlg", "refs/convert/parquet", "en", _webnlg_rows, {"input": STRINGS, "references": STRINGS},
               "{split}/0000.parquet"),
    "dart": ("GEM/dart", "refs/convert/parquet", "default", _dart_rows,
             {"tripleset": pa.list_(STRINGS), "references": STRINGS, "target_sources": STRINGS},
             "dart-{split}.parquet"),  # the export's older file names (still found)
}


def _nlg_mirror(root: Path, task: str, revision: str | None = None, repo: str | None = None) -> Path:
    default_repo, default_revision, config, rows, schema, name = NLG_LAYOUTS[task]
    base = root / (repo or default_repo) / (revision or default_revision) / config
    for split in ("train", "validation", "test"):
        _write(base / name.format(split=split), rows(split), schema)
    return root


@pytest.mark.parametrize("task", NLG_LAYOUTS)
def test_each_generation_source_loads_through_the_hub_path(task, tmp_path, monkeypatch):
    monkeypatch.setenv("DSEE_HUB_MIRROR", str(_nlg_mirror(tmp_path, task)))
    data = load_nlg(DataSource(name=task, eval_split="validation"), 1)
    evaluation = data.evals["validation"]
    assert len(evaluation) == 2 and data.source.startswith(f"hub:{NLG_LAYOUTS[task][0]}@refs/convert/parquet")
    if task == "e2e":
        assert len(data.train) == 4 and data.train[0] == ("name[Alimentum], area[city centre], familyFriendly[no]",
                                                          "Alimentum is in the city centre.")
        assert evaluation[0].references == ("Alimentum, in the city centre, is not family-friendly.",
                                            "Alimentum is in the centre.")
    if task == "webnlg":
        assert evaluation[1].source == "Aarhus_Airport : cityServed : Aarhus | Aarhus : country : Denmark"
        assert len(evaluation[1].references) == 2 and len(data.train) == 2
    if task == "dart":
        assert evaluation[0].source == ("Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : "
                                        "Mars Hill, North Carolina")
        assert evaluation[1].references == ("This is a list of lakes.", "Lakes, listed.")
    test = load_nlg(DataSource(name=task, eval_split="test"), 1)
    assert "test" in test.evals


def test_glue_loads_its_own_parquet_files_with_test_splits(tmp_path, monkeypatch):
    base = tmp_path / "nyu-mll" / "glue" / "main" / "mnli"
    pair = {"premise": ["A man sleeps.", "Two dogs run."], "hypothesis": ["A person rests.", "Cats fly."]}
    for split, labels in (("train", [0, 2]), ("validation_matched", [0, 2]), ("validation_mismatched", [1, 2]),
                          ("test_matched", [-1, -1]), ("test_mismatched", [-1, -1])):
        _write(base / f"{split}-00000-of-00001.parquet", {**pair, "label": labels, "idx": [7, 8]})
    monkeypatch.setenv("DSEE_HUB_MIRROR", str(tmp_path))
    dev = load_task(DataSource(name="mnli"), 0)
    assert set(dev.evals) == {"validation_matched", "validation_mismatched"}
    assert dev.evals["validation_mismatched"][0].label == 1.0 and dev.source == "hub:nyu-mll/glue@main"
    test = load_task(DataSource(name="mnli"), 0, "test")
    assert set(test.evals) == {"test_matched", "test_mismatched"}
    assert all(e.label == UNLABELLED for e in test.evals["test_matched"]) and test.evals["test_matched"][1].key == "8"


def test_hub_repo_and_revision_point_at_a_fork(tmp_path, monkeypatch):
    monkeypatch.setenv("DSEE_HUB_MIRROR", str(_nlg_mirror(tmp_path, "e2e", revision="abc123", repo="me/e2e-fork")))
    data = load_nlg(DataSource(name="e2e", hub_repo="me/e2e-fork", hub_revision="abc123"), 1)
    assert data.source == "hub:me/e2e-fork@abc123/default"
    with pytest.raises(DSEEError, match="revision refs/convert/parquet"):  # the default is not in this mirror
        load_nlg(DataSource(name="e2e"), 1)


def test_no_connection_gives_the_offline_hint(monkeypatch):
    monkeypatch.delenv("DSEE_HUB_MIRROR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DSEEError) as err:
        load_nlg(DataSource(name="webnlg"), 1)
    text = str(err.value)
    assert "unreachable" in text and "GEM/web_nlg (revision refs/convert/parquet, config en)" in text
    assert "task.data_dir=" in text and "DSEE_HUB_MIRROR" in text


def test_a_reachable_hub_with_unreadable_data_says_so(tmp_path, monkeypatch):
    """The Hub answers but the files are not there (a renamed config, say): not the offline hint."""
    monkeypatch.delenv("DSEE_HUB_MIRROR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_data, "hub_reachable", lambda: True)
    monkeypatch.setattr(hub_data, "hub_root", lambda source: str(tmp_path / "empty"))
    (tmp_path / "empty" / "other").mkdir(parents=True)
    with pytest.raises(DSEEError) as err:
        load_nlg(DataSource(name="dart"), 1)
    text = str(err.value)
    assert text.startswith("Could not read 'dart' from GEM/dart (revision refs/convert/parquet, config default)")
    assert "no Parquet files for config 'default'" in text and "other" in text and "unreachable" not in text
    assert "task.hub_revision" in text and "task.data_dir" in text


def test_a_connection_failure_while_reading_gives_the_offline_hint(monkeypatch):
    monkeypatch.delenv("DSEE_HUB_MIRROR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_data, "hub_reachable", lambda: True)

    def drop(*args):
        try:
            raise ConnectionResetError("peer reset")
        except ConnectionResetError as inner:
            raise OSError("while listing files") from inner

    monkeypatch.setattr(hub_data, "_split_files", drop)
    with pytest.raises(DSEEError, match="unreachable"):
        load_nlg(DataSource(name="e2e"), 1)


def test_wrong_columns_are_named(tmp_path, monkeypatch):
    base = tmp_path / "GEM" / "e2e_nlg" / "refs" / "convert" / "parquet" / "default"
    for split in ("train", "validation"):
        _write(base / split / "0000.parquet", {"mr": ["a[b]"], "text": ["a b"]})
    monkeypatch.setenv("DSEE_HUB_MIRROR", str(tmp_path))
    with pytest.raises(DSEEError, match=r"has no column\(s\) \['meaning_representation', 'target'\]"):
        load_nlg(DataSource(name="e2e"), 1)


def test_connection_errors_are_told_apart_from_data_errors():
    class ConnectError(Exception):  # httpx's name
        pass

    try:
        raise ValueError("wrapped") from ConnectError("refused")
    except ValueError as exc:
        assert is_connection_error(exc)
    assert not is_connection_error(FileNotFoundError("no such split"))
    assert HubSource("a/b", "main", "c").describe() == "a/b (revision main, config c)"


def test_a_generation_run_trains_on_hub_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DSEE_HUB_MIRROR", str(_nlg_mirror(tmp_path / "mirror", "webnlg")))
    metrics = run_in_process(tmp_path / "run", "task=webnlg", "model=tiny-gpt2", "task.eval_split=validation",
                             "task.select_split=test",
                             "task.decode.num_beams=1", "task.decode.max_new_tokens=4", "trainer.max_steps=2",
                             "pruning=none", "model.tiny.hidden=32", "model.tiny.heads=4", messages=[])
    assert metrics["data_source"] == "hub:GEM/web_nlg@refs/convert/parquet/en"
    assert "validation/bleu" in metrics["final"]["generation"]


def test_max_train_samples_takes_a_seeded_random_subset_the_same_for_every_run():
    from dsee_cli.data.classification import DataSource, load_task

    full = load_task(DataSource(name="synthetic", synthetic_train=200), seed=1).train
    picked = [load_task(DataSource(name="synthetic", synthetic_train=200, max_train_samples=20), seed=1).train
              for _ in range(2)]
    first = load_task(DataSource(name="synthetic", synthetic_train=200, max_train_samples=20,
                                 train_subset="first"), seed=1).train
    assert picked[0] == picked[1] and len(picked[0]) == 20  # the same subset every time
    assert first == full[:20] and picked[0] != first  # not the file's first rows
    positions = [full.index(e) for e in picked[0]]
    assert positions == sorted(positions) and positions[-1] > 100  # kept in file order, drawn from all of it


def test_sentence_pairs_reach_bert_with_their_segment_ids():
    """BERT tells a pair's sentences apart by token_type_ids (HF run_glue and the DSEE reference
    code pass them): the encoded data, every batch and therefore training, evaluation, dsee eval
    and predictions (all batch through collate) carry them; GPT-2 takes none."""
    import torch

    from dsee_cli.core.arch import takes_segments
    from dsee_cli.data.classification import collate
    from dsee_cli.run.task import prepare_task
    from dsee_cli.run.train import ProgressSink

    from .helpers import compose, tiny

    task = prepare_task(compose("task=mrpc", "profile=smoke", "model.tiny.hidden=32", "model.tiny.heads=4"),
                        lambda text: None, ProgressSink())
    train = task.train
    assert train.token_type_ids is not None and len(train.token_type_ids) == len(train.input_ids)
    sep = task.loaded.tokenizer.sep_token_id
    for ids, types in zip(train.input_ids[:20], train.token_type_ids[:20]):
        first_sep = ids.index(sep)  # segment A is [CLS] sentence1 [SEP]; B the rest
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    batch = collate(train, [0, 1, 2], task.loaded.tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and bool(batch["token_type_ids"].any())
    model = task.loaded.model.eval()
    with torch.no_grad():  # and they change what the model computes
        without = model(**{k: v for k, v in batch.items() if k not in ("labels", "token_type_ids")}).logits
        with_ids = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert not torch.allclose(without, with_ids)
    assert not takes_segments(tiny("tiny-gpt2")[0]) and takes_segments(tiny("tiny-bert")[0])
