"""`dft train`: supervised fine-tuning with any registered strategy.

`run` is the linear path the CLI takes: load config -> build (data, then model) -> baseline eval ->
train -> save -> final eval -> close. `SFTRun` holds the same stages for a user's own script under
`accelerate launch`.
"""
from __future__ import annotations

from pathlib import Path

from distributed_ft.engine.signals import EXIT_STOPPED


class SFTRun:
    def __init__(self, config_path: str, overrides: list[str] | None = None):
        from accelerate.utils import set_seed

        from distributed_ft.config import load_config
        from distributed_ft.engine.distributed import build_accelerator, configure_device_env
        from distributed_ft.engine.logging import setup_console_logging
        from distributed_ft.engine.rundir import check_run_dir
        from distributed_ft.strategies import get_strategy

        configure_device_env()
        self.config_path = str(config_path)
        self.config = load_config(config_path, overrides, kind="sft")
        self.accelerator = build_accelerator(self.config.training, self.config.logging, self.config.output.dir,
                                             model_dtype=self.config.model.dtype)
        setup_console_logging(self.accelerator.is_main_process)
        self.run_dir = check_run_dir(self.config)
        self.strategy = get_strategy(self.config.strategy.name)
        set_seed(self.config.training.seed)
        self.trainer = self.result = self.run_logger = self.evaluation = None

    def build(self) -> "SFTRun":
        """Read the data, then load the model sized from it and apply the strategy; nothing is written
        before this succeeds."""
        from distributed_ft.data import build_data
        from distributed_ft.data.documents import documents_summary
        from distributed_ft.engine.logging import logger
        from distributed_ft.engine.rundir import create_run_dir
        from distributed_ft.models import load_model, load_tokenizer_for
        from distributed_ft.strategies import count_parameters

        config = self.config
        self.tokenizer, self.model_path, added_pad = load_tokenizer_for(config.model)
        self.data = build_data(config.data, self.tokenizer, task_type=config.model.task, seed=config.training.seed,
                               progress=self.accelerator.is_main_process)
        model = load_model(config.model, self.tokenizer, self.model_path, added_pad=added_pad,
                           num_labels=self.data.num_labels, label_names=self.data.label_names)
        self.model = self.strategy.apply(model, config.strategy, config.model.task)
        trainable, total = count_parameters(self.model)
        logger.info(f"model {self.model_path}: {total:,} parameters, {trainable:,} trainable "
                    f"({100 * trainable / max(total, 1):.3f}%) with strategy '{self.strategy.name}'")
        for split, stats in (("train", self.data.stats), ("validation", self.data.validation_stats)):
            for task, counts in stats.items():
                logger.info(f"data {task} ({split}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for report in self.data.documents:
            logger.info(documents_summary(report))
            for file, reason in report.skipped:
                logger.warning(f"data {report.task}: skipped {file}: {reason}")
        create_run_dir(self.accelerator, self.config, self.config_path, "run")
        return self

    def prepare(self) -> "SFTRun":
        """Wrap the model for the launch: with its optimizer when it trains, alone otherwise."""
        from distributed_ft.engine.logging import RunLogger
        from distributed_ft.engine.trainer import Trainer
        from distributed_ft.strict import config_to_dict

        acc, config = self.accelerator, self.config
        if not self.strategy.trains:
            self.model = acc.prepare(self.model)
            self._record_rank(self.model)
        else:
            self.run_logger = RunLogger(self.run_dir, config.logging, config_to_dict(config), acc,
                                        config.training.max_steps)
            self.trainer = Trainer(config=config, accelerator=acc, model=self.model, tokenizer=self.tokenizer,
                                   data=self.data, run_dir=self.run_dir, run_logger=self.run_logger,
                                   on_prepared=self._record_rank, on_step=self._periodic_eval)
            self.trainer.prepare()
            self.model = self.trainer.model
        self.evaluation = self._evaluation() if config.eval.enabled else None
        return self

    def _evaluation(self):
        """The run's evaluation, over the prepared model, with the validation records the data layer built."""
        from distributed_ft.eval.session import EvalInputs, RunEvaluation, run_metadata
        from distributed_ft.strategies import build_few_shot_records
        from distributed_ft.tasks import kind_of

        records = list(self.data.eval_records or [])
        if self.strategy.few_shot:
            records = build_few_shot_records(self.config.strategy, records, self.data.solved_examples)
        kind = kind_of(self.config.model.task)
        log = self.run_logger
        return RunEvaluation(EvalInputs(
            model=self.model, tokenizer=self.tokenizer, accelerator=self.accelerator, records=records,
            task_types={r["task"]: kind for r in records}, config=self.config.eval, out_dir=self.run_dir,
            metadata=run_metadata(self.model_path, self.strategy.name, self.config),
            log=log.log if log else None, log_final=log.log_to_tracker if log else None,
            trains=self.strategy.trains, loss_chunk_tokens=self.config.training.loss_chunk_tokens))

    def evaluate_baseline(self):
        """The model before training, evaluated once per run (kept on disk across resumes)."""
        return self.evaluation.baseline() if self.evaluation else None

    def train(self):
        if self.trainer is None:
            self.prepare()
        try:
            self.result = self.trainer.train(self.data.sampler(self.config.training.seed))
        finally:
            self.run_logger.end_progress()
        return self.result

    def _periodic_eval(self, step: int) -> None:
        every = self.config.eval.every_n_steps
        if self.evaluation and every and step % every == 0 and step < self.config.training.max_steps:
            self.evaluation.during_training(step)

    def _record_rank(self, model) -> None:
        from distributed_ft.engine.rundir import record_rank

        record_rank(self.accelerator, self.run_dir, [model])

    def save(self) -> Path:
        from distributed_ft.engine.logging import logger
        from distributed_ft.engine.save import save_final_model

        final = save_final_model(self.model, self.accelerator, self.strategy, self.tokenizer, self.run_dir / "final")
        logger.info(f"saved {final}")
        return final

    def evaluate_final(self):
        return self.evaluation.final(self.result.step if self.result else 0) if self.evaluation else None

    def close(self) -> None:
        if self.run_logger is not None:
            self.run_logger.end_progress()
        self.accelerator.end_training()


def run(config_path: str, overrides: list[str]) -> int:
    job = SFTRun(config_path, overrides).build().prepare()
    try:
        job.evaluate_baseline()
        if job.strategy.trains:
            if job.train().stopped_by:
                return EXIT_STOPPED
            job.save()
        job.evaluate_final()
        return 0
    finally:
        job.close()
