"""The stages `dft rm` and `dft dpo` share: pairs -> model + strategy -> held-out baseline -> pairwise
training on the engine's loop control -> save -> held-out final figures. Subclasses say which model they
load, how a pair is tokenized and scored, and the per-pair loss."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from distributed_ft.engine.length_groups import PASS_COST_TOKENS
from distributed_ft.engine.signals import EXIT_STOPPED

REPORT = "preference_eval.json"


class PairRun:
    kind = ""            # the config kind
    model_task = ""      # the model task loaded
    metric_names: list[str] = []
    auto_fp32: str | None = None  # why `training.mixed_precision: auto` is fp32 for this kind, where it is

    def __init__(self, config_path: str, overrides: list[str] | None = None):
        from accelerate.utils import set_seed

        from distributed_ft.config import load_config
        from distributed_ft.engine.distributed import build_accelerator, configure_device_env, zero_stage
        from distributed_ft.engine.logging import setup_console_logging
        from distributed_ft.engine.rundir import check_run_dir
        from distributed_ft.strategies import get_strategy

        configure_device_env()
        self.config_path = str(config_path)
        self.config = load_config(config_path, overrides, kind=self.kind)
        self.accelerator = build_accelerator(self.config.training, self.config.logging, self.config.output.dir,
                                             model_dtype=self.config.model.dtype, auto_fp32=self.auto_fp32)
        setup_console_logging(self.accelerator.is_main_process)
        self.run_dir = check_run_dir(self.config)
        self.strategy = get_strategy(self.config.strategy.name)
        set_seed(self.config.training.seed)
        # Pairs of mixed lengths padded together waste a fifth or more of a CPU forward's positions, so one CPU
        # process scores a micro-batch's rows in length groups (training.length_grouping). One pass elsewhere:
        # on an accelerator padding mostly fills lanes that would idle, and over several processes a pass can
        # hold collectives (DDP's buffer broadcast, ZeRO-3's gathers) needing as many passes on every rank.
        single_cpu = self.accelerator.device.type == "cpu" and self.accelerator.num_processes == 1
        grouped = single_cpu and self.config.training.length_grouping and zero_stage(self.accelerator) != 3
        self.pass_cost = PASS_COST_TOKENS if grouped else None
        self.loop = self.result = self.run_logger = self.evaluation = None

    # --- what a subclass provides ---------------------------------------------------------------------
    def tokenize(self, pair: dict) -> dict:
        raise NotImplementedError

    def pair_scores(self, model, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of held-out pairs `indices`, without gradients."""
        raise NotImplementedError

    def pair_loss(self, model, indices: list[int]):
        raise NotImplementedError

    def load_data(self, render) -> tuple[list[dict], list[dict]]:
        """(train, held-out) rows; `render(messages, add_generation_prompt)` is the tokenizer's chat rendering."""
        from distributed_ft.preference.pairs import build_pairs

        return build_pairs(self.config.pairs, self.config.training.seed, render)

    def held_metrics(self, scores: torch.Tensor) -> dict:
        from distributed_ft.preference.evaluate import pair_metrics

        return pair_metrics(scores[:, 0], scores[:, 1])

    def report_extras(self, tag: str, scores: torch.Tensor) -> dict:
        """Main process only: more top-level entries for preference_eval.json, from the scores of `tag`."""
        return {}

    def after_model(self) -> None:
        """Called once the strategy is applied, before the model is wrapped (a reference is made here)."""

    def before_training(self) -> None:
        """Called once the model is wrapped, before the baseline (precomputed references are made here)."""

    def make_evaluation(self):
        """The end-of-run evaluation of generations (eval.session.RunEvaluation), or None: a reward model
        generates nothing."""
        return None

    # --- the stages ------------------------------------------------------------------------------------
    def build(self) -> "PairRun":
        from distributed_ft.engine.logging import logger
        from distributed_ft.engine.rundir import create_run_dir
        from distributed_ft.grader.hf_models import render_messages
        from distributed_ft.models import load_model, load_tokenizer_for
        from distributed_ft.strategies import count_parameters

        config = self.config
        self.tokenizer, self.model_path, added_pad = load_tokenizer_for(config.model)
        render = lambda messages, gen: render_messages(self.tokenizer, messages, gen)  # noqa: E731
        train, self.held_rows = self.load_data(render)
        self.train_pairs = [self.tokenize(p) for p in train]
        self.held_pairs = [self.tokenize(p) for p in self.held_rows]
        model_cfg = config.model.model_copy(update={"task": self.model_task})
        self.load_base = lambda: load_model(model_cfg, self.tokenizer, self.model_path, added_pad=added_pad,  # noqa: E731
                                            num_labels=1)
        model = self.load_base()
        self.model = self.strategy.apply(model, config.strategy, self.model_task)
        self.after_model()
        trainable, total = count_parameters(self.model)
        logger.info(f"model {self.model_path}: {total:,} parameters, {trainable:,} trainable with strategy "
                    f"'{self.strategy.name}'; {len(self.train_pairs)} training pairs, {len(self.held_pairs)} held out")
        create_run_dir(self.accelerator, config, self.config_path, self.kind)
        return self

    def prepare(self) -> "PairRun":
        from distributed_ft.engine.logging import RunLogger
        from distributed_ft.engine.rundir import record_rank
        from distributed_ft.preference.loop import PairLoop
        from distributed_ft.strict import config_to_dict

        acc, config = self.accelerator, self.config
        self.run_logger = RunLogger(self.run_dir, config.logging, config_to_dict(config), acc,
                                    config.training.max_steps)
        self.loop = PairLoop(accelerator=acc, model=self.model, training=config.training, run_dir=self.run_dir,
                             run_logger=self.run_logger, n_pairs=len(self.train_pairs), pair_loss=self.pair_loss,
                             metric_names=self.metric_names, log_every=config.logging.log_every,
                             on_prepared=lambda m: record_rank(acc, self.run_dir, [m]))
        self.loop.prepare()
        self.model = self.loop.model
        self.before_training()
        self.evaluation = self.make_evaluation()
        return self

    def evaluate(self, tag: str) -> dict:
        """Collective: the held-out pairwise figures, written to preference_eval.json under `tag`."""
        from distributed_ft.engine.logging import logger
        from distributed_ft.preference.loop import sharded_map

        report_path = self.run_dir / REPORT
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if tag == "baseline" and "baseline" in report:  # kept across resumes: the model before any step
            return report["baseline"]
        was_training = self.model.training
        self.model.eval()

        def score(indices):
            with torch.no_grad():
                return torch.stack(self.pair_scores(self.model, indices), dim=1)

        scores = sharded_map(self.accelerator, len(self.held_pairs), self.config.training.micro_batch_size, score)
        self.model.train(was_training)
        metrics = self.held_metrics(scores) if len(self.held_pairs) else {"pairs": 0}
        if self.accelerator.is_main_process:
            report[tag] = metrics
            report.update(self.report_extras(tag, scores))
            report_path.write_text(json.dumps(report, indent=1))
        self.accelerator.wait_for_everyone()
        logger.info(f"held-out pairs ({tag}): " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in metrics.items()))
        return metrics

    def train(self):
        try:
            self.result = self.loop.train()
        finally:
            self.run_logger.end_progress()
        return self.result

    def save(self) -> Path:
        from distributed_ft.engine.logging import logger
        from distributed_ft.engine.save import save_final_model

        final = save_final_model(self.model, self.accelerator, self.strategy, self.tokenizer, self.run_dir / "final")
        logger.info(f"saved {final}")
        return final

    def close(self) -> None:
        if self.run_logger is not None:
            self.run_logger.end_progress()
        self.accelerator.end_training()


def run_pairs(job: PairRun) -> int:
    job.build().prepare()
    try:
        job.evaluate("baseline")
        if job.evaluation:
            job.evaluation.baseline()
        if job.train().stopped_by:
            return EXIT_STOPPED
        job.save()
        job.evaluate("final")
        if job.evaluation:
            job.evaluation.final(job.result.step)
        return 0
    finally:
        job.close()
