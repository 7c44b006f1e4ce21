"""Weighted multi-task sampling: a deterministic, resumable stream of example indices.

Each draw picks a task with probability proportional to its weight, then takes that task's next example
from a per-task shuffled epoch order (a new shuffle each epoch). Indices address the concatenation of the
task datasets in task order. Everything is a function of (seed, draw count, per-task positions), so the
state is a few integers and a restored sampler continues the exact same sequence.
"""
from __future__ import annotations

import numpy as np

from distributed_ft.errors import DataError

_BLOCK = 4096  # task choices are drawn in blocks, each from its own seeded generator


class WeightedMixSampler:
    def __init__(self, task_sizes: list[int], weights: list[float], seed: int):
        if not task_sizes or len(task_sizes) != len(weights):
            raise ValueError("task_sizes and weights must be non-empty and of equal length")
        if any(size <= 0 for size in task_sizes):
            raise ValueError(f"every task needs at least one example (sizes {task_sizes})")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive (got {weights})")
        self.task_sizes = [int(s) for s in task_sizes]
        total = float(sum(weights))
        self.probs = np.asarray(weights, dtype=np.float64) / total
        self.seed = int(seed)
        self.offsets = np.concatenate([[0], np.cumsum(self.task_sizes)[:-1]]).astype(np.int64)
        self.draws = 0
        self.positions = [0] * len(task_sizes)
        self.epochs = [0] * len(task_sizes)
        self._block_id: int | None = None
        self._block: np.ndarray | None = None
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def _choices(self, block_id: int) -> np.ndarray:
        if block_id != self._block_id:
            rng = np.random.default_rng([self.seed, 0, block_id])
            self._block = rng.choice(len(self.task_sizes), size=_BLOCK, p=self.probs)
            self._block_id = block_id
        return self._block

    def _order(self, task: int) -> np.ndarray:
        epoch = self.epochs[task]
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, 1 + task, epoch])
            cached = (epoch, rng.permutation(self.task_sizes[task]))
            self._orders[task] = cached
        return cached[1]

    def next_indices(self, n: int) -> list[int]:
        """The next `n` global example indices."""
        out: list[int] = []
        while len(out) < n:
            block_id, start = divmod(self.draws, _BLOCK)
            tasks = self._choices(block_id)[start:start + n - len(out)]
            for task in tasks.tolist():
                order = self._order(task)
                out.append(int(self.offsets[task] + order[self.positions[task]]))
                self.positions[task] += 1
                if self.positions[task] == self.task_sizes[task]:
                    self.positions[task] = 0
                    self.epochs[task] += 1
            self.draws += len(tasks)
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": self.draws, "positions": list(self.positions),
                "epochs": list(self.epochs), "task_sizes": list(self.task_sizes)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["task_sizes"]) != self.task_sizes:
            raise DataError(f"the saved data sampler state is for task sizes {state['task_sizes']}, but the "
                            f"data now gives {self.task_sizes}; resume with the same data config")
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self.positions = [int(p) for p in state["positions"]]
        self.epochs = [int(e) for e in state["epochs"]]
        self._block_id, self._block, self._orders = None, None, {}
