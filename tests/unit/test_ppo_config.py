"""The PPO run config: sections, one-line errors, topology checks, and the prompt stream."""
from __future__ import annotations

from pathlib import Path

import pytest

from distributed_ft.errors import ConfigError
from distributed_ft.rl.config import check_topology, load_ppo_config
from distributed_ft.rl.prompts import PromptStream, build_prompts

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "ppo").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if not p.name.startswith("grader_")]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_name_their_command(path):
    config = load_ppo_config(path)
    assert config.ppo.rollout_batch_size >= 1 and config.grader.config or config.grader.urls
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "ppo" in first and path.name in first


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("grader_")], ids=lambda p: p.name)
def test_shipped_grader_specs_validate(path):
    from distributed_ft.grader.spec import load_grader_spec

    assert load_grader_spec(path).type in ("python", "string_check")


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
        load_ppo_config(_write(tmp_path, BASE + "ppo: {clip_rnge: 0.1}\n"))
    assert "\n" not in str(err.value)


def test_grader_needs_exactly_one_source(tmp_path):
    text = BASE.replace('grader: {urls: ["http://127.0.0.1:9"]}', "grader: {timeout_s: 3}")
    with pytest.raises(ConfigError, match="exactly one of grader.config and grader.urls"):
        load_ppo_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match="missing section 'grader'"):
        load_ppo_config(_write(tmp_path, BASE.replace('grader: {urls: ["http://127.0.0.1:9"]}\n', "")))


def test_overrides_and_strategy_through_registry(tmp_path):
    config = load_ppo_config(_write(tmp_path, BASE), ["ppo.kl.adaptive=true", "ppo.critic.mode=separate"])
    assert config.ppo.kl.adaptive and config.ppo.critic.mode == "separate"
    assert type(config.strategy).__name__ == "LoraStrategyConfig" and config.strategy.r == 4
    with pytest.raises(ConfigError, match="strategy.r"):
        load_ppo_config(_write(tmp_path, BASE), ["strategy.r=0"])


def test_minibatch_must_divide_samples(tmp_path):
    with pytest.raises(ConfigError, match="minibatch_size 5 does not divide the 32 samples"):
        load_ppo_config(_write(tmp_path, BASE + "ppo: {rollout_batch_size: 16, num_generations: 2, "
                                                  "minibatch_size: 5}\n"))


def test_topology(tmp_path):
    config = load_ppo_config(_write(tmp_path, BASE + "ppo: {rollout_batch_size: 8, num_generations: 2}\n"
                                               "training: {micro_batch_size: 4, gradient_accumulation_steps: 2}\n"))
    assert check_topology(config, 1) == (8, 2)
    assert check_topology(config, 2) == (16, 1)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        check_topology(config, 3)
    with pytest.raises(ConfigError, match="does not divide"):
        check_topology(config, 4)  # a minibatch of 32 > the 16 samples per step


def test_prompts_carry_reference_and_hold_out(tmp_path):
    config = load_ppo_config(_write(tmp_path, BASE))
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
    prompts = build_prompts(load_ppo_config(_write(tmp_path, text)).data, seed=0)
    assert [p["prompt"] for p in prompts.train] == ["1+1=", "2+2="]
    assert prompts.train[1]["item"]["answer"] == "4"


def test_prompt_stream_resumes_at_its_position():
    a = PromptStream(5, seed=3)
    first = a.take(7)
    assert sorted(first[:5]) == list(range(5))          # one full pass before any repeat
    b = PromptStream(5, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.take(6) == b.take(6)


def test_ppo_subcommand_parses_config_and_overrides():
    import argparse

    from distributed_ft.ppo import _cmd_ppo, add_subparser

    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ppo", "configs/ppo/quickstart.yaml", "ppo.kl.coef=0.1"])
    assert args.func is _cmd_ppo and args.config == "configs/ppo/quickstart.yaml"
    assert args.overrides == ["ppo.kl.coef=0.1"]
