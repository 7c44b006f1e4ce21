"""Catastrophic forgetting made visible: a retention task drops after single-task fine-tuning on
another task, and drops less when the retention task is mixed back in with a weight."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_dft

pytestmark = pytest.mark.slow


def config(tmp_path: Path, name: str, model: dict, train: list[dict], steps: int, lr: float) -> Path:
    data = {
        "model": model,
        "data": {"train": train, "max_length": 48,
                 "validation": [{"builtin": "reverse", "num_examples": 60, "task": "reverse"},
                                {"builtin": "sort", "num_examples": 60, "task": "sort"}]},
        "strategy": {"name": "full"},
        "training": {"max_steps": steps, "micro_batch_size": 32, "learning_rate": lr, "warmup_steps": 10,
                     "seed": 7},
        "logging": {"log_every": 50},
        "eval": {"metrics": {"reverse": ["exact_match"], "sort": ["exact_match"]}, "max_new_tokens": 16,
                 "retention": ["reverse"]},
        "output": {"dir": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def train(path: Path) -> dict:
    proc = run_dft("train", path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((Path(yaml.safe_load(path.read_text())["output"]["dir"]) / "eval" / "report.json").read_text())
    return {task: entry["metrics"]["exact_match"] for task, entry in report["tasks"].items()}


def test_mixing_reduces_forgetting_of_a_retention_task(tmp_path):
    base = train(config(tmp_path, "base", {"builtin": "tiny"},
                        [{"builtin": "reverse", "num_examples": 1500}], steps=220, lr=0.003))
    assert base["reverse"]["fine_tuned"] >= 0.5, base  # the retention task is learned first
    start = {"name_or_path": str(tmp_path / "base" / "final")}
    single = train(config(tmp_path, "single", start, [{"builtin": "sort", "num_examples": 1500}],
                          steps=150, lr=0.003))
    mixed = train(config(tmp_path, "mixed", start,
                         [{"builtin": "sort", "num_examples": 1500, "weight": 3},
                          {"builtin": "reverse", "num_examples": 1500, "weight": 1}], steps=150, lr=0.003))
    for run in (single, mixed):  # both learned the new task
        assert run["sort"]["fine_tuned"] > run["sort"]["baseline"] + 0.3, run
    single_drop = single["reverse"]["baseline"] - single["reverse"]["fine_tuned"]
    mixed_drop = mixed["reverse"]["baseline"] - mixed["reverse"]["fine_tuned"]
    assert single_drop > 0.2, single
    assert mixed_drop < single_drop - 0.15, (single, mixed)
