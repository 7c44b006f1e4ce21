"""Sharded inference on one process: batching, padding and ordering do not change what the model predicts."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distributed_ft.eval.config import EvalConfig
from distributed_ft.errors import EvalError
from distributed_ft.eval.generate import (eval_loss, generate_predictions, plan_batches, predict_labels,
                                          reference_loss_batches, shard_range)
from distributed_ft.eval.metrics import compute_metrics
from distributed_ft.eval.runner import evaluate

_SPEC = importlib.util.spec_from_file_location(
    "eval_tiny_llama", Path(__file__).resolve().parents[1] / "distributed" / "scripts" / "eval_tiny_llama.py")
tiny = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tiny)


class OneProcess:
    """The parts of accelerate.Accelerator that evaluation uses, for a single process."""

    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")
    state = SimpleNamespace(deepspeed_plugin=None)

    @staticmethod
    def unwrap_model(model):
        return model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tiny.build_tiny_llama(tmp_path_factory.mktemp("lm"))
    return LlamaForCausalLM.from_pretrained(folder), PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

    folder = tiny.build_tiny_llama(tmp_path_factory.mktemp("cls"), task="classification", num_labels=3)
    model = LlamaForSequenceClassification.from_pretrained(folder)
    model.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    return model, PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 13])
@pytest.mark.parametrize("procs", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_plan_covers_each_item_once_with_equal_batch_counts(n, procs, batch):
    lengths = [(i * 7) % 5 for i in range(n)]
    plans = [plan_batches(lengths, procs, rank, batch) for rank in range(procs)]
    assert len({len(p) for p in plans}) == 1  # every rank joins every (collective) batch
    flat = [i for plan in plans for b in plan for i in b]
    assert sorted(flat) == list(range(n))
    for rank, plan in enumerate(plans):
        assert sorted(i for b in plan for i in b) == list(shard_range(n, procs, rank))  # contiguous shard
        assert all(len(b) <= batch for b in plan)
        order = [lengths[i] for b in plan for i in b]
        assert order == sorted(order, reverse=True)


def _naive(model, tokenizer, prompt, max_new_tokens):
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_batched_generation_equals_one_by_one(lm):
    model, tokenizer = lm
    model.train()
    tokenizer.padding_side = "right"
    rng_before = torch.random.get_rng_state()
    cfg = EvalConfig(batch_size=3, max_new_tokens=6)
    batched = generate_predictions(model, tokenizer, tiny.PROMPTS, OneProcess(), cfg)
    assert tokenizer.padding_side == "right" and model.training  # restored
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    model.eval()
    assert batched == [_naive(model, tokenizer, p, 6) for p in tiny.PROMPTS]
    assert len(set(batched)) > 1


def test_sampling_is_seeded(lm):
    model, tokenizer = lm
    run = lambda seed: generate_predictions(  # noqa: E731
        model, tokenizer, tiny.PROMPTS, OneProcess(),
        EvalConfig(batch_size=4, max_new_tokens=8, do_sample=True, temperature=1.5, seed=seed))
    first = run(1)
    assert run(1) == first
    assert run(2) != first


def test_predict_labels_equals_direct_forward(classifier):
    model, tokenizer = classifier
    texts = tiny.PROMPTS
    got = predict_labels(model, tokenizer, texts, OneProcess(), EvalConfig(batch_size=3))
    with torch.no_grad():
        direct = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    assert got == direct
    values = predict_labels(model, tokenizer, texts, OneProcess(), EvalConfig(batch_size=3), task_type="regression")
    with torch.no_grad():
        direct_values = [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in texts]
    assert values == pytest.approx(direct_values, abs=1e-5)


def test_eval_loss_equals_model_loss(lm):
    model, tokenizer = lm
    prompts, refs = tiny.PROMPTS[:4], tiny.REFERENCES[:4]
    batches = reference_loss_batches(tokenizer, prompts, refs, OneProcess(), batch_size=3)
    got = eval_loss(model, batches, OneProcess())
    total, tokens = 0.0, 0
    with torch.no_grad():  # one unpadded sequence at a time through the model's own loss
        for p, r in zip(prompts, refs):
            p_ids = tokenizer(p)["input_ids"]
            r_ids = tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            labels = torch.tensor([[-100] * len(p_ids) + r_ids])
            out = model(input_ids=torch.tensor([p_ids + r_ids]), labels=labels)
            total += out.loss.item() * len(r_ids)
            tokens += len(r_ids)
    assert got["tokens"] == tokens
    assert got["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_evaluate_generation_scores_its_predictions(lm):
    model, tokenizer = lm
    records = [{"task": "a" if i % 2 else "b", "prompt": p, "reference": r}
               for i, (p, r) in enumerate(zip(tiny.PROMPTS, tiny.REFERENCES))]
    cfg = EvalConfig(batch_size=4, max_new_tokens=5, max_samples=3,
                     metrics={"a": ["exact_match", "bleu", "perplexity"]})
    result = evaluate(model, tokenizer, records, OneProcess(), cfg, {"a": "generation", "b": "generation"})
    assert result.tasks["a"].n == 3 and result.tasks["b"].n == 3  # max_samples per task
    for task in ("a", "b"):
        rows = [r for r in result.predictions if r["task"] == task]
        direct = compute_metrics(cfg.metrics_for(task, "generation"), [r["prediction"] for r in rows],
                                 [r["reference"] for r in rows], "generation")
        assert {k: v for k, v in result.tasks[task].scores.items() if k not in ("eval_loss", "perplexity")} \
            == direct.scores
    assert result.tasks["a"].scores["perplexity"] > 1
    assert result.mean["exact_match"] == pytest.approx(
        (result.tasks["a"].scores["exact_match"] + result.tasks["b"].scores["exact_match"]) / 2)
    assert set(result.timing) == {"generation_s", "loss_s", "metric_s"}


def test_evaluate_classification_maps_label_names(classifier):
    model, tokenizer = classifier
    texts = tiny.PROMPTS[:5]
    labels = ["neg", "pos", "neu", "pos", "neg"]
    result = evaluate(model, tokenizer, [{"task": "s", "text": t, "label": y} for t, y in zip(texts, labels)],
                      OneProcess(), EvalConfig(batch_size=2), {"s": "classification"})
    ids = predict_labels(model, tokenizer, texts, OneProcess(), EvalConfig(batch_size=2))
    names = [model.config.id2label[i] for i in ids]
    assert [r["prediction"] for r in result.predictions] == names
    assert result.tasks["s"].scores["accuracy"] == sum(a == b for a, b in zip(names, labels)) / 5


def test_evaluate_record_errors(lm):
    model, tokenizer = lm
    with pytest.raises(EvalError, match=r"eval record 2: unknown task 'storry' \(did you mean 'story'\?\)"):
        evaluate(model, tokenizer, [{"task": "story", "prompt": "a", "reference": "b"}, {"task": "storry"}],
                 OneProcess(), EvalConfig(), {"story": "generation"})
    with pytest.raises(EvalError, match="eval record 1 .*missing field 'reference'"):
        evaluate(model, tokenizer, [{"task": "story", "prompt": "a"}], OneProcess(), EvalConfig(),
                 {"story": "generation"})
    with pytest.raises(EvalError, match="metric 'mse' does not fit task type 'generation'"):
        evaluate(model, tokenizer, [{"task": "story", "prompt": "a", "reference": "b"}], OneProcess(),
                 EvalConfig(metrics={"story": ["mse"]}), {"story": "generation"})
