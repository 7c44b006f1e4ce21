"""QLoRA: a 4-bit NF4 base (bitsandbytes) under LoRA and DoRA, on CPU: the base really is 4-bit and frozen,
training lowers the loss, the saved adapter reloads onto a freshly quantized base to the same logits (and merges
into the plain weights those 4-bit values stand for), and bad combinations are one-line errors."""
from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

from distributed_ft.errors import ConfigError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason='bitsandbytes is not installed (pip install -e ".[qlora]")')

QLORA = "configs/qlora.yaml"
# fp32 compute, so the trained model and the reloaded one compute the same logits whatever the CPU's bf16
SHORT = ["training.max_steps=12", "training.warmup_steps=0", "training.micro_batch_size=16", "eval.enabled=false",
         "logging.progress_bar=false", "logging.log_every=1", "data.train.0.num_examples=300",
         "data.train.1.num_examples=300", "training.mixed_precision=no"]
PROBE = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]])


def quantized_lora(**lora):
    from distributed_ft.models import load_model, load_tokenizer_for
    from distributed_ft.models.config import ModelConfig
    from distributed_ft.strategies import get_strategy

    model_cfg = ModelConfig(builtin="tiny", load_in_4bit=True)
    tokenizer, path, added = load_tokenizer_for(model_cfg)
    strategy = get_strategy("lora")
    base = load_model(model_cfg, tokenizer, path, added_pad=added)
    return strategy.apply(base, strategy.config_cls(**lora), "causal_lm")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_linear_layers_are_4bit_nf4_frozen_under_trainable_adapters(use_dora, one_thread):
    from bitsandbytes.nn import Linear4bit, Params4bit
    from transformers import AutoModelForCausalLM

    from distributed_ft.models.builtin import builtin_model_path
    from distributed_ft.strategies import count_parameters

    model = quantized_lora(use_dora=use_dora)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 blocks
    for name, layer in quantized.items():
        weight = layer.weight
        assert isinstance(weight, Params4bit) and not weight.requires_grad, name
        assert weight.dtype == torch.uint8 and weight.numel() * 2 == layer.in_features * layer.out_features, name
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested, name  # double quantization
    bare = model.get_base_model()
    assert not isinstance(bare.lm_head, Linear4bit) and not bare.lm_head.weight.requires_grad
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapter_kinds = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if use_dora else set())
    assert trainable and all(any(kind in name for kind in adapter_kinds) for name in trainable)
    # parameter counts are of the values the weights stand for, not of the packed bytes
    plain = AutoModelForCausalLM.from_pretrained(builtin_model_path())
    assert count_parameters(model)[1] == sum(p.numel() for p in plain.parameters()) + count_parameters(model)[0]


def train_and_reload(tmp_path, *extra: str):
    from distributed_ft.recipes.sft import SFTRun
    from distributed_ft.strategies import load_trained

    job = SFTRun(QLORA, [f"output.dir={tmp_path / 'run'}", *SHORT, *extra]).build().prepare()
    try:
        result = job.train()
        final = job.save()
    finally:
        job.close()
    trained = job.accelerator.unwrap_model(job.model).eval()
    with torch.no_grad():
        expected = trained(input_ids=PROBE).logits
    return result.losses, final, expected, load_trained(str(final))


@pytest.mark.parametrize("extra", [[], ["strategy.use_dora=true"]], ids=["lora", "dora"])
def test_loss_falls_and_the_adapter_reloads_onto_a_fresh_4bit_base(tmp_path, extra, one_thread):
    from bitsandbytes.nn import Linear4bit

    losses, final, expected, reloaded = train_and_reload(tmp_path, *extra)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    assert (final / "adapter_model.safetensors").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))
    assert any(isinstance(m, Linear4bit) for m in reloaded.modules())  # quantized again, not loaded plain
    with torch.no_grad():
        got = reloaded(input_ids=PROBE).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_export_merges_into_the_weights_the_4bit_values_stand_for(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from distributed_ft.recipes.export import export

    _, final, expected, _ = train_and_reload(tmp_path, "training.max_steps=3")
    out = export(str(final), str(tmp_path / "merged"), merge=True)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        got = merged(input_ids=PROBE).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def write(tmp_path, strategy: str, model_extra: str = "load_in_4bit: true") -> str:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{builtin: tiny, {model_extra}}}
        data: {{train: [{{builtin: copy}}], max_length: 32}}
        strategy: {strategy}
        """))
    return str(path)


@pytest.mark.parametrize("strategy", ["full", "{name: selective, top_k: 1}"])
def test_a_strategy_that_trains_base_weights_is_refused(tmp_path, strategy):
    from distributed_ft.config import load_config

    with pytest.raises(ConfigError, match=r"model\.load_in_4bit .* trains base weights; .*\(lora\)"):
        load_config(write(tmp_path, strategy))


def test_4bit_options_without_load_in_4bit_are_refused(tmp_path):
    from distributed_ft.config import load_config

    with pytest.raises(ConfigError, match=r"model\.bnb_4bit_quant_type is set but model\.load_in_4bit is false"):
        load_config(write(tmp_path, "lora", "bnb_4bit_quant_type: fp4"))


def test_a_resolved_config_without_4bit_loads_back():
    """A run writes its resolved config (every field, the 4-bit options at their defaults) to config.yaml, and
    `dft eval` / a resume read it back: the defaults alone are not 4-bit options set."""
    from distributed_ft.models.config import ModelConfig

    resolved = ModelConfig(builtin="tiny").model_dump()
    assert not ModelConfig(**resolved).load_in_4bit


def test_missing_bitsandbytes_names_the_field_and_the_extra(monkeypatch):
    from distributed_ft.models.config import ModelConfig
    from distributed_ft.models.quantization import quantization_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r'model\.load_in_4bit needs bitsandbytes.*pip install -e "\.\[qlora\]"'):
        quantization_config(ModelConfig(builtin="tiny", load_in_4bit=True))


def test_zero3_is_refused_before_loading(monkeypatch):
    import transformers.integrations

    from distributed_ft.models.config import ModelConfig
    from distributed_ft.models.quantization import quantization_config

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ConfigError, match=r"model\.load_in_4bit cannot run under DeepSpeed ZeRO-3"):
        quantization_config(ModelConfig(builtin="tiny", load_in_4bit=True))
