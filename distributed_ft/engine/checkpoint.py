"""Whole-or-absent checkpoints: written into a temporary folder, renamed when complete, rotated after.

A checkpoint folder `step-00000050` holds accelerate's state (model or DeepSpeed shards, optimizer,
per-rank RNG) plus `trainer_state.json` (step, sampler position, extra state) written last. Only
folders with that name pattern and that file count; anything else (a save killed halfway) is ignored.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


class CheckpointManager:
    def __init__(self, root: Path, accelerator, keep: int):
        self.root, self.accelerator, self.keep = Path(root), accelerator, keep

    def clean_incomplete(self) -> None:
        """Remove leftovers of interrupted saves (main process only)."""
        if self.accelerator.is_main_process and self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(".tmp-") or (_NAME.match(path.name) and not (path / STATE_FILE).is_file()):
                    shutil.rmtree(path, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, step: int, trainer_state: dict) -> Path:
        """Collective: every rank must call it. Returns the final folder."""
        acc = self.accelerator
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
            _fsync_tree(tmp)
            if final.exists():  # a stale copy of the same step from an earlier attempt
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        for old in complete_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, folder: Path) -> dict:
        """Collective: restore accelerate's state and return trainer_state.json's contents."""
        self.accelerator.load_state(str(folder))
        return json.loads((Path(folder) / STATE_FILE).read_text())


def resolve_resume(resume_from: str | None, root: Path) -> Path | None:
    """`latest` -> newest complete checkpoint or None (fresh start); a path must be a complete checkpoint."""
    from distributed_ft.errors import ConfigError

    if resume_from is None:
        return None
    if resume_from == "latest":
        return latest_checkpoint(root)
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"training.resume_from: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path
