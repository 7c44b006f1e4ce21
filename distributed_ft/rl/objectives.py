"""What an RL algorithm adds to the shared loop (rl/trainer.py): its advantages and its per-token loss.

An objective says which forward passes it needs (`score_mode`: values or not; `uses_reference`;
`advantages_read_logprobs`: the rollout's log-probs before any update), turns a
graded rollout into the update's tensors (`advantages`: a per-token mask, aggregation weights and units,
advantages and whatever its loss reads), and gives each micro-batch's per-token loss plus statistics.
PPO learns a critic; the group family (GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, GSPO) needs none.
"""
from __future__ import annotations

import torch

from distributed_ft.rl import group as G
from distributed_ft.rl import math as M
from distributed_ft.rl.math import Reduce


class PPOObjective:
    """Clipped PPO with a value head: KL-shaped token rewards, GAE, whitened advantages, clipped value loss."""

    score_mode = "policy_value"
    uses_reference = True
    advantages_read_logprobs = True  # the KL-shaped token rewards
    stat_names = ("pg_loss", "vf_loss", "entropy", "clipfrac", "vf_clipfrac", "approx_kl")

    def __init__(self, section, reduce: Reduce):
        self.ppo, self.reduce = section, reduce
        self.kl_ctl = M.build_kl_controller(section.kl)

    def advantages(self, ro) -> dict:
        ppo = self.ppo
        mask = ro.mask * ro.scorable[:, None]
        scores = ro.scores * ppo.reward.scale
        if ppo.reward.normalize == "batch":
            scores = M.whiten(scores[:, None], ro.scorable[:, None], self.reduce).squeeze(1)
        if ppo.reward.clip is not None:
            scores = scores.clamp(-ppo.reward.clip, ppo.reward.clip)
        rewards, kl = M.token_rewards(scores, ro.logprobs, ro.ref_logprobs, mask, self.kl_ctl.value)
        adv, returns = M.gae(rewards, ro.values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            adv = M.whiten(adv, mask, self.reduce)
        return {"mask": mask, "weights": mask, "units": mask.sum(1), "advantages": adv, "returns": returns,
                "old_values": ro.values, "kl": kl, "rewards": rewards}

    def token_loss(self, logprobs, values, entropy, batch: dict):
        ppo = self.ppo
        pg, clipped, approx_kl = M.policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], ppo.clip_range)
        vf, vclipped = M.value_loss(values, batch["old_values"], batch["returns"], ppo.value_clip_range)
        loss = pg + ppo.critic.vf_coef * vf - ppo.entropy_coef * entropy
        return loss, (pg, vf, entropy, clipped, vclipped, approx_kl)

    def step_stats(self, ro, adv: dict) -> dict:
        return {"kl_coef": self.kl_ctl.value}

    def after_step(self, row: dict, samples: int) -> None:
        self.kl_ctl.update(row["kl"], samples)

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])


class GroupObjective:
    """The critic-free family, configured by the `grpo` section (its algorithm fills the defaults)."""

    score_mode = "policy"
    stat_names = ("pg_loss", "kl_loss", "entropy", "clipfrac_low", "clipfrac_high", "approx_kl")

    def __init__(self, section, reduce: Reduce, eos_id: int | None):
        self.cfg, self.reduce, self.eos_id = section, reduce, eos_id
        self.uses_reference = section.uses_reference
        self.advantages_read_logprobs = section.kl.mode == "reward" and section.kl.beta > 0

    def scores(self, ro) -> torch.Tensor:
        """The grader's scores, scaled and (overlong: penalty) shaped by length."""
        cfg = self.cfg
        scores = ro.scores * cfg.reward_scale
        if cfg.overlong.mode == "penalty":
            penalty = G.overlong_penalty(ro.mask.sum(1), cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong.penalty)
            scores = scores + penalty * ro.scorable
        return scores

    def groups(self, ro) -> G.GroupAdvantages:
        return G.group_advantages(self.scores(ro), ro.scorable, self.cfg.num_generations, self.cfg.advantage)

    def useless_groups(self, ro) -> torch.Tensor:
        """[groups] bool: dropped (under two scorable samples) or constant reward: no learning signal."""
        g = self.groups(ro)
        return (g.dropped + g.constant) > 0

    def advantages(self, ro) -> dict:
        cfg = self.cfg
        g = self.groups(ro)
        kept = g.kept
        if cfg.dynamic_sampling.enabled:  # constant groups the refill could not replace leave the update
            kept = kept * (1.0 - g.constant.repeat_interleave(cfg.num_generations))
        cut = G.truncated(ro.response, self.eos_id)
        if cfg.overlong.mode == "mask":
            kept = kept * (1.0 - cut)
        mask = ro.mask * kept[:, None]
        kl = None
        if cfg.kl.mode == "reward" and cfg.kl.beta > 0:
            kl = G.kl_estimate(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator)
        advantages = G.token_advantages(g.advantages, mask, kl=kl, beta=cfg.kl.beta,
                                        whiten_batch=cfg.advantage in ("batch", "group_mean_batch"), reduce=self.reduce)
        weights, units = G.aggregation_weights(mask, cfg.loss_aggregation, cfg.max_new_tokens)
        out = {"mask": mask, "weights": weights, "units": units, "advantages": advantages, "groups": g,
               "truncated": cut}
        if self.uses_reference:
            out["ref_logprobs"] = ro.ref_logprobs
        return out

    def token_loss(self, logprobs, values, entropy, batch: dict):
        cfg = self.cfg
        pg, low, high, log_ratio = G.clipped_surrogate(logprobs, batch["old_logprobs"], batch["advantages"],
                                                       batch["mask"], cfg.epsilon_low, cfg.epsilon_high,
                                                       cfg.importance_ratio)
        kl_term = torch.zeros_like(pg)
        if cfg.kl.mode == "loss" and cfg.kl.beta > 0:
            kl_term = G.kl_estimate(logprobs, batch["ref_logprobs"], cfg.kl.estimator)
        loss = pg + cfg.kl.beta * kl_term - cfg.entropy_coef * entropy
        return loss, (pg, kl_term, entropy, low, high, 0.5 * log_ratio ** 2)

    def step_stats(self, ro, adv: dict) -> dict:
        """Group statistics over every rank: dropped and constant groups, mean group reward std, truncation."""
        g = adv["groups"]
        live = 1.0 - g.dropped
        totals = torch.stack([g.dropped.sum(), g.constant.sum(), (g.std * live).sum(), live.sum(),
                              adv["truncated"].sum(), torch.tensor(float(len(adv["truncated"])))]).double()
        if self.reduce is not None:
            totals = self.reduce(totals)
        return {"groups_dropped": int(totals[0]), "groups_constant": int(totals[1]),
                "group_reward_std": float(totals[2] / totals[3]) if totals[3] else None,
                "truncated_rate": float(totals[4] / totals[5])}

    def after_step(self, row: dict, samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
