"""Evaluation inside a run: the baseline before training, periodic checks, and the final report."""
from __future__ import annotations

import json
from pathlib import Path

from distributed_ft.config import EVAL_TASK_TYPES, config_hash, config_to_dict
from distributed_ft.engine.logging import logger

BASELINE_FILE = "baseline.json"


class RunEvaluator:
    def __init__(self, run):
        self.run = run
        self.config = run.config
        self.eval_dir = Path(run.run_dir) / "eval"
        self.records = self._records()
        task_type = EVAL_TASK_TYPES[self.config.model.task]
        self.task_types = {r["task"]: task_type for r in self.records}
        self.baseline_result = None

    def _records(self) -> list[dict]:
        records = list(self.run.data.eval_records or [])
        if not records:
            logger.warning("eval: no validation data (set data.validation or data.validation_fraction); skipped")
        strategy = self.config.strategy
        if self.run.strategy.name == "prompt" and records and "prompt" in records[0]:
            from distributed_ft.strategies import build_prompt

            shots = {task: self._training_pairs(task, strategy.few_shot) for task in {r["task"] for r in records}}
            records = [{**r, "prompt": build_prompt(strategy, r["prompt"], shots[r["task"]])} for r in records]
        return records

    def _training_pairs(self, task: str, n: int) -> list[tuple[str, str]]:
        """Solved examples for few-shot prompts, read back from the task's training examples."""
        data, tokenizer = self.run.data, self.run.tokenizer
        if n == 0 or task not in data.tasks:
            return []
        t = data.tasks.index(task)
        pairs = []
        for example in data.train[data.task_offsets[t]:data.task_offsets[t] + data.task_sizes[t]][:n]:
            ids, labels = example["input_ids"], example["labels"]
            prompt = [i for i, label in zip(ids, labels) if label == -100]
            answer = [i for i, label in zip(ids, labels) if label != -100]
            pairs.append((tokenizer.decode(prompt, skip_special_tokens=True).strip(),
                          tokenizer.decode(answer, skip_special_tokens=True).strip()))
        return pairs

    def _evaluate(self):
        from distributed_ft.eval.runner import evaluate

        return evaluate(self.run.model, self.run.tokenizer, self.records, self.run.accelerator,
                        self.config.eval, self.task_types)

    def baseline(self):
        """Evaluate the untrained model once; a resumed run reads it back instead of redoing it."""
        from distributed_ft.eval.runner import EvalResult

        if not self.records:
            return None
        saved = self.eval_dir / BASELINE_FILE
        if self.run.strategy.trains and saved.exists():
            self.baseline_result = EvalResult.from_dict(json.loads(saved.read_text()))
            return self.baseline_result
        if not self.run.strategy.trains:
            return None  # nothing changes: the final evaluation is the baseline
        self.baseline_result = self._evaluate()
        if self.run.accelerator.is_main_process:
            self.eval_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(self.baseline_result.to_dict(), default=str))
            logger.info("eval before training: " + _summary(self.baseline_result))
        return self.baseline_result

    def during_training(self, step: int) -> None:
        if not self.records:
            return
        result = self._evaluate()
        logger.info(f"eval at step {step}: " + _summary(result))
        if self.run.run_logger is not None:
            self.run.run_logger.log({"step": step, **_flat(result)})

    def final(self):
        from distributed_ft.eval.report import write_report

        if not self.records:
            return None
        if self.baseline_result is None and self.run.strategy.trains:
            self.baseline()
        result = self._evaluate()
        acc = self.run.accelerator
        if acc.is_main_process:
            meta = {"model": self.run.model_path, "strategy": self.run.strategy.name,
                    "config_hash": config_hash(self.config), "config": config_to_dict(self.config),
                    "steps": self.run.result.step if self.run.result else 0,
                    "world_size": acc.num_processes}
            paths = write_report(self.run.run_dir, result, self.baseline_result, meta, _loss_history(self.run.run_dir))
            logger.info("eval after training: " + _summary(result))
            logger.info(f"report: {paths['markdown']}")
            if self.run.run_logger is not None and self.run.run_logger.wandb_run is not None:
                self.run.run_logger.wandb_run.log(_flat(result))
        acc.wait_for_everyone()
        return result


def _flat(result) -> dict:
    row = {}
    for task, task_result in result.tasks.items():
        for metric, value in task_result.scores.items():
            row[f"eval/{task}/{metric}"] = value
    return row


def _summary(result) -> str:
    parts = []
    for task, task_result in result.tasks.items():
        metric = task_result.metrics[0] if task_result.metrics else None
        if metric in task_result.scores:
            parts.append(f"{task} {metric} {task_result.scores[metric]:.3f}")
    return ", ".join(parts)


def _loss_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def resolve_trained_path(name: str) -> Path | None:
    """A run directory means its final model; a folder with an adapter or model is used as is."""
    path = Path(name).expanduser()
    if (path / "final").is_dir():
        path = path / "final"
    markers = ("adapter_config.json", "bottleneck_config.json", "config.json")
    return path if path.is_dir() and any((path / m).exists() for m in markers) else None


def evaluate_config(config_path: str, overrides: list[str]) -> int:
    """`dft eval CONFIG`: evaluate the config's model (base, run directory, saved model or adapter)
    on the config's validation data, sharded over the launch, and write the report to output.dir/eval."""
    from types import SimpleNamespace

    from accelerate.utils import set_seed

    from distributed_ft.config import load_config
    from distributed_ft.data import build_data
    from distributed_ft.engine.distributed import build_accelerator, configure_device_env
    from distributed_ft.engine.logging import setup_console_logging
    from distributed_ft.models import ensure_pad_token, load_model_and_tokenizer, load_tokenizer
    from distributed_ft.strategies import get_strategy, load_trained

    configure_device_env()
    config = load_config(config_path, overrides)
    accelerator = build_accelerator(config.training)
    setup_console_logging(accelerator.is_main_process)
    set_seed(config.training.seed)
    trained = resolve_trained_path(config.model.name_or_path) if config.model.name_or_path else None
    adapter = trained is not None and any((trained / f).exists()
                                          for f in ("adapter_config.json", "bottleneck_config.json"))
    if adapter:
        model = load_trained(str(trained), task=config.model.task)
        tokenizer = load_tokenizer(str(trained), config.model)
        ensure_pad_token(tokenizer)
        model_path = str(trained)
    else:  # a Hub id or a plain model folder (a run's final model included)
        if trained is not None:
            config.model.name_or_path = str(trained)
        model, tokenizer, model_path = load_model_and_tokenizer(config.model)
    data = build_data(config.data, tokenizer, task_type=config.model.task, seed=config.training.seed)
    strategy = get_strategy(config.strategy.name)
    run = SimpleNamespace(config=config, data=data, tokenizer=tokenizer, accelerator=accelerator,
                          model=accelerator.prepare(model.eval()), model_path=model_path,
                          strategy=SimpleNamespace(name=strategy.name, trains=False),
                          run_dir=Path(config.output.dir), result=None, run_logger=None)
    RunEvaluator(run).final()
    accelerator.end_training()
    return 0
