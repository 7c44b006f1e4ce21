"""Length-grouped passes: the split is a partition that costs no more than one padded pass, sharded ranks can
be brought to the same number of passes, and a training step with them equals the padded step (same loss,
same gradient) while computing far fewer tokens."""
from __future__ import annotations

import random

import pytest

from distributed_ft.engine.length_groups import PASS_COST_TOKENS, length_groups, split_to
from tests.unit.one_step import assert_same_step, one_step


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


def test_a_grouped_step_equals_the_padded_step(tmp_path):
    padded = one_step(tmp_path, "padded", padding_free=False, length_grouping=False)
    grouped = one_step(tmp_path, "grouped", padding_free=False, length_grouping=True)
    assert_same_step(padded, grouped)
    assert grouped.computed_tokens < 0.75 * padded.computed_tokens, (grouped.computed_tokens, padded.computed_tokens)
