"""Built-in synthetic tasks: correct references, determinism, distinct inputs, task types."""
from __future__ import annotations

import re

import pytest

from distributed_ft.data.builtin import BUILTIN_TASK_TYPES, builtin_corpus, builtin_rows
from distributed_ft.errors import DataError

NAMES = ["arithmetic", "reverse", "sort", "copy", "parity", "count"]


def items_of(prompt: str, name: str) -> list[str]:
    match = re.fullmatch(rf"{name}: (.+) =", prompt)
    assert match, prompt
    return match.group(1).split(" ")


def test_arithmetic_references_are_correct():
    for row in builtin_rows("arithmetic", 500, seed=0):
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", row["prompt"]).groups()
        want = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert row["completion"] == str(want) and want >= 0


def test_reverse_copy_sort_references_are_correct():
    for row in builtin_rows("reverse", 300, seed=1):
        assert row["completion"].split() == items_of(row["prompt"], "reverse")[::-1]
    for row in builtin_rows("copy", 300, seed=1):
        assert row["completion"].split() == items_of(row["prompt"], "copy")
    for row in builtin_rows("sort", 300, seed=1):
        digits = items_of(row["prompt"], "sort")[0]
        assert row["completion"].strip() == "".join(sorted(digits)) and digits.isdigit()


def test_parity_and_count_labels():
    for row in builtin_rows("parity", 300, seed=2):
        bits = row["text"].removeprefix("parity: ")
        assert set(bits) <= {"0", "1"} and row["label"] == bits.count("1") % 2
    assert {r["label"] for r in builtin_rows("parity", 300, seed=2)} == {0, 1}
    for row in builtin_rows("count", 300, seed=2):
        assert row["value"] == float(len(row["text"].removeprefix("count: ").split()))
    for row in builtin_rows("parity", 100, seed=2, generative=True):
        bits = items_of(row["prompt"], "parity")[0]
        assert row["completion"] == f" {bits.count('1') % 2}"
    for row in builtin_rows("count", 100, seed=2, generative=True):
        assert row["completion"] == f" {len(items_of(row['prompt'], 'count'))}"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_distinct_and_short(name):
    rows = builtin_rows(name, 400, seed=3)
    assert rows == builtin_rows(name, 400, seed=3)
    assert rows != builtin_rows(name, 400, seed=4)
    inputs = [r.get("prompt", r.get("text")) for r in rows]
    assert len(set(inputs)) == len(inputs) == 400
    # Short: at most ~30 characters of input and output together.
    assert max(len(r.get("prompt", r.get("text", ""))) + len(r.get("completion", "")) for r in rows) <= 40


def test_task_types_and_corpus_cover_every_task():
    assert set(BUILTIN_TASK_TYPES) == set(NAMES)
    assert BUILTIN_TASK_TYPES["parity"] == "sequence_classification"
    assert BUILTIN_TASK_TYPES["count"] == "regression"
    corpus = builtin_corpus()
    assert corpus == builtin_corpus(seed=0)
    for prefix in ["reverse:", "sort:", "copy:", "parity:", "count:"]:
        assert any(text.startswith(prefix) for text in corpus)
    assert any(re.fullmatch(r"\d+[+-]\d+=\d+", text) for text in corpus)


def test_impossible_request_is_a_data_error():
    with pytest.raises(DataError, match="cannot produce 100000 distinct"):
        builtin_rows("arithmetic", 100_000, seed=0)
    with pytest.raises(DataError, match="unknown builtin task 'nope'"):
        builtin_rows("nope", 1, seed=0)
