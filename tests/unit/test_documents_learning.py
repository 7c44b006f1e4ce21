"""Learning on the built-in handbook, end to end through `dft train`: two short runs that differ only in
whether abstention examples are mixed in. Both learn the pages (held-out-page perplexity falls); the run
with abstention examples also recalls the trained facts (from about 0) and makes up answers to questions
the pages do not answer far less often than the run without them. All read back from the runs' reports.

Retention under mixing needs a model that already knows another task: tests/unit/test_forgetting.py
trains one first and shows the report's retention bound exceeded by a run on the pages alone and kept by
a run that replays the task; configs/documents.yaml does the same from the quickstart's model."""
from __future__ import annotations

import json
import pytest
import yaml

from tests.conftest import run_dft

pytestmark = pytest.mark.slow


def train(tmp_path, name: str, *, abstain: bool):
    pages = {"builtin": "handbook", "split": "documents", "weight": 1, "task": "pages"}
    qa = {"builtin": "handbook", "split": "qa_trained", "weight": 3, "task": "qa", "num_examples": 12}
    abstention = [{"builtin": "handbook", "split": "abstain", "weight": 1, "task": "abstain"}] if abstain else []
    config = {
        "model": {"builtin": "tiny"},
        "data": {
            "train": [pages, qa, *abstention],
            "validation": [{"builtin": "handbook", "split": "heldout", "task": "heldout_pages"},
                           {"builtin": "handbook", "split": "qa_trained", "task": "trained_facts", "num_examples": 12},
                           {"builtin": "handbook", "split": "unanswerable", "task": "unanswerable"}],
            "max_length": 128},
        "strategy": {"name": "full"},
        "training": {"max_steps": 80, "micro_batch_size": 16, "learning_rate": 0.003, "warmup_steps": 10,
                     "seed": 0, "checkpoint_every": 1000},
        "logging": {"log_every": 50, "progress_bar": False},
        "eval": {"batch_size": 32, "max_new_tokens": 28,
                 "metrics": {"heldout_pages": ["perplexity"], "trained_facts": ["exact_match", "token_f1"],
                             "unanswerable": ["abstention"]}},
        "output": {"dir": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_dft("train", path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / name / "eval" / "report.json").read_text())
    return {(r["task"], r["metric"]): r for r in report["knowledge"]}, proc.stderr


def test_the_tiny_model_learns_the_handbook_and_abstention_examples_cut_hallucination(tmp_path):
    with_abstain, log = train(tmp_path, "with_abstain", abstain=True)
    without, _ = train(tmp_path, "without_abstain", abstain=False)
    for rows in (with_abstain, without):  # both read the pages
        perplexity = rows[("heldout_pages", "perplexity")]
        assert perplexity["fine_tuned"] < 0.2 * perplexity["baseline"], perplexity
    recall = with_abstain[("trained_facts", "token_f1")]
    assert recall["baseline"] < 0.1 and recall["fine_tuned"] > recall["baseline"] + 0.3, recall
    key = ("unanswerable", "hallucination")
    # Without abstention examples the run answers the unanswerable questions anyway, in the shape of the
    # trained answers ("SP-4230", "Sofialva"); with them it declines.
    assert without[key]["fine_tuned"] >= 0.5, without[key]
    assert with_abstain[key]["fine_tuned"] <= without[key]["fine_tuned"] - 0.5, (with_abstain[key], without[key])
    assert with_abstain[("unanswerable", "abstention")]["fine_tuned"] >= 0.5, with_abstain
    markdown = (tmp_path / "with_abstain" / "eval" / "report.md").read_text()
    assert "## Knowledge and retention" in markdown and "| hallucination rate | unanswerable |" in markdown
    assert "data pages (documents, train): 25 documents read" in log
