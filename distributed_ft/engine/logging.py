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
    """Writes metrics rows to metrics.jsonl (appending across resumes) and to accelerate's trackers."""

    def __init__(self, run_dir: Path, logging_cfg, config_dict: dict, accelerator, total_steps: int):
        self.acc = accelerator
        self.is_main = accelerator.is_main_process
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.trackers = bool(accelerator.log_with)
        if self.trackers:  # every rank calls it; accelerate starts the trackers on the main process
            accelerator.init_trackers(logging_cfg.project, config=flat_config(config_dict),
                                      init_kwargs=tracker_options(logging_cfg, run_dir))
        if self.is_main and logging_cfg.progress_bar and total_steps:
            from tqdm.auto import tqdm

            # Batch logs (Slurm, CI) get a line every few seconds instead of a redraw per step.
            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 10.0)

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
        if self.trackers:
            self.acc.log(tracker_row(row), step=row["step"])

    def log_to_tracker(self, scores: dict, step: int) -> None:
        """Scores that metrics.jsonl keeps elsewhere (the final evaluation's report): to the trackers only."""
        if self.trackers:
            self.acc.log(scores, step=step)

    def progress(self, step: int, **shown: str) -> None:
        """Move the progress bar to `step`, showing `shown` (name -> formatted value) beside it."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(**shown, refresh=False)

    def end_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def tracker_row(row: dict) -> dict:
    """A metrics row for the trackers: a name that also heads a group (`loss` beside `loss/<task>`) becomes
    `loss/all`, since file-backed trackers (mlflow) store `loss` as a file where `loss/` must be a folder;
    values not measured this step (None) are left out."""
    return {f"{key}/all" if any(other.startswith(f"{key}/") for other in row) else key: value
            for key, value in row.items() if key != "step" and value is not None}  # None: not measured


def flat_config(config: dict, prefix: str = "") -> dict:
    """The config as flat `section.key` scalars, the form every tracker's hyper-parameters take."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) or value is None else json.dumps(value)
    return flat


def wandb_logged_in() -> bool:
    """A wandb key in the environment or in the login store `wandb login` writes (~/.netrc)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def tracker_options(logging_cfg, run_dir: Path) -> dict:
    """accelerate's init_kwargs: everything a tracker writes stays inside the run folder."""
    options = {}
    if "wandb" in logging_cfg.active_trackers:
        mode = logging_cfg.wandb.mode or "online"
        if mode == "online" and not wandb_logged_in():
            logger.warning("wandb: no key in WANDB_API_KEY or from `wandb login`; logging offline instead")
            mode = "offline"
        options["wandb"] = {"mode": mode, "dir": str(run_dir), "entity": logging_cfg.wandb.entity,
                            "tags": logging_cfg.wandb.tags, "name": logging_cfg.run_name}
    if "mlflow" in logging_cfg.active_trackers:
        # A local file store in the run folder unless the environment names a tracking server (mlflow 3 keeps
        # file stores working only on request).
        if "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ["MLFLOW_TRACKING_URI"] = (Path(run_dir) / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        options["mlflow"] = {"run_name": logging_cfg.run_name}
    return options
