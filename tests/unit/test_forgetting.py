"""Catastrophic forgetting made visible: a retention task drops after single-task fine-tuning on
another task, and drops less when the retention task is mixed back in with a weight. The same holds for
a folder of documents: the report's retention bound catches the drop of a run that reads the handbook
alone, and the run that replays the retention task stays within it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_dft

pytestmark = pytest.mark.slow

REVERSE = {"builtin": "reverse", "num_examples": 1500}


def config(tmp_path: Path, name: str, model: dict, train: list[dict], steps: int, lr: float,
           **extra: dict) -> Path:
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
    for section, values in extra.items():
        data[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def report(path: Path) -> dict:
    proc = run_dft("train", path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((Path(yaml.safe_load(path.read_text())["output"]["dir"]) / "eval" / "report.json").read_text())


def train(path: Path) -> dict:
    return {task: entry["metrics"]["exact_match"] for task, entry in report(path)["tasks"].items()}


@pytest.fixture(scope="module")
def reverse_model(tmp_path_factory) -> dict:
    """The tiny model after it learned the retention task: the start of every run below."""
    tmp_path = tmp_path_factory.mktemp("forgetting")
    base = train(config(tmp_path, "base", {"builtin": "tiny"}, [REVERSE], steps=220, lr=0.003))
    assert base["reverse"]["fine_tuned"] >= 0.5, base  # the retention task is learned first
    return {"name_or_path": str(tmp_path / "base" / "final")}


def test_mixing_reduces_forgetting_of_a_retention_task(tmp_path, reverse_model):
    single = train(config(tmp_path, "single", reverse_model, [{"builtin": "sort", "num_examples": 1500}],
                          steps=150, lr=0.003))
    mixed = train(config(tmp_path, "mixed", reverse_model,
                         [{"builtin": "sort", "num_examples": 1500, "weight": 3}, {**REVERSE, "weight": 1}],
                         steps=150, lr=0.003))
    for run in (single, mixed):  # both learned the new task
        assert run["sort"]["fine_tuned"] > run["sort"]["baseline"] + 0.3, run
    single_drop = single["reverse"]["baseline"] - single["reverse"]["fine_tuned"]
    mixed_drop = mixed["reverse"]["baseline"] - mixed["reverse"]["fine_tuned"]
    assert single_drop > 0.2, single
    assert mixed_drop < single_drop - 0.15, (single, mixed)


def test_the_retention_bound_holds_for_documents_only_with_replay(tmp_path, reverse_model):
    pages = {"builtin": "handbook", "split": "documents", "task": "pages"}
    bound = {"max_retention_drop": 0.15}

    def documents_run(name: str, train_entries: list[dict]) -> dict:
        path = config(tmp_path, name, reverse_model, train_entries, steps=100, lr=0.003, eval=bound)
        rows = report(path)["knowledge"]
        markdown = (tmp_path / name / "eval" / "report.md").read_text()
        return next(r for r in rows if r["measure"] == "retention" and r["task"] == "reverse"), markdown

    alone, alone_md = documents_run("pages_alone", [pages])
    replayed, replayed_md = documents_run("pages_replay", [{**pages, "weight": 1}, {**REVERSE, "weight": 2}])
    assert alone["drop"] > 0.15 and alone["within_bound"] is False, alone
    assert replayed["drop"] <= 0.15 and replayed["within_bound"] is True, replayed
    assert "bound 0.1500: EXCEEDED" in alone_md and "bound 0.1500: within" in replayed_md
