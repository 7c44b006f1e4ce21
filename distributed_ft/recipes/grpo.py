"""`dft grpo`: critic-free RL fine-tuning of a causal LM against a grader service: GRPO, Dr.GRPO, DAPO, RLOO,
REINFORCE++ (and its group-baseline variant) and GSPO, set by `grpo.algorithm`. The loop, the grader, the
unscorable semantics, ZeRO-3 gathering and resume are PPO's (recipes/rl_run.py, rl/trainer.py); only the
trained module (the policy alone) and the objective (rl/objectives.GroupObjective) differ.
"""
from __future__ import annotations

from distributed_ft.recipes.rl_run import RLRun
from distributed_ft.recipes.rl_run import run as run_stages

ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32 per trainable parameter
MODEL_STATE_BYTES = 16  # + the fp32 weight and its gradient


class GRPORun(RLRun):
    kind = "grpo"

    def build_trained(self, load, policy) -> tuple:
        from distributed_ft.rl.model import Policy

        kl = self.section.kl
        reference = self.frozen_reference(load, policy) if self.section.uses_reference else "no reference (kl.beta 0)"
        self._log_critic_saving(policy)
        return Policy(policy), f"algorithm {self.section.algorithm}, no critic, {reference}" + (
            f", KL {kl.estimator} x {kl.beta} in the {kl.mode}" if kl.beta > 0 else "")

    def make_objective(self, section, reduce, eos_id):
        from distributed_ft.rl.objectives import GroupObjective

        return GroupObjective(section, reduce, eos_id)

    def _log_critic_saving(self, policy) -> None:
        """What PPO would add for its critic on this model, logged once: the shared value head, or a
        separate critic (a copy of the backbone plus the head): parameters, AdamW state, and the model-state
        bytes they hold at peak (fp32 weights + gradients + AdamW state)."""
        from distributed_ft.engine.logging import logger
        from distributed_ft.rl.model import backbone_of, is_peft

        base = policy.get_base_model() if is_peft(policy) else policy
        head = policy.config.hidden_size + 1
        separate = sum(p.numel() for p in backbone_of(base).parameters()) + head

        def saving(n: int) -> str:
            return (f"{n:,} parameters, {n * ADAMW_STATE_BYTES:,} optimizer-state bytes, "
                    f"{n * MODEL_STATE_BYTES:,} model-state bytes at peak")

        logger.info(f"{self.kind}: no critic: {saving(head)} fewer than PPO with a shared value head "
                    f"({saving(separate)} fewer than PPO with a separate critic)")


def run(config_path: str, overrides: list[str]) -> int:
    return run_stages(GRPORun(config_path, overrides))
