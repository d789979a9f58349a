"""A task, ready to train: the model, the encoded data, and how that kind of task batches,
computes its loss and evaluates. Classification (GLUE, synthetic) and generation (E2E,
WebNLG, DART: causal LM, then beam search and the NLG metrics) differ only here."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsee_cli.atomic import atomic_write_text
from dsee_cli.config import CAUSAL_TASKS, RunConfig, task_hparams
from dsee_cli.core.arch import takes_segments
from dsee_cli.core.models import LoadedModel, load_model
from dsee_cli.core.precision import Precision
from dsee_cli.data.answer_tasks import ANSWER_TASKS, as_instructions, exact_match, load_answers
from dsee_cli.data.classification import DataSource, encode, load_task, spec_for
from dsee_cli.data.generation import (
    NLG_TASKS,
    collate_lm,
    decode,
    encode_eval,
    encode_lm,
    lm_loss,
    load_nlg,
    target_tokens,
    token_accuracy,
)
from dsee_cli.data.lm_tasks import (
    PERPLEXITY_TASKS,
    encode_instructions,
    load_instructions,
    load_texts,
    perplexity,
    windows,
    windows_as_lm,
)
from dsee_cli.data.metrics import trivial_metrics
from dsee_cli.data.nlg_metrics import nlg_metrics
from dsee_cli.data.zero_shot import zero_shot
from dsee_cli.errors import DSEEError
from dsee_cli.run.train import ProgressSink, TaskOps, classification_ops


@dataclass
class PreparedTask:
    """The model and the encoded data of one task, and how its kind trains and evaluates."""

    loaded: LoadedModel
    train: object
    evals: dict[str, object]
    ops: TaskOps
    data_source: str
    # (model, device, precision, where to write the decoded texts or None) -> the NLG metrics
    generate: Callable[[torch.nn.Module, torch.device, Precision, Path | None], dict[str, float]] | None = None
    trivial: dict[str, float] = field(default_factory=dict)  # the input-blind predictor's scores, as evaluate's


def load_pretrained(cfg: RunConfig) -> LoadedModel:
    """The pretrained model a run starts from (seeded, so a tiny model and a fresh task head are
    the same in every process)."""
    tiny = cfg.model.tiny
    if cfg.task.name in CAUSAL_TASKS:
        return load_model(cfg.model.name, cfg.model.path, 1, cfg.seed, tiny, causal_lm=True, dtype=cfg.model.dtype,
                          gguf_file=cfg.model.gguf_file)
    return load_model(cfg.model.name, cfg.model.path, spec_for(cfg.task.name).num_labels, cfg.seed, tiny,
                      train_pooler=cfg.model.train_pooler, dtype=cfg.model.dtype, gguf_file=cfg.model.gguf_file)


def prepare_task(cfg: RunConfig, say, sink: ProgressSink, loaded: LoadedModel | None = None,
                 split: str = "validation") -> PreparedTask:
    """The task's data encoded for ``loaded`` (default: the pretrained model of the config).
    ``split`` picks the classification tasks' evaluation split; generation uses task.eval_split."""
    max_length = task_hparams(cfg).max_length
    t = cfg.task
    loaded = loaded or load_pretrained(cfg)
    if t.name in NLG_TASKS:
        return _with_zero_shot(cfg, _with_perplexity(cfg, _generation_task(cfg, loaded, max_length, say, sink)), say)
    if t.name in ANSWER_TASKS:
        return _with_zero_shot(cfg, _with_perplexity(cfg, _answer_task(cfg, loaded, max_length, say, sink)), say)
    if t.name == "instruct":
        return _with_zero_shot(cfg, _with_perplexity(cfg, _instruct_task(cfg, loaded, max_length, split)), say)
    if t.name in PERPLEXITY_TASKS:
        return _with_zero_shot(cfg, _with_perplexity(cfg, _perplexity_task(cfg, loaded)), say)
    data = load_task(t, cfg.seed, split)
    regression = data.spec.num_labels == 1
    tok = loaded.tokenizer
    segments = takes_segments(loaded.model)
    evals = {k: encode(v, tok, max_length, regression, segments) for k, v in data.evals.items()}
    train = encode(data.train, tok, max_length, regression, segments)
    trivial = {f"{split}/{name}": value for split, enc in evals.items() if enc.labelled
               for name, value in trivial_metrics(t.name, train.labels.numpy(), enc.labels.numpy()).items()}
    first = next(iter(evals))
    ops = classification_ops(data.spec, first, t.select_metric)
    if trivial and ops.main not in trivial:  # trivial holds every metric of the task
        names = sorted(k.split("/", 1)[1] for k in trivial if k.startswith(first + "/"))
        raise DSEEError(f"task.select_metric={t.select_metric!r} is not a metric of task {t.name!r}; valid "
                        f"choices: {', '.join(names)}.")
    return PreparedTask(loaded, train, evals, ops, data.source, trivial=trivial)


def _generation_task(cfg: RunConfig, loaded: LoadedModel, max_length: int, say, sink: ProgressSink) -> PreparedTask:
    """GPT-2 on a data-to-text task: causal LM on the targets, beam search, multi-reference metrics."""
    t = cfg.task
    data = load_nlg(t, cfg.seed)
    tok = loaded.tokenizer
    eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    # periodic evaluation (and keep_best) on the selection split; the reported split is decoded once
    select, split = t.select_split, t.eval_split
    evals = {select: encode_eval(data.evals[select], tok, max_length, eos_id)}
    reported, examples = encode_eval(data.evals[split], tok, max_length, eos_id), data.evals[split]
    smoothing = t.label_smoothing

    def generate(model, device, precision, out_path: Path | None) -> dict[str, float]:
        enc = reported
        settings = t.decode
        say(f"Decoding {len(enc.prompts)} {split} inputs (beam {settings.num_beams})")
        sink.start(f"decode {split}", math.ceil(len(enc.prompts) / settings.batch_size), 0)
        hyps = decode(model, tok, enc.prompts, settings, device, eos_id, tok.pad_token_id,
                      progress=lambda done, total: sink.advance(float("nan"), 0.0), precision=precision)
        sink.stop()
        if out_path is not None:
            lines = [json.dumps({"source": ex.source, "hypothesis": h, "references": list(ex.references)})
                     for ex, h in zip(examples, hyps)]
            atomic_write_text(out_path, "\n".join(lines) + "\n")
        scores = nlg_metrics(hyps, enc.references, NLG_TASKS[t.name]["metrics"])
        return {f"{split}/{k}": v for k, v in scores.items()}

    ops = _lm_ops(f"{select}/token_accuracy", _token_metrics, smoothing)
    return PreparedTask(loaded, encode_lm(data.train, tok, max_length, eos_id), evals, ops, data.source, generate)


def _lm_ops(main: str, evaluate, smoothing: float = 0.0, higher_is_better: bool = True) -> TaskOps:
    return TaskOps(collate=collate_lm, evaluate=evaluate, main=main, higher_is_better=higher_is_better,
                   loss=lambda model, batch: lm_loss(model, batch, smoothing), loss_terms=target_tokens)


def _token_metrics(model, evals, pad_id, device, batch_size, precision) -> dict[str, float]:
    return {f"{s}/{k}": v for s, enc in evals.items()
            for k, v in token_accuracy(model, enc, pad_id, device, batch_size, precision).items()}


def _instruct_task(cfg: RunConfig, loaded: LoadedModel, max_length: int, split: str) -> PreparedTask:
    """Instruction tuning: the loss on the response tokens; selected by the validation loss."""
    train, evaluation, source = load_instructions(cfg.task, cfg.seed, split)
    tok = loaded.tokenizer
    evals = {split: encode_instructions(evaluation, tok, max_length)}
    ops = _lm_ops(f"{split}/loss", _token_metrics, cfg.task.label_smoothing, higher_is_better=False)
    return PreparedTask(loaded, encode_instructions(train, tok, max_length), evals, ops, source)


def _answer_task(cfg: RunConfig, loaded: LoadedModel, max_length: int, say, sink: ProgressSink) -> PreparedTask:
    """An exact-match task: the loss on the response; selected by the validation loss; the reported
    split decoded greedily once at the end and its answers matched (data/answer_tasks.py)."""
    t, tok = cfg.task, loaded.tokenizer
    data = load_answers(t, cfg.seed, t.answer_pattern)
    select, split = t.select_split, t.eval_split
    evals = {select: encode_instructions(as_instructions(data.evals[select], t.chat), tok, max_length)}
    reported = encode_instructions(as_instructions(data.evals[split], t.chat), tok, max_length)
    examples = data.evals[split]

    def generate(model, device, precision, out_path: Path | None) -> dict[str, float]:
        settings = t.decode
        say(f"Decoding {len(examples)} {split} prompts (greedy, up to {settings.max_new_tokens} tokens)")
        sink.start(f"decode {split}", math.ceil(len(examples) / settings.batch_size), 0)
        texts = decode(model, tok, reported.prompts, settings, device, tok.eos_token_id, tok.pad_token_id,
                       progress=lambda done, total: sink.advance(float("nan"), 0.0), precision=precision)
        sink.stop()
        if out_path is not None:
            lines = [json.dumps({"prompt": ex.prompt, "generation": g, "reference": ex.answer}) for ex, g in
                     zip(examples, texts)]
            atomic_write_text(out_path, "\n".join(lines) + "\n")
        scores = exact_match(texts, [ex.answer for ex in examples], data.pattern, data.numeric)
        return {f"{split}/{k}": v for k, v in scores.items()}

    ops = _lm_ops(f"{select}/loss", _token_metrics, t.label_smoothing, higher_is_better=False)
    train = encode_instructions(as_instructions(data.train, t.chat), tok, max_length)
    return PreparedTask(loaded, train, evals, ops, data.source, generate)


def _perplexity_task(cfg: RunConfig, loaded: LoadedModel) -> PreparedTask:
    """Causal LM on windows of the train text; perplexity on the selection split while training
    and on the reported split (task.eval_split) at the end, windows of task.seq_len."""
    t, tok = cfg.task, loaded.tokenizer
    select, reported = t.select_split, t.eval_split  # dsee eval --split sets both to the split asked for
    texts, source = load_texts(t, cfg.seed, tuple(dict.fromkeys(("train", select, reported))))
    cut = {name: windows(tok, text, t.seq_len, t.max_eval_samples if name != "train" else t.max_train_samples)
           for name, text in texts.items()}

    def evaluate_ppl(model, evals, pad_id, device, batch_size, precision) -> dict[str, float]:
        return {f"{select}/{k}": v for k, v in perplexity(model, cut[select], device, batch_size, precision).items()}

    def report(model, device, precision, out_path) -> dict[str, float]:
        return _perplexity_scores(reported, model, cut[reported], cfg, device, precision)

    ops = _lm_ops(f"{select}/ppl", evaluate_ppl, higher_is_better=False)
    return PreparedTask(loaded, windows_as_lm(cut["train"]), {select: windows_as_lm(cut[select])}, ops, source,
                        generate=report)


def _perplexity_scores(prefix: str, model, cut: torch.Tensor, cfg: RunConfig, device, precision) -> dict[str, float]:
    """The reported perplexity with its setting: <prefix>/ppl, /loss, /seq_len and /windows."""
    scores = perplexity(model, cut, device, cfg.trainer.eval_batch_size, precision)
    return {f"{prefix}/{k}": v for k, v in scores.items()} | {f"{prefix}/seq_len": float(cfg.task.seq_len),
                                                              f"{prefix}/windows": float(len(cut))}


def _with_perplexity(cfg: RunConfig, task: PreparedTask) -> PreparedTask:
    """task.perplexity: a decoder run of any task also scores a corpus's perplexity at the end."""
    t = cfg.task
    if not t.perplexity:
        return task
    corpus = DataSource(name=t.perplexity, test_file=t.perplexity_file, synthetic_standin=t.synthetic_standin)
    texts, where = load_texts(corpus, cfg.seed, ("test",))
    cut = windows(task.loaded.tokenizer, texts["test"], t.seq_len, t.max_eval_samples)
    inner = task.generate

    def generate(model, device, precision, out_path) -> dict[str, float]:
        scores = inner(model, device, precision, out_path) if inner else {}
        return scores | _perplexity_scores(t.perplexity, model, cut, cfg, device, precision)

    task.generate = generate
    task.data_source += f"; perplexity: {where}"
    return task


def _with_zero_shot(cfg: RunConfig, task: PreparedTask, say) -> PreparedTask:
    """task.lm_eval: zero-shot accuracy through lm-eval-harness at the end, on the model in memory."""
    t = cfg.task
    tasks = t.zero_shot_tasks
    if not tasks:
        return task
    inner = task.generate

    def generate(model, device, precision, out_path) -> dict[str, float]:
        scores = inner(model, device, precision, out_path) if inner else {}
        say(f"Zero-shot through lm-eval-harness: {', '.join(tasks)}")
        autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision.name)
        return scores | zero_shot(model, task.loaded.tokenizer, tasks, device, cfg.trainer.eval_batch_size,
                                  t.lm_eval_include, t.lm_eval_limit, autocast)

    task.generate = generate
    return task
