"""The `eval` config section: what to evaluate, how to generate, and which metrics per task."""
from __future__ import annotations

from pydantic import Field, field_validator

from distributed_ft.strict import StrictModel
from distributed_ft.errors import EvalError
from distributed_ft.eval.metrics import DEFAULT_ABSTAIN_PHRASES, DEFAULT_METRICS, check_metric_name, resolve_metrics


class EvalConfig(StrictModel):
    enabled: bool = True
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    every_n_steps: int | None = Field(None, ge=1)
    max_samples: int | None = Field(None, ge=1)
    # task name -> metric names; tasks not listed get DEFAULT_METRICS for their task type.
    metrics: dict[str, list[str]] = {}
    rouge_stemmer: bool = True
    normalize_exact_match: bool = True
    # task names evaluated before and after training (to measure forgetting), and the largest drop of
    # their first metric the report accepts as retained
    retention: list[str] = []
    max_retention_drop: float | None = Field(None, ge=0)
    # answers counted as abstaining on unanswerable questions (besides each question's own reference)
    abstain_phrases: list[str] = list(DEFAULT_ABSTAIN_PHRASES)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for task, names in value.items():
            for name in names:
                try:
                    check_metric_name(name)
                except EvalError as err:
                    raise ValueError(f"task '{task}': {err}") from None
        return value

    def metrics_for(self, task: str, task_type: str, text_only: bool = False) -> list[str]:
        """The metric names for `task`, checked against its task type (raises EvalError if one does not fit).

        A `text_only` task (records without prompts: held-out documents) has nothing to answer, so its
        default is perplexity.
        """
        names = self.metrics.get(task)
        if names is None:
            names = ["perplexity"] if text_only else DEFAULT_METRICS.get(task_type, [])
        names = list(names)
        resolve_metrics(names, task_type, task)
        return names

    def check_task_types(self, task_types: dict[str, str]) -> None:
        """Check every configured task's metrics fit its type; call once the data config is known."""
        for task in self.metrics:
            if task in task_types:
                self.metrics_for(task, task_types[task])
