"""Metrics equal direct calls of the libraries they wrap (or a hand computation); scoring errors are one line."""
from __future__ import annotations

import json
import math

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU

from distributed_ft.errors import DftError
from distributed_ft.errors import EvalError
from distributed_ft.eval.metrics import (METRICS, MetricOptions, compute_metrics, loss_and_perplexity,
                                         normalize_text, resolve_metrics)
from distributed_ft.eval.predictions import score_prediction_pairs, score_predictions_file

PREDS = ["The cat sat on the mat.", "", "naïve café — déjà vu", "running quickly home", "a b c d e"]
REFS = ["the cat sat on a mat", "something", "naïve café, déjà vu", "runs quick to home", "a b c d e"]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@pytest.mark.parametrize("preds,refs", [(PREDS, REFS), (PREDS[:1], REFS[:1]), ([""], ["x y"]),
                                        (["日本語 のテキスト"], ["日本語 のテキスト"])])
def test_bleu_equals_sacrebleu(preds, refs):
    out = score_prediction_pairs(preds, refs, ["bleu"])
    assert out.scores["bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    direct = BLEU()
    direct.corpus_score(preds, [refs])
    assert out.signatures["bleu"] == str(direct.get_signature())
    sentence = BLEU(effective_order=True)
    assert [s["bleu"] for s in out.per_sample] == [sentence.sentence_score(p, [r]).score for p, r in zip(preds, refs)]


@pytest.mark.parametrize("stemmer", [True, False])
@pytest.mark.parametrize("preds,refs", [(PREDS, REFS), (PREDS[3:4], REFS[3:4]), ([""], [""]),
                                        (["line one\nline two"], ["line two\nline one"])])
def test_rouge_equals_rouge_score(preds, refs, stemmer):
    out = score_prediction_pairs(preds, refs, ["rouge"], rouge_stemmer=stemmer)
    scorer = RougeScorer(list(ROUGE_KEYS), use_stemmer=stemmer)
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for key in ROUGE_KEYS:
        expected = [d[key].fmeasure for d in direct]
        assert out.scores[key] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
        assert [s[key] for s in out.per_sample] == pytest.approx(expected, abs=1e-12)


def test_rouge_stemmer_option_matters():
    with_stem = score_prediction_pairs(["running quickly"], ["runs quick"], ["rouge"], rouge_stemmer=True)
    without = score_prediction_pairs(["running quickly"], ["runs quick"], ["rouge"], rouge_stemmer=False)
    assert with_stem.scores["rouge1"] > without.scores["rouge1"] == 0.0


def test_exact_match_normalisation():
    preds = ["  The Cat,  sat! ", "Déjà  VU", "", "x"]
    refs = ["the cat sat", "déjà vu.", "", "y"]
    normalised = score_prediction_pairs(preds, refs, ["exact_match"])
    assert [s["exact_match"] for s in normalised.per_sample] == [1.0, 1.0, 1.0, 0.0]
    assert normalised.scores["exact_match"] == 0.75
    raw = score_prediction_pairs(preds, refs, ["exact_match"], normalize_exact_match=False)
    assert [s["exact_match"] for s in raw.per_sample] == [0.0, 0.0, 1.0, 0.0]
    assert normalize_text(" A\t b\n\nC?! ") == "a b c"


def test_classification_metrics_by_hand():
    preds = ["pos", "neg", "neu", "pos", "pos", "neg"]
    refs = ["pos", "pos", "neu", "neg", "pos", "neg"]
    out = score_prediction_pairs(preds, refs, task_type="classification")
    assert out.scores["accuracy"] == 4 / 6
    # per label: pos tp=2 fp=1 fn=1; neg tp=1 fp=1 fn=1; neu tp=1 fp=0 fn=0
    f1 = [2 * 2 / (2 * 2 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 1), 1.0]
    assert out.scores["f1"] == pytest.approx(sum(f1) / 3, abs=1e-12)
    single = score_prediction_pairs([1], [0], task_type="classification")
    assert single.scores == {"accuracy": 0.0, "f1": 0.0}


def test_regression_metrics_by_hand():
    preds, refs = [1.0, 2.5, -1.0], [1.5, 2.0, 1.0]
    out = score_prediction_pairs(preds, refs, task_type="regression")
    assert out.scores["mse"] == pytest.approx((0.25 + 0.25 + 4.0) / 3, abs=1e-12)
    assert out.scores["mae"] == pytest.approx((0.5 + 0.5 + 2.0) / 3, abs=1e-12)
    assert [s["mse"] for s in out.per_sample] == [0.25, 0.25, 4.0]


def test_loss_and_perplexity():
    out = loss_and_perplexity(6.0, 4)
    assert out["eval_loss"] == 1.5 and out["perplexity"] == pytest.approx(math.exp(1.5))
    assert math.isnan(loss_and_perplexity(0.0, 0)["perplexity"])


def test_registry_task_types_and_defaults():
    assert {m.name for m in resolve_metrics(None, "generation")} == {"exact_match", "bleu", "rouge"}
    assert {m.name for m in resolve_metrics(None, "classification")} == {"accuracy", "f1"}
    assert {m.name for m in resolve_metrics(None, "regression")} == {"mse", "mae"}
    for metric in METRICS.values():
        assert metric.task_types <= {"generation", "classification", "regression"}


def test_unknown_metric_suggests_nearest():
    with pytest.raises(EvalError, match=r"unknown metric 'blue' \(did you mean 'bleu'\?\)") as err:
        compute_metrics(["blue"], ["a"], ["a"], "generation")
    assert isinstance(err.value, DftError) and "\n" not in str(err.value)


def test_metric_not_fitting_task_type():
    with pytest.raises(EvalError, match="metric 'bleu' does not fit task type 'classification'"):
        score_prediction_pairs(["a"], ["a"], ["bleu"], task_type="classification")
    with pytest.raises(EvalError, match="unknown task type 'generaton'.*'generation'"):
        resolve_metrics(None, "generaton")


def test_lengths_must_match():
    with pytest.raises(EvalError, match="3 predictions but 2 references") as err:
        score_prediction_pairs(["a", "b", "c"], ["a", "b"])
    assert "\n" not in str(err.value)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_predictions_file_per_task(tmp_path):
    rows = [{"task": "a", "prediction": PREDS[i], "reference": REFS[i], "input": f"q{i}"} for i in range(3)]
    rows += [{"task": "b", "prediction": PREDS[i], "reference": REFS[i]} for i in range(3, 5)]
    result = score_predictions_file(_write(tmp_path / "p.jsonl", rows))
    assert result.tasks["a"].n == 3 and result.tasks["b"].n == 2
    assert result.tasks["a"].scores["bleu"] == sacrebleu.corpus_bleu(PREDS[:3], [REFS[:3]]).score
    assert result.tasks["b"].scores["bleu"] == sacrebleu.corpus_bleu(PREDS[3:], [REFS[3:]]).score
    expected_mean = (3 * result.tasks["a"].scores["rouge1"] + 2 * result.tasks["b"].scores["rouge1"]) / 5
    assert result.mean["rouge1"] == pytest.approx(expected_mean, abs=1e-12)
    assert [r["input"] for r in result.predictions[:3]] == ["q0", "q1", "q2"]


def test_predictions_file_missing_reference(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prediction": "a", "reference": "a"}, {"prediction": "b"}])
    with pytest.raises(EvalError, match=r"p\.jsonl:2: missing field 'reference'") as err:
        score_predictions_file(path)
    assert "\n" not in str(err.value)
    path = _write(tmp_path / "q.jsonl", [{"reference": "a"}])
    with pytest.raises(EvalError, match=r"q\.jsonl:1: missing field 'prediction'"):
        score_predictions_file(path)


def test_predictions_file_bad_json_and_missing_file(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prediction": "a", "reference": "a"}, "{not json"])
    with pytest.raises(EvalError, match=r"p\.jsonl:2: not valid JSON"):
        score_predictions_file(path)
    with pytest.raises(EvalError, match="predictions file not found"):
        score_predictions_file(tmp_path / "absent.jsonl")


def test_predictions_file_regression_needs_numbers(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prediction": 1, "reference": 2}, {"prediction": "x", "reference": 1}])
    with pytest.raises(EvalError, match=r"p\.jsonl:2: field 'prediction': expected a number"):
        score_predictions_file(path, task_type="regression")


def test_perplexity_cannot_score_a_file(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prediction": "a", "reference": "a"}])
    with pytest.raises(EvalError, match="'perplexity' needs the model"):
        score_predictions_file(path, ["perplexity"])


def test_metric_options_default():
    assert MetricOptions() == MetricOptions(rouge_stemmer=True, normalize_exact_match=True)
