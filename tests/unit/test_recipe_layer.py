"""The recipe layer's seams: data before model (the head sized and named from the labels), one-line config
errors for every kind of config, and the debug switch behind a one-line error."""
from __future__ import annotations

import json
import random

import pytest
import yaml

from tests.conftest import REPO, run_dft


def _write_labelled(path, n: int, seed: int) -> None:
    # Three named classes told apart by one keyword, so a few steps of training separate them.
    rng = random.Random(seed)
    words = {"red": "warm", "blue": "cold", "green": "fresh"}
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(words))
        filler = " ".join(rng.choice(["a", "b", "c", "d"]) for _ in range(4))
        rows.append({"text": f"{filler} {words[label]} {filler}", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_three_named_labels_without_num_labels_train_and_reach_the_saved_config(tmp_path, one_thread):
    """The data is read before the model: the head gets 3 outputs and the label names without
    `model.num_labels`. Planted bug seen failing: the model loaded first with the default 2 labels."""
    _write_labelled(tmp_path / "colours.jsonl", 240, seed=0)
    config = {
        "model": {"builtin": "tiny", "task": "sequence_classification"},
        "data": {"train": [{"path": str(tmp_path / "colours.jsonl")}], "validation_fraction": 0.1, "max_length": 32},
        "strategy": {"name": "full"},
        "training": {"max_steps": 30, "micro_batch_size": 16, "learning_rate": 1e-3, "lr_scheduler": "constant"},
        "logging": {"log_every": 1, "progress_bar": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = run_dft("train", tmp_path / "run.yaml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    assert saved["label2id"] == {"blue": 0, "green": 1, "red": 2}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # ln 3 ~ 1.1 at the start
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    accuracy = report["tasks"]["colours"]["metrics"]["accuracy"]
    assert accuracy["fine_tuned"] > 0.9 > accuracy["baseline"]


BAD_KEYS = {  # one config of each kind with a misspelt key, and the key the error must name
    "sft": ("configs/quickstart.yaml", "training.max_step=5", "max_step"),
    "ppo": ("configs/ppo/quickstart.yaml", "ppo.clip_rnge=0.1", "clip_rnge"),
    "eval": ("configs/eval/quickstart.yaml", "eval.batch_sise=4", "batch_sise"),
    "grader": ("configs/grader/string_check.yaml", "operaton=eq", "operaton"),
}


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_config_validate_names_file_and_key_in_one_line(kind, capsys):
    from distributed_ft.cli import main

    path, override, key = BAD_KEYS[kind]
    assert main(["config", "validate", path, override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and f"unknown key '{key}'" in err, err
    assert main(["config", "validate", path]) == 0
    assert f"valid {kind} config" in capsys.readouterr().out


def test_a_file_of_another_kind_says_what_it_looks_like(capsys):
    from distributed_ft.cli import main

    assert main(["train", "configs/ppo/quickstart.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'ppo'" in err and "looks like a ppo config" in err


def test_dft_debug_shows_the_traceback_behind_the_one_line_error(tmp_path):
    plain = run_dft("config", "validate", tmp_path / "missing.yaml")
    debug = run_dft("config", "validate", tmp_path / "missing.yaml", env={"DFT_DEBUG": "1"})
    assert plain.returncode == debug.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"error: config file not found: {tmp_path / 'missing.yaml'}"]
    assert "Traceback (most recent call last)" in debug.stderr and "read_yaml" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_every_benchmark_runs_in_ci_in_smoke_mode():
    ci = (REPO / ".ci" / "run").read_text()
    # every runnable script (the shared helper modules have no __main__)
    scripts = sorted(p.name for p in (REPO / "bench").glob("*.py") if '__name__ == "__main__"' in p.read_text())
    assert len(scripts) >= 7
    missing = [s for s in scripts if f"bench/{s}" not in ci]
    assert not missing and "--smoke" in ci, missing
