"""The `dft` command line: listing, showing and validating configs, and one-line errors on bad input."""
import json
from pathlib import Path

import pytest
import yaml

from distributed_ft.cli import main

REPO = Path(__file__).resolve().parents[2]


def base_config(tmp_path, **changes):
    config = {
        "model": {"builtin": "tiny"},
        "data": {"train": [{"builtin": "arithmetic", "num_examples": 50}]},
        "strategy": {"name": "full"},
        "training": {"max_steps": 2, "micro_batch_size": 4},
        "eval": {"enabled": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_strategies_lists_every_registered_strategy(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "lora", "selective", "prefix_tuning", "prompt_tuning", "ia3", "adapters", "prompt"):
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 10  # a description follows the name


def test_config_show_prints_resolved_values_with_overrides(tmp_path, capsys):
    path = base_config(tmp_path)
    assert main(["config", "show", str(path), "training.learning_rate=0.123", "strategy.name=lora"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["learning_rate"] == 0.123
    assert shown["strategy"]["name"] == "lora" and shown["strategy"]["r"] == 8  # defaults filled in
    assert shown["training"]["keep_checkpoints"] == 2


def test_config_validate(tmp_path, capsys):
    assert main(["config", "validate", str(base_config(tmp_path))]) == 0
    assert "valid" in capsys.readouterr().out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BAD_INPUTS = {
    "unknown key": (dict(training__max_stepz=3), ["max_stepz", "max_steps"]),
    "wrong type": (dict(training__micro_batch_size="big"), ["training.micro_batch_size", "big"]),
    "unknown strategy": (dict(strategy={"name": "loar"}), ["loar", "lora"]),
    "missing model folder": (dict(model={"name_or_path": "/no/such/model"}), ["/no/such/model", "does not exist"]),
    "missing data file": ("missing_file", ["missing.jsonl"]),
    "missing column": ("missing_column", ["completion", "question"]),
    "empty dataset": ("empty", ["empty"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_no_run_dir(tmp_path, capsys, case):
    changes, expected = BAD_INPUTS[case]
    if changes == "missing_file":
        changes = dict(data={"train": [{"path": str(tmp_path / "missing.jsonl")}]})
    elif changes == "missing_column":
        rows = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1=", "answer": "2"}] * 5)
        changes = dict(data={"train": [{"path": str(rows), "format": "prompt_completion",
                                        "columns": {"prompt": "question"}}]})
    elif changes == "empty":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        changes = dict(data={"train": [{"path": str(empty)}]})
    path = base_config(tmp_path, **changes)
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("error: ") and "\n" not in err, err
    for word in expected:
        assert word in err, (word, err)
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_is_not_clobbered(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    assert main(["train", str(base_config(tmp_path))]) != 0
    assert "resume_from" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_process_entry_flushes_output_and_keeps_the_exit_code(tmp_path, world_size):
    """A launched rank leaves through os._exit; what it printed into a pipe and its exit code must survive that."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WORLD_SIZE": world_size}
    ok = subprocess.run([sys.executable, "-m", "distributed_ft", "strategies"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert {line.split()[0] for line in ok.stdout.splitlines() if line.strip()} >= {"full", "lora", "prompt"}

    bad = base_config(tmp_path, training__max_steps=-1)
    failed = subprocess.run([sys.executable, "-m", "distributed_ft", "config", "validate", str(bad)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert "max_steps" in failed.stderr
