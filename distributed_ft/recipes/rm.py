"""`dft rm`: a pairwise Bradley-Terry reward model, a one-output sequence-classification head over any
causal LM or encoder, with any strategy. The saved folder (an adapter's merged into `reward_model/`) is a
`score_model` grader as it stands; the run writes the grader spec that serves it (grader.yaml) with the
rendering training used."""
from __future__ import annotations

from pathlib import Path

from distributed_ft.recipes.pair_run import PairRun, run_pairs


class RMRun(PairRun):
    kind = "rm"
    model_task = "sequence_classification"
    metric_names = ["accuracy", "margin", "rewards/chosen", "rewards/rejected"]
    # the run's held-out figures are those of the grader it writes, which scores in fp32
    auto_fp32 = "a reward model trains in the precision its grader serves it in"

    def tokenize(self, pair: dict) -> dict:
        from distributed_ft.preference.batches import tokenize_rm_pair
        from distributed_ft.preference.render import reward_text

        render = lambda prompt, completion: reward_text(self.tokenizer, prompt, completion)  # noqa: E731
        return tokenize_rm_pair(self.tokenizer, pair, self.config.pairs.max_length, render)

    def grader_input(self) -> list[dict] | None:
        """The served grader spec's `input`; None: REWARD_INPUT, prompt and completion as training renders them."""
        return None

    def after_model(self) -> None:
        # one output is a reward, not a 1-class classifier: a saved config with that problem type does not load
        self.model.config.problem_type = None

    def before_training(self) -> None:
        from distributed_ft.engine.logging import logger
        from distributed_ft.engine.padding_free import padding_free_for

        self.not_padding_free = padding_free_for(self.accelerator.unwrap_model(self.model), self.model_task,
                                                 self.config.training.padding_free)
        logger.info("batches: padding-free (training.padding_free): each micro-batch's sides end to end in one "
                    "row, attention within each" if self.not_padding_free is None
                    else f"batches: not padding-free ({self.not_padding_free})")

    def _rewards(self, model, examples: list[dict]):
        from distributed_ft.engine.padding_free import flat_scores
        from distributed_ft.preference.batches import collate_rm_pairs, pair_margins, score_in_groups

        device, b = self.accelerator.device, len(examples)
        if self.not_padding_free is None:  # every side in one flat forward
            rows = [p[side] for side in ("chosen", "rejected") for p in examples]
            rewards = flat_scores(model, rows, self.tokenizer.pad_token_id)[:, 0].float()
            return rewards[:b], rewards[b:], pair_margins(examples, self.config.rm.margin).to(device)
        batch = collate_rm_pairs(examples, self.tokenizer.pad_token_id, self.config.rm.margin)

        def score(rows, width):  # in length groups (PairRun.pass_cost)
            ids, mask = (batch[k][rows, :width].to(device) for k in ("input_ids", "attention_mask"))
            return (model(input_ids=ids, attention_mask=mask).logits[:, 0].float(),)

        rewards, = score_in_groups(batch["attention_mask"].sum(1), self.pass_cost, score)
        return rewards[:b], rewards[b:], batch["margin"].to(device)

    def pair_loss(self, model, indices: list[int]):
        from distributed_ft.preference.losses import bradley_terry_loss

        chosen, rejected, margin = self._rewards(model, [self.train_pairs[i] for i in indices])
        loss = bradley_terry_loss(chosen, rejected, margin, self.config.rm.center_rewards_coefficient)
        diff = (chosen - rejected).detach()
        return loss, {"accuracy": (diff > 0).float(), "margin": diff, "rewards/chosen": chosen.detach(),
                      "rewards/rejected": rejected.detach()}

    def pair_scores(self, model, indices: list[int]):
        chosen, rejected, _ = self._rewards(model, [self.held_pairs[i] for i in indices])
        return chosen, rejected

    def save(self) -> Path:
        import yaml

        from distributed_ft.preference.render import reward_grader_spec

        final = super().save()
        if self.accelerator.is_main_process:
            served = final
            if not (final / "config.json").is_file():  # an adapter: the grader loads a plain folder, merged here
                from distributed_ft.engine.logging import logger
                from distributed_ft.errors import DftError
                from distributed_ft.recipes.export import export

                served = self.run_dir / "reward_model"
                try:
                    export(str(final), str(served), merge=True, overwrite=True)
                except DftError as err:  # virtual tokens or hook-based adapters do not merge into weights
                    logger.warning(f"no grader.yaml: the reward model stays an adapter in {final} ({err})")
                    served = None
            if served is not None:
                spec = reward_grader_spec(served.resolve(), input_messages=self.grader_input())
                (self.run_dir / "grader.yaml").write_text(f"# dft grader serve --config {self.run_dir / 'grader.yaml'}\n"
                                                          + yaml.safe_dump(spec, sort_keys=False))
        self.accelerator.wait_for_everyone()
        return final


def run(config_path: str, overrides: list[str]) -> int:
    from distributed_ft.config import load_config

    if load_config(config_path, overrides, kind="rm").rm.objective == "pointwise":
        from distributed_ft.recipes.rm_pointwise import PointwiseRun

        return run_pairs(PointwiseRun(config_path, overrides))
    return run_pairs(RMRun(config_path, overrides))
