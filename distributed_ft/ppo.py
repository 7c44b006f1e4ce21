"""`dft ppo`: PPO fine-tuning of a causal LM against a grader service.

`PPORun` holds the stages (config -> accelerator -> model, reference, critic -> prompts -> prepare ->
grader -> baseline reward -> train -> save -> final reward) so a script under `accelerate launch` can
drive them one by one; `run_ppo` is the linear path the CLI takes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from distributed_ft.engine.rundir import check_run_dir, create_run_dir, record_rank
from distributed_ft.errors import ConfigError

EXIT_STOPPED = 3  # stopped by a signal after saving a checkpoint; rerun with training.resume_from=latest
REPORT_FILE = "ppo_reward.json"
BEFORE_FILE = "ppo_reward_before.json"


class PPORun:
    def __init__(self, config_path: str, overrides: list[str] | None = None):
        from accelerate.utils import set_seed

        from distributed_ft.engine.distributed import build_accelerator
        from distributed_ft.engine.logging import setup_console_logging
        from distributed_ft.rl.config import check_topology, load_ppo_config
        from distributed_ft.strategies import get_strategy

        self.config_path = str(config_path)
        self.config = load_ppo_config(config_path, overrides)
        self.accelerator = build_accelerator(self.config.training)
        setup_console_logging(self.accelerator.is_main_process)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per grading request otherwise
        self.minibatch_size, self.num_minibatches = check_topology(self.config, self.accelerator.num_processes)
        self.run_dir = check_run_dir(self.config)
        self.strategy = get_strategy(self.config.strategy.name)
        set_seed(self.config.training.seed)
        self.trainer = self.grader_process = self.client = self.run_logger = None
        self.reference = self.result = None

    def build(self) -> "PPORun":
        from distributed_ft.engine.logging import logger
        from distributed_ft.models import load_model_and_tokenizer
        from distributed_ft.rl.model import PolicyWithValue, backbone_of, is_peft
        from distributed_ft.rl.prompts import build_prompts
        from distributed_ft.strategies import count_parameters

        config = self.config
        model, self.tokenizer, self.model_path = load_model_and_tokenizer(config.model)
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"model {self.model_path}: the tokenizer has no EOS token; responses could not stop")
        self.prompts = build_prompts(config.data, config.training.seed)
        hidden = model.config.hidden_size
        policy = self.strategy.apply(model, config.strategy, "causal_lm")
        if not is_peft(policy):
            # Full and selective training change the base weights: the reference is a frozen copy.
            self.reference, _, _ = load_model_and_tokenizer(config.model)
            self.reference.requires_grad_(False).eval()
        critic = None
        if config.ppo.critic.mode == "separate":
            critic_model, _, _ = load_model_and_tokenizer(config.model)
            critic = backbone_of(critic_model)
        self.model = PolicyWithValue(policy, hidden, critic)
        trainable, total = count_parameters(self.model)
        logger.info(f"ppo: model {self.model_path}: {total:,} parameters ({trainable:,} trainable) with strategy "
                    f"'{self.strategy.name}', critic {config.ppo.critic.mode}, reference "
                    f"{'adapter disabled' if self.reference is None else 'frozen copy'}; "
                    f"{len(self.prompts.train)} train / {len(self.prompts.held_out)} held-out prompts")
        create_run_dir(self.accelerator, self.config, self.config_path, "PPO")
        return self

    def prepare(self) -> "PPORun":
        """Wrap the model, start (or reach) the grader and build the PPO trainer."""
        from distributed_ft.rl.grading import AsyncGrader, start_grader

        self.prepare_model()
        self.client, self.grader_process = start_grader(self.config.grader, self.accelerator, self.run_dir)
        self.make_trainer(AsyncGrader(self.client))
        return self

    def prepare_model(self) -> "PPORun":
        """One engine (policy + value head) with one optimizer; the frozen reference wrapped for inference."""
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
        from distributed_ft.config import config_to_dict
        from distributed_ft.engine.logging import RunLogger
        from distributed_ft.rl.trainer import PPOTrainer

        acc, config = self.accelerator, self.config
        self.run_logger = RunLogger(self.run_dir, config.logging, config_to_dict(config), acc.is_main_process,
                                    config.training.max_steps)
        self.trainer = PPOTrainer(config=config, accelerator=acc, model=self.model, optimizer=self.optimizer,
                                  scheduler=self.scheduler, reference=self.reference, tokenizer=self.tokenizer,
                                  prompts=self.prompts, grader=grader, run_dir=self.run_dir,
                                  run_logger=self.run_logger)
        return self.trainer

    def _record_rank(self) -> None:
        modules = [self.model] + ([self.reference] if self.reference is not None else [])
        record_rank(self.accelerator, self.run_dir, modules,
                    reference="frozen copy" if self.reference is not None else "adapter disabled")

    # -- stages ------------------------------------------------------------------------------------------------
    def _held_out(self) -> list[dict]:
        return self.prompts.held_out[:self.config.ppo.eval_prompts]

    def reward_before(self) -> dict | None:
        """Mean grader reward on held-out prompts before training (kept on disk across resumes)."""
        path = self.run_dir / "eval" / BEFORE_FILE
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
            self.run_logger.close()
        return self.result

    def reward_after(self, before: dict | None) -> dict | None:
        from distributed_ft.engine.logging import logger

        if not self._held_out():
            logger.warning("ppo: no held-out prompts (set data.validation_fraction); reward report skipped")
            return None
        after = self.trainer.evaluate_reward(self._held_out(), self.config.eval.batch_size)
        report = {"before": before, "after": after, "steps": self.trainer_steps()}
        if self.accelerator.is_main_process:
            path = self.run_dir / "eval" / REPORT_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1))
            fmt = lambda r: "n/a" if r is None or r["mean_reward"] is None else f"{r['mean_reward']:.4f}"  # noqa: E731
            logger.info(f"ppo: held-out mean reward {fmt(before)} -> {fmt(after)} ({path})")
        self.accelerator.wait_for_everyone()
        return report

    # -- the supervised evaluation (metrics against references), when eval.enabled ---------------------------
    def _standard_evaluator(self):
        from types import SimpleNamespace

        from distributed_ft.run_eval import RunEvaluator

        if getattr(self, "_eval", None) is None:
            records = []
            for p in self.prompts.held_out:
                reference = p["item"].get("reference", p["item"].get("completion"))
                if isinstance(reference, str):
                    records.append({"task": p["item"].get("task", "ppo"), "prompt": p["prompt"],
                                    "reference": reference})
            self.data = SimpleNamespace(eval_records=records, tasks=sorted({r["task"] for r in records}))
            self._eval = RunEvaluator(self)
        return self._eval

    def evaluate_baseline(self):
        if self.config.eval.enabled:
            return self._standard_evaluator().baseline()
        return None

    def evaluate_final(self):
        if self.config.eval.enabled:
            return self._standard_evaluator().final()
        return None

    def trainer_steps(self) -> int:
        return getattr(getattr(self, "result", None), "step", 0)

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
        self.accelerator.end_training()


def run_ppo(config_path: str, overrides: list[str]) -> int:
    run = PPORun(config_path, overrides).build()
    try:
        run.prepare()
        before = run.reward_before()
        run.evaluate_baseline()
        result = run.train()
        if result.stopped_by:
            return EXIT_STOPPED
        run.save()
        run.reward_after(before)
        run.evaluate_final()
        return 0
    finally:
        run.close()


def _cmd_ppo(args) -> int:
    return run_ppo(args.config, args.overrides)


def add_subparser(subparsers):
    """`dft ppo CONFIG [key.sub=value ...]`."""
    ppo = subparsers.add_parser("ppo", help="PPO fine-tuning against a grader service")
    ppo.add_argument("config")
    ppo.add_argument("overrides", nargs="*", help="key.sub=value")
    ppo.set_defaults(func=_cmd_ppo)
    return ppo
