"""One optimizer step of the built-in tiny model on rows of varied length, run under different batchings, and the
check that two such steps are the same step (same loss, same weight change)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch
import yaml


@dataclass
class Step:
    loss: float
    before: dict
    after: dict
    computed_tokens: int
    not_padding_free: str | None


def one_step(tmp_path, name: str, strategy: str = "full", **batching) -> Step:
    """One optimizer step of the built-in tiny model on rows of 3 to 120 words, 16 per micro-batch."""
    from distributed_ft.recipes.sft import SFTRun

    rng = random.Random(1)
    rows = tmp_path / "rows.jsonl"
    if not rows.exists():
        rows.write_text("".join(json.dumps({"text": " ".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 120)))})
                                + "\n" for _ in range(64)))
    config = {"model": {"builtin": "tiny"}, "data": {"train": [{"path": str(rows), "format": "text"}],
                                                     "max_length": 128},
              "strategy": {"name": strategy},
              "training": {"max_steps": 1, "micro_batch_size": 16, "gradient_accumulation_steps": 2,
                           "mixed_precision": "no",
                           # plain SGD at rate 1: the weights move by exactly the gradient (Adam's first step
                           # is about a sign, which rounding can flip for near-zero entries)
                           "optimizer": "sgd", "learning_rate": 1.0, "max_grad_norm": None, "warmup_steps": 0,
                           "seed": 3, **batching},
              "logging": {"progress_bar": False}, "eval": {"enabled": False},
              "output": {"dir": str(tmp_path / name)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run = SFTRun(str(path)).build().prepare()
    state = lambda: {k: v.detach().clone() for k, v in run.accelerator.unwrap_model(run.model).state_dict().items()}  # noqa: E731
    try:
        before = state()
        result = run.train()
        return Step(result.losses[0], before, state(), run.trainer.computed_tokens, run.trainer.not_padding_free)
    finally:
        run.close()


def assert_same_step(reference: Step, other: Step) -> None:
    """Float rounding only: the same per-example sums over the same global count (fp32: loss rel 1e-5, weight
    change rtol 1e-4), and the step did move the weights."""
    assert other.loss == pytest.approx(reference.loss, rel=1e-5)
    moved = 0.0
    for key, value in reference.after.items():
        change = reference.before[key] - value
        moved += float(change.abs().sum())
        torch.testing.assert_close(other.before[key] - other.after[key], change, rtol=1e-4, atol=1e-6, msg=key)
    assert moved > 1.0
