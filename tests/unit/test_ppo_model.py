"""The PPO module: reference by disabled adapter (no second copy) for LoRA, frozen copy for full, value heads."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _build(tmp_path, strategy: str, *extra: str):
    from distributed_ft.recipes.ppo import PPORun

    overrides = [f"output.dir={tmp_path / strategy}", "grader.config=null", "grader.urls=[http://127.0.0.1:9]",
                 f"strategy.name={strategy}", "data.train.0.num_examples=40", *extra]
    if strategy == "lora":
        overrides += ["strategy.r=4"]
    return PPORun(REPO / "configs" / "ppo" / "quickstart.yaml", overrides).build()


def _decoder_layers_alive() -> int:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    gc.collect()
    return sum(isinstance(o, LlamaDecoderLayer) for o in gc.get_objects())


def _probe_inputs(run):
    from distributed_ft.rl.rollout import encode_queries, model_inputs

    query, qmask = encode_queries(run.tokenizer, ["copy: a b =", "copy: c d e ="])
    response = torch.tensor([[5, 6, 7], [8, 9, 10]])
    return model_inputs(query, qmask, response, torch.ones(2, 3))


def test_lora_reference_is_the_policy_with_adapter_disabled(tmp_path):
    from transformers import AutoModelForCausalLM

    before = _decoder_layers_alive()
    run = _build(tmp_path, "lora")
    layers = run.model.policy.get_base_model().config.num_hidden_layers
    assert run.reference is None
    # One copy of the base weights in memory: the decoder layers alive grew by exactly one model's worth.
    assert _decoder_layers_alive() - before == layers
    base = AutoModelForCausalLM.from_pretrained(run.model_path)
    n_base = sum(p.numel() for p in base.parameters())
    n_lora = sum(p.numel() for n, p in run.model.named_parameters() if "lora_" in n)
    n_head = sum(p.numel() for p in run.model.value_head.parameters())
    assert sum(p.numel() for p in run.model.parameters()) == n_base + n_lora + n_head
    # Make the adapter do something, then: reference logits == the base model, policy logits differ.
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    inputs = _probe_inputs(run)
    with torch.no_grad():
        ref, _ = run.model(**inputs, mode="reference")
        pol, values = run.model(**inputs, mode="policy_value")
        expected = base(**inputs).logits
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    assert (pol - expected).abs().max() > 1e-2
    assert values.shape == inputs["input_ids"].shape and values.abs().max() == 0  # zero-initialised head


def test_full_strategy_gets_a_frozen_reference_and_separate_critic(tmp_path):
    run = _build(tmp_path, "full", "ppo.critic.mode=separate")
    assert run.reference is not None and not any(p.requires_grad for p in run.reference.parameters())
    critic_ids = {id(p) for p in run.model.critic_backbone.parameters()}
    assert critic_ids and not critic_ids & {id(p) for p in run.model.policy.parameters()}
    with pytest.raises(RuntimeError, match="frozen model"):
        run.model(**_probe_inputs(run), mode="reference")
    inputs = _probe_inputs(run)
    with torch.no_grad():
        run.model.value_head.weight.fill_(0.01)
        _, values = run.model(**inputs, mode="policy_value")
        hidden = run.model.critic_backbone(**inputs).last_hidden_state
    torch.testing.assert_close(values, hidden.sum(-1) * 0.01 + run.model.value_head.bias, rtol=1e-5, atol=1e-6)
