"""The `dft eval` subcommand: score a predictions file (or evaluate a run config's model)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from distributed_ft.eval.errors import EvalError
from distributed_ft.eval.metrics import TASK_TYPES
from distributed_ft.eval.runner import EvalResult


def add_subparser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="score a predictions file, or evaluate the model of a run config")
    parser.add_argument("config", nargs="?", help="run config to evaluate (omit with --predictions)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    parser.add_argument("--predictions", metavar="FILE.jsonl",
                        help="JSONL with 'prediction' and 'reference' (optional 'task', 'input') per line")
    parser.add_argument("--metrics", help="comma-separated metric names (default: the task type's)")
    parser.add_argument("--task-type", default="generation", choices=TASK_TYPES)
    parser.add_argument("--out", metavar="FILE.json", help="also write the scores as JSON")
    parser.add_argument("--no-stemmer", action="store_true", help="ROUGE without the Porter stemmer")
    parser.add_argument("--no-normalize", action="store_true", help="exact match on raw strings")
    parser.set_defaults(func=run)
    return parser


def format_table(result: EvalResult) -> str:
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


def run(args: argparse.Namespace) -> int:
    if args.predictions is None:
        if args.config is None:
            raise EvalError("dft eval needs a run config or --predictions FILE.jsonl")
        return run_eval_from_config(args.config, args.overrides)
    from distributed_ft.eval.predictions import score_predictions_file

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    result = score_predictions_file(args.predictions, metrics, args.task_type, rouge_stemmer=not args.no_stemmer,
                                    normalize_exact_match=not args.no_normalize)
    print(format_table(result))
    if result.signatures.get("bleu"):
        print(f"sacrebleu signature: {result.signatures['bleu']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"predictions_file": str(args.predictions), "task_type": args.task_type,
                   "tasks": {t.task: {"n": t.n, "scores": t.scores} for t in result.tasks.values()},
                   "mean": result.mean, "signatures": result.signatures}
        out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def run_eval_from_config(config_path: str, overrides: list[str]) -> int:
    """`dft eval CONFIG`: evaluate the config's model on its validation data (see distributed_ft.run_eval)."""
    from distributed_ft.run_eval import evaluate_config

    return evaluate_config(config_path, overrides)
