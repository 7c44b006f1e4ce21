"""The PPO run config: sections, one-line errors, topology checks, and the prompt stream."""
from __future__ import annotations

from pathlib import Path

import pytest

from distributed_ft.config import load_config
from distributed_ft.errors import ConfigError
from distributed_ft.rl.config import check_topology
from distributed_ft.rl.prompts import PromptStream, build_prompts

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "ppo").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if not p.name.startswith("grader_")]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_name_their_command(path, tmp_path, run_outputs_stand_in):
    """Each shipped PPO config: its first line is the command that runs this very file (with a launch config
    that exists), the grader spec it names exists and loads, and every value the file sets reaches the loaded
    config, each section changing at least one default. Planted bugs seen failing: the loader dropping the
    `ppo` section (defaults used instead); a first line naming another file; grader.config pointing at a
    missing spec (or at a reward model's spec no command on the first line writes); a launch config that does
    not exist."""
    check_shipped_config(path, path.read_text(), tmp_path)


def check_shipped_config(path: Path, text: str, tmp_path: Path) -> None:
    import shlex

    import yaml

    from distributed_ft.grader.spec import load_grader_spec
    from distributed_ft.strict import config_to_dict

    config = load_ppo(path)
    # 1. the first line is the command that runs this file
    first = text.splitlines()[0]
    assert first.startswith("# "), first
    words = shlex.split(first[2:])
    assert ("dft" in words or "distributed_ft" in words) and "ppo" in words, first
    assert words[words.index("ppo") + 1] == f"configs/ppo/{path.name}", first
    if "--config_file" in words:
        assert (REPO / words[words.index("--config_file") + 1]).is_file(), first
    # 2. the grader it starts exists and loads, or is the spec a reward-model run named first writes
    if config.grader.config is not None and config.grader.config.startswith("runs/"):
        rm_run = load_config(REPO / words[words.index("rm") + 1], kind="rm")
        assert str(Path(rm_run.output.dir) / "grader.yaml") == config.grader.config, first
    elif config.grader.config is not None:
        spec = REPO / config.grader.config
        assert spec.is_file(), spec
        assert load_grader_spec(spec).type
    else:
        assert config.grader.urls
    # 3. what the file sets is what loaded, and each section it sets differs from the defaults somewhere
    raw = yaml.safe_load(text)
    loaded = config_to_dict(config)
    minimal = {"model": raw["model"], "data": raw["data"], "grader": raw["grader"],
               "strategy": {"name": raw["strategy"]["name"]}}
    (tmp_path / "minimal.yaml").write_text(yaml.safe_dump(minimal))
    defaults = config_to_dict(load_ppo(tmp_path / "minimal.yaml"))
    for section, values in raw.items():
        leaves = list(_leaves(values))
        for keys, value in leaves:
            assert _at(loaded[section], keys) == value, (section, keys)
        if section not in ("model", "data", "grader") and keys_set(values) != {"name"}:  # not copied above
            assert any(_at(defaults[section], keys) != value for keys, value in leaves
                       if _has(defaults[section], keys)), f"section '{section}' only repeats defaults"


def keys_set(values) -> set:
    return set(values) if isinstance(values, dict) else set()


def _leaves(value, keys=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, keys + (k,))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            yield from _leaves(v, keys + (i,))
    else:
        yield keys, value


def _at(tree, keys):
    for k in keys:
        tree = tree[k]
    return list(tree) if isinstance(tree, tuple) else tree


def _has(tree, keys) -> bool:
    try:
        _at(tree, keys)
        return True
    except (KeyError, IndexError, TypeError):
        return False


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("grader_")], ids=lambda p: p.name)
def test_shipped_grader_specs_validate(path):
    from distributed_ft.grader.spec import load_grader_spec

    assert load_grader_spec(path).type in ("python", "string_check")


def load_ppo(path, overrides=None):
    return load_config(path, overrides, kind="ppo")


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "ppo.yaml"
    path.write_text(text)
    return path


BASE = """model: {builtin: tiny}
data: {train: [{builtin: copy, num_examples: 50}], validation_fraction: 0.1}
strategy: {name: lora, r: 4}
grader: {urls: ["http://127.0.0.1:9"]}
"""


def test_unknown_ppo_key_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'clip_rnge' in section 'ppo'.*clip_range") as err:
        load_ppo(_write(tmp_path, BASE + "ppo: {clip_rnge: 0.1}\n"))
    assert "\n" not in str(err.value)


def test_grader_needs_exactly_one_source(tmp_path):
    text = BASE.replace('grader: {urls: ["http://127.0.0.1:9"]}', "grader: {timeout_s: 3}")
    with pytest.raises(ConfigError, match="exactly one of grader.config and grader.urls"):
        load_ppo(_write(tmp_path, text))
    with pytest.raises(ConfigError, match="missing section 'grader'"):
        load_ppo(_write(tmp_path, BASE.replace('grader: {urls: ["http://127.0.0.1:9"]}\n', "")))


def test_overrides_and_strategy_through_registry(tmp_path):
    config = load_ppo(_write(tmp_path, BASE), ["ppo.kl.adaptive=true", "ppo.critic.mode=separate"])
    assert config.ppo.kl.adaptive and config.ppo.critic.mode == "separate"
    assert type(config.strategy).__name__ == "LoraStrategyConfig" and config.strategy.r == 4
    with pytest.raises(ConfigError, match="strategy.r"):
        load_ppo(_write(tmp_path, BASE), ["strategy.r=0"])


def test_minibatch_must_divide_samples(tmp_path):
    with pytest.raises(ConfigError, match="minibatch_size 5 does not divide the 32 samples"):
        load_ppo(_write(tmp_path, BASE + "ppo: {rollout_batch_size: 16, num_generations: 2, "
                                                  "minibatch_size: 5}\n"))


def test_topology(tmp_path):
    config = load_ppo(_write(tmp_path, BASE + "ppo: {rollout_batch_size: 8, num_generations: 2}\n"
                                               "training: {micro_batch_size: 4, gradient_accumulation_steps: 2}\n"))
    assert check_topology(config, 1) == (8, 2)
    assert check_topology(config, 2) == (16, 1)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        check_topology(config, 3)
    with pytest.raises(ConfigError, match="does not divide"):
        check_topology(config, 4)  # a minibatch of 32 > the 16 samples per step


def test_prompts_carry_reference_and_hold_out(tmp_path):
    config = load_ppo(_write(tmp_path, BASE))
    prompts = build_prompts(config.data, seed=0)
    assert len(prompts.train) == 45 and len(prompts.held_out) == 5
    first = prompts.train[0]
    assert first["prompt"].startswith("copy:") and first["item"]["reference"] == first["item"]["completion"].strip()
    assert not {p["prompt"] for p in prompts.held_out} & {p["prompt"] for p in prompts.train}


def test_prompts_from_file_with_column_mapping(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n')
    text = BASE.replace("{train: [{builtin: copy, num_examples: 50}], validation_fraction: 0.1}",
                        f"{{train: [{{path: '{data}', columns: {{prompt: question}}}}]}}")
    prompts = build_prompts(load_ppo(_write(tmp_path, text)).data, seed=0)
    assert [p["prompt"] for p in prompts.train] == ["1+1=", "2+2="]
    assert prompts.train[1]["item"]["answer"] == "4"


def test_prompt_stream_resumes_at_its_position():
    a = PromptStream(5, seed=3)
    first = a.take(7)
    assert sorted(first[:5]) == list(range(5))          # one full pass before any repeat
    b = PromptStream(5, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.take(6) == b.take(6)


def test_ppo_subcommand_parses_config_and_overrides(monkeypatch):
    from distributed_ft import cli
    from distributed_ft.recipes import ppo

    seen = {}
    monkeypatch.setattr(ppo, "run", lambda config, overrides: seen.update(config=config, overrides=overrides) or 0)
    assert cli.main(["ppo", "configs/ppo/quickstart.yaml", "ppo.kl.coef=0.1"]) == 0
    assert seen == {"config": "configs/ppo/quickstart.yaml", "overrides": ["ppo.kl.coef=0.1"]}
