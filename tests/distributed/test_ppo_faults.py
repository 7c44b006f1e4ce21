"""Grader faults during PPO: an outage masks samples and the run goes on; a dead grader aborts cleanly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.grader_process import start_grader, stop

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
GRADER_SPEC = "configs/ppo/grader_letters.yaml"
ENV = {"OMP_NUM_THREADS": "1"}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

COMMON = ["ppo.rollout_batch_size=8", "ppo.num_generations=2", "ppo.max_new_tokens=6", "ppo.eval_prompts=8",
          "training.micro_batch_size=8", "grader.config=null", "grader.retries=1", "grader.timeout_s=5",
          "logging.progress_bar=false"]


def _launch(out: Path, url: str, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distributed_ft", "ppo", "configs/ppo/quickstart.yaml", f"output.dir={out}",
           f"grader.urls=[{url}]", *COMMON, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} steps logged after {timeout}s")


def test_outage_masks_samples_and_run_continues(tmp_path):
    from distributed_ft.rl.grading import free_port

    port = free_port()
    grader, url = start_grader(GRADER_SPEC, port)
    out = tmp_path / "outage"
    run = _launch(out, url, "training.max_steps=12", "ppo.unscorable_threshold=1.0")
    try:
        _wait_rows(out, 2, run)
        stop(grader)                                 # the grader dies mid-run ...
        _wait_rows(out, 5, run)
        grader, _ = start_grader(GRADER_SPEC, port)  # ... and comes back on the same address
        _, err = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
        stop(grader)
    assert run.returncode == 0, err[-3000:]
    history = rows(out)
    assert [r["step"] for r in history] == list(range(1, 13))
    lost = [r for r in history if r["unscorable"] > 0]
    assert lost and any(r["unscorable_rate"] == 1.0 for r in lost)
    assert history[-1]["unscorable"] == 0 and history[0]["unscorable"] == 0
    report = json.loads((out / "eval" / "ppo_reward.json").read_text())
    assert report["after"]["scored"] == 8


def test_dead_grader_aborts_with_checkpoint_and_message(tmp_path):
    grader, url = start_grader(GRADER_SPEC, env=ENV)
    out = tmp_path / "abort"
    run = _launch(out, url, "training.max_steps=50", "ppo.unscorable_threshold=0.5")
    try:
        _wait_rows(out, 3, run)
        stop(grader)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
        stop(grader)
    assert run.returncode == 2
    message = err.strip().splitlines()[-1]
    assert message.startswith("error:") and "unscorable" in message and "checkpoint saved" in message
    assert "resume_from=latest" in message
    from distributed_ft.engine.checkpoint import latest_checkpoint

    latest = latest_checkpoint(out / "checkpoints")
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == len(rows(out)) >= 3
