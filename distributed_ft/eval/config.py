"""The `eval` config section: what to evaluate, how to generate, and which metrics per task."""
from __future__ import annotations

from pydantic import Field, field_validator

from distributed_ft.strict import StrictModel
from distributed_ft.errors import EvalError
from distributed_ft.eval.metrics import DEFAULT_METRICS, check_metric_name, resolve_metrics


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
    # task names evaluated before and after training (to measure forgetting).
    retention: list[str] = []

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

    def metrics_for(self, task: str, task_type: str) -> list[str]:
        """The metric names for `task`, checked against its task type (raises EvalError if one does not fit)."""
        names = self.metrics.get(task)
        names = list(DEFAULT_METRICS.get(task_type, [])) if names is None else list(names)
        resolve_metrics(names, task_type, task)
        return names

    def check_task_types(self, task_types: dict[str, str]) -> None:
        """Check every configured task's metrics fit its type; call once the data config is known."""
        for task in self.metrics:
            if task in task_types:
                self.metrics_for(task, task_types[task])
