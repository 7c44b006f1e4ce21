"""The loop control every training recipe shares: resume from the latest complete checkpoint, a stop
signal agreed across ranks at the step boundary, and periodic checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distributed_ft.engine.checkpoint import CheckpointManager, resolve_resume
from distributed_ft.engine.logging import logger
from distributed_ft.engine.signals import StopRequest


@dataclass
class Resumed:
    step: int
    state: dict          # the trainer state the checkpoint was saved with
    folder: str


class LoopControl:
    """Use as a context manager around the loop: it installs the stop handlers and restores them after."""

    def __init__(self, accelerator, training, run_dir: Path, run_logger):
        self.acc, self.training, self.log = accelerator, training, run_logger
        self.checkpoints = CheckpointManager(Path(run_dir) / "checkpoints", accelerator, training.keep_checkpoints)
        self.stop: StopRequest | None = None
        self.stopped_by: str | None = None

    def __enter__(self) -> "LoopControl":
        self.stop = StopRequest()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.restore()

    def resume(self) -> Resumed | None:
        """Collective: restore the checkpoint `training.resume_from` names (accelerate's state: model,
        optimizer, scheduler, RNG) and rewind the metrics log to its step. None on a fresh start."""
        self.checkpoints.clean_incomplete()
        folder = resolve_resume(self.training.resume_from, self.checkpoints.root)
        resumed = None
        if folder is not None:
            state = self.checkpoints.load(folder)
            resumed = Resumed(state.pop("step"), state, str(folder))
            logger.info(f"resumed from {folder} at step {resumed.step}")
        self.log.rewind(resumed.step if resumed else 0)
        return resumed

    @property
    def stop_requested_here(self) -> bool:
        """This rank's own flag, for a loop that reduces it with its other step statistics."""
        return self.stop.requested

    def save(self, step: int, state: dict) -> Path:
        """Collective: a whole-or-absent checkpoint of accelerate's state plus `state`."""
        return self.checkpoints.save(step, state)

    def end_of_step(self, step: int, state: Callable[[], dict], agreed_stop: bool | None = None) -> bool:
        """Collective, after step `step`: True when the run must stop (a signal reached any rank; a checkpoint
        is saved). `agreed_stop` is the flag already reduced over ranks, else it is reduced here."""
        if agreed_stop is None:
            flag = torch.tensor([1.0 if self.stop.requested else 0.0])
            if self.acc.num_processes > 1:
                flag = self.acc.reduce(flag.to(self.acc.device), reduction="sum").cpu()
            agreed_stop = bool(flag[0] > 0)
        if agreed_stop:
            self.stopped_by = self.stop.signal_name or "signal on another rank"
            self.save(step, state())
            logger.info(f"stopping at step {step} ({self.stopped_by}); checkpoint saved")
            return True
        every = self.training.checkpoint_every
        if every and step % every == 0 and step < self.training.max_steps:
            self.save(step, state())
        return False
