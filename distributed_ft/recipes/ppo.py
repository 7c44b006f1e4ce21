"""`dft ppo`: PPO fine-tuning of a causal LM against a grader service, with a critic (a value head on the
policy, or a separate base copy) and a frozen reference. The stages are the RL recipe's (recipes/rl_run.py)."""
from __future__ import annotations

from distributed_ft.recipes.rl_run import RLRun
from distributed_ft.recipes.rl_run import run as run_stages


class PPORun(RLRun):
    kind = "ppo"

    def build_trained(self, load, policy) -> tuple:
        from distributed_ft.rl.model import PolicyWithValue, backbone_of

        reference = self.frozen_reference(load, policy)
        mode = self.section.critic.mode
        critic = backbone_of(load()) if mode == "separate" else None
        return PolicyWithValue(policy, policy.config.hidden_size, critic), f"critic {mode}, {reference}"

    def make_objective(self, section, reduce, eos_id):
        from distributed_ft.rl.objectives import PPOObjective

        return PPOObjective(section, reduce)


def run(config_path: str, overrides: list[str]) -> int:
    return run_stages(PPORun(config_path, overrides))
