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


# A python grader slow enough (0.1 s a sample, 1.6 s for a step's request) to be killed mid-request.
SLOW_GRADER = '''\
type: python
name: slow_letters
source: |
  import time

  def grade(sample, item):
      time.sleep(0.1)
      out = sample["output_text"].replace(" ", "")
      if not out:
          return 0.0
      want = set(item["reference"].replace(" ", ""))
      return sum(c in want for c in out) / len(out)
timeout_s: 10
memory_mb: 512
workers: 1
'''
SAMPLES_PER_STEP = 16  # rollout_batch_size 8 x num_generations 2


class GradeWatch:
    """A TCP relay in front of the grader (the trainer's grader.urls points here) that tells when the /grade
    request it is waiting for has been handed to the grader, whatever the client or the grader's sandbox do
    inside. `wanted()` is asked as each /grade request passes, so the request is picked by what the run has
    logged at that moment, not by when the test looked. When the grader goes away the relay drops the
    trainer's connection, as the dead server's socket would."""

    def __init__(self, grader_port: int, wanted):
        import socket
        import threading

        self.grader_port, self.wanted = grader_port, wanted
        self.forwarded = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.grader_port), timeout=5)
            except OSError:  # the grader is down: the trainer sees its connection closed
                client.close()
                continue
            upstream.settimeout(None)
            for src, dst, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, watch), daemon=True).start()

    def _pump(self, src, dst, watch: bool) -> None:
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if watch and b"POST /grade" in data and not self.forwarded.is_set() and self.wanted():
                    self.forwarded.set()
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._listener.close()


def _samples(out: Path) -> dict[int, list]:
    by_step: dict[int, list] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], []).append(row["reward"])
    return by_step


@pytest.fixture(scope="module")
def grader_killed_mid_request(tmp_path_factory):
    """PPO for 4 steps against an external grader that is SIGKILLed while it serves step 3's /grade request
    (that request's retry finds it gone too), then restarted on the same port once step 3 is logged."""
    import signal

    from distributed_ft.rl.grading import free_port

    tmp = tmp_path_factory.mktemp("grader-killed")
    spec = tmp / "slow_letters.yaml"
    spec.write_text(SLOW_GRADER)
    port = free_port()
    grader, _ = start_grader(str(spec), port, env=ENV)
    out = tmp / "run"
    # A step's row is written before the next step generates, so the /grade request that passes while
    # exactly two rows exist is step 3's (the baseline evaluation's comes before any row).
    metrics = out / "metrics.jsonl"
    watch = GradeWatch(port, wanted=lambda: metrics.is_file() and metrics.read_text().count("\n") == 2)
    run = _launch(out, watch.url, "training.max_steps=4", "ppo.unscorable_threshold=1.0", "ppo.sample_every=1",
                  f"ppo.num_logged_samples={SAMPLES_PER_STEP}")
    try:
        assert watch.forwarded.wait(300) and run.poll() is None, "step 3's request never reached the grader"
        time.sleep(0.3)  # the grader is inside the request (it takes 1.6 s)
        os.kill(grader.pid, signal.SIGKILL)
        grader.wait()
        logged_at_kill = len(rows(out))
        _wait_rows(out, 3, run)
        run.send_signal(signal.SIGSTOP)  # held while the grader comes back, so what follows finds it up
        try:
            grader, _ = start_grader(str(spec), port, env=ENV)
        finally:
            run.send_signal(signal.SIGCONT)
        _, err = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
        stop(grader)
        watch.close()
    return {"out": out, "returncode": run.returncode, "err": err, "logged_at_kill": logged_at_kill}


def test_grader_killed_mid_request_leaves_that_step_unscorable_not_zero(grader_killed_mid_request):
    run = grader_killed_mid_request
    out = run["out"]
    assert run["returncode"] == 0, run["err"][-3000:]
    assert run["logged_at_kill"] == 2  # the kill landed inside step 3's request
    history = rows(out)
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert [r["unscorable"] for r in history[:2]] == [0, 0]
    step3 = history[2]
    assert step3["samples"] == step3["unscorable"] == SAMPLES_PER_STEP and step3["unscorable_rate"] == 1.0
    samples = _samples(out)
    assert all(isinstance(r, float) for step in (1, 2) for r in samples[step])
    assert samples[3] == [None] * SAMPLES_PER_STEP  # no reward at all, not a 0
    report = json.loads((out / "eval" / "ppo_reward.json").read_text())
    assert report["after"]["scored"] == 8 and report["after"]["unscorable"] == 0  # the restarted grader served


def test_step_without_any_scored_sample_logs_no_mean_reward(grader_killed_mid_request):
    """README: an unscorable sample is never a silent 0. A step where every sample is unscorable has no mean
    reward; logging 0.0 puts a fake zero on the reward curve (wandb included)."""
    step3 = rows(grader_killed_mid_request["out"])[2]
    assert step3["unscorable_rate"] == 1.0
    assert step3.get("reward_mean") is None and step3.get("reward_std") is None
