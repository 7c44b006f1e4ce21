"""Evaluation inside a run: the baseline before training, periodic checks, and the final report.

A recipe builds one `EvalInputs` with everything evaluation reads; nothing is looked up elsewhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distributed_ft.engine.config import DEFAULT_LOSS_CHUNK_TOKENS
from distributed_ft.engine.logging import logger
from distributed_ft.eval.config import EvalConfig
from distributed_ft.eval.runner import EvalResult, evaluate

BASELINE_FILE = "baseline.json"


@dataclass
class EvalInputs:
    model: Any                            # prepared by the accelerator (DDP / DeepSpeed engine) or plain
    tokenizer: Any
    accelerator: Any
    records: list[dict]                   # evaluation records (see eval.runner); few-shot prompts already built
    task_types: dict[str, str]            # task name -> generation / classification / regression
    config: EvalConfig
    out_dir: Path                         # the run folder; results go to out_dir/eval
    metadata: dict = field(default_factory=dict)   # model, strategy, config, config_hash, world_size, ...
    # log(row): periodic results into the run's metrics; log_final(scores, step): the final scores (trackers)
    log: Callable[[dict], None] | None = None
    log_final: Callable[[dict, int], None] | None = None
    # the model trains: a baseline before training is worth measuring (and kept on disk across resumes)
    trains: bool = True
    # the reference loss's logits this many tokens at a time (None: the whole batch's); runs that train pass
    # training.loss_chunk_tokens
    loss_chunk_tokens: int | None = DEFAULT_LOSS_CHUNK_TOKENS


class RunEvaluation:
    def __init__(self, inputs: EvalInputs):
        self.inputs = inputs
        self.eval_dir = Path(inputs.out_dir) / "eval"
        self.baseline_result: EvalResult | None = None
        if not inputs.records:
            logger.warning("eval: no validation data (set data.validation or data.validation_fraction); skipped")

    def _evaluate(self) -> EvalResult:
        i = self.inputs
        return evaluate(i.model, i.tokenizer, i.records, i.accelerator, i.config, i.task_types, i.loss_chunk_tokens)

    def baseline(self) -> EvalResult | None:
        """Evaluate the untrained model once; a resumed run reads it back instead of redoing it. A model that
        does not train has no baseline apart from its final evaluation."""
        if not self.inputs.records or not self.inputs.trains:
            return None
        saved = self.eval_dir / BASELINE_FILE
        if saved.exists():
            self.baseline_result = EvalResult.from_dict(json.loads(saved.read_text()))
            return self.baseline_result
        self.baseline_result = self._evaluate()
        if self.inputs.accelerator.is_main_process:
            self.eval_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(self.baseline_result.to_dict(), default=str))
            logger.info("eval before training: " + summary(self.baseline_result))
        return self.baseline_result

    def during_training(self, step: int) -> None:
        if not self.inputs.records:
            return
        result = self._evaluate()
        logger.info(f"eval at step {step}: " + summary(result))
        if self.inputs.log is not None:
            self.inputs.log({"step": step, **flat_scores(result)})

    def final(self, steps: int = 0) -> EvalResult | None:
        """Evaluate the trained model and write the report (baseline, fine-tuned, change) on the main process."""
        from distributed_ft.eval.report import write_report

        i = self.inputs
        if not i.records:
            return None
        if self.baseline_result is None:
            self.baseline()
        result = self._evaluate()
        if i.accelerator.is_main_process:
            meta = {**i.metadata, "steps": steps, "world_size": i.accelerator.num_processes,
                    "retention": list(i.config.retention), "max_retention_drop": i.config.max_retention_drop}
            paths = write_report(i.out_dir, result, self.baseline_result, meta, loss_history(i.out_dir))
            logger.info("eval after training: " + summary(result))
            logger.info(f"report: {paths['markdown']}")
            if i.log_final is not None:
                i.log_final(flat_scores(result), steps)
        i.accelerator.wait_for_everyone()
        return result


def run_metadata(model_path: str, strategy: str, config) -> dict:
    """What a run's report says it evaluated: the model, the strategy and the resolved config."""
    from distributed_ft.strict import config_hash, config_to_dict

    return {"model": model_path, "strategy": strategy, "config": config_to_dict(config),
            "config_hash": config_hash(config)}


def flat_scores(result: EvalResult) -> dict:
    return {f"eval/{task}/{metric}": value
            for task, task_result in result.tasks.items() for metric, value in task_result.scores.items()}


def summary(result: EvalResult) -> str:
    parts = []
    for task, task_result in result.tasks.items():
        metric = task_result.metrics[0] if task_result.metrics else None
        if metric in task_result.scores:
            parts.append(f"{task} {metric} {task_result.scores[metric]:.3f}")
    return ", ".join(parts)


def loss_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]
