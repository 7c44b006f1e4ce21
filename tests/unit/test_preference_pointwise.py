"""`dft rm` with the pointwise objective: built-in graded samples scored by a rule grader, the pointwise
quickstart as shipped reaching Spearman >= 0.8 with that grader on held-out samples (from about 0), and the
run's grader spec, served in-process, scoring held-out samples exactly as the run's own evaluation."""
from __future__ import annotations

import json

import pytest
import torch

from distributed_ft.grader.text_metrics import fuzzy_match
from distributed_ft.preference.evaluate import agreement_metrics
from distributed_ft.preference.graded import builtin_graded
from tests.conftest import run_dft

RUN = ["logging.progress_bar=false"]


def test_builtin_graded_samples_are_scored_by_the_rule_grader():
    rows = builtin_graded("sort", 300, seed=1)
    assert rows == builtin_graded("sort", 300, seed=1)
    assert all(r["score"] == fuzzy_match(r["output"], r["reference"]) for r in rows)
    perfect = [r for r in rows if r["output"] == r["reference"]]
    assert 0.1 < len(perfect) / len(rows) < 0.5 and all(r["score"] == 1.0 for r in perfect)
    assert len({round(r["score"], 3) for r in rows}) >= 5  # graded, not binary


def test_agreement_metrics():
    source = torch.tensor([0.0, 0.2, 0.4, 0.9, 1.0])
    m = agreement_metrics(source * 2 + 1, source, threshold=0.5)
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    m = agreement_metrics(torch.tensor([5.0, 4, 3, 2, 1]), source, threshold=0.5)
    assert m["spearman"] == pytest.approx(-1.0)
    m = agreement_metrics(torch.tensor([0.1, 0.1, 0.6, 0.3, 1.0]), source, threshold=0.5)
    assert m["mae"] == pytest.approx((0.1 + 0.1 + 0.2 + 0.6 + 0.0) / 5) and m["accuracy"] == pytest.approx(0.6)
    # ties share their mean rank
    assert agreement_metrics(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]), 0.5)["spearman"] \
        == pytest.approx(0.8660254, abs=1e-6)


def test_pointwise_quickstart_agrees_with_its_source_grader_and_serves(tmp_path):
    from distributed_ft.config import load_config
    from distributed_ft.grader.engine import grade_entries, load_grader
    from distributed_ft.preference.graded import build_graded

    out = tmp_path / "pw"
    proc = run_dft("rm", "configs/rm/pointwise.yaml", f"output.dir={out}", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "preference_eval.json").read_text())
    before, after = report["baseline"], report["final"]
    assert abs(before["spearman"]) < 0.3 and after["spearman"] >= 0.8, report
    assert after["mae"] < before["mae"] - 0.2 and after["pearson"] >= 0.8, report
    config = load_config("configs/rm/pointwise.yaml", RUN, kind="rm")
    _, held = build_graded(config.samples, config.training.seed)
    grader = load_grader(str(out / "grader.yaml"))
    try:
        results = grade_entries(grader, [{"sample": {"output_text": r["output"]}, "item": r} for r in held])
    finally:
        grader.close()
    served = torch.tensor([r.reward for r in results])
    m = agreement_metrics(served, torch.tensor([r["score"] for r in held]), config.rm.threshold)
    assert m == pytest.approx(after, rel=1e-4, abs=1e-6)
