"""The PPO loop in one process with an in-memory grader: the update follows the advantage, unscorable samples
are masked and counted, and a checkpoint holds the KL controller and prompt position."""
from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

import torch

from distributed_ft.grader.results import GradeResult

REPO = Path(__file__).resolve().parents[2]


class FakeGrader:
    """Reward 1 for answers containing the letter 'a', 0 otherwise; every 4th sample unscorable."""

    def __init__(self):
        self.calls = 0

    def submit(self, texts, items) -> Future:
        self.calls += 1
        results = [GradeResult(reward=None, error="down") if i % 4 == 3 else GradeResult(reward=float("a" in t))
                   for i, t in enumerate(texts)]
        future: Future = Future()
        future.set_result((results, 0.0))
        return future

    def close(self):
        pass


def _run(tmp_path, *extra):
    from distributed_ft.recipes.ppo import PPORun

    overrides = [f"output.dir={tmp_path / 'run'}", "grader.config=null", "grader.urls=[http://127.0.0.1:9]",
                 "data.train.0.num_examples=40", "ppo.rollout_batch_size=4", "ppo.num_generations=2",
                 "ppo.max_new_tokens=4", "training.micro_batch_size=4", "ppo.eval_prompts=0",
                 "logging.progress_bar=false", *extra]
    run = PPORun(REPO / "configs" / "ppo" / "quickstart.yaml", overrides).build().prepare_model()
    run.make_trainer(FakeGrader())
    return run


def test_update_raises_logprob_of_positive_advantage_tokens(tmp_path):
    from distributed_ft.rl.rollout import Rollout, encode_queries, response_mask, score_tokens

    run = _run(tmp_path, "ppo.ppo_epochs=4", "training.learning_rate=0.001", "ppo.kl.coef=0.0")
    trainer = run.trainer
    prompts = ["copy: a b =", "copy: c d ="] * 4
    query, qmask = encode_queries(run.tokenizer, prompts)
    response = torch.tensor([[10, 11, 12, 13]] * 4 + [[20, 21, 22, 23]] * 4)
    mask = response_mask(response, run.tokenizer.eos_token_id)
    ro = Rollout(query, qmask, response, mask, ["a"] * 8, [{}] * 8, prompts)
    trainer._score(ro)
    old = ro.logprobs.clone()
    # The first four responses score 1, the others 0; the last one is unscorable (masked out of the update).
    results = [GradeResult(reward=1.0)] * 4 + [GradeResult(reward=0.0)] * 3 + [GradeResult(reward=None, error="x")]
    trainer.apply_grades(ro, results)
    adv = trainer.advantages(ro)
    assert adv["mask"][7].sum() == 0 and adv["mask"][0].sum() == 4
    assert (adv["advantages"][:4] > 0).all() and (adv["advantages"][4:7] < 0).all()
    stats = trainer.update(ro, adv, step=0)
    with torch.no_grad():
        new, _, _ = score_tokens(run.model, query, qmask, response, mask, mode="policy", temperature=1.0)
    assert (new[:4] - old[:4]).mean() > 0.05        # rewarded tokens became more likely
    assert (new[4:7] - old[4:7]).mean() < -0.05     # penalised ones less likely
    assert 0 <= stats["clipfrac"] <= 1 and stats["approx_kl"] > 0 and stats["vf_loss"] > 0


def test_loop_counts_unscorable_and_checkpoints_its_state(tmp_path):
    run = _run(tmp_path, "training.max_steps=2", "training.checkpoint_every=1", "ppo.kl.adaptive=true",
               "ppo.kl.horizon=100", "ppo.unscorable_threshold=0.3")
    result = run.train()
    assert result.step == 2 and run.trainer.grader.calls == 2
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["samples"] == 8 and r["unscorable"] == 2 and r["unscorable_rate"] == 0.25 for r in rows)
    for key in ("reward_mean", "reward_std", "kl", "rollout_entropy", "pg_loss", "vf_loss", "entropy", "clipfrac",
                "approx_kl", "response_length", "grader_latency_s", "time/generation", "time/grading_wait",
                "time/forward", "time/update", "samples_per_s"):
        assert key in rows[0]
    state = json.loads((run.run_dir / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert state["prompts"]["position"] == 4
    # The adaptive controller moved from its start by the rule, given step 1's KL.
    expected = 0.02 * (1 + min(max(rows[0]["kl"] / 6.0 - 1, -0.2), 0.2) * 8 / 100)
    assert abs(state["kl_controller"]["value"] - expected) < 1e-9
    assert (run.run_dir / "samples.jsonl").is_file()
    run.close()
