"""Length-grouped passes: the split is a partition that costs no more than one padded pass, sharded ranks can
be brought to the same number of passes, and a training step with them equals the padded step (same loss,
same gradient) while computing far fewer tokens."""
from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from distributed_ft.engine.length_groups import PASS_COST_TOKENS, length_groups, split_to


def cost(groups, lengths, pass_cost=PASS_COST_TOKENS):
    return sum(len(g) * max(lengths[i] for i in g) + pass_cost for g in groups)


def test_groups_partition_the_rows_and_never_cost_more_than_one_padded_pass():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [min(512, int(rng.lognormvariate(5.0, 0.8))) + 1 for _ in range(rng.randint(1, 40))]
        groups = length_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert cost(groups, lengths) <= cost([list(range(len(lengths)))], lengths)
        longest = [max(lengths[i] for i in g) for g in groups]
        assert longest == sorted(longest, reverse=True)  # runs of the rows sorted by length


def test_equal_rows_stay_one_pass_and_a_spread_splits():
    assert length_groups([256] * 16) == [list(range(16))]
    lengths = [500] + [12] * 15
    assert length_groups(lengths) == [[0], list(range(1, 16))]


def test_split_to_reaches_the_agreed_count_without_losing_rows():
    lengths = [400, 300, 40, 30, 20, 10]
    groups = split_to(length_groups(lengths), lengths, 5)
    assert len(groups) == 5 and sorted(i for g in groups for i in g) == list(range(6))
    with pytest.raises(ValueError):
        split_to([[0, 1]], [5, 5], 3)


def one_step(tmp_path, name: str, grouping: bool):
    """One optimizer step of the built-in tiny model on rows of 3 to 120 words, 16 per micro-batch."""
    from distributed_ft.recipes.sft import SFTRun

    rng = random.Random(1)
    rows = tmp_path / "rows.jsonl"
    if not rows.exists():
        rows.write_text("".join(json.dumps({"text": " ".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 120)))})
                                + "\n" for _ in range(64)))
    config = {"model": {"builtin": "tiny"}, "data": {"train": [{"path": str(rows), "format": "text"}],
                                                     "max_length": 128},
              "strategy": {"name": "full"},
              "training": {"max_steps": 1, "micro_batch_size": 16, "gradient_accumulation_steps": 2,
                           "mixed_precision": "no",
                           # plain SGD at rate 1: the weights move by exactly the gradient (Adam's first step
                           # is about a sign, which rounding can flip for near-zero entries)
                           "optimizer": "sgd", "learning_rate": 1.0, "max_grad_norm": None, "warmup_steps": 0,
                           "length_grouping": grouping, "seed": 3},
              "logging": {"progress_bar": False}, "eval": {"enabled": False},
              "output": {"dir": str(tmp_path / name)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run = SFTRun(str(path)).build().prepare()
    state = lambda: {k: v.detach().clone() for k, v in run.accelerator.unwrap_model(run.model).state_dict().items()}  # noqa: E731
    try:
        before = state()
        result = run.train()
        return result.losses[0], before, state(), run.trainer.computed_tokens
    finally:
        run.close()


def test_a_grouped_step_equals_the_padded_step(tmp_path):
    loss_padded, before, padded, computed_padded = one_step(tmp_path, "padded", grouping=False)
    loss_grouped, _, grouped, computed_grouped = one_step(tmp_path, "grouped", grouping=True)
    # float rounding only: the same per-example sums over the same global count (fp32, rtol 1e-5 / 1e-4)
    assert loss_grouped == pytest.approx(loss_padded, rel=1e-5)
    moved = 0.0
    for key, value in padded.items():
        gradient = before[key] - value
        moved += float(gradient.abs().sum())
        torch.testing.assert_close(before[key] - grouped[key], gradient, rtol=1e-4, atol=1e-6, msg=key)
    assert moved > 1.0  # the step did move the weights
    assert computed_grouped < 0.75 * computed_padded, (computed_grouped, computed_padded)
