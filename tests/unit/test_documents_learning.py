"""Learning on the built-in handbook, end to end through `dft train`: held-out-page perplexity falls,
recall of trained facts rises from about 0, and abstention replaces hallucination on questions the pages
do not answer once abstention examples are mixed in; all read back from the run's report."""
from __future__ import annotations

import json
import pytest
import yaml

from tests.conftest import run_dft

pytestmark = pytest.mark.slow


def test_the_tiny_model_learns_the_handbook(tmp_path):
    config = {
        "model": {"builtin": "tiny"},
        "data": {
            "train": [{"builtin": "handbook", "split": "documents", "weight": 1, "task": "pages"},
                      {"builtin": "handbook", "split": "qa_trained", "weight": 3, "task": "qa", "num_examples": 12},
                      {"builtin": "handbook", "split": "abstain", "weight": 1, "task": "abstain"}],
            "validation": [{"builtin": "handbook", "split": "heldout", "task": "heldout_pages"},
                           {"builtin": "handbook", "split": "qa_trained", "task": "trained_facts", "num_examples": 12},
                           {"builtin": "handbook", "split": "unanswerable", "task": "unanswerable"}],
            "max_length": 128},
        "strategy": {"name": "full"},
        "training": {"max_steps": 100, "micro_batch_size": 16, "learning_rate": 0.003, "warmup_steps": 10,
                     "seed": 0, "checkpoint_every": 1000},
        "logging": {"log_every": 50},
        "eval": {"batch_size": 32, "max_new_tokens": 28,
                 "metrics": {"heldout_pages": ["perplexity"], "trained_facts": ["exact_match", "token_f1"],
                             "unanswerable": ["abstention"]}},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "handbook.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_dft("train", path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in report["knowledge"]}
    perplexity = rows[("heldout_pages", "perplexity")]
    assert perplexity["fine_tuned"] < 0.2 * perplexity["baseline"], perplexity
    recall = rows[("trained_facts", "token_f1")]
    assert recall["baseline"] < 0.1 and recall["fine_tuned"] > recall["baseline"] + 0.3, recall
    hallucination = rows[("unanswerable", "hallucination")]
    assert hallucination["fine_tuned"] < hallucination["baseline"] - 0.5, hallucination
    markdown = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "## Knowledge and retention" in markdown and "| hallucination rate | unanswerable |" in markdown
    assert "data pages (documents, train): 25 documents read" in proc.stderr
