"""Zero-shot accuracy through lm-eval-harness, on the model in memory (not re-loaded from disk).

``task.lm_eval=[boolq,piqa,...]`` at the end of a decoder run, or ``dsee eval <run> --lm-eval ...``:
each task's ``acc`` (and ``acc_norm`` where the task defines it) and the mean over the tasks,
as ``zero_shot/<task>_acc``, ``zero_shot/<task>_acc_norm`` and ``zero_shot/mean_acc``. The harness
is the optional extra ``pip install dsee-cli[llm]``.

Under ``task.synthetic_standin`` (profile=smoke) the built-in task stands in for the Hub's.
Offline, the harness's tasks read local files through task YAMLs in ``task.lm_eval_include``
(a folder). ``ascending`` is a built-in multiple-choice task on the synthetic language of the
smoke profile's stand-in text (which word continues an ascending run), written as a local JSON
and read by the real harness: a zero-shot figure with something to measure on ``tiny-llama``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from dsee_cli.errors import DSEEError

PAPERS_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
BUILT_IN = "ascending"


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DSEEError("zero-shot evaluation (task.lm_eval / dsee eval --lm-eval) needs lm-eval-harness: "
                        "pip install 'dsee-cli[llm]' (or pip install lm-eval).") from exc
    return lm_eval, HFLM, TaskManager


def tasks_to_run(tasks: list[str], standin: bool, include: str | None = None) -> list[str]:
    """task.lm_eval; under the smoke profile's stand-ins (no Hub data) the built-in task stands in for the
    Hub's, unless the tasks come from a local folder (task.lm_eval_include)."""
    return [BUILT_IN] if standin and tasks and not include else list(tasks)


def write_ascending_task(folder: Path, n: int = 64, seed: int = 0) -> Path:
    """The built-in task: a run of 3-5 ascending synthetic words; choices the next word or 3 others."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(48, 100), rng.randint(3, 5)
        nxt = start + length
        wrong = rng.sample([w for w in range(48, 110) if w != nxt], 3)
        choices = [f"w{nxt}", *(f"w{w}" for w in wrong)]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"context": " ".join(f"w{start + k}" for k in range(length)),
                     "choices": [choices[i] for i in order], "label": order.index(0)})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{BUILT_IN}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{BUILT_IN}.yaml").write_text(
        f"task: {BUILT_IN}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


@contextlib.contextmanager
def _quiet(log: Path):
    """The harness's progress bars, notices and its `git describe` into a log, not the terminal; on
    failure the log's tail goes with the error."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "w") as sink, contextlib.redirect_stderr(sink):
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except Exception as exc:
            os.dup2(saved, 2)
            tail = log.read_text(errors="replace")[-1500:]
            raise DSEEError(f"lm-eval-harness failed: {type(exc).__name__}: {exc}\n{tail}") from exc
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _manager(tasks: list[str], include: str | None, tmp: Path):
    """The harness's task index: the local folders alone when they hold every task asked for
    (indexing the harness's thousands of task YAMLs takes seconds), else with the harness's own."""
    _, _, TaskManager = _harness()
    paths = [include] if include else []
    if BUILT_IN in tasks:
        paths.append(str(write_ascending_task(tmp / BUILT_IN)))
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DSEEError(f"lm-eval task(s) {unknown} are not known to lm-eval-harness (nor in task.lm_eval_include="
                        f"{include!r}); e.g. {', '.join(PAPERS_TASKS)}, or {BUILT_IN} (built in).")
    return manager


def check_tasks(tasks: list[str], include: str | None) -> None:
    """Before any training: the harness is installed and knows every task asked for."""
    with tempfile.TemporaryDirectory(prefix="dsee-lm-eval-") as tmp:
        _manager(tasks, include, Path(tmp))


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], device: torch.device, batch_size: int,
              include: str | None = None, limit: int | None = None, autocast: torch.dtype | None = None
              ) -> dict[str, float]:
    """Accuracy per task and their mean, from lm-eval-harness on this model."""
    lm_eval, HFLM, _ = _harness()
    with tempfile.TemporaryDirectory(prefix="dsee-lm-eval-") as tmp:
        manager = _manager(tasks, include, Path(tmp))
        was_training = model.training
        model.eval()
        try:
            with _quiet(Path(tmp) / "harness.log"):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                          mixed_precision_dtype=autocast)
                out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                              log_samples=False, bootstrap_iters=0)
        finally:
            model.train(was_training)
    scores: dict[str, float] = {}
    for task in tasks:
        result = out["results"].get(task, {})
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in result:
                scores[f"zero_shot/{task}_{metric}"] = float(result[f"{metric},none"])
    accs = [scores[f"zero_shot/{t}_acc"] for t in tasks if f"zero_shot/{t}_acc" in scores]
    if accs:
        scores["zero_shot/mean_acc"] = sum(accs) / len(accs)
    return scores
