"""`dft grader label` runs an existing grader over samples and writes graded samples; graded samples read
back with one-line errors naming file, row and field (a missing field, a score that is not a number)."""
from __future__ import annotations

import json

import pytest

from distributed_ft.cli import main
from distributed_ft.preference.graded import GradedDataError, read_graded, read_samples

SPEC = """type: string_check
name: exact
input: "{{ sample.output_text }}"
reference: "{{ item.reference }}"
operation: eq
"""


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_grader_label_scores_every_sample_with_the_grader(tmp_path, capsys):
    spec = tmp_path / "g.yaml"
    spec.write_text(SPEC)
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "2+2=", "output": "4", "reference": "4", "id": 7},
        {"prompt": "1+1=", "output": "3", "reference": "2"},
        {"prompt": "x", "output": "y"}])                      # no reference: the template cannot render
    out = tmp_path / "graded.jsonl"
    assert main(["grader", "label", "--config", str(spec), "--input", samples, "--output", str(out),
                 "--batch-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 3 and summary["unscorable"] == 1 and summary["samples_per_s"] > 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, 0.0, None]
    assert rows[0]["id"] == 7 and "reference" in rows[2]["grade_error"]
    with pytest.raises(GradedDataError, match=r"graded.jsonl row 3: missing field 'reference'"):
        read_graded(str(out))
    rows[2]["reference"], rows[2]["score"] = "z", 0.5
    write_jsonl(out, rows)
    assert [r["score"] for r in read_graded(str(out))] == [1.0, 0.0, 0.5]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "output": "o", "reference": "r", "score": "high"}, "row 2: field 'score' must be a number"),
    ({"prompt": "p", "output": "o", "reference": "r", "score": float("nan")}, "row 2: field 'score' must be a number"),
    ({"prompt": "p", "output": "o", "reference": "r"}, "row 2: field 'score' must be a number, got None"),
    ({"prompt": "p", "output": "o", "reference": 3, "score": 1}, "row 2: field 'reference' must be text"),
    ({"prompt": "p", "reference": "r", "score": 1}, "row 2: field 'output' must be text"),
    ("{not json", "row 2: not valid JSON"),
])
def test_bad_graded_samples_get_one_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "output": "o", "reference": "r", "score": 1}, row])
    with pytest.raises(GradedDataError) as err:
        read_graded(path)
    assert str(err.value).startswith(f"{path} {message}") and "\n" not in str(err.value), str(err.value)


def test_label_refuses_a_missing_or_empty_file_in_one_line(tmp_path, capsys):
    with pytest.raises(GradedDataError, match="samples file not found"):
        read_samples(str(tmp_path / "none.jsonl"))
    (tmp_path / "e.jsonl").write_text("\n")
    assert main(["grader", "label", "--config", "configs/grader/string_check.yaml", "--input",
                 str(tmp_path / "e.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith("e.jsonl is empty (0 rows)")
