"""A run's result depends on its config and seed only, not on what the machine's cache held before."""
from __future__ import annotations

import pytest

from tests.distributed.launch import column, run_train

pytestmark = pytest.mark.distributed

LORA = ["training.max_steps=3", "training.warmup_steps=0", "training.micro_batch_size=4", "logging.log_every=1",
        "logging.progress_bar=false", "eval.enabled=false", "data.validation_fraction=0.0",
        "data.train.0.num_examples=100", "data.train.1.num_examples=100", "strategy.dropout=0.0"]


def test_run_that_builds_the_builtin_model_trains_like_one_that_finds_it_cached(tmp_path):
    """LoRA's A matrices (and PPO's value head, and sampled rollouts) come from the global torch RNG that
    set_seed(training.seed) seeded. The first run on a fresh DFT_CACHE_DIR builds the built-in model, which
    reseeds that RNG with the model's init seed: it then trains differently from every later run of the same
    config (seen: step-1 grad_norm 3.517 vs 3.399, step-2 loss 4.440 vs 4.412)."""
    env = {"DFT_CACHE_DIR": str(tmp_path / "fresh-cache")}
    first = tmp_path / "builds-the-model"
    run_train("single", "configs/lora.yaml", first, *LORA, env=env)
    assert list((tmp_path / "fresh-cache" / "builtin").iterdir())  # this run built it
    second = tmp_path / "finds-it-cached"
    run_train("single", "configs/lora.yaml", second, *LORA, env=env)
    assert column(second, "grad_norm") == pytest.approx(column(first, "grad_norm"), rel=1e-6)
    assert column(second, "loss") == pytest.approx(column(first, "loss"), rel=1e-6)
