"""Grader spec loading: OpenAI-format graders load unchanged; bad specs fail with one line naming the field."""
from __future__ import annotations

import json
import math

import pytest

from distributed_ft.errors import ConfigError
from distributed_ft.grader.formula import Formula, FormulaError
from distributed_ft.grader.spec import (LabelModelSpec, MultiSpec, PythonSpec, ScoreModelSpec, StringCheckSpec,
                                        TextSimilaritySpec, load_grader_spec, parse_grader_spec)

# Written in the JSON shape of OpenAI's reinforcement fine-tuning graders (multi with nested sub-graders).
OPENAI_MULTI = {
    "type": "multi",
    "name": "combined",
    "graders": {
        "exact": {"type": "string_check", "name": "exact", "input": "{{ sample.output_json.answer }}",
                  "reference": "{{ item.reference_answer }}", "operation": "eq"},
        "sim": {"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
                "reference": "{{ item.reference_answer }}", "evaluation_metric": "fuzzy_match"},
        "code": {"type": "python", "name": "code", "image_tag": "2025-05-08",
                 "source": "def grade(sample, item) -> float:\n    return 1.0\n"},
        "judge": {"type": "score_model", "name": "judge", "model": "o4-mini-2025-04-16", "range": [0, 1],
                  "sampling_params": {"seed": 42, "temperature": 1, "top_p": 1, "max_completions_tokens": 32768,
                                      "reasoning_effort": "medium"},
                  "input": [{"role": "system", "content": "Grade it."},
                            {"role": "user", "type": "message",
                             "content": {"type": "input_text", "text": "{{ sample.output_text }}"}}]},
        "label": {"type": "label_model", "name": "label", "model": "gpt-4o-2024-08-06",
                  "input": [{"role": "user", "content": "Is {{ sample.output_text }} polite?"}],
                  "labels": ["polite", "rude"], "passing_labels": ["polite"]},
    },
    "calculate_output": "0.5 * exact + 0.2 * sim + 0.1 * code + 0.1 * judge + 0.1 * label",
}


def test_openai_format_json_loads_unchanged(tmp_path):
    path = tmp_path / "grader.json"
    path.write_text(json.dumps(OPENAI_MULTI))
    spec = load_grader_spec(path)
    assert isinstance(spec, MultiSpec)
    kinds = {k: type(v) for k, v in spec.graders.items()}
    assert kinds == {"exact": StringCheckSpec, "sim": TextSimilaritySpec, "code": PythonSpec,
                     "judge": ScoreModelSpec, "label": LabelModelSpec}
    assert spec.graders["judge"].sampling_params.max_completions_tokens == 32768
    assert spec.graders["judge"].input[1].text() == "{{ sample.output_text }}"
    assert spec.graders["label"].passing_labels == ["polite"]
    # Defaults follow OpenAI's documented python grader limits.
    code = spec.graders["code"]
    assert (code.timeout_s, code.memory_mb, code.max_code_kb) == (120.0, 2048, 256)


def test_yaml_config(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("type: string_check\nname: s\ninput: '{{ sample.output_text }}'\nreference: x\noperation: ilike\n")
    assert load_grader_spec(path).operation == "ilike"


@pytest.mark.parametrize("data, fragment", [
    ({"type": "regex_check", "input": "a"}, "unknown grader type 'regex_check'"),
    ({"input": "a"}, "missing required field 'type'"),
    ({"type": "string_check", "input": "a", "operation": "eq"}, "missing required field 'reference'"),
    ({"type": "string_check", "input": "a", "reference": "b", "operation": "contains"}, "'operation'"),
    ({"type": "string_check", "input": "a", "reference": "b", "operation": "eq", "refrence": 1}, "'refrence'"),
    ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "meteor"}, "meteor"),
    ({"type": "string_check", "input": "{{ answer }}", "reference": "b", "operation": "eq"}, "item. or sample."),
    ({"type": "python", "source": "def grade(s, i):\n  return (\n"}, "syntax error"),
    ({"type": "python", "source": "def score(s, i): return 1"}, "grade(sample, item)"),
    ({"type": "python", "source": "def grade(s, i): return 1  " + "#" * 2048, "max_code_kb": 1}, "kB limit"),
    ({"type": "label_model", "model": "m", "input": [{"role": "user", "content": "x"}], "labels": ["a", "b"],
      "passing_labels": ["c"]}, "passing_labels"),
    ({"type": "multi", "graders": {"a": {"type": "nope"}}, "calculate_output": "a"}, "at graders.a"),
    ({"type": "multi", "graders": {"a": {"type": "string_check", "input": "x", "reference": "y",
                                         "operation": "eq"}}, "calculate_output": "a + b"}, "unknown name 'b'"),
    ({"type": "multi", "graders": {"a": {"type": "string_check", "input": "x", "reference": "y",
                                         "operation": "eq"}}, "calculate_output": "a ** (1"}, "not a valid formula"),
    ({"type": "multi", "graders": {"a": {"type": "string_check", "input": "x", "reference": "y",
                                         "operation": "eq"}}, "calculate_output": "a.__class__"}, "not allowed"),
])
def test_bad_specs_name_the_problem(data, fragment):
    with pytest.raises(ConfigError) as err:
        parse_grader_spec(data, "g.yaml")
    message = str(err.value)
    assert fragment in message and message.startswith("g.yaml") and "\n" not in message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_grader_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_grader_spec(bad)


def test_formula_operators_and_functions():
    values = {"a": 0.25, "b": 4.0}
    f = Formula("max(a, 0.1) + b ^ 2 / 8 - abs(-a) * floor(2.7) + sqrt(b) + log(exp(a)) - ceil(a) + min(a, b, 1)",
                {"a", "b"})
    expected = max(0.25, 0.1) + 4.0 ** 2 / 8 - 0.25 * 2 + 2.0 + 0.25 - 1 + 0.25
    assert f.evaluate(values) == pytest.approx(expected)
    assert Formula("-a^2", {"a"}).evaluate({"a": 3.0}) == -9.0  # power binds tighter than unary minus
    with pytest.raises(FormulaError, match="failed"):
        Formula("a / (b - 4)", {"a", "b"}).evaluate(values)
    with pytest.raises(FormulaError, match="failed"):
        Formula("log(a - 1)", {"a"}).evaluate({"a": 0.5})
    for bad in ("__import__('os')", "a if a else b", "[a][0]", "a < b", "max(*a)", "sqrt(a, b)"):
        with pytest.raises(FormulaError):
            Formula(bad, {"a", "b"})
    assert math.isclose(Formula("2^0.5", set()).evaluate({}), 2 ** 0.5)
