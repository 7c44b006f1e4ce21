"""Scoring saved predictions: a JSONL file of {prediction, reference[, task, input]} rows, or two lists."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from distributed_ft.errors import EvalError
from distributed_ft.eval.metrics import METRICS, MetricOptions, MetricOutput, compute_metrics, resolve_metrics
from distributed_ft.eval.runner import EvalResult, TaskGroup, score_groups

DEFAULT_TASK = "predictions"


def _check_scorable(metrics: Sequence[str] | None, task_type: str) -> list[str]:
    names = [m.name for m in resolve_metrics(metrics, task_type)]
    for name in names:
        if METRICS[name].compute is None:
            raise EvalError(f"metric '{name}' needs the model and cannot score saved predictions")
    return names


def _number(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise EvalError(f"{where}: expected a number, got {value!r}") from None


def score_prediction_pairs(predictions: Sequence[Any], references: Sequence[Any], metrics: Sequence[str] | None = None,
                           task_type: str = "generation", *, rouge_stemmer: bool = True,
                           normalize_exact_match: bool = True) -> MetricOutput:
    """Score predictions against references (same length) with the named metrics (default: the task type's)."""
    if len(predictions) != len(references):
        raise EvalError(f"{len(predictions)} predictions but {len(references)} references: the counts must match")
    names = _check_scorable(metrics, task_type)
    if task_type == "regression":
        predictions = [_number(p, f"prediction {i}") for i, p in enumerate(predictions, 1)]
        references = [_number(r, f"reference {i}") for i, r in enumerate(references, 1)]
    return compute_metrics(names, predictions, references, task_type, MetricOptions(rouge_stemmer, normalize_exact_match))


def read_predictions_file(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a predictions JSONL file (one-line errors naming the file, line and field)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"predictions file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            for key in ("prediction", "reference"):
                if key not in row:
                    raise EvalError(f"{path}:{number}: missing field '{key}'")
            row["_line"] = number
            rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no predictions in the file")
    return rows


def score_predictions_file(path: str | Path, metrics: Sequence[str] | None = None, task_type: str = "generation",
                           *, rouge_stemmer: bool = True, normalize_exact_match: bool = True) -> EvalResult:
    """Score a predictions JSONL per task (rows without a task go to 'predictions') and overall."""
    names = _check_scorable(metrics, task_type)
    rows = read_predictions_file(path)
    tasks: dict[str, list[dict]] = {}
    for row in rows:
        tasks.setdefault(str(row.get("task", DEFAULT_TASK)), []).append(row)
    groups = []
    for task, task_rows in tasks.items():
        preds = [r["prediction"] for r in task_rows]
        refs = [r["reference"] for r in task_rows]
        if task_type == "regression":
            preds = [_number(r["prediction"], f"{path}:{r['_line']}: field 'prediction'") for r in task_rows]
            refs = [_number(r["reference"], f"{path}:{r['_line']}: field 'reference'") for r in task_rows]
        elif task_type == "generation":
            for r in task_rows:
                for key in ("prediction", "reference"):
                    if not isinstance(r[key], str):
                        raise EvalError(f"{path}:{r['_line']}: field '{key}' must be a string for generation")
        groups.append(TaskGroup(task, task_type, names, [r.get("input") for r in task_rows], preds, refs))
    return score_groups(groups, MetricOptions(rouge_stemmer, normalize_exact_match))


def format_table(result: EvalResult) -> str:
    """The scores as an aligned text table: task, metric, value, sample count (plus the weighted mean)."""
    rows = [("task", "metric", "value", "n")]
    for task in result.tasks.values():
        rows += [(task.task, k, f"{v:.4f}", str(task.n)) for k, v in task.scores.items()]
    if len(result.tasks) > 1:
        n = sum(t.n for t in result.tasks.values())
        rows += [("mean (weighted)", k, f"{v:.4f}", str(n)) for k, v in result.mean.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_scores(result: EvalResult, out: str | Path, predictions_file: str | Path, task_type: str) -> None:
    """The scores of a predictions file as JSON (`dft eval --predictions ... --out`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"predictions_file": str(predictions_file), "task_type": task_type,
               "tasks": {t.task: {"n": t.n, "scores": t.scores} for t in result.tasks.values()},
               "mean": result.mean, "signatures": result.signatures}
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
