"""The stages every RL recipe (`dft ppo`, `dft grpo`) shares, on the one RL loop (rl/trainer.py).

`run` is the linear path the CLI takes: load config -> build (prompts, then the trained module and the
reference the algorithm needs) -> prepare (wrap, start the grader) -> baseline reward and eval -> train ->
save -> final reward and eval -> close. A recipe subclasses `RLRun` with its config kind and what it trains
(`build_trained`) and optimises (`make_objective`); a script under `accelerate launch` can call the stages.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from distributed_ft.engine.rundir import check_run_dir, create_run_dir, record_rank
from distributed_ft.engine.signals import EXIT_STOPPED
from distributed_ft.errors import ConfigError



class RLRun:
    kind = ""  # the config kind and section of the algorithm: "ppo" or "grpo"

    def __init__(self, config_path: str, overrides: list[str] | None = None):
        from accelerate.utils import set_seed

        from distributed_ft.config import load_config
        from distributed_ft.engine.distributed import build_accelerator
        from distributed_ft.engine.logging import setup_console_logging
        from distributed_ft.rl.config import check_topology
        from distributed_ft.strategies import get_strategy

        self.config_path = str(config_path)
        self.config = load_config(config_path, overrides, kind=self.kind)
        self.section = getattr(self.config, self.kind)
        self.accelerator = build_accelerator(self.config.training, self.config.logging, self.config.output.dir,
                                             model_dtype=self.config.model.dtype)
        setup_console_logging(self.accelerator.is_main_process)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per grading request otherwise
        self.minibatch_size, self.num_minibatches = check_topology(self.config, self.accelerator.num_processes,
                                                                   self.kind)
        self.run_dir = check_run_dir(self.config)
        self.strategy = get_strategy(self.config.strategy.name)
        set_seed(self.config.training.seed)
        self.trainer = self.grader_process = self.client = self.run_logger = None
        self.reference = self.result = self.evaluation = None

    @property
    def report_file(self) -> str:
        return f"{self.kind}_reward.json"

    @property
    def before_file(self) -> str:
        return f"{self.kind}_reward_before.json"

    def build_trained(self, load, policy) -> tuple:
        """(the trained module around `policy`, its description for the log); may set self.reference.
        `load()` loads another copy of the base model."""
        raise NotImplementedError

    def make_objective(self, section, reduce, eos_id):
        raise NotImplementedError

    def build(self) -> "RLRun":
        from distributed_ft.engine.logging import logger
        from distributed_ft.models import load_model, load_tokenizer_for
        from distributed_ft.rl.prompts import build_prompts
        from distributed_ft.strategies import count_parameters

        config = self.config
        self.tokenizer, self.model_path, added_pad = load_tokenizer_for(config.model)
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"model {self.model_path}: the tokenizer has no EOS token; responses could not stop")
        self.prompts = build_prompts(config.data, config.training.seed)

        def load():
            return load_model(config.model, self.tokenizer, self.model_path, added_pad=added_pad)

        self.model, described = self.build_trained(load, self.strategy.apply(load(), config.strategy,
                                                                              config.model.task))
        trainable, total = count_parameters(self.model)
        logger.info(f"{self.kind}: model {self.model_path}: {total:,} parameters ({trainable:,} trainable) with "
                    f"strategy '{self.strategy.name}', {described}; "
                    f"{len(self.prompts.train)} train / {len(self.prompts.held_out)} held-out prompts")
        create_run_dir(self.accelerator, self.config, self.config_path, self.kind.upper())
        return self

    def frozen_reference(self, load, policy) -> str:
        """Full and selective training change the base weights: the reference is a frozen copy. PEFT
        strategies need none (the adapter disabled is the reference)."""
        from distributed_ft.rl.model import is_peft

        if is_peft(policy):
            return "reference: adapter disabled"
        self.reference = load().requires_grad_(False).eval()
        return "reference: frozen copy"

    def prepare(self) -> "RLRun":
        """Wrap the model, start (or reach) the grader and build the trainer."""
        from distributed_ft.rl.grading import AsyncGrader, start_grader

        self.prepare_model()
        self.client, self.grader_process = start_grader(self.config.grader, self.accelerator, self.run_dir)
        self.make_trainer(AsyncGrader(self.client))
        return self

    def prepare_model(self) -> "RLRun":
        """One engine (the trained module) with one optimizer; the frozen reference wrapped for inference."""
        from distributed_ft.engine.distributed import uses_deepspeed
        from distributed_ft.engine.optim import build_optimizer, build_scheduler

        acc, config = self.accelerator, self.config
        optimizer = build_optimizer(self.model, config.training)
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.training)
        acc.register_for_checkpointing(self.scheduler)
        if self.reference is not None:
            if uses_deepspeed(acc):
                from trl.models.utils import prepare_deepspeed

                self.reference = prepare_deepspeed(self.reference, acc)  # ZeRO-3: sharded like the policy
            else:
                self.reference = self.reference.to(acc.device)
        self._record_rank()
        return self

    def make_trainer(self, grader):
        from distributed_ft.engine.logging import RunLogger
        from distributed_ft.rl.trainer import RLTrainer
        from distributed_ft.strict import config_to_dict

        acc, config = self.accelerator, self.config
        self.run_logger = RunLogger(self.run_dir, config.logging, config_to_dict(config), acc,
                                    config.training.max_steps)
        self.trainer = RLTrainer(config=config, section=self.kind, make_objective=self.make_objective,
                                 accelerator=acc, model=self.model, optimizer=self.optimizer,
                                 scheduler=self.scheduler, reference=self.reference, tokenizer=self.tokenizer,
                                 prompts=self.prompts, grader=grader, run_dir=self.run_dir,
                                 run_logger=self.run_logger)
        return self.trainer

    def _record_rank(self) -> None:
        modules = [self.model] + ([self.reference] if self.reference is not None else [])
        record_rank(self.accelerator, self.run_dir, modules,
                    reference="frozen copy" if self.reference is not None else "adapter disabled or none")

    # -- stages ------------------------------------------------------------------------------------------------
    def _held_out(self) -> list[dict]:
        return self.prompts.held_out[:self.section.eval_prompts]

    def reward_before(self) -> dict | None:
        """Mean grader reward on held-out prompts before training (kept on disk across resumes)."""
        path = self.run_dir / "eval" / self.before_file
        if not self._held_out():
            return None
        if path.is_file():
            return json.loads(path.read_text())
        result = self.trainer.evaluate_reward(self._held_out(), self.config.eval.batch_size)
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
        self.accelerator.wait_for_everyone()
        return result

    def train(self):
        try:
            self.result = self.trainer.train()
        finally:
            self.run_logger.end_progress()
        return self.result

    def reward_after(self, before: dict | None) -> dict | None:
        from distributed_ft.engine.logging import logger

        if not self._held_out():
            logger.warning(f"{self.kind}: no held-out prompts (set data.validation_fraction); reward report skipped")
            return None
        after = self.trainer.evaluate_reward(self._held_out(), self.config.eval.batch_size)
        report = {"before": before, "after": after, "steps": self.trainer_steps()}
        if self.accelerator.is_main_process:
            path = self.run_dir / "eval" / self.report_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1))
            fmt = lambda r: "n/a" if r is None or r["mean_reward"] is None else f"{r['mean_reward']:.4f}"  # noqa: E731
            logger.info(f"{self.kind}: held-out mean reward {fmt(before)} -> {fmt(after)} ({path})")
        self.accelerator.wait_for_everyone()
        return report

    # -- the supervised evaluation (metrics against references), when eval.enabled ---------------------------
    def _evaluation(self):
        """Held-out prompts whose item carries a text reference, scored like an SFT run's generations."""
        from distributed_ft.eval.session import EvalInputs, RunEvaluation, run_metadata

        records = []
        for p in self.prompts.held_out:
            reference = p["item"].get("reference", p["item"].get("completion"))
            if isinstance(reference, str):
                records.append({"task": p["item"].get("task", self.kind), "prompt": p["prompt"], "reference": reference})
        log = self.run_logger
        return RunEvaluation(EvalInputs(
            model=self.model, tokenizer=self.tokenizer, accelerator=self.accelerator,
            records=records, task_types={r["task"]: "generation" for r in records}, config=self.config.eval,
            out_dir=self.run_dir,
            metadata=run_metadata(self.model_path, self.strategy.name, self.config),
            log=log.log if log else None, log_final=log.log_to_tracker if log else None))

    def evaluate_baseline(self):
        if self.config.eval.enabled and self.evaluation is None:
            self.evaluation = self._evaluation()
        return self.evaluation.baseline() if self.evaluation else None

    def evaluate_final(self):
        if self.config.eval.enabled and self.evaluation is None:
            self.evaluation = self._evaluation()
        return self.evaluation.final(self.trainer_steps()) if self.evaluation else None

    def trainer_steps(self) -> int:
        return self.result.step if self.result else 0

    def save(self) -> Path:
        from distributed_ft.engine.logging import logger
        from distributed_ft.rl.save import save_policy

        final = save_policy(self.model, self.accelerator, self.strategy, self.tokenizer, self.run_dir / "final")
        logger.info(f"saved {final}")
        return final

    def close(self) -> None:
        if self.trainer is not None and self.trainer.grader is not None:
            self.trainer.grader.close()
        if self.grader_process is not None:
            self.grader_process.stop()
        if self.run_logger is not None:
            self.run_logger.end_progress()
        self.accelerator.end_training()


def run(job: RLRun) -> int:
    job.build()
    try:
        job.prepare()
        before = job.reward_before()
        job.evaluate_baseline()
        if job.train().stopped_by:
            return EXIT_STOPPED
        job.save()
        job.reward_after(before)
        job.evaluate_final()
        return 0
    finally:
        job.close()
