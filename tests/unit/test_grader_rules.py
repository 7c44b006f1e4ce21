"""Rule graders, templates and multi graders on fixed examples; expected values come from the libraries directly."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distributed_ft.grader.engine import build_grader, grade_entries
from distributed_ft.grader.spec import parse_grader_spec
from distributed_ft.grader.template import TemplateError, render

HYP = "The quick brown fox jumps over the lazy dog near the river bank"
REF = "A quick brown fox jumped over a lazy dog by the river"


def _grade(spec: dict, entries: list[dict]):
    grader = build_grader(parse_grader_spec(spec))
    try:
        return grade_entries(grader, entries)
    finally:
        grader.close()


def _entry(text: str, **item):
    return {"sample": {"output_text": text}, "item": item}


def test_string_check_operations():
    cases = {"eq": [1.0, 0.0, 0.0], "ne": [0.0, 1.0, 1.0], "like": [1.0, 0.0, 1.0], "ilike": [1.0, 1.0, 1.0]}
    entries = [_entry("Paris", ref="Paris"), _entry("PARIS!", ref="paris"), _entry("in Paris.", ref="Paris")]
    for op, expected in cases.items():
        spec = {"type": "string_check", "name": op, "input": "{{ sample.output_text }}",
                "reference": "{{ item.ref }}", "operation": op}
        assert [r.reward for r in _grade(spec, entries)] == expected, op


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_l"])
def test_text_similarity_matches_libraries(metric):
    from rapidfuzz import fuzz
    from rouge_score import rouge_scorer
    from sacrebleu import sentence_bleu

    if metric == "fuzzy_match":
        expected = fuzz.ratio(HYP, REF) / 100
    elif metric == "bleu":
        expected = sentence_bleu(HYP, [REF]).score / 100
    elif metric == "gleu":
        gleu_score = pytest.importorskip("nltk.translate.gleu_score")
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        tok = Tokenizer13a()
        expected = gleu_score.sentence_gleu([tok(REF).split()], tok(HYP).split())
    else:
        kind = "rougeL" if metric == "rouge_l" else "rouge" + metric[-1]
        expected = rouge_scorer.RougeScorer([kind]).score(REF, HYP)[kind].fmeasure
    spec = {"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
            "reference": "{{ item.answer }}", "evaluation_metric": metric}
    result = _grade(spec, [_entry(HYP, answer=REF)])[0]
    assert 0.0 < expected < 1.0
    assert result.error is None and result.reward == pytest.approx(expected, abs=1e-12)


def test_templates_nested_json_and_missing_fields():
    sample = {"output_text": "x", "output_json": {"answer": {"value": 42}, "steps": ["a", "b"]}}
    item = {"ref": "r", "n": 3}
    assert render("{{sample.output_json.answer.value}}-{{ item.n }}-{{ sample.output_json.steps[1] }}",
                  sample, item) == "42-3-b"
    with pytest.raises(TemplateError, match="item has no field 'missing'"):
        render("{{ item.missing }}", sample, item)
    with pytest.raises(TemplateError, match="sample.output_json has no field 'nope'"):
        render("{{ sample.output_json.nope }}", sample, item)


def test_output_json_parsed_from_text_and_bad_entries_are_per_sample():
    spec = {"type": "string_check", "name": "j", "input": "{{ sample.output_json.answer }}",
            "reference": "{{ item.ref }}", "operation": "eq"}
    results = _grade(spec, [_entry('{"answer": "7"}', ref="7"), _entry("not json", ref="7"),
                            {"sample": {"text": "x"}, "item": {}}, "junk", _entry('{"answer": "8"}', ref="7")])
    assert [r.reward for r in results] == [1.0, None, None, None, 0.0]
    assert "sample has no field 'output_json'" in results[1].error
    assert "items[2].sample.output_text" in results[2].error
    assert "items[3]" in results[3].error


def test_multi_combines_sub_rewards_by_formula():
    from sacrebleu import sentence_bleu

    spec = {"type": "multi", "name": "m", "calculate_output": "0.5 * exact + 0.5 * bleu^2 - min(exact, bleu)",
            "graders": {
                "exact": {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
                          "reference": "{{ item.ref }}", "operation": "ilike"},
                "bleu": {"type": "text_similarity", "name": "bleu", "input": "{{ sample.output_text }}",
                         "reference": "{{ item.ref }}", "evaluation_metric": "bleu"}}}
    results = _grade(spec, [_entry(HYP, ref=REF), _entry(HYP, ref="brown fox"), _entry(HYP)])
    for res, ref in zip(results[:2], [REF, "brown fox"]):
        exact = float(ref.lower() in HYP.lower())
        bleu = sentence_bleu(HYP, [ref]).score / 100
        assert res.sub_rewards == pytest.approx({"exact": exact, "bleu": bleu})
        assert res.reward == pytest.approx(0.5 * exact + 0.5 * bleu ** 2 - min(exact, bleu))
    assert results[2].reward is None and "item has no field 'ref'" in results[2].error


def test_multi_formula_domain_error_is_unscorable():
    spec = {"type": "multi", "calculate_output": "1 / a",
            "graders": {"a": {"type": "string_check", "input": "{{ sample.output_text }}", "reference": "y",
                              "operation": "eq"}}}
    results = _grade(spec, [_entry("y"), _entry("n")])
    assert results[0].reward == 1.0
    assert results[1].reward is None and "division by zero" in results[1].error


def test_check_cli_prints_result_json(tmp_path, capsys):
    cfg = tmp_path / "g.yaml"
    cfg.write_text(json.dumps({"type": "text_similarity", "input": "{{ sample.output_text }}",
                               "reference": "{{ item.ref }}", "evaluation_metric": "fuzzy_match"}))
    from rapidfuzz import fuzz

    from distributed_ft.cli import main

    assert main(["grader", "check", "--config", str(cfg), "--sample", HYP, "--item", json.dumps({"ref": REF})]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"reward": pytest.approx(fuzz.ratio(HYP, REF) / 100), "sub_rewards": {}, "error": None}
    assert main(["grader", "check", "--config", str(cfg), "--sample", HYP, "--item", "{}"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["reward"] is None and "item has no field 'ref'" in printed["error"]
    assert main(["grader", "validate", "--config", str(cfg)]) == 0
    cfg.write_text(json.dumps({"type": "text_similarity", "input": "x", "evaluation_metric": "bleu"}))
    assert main(["grader", "validate", "--config", str(cfg)]) == 2
    proc = subprocess.run([sys.executable, "-m", "distributed_ft", "grader", "validate", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "missing required field 'reference'" in proc.stderr


def test_large_batches_split_over_metric_processes_give_same_scores():
    from sacrebleu import sentence_bleu

    entries = [_entry(f"{HYP} number {i}", ref=f"{REF} {i % 5}") for i in range(48)]
    spec = {"type": "text_similarity", "name": "b", "input": "{{ sample.output_text }}",
            "reference": "{{ item.ref }}", "evaluation_metric": "bleu", "processes": 2}
    results = _grade(spec, entries)
    expected = [sentence_bleu(e["sample"]["output_text"], [e["item"]["ref"]]).score / 100 for e in entries]
    assert [r.reward for r in results] == pytest.approx(expected, abs=1e-12)
