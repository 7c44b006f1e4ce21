"""Evaluation: metrics, sharded generation, the evaluation driver, predictions scoring and reports."""
from distributed_ft.eval.config import EvalConfig
from distributed_ft.errors import EvalError
from distributed_ft.eval.metrics import METRICS, compute_metrics, default_metrics
from distributed_ft.eval.predictions import score_prediction_pairs, score_predictions_file
from distributed_ft.eval.report import write_report
from distributed_ft.eval.runner import EvalResult, evaluate

__all__ = [
    "EvalConfig", "EvalError", "EvalResult", "METRICS", "compute_metrics", "default_metrics", "evaluate",
    "score_prediction_pairs", "score_predictions_file", "write_report",
]
