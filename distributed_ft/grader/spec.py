"""Grader specs: typed models with OpenAI's grader field names, loaded from one YAML/JSON file.

Fields beyond OpenAI's (all optional) set what a local grader needs: `embedding_model` (cosine),
sandbox limits for python graders, and `device`/`batch_size`/`model_kind` for model graders.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from distributed_ft.strict import StrictModel, parse_section
from distributed_ft.errors import ConfigError
from distributed_ft.grader.formula import Formula, FormulaError
from distributed_ft.grader.template import check_template

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "cosine",
           "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
UNSUPPORTED_METRICS = {"meteor": "needs the WordNet corpus, which cannot be downloaded here"}


class StringCheckSpec(StrictModel):
    type: Literal["string_check"]
    name: str = "string_check"
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilaritySpec(StrictModel):
    type: Literal["text_similarity"]
    name: str = "text_similarity"
    input: str
    reference: str
    evaluation_metric: Literal[METRICS]  # type: ignore[valid-type]
    pass_threshold: Optional[float] = None  # accepted for compatibility with eval graders; reward stays the score
    embedding_model: Optional[str] = None  # local Hugging Face folder for `cosine`
    processes: Optional[int] = Field(None, ge=1, le=64)  # metric processes for large batches (default: CPUs)

    @field_validator("evaluation_metric")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value in UNSUPPORTED_METRICS:
            raise ValueError(f"evaluation_metric '{value}' is not supported ({UNSUPPORTED_METRICS[value]})")
        return value


class PythonSpec(StrictModel):
    type: Literal["python"]
    name: str = "python"
    max_code_kb: int = Field(256, ge=1)
    source: str
    image_tag: Optional[str] = None  # accepted for compatibility; the local interpreter is used
    timeout_s: float = Field(120.0, gt=0)
    memory_mb: int = Field(2048, ge=64)
    workers: int = Field(2, ge=1, le=64)
    allow_unsandboxed: bool = False  # run without namespaces when unshare is unavailable (explicit opt-out)

    @field_validator("source")
    @classmethod
    def _code_ok(cls, value: str, info: ValidationInfo) -> str:
        limit_kb = info.data.get("max_code_kb", 256)
        size = len(value.encode())
        if size > limit_kb * 1024:
            raise ValueError(f"source is {size} bytes, over the {limit_kb} kB limit (max_code_kb)")
        try:
            compile(value, "<grader>", "exec")
        except SyntaxError as err:
            raise ValueError(f"source has a syntax error at line {err.lineno}: {err.msg}") from None
        except (RecursionError, MemoryError):
            raise ValueError("source is too deeply nested to compile") from None
        if not re.search(r"^def\s+grade\s*\(", value, re.M):
            raise ValueError("source must define grade(sample, item)")
        return value


class ContentPart(StrictModel):
    type: str = "input_text"
    text: str


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, ContentPart, list[Union[str, ContentPart]]]
    type: Optional[Literal["message"]] = None

    def text(self) -> str:
        parts = self.content if isinstance(self.content, list) else [self.content]
        return "".join(p if isinstance(p, str) else p.text for p in parts)


class SamplingParams(StrictModel):
    seed: Optional[int] = None
    top_p: Optional[float] = None
    temperature: Optional[float] = None
    max_completions_tokens: Optional[int] = Field(None, ge=1)
    reasoning_effort: Optional[str] = None


class _ModelSpecBase(StrictModel):
    input: list[Message] = Field(min_length=1)
    model: str  # local Hugging Face folder
    device: str = "cpu"
    batch_size: int = Field(16, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("device must be 'cpu', 'cuda' or 'cuda:N'")
        return value


class ScoreModelSpec(_ModelSpecBase):
    type: Literal["score_model"]
    name: str = "score_model"
    range: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2)
    sampling_params: Optional[SamplingParams] = None
    pass_threshold: Optional[float] = None
    model_kind: Literal["auto", "reward", "judge"] = "auto"

    @field_validator("range")
    @classmethod
    def _range(cls, value: list[float]) -> list[float]:
        if value[0] >= value[1]:
            raise ValueError("range must be [low, high] with low < high")
        return value


class LabelModelSpec(_ModelSpecBase):
    type: Literal["label_model"]
    name: str = "label_model"
    labels: list[str] = Field(min_length=2)
    passing_labels: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _subset(self) -> "LabelModelSpec":
        extra = [label for label in self.passing_labels if label not in self.labels]
        if extra:
            raise ValueError(f"passing_labels {extra} are not in labels")
        return self


class MultiSpec(StrictModel):
    type: Literal["multi"]
    name: str = "multi"
    graders: dict[str, Any] = Field(min_length=1)
    calculate_output: str


GraderSpec = Union[StringCheckSpec, TextSimilaritySpec, PythonSpec, ScoreModelSpec, LabelModelSpec, MultiSpec]
SPEC_TYPES: dict[str, type[StrictModel]] = {
    "string_check": StringCheckSpec, "text_similarity": TextSimilaritySpec, "python": PythonSpec,
    "score_model": ScoreModelSpec, "label_model": LabelModelSpec, "multi": MultiSpec,
}


def parse_grader_spec(data: Any, source: str = "grader", prefix: tuple = ()) -> GraderSpec:
    """Validate a grader spec (a dict) recursively; ConfigError names the file, field path and problem."""
    where = ".".join(str(p) for p in prefix) or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: grader at {where} must be a mapping, got {type(data).__name__}")
    gtype = data.get("type")
    if gtype is None:
        raise ConfigError(f"{source}: missing required field '{'.'.join(map(str, prefix + ('type',)))}' "
                          f"(one of: {', '.join(SPEC_TYPES)})")
    if gtype not in SPEC_TYPES:
        raise ConfigError(f"{source}: unknown grader type '{gtype}' at {where} (known: {', '.join(SPEC_TYPES)})")
    spec = parse_section(SPEC_TYPES[gtype], data, source, prefix)
    _check_templates(spec, source, prefix)
    if isinstance(spec, MultiSpec):
        subs = {}
        for key, sub in spec.graders.items():
            if not key.isidentifier():
                raise ConfigError(f"{source}: grader name '{key}' at {where}.graders must be an identifier "
                                  "(letters, digits, _) to be used in calculate_output")
            subs[key] = parse_grader_spec(sub, source, prefix + ("graders", key))
        spec.__dict__["graders"] = subs  # keep parsed sub-specs without re-validating them as plain dicts
        try:
            Formula(spec.calculate_output, set(subs))
        except FormulaError as err:
            raise ConfigError(f"{source}: {err}" + (f" (at {where})" if prefix else "")) from None
    return spec


def _check_templates(spec: StrictModel, source: str, prefix: tuple) -> None:
    fields: list[tuple[str, str]] = []
    for name in ("input", "reference"):
        value = getattr(spec, name, None)
        if isinstance(value, str):
            fields.append((name, value))
    if isinstance(spec, (ScoreModelSpec, LabelModelSpec)):
        fields += [(f"input.{i}.content", m.text()) for i, m in enumerate(spec.input)]
    for name, text in fields:
        try:
            check_template(text, ".".join(map(str, prefix + (name,))))
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None


def read_spec_file(path: str | Path) -> dict:
    """Read one grader spec from a YAML or JSON file (the spec is the top-level mapping)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read grader config ({err.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                          f"({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold one grader spec (a mapping with 'type')")
    return data


def load_grader_spec(path: str | Path) -> GraderSpec:
    """Read and validate the grader spec in `path`."""
    return parse_grader_spec(read_spec_file(path), str(path))
