"""`dsee eval`: what a run exported, loaded back and evaluated on its task.

``export/merged`` is loaded as the plain model it is (removed heads and FFN neurons rebuilt);
``export/adapter`` is re-applied onto the pretrained model the run started from. Either is
then evaluated on the run's task, or on the task the overrides describe, and may write one
prediction per example: for GLUE in the benchmark's submission format (``index<TAB>prediction``,
label names as GLUE expects), for generation tasks the decoded texts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsee_cli.atomic import atomic_write_text
from dsee_cli.config import CAUSAL_TASKS, RunConfig
from dsee_cli.core.cache import cache_root
from dsee_cli.core.devices import pick_device
from dsee_cli.core.models import LoadedModel
from dsee_cli.core.precision import resolve_precision
from dsee_cli.data.answer_tasks import ANSWER_TASKS
from dsee_cli.data.classification import TASKS, Encoded, TaskSpec
from dsee_cli.data.generation import NLG_TASKS
from dsee_cli.data.lm_tasks import PERPLEXITY_TASKS
from dsee_cli.data.metrics import task_metrics
from dsee_cli.errors import DSEEError, choice_error
from dsee_cli.run.export import apply_adapter, load_merged, load_merged_tokenizer
from dsee_cli.run.task import load_pretrained, prepare_task
from dsee_cli.run.train import ProgressSink, predict

SOURCES = ("merged", "compressed", "adapter")


def find_run(path: Path) -> Path:
    """The run directory of ``path``: the run directory itself, or an export directory inside one."""
    path = Path(path)
    for candidate in (path, *list(path.parents)[:2]):
        if (candidate / "metrics.json").is_file():
            return candidate
    raise DSEEError(f"{str(path)!r} is not a finished run: neither it nor its parents hold a metrics.json. Give a "
                    f"run directory (outputs/<overrides>/ or multirun/<name>/<overrides>/) or its export/merged or "
                    f"export/adapter folder.")


def run_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def pick_source(path: Path, run_dir: Path, source: str | None) -> tuple[str, Path]:
    """Which export to load: the one named, the one ``path`` is, else merged where the run wrote one."""
    path = Path(path)
    if source is None and path.name in SOURCES and path.parent.name == "export":
        source = path.name
    if source is None:
        source = "merged" if (run_dir / "export" / "merged").is_dir() else "adapter"
    if source not in SOURCES:
        raise choice_error("export (--from)", source, SOURCES)
    export_dir = run_dir / "export" / source
    if not export_dir.is_dir():
        why = run_metrics(run_dir).get("export", {}).get(source) or "the run was made with export=false"
        raise DSEEError(f"{run_dir} has no export/{source} ({why}). Valid choices here: "
                        f"{', '.join(s for s in SOURCES if (run_dir / 'export' / s).is_dir()) or 'none'}.")
    return source, export_dir


def load_export(cfg: RunConfig, export_dir: Path, source: str) -> LoadedModel:
    if source in ("merged", "compressed"):
        tokenizer = load_merged_tokenizer(export_dir)
        if tokenizer.pad_token is None:  # GPT-2's, as at training time
            tokenizer.pad_token = tokenizer.eos_token
        return LoadedModel(load_merged(export_dir), tokenizer, str(export_dir))
    loaded = load_pretrained(cfg)
    apply_adapter(loaded.model, export_dir)
    return loaded


@dataclass
class EvalResult:
    source: str
    split: str
    metrics: dict[str, float]  # empty for an unlabelled split (GLUE's test files)
    reference: dict[str, float] = field(default_factory=dict)  # the run's own final scores, where comparable
    predictions: list[Path] = field(default_factory=list)
    examples: int = 0


def evaluate_export(cfg: RunConfig, run_dir: Path, source: str, export_dir: Path, split: str | None = None,
                    predictions: Path | str | None = None, say=lambda text: None,
                    sink: ProgressSink | None = None) -> EvalResult:
    """Evaluate one export of a run on ``cfg``'s task; ``split`` None is the split the run evaluated."""
    sink = sink or ProgressSink()
    generation = cfg.task.name in CAUSAL_TASKS  # a causal LM: token metrics, then decoding or perplexity
    reports_split = cfg.task.name in (*NLG_TASKS, *PERPLEXITY_TASKS, *ANSWER_TASKS)
    split = split or (cfg.task.eval_split if reports_split else "validation")
    if reports_split and split != cfg.task.eval_split:  # another split than the run reported: only that one
        cfg.task.eval_split = cfg.task.select_split = split
    # a free GPU, held until this process ends (dsee eval is one command; an error ends it too)
    device, _ = pick_device(cfg.trainer.device, cache_root() / "devices", cfg.trainer.jobs_per_gpu, say=say)
    precision = resolve_precision(cfg.trainer.precision, device, cfg.model.dtype)
    say(f"Loading export/{source} ({device}, precision {precision.name})")
    loaded = load_export(cfg, export_dir, source)
    task = prepare_task(cfg, say, sink, loaded=loaded, split=split)
    model, pad_id = loaded.model.to(device).eval(), loaded.tokenizer.pad_token_id
    say(f"Evaluating on {task.data_source} ({split})")
    result = EvalResult(source, split, {})
    if generation:
        out = _prediction_path(predictions, f"generations-{split}.jsonl") if predictions else None
        result.metrics = task.ops.evaluate(model, task.evals, pad_id, device, cfg.trainer.eval_batch_size, precision)
        if task.generate:
            result.metrics |= task.generate(model, device, precision, out)
        result.predictions = [out] if out and out.exists() else []
        result.examples = sum(len(e.prompts) for e in task.evals.values())
    else:
        spec = TASKS[cfg.task.name]
        for name, data in task.evals.items():
            preds = predict(model, data, spec, pad_id, device, cfg.trainer.eval_batch_size, precision)
            result.examples += len(preds)
            if data.labelled:
                scores = task_metrics(spec.name, preds.numpy(), data.labels.numpy())
                result.metrics |= {f"{name}/{k}": v for k, v in scores.items()}
            if predictions is not None:
                result.predictions.append(write_predictions(predictions, name, len(task.evals), data, preds, spec))
    result.reference = _reference(run_dir, cfg, result.metrics)
    return result


def _reference(run_dir: Path, cfg: RunConfig, metrics: dict[str, float]) -> dict[str, float]:
    """The run's final scores for the same metrics, when the evaluation data is the run's own."""
    saved = run_metrics(run_dir)
    if saved.get("config", {}).get("task") != _as_dict(cfg.task):
        return {}
    final = saved.get("final", {})
    own = {**final.get("eval", {}), **(final.get("generation") or {})}
    return {k: own[k] for k in metrics if k in own}


def _as_dict(obj) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(obj), default=str))


def _is_folder(target: Path | str) -> bool:
    return str(target).endswith("/") or Path(target).is_dir()


def _prediction_path(target: Path | str, default_name: str) -> Path:
    return Path(target) / default_name if _is_folder(target) else Path(target)


def _submission_name(spec: TaskSpec, split: str) -> str:
    if spec.name == "mnli":  # the benchmark's names for the matched and mismatched files
        return "MNLI-mm.tsv" if split.endswith("mismatched") else "MNLI-m.tsv"
    return spec.submission or f"{spec.name}.tsv"


def _label_text(spec: TaskSpec, value: float) -> str:
    if spec.num_labels == 1:
        return f"{value:.3f}"
    return spec.label_names[int(value)] if spec.label_names else str(int(value))


def write_predictions(target: Path | str, split: str, n_splits: int, data: Encoded, preds: torch.Tensor,
                      spec: TaskSpec) -> Path:
    """``index<TAB>prediction`` per example. A directory gets GLUE's file names (SST-2.tsv,
    MNLI-m.tsv, ...); a file name with two splits (MNLI) gets the split appended."""
    folder, target = _is_folder(target), Path(target)
    if folder:
        path = target / _submission_name(spec, split)
    elif n_splits > 1:
        path = target.with_name(f"{target.stem}-{split}{target.suffix}")
    else:
        path = target
    keys = data.keys or [str(i) for i in range(len(preds))]
    lines = ["index\tprediction", *(f"{k}\t{_label_text(spec, float(v))}" for k, v in zip(keys, preds.tolist()))]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def load_as_served(export_dir: Path) -> tuple[torch.nn.Module, str]:
    """The export as a serving stack would load it: plain ``from_pretrained`` where its config states
    its shapes; else (removed units recorded for replay: shapes=free) dsee's load_merged, saying why."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsee_cli.pruning.residual import removed_units

    config = AutoConfig.from_pretrained(export_dir, local_files_only=True)
    if any(removed_units(config).values()):
        return load_merged(export_dir), "load_merged (pruning.shapes=free: the config cannot state its shapes)"
    return AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True).eval(), "from_pretrained"


def measure_export_speed(cfg: RunConfig, run_dir: Path, device: torch.device, say=lambda text: None) -> dict:
    """Prefill and decode speed of the run's export/merged against the dense pretrained model
    (measure/serving.py): what metrics.json keeps as savings.serving."""
    from dsee_cli.measure.costs import saved_bytes
    from dsee_cli.measure.serving import ServingSettings, measure_serving

    export_dir = Path(run_dir) / "export" / "merged"
    if cfg.task.name not in CAUSAL_TASKS:
        raise DSEEError(f"--speed times prefill and decoding with the KV cache, which a language model does; "
                        f"task={cfg.task.name} trains a classifier. Use it on a decoder run "
                        f"({', '.join(CAUSAL_TASKS)}).")
    if not (export_dir / "config.json").is_file():
        why = run_metrics(run_dir).get("export", {}).get("merged") or "the run was made with export=false"
        raise DSEEError(f"--speed times the run's export/merged, and {run_dir} has none ({why}). Rerun it with "
                        f"export=true and a method that merges into the weights (dsee, lora, full, a PEFT LoRA).")
    export, how = load_as_served(export_dir)
    dense = load_pretrained(cfg).model
    if device.type == "cuda":  # what GPU serving runs: bf16, SDPA attention
        export, dense = export.to(torch.bfloat16), dense.to(torch.bfloat16)
        for m in (export, dense):
            m.config._attn_implementation = "sdpa"
    say(f"Timing export/merged ({how}) against the dense model on {device}: prefill of {cfg.task.seq_len} tokens, "
        f"decode of 128, batch 1 and 16")
    settings = ServingSettings(prompt_len=cfg.task.seq_len)
    dense_bytes = saved_bytes(dense)
    result = measure_serving(export, dense, device, settings, (export_dir / "model.safetensors").stat().st_size,
                             dense_bytes)
    return {**result, "loaded_with": how}
