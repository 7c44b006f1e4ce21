"""`dft train`: parse config, build components, train, save, evaluate, clean up.

`TrainingRun` holds the stages so a user's own script under `accelerate launch` can drive them
one by one; `run_train` is the linear path the CLI takes.
"""
from __future__ import annotations

from pathlib import Path

from distributed_ft.engine.rundir import check_run_dir, create_run_dir, record_rank
from distributed_ft.errors import ConfigError

EXIT_STOPPED = 3  # stopped by a signal after saving a checkpoint; rerun with resume_from=latest


class TrainingRun:
    def __init__(self, config_path: str, overrides: list[str] | None = None):
        from accelerate.utils import set_seed

        from distributed_ft.config import load_config
        from distributed_ft.engine.distributed import build_accelerator, configure_device_env
        from distributed_ft.engine.logging import setup_console_logging
        from distributed_ft.strategies import get_strategy

        configure_device_env()
        self.config_path = str(config_path)
        self.config = load_config(config_path, overrides)
        self.accelerator = build_accelerator(self.config.training)
        setup_console_logging(self.accelerator.is_main_process)
        self.run_dir = check_run_dir(self.config)
        self.strategy = get_strategy(self.config.strategy.name)
        set_seed(self.config.training.seed)
        self.trainer = None
        self.result = None
        self.run_logger = None

    def build(self) -> "TrainingRun":
        """Load model, tokenizer and data and apply the strategy; nothing is written before this succeeds."""
        from distributed_ft.data import build_data
        from distributed_ft.engine.logging import logger
        from distributed_ft.models import load_model_and_tokenizer
        from distributed_ft.strategies import count_parameters

        config = self.config
        model, self.tokenizer, self.model_path = load_model_and_tokenizer(config.model)
        self.data = build_data(config.data, self.tokenizer, task_type=config.model.task, seed=config.training.seed)
        if config.model.task == "sequence_classification" and self.data.num_labels and \
                self.data.num_labels > model.config.num_labels:
            raise ConfigError(f"the data has {self.data.num_labels} labels but the model head has "
                              f"{model.config.num_labels}; set model.num_labels")
        self.model = self.strategy.apply(model, config.strategy, config.model.task)
        trainable, total = count_parameters(self.model)
        logger.info(f"model {self.model_path}: {total:,} parameters, {trainable:,} trainable "
                    f"({100 * trainable / max(total, 1):.3f}%) with strategy '{self.strategy.name}'")
        for task, counts in self.data.stats.items():
            logger.info(f"data {task}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        create_run_dir(self.accelerator, self.config, self.config_path, "run")
        return self

    def prepare(self) -> "TrainingRun":
        """Wrap the model for the launch: with its optimizer when it trains, alone otherwise."""
        from distributed_ft.config import config_to_dict
        from distributed_ft.engine.logging import RunLogger
        from distributed_ft.engine.trainer import Trainer

        acc, config = self.accelerator, self.config
        if not self.strategy.trains:
            self.model = acc.prepare(self.model)
            self._record_rank(self.model)
            return self
        self.run_logger = RunLogger(self.run_dir, config.logging, config_to_dict(config), acc.is_main_process,
                                    config.training.max_steps)
        self.trainer = Trainer(config=config, accelerator=acc, model=self.model, tokenizer=self.tokenizer,
                               data=self.data, run_dir=self.run_dir, run_logger=self.run_logger,
                               on_prepared=self._record_rank, on_step=self._periodic_eval)
        self.trainer.prepare()
        self.model = self.trainer.model
        return self

    def train(self):
        if self.trainer is None:
            self.prepare()
        try:
            self.result = self.trainer.train(self.data.sampler(self.config.training.seed))
        finally:
            self.run_logger.close()
        self.model = self.trainer.model
        return self.result

    # --- evaluation -------------------------------------------------------------------------
    def _evaluator(self):
        from distributed_ft.run_eval import RunEvaluator

        if getattr(self, "_eval", None) is None:
            self._eval = RunEvaluator(self)
        return self._eval

    def evaluate_baseline(self):
        """The model before training, evaluated once per run (kept on disk across resumes)."""
        if self.config.eval.enabled:
            return self._evaluator().baseline()
        return None

    def evaluate_final(self):
        if self.config.eval.enabled:
            return self._evaluator().final()
        return None

    def _periodic_eval(self, step: int, model) -> None:
        every = self.config.eval.every_n_steps
        if self.config.eval.enabled and every and step % every == 0 and step < self.config.training.max_steps:
            self._evaluator().during_training(step)

    def _record_rank(self, model) -> None:
        record_rank(self.accelerator, self.run_dir, [model])

    def save(self) -> Path:
        from distributed_ft.engine.logging import logger
        from distributed_ft.engine.save import save_final_model

        final = save_final_model(self.model, self.accelerator, self.strategy, self.tokenizer, self.run_dir / "final")
        logger.info(f"saved {final}")
        return final

    def close(self) -> None:
        self.accelerator.end_training()


def run_train(config_path: str, overrides: list[str]) -> int:
    run = TrainingRun(config_path, overrides).build().prepare()
    try:
        run.evaluate_baseline()
        if run.strategy.trains:
            result = run.train()
            if result.stopped_by:
                return EXIT_STOPPED
            run.save()
        run.evaluate_final()
        return 0
    finally:
        run.close()
