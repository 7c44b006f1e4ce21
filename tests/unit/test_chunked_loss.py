"""The chunked causal-LM loss equals the full-logits loss (values and every trainable gradient) on the built-in
model bare and under PEFT, falls back where the head's output is not the logits, and keeps less memory."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from distributed_ft.engine import chunked_loss
from distributed_ft.engine.chunked_loss import chunked_loss_for, per_example_from_hidden
from distributed_ft.engine.losses import per_example_loss
from distributed_ft.eval.generate import eval_loss
from distributed_ft.tasks import IGNORE_INDEX

CHUNK = 7  # divides none of the batch's labelled-token counts (checked below)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def builtin_model():
    from transformers import AutoModelForCausalLM

    from distributed_ft.models.builtin import builtin_model_path

    return AutoModelForCausalLM.from_pretrained(builtin_model_path())


def wrapped(kind: str):
    """The built-in model, bare or wrapped by PEFT (LoRA with B != 0, so every adapter gets a gradient)."""
    model = builtin_model()
    if kind == "full":
        return model
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
    configs = {
        "lora": LoraConfig(target_modules="all-linear", **lora),
        "lora_on_head": LoraConfig(target_modules=["q_proj", "v_proj", "lm_head"], **lora),
        "modules_to_save_head": LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], **lora),
        "prompt_tuning": PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
        "prefix_tuning": PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    }
    torch.manual_seed(0)
    return get_peft_model(model, configs[kind])


def batch(vocab: int, pad_id: int):
    """Three right-padded rows: a masked prompt, padding, and a row with only two labelled tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (3, 37), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 30:], mask[1, 30:] = pad_id, 0
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX
    labels[1, 30:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    labels[2, 20:22] = ids[2, 20:22]
    labelled = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert labelled % CHUNK and labelled > 4 * CHUNK
    return {"input_ids": ids, "attention_mask": mask}, labels


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    per_example = compute()
    per_example.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return per_example.detach(), grads


@pytest.mark.parametrize("kind", ["full", "lora", "lora_on_head", "modules_to_save_head", "prompt_tuning",
                                  "prefix_tuning"])
def test_chunked_loss_and_gradients_equal_full_logits(kind):
    model = wrapped(kind)
    model.train()
    inputs, labels = batch(model.config.vocab_size, model.config.pad_token_id)
    loss = chunked_loss_for(model, "causal_lm", CHUNK)
    assert loss is not None, kind
    chunked, chunked_grads = loss_and_grads(model, lambda: loss(model, inputs, labels))
    plain, plain_grads = loss_and_grads(model, lambda: per_example_loss(model(**inputs).logits, labels, "causal_lm"))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    assert chunked_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name  # every trainable parameter takes part
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ranks_padding_with_empty_chunks_changes_nothing():
    """Under ZeRO-3 a rank with fewer tokens makes the same number of head calls as the others: the extra,
    empty chunks add no loss and no gradient."""
    model = builtin_model()
    inputs, labels = batch(model.config.vocab_size, model.config.pad_token_id)
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    exact = chunked_loss_for(model, "causal_lm", CHUNK)
    padded = chunked_loss_for(model, "causal_lm", CHUNK, agree=lambda n: n + 3)
    first, first_grads = loss_and_grads(model, lambda: exact(model, inputs, labels))
    calls.clear()
    second, second_grads = loss_and_grads(model, lambda: padded(model, inputs, labels))
    labelled = int((labels[:, 1:] != IGNORE_INDEX).sum())
    chunks = -(-labelled // CHUNK) + 3
    assert len(calls) == 1 + 2 * chunks  # the model's own last-token head call, then each chunk and its recompute
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    for name, grad in first_grads.items():
        torch.testing.assert_close(second_grads[name], grad, rtol=0, atol=0)


class OneProcess:
    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")
    state = SimpleNamespace(deepspeed_plugin=None)

    @staticmethod
    def unwrap_model(model):
        return model


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_eval_loss_equals_full_logits(kind):
    model = wrapped(kind)
    inputs, labels = batch(model.config.vocab_size, model.config.pad_token_id)
    batches = [{**{k: v[:2] for k, v in inputs.items()}, "labels": labels[:2]},
               {**{k: v[2:] for k, v in inputs.items()}, "labels": labels[2:]}]
    chunked = eval_loss(model, batches, OneProcess(), chunk_tokens=CHUNK)
    plain = eval_loss(model, batches, OneProcess(), chunk_tokens=None)
    assert chunked["tokens"] == plain["tokens"] == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert chunked["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)


def tiny_llama(cls=LlamaForCausalLM, **config):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, **config)
    return cls(cfg)


class ScaledLogits(LlamaForCausalLM):
    """A model whose logits are not its head's output, without a config field saying so (as remote code does)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits / 4
        return out


@pytest.mark.parametrize("make, reason", [
    (lambda: tiny_llama(logits_scaling=8.0), "logits_scaling=8.0"),
    (lambda: tiny_llama(ScaledLogits), "differs from the model's logits"),
])
def test_falls_back_where_the_head_output_is_not_the_logits(monkeypatch, caplog, make, reason):
    monkeypatch.setattr(chunked_loss, "_logged", set())
    model = make()
    with caplog.at_level(logging.INFO, logger="distributed_ft"):
        assert chunked_loss_for(model, "causal_lm", 16) is None
        assert chunked_loss_for(model, "causal_lm", 16) is None
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loss:")]
    assert len(messages) == 1 and "full-vocabulary logits" in messages[0] and reason in messages[0], messages


def test_softcapped_model_falls_back(monkeypatch, caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    monkeypatch.setattr(chunked_loss, "_logged", set())
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert model.config.final_logit_softcapping
    with caplog.at_level(logging.INFO, logger="distributed_ft"):
        assert chunked_loss_for(model, "causal_lm", 16) is None
    assert "final_logit_softcapping" in caplog.text


def test_other_tasks_and_the_null_setting_take_the_full_logits_path(monkeypatch, caplog):
    monkeypatch.setattr(chunked_loss, "_logged", set())
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="distributed_ft"):
        assert chunked_loss_for(model, "classification", 16) is None
        assert chunked_loss_for(model, "causal_lm", None) is None
        assert chunked_loss_for(model, "causal_lm", 16) is not None
    assert "task classification" in caplog.text and "loss_chunk_tokens is null" in caplog.text
    assert "loss: chunked cross-entropy over 16 tokens" in caplog.text


# ---- memory: a large-vocabulary head on a few hundred tokens ---------------------------------------------

VOCAB, HIDDEN, TOKENS, MEMORY_CHUNK = 32000, 16, 256, 32  # the head weight is smaller than a chunk of logits


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op (forward or backward) produces inside the block, in bytes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def measure(compute):
    """(bytes saved for backward, largest tensor produced in forward and backward) of one loss computation."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with LargestTensor() as largest:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = compute().sum()
        loss.backward()
    return sum(saved.values()), largest.largest


def test_chunked_path_keeps_one_chunk_of_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(2, TOKENS // 2 + 1, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, TOKENS // 2 + 1))
    full_logits = TOKENS * VOCAB * 4
    plain_saved, plain_largest = measure(lambda: per_example_loss(head(hidden), labels, "causal_lm"))
    chunked_saved, chunked_largest = measure(lambda: per_example_from_hidden(head, hidden, labels, MEMORY_CHUNK))
    assert plain_saved >= full_logits and plain_largest >= full_logits  # the measure sees the full logits
    assert chunked_saved < full_logits / 20  # hidden states and targets, no logits
    assert chunked_largest <= MEMORY_CHUNK * VOCAB * 4 < plain_largest / 4


def test_head_runs_in_the_autocast_of_the_forward():
    """Under bf16 autocast (accelerate's mixed precision wraps the model's forward in it) the chunked head computes
    in bf16 as the model's own head does, instead of silently in fp32."""
    model = builtin_model()
    inputs, labels = batch(model.config.vocab_size, model.config.pad_token_id)
    loss = chunked_loss_for(model, "causal_lm", CHUNK)
    with torch.no_grad():
        fp32 = loss(model, inputs, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            chunked = loss(model, inputs, labels)
            plain = per_example_loss(model(**inputs).logits, labels, "causal_lm")
    torch.testing.assert_close(chunked, plain, rtol=2e-3, atol=0)
    assert (chunked - fp32).abs().max() > 1e-4
