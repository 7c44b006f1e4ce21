"""Report files hold the numbers of the results they were written from; the eval config and CLI check input."""
from __future__ import annotations

import json

import pytest

from distributed_ft.strict import parse_section
from distributed_ft.errors import ConfigError
from distributed_ft.cli import build_parser
from distributed_ft.eval.predictions import format_table
from distributed_ft.eval.config import EvalConfig
from distributed_ft.errors import EvalError
from distributed_ft.eval.report import config_hash, write_report
from distributed_ft.eval.runner import EvalResult, TaskGroup, score_groups
from distributed_ft.eval.metrics import MetricOptions


def _result(preds_gen, preds_cls) -> EvalResult:
    refs_gen = ["the cat sat", "a dog ran", "sun"]
    groups = [TaskGroup("story", "generation", ["exact_match", "bleu", "rouge"], ["p1", "p2", "p3"], preds_gen,
                        refs_gen),
              TaskGroup("sentiment", "classification", ["accuracy", "f1"], ["t1", "t2"], preds_cls, ["pos", "neg"])]
    result = score_groups(groups, MetricOptions())
    result.timing = {"generation_s": 1.0, "metric_s": 0.01}
    return result


@pytest.fixture()
def results():
    before = _result(["dog", "", "moon"], ["neg", "neg"])
    after = _result(["the cat sat", "a dog sat", "sun"], ["pos", "neg"])
    return before, after


def test_report_json_holds_the_numbers(tmp_path, results):
    before, after = results
    history = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 21)] + [{"step": 20, "eval_loss": 0.5}]
    paths = write_report(tmp_path, after, before, meta={"model": "tiny", "strategy": "lora", "config": {"a": 1}},
                         loss_history=history)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["model"] == "tiny" and report["strategy"] == "lora"
    assert report["config_hash"] == config_hash({"a": 1})
    assert report["sacrebleu_signature"] == after.signatures["bleu"]
    for task in ("story", "sentiment"):
        assert report["tasks"][task]["n"] == after.tasks[task].n
        for metric, value in after.tasks[task].scores.items():
            row = report["tasks"][task]["metrics"][metric]
            assert row["fine_tuned"] == value
            assert row["baseline"] == before.tasks[task].scores[metric]
            assert row["change"] == pytest.approx(value - before.tasks[task].scores[metric])
    assert report["mean"]["exact_match"]["fine_tuned"] == after.mean["exact_match"]
    markdown = (tmp_path / "eval" / "report.md").read_text()
    acc = report["tasks"]["sentiment"]["metrics"]["accuracy"]
    assert f"| sentiment | accuracy | {acc['baseline']:.4f} | {acc['fine_tuned']:.4f} | {acc['change']:+.4f} |" in markdown
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == ["the cat sat", "a dog sat", "sun", "pos", "neg"]
    assert rows[0]["scores"]["exact_match"] == 1.0 and rows[0]["task"] == "story" and rows[0]["input"] == "p1"
    for key in ("loss_curve", "metrics_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_baseline(tmp_path, results):
    _, after = results
    paths = write_report(tmp_path, after, meta={"model": "tiny"})
    report = json.loads(paths["json"].read_text())
    assert report["tasks"]["story"]["metrics"]["bleu"]["baseline"] is None
    assert report["tasks"]["story"]["metrics"]["bleu"]["change"] is None
    assert "loss_curve" not in paths


def test_eval_config_validates_metric_names():
    with pytest.raises(ConfigError, match=r"run\.yaml: .*'eval\.metrics'.*unknown metric 'rouge_l'"):
        parse_section(EvalConfig, {"metrics": {"story": ["rouge_l"]}}, "run.yaml", ("eval",))
    with pytest.raises(ConfigError, match="unknown key 'batchsize'.*'batch_size'"):
        parse_section(EvalConfig, {"batchsize": 4}, "run.yaml", ("eval",))
    with pytest.raises(ConfigError, match="batch_size"):
        parse_section(EvalConfig, {"batch_size": 0}, "run.yaml", ("eval",))
    cfg = parse_section(EvalConfig, {"metrics": {"story": ["bleu"]}}, "run.yaml", ("eval",))
    assert cfg.metrics_for("story", "generation") == ["bleu"]
    assert cfg.metrics_for("other", "classification") == ["accuracy", "f1"]
    with pytest.raises(EvalError, match="metric 'bleu' does not fit task type 'regression' \\(task 'story'\\)"):
        cfg.check_task_types({"story": "regression"})


def _parser():
    return build_parser()


def test_cli_scores_a_file(tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text("\n".join(json.dumps({"prediction": p, "reference": r})
                               for p, r in [("a b", "a b"), ("c", "d")]) + "\n")
    args = _parser().parse_args(["eval", "--predictions", str(preds), "--metrics", "exact_match,bleu",
                                 "--out", str(tmp_path / "s.json")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["tasks"]["predictions"]["scores"]["exact_match"] == 0.5
    assert "exact_match" in printed and "0.5000" in printed and "sacrebleu signature" in printed
    assert set(written["tasks"]["predictions"]["scores"]) == {"exact_match", "bleu"}


def test_cli_errors_are_dft_errors(tmp_path):
    args = _parser().parse_args(["eval", "--predictions", str(tmp_path / "none.jsonl")])
    with pytest.raises(EvalError, match="not found"):
        args.func(args)
    args = _parser().parse_args(["eval"])
    with pytest.raises(EvalError, match="needs a run config or --predictions"):
        args.func(args)


def test_format_table_lists_every_score(results):
    _, after = results
    table = format_table(after)
    for task in after.tasks.values():
        for key, value in task.scores.items():
            assert f"{value:.4f}" in table and key in table


def test_dft_eval_command(tmp_path, capsys):
    from distributed_ft.cli import main

    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"prediction": "4", "reference": "4"}) + "\n" + json.dumps({"prediction": "5"}) + "\n")
    assert main(["eval", "--predictions", str(preds)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("p.jsonl:2: missing field 'reference'") and "\n" not in err
    preds.write_text(json.dumps({"prediction": "4", "reference": "4"}) + "\n")
    assert main(["eval", "--predictions", str(preds), "--metrics", "exact_match"]) == 0
    assert "1.0000" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "missing.yaml")]) == 2  # a run config goes to the run evaluator
    err = capsys.readouterr().err.strip()
    assert "missing.yaml" in err and "\n" not in err
