"""Strategy configs and helpers: error messages, prompt building, parameter counts, bottleneck init, loading."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from distributed_ft.strict import parse_section
from distributed_ft.errors import ConfigError, DataError, ModelError
from distributed_ft.strategies import build_prompt, count_parameters, get_strategy, load_trained, registered
from distributed_ft.strategies.common import find_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls=LlamaForCausalLM, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return cls(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, pad_token_id=0, initializer_range=0.2, **extra))


def ids() -> torch.Tensor:
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def apply(name: str, model, task: str = "causal_lm", **options):
    strategy = get_strategy(name)
    cfg = parse_section(strategy.config_cls, {"name": name, **options}, "run.yaml", ("strategy",))
    return strategy.apply(model, cfg, task)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- registry / config errors


def test_all_strategies_registered():
    assert set(registered()) == {"full", "lora", "selective", "prefix_tuning", "prompt_tuning", "ia3", "adapters",
                                 "prompt"}
    for name, strategy in registered().items():
        assert strategy.config_cls.model_fields["name"].default == name
    assert registered()["prompt"].trains is False


def test_unknown_strategy_lists_registered():
    with pytest.raises(ConfigError) as err:
        get_strategy("lorra")
    msg = one_line(err)
    assert "unknown strategy 'lorra'" in msg and "did you mean 'lora'" in msg
    assert msg.endswith("registered: " + ", ".join(sorted(registered())))


def test_unknown_key_in_strategy_config():
    with pytest.raises(ConfigError) as err:
        parse_section(get_strategy("lora").config_cls, {"name": "lora", "rank": 4}, "run.yaml", ("strategy",))
    assert "unknown key 'rank'" in one_line(err) and "run.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="unknown key 'layer'.*did you mean 'layers'"):
        parse_section(get_strategy("selective").config_cls, {"name": "selective", "layer": [1]}, "run.yaml")


def test_additive_alias_resolves_to_the_method_strategy_and_refuses_foreign_options():
    from distributed_ft.strategies import parse_strategy_section

    for method, name in (("prefix_tuning", "prefix_tuning"), ("prompt_tuning", "prompt_tuning"), ("ia3", "ia3"),
                         ("bottleneck", "adapters")):
        strategy, cfg = parse_strategy_section({"name": "additive", "method": method}, "run.yaml")
        assert strategy.name == cfg.name == name
    with pytest.raises(ConfigError) as err:  # an adapters option on the ia3 strategy
        parse_strategy_section({"name": "additive", "method": "ia3", "adapter_size": 8}, "run.yaml")
    assert "unknown key 'adapter_size' in section 'strategy'" in one_line(err) and "run.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="'additive' needs a 'method'"):
        parse_strategy_section({"name": "additive", "method": "lora"}, "run.yaml")


def test_selective_nothing_selected():
    with pytest.raises(ConfigError) as err:
        apply("selective", tiny())
    assert "selects nothing" in one_line(err)


def test_selective_biases_on_model_without_biases():
    with pytest.raises(ConfigError) as err:
        apply("selective", tiny(), biases=True)
    assert "'biases' selected but LlamaForCausalLM has no bias parameters" in one_line(err)


def test_selective_bad_pattern_and_layer():
    with pytest.raises(ConfigError, match="pattern 'nope' matches no parameter"):
        apply("selective", tiny(), patterns=["nope"])
    with pytest.raises(ConfigError, match="layer index 2 out of range"):
        apply("selective", tiny(), layers=[2])
    with pytest.raises(ConfigError, match="top_k=3 but the model has only 2 blocks"):
        apply("selective", tiny(), top_k=3)
    with pytest.raises(ConfigError, match="invalid regex"):
        parse_section(get_strategy("selective").config_cls, {"name": "selective", "patterns": ["("]}, "run.yaml")


def test_selective_negative_and_bottom_top_k_choose_blocks():
    model = apply("selective", tiny(), layers=[-2], top_k=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("model.layers.")}
    model = apply("selective", tiny(), bottom_k=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")}


def test_prefix_tuning_for_classification_is_refused():
    with pytest.raises(ConfigError, match="prefix_tuning' is not supported for task 'sequence_classification'"):
        apply("prefix_tuning", tiny(LlamaForSequenceClassification, num_labels=2), "sequence_classification")


def test_unknown_task_refused():
    with pytest.raises(ConfigError, match="unknown model task 'seq2seq'"):
        apply("full", tiny(), "seq2seq")


def test_ia3_defaults_for_llama():
    model = apply("ia3", tiny())
    cfg = model.peft_config["default"]
    assert set(cfg.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert set(cfg.feedforward_modules) == {"down_proj"}


# --------------------------------------------------------------------------- counts and blocks


def test_count_parameters_direct_and_tied():
    model = tiny(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {p.data_ptr(): p.numel() for p in model.state_dict().values()}
    assert count_parameters(model) == (sum(unique.values()), sum(unique.values()))
    model = apply("lora", tiny(), r=2, target_modules=["q_proj"])
    assert count_parameters(model) == model.get_nb_trainable_parameters()


def test_count_parameters_uses_zero3_size():
    """Under ZeRO-3 each rank holds an empty shard; ds_numel carries the real size."""
    layer = nn.Linear(4, 3)
    layer.weight.data = torch.empty(0)
    layer.weight.ds_numel = 12
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == (12, 15)


def test_find_blocks_picks_decoder_layers():
    model = tiny()
    name, blocks = find_blocks(model)
    assert name == "model.layers" and blocks is model.model.layers
    with pytest.raises(ConfigError, match="cannot find the transformer block list"):
        find_blocks(nn.Linear(2, 2))


# --------------------------------------------------------------------------- bottleneck


def test_bottleneck_at_init_equals_base():
    base = tiny()
    model = apply("adapters", copy.deepcopy(base), adapter_size=4, nonlinearity="gelu")
    base.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, base(input_ids=ids()).logits)
    # base parameter names unchanged, adapters live inside each block
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if "bottleneck_adapters" not in n] == [n for n, _ in base.named_parameters()]
    assert "model.layers.1.bottleneck_adapters.mlp.up.weight" in names


def test_bottleneck_changes_output_once_up_projection_is_nonzero():
    base = tiny()
    model = apply("adapters", copy.deepcopy(base), adapter_size=4, adapter_locations=["mlp"])
    with torch.no_grad():
        model.model.layers[0].bottleneck_adapters["mlp"].up.weight.fill_(0.1)
        assert not torch.allclose(model(input_ids=ids()).logits, base(input_ids=ids()).logits)


def test_bottleneck_missing_submodule_names_option():
    with pytest.raises(ConfigError, match="set 'mlp_module'"):
        apply("adapters", tiny(), mlp_module="ffn_missing")


# --------------------------------------------------------------------------- loading


def test_load_trained_plain_folder_detects_task(tmp_path):
    model = tiny(LlamaForSequenceClassification, num_labels=3).eval()
    model.save_pretrained(tmp_path / "cls")
    loaded = load_trained(str(tmp_path / "cls"))
    assert type(loaded).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_load_trained_plain_peft_folder(tmp_path):
    """An adapter folder written by PEFT alone (no extra metadata) loads from adapter_config.json."""
    base = tiny()
    base.save_pretrained(tmp_path / "base")
    model = apply("lora", LlamaForCausalLM.from_pretrained(tmp_path / "base"), r=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(6))
    model.save_pretrained(tmp_path / "adapter")
    assert not os.path.exists(tmp_path / "adapter" / "base_model.json")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
        assert not torch.allclose(expected, base.eval()(input_ids=ids()).logits)
        torch.testing.assert_close(load_trained(tmp_path / "adapter")(input_ids=ids()).logits, expected,
                                   atol=1e-5, rtol=0)


def test_load_trained_errors(tmp_path):
    with pytest.raises(ModelError, match="trained model folder not found"):
        load_trained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        load_trained(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- prompt


def prompt_cfg(**options):
    return parse_section(get_strategy("prompt").config_cls, {"name": "prompt", **options}, "run.yaml")


def test_build_prompt_zero_and_few_shot():
    shots = [("2+2", "4"), ("3+5", "8"), ("1+1", "2")]
    assert build_prompt(prompt_cfg(), "7+1", shots) == "7+1"
    cfg = prompt_cfg(template="Q: {input}\nA:", instruction="Add the numbers.", few_shot=2, shot_separator="\n---\n")
    assert build_prompt(cfg, "7+1", shots) == "\n---\n".join(
        ["Add the numbers.", "Q: 2+2\nA: 4", "Q: 3+5\nA: 8", "Q: 7+1\nA:"])
    # braces in the data are text, not template fields
    assert build_prompt(prompt_cfg(template="[{input}]"), "{x}", []) == "[{x}]"


def test_build_prompt_errors():
    with pytest.raises(DataError, match="few_shot=2 but only 1 example"):
        build_prompt(prompt_cfg(few_shot=2), "q", [("a", "b")])
    with pytest.raises(ConfigError, match="template must contain the field {input}"):
        prompt_cfg(template="Question: {question}")
    with pytest.raises(ConfigError, match="template must contain"):
        prompt_cfg(template="no field")


@pytest.mark.parametrize("name,options", [("full", {}), ("selective", {"layers": [0]}), ("lora", {"r": 2}),
                                          ("ia3", {}),
                                          ("adapters", {"adapter_size": 4})])
def test_save_writes_the_given_state_dict(tmp_path, name, options):
    """Under ZeRO-3 the engine passes the gathered state dict; the save hook must write it, not the live model."""
    tiny().save_pretrained(tmp_path / "base")
    model = apply(name, LlamaForCausalLM.from_pretrained(tmp_path / "base"), **options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    gathered = {k: (v + 0.25 if k in trainable else v.clone()) for k, v in model.state_dict().items()}
    get_strategy(name).save(model, str(tmp_path / "out"), gathered)
    model.load_state_dict(gathered)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
        torch.testing.assert_close(load_trained(tmp_path / "out")(input_ids=ids()).logits, expected,
                                   atol=1e-5, rtol=0)


def test_prompt_tuning_text_init(tmp_path):
    """The soft prompt starts as the embeddings of the init text's tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path / "tok")
    base = tiny()
    model = apply("prompt_tuning", base, num_virtual_tokens=3,
                  prompt_tuning_init_text="w5 w9 w7", tokenizer=str(tmp_path / "tok"))
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, base.model.embed_tokens.weight[[5, 9, 7]])
    with pytest.raises(ConfigError, match="needs 'tokenizer'"):
        apply("prompt_tuning", tiny(), prompt_tuning_init_text="w1")
