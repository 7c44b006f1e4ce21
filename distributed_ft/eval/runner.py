"""The evaluation driver: run the model on eval records, score them per task, and collect the result.

Records are {"task", "prompt", "reference"} for generation, {"task", "text", "label"} for
classification and {"task", "text", "value"} for regression. Inference is sharded across processes;
metrics are computed once on the main process and the result is broadcast to every process.
"""
from __future__ import annotations

import difflib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from distributed_ft.engine.config import DEFAULT_LOSS_CHUNK_TOKENS
from distributed_ft.eval.config import EvalConfig
from distributed_ft.errors import EvalError
from distributed_ft.eval.metrics import METRICS, MetricOptions, check_task_type, compute_metrics
from distributed_ft.tasks import task_of_kind


def _input_field(task_type: str) -> str:
    return task_of_kind(task_type).input_field


def _target_field(task_type: str) -> str:
    return task_of_kind(task_type).target_field


@dataclass
class TaskResult:
    task: str
    task_type: str
    n: int
    metrics: list[str]
    scores: dict[str, float]


@dataclass
class EvalResult:
    tasks: dict[str, TaskResult]
    # each score averaged over the tasks that have it, weighted by sample count
    mean: dict[str, float]
    # one row per sample: task, input, reference, prediction, scores
    predictions: list[dict[str, Any]]
    signatures: dict[str, str] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        tasks = {name: TaskResult(**t) for name, t in data["tasks"].items()}
        return cls(tasks, data["mean"], data["predictions"], data.get("signatures", {}), data.get("timing", {}))


@dataclass
class TaskGroup:
    """One task's samples ready for scoring: inputs, predictions and references in the same order."""

    task: str
    task_type: str
    metrics: list[str]
    inputs: list[Any]
    predictions: list[Any]
    references: list[Any]
    extra_scores: dict[str, float] = field(default_factory=dict)


def score_groups(groups: Sequence[TaskGroup], options: MetricOptions) -> EvalResult:
    """Compute every task's metrics and per-sample scores, plus the sample-weighted mean."""
    tasks, rows, signatures = {}, [], {}
    for g in groups:
        out = compute_metrics(g.metrics, g.predictions, g.references, g.task_type, options)
        scores = {**out.scores, **g.extra_scores}
        tasks[g.task] = TaskResult(g.task, g.task_type, len(g.predictions), list(g.metrics), scores)
        signatures.update(out.signatures)
        for inp, ref, pred, per in zip(g.inputs, g.references, g.predictions, out.per_sample or []):
            rows.append({"task": g.task, "input": inp, "reference": ref, "prediction": pred, "scores": per})
    return EvalResult(tasks, weighted_mean(tasks.values()), rows, signatures)


def weighted_mean(tasks: Sequence[TaskResult] | Any) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for t in tasks:
        for key, value in t.scores.items():
            if value is None or math.isnan(value):
                continue
            sums[key] = sums.get(key, 0.0) + value * t.n
            counts[key] = counts.get(key, 0) + t.n
    return {k: sums[k] / counts[k] for k in sums if counts[k]}


def _group_records(records: list[dict], task_types: dict[str, str],
                   max_samples: int | None) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for number, rec in enumerate(records, 1):
        task = rec.get("task")
        if task not in task_types:
            close = difflib.get_close_matches(str(task), list(task_types), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise EvalError(f"eval record {number}: unknown task {task!r}{hint}; tasks: {', '.join(task_types)}")
        task_type = task_types[task]
        for key in (_input_field(task_type), _target_field(task_type)):
            if key not in rec:
                raise EvalError(f"eval record {number} (task '{task}', {task_type}): missing field '{key}'")
        rows = groups.setdefault(task, [])
        if max_samples is None or len(rows) < max_samples:
            rows.append(rec)
    return groups


def _text_only(rows: list[dict], task_type: str) -> bool:
    return task_type == "generation" and all(not str(r.get("prompt", "")).strip() for r in rows)


def _needs_predictions(metric_names: list[str]) -> bool:
    return any(METRICS[name].compute is not None for name in metric_names)


def _label_names(model: Any, accelerator: Any) -> dict[int, str]:
    config = accelerator.unwrap_model(model).config
    return {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}


def evaluate(model: Any, tokenizer: Any, records: list[dict], accelerator: Any, cfg: EvalConfig,
             task_types: dict[str, str], loss_chunk_tokens: int | None = DEFAULT_LOSS_CHUNK_TOKENS) -> EvalResult:
    """Evaluate `model` on `records`; every process must call this and gets the same EvalResult.

    `loss_chunk_tokens`: the reference loss's logits this many tokens at a time (None: the whole batch's)."""
    from distributed_ft.eval.generate import (eval_loss, generate_predictions, predict_labels,
                                              reference_loss_batches)

    for task_type in task_types.values():
        check_task_type(task_type)
    grouped = _group_records(records, task_types, cfg.max_samples)
    metric_names = {task: cfg.metrics_for(task, task_types[task], text_only=_text_only(rows, task_types[task]))
                    for task, rows in grouped.items()}

    start = time.perf_counter()
    by_type: dict[str, list[tuple[str, int]]] = {}  # task type -> (task, position) of each input
    for task, rows in grouped.items():
        if _needs_predictions(metric_names[task]):  # perplexity alone needs no generated text
            by_type.setdefault(task_types[task], []).extend((task, i) for i in range(len(rows)))
    predictions: dict[str, list[Any]] = {task: [None] * len(rows) for task, rows in grouped.items()}
    for task_type, keys in by_type.items():
        inputs = [grouped[t][i][_input_field(task_type)] for t, i in keys]
        if task_type == "generation":  # one sharded pass over all tasks: fuller batches
            outputs = generate_predictions(model, tokenizer, inputs, accelerator, cfg)
        else:
            outputs = predict_labels(model, tokenizer, inputs, accelerator, cfg, task_type=task_type)
        if task_type == "classification":
            names = _label_names(model, accelerator)
            refs = [grouped[t][i]["label"] for t, i in keys]
            outputs = [names.get(o, str(o)) if isinstance(r, str) else o for o, r in zip(outputs, refs)]
        for (task, i), out in zip(keys, outputs):
            predictions[task][i] = out
    generation_s = time.perf_counter() - start

    start = time.perf_counter()
    extra: dict[str, dict[str, float]] = {}
    for task, rows in grouped.items():
        if "perplexity" in metric_names[task]:
            batches = reference_loss_batches(tokenizer, [r["prompt"] for r in rows], [r["reference"] for r in rows],
                                             accelerator, cfg.batch_size)
            loss = eval_loss(model, batches, accelerator, loss_chunk_tokens)
            extra[task] = {"eval_loss": loss["eval_loss"], "perplexity": loss["perplexity"]}
    loss_s = time.perf_counter() - start

    result = None
    if accelerator.is_main_process:
        start = time.perf_counter()
        groups = [TaskGroup(task, task_types[task], metric_names[task],
                            [r[_input_field(task_types[task])] for r in rows], predictions[task],
                            [r[_target_field(task_types[task])] for r in rows], extra.get(task, {}))
                  for task, rows in grouped.items()]
        options = MetricOptions(cfg.rouge_stemmer, cfg.normalize_exact_match, tuple(cfg.abstain_phrases))
        result = score_groups(groups, options)
        result.timing = {"generation_s": generation_s, "loss_s": loss_s,
                         "metric_s": time.perf_counter() - start}
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result = broadcast_object_list([result], from_process=0)[0]
    return result
