"""Config loading: strict keys with suggestions, types, cross-field rules, overrides, shipped configs."""
from pathlib import Path

import pytest
import yaml

from distributed_ft.config import load_config
from distributed_ft.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "model": {"builtin": "tiny"},
    "data": {"train": [{"builtin": "arithmetic", "weight": 3}, {"builtin": "reverse", "weight": 1}]},
    "strategy": {"name": "full"},
    "training": {"max_steps": 5},
}


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path, data, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_config_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.strategy.name == "full"
    assert config.training.max_steps == 5
    assert [s.task_name for s in config.data.train] == ["arithmetic", "reverse"]


def test_unknown_key_names_key_section_and_suggestion(tmp_path):
    data = {**BASE, "training": {"max_steps": 5, "learning_rat": 0.1}}
    message = error_of(tmp_path, data)
    assert "learning_rat" in message and "'training'" in message and "learning_rate" in message


def test_unknown_nested_key_in_data_list(tmp_path):
    data = {**BASE, "data": {"train": [{"builtin": "arithmetic", "wieght": 2}]}}
    message = error_of(tmp_path, data)
    assert "wieght" in message and "data.train.0" in message and "weight" in message


def test_unknown_top_level_section(tmp_path):
    message = error_of(tmp_path, {**BASE, "trainig": {}})
    assert "trainig" in message and "training" in message


def test_unknown_strategy_option_names_strategy_section(tmp_path):
    message = error_of(tmp_path, {**BASE, "strategy": {"name": "lora", "rnak": 4}})
    assert "rnak" in message and "strategy" in message


def test_wrong_type_is_reported_with_field(tmp_path):
    message = error_of(tmp_path, {**BASE, "training": {"max_steps": "many"}})
    assert "training.max_steps" in message and "'many'" in message


def test_unknown_strategy_lists_registered(tmp_path):
    message = error_of(tmp_path, {**BASE, "strategy": {"name": "lorax"}})
    assert "lorax" in message and "lora" in message and "full" in message and "selective" in message


def test_prompt_strategy_with_training_steps_is_refused(tmp_path):
    message = error_of(tmp_path, {**BASE, "strategy": {"name": "prompt"}, "training": {"max_steps": 10}})
    assert "prompt" in message and "max_steps" in message



@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_packing_with_virtual_token_methods_is_refused(tmp_path, method):
    data = {**BASE, "data": {**BASE["data"], "packing": True}, "strategy": {"name": "additive", "method": method}}
    message = error_of(tmp_path, data)
    assert "data.packing" in message and method in message
    ia3 = {**data, "strategy": {"name": "additive", "method": "ia3"}}
    assert load_config(write(tmp_path, ia3, "ia3.yaml")).data.packing  # methods that keep positions may pack

def test_model_needs_exactly_one_source(tmp_path):
    message = error_of(tmp_path, {**BASE, "model": {"builtin": "tiny", "name_or_path": "gpt2"}})
    assert "name_or_path" in message and "builtin" in message


def test_unknown_metric_is_a_load_time_error(tmp_path):
    data = {**BASE, "eval": {"metrics": {"arithmetic": ["exact_macth"]}}}
    assert "exact_macth" in error_of(tmp_path, data)


def test_metric_not_fitting_task_type_is_refused(tmp_path):
    data = {**BASE, "eval": {"metrics": {"arithmetic": ["mse"]}}}
    message = error_of(tmp_path, data)
    assert "mse" in message and "arithmetic" in message


def test_overrides_set_nested_values_and_list_items(tmp_path):
    config = load_config(write(tmp_path, BASE),
                         ["training.learning_rate=0.05", "data.train.1.weight=2", "strategy.name=lora",
                          "strategy.r=4"])
    assert config.training.learning_rate == 0.05
    assert config.data.train[1].weight == 2
    assert config.strategy.name == "lora" and config.strategy.r == 4


def test_bad_override_is_an_error(tmp_path):
    assert "key.sub=value" in error_of(tmp_path, BASE, ["training.max_steps"])
    assert "index" in error_of(tmp_path, BASE, ["data.train.7.weight=1"])
    assert "trainng" in error_of(tmp_path, BASE, ["trainng.max_steps=3"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_shipped_config_loads_as_its_kind(run_outputs_stand_in):
    """Every file under configs/ validates as the kind its sections say (count asserted per kind), and
    `dft config validate` agrees."""
    from distributed_ft.cli import main
    from distributed_ft.config import load_any

    configs = sorted((REPO / "configs").rglob("*.yaml"))
    counts = {}
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("dft " in first or "accelerate launch" in first), path
        kind, _ = load_any(path)
        counts[kind.name] = counts.get(kind.name, 0) + 1
        assert main(["config", "validate", str(path)]) == 0, path
    assert counts["sft"] >= 14 and counts["grader"] >= 7 and counts["ppo"] >= 4 and counts["grpo"] >= 4 and counts["eval"] >= 1 \
        and counts["dpo"] >= 1 and counts["rm"] >= 1, counts
    assert sum(counts.values()) == len(configs) >= 30
