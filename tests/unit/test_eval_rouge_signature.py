"""ROUGE's settings are reported as a signature (like sacrebleu's) and the stemmer setting really changes the scores."""
from __future__ import annotations

import json
from importlib.metadata import version

import pytest
from rouge_score.rouge_scorer import RougeScorer

from distributed_ft.cli import build_parser
from distributed_ft.eval.metrics import ROUGE_TYPES, MetricOptions, compute_metrics
from distributed_ft.eval.report import build_report, render_markdown, write_report
from distributed_ft.eval.runner import TaskGroup, score_groups

# Pairs where the Porter stemmer changes the overlap ("running dogs" vs "run dog"), plus punctuation and case.
PAIRS = [("the dogs were running quickly", "a dog runs quick"),
         ("Cats sat on mats.", "the cat sits on the mat"),
         ("summaries are evaluated\nwith rougeLsum", "summary evaluation\nwith ROUGE-Lsum lines"),
         ("identical text", "identical text")]
PREDS = [p for p, _ in PAIRS]
REFS = [r for _, r in PAIRS]


def _signature(stemmer: bool) -> str:
    return (f"rouge-score {version('rouge-score')}|types:rouge1,rouge2,rougeL,rougeLsum"
            f"|stemmer:{'porter' if stemmer else 'none'}|tokenizer:default")


@pytest.mark.parametrize("stemmer", [True, False])
def test_signature_reflects_the_stemmer(stemmer):
    out = compute_metrics(["rouge"], PREDS, REFS, "generation", MetricOptions(rouge_stemmer=stemmer))
    assert out.signatures["rouge"] == _signature(stemmer)


@pytest.mark.parametrize("stemmer", [False, True])
def test_scores_equal_rouge_score_with_the_same_stemmer(stemmer):
    out = compute_metrics(["rouge"], PREDS, REFS, "generation", MetricOptions(rouge_stemmer=stemmer))
    direct = RougeScorer(list(ROUGE_TYPES), use_stemmer=stemmer)
    expected = [direct.score(r, p) for p, r in PAIRS]  # rouge-score takes (target, prediction)
    for row, exp in zip(out.per_sample, expected):
        assert row == {k: pytest.approx(exp[k].fmeasure, abs=1e-12) for k in ROUGE_TYPES}
    for k in ROUGE_TYPES:
        assert out.scores[k] == pytest.approx(sum(e[k].fmeasure for e in expected) / len(PAIRS), abs=1e-12)


def test_the_stemmer_setting_changes_scores():
    # Without this, the equality test above would pass even if the option were ignored.
    on = compute_metrics(["rouge"], PREDS, REFS, "generation", MetricOptions(rouge_stemmer=True))
    off = compute_metrics(["rouge"], PREDS, REFS, "generation", MetricOptions(rouge_stemmer=False))
    assert on.scores["rouge1"] > off.scores["rouge1"]


@pytest.mark.parametrize("stemmer", [True, False])
def test_signature_in_report_json_and_md(stemmer):
    group = TaskGroup("story", "generation", ["bleu", "rouge"], ["i"] * len(PAIRS), PREDS, REFS)
    result = score_groups([group], MetricOptions(rouge_stemmer=stemmer))
    report = build_report(result, meta={"model": "tiny"})
    assert report["rouge_signature"] == report["signatures"]["rouge"] == _signature(stemmer)
    assert report["sacrebleu_signature"] == result.signatures["bleu"]
    markdown = render_markdown(report)
    assert f"- rouge signature: `{_signature(stemmer)}`" in markdown
    assert f"- sacrebleu signature: `{result.signatures['bleu']}`" in markdown


def test_report_files_hold_the_signature_and_omit_it_without_rouge(tmp_path):
    with_rouge = TaskGroup("story", "generation", ["bleu", "rouge"], ["i"] * len(PAIRS), PREDS, REFS)
    paths = write_report(tmp_path / "a", score_groups([with_rouge], MetricOptions(rouge_stemmer=False)))
    assert json.loads(paths["json"].read_text())["rouge_signature"] == _signature(False)
    assert f"- rouge signature: `{_signature(False)}`" in paths["markdown"].read_text()
    without = TaskGroup("story", "generation", ["bleu"], ["i"] * len(PAIRS), PREDS, REFS)
    report = build_report(score_groups([without], MetricOptions()))
    assert report["rouge_signature"] is None and "rouge signature" not in render_markdown(report)


@pytest.mark.parametrize("flags, stemmer", [([], True), (["--no-stemmer"], False)])
def test_cli_prints_the_rouge_signature(tmp_path, capsys, flags, stemmer):
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"prediction": p, "reference": r}) + "\n" for p, r in PAIRS))
    args = build_parser().parse_args(["eval", "--predictions", str(preds), "--metrics", "bleu,rouge",
                                      "--out", str(tmp_path / "s.json"), *flags])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"rouge signature: {_signature(stemmer)}" in printed and "sacrebleu signature: " in printed
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["signatures"]["rouge"] == _signature(stemmer)
    direct = RougeScorer(["rouge1"], use_stemmer=stemmer)
    assert written["tasks"]["predictions"]["scores"]["rouge1"] == pytest.approx(
        sum(direct.score(r, p)["rouge1"].fmeasure for p, r in PAIRS) / len(PAIRS), abs=1e-12)
