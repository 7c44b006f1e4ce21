"""Prompting only: nothing trains; the config describes how zero-/few-shot prompts are built."""
from __future__ import annotations

import string
from typing import Callable, Literal

from pydantic import Field, field_validator
from torch import nn

from distributed_ft.errors import DataError
from distributed_ft.strategies.common import freeze_all
from distributed_ft.strategies.registry import register
from distributed_ft.strict import StrictModel
from distributed_ft.tasks import get_task


class PromptConfig(StrictModel):
    name: Literal["prompt"] = "prompt"
    template: str = "{input}"  # how one input is shown; must contain {input} and no other field
    instruction: str = ""  # text placed before the shots and the query
    few_shot: int = Field(0, ge=0)  # how many solved examples precede the query
    shot_separator: str = "\n\n"  # between the instruction, each shot and the query
    answer_separator: str = " "  # between a shot's formatted input and its answer

    @field_validator("template")
    @classmethod
    def _one_field(cls, template: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as err:
            raise ValueError(f"bad template: {err}") from None
        if fields != {"input"}:
            raise ValueError("template must contain the field {input} and no other "
                             f"(found: {', '.join(sorted(fields)) or 'none'}); write literal braces as {{{{ }}}}")
        return template


def build_prompt(cfg: PromptConfig, query: str, shots: list[tuple[str, str]]) -> str:
    """Instruction, then the first `cfg.few_shot` (input, answer) shots, then the query, joined by shot_separator."""
    if len(shots) < cfg.few_shot:
        raise DataError(f"prompt strategy: few_shot={cfg.few_shot} but only {len(shots)} example(s) available")
    parts = [cfg.instruction] if cfg.instruction else []
    parts += [cfg.template.format(input=x) + cfg.answer_separator + y for x, y in shots[:cfg.few_shot]]
    parts.append(cfg.template.format(input=query))
    return cfg.shot_separator.join(parts)


def build_few_shot_records(cfg: PromptConfig, records: list[dict],
                           solved_examples: Callable[[str, int], list[tuple[str, str]]]) -> list[dict]:
    """Generation records with their prompts rebuilt for prompting: the instruction, `few_shot` solved
    (input, answer) examples of the record's own task (`solved_examples(task, n)`), then the query."""
    shots = {task: solved_examples(task, cfg.few_shot) if cfg.few_shot else [] for task in {r["task"] for r in records}}
    return [{**r, "prompt": build_prompt(cfg, r["prompt"], shots[r["task"]])} if "prompt" in r else r
            for r in records]


def apply(model: nn.Module, cfg: PromptConfig, task: str) -> nn.Module:
    get_task(task)  # an unknown task is a one-line error
    freeze_all(model)
    return model


register("prompt", description="zero-/few-shot prompting; no weight trains", config_cls=PromptConfig,
         apply=apply, trains=False, few_shot=True)
