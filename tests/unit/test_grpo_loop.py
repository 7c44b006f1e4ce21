"""The critic-free family on the shared RL loop, in one process with an in-memory grader: no critic is built,
the on-policy step has ratio 1 and follows the group advantage, thin and constant groups are dropped and
counted, dynamic sampling refills the batch, and the loop logs and checkpoints what it should."""
from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from distributed_ft.grader.results import GradeResult

REPO = Path(__file__).resolve().parents[2]
COMMON = ["grader.config=null", "grader.urls=[http://127.0.0.1:9]", "data.train.0.num_examples=64",
          "training.micro_batch_size=8", "training.gradient_accumulation_steps=1", "logging.progress_bar=false"]


class Grader:
    """An in-memory grader: `score(text, item)` gives the reward, None for an unscorable sample."""

    def __init__(self, score):
        self.score, self.calls = score, 0

    def submit(self, texts, items) -> Future:
        self.calls += 1
        results = [GradeResult(reward=None, error="down") if (r := self.score(t, i)) is None else GradeResult(reward=r)
                   for t, i in zip(texts, items)]
        future: Future = Future()
        future.set_result((results, 0.0))
        return future

    def close(self):
        pass


def letters(text, item):
    return sum(c in item["reference"] for c in text) / max(len(text), 1)


def grpo_run(tmp_path, *extra, score=letters):
    from distributed_ft.recipes.grpo import GRPORun

    overrides = [f"output.dir={tmp_path / 'grpo'}", *COMMON, "grpo.rollout_batch_size=2", "grpo.num_generations=4",
                 "grpo.max_new_tokens=4", "grpo.eval_prompts=0", *extra]
    run = GRPORun(REPO / "configs" / "grpo" / "quickstart.yaml", overrides).build().prepare_model()
    run.make_trainer(Grader(score))
    return run


def fixed_rollout(run, rewards):
    """Two prompts x four completions with known rewards, scored by the run's model."""
    from distributed_ft.rl.rollout import Rollout, encode_queries, response_mask

    prompts = ["copy: a b ="] * 4 + ["copy: c d ="] * 4
    query, qmask = encode_queries(run.tokenizer, prompts)
    response = torch.tensor([[10 + i, 11 + i, 12 + i, 13 + i] for i in range(8)])
    mask = response_mask(response, run.tokenizer.eos_token_id)
    ro = Rollout(query, qmask, response, mask, ["x"] * 8, [{}] * 8, prompts)
    run.trainer._score(ro)
    run.trainer.apply_grades(ro, [GradeResult(reward=r) if r is not None else GradeResult(reward=None, error="x")
                                  for r in rewards])
    return ro


def adam_state_elements(optimizer) -> int:
    return sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))


def test_grpo_holds_no_critic_value_head_or_its_optimizer_state(tmp_path):
    from tests.unit.test_ppo_update import FakeGrader, _run

    grpo = grpo_run(tmp_path / "g", "grpo.kl.beta=0")
    ppo = _run(tmp_path / "p", "ppo.rollout_batch_size=2", "ppo.num_generations=4")
    hidden = grpo.model.policy.config.hidden_size
    assert not hasattr(grpo.model, "value_head") and grpo.reference is None  # beta 0: no reference either
    assert ppo.reference is not None
    n_grpo = sum(p.numel() for p in grpo.model.parameters())
    n_ppo = sum(p.numel() for p in ppo.model.parameters())
    assert n_ppo - n_grpo == hidden + 1
    rewards = [1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 0.3, 0.1]
    for run in (grpo, ppo):
        ro = fixed_rollout(run, rewards)
        run.trainer.update(ro, run.trainer.advantages(ro), step=0)
    assert adam_state_elements(ppo.optimizer) - adam_state_elements(grpo.optimizer) == 2 * (hidden + 1)
    assert adam_state_elements(grpo.optimizer) == 2 * n_grpo
    assert isinstance(ppo.trainer.grader, FakeGrader)


@pytest.mark.parametrize("strategy,copy", [("full", True), ("lora", False)])
def test_a_kl_term_builds_the_reference_the_strategy_needs(tmp_path, strategy, copy):
    run = grpo_run(tmp_path, "grpo.kl.beta=0.04", f"strategy.name={strategy}")
    assert (run.reference is not None) is copy  # LoRA: the policy with its adapter disabled
    from distributed_ft.rl.rollout import score_tokens

    ro = fixed_rollout(run, [1.0, 0.0] * 4)
    assert ro.ref_logprobs is not None
    with torch.no_grad():
        policy, _, _ = score_tokens(run.model, ro.query, ro.query_mask, ro.response, ro.mask, mode="policy",
                                    temperature=1.0)
    torch.testing.assert_close(ro.ref_logprobs, policy)  # before any update the reference is the policy


def test_on_policy_step_has_ratio_one_and_follows_the_group_advantage(tmp_path):
    from distributed_ft.rl.rollout import score_tokens

    run = grpo_run(tmp_path, "grpo.kl.beta=0", "training.learning_rate=0.002")
    ro = fixed_rollout(run, [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = run.trainer.advantages(ro)
    assert adv["advantages"][0, 0] > 0 and (adv["advantages"][1:4] < 0).all() and adv["advantages"][4, 0] < 0
    assert run.trainer.single_update and ro.logprobs is None  # so no scoring pass: the update's own pass is it
    stats = run.trainer.update(ro, adv, step=0)  # one epoch, one minibatch of all 8: one optimizer step
    assert stats["clipfrac_low"] == stats["clipfrac_high"] == 0.0
    assert stats["approx_kl"] < 1e-12
    with torch.no_grad():
        new, _, _ = score_tokens(run.model, ro.query, ro.query_mask, ro.response, ro.mask, mode="policy",
                                 temperature=1.0)
    moved = (new - ro.logprobs).sum(1)
    assert moved[0] > 0 and moved[4] < 0          # the group's best became likelier, its worst less likely
    assert moved[1:4].max() < moved[0] and moved[5:].min() > moved[4]


def test_thin_and_constant_groups_leave_the_update_and_are_counted(tmp_path):
    run = grpo_run(tmp_path, "grpo.kl.beta=0", "grpo.dynamic_sampling.enabled=true",
                   "grpo.dynamic_sampling.max_rounds=1")
    # group 0: one scorable sample left (dropped); group 1: every reward 0.5 (constant)
    ro = fixed_rollout(run, [1.0, None, None, None, 0.5, 0.5, 0.5, 0.5])
    adv = run.trainer.advantages(ro)
    assert adv["mask"].sum() == 0 and adv["units"].sum() == 0
    stats = run.trainer.objective.step_stats(ro, adv)
    assert stats["groups_dropped"] == 1 and stats["groups_constant"] == 1
    before = [p.detach().clone() for p in run.model.parameters()]
    run.trainer.update(ro, adv, step=0)  # nothing takes part: no optimizer step at all
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))


def test_dynamic_sampling_replaces_constant_groups_with_fresh_prompts(tmp_path):
    # Prompts whose answer starts with a, b, c or d get a constant reward; the others a varying one.
    def score(text, item):
        return 0.5 if item["reference"].strip()[0] in "abcd" else letters(text, item) + 0.01 * len(text)

    run = grpo_run(tmp_path, "grpo.kl.beta=0", "grpo.dynamic_sampling.enabled=true",
                   "grpo.dynamic_sampling.max_rounds=6", "grpo.rollout_batch_size=4", score=score)
    torch.manual_seed(0)
    timings: dict = {}
    position = run.trainer.stream.state_dict()["position"]
    ro, info = run.trainer.collect(timings)
    useless = run.trainer.objective.useless_groups(ro)
    assert info["sampling_rounds"] > 1 and info["groups_replaced"] > 0
    assert not useless.any()
    assert len(ro.texts) == 16 and ro.query.shape[0] == 16 and ro.logprobs.shape == (16, 4)
    for g in range(4):  # groups stay whole: four completions of one prompt in a row
        assert len(set(ro.prompts[g * 4:(g + 1) * 4])) == 1
    assert run.trainer.stream.state_dict()["position"] == position + 4 * info["sampling_rounds"]


def test_loop_logs_group_statistics_saves_no_critic_and_checkpoints_prompts(tmp_path):
    calls = {"n": 0}

    def flaky(text, item):  # every 8th sample unscorable
        calls["n"] += 1
        return None if calls["n"] % 8 == 0 else letters(text, item)

    run = grpo_run(tmp_path, "grpo.kl.beta=0", "training.max_steps=2", "training.checkpoint_every=1",
                   "grpo.unscorable_threshold=0.3", score=flaky)
    result = run.train()
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.step == 2 and [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "group_reward_std", "groups_dropped", "groups_constant", "truncated_rate",
                "clipfrac_low", "clipfrac_high", "pg_loss", "approx_kl", "entropy", "samples_per_s"):
        assert key in rows[0], key
    assert all(r["unscorable"] == 1 and r["samples"] == 8 for r in rows)
    assert rows[0]["kl"] is None  # no reference, no KL
    state = json.loads((run.run_dir / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert state["prompts"]["position"] == 2 and "kl_controller" not in state
    final = run.save()
    assert (final / "model.safetensors").is_file() and not (final / "critic").exists()
    run.close()
