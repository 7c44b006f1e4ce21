"""The one task vocabulary: what a model is trained to do, and what that means for data and evaluation.

A model task (`model.task` in a config) decides the data kind its rows are normalised to, which
record fields the evaluation reads, and which metrics fit. Every package asks this module instead of
keeping a table of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distributed_ft.errors import ConfigError

# The label id the loss skips (prompt tokens, padding): PyTorch's cross-entropy default.
IGNORE_INDEX = -100

ModelTask = Literal["causal_lm", "sequence_classification", "regression"]
Kind = Literal["generation", "classification", "regression"]


@dataclass(frozen=True)
class Task:
    name: str          # the model task
    kind: str          # the data rows and the evaluation: generation, classification or regression
    input_field: str   # the evaluation record's input
    target_field: str  # the evaluation record's reference
    has_head: bool     # a new output head (classifier / regressor) sits on the backbone


TASKS: dict[str, Task] = {
    "causal_lm": Task("causal_lm", "generation", "prompt", "reference", has_head=False),
    "sequence_classification": Task("sequence_classification", "classification", "text", "label", has_head=True),
    "regression": Task("regression", "regression", "text", "value", has_head=True),
}
MODEL_TASKS = tuple(TASKS)
KINDS = tuple(t.kind for t in TASKS.values())
_BY_KIND = {t.kind: t for t in TASKS.values()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown model task '{name}'; expected one of: {', '.join(MODEL_TASKS)}")
    return TASKS[name]


def task_of_kind(kind: str) -> Task:
    if kind not in _BY_KIND:
        raise ConfigError(f"unknown task type '{kind}'; expected one of: {', '.join(KINDS)}")
    return _BY_KIND[kind]


def kind_of(task: str) -> str:
    """The data and evaluation kind of a model task."""
    return get_task(task).kind
