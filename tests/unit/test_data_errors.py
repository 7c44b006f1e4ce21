"""Bad data input becomes a one-line DataError/ConfigError that names the problem."""
from __future__ import annotations

import json

import pytest

from distributed_ft.strict import parse_section
from distributed_ft.data import build_data
from distributed_ft.data.config import DataConfig, DatasetSpec
from distributed_ft.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    # `datasets` writes Arrow caches of loaded files; keep them out of the user's home.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def build(train, task_type="causal_lm", **kw):
    cfg = parse_section(DataConfig, {"train": train, **kw}, "run.yaml", prefix=("data",))
    # Every failure below happens while reading or checking columns, before any tokenization.
    return build_data(cfg, tokenizer=None, task_type=task_type, seed=0)


def raised(exc_type, fn, *args, **kw) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_file_names_path_and_task(tmp_path):
    missing = tmp_path / "nope.jsonl"
    msg = raised(DataError, build, [{"path": str(missing), "task": "qa"}])
    assert str(missing) in msg and "task 'qa'" in msg and "not found" in msg


def test_missing_column_names_column_file_and_existing_columns(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    msg = raised(DataError, build, [{"path": str(path), "columns": {"prompt": "query", "completion": "answer"}}])
    assert "'query'" in msg and str(path) in msg and "question, answer" in msg
    msg = raised(DataError, build, [{"path": str(path), "format": "prompt_completion"}])
    assert "needs column 'prompt'" in msg and "question, answer" in msg
    msg = raised(DataError, build, [{"path": str(path)}])
    assert "cannot detect" in msg and "question, answer" in msg


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    msg = raised(DataError, build, [{"path": str(empty)}])
    assert str(empty) in msg and "empty" in msg
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,completion\n")
    msg = raised(DataError, build, [{"path": str(header_only)}])
    assert str(header_only) in msg and "0 rows" in msg


def test_unsupported_extension_and_unreadable_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    msg = raised(DataError, build, [{"path": str(path)}])
    assert "'.txt'" in msg and ".jsonl" in msg and str(path) in msg
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", \n')
    msg = raised(DataError, build, [{"path": str(broken)}])
    assert str(broken) in msg and "cannot read" in msg


def test_spec_with_two_sources_or_none():
    msg = raised(ConfigError, parse_section, DataConfig, {"train": [{"path": "a.jsonl", "builtin": "copy"}]},
                 "run.yaml", ("data",))
    assert "builtin" in msg and "path" in msg and "data.train.0" in msg
    msg = raised(ConfigError, parse_section, DatasetSpec, {"weight": 2.0}, "run.yaml")
    assert "exactly one of builtin, path and hub" in msg


def test_unknown_key_in_dataset_spec_suggests_the_right_one():
    msg = raised(ConfigError, parse_section, DataConfig, {"train": [{"builtin": "copy", "wieght": 2}]},
                 "run.yaml", ("data",))
    assert "unknown key 'wieght'" in msg and "'weight'" in msg and "run.yaml" in msg


@pytest.mark.parametrize("data, needle", [
    ({"train": []}, "train"),
    ({"train": [{"builtin": "copy", "weight": 0}]}, "weight"),
    ({"train": [{"builtin": "copy"}, {"builtin": "copy"}]}, "task name 'copy' is used by two"),
    ({"train": [{"builtin": "copy"}], "validation": [{"builtin": "copy"}], "validation_fraction": 0.1},
     "validation_fraction cannot be combined"),
    ({"train": [{"builtin": "copy"}], "validation_fraction": 0.5}, "validation_fraction"),
    ({"train": [{"builtin": "copy", "columns": {"prompt": "q"}}]}, "builtin 'copy' takes no"),
    ({"train": [{"path": "a.jsonl", "columns": {"query": "q"}}]}, "columns key 'query'"),
    ({"train": [{"builtin": "copy"}], "overlong": "wrap"}, "overlong"),
])
def test_invalid_data_sections(data, needle):
    assert needle in raised(ConfigError, parse_section, DataConfig, data, "run.yaml", ("data",))


def test_wrong_kind_for_the_model(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    msg = raised(DataError, build, [{"path": str(path), "format": "prompt_completion"}],
                 task_type="sequence_classification")
    assert "generation rows" in msg and "classification" in msg
    assert "task 'qa'" in raised(DataError, build, [{"path": str(path)}], task_type="regression")
    bad = tmp_path / "scores.jsonl"
    bad.write_text(json.dumps({"text": "a", "value": "high"}) + "\n")
    msg = raised(DataError, build, [{"path": str(bad)}], task_type="regression")
    assert "'high'" in msg and "not a number" in msg


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/thing' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = raised(DataError, build, [{"hub": "someone/thing", "split": "test"}])
    assert "task 'thing'" in msg and "someone/thing" in msg and "split 'test'" in msg and "Couldn't reach" in msg
