"""Run logging on the main process: metrics JSONL, a progress bar and optional wandb."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("distributed_ft")


def setup_console_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="[dft] %(message)s", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class RunLogger:
    """Writes metrics rows to metrics.jsonl (appending across resumes) and mirrors them to wandb."""

    def __init__(self, run_dir: Path, logging_cfg, config_dict: dict, is_main: bool, total_steps: int):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb_run = None
        if not is_main:
            return
        if logging_cfg.progress_bar and total_steps:
            from tqdm.auto import tqdm

            # Batch logs (Slurm, CI) get a line every few seconds instead of a redraw per step.
            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 10.0)
        self.wandb_run = _start_wandb(logging_cfg.wandb, config_dict, run_dir)

    def rewind(self, step: int) -> None:
        """Drop rows logged after `step`: a resumed run redoes them (a fresh start rewinds to 0)."""
        if self.bar is not None:
            self.bar.n = step
        if not self.is_main or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(wandb_cfg, config_dict: dict, run_dir: Path):
    mode = wandb_cfg.mode
    if mode == "disabled":
        return None
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        logger.warning("wandb: no WANDB_API_KEY in the environment; logging offline instead")
        mode = "offline"
    import wandb

    # The key only ever comes from the environment; the uploaded config holds no credentials.
    return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.run_name,
                      tags=wandb_cfg.tags, mode=mode, dir=str(run_dir), config=config_dict)
