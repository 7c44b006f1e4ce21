"""Preference pairs: TRL's text and chat forms, column mapping, the built-in pair tasks, and one-line errors
naming file, row and field."""
from __future__ import annotations

import json
import random

import pytest

from distributed_ft.config import load_config
from distributed_ft.errors import ConfigError
from distributed_ft.preference.config import PairsConfig, PairSource
from distributed_ft.preference.pairs import PairDataError, build_pairs, builtin_pairs, corrupt, load_pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_text_pairs_with_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "2+2=", "good": "4", "bad": "5", "m": 1.5},
                                              {"q": "1+1=", "good": "2", "bad": "3", "m": 0}])
    source = PairSource(path=path, columns={"prompt": "q", "chosen": "good", "rejected": "bad", "margin": "m"})
    assert load_pairs(source, 0) == [{"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.5},
                                     {"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.0}]


def test_chat_pairs_take_the_common_prefix_as_prompt(tmp_path):
    user = {"role": "user", "content": "hi"}
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": [user, {"role": "assistant", "content": "hello"}],
                                               "rejected": [user, {"role": "assistant", "content": "go away"}]}])
    [pair] = load_pairs(PairSource(path=path), 0)
    assert pair == {"prompt": "user: hi\nassistant:", "chosen": " hello\n", "rejected": " go away\n", "rendered": True}
    render = lambda messages, gen: "|".join(m["content"] for m in messages) + ("|>" if gen else "")  # noqa: E731
    [pair] = load_pairs(PairSource(path=path), 0, render)
    assert pair == {"prompt": "hi|>", "chosen": "hello", "rejected": "go away", "rendered": True}  # not a prefix


def test_a_chat_pair_reaches_the_reward_model_as_the_served_grader_renders_it(tmp_path):
    """The chat rendering is applied once: a single-turn chat pair's tokens are those of reward_text (the
    rendering the served grader applies to prompt and output), not the template wrapped around itself."""
    from transformers import AutoTokenizer

    from distributed_ft.grader.hf_models import render_messages
    from distributed_ft.models.builtin import builtin_model_path
    from distributed_ft.preference.batches import tokenize_rm_pair
    from distributed_ft.preference.render import reward_text

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path())
    user = {"role": "user", "content": "sort: 312 ="}
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": [user, {"role": "assistant", "content": "123"}],
                                               "rejected": [user, {"role": "assistant", "content": "132"}]}])
    [pair] = load_pairs(PairSource(path=path), 0, lambda m, gen: render_messages(tokenizer, m, gen))
    render = lambda prompt, completion: reward_text(tokenizer, prompt, completion)  # noqa: E731
    tokens = tokenize_rm_pair(tokenizer, pair, 64, render)
    for side, answer in (("chosen", "123"), ("rejected", "132")):
        assert tokens[side] == tokenizer(reward_text(tokenizer, user["content"], answer))["input_ids"]


def test_chat_pairs_with_an_explicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "q"}],
                                               "chosen": [{"role": "assistant", "content": "a"}],
                                               "rejected": [{"role": "assistant", "content": "b"}]}])
    [pair] = load_pairs(PairSource(path=path), 0)
    assert pair == {"prompt": "user: q\nassistant:", "chosen": " a\n", "rejected": " b\n", "rendered": True}


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "row 2: field 'rejected' is empty"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "row 2: field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 2: fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "row 2: field 'margin' must be a number"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "row 2: field 'chosen' must be text"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "x"}]},
     "row 2: field 'chosen' and 'rejected' are identical"),
])
def test_bad_pairs_get_one_line_naming_file_row_and_field(tmp_path, row, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    if isinstance(row.get("chosen"), list):
        good = {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}]}
        message = "row 2: fields"
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(PairDataError) as err:
        load_pairs(PairSource(path=path), 0)
    assert str(err.value).startswith(f"{path} {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_column_names_the_file_and_the_mapping(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "good": "a", "rejected": "b"}])
    with pytest.raises(PairDataError, match=r"p.jsonl: missing column 'chosen' .*columns.chosen.*found good"):
        load_pairs(PairSource(path=path), 0)


def test_pair_source_config_is_strict():
    with pytest.raises(Exception, match="not a pair column"):
        PairSource(path="x.jsonl", columns={"answer": "a"})
    with pytest.raises(Exception, match="exactly one"):
        PairSource()
    with pytest.raises(Exception, match="extra"):
        PairSource(builtin="sort", colour="red")


@pytest.mark.parametrize("task", ["arithmetic", "reverse", "sort", "copy", "parity", "count"])
def test_builtin_pairs_are_correct_against_corrupted(task):
    pairs = builtin_pairs(task, 200, seed=3)
    assert pairs == builtin_pairs(task, 200, seed=3)            # deterministic
    assert len({p["prompt"] for p in pairs}) == 200             # distinct prompts
    for p in pairs:
        assert p["chosen"] != p["rejected"] and p["rejected"].strip()
        assert len(p["chosen"]) == len(p["rejected"])            # one symbol changed (or two swapped)
    if task == "sort":
        for p in pairs:
            digits = p["rejected"].strip()
            if len(set(p["chosen"].strip())) > 1:  # else no swap changes it: a digit is replaced
                assert sorted(digits) == sorted(p["chosen"].strip()) and list(digits) != sorted(digits)
    if task == "arithmetic":
        assert all(str(eval(p["prompt"][:-1])) == p["chosen"] for p in pairs)  # noqa: S307


def test_corrupt_keeps_the_kind_of_symbol():
    rng = random.Random(0)
    for _ in range(50):
        out = corrupt(" a b c", rng)
        assert out != " a b c" and set(out) <= set(" abcdefgh")
        assert corrupt("123", rng).isdigit()


def test_build_pairs_holds_out_without_overlap():
    config = PairsConfig(train=[{"builtin": "copy", "num_examples": 300}], validation_fraction=0.2, eval_pairs=50)
    train, held = build_pairs(config, seed=0)
    assert len(train) == 240 and len(held) == 50
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}


def test_dpo_and_rm_configs_are_their_kinds(tmp_path):
    from distributed_ft.config import load_any

    assert load_any("configs/dpo/quickstart.yaml")[0].name == "dpo"
    assert load_any("configs/rm/quickstart.yaml")[0].name == "rm"
    with pytest.raises(ConfigError, match="dpo.loss"):
        load_config("configs/dpo/quickstart.yaml", ["dpo.loss=kto"], kind="dpo")
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid loss only"):
        load_config("configs/dpo/quickstart.yaml", ["dpo.loss=ipo", "dpo.label_smoothing=0.1"], kind="dpo")
    with pytest.raises(ConfigError, match="num_labels must be 1"):
        load_config("configs/rm/quickstart.yaml", ["model.task=sequence_classification", "model.num_labels=3"],
                    kind="rm")
    with pytest.raises(ConfigError, match="rm.objective pointwise trains on a 'samples' section, which is missing"):
        load_config("configs/rm/quickstart.yaml", ["rm.objective=pointwise"], kind="rm")
    with pytest.raises(ConfigError, match="rm.objective pairwise reads 'pairs', not 'samples'"):
        load_config("configs/rm/quickstart.yaml", ["samples={train: [{builtin: sort}]}"], kind="rm")
    assert load_config("configs/rm/pointwise.yaml", kind="rm").samples.train[0].builtin == "sort"
    with pytest.raises(ConfigError, match="strategy 'prompt' trains nothing"):
        load_config("configs/dpo/quickstart.yaml", ["strategy={name: prompt}"], kind="dpo")
