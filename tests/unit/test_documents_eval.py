"""Knowledge evaluation pieces: token F1 and abstention scoring, held-out text scored by perplexity
without generating, and the report's knowledge and retention table."""
from __future__ import annotations

import pytest

from distributed_ft.eval.config import EvalConfig
from distributed_ft.eval.metrics import MetricOptions, abstention, token_f1
from distributed_ft.eval.report import build_report, render_markdown
from distributed_ft.eval.runner import EvalResult, TaskResult


def test_token_f1_scores_word_overlap():
    out = token_f1(["Mira Okafor", "Okafor", "Tomas Novak", ""], ["Mira Okafor", "Mira Okafor", "Mira Okafor", ""],
                   MetricOptions())
    assert [s["token_f1"] for s in out.per_sample] == [1.0, pytest.approx(2 / 3), 0.0, 1.0]


def test_abstention_tells_declining_from_making_things_up():
    refs = ["The documents do not say."] * 4
    out = abstention(["The documents do not say.", "I don't know that", "AF-1234", ""], refs,
                     MetricOptions(abstain_phrases=("i don't know",)))
    assert [s["abstention"] for s in out.per_sample] == [1.0, 1.0, 0.0, 0.0]
    assert [s["hallucination"] for s in out.per_sample] == [0.0, 0.0, 1.0, 0.0]   # empty: neither
    assert out.scores == {"abstention": 0.5, "hallucination": 0.25}


def test_text_only_tasks_default_to_perplexity_and_qa_to_the_generation_metrics():
    cfg = EvalConfig()
    assert cfg.metrics_for("pages", "generation", text_only=True) == ["perplexity"]
    assert cfg.metrics_for("qa", "generation") == ["exact_match", "bleu", "rouge"]


def test_perplexity_only_tasks_are_not_generated(monkeypatch):
    from distributed_ft.eval import generate, runner

    calls = []

    def fake_generate(model, tokenizer, prompts, accelerator, cfg):
        calls.append(list(prompts))
        return ["AF-1"] * len(prompts)

    monkeypatch.setattr(generate, "generate_predictions", fake_generate)
    monkeypatch.setattr(generate, "reference_loss_batches", lambda *a, **k: [])
    monkeypatch.setattr(generate, "eval_loss", lambda *a, **k: {"eval_loss": 1.0, "perplexity": 2.718, "tokens": 5})

    class Acc:
        is_main_process, num_processes = True, 1

    records = [{"task": "pages", "prompt": "", "reference": "A held-out page."},
               {"task": "qa", "prompt": "Question: code?\nAnswer:", "reference": "AF-1"}]
    result = runner.evaluate(None, None, records, Acc(), EvalConfig(metrics={"qa": ["exact_match"]}),
                             {"pages": "generation", "qa": "generation"})
    assert calls == [["Question: code?\nAnswer:"]]
    assert result.tasks["pages"].scores == {"eval_loss": 1.0, "perplexity": 2.718}
    assert result.tasks["qa"].scores["exact_match"] == 1.0


def result(scores: dict[str, dict[str, float]]) -> EvalResult:
    tasks = {t: TaskResult(t, "generation", 10, list(s), s) for t, s in scores.items()}
    return EvalResult(tasks, {}, [])


def test_report_has_a_knowledge_and_retention_table():
    before = result({"facts": {"exact_match": 0.0, "token_f1": 0.1}, "unanswerable": {"abstention": 0.0,
                     "hallucination": 1.0}, "pages": {"eval_loss": 5.0, "perplexity": 150.0},
                     "copy": {"exact_match": 0.9}, "sort": {"exact_match": 0.9}})
    after = result({"facts": {"exact_match": 0.8, "token_f1": 0.9}, "unanswerable": {"abstention": 0.9,
                    "hallucination": 0.1}, "pages": {"eval_loss": 2.0, "perplexity": 7.4},
                    "copy": {"exact_match": 0.85}, "sort": {"exact_match": 0.5}})
    report = build_report(after, before, {"retention": ["copy", "sort"], "max_retention_drop": 0.1})
    rows = {(r["measure"], r["task"], r["metric"]): r for r in report["knowledge"]}
    assert rows[("recall", "facts", "exact_match")]["change"] == pytest.approx(0.8)
    assert rows[("hallucination rate", "unanswerable", "hallucination")]["fine_tuned"] == 0.1
    assert rows[("held-out perplexity", "pages", "perplexity")]["baseline"] == 150.0
    assert rows[("retention", "copy", "exact_match")]["within_bound"] is True
    assert rows[("retention", "sort", "exact_match")]["within_bound"] is False
    markdown = render_markdown(report)
    assert "## Knowledge and retention" in markdown
    assert "| hallucination rate | unanswerable | hallucination | 1.0000 | 0.1000 | -0.9000 |" in markdown
    assert "retention of sort: exact_match dropped by +0.4000; bound 0.1000: EXCEEDED" in markdown
    assert ("facts", "perplexity") not in {(r["task"], r["metric"]) for r in report["knowledge"]}
