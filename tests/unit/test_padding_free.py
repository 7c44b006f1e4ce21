"""Padding-free passes: a micro-batch's examples end to end in one row, each attending only to itself, give the
padded step's loss and gradient while computing only real tokens; the per-model check switches them off where
they would not be exact; a saved model does not carry the switch."""
from __future__ import annotations

import json

import pytest
import torch

from distributed_ft.data.collate import collate, collate_flat, model_inputs
from distributed_ft.engine.losses import per_example_loss
from distributed_ft.engine.padding_free import DOCUMENT_ATTENTION, padding_free_for
from tests.unit.one_step import assert_same_step, one_step


def examples(lengths, vocab=50):
    g = torch.Generator().manual_seed(0)
    out = []
    for task, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids[:2] and [-100, -100] + ids[2:], "task_id": task % 2})
    return out


def test_a_padding_free_step_equals_the_padded_step(tmp_path):
    padded = one_step(tmp_path, "padded", padding_free=False, length_grouping=False)
    flat = one_step(tmp_path, "flat", padding_free=True)
    assert flat.not_padding_free is None
    assert_same_step(padded, flat)
    real = flat.computed_tokens
    assert real < 0.75 * padded.computed_tokens, (real, padded.computed_tokens)


def test_lora_padding_free_step_equals_the_padded_step(tmp_path):
    padded = one_step(tmp_path, "padded", strategy="lora", padding_free=False, length_grouping=False)
    flat = one_step(tmp_path, "flat", strategy="lora", padding_free=True)
    assert flat.not_padding_free is None
    assert_same_step(padded, flat)


def test_prompt_learning_falls_back_to_length_groups(tmp_path):
    step = one_step(tmp_path, "prompt", strategy="prompt_tuning", padding_free=True)
    assert "virtual tokens" in step.not_padding_free


def tiny_model(tmp_path, attention="sdpa"):
    """A 2-layer Llama with grouped-query attention (4 query heads over 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    config._attn_implementation = attention
    return LlamaForCausalLM(config).eval()


def test_flat_losses_equal_padded_losses_per_example(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tmp_path)
    assert padding_free_for(model, "causal_lm", True) is None
    assert model.config._attn_implementation == DOCUMENT_ATTENTION
    batch = examples([9, 3, 17, 5])
    padded = collate(batch, pad_token_id=0)
    flat = collate_flat(batch)
    assert flat["input_ids"].shape == (1, 34) and flat["task_ids"].tolist() == [0, 1, 0, 1]
    expected = per_example_loss(model(**model_inputs(padded)).logits, padded["labels"], "causal_lm")
    got = per_example_loss(model(**model_inputs(flat)).logits, flat["labels"], "causal_lm", flat["example_of"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # attention stays within each example: changing the first example leaves the others' losses alone
    changed = [dict(batch[0], input_ids=[4] * 9)] + batch[1:]
    flat2 = collate_flat(changed)
    got2 = per_example_loss(model(**model_inputs(flat2)).logits, flat2["labels"], "causal_lm", flat2["example_of"])
    torch.testing.assert_close(got2[1:], got[1:], rtol=1e-5, atol=1e-6)
    assert not torch.isclose(got2[0], got[0])


def test_eager_attention_is_not_switched(tmp_path):
    model = tiny_model(tmp_path, attention="eager")
    assert "eager" in padding_free_for(model, "causal_lm", True)
    assert padding_free_for(model, "causal_lm", False) == "training.padding_free is off"
    assert padding_free_for(model, "classification", True) == "task classification"


def test_a_saved_model_loads_with_sdpa(tmp_path):
    model = tiny_model(tmp_path)
    assert padding_free_for(model, "causal_lm", True) is None
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert DOCUMENT_ATTENTION not in json.dumps(config)


def test_generation_after_switching_matches_sdpa(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tmp_path)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding: the fallback keeps sdpa's masks
    before = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert padding_free_for(model, "causal_lm", True) is None
    after = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(before, after)


@pytest.mark.parametrize("packed", [False, True])
def test_collate_flat_marks_example_starts(packed):
    batch = examples([4, 6])
    if packed:  # a packed example's own position ids restart inside it
        batch[1]["position_ids"] = [0, 1, 2, 0, 1, 2]
    flat = collate_flat(batch)
    assert flat["labels"][0, 0] == -100 and flat["labels"][0, 4] == -100
    assert flat["example_of"].tolist() == [[0] * 4 + [1] * 6]
    bounds = model_inputs(flat)["cu_seq_lens_q"].tolist()
    assert bounds == ([0, 4, 7, 10] if packed else [0, 4, 10])


def reward_model(attention="sdpa"):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=2, num_labels=1)
    config._attn_implementation = attention
    return LlamaForSequenceClassification(config)


def test_flat_rewards_and_their_gradients_equal_padded_ones():
    from distributed_ft.engine.padding_free import flat_scores
    from distributed_ft.preference.losses import bradley_terry_loss

    model = reward_model()
    assert padding_free_for(model, "sequence_classification", True) is None
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (7, 12, 4, 9)]
    rows[3][-2:] = [2, 2]  # a row ending in the pad id is scored where the padded forward scores it
    width = max(map(len, rows))
    ids = torch.full((4, width), 2)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1

    def step(scores):
        model.zero_grad()
        loss = bradley_terry_loss(scores[:2, 0], scores[2:, 0], torch.zeros(2), None)
        loss.sum().backward()
        return scores.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    padded, padded_grads = step(model(input_ids=ids, attention_mask=mask).logits)
    flat, flat_grads = step(flat_scores(model, rows, pad_id=2))
    torch.testing.assert_close(flat, padded, rtol=1e-5, atol=1e-6)
    for key, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[key], grad, rtol=1e-4, atol=1e-7, msg=key)


def test_an_encoder_classifier_is_not_scored_flat():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1))
    reason = padding_free_for(model, "sequence_classification", True)
    assert reason is not None and model.config._attn_implementation != DOCUMENT_ATTENTION


def test_reward_model_runs_padding_free_and_padded_agree(tmp_path):
    """`dft rm` with its sides in one flat forward and with padded length groups: the same losses step by step."""
    from tests.conftest import run_dft

    losses = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        proc = run_dft("rm", "configs/rm/quickstart.yaml", f"output.dir={out}", "pairs.train.0.num_examples=64",
                       "pairs.eval_pairs=8", "training.max_steps=3", "training.warmup_steps=0", "logging.log_every=1",
                       "training.mixed_precision=no", f"training.padding_free={flag}", "logging.progress_bar=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("batches: padding-free" in proc.stderr) == (flag == "true"), proc.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [row["loss"] for row in rows if "loss" in row]
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
