"""PPO prompts from the `data` section: each row becomes {"prompt": str, "item": row} for the grader.

Built-in tasks give prompt + completion rows; the completion (stripped) is passed to the grader as
`item.reference`. File rows keep every column as the item; the prompt column is `prompt` unless the dataset
maps it with `columns: {prompt: <column>}`. Held-out prompts come from data.validation or
data.validation_fraction, split as in supervised runs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from distributed_ft.errors import DataError


@dataclass
class PromptSet:
    train: list[dict]
    held_out: list[dict]


def _items(spec, seed: int) -> list[dict]:
    from distributed_ft.data.sources import load_rows

    rows = load_rows(spec, seed, generative=True)
    column = spec.columns.get("prompt", "prompt")
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if column not in row or not isinstance(row[column], str):
            raise DataError(f"task '{spec.task_name}': row {i} of {spec.source} has no text column '{column}' "
                            f"(map it with columns: {{prompt: <column>}})")
        if spec.builtin is not None:
            row["reference"] = row["completion"].strip()
        row["task"] = spec.task_name
        out.append({"prompt": row[column], "item": row})
    return out


def build_prompts(data_cfg, seed: int) -> PromptSet:
    from distributed_ft.data import VALIDATION_SEED_OFFSET
    from distributed_ft.data import hold_out

    train, held = [], []
    for spec in data_cfg.train:
        items = _items(spec, seed)
        if data_cfg.validation_fraction > 0:
            items, val = hold_out(items, data_cfg.validation_fraction, seed, spec.task_name)
            held.extend(val)
        train.extend(items)
    seen = {p["prompt"] for p in train}
    for spec in data_cfg.validation or []:
        held.extend(p for p in _items(spec, seed + VALIDATION_SEED_OFFSET) if p["prompt"] not in seen)
    if not train:
        raise DataError("data.train yields no prompts")
    return PromptSet(train, held)


class PromptStream:
    """An endless, reshuffled-per-epoch order of prompt indices, restartable from a position."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.position = n, seed, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"ppo-prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            take = min(k - len(out), self.n - offset)
            out.extend(self._order(epoch)[offset:offset + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
