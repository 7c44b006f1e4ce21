"""The per-sample grading result shared by the grader, its HTTP service and the training-side client."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GradeResult:
    """Reward of one sample; `reward` is None when the sample is unscorable, and `error` then says why."""

    reward: float | None
    sub_rewards: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None

    @property
    def scorable(self) -> bool:
        return self.reward is not None

    @classmethod
    def failed(cls, error: str, sub_rewards: dict | None = None) -> "GradeResult":
        return cls(reward=None, sub_rewards=dict(sub_rewards or {}), error=error)

    def to_dict(self) -> dict[str, Any]:
        return {"reward": self.reward, "sub_rewards": self.sub_rewards, "error": self.error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GradeResult":
        reward = data.get("reward")
        error = data.get("error")
        if reward is not None:
            reward = float(reward)
            if not math.isfinite(reward):
                reward, error = None, error or f"non-finite reward {reward}"
        elif error is None:
            error = "no reward returned"
        return cls(reward=reward, sub_rewards=dict(data.get("sub_rewards") or {}), error=error)


def as_reward(value: Any, what: str) -> float:
    """Turn a grader's return value into a finite float reward, or raise ValueError naming what returned it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} returned {type(value).__name__}, expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} returned non-finite value {value}")
    return value
