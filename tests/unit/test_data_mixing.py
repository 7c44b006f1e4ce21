"""WeightedMixSampler: weighted task choice, per-task epochs, determinism and exact resumption."""
from __future__ import annotations

import json
import time

import pytest

from distributed_ft.data import WeightedMixSampler
from distributed_ft.errors import DataError


def test_weights_set_the_task_mix():
    sampler = WeightedMixSampler([500, 300], [3.0, 1.0], seed=0)
    started = time.perf_counter()
    draws = sampler.next_indices(4000)
    elapsed = time.perf_counter() - started
    share_first = sum(i < 500 for i in draws) / len(draws)
    assert abs(share_first - 0.75) < 0.03
    assert all(0 <= i < 800 for i in draws)
    assert elapsed < 1.0, f"4,000 draws took {elapsed:.3f}s"


def test_same_seed_same_stream_different_seed_different():
    a = WeightedMixSampler([50, 70, 20], [1, 2, 1], seed=5).next_indices(1000)
    b = WeightedMixSampler([50, 70, 20], [1, 2, 1], seed=5).next_indices(1000)
    c = WeightedMixSampler([50, 70, 20], [1, 2, 1], seed=6).next_indices(1000)
    assert a == b and a != c


def test_chunked_draws_equal_one_big_draw():
    one = WeightedMixSampler([30, 40], [1, 1], seed=2).next_indices(10_000)
    sampler = WeightedMixSampler([30, 40], [1, 1], seed=2)
    pieces = []
    for n in [1, 7, 4095, 1, 2, 5894]:
        pieces += sampler.next_indices(n)
    assert pieces == one


def test_each_epoch_visits_every_example_once_in_a_new_order():
    sampler = WeightedMixSampler([10], [1.0], seed=0)
    first, second = sampler.next_indices(10), sampler.next_indices(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    # With two tasks, indices of the second task are offset by the first task's size.
    two = WeightedMixSampler([10, 4], [1, 1], seed=0).next_indices(200)
    second_task = [i - 10 for i in two if i >= 10][:4]
    assert sorted(second_task) == [0, 1, 2, 3]


def test_state_dict_resumes_exactly():
    sampler = WeightedMixSampler([100, 37, 250], [0.5, 0.2, 0.3], seed=11)
    sampler.next_indices(1000)
    state = json.loads(json.dumps(sampler.state_dict()))  # it survives a JSON round trip
    expected = sampler.next_indices(3000)
    fresh = WeightedMixSampler([100, 37, 250], [0.5, 0.2, 0.3], seed=11)
    fresh.load_state_dict(state)
    assert fresh.next_indices(3000) == expected
    assert len(json.dumps(state)) < 300
    other = WeightedMixSampler([100, 37, 251], [0.5, 0.2, 0.3], seed=11)
    with pytest.raises(DataError, match="task sizes"):
        other.load_state_dict(state)
