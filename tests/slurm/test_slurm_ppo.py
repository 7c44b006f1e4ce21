"""slurm/ppo.sbatch on the local two-node cluster (.ci/start_slurm): the grader on n2, one ZeRO-2 trainer
rank on n1 reaching it over HTTP with the job's token, and the grader step stopped at the end; the same
script runs `dft grpo` for a GRPO config."""
from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm.cluster import TERMINAL, job_info, module_marks
from tests.slurm.cluster import sbatch as submit
from tests.slurm.cluster import wait_for as wait_for_job

pytestmark = module_marks()

STEPS = 3
OVERRIDES = [f"training.max_steps={STEPS}", "ppo.rollout_batch_size=4", "ppo.num_generations=2",
             "training.micro_batch_size=4", "ppo.ppo_epochs=1", "ppo.eval_prompts=4",
             "data.train.0.num_examples=40", "training.checkpoint_every=100", "logging.progress_bar=false"]


def sbatch(args: list[str], logs: Path) -> str:
    logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the folder of --output
    env = {**os.environ, "DFT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "DFT_LOG_DIR": str(logs)}
    for key in ("SLURM_JOB_ID", "SLURM_NNODES", "DFT_GRADER_TOKEN"):
        env.pop(key, None)
    return submit([f"--output={logs}/batch-%j.out", *args], env)


def wait_for(job: str, timeout: float = 180) -> dict:
    return wait_for_job(job, timeout)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_grader_on_its_own_node_serves_the_trainer_and_stops(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    job = sbatch(["--nodes=2", "slurm/ppo.sbatch", "configs/ppo/quickstart.yaml", f"output.dir={out}", *OVERRIDES],
                 logs)
    info = wait_for(job)
    batch = (logs / f"batch-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", batch
    port = 40000 + int(job) % 20000
    url = f"http://n2:{port}"
    assert f"grader on n2 ({url}" in batch and "trainers on n1: 1 node(s)" in batch, batch
    grader_log = (logs / f"dft-ppo-{job}-grader.out").read_text()
    trainer_log = (logs / f"dft-ppo-{job}-node0.out").read_text()
    assert f"[dft] grader on node n2, port {port}" in grader_log
    assert "(bearer token required)" in grader_log  # listening beyond loopback, with the job's token
    assert f"node n1: SLURM_NODEID=0 machine_rank=0 ranks 0..0 of 1, grader {url}" in trainer_log

    # The trainer used that grader, not one of its own: no local grader log, the saved config points at it.
    assert not (out / "grader.log").exists()
    saved = yaml.safe_load((out / "config.yaml").read_text())["grader"]
    assert saved["config"] is None and saved["urls"] == [url]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["unscorable_rate"] == 0 and r["unscorable"] == 0 and r["samples"] > 0 for r in rows)
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)

    # Stopped gracefully by the script (the server logs its totals only then), after training ended:
    # it graded exactly the trainer's rollouts plus the held-out prompts before and after training.
    assert re.search(rf"\[dft\] grader step {job}\.\d+ stopped\n\[dft\] ppo exited with 0", batch), batch
    totals = re.search(r"grader stopped after (\{.*\})", grader_log)
    assert totals, grader_log
    stats = ast.literal_eval(totals.group(1))
    held_out = json.loads((out / "eval" / "ppo_reward.json").read_text())
    expected = sum(r["samples"] for r in rows) + held_out["before"]["prompts"] + held_out["after"]["prompts"]
    assert stats["samples"] == expected and stats["unscorable"] == 0 and stats["bad_requests"] == 0
    assert not _port_open(port)
    steps = subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True, text=True, timeout=30).stdout
    assert steps.strip() == ""

    # The token is in no log.
    for path in logs.iterdir():
        assert not re.search(r"\b[0-9a-f]{64}\b", path.read_text()), path


def test_a_grpo_config_runs_dft_grpo_against_the_grader_node(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    overrides = [f"training.max_steps={STEPS}", "grpo.rollout_batch_size=2", "grpo.num_generations=4",
                 "training.micro_batch_size=8", "training.gradient_accumulation_steps=1", "grpo.eval_prompts=4",
                 "data.train.0.num_examples=40", "training.checkpoint_every=100", "logging.progress_bar=false"]
    job = sbatch(["--nodes=2", "slurm/ppo.sbatch", "configs/grpo/quickstart.yaml", f"output.dir={out}", *overrides],
                 logs)
    info = wait_for(job)
    batch = (logs / f"batch-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", batch
    assert re.search(rf"\[dft\] grader step {job}\.\d+ stopped\n\[dft\] grpo exited with 0", batch), batch
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["grader"]["urls"] == [f"http://n2:{40000 + int(job) % 20000}"] and "grpo" in saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["unscorable"] == 0 and r["samples"] == 8 and "group_reward_std" in r for r in rows)
    held_out = json.loads((out / "eval" / "grpo_reward.json").read_text())
    assert held_out["before"]["scored"] == held_out["after"]["scored"] == held_out["after"]["prompts"] >= 2
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final" / "critic").exists()


def test_one_node_is_refused_before_anything_starts(tmp_path):
    logs = tmp_path / "logs"
    job = sbatch(["--nodes=1", "slurm/ppo.sbatch", "configs/ppo/quickstart.yaml", f"output.dir={tmp_path / 'out'}"],
                 logs)
    info = wait_for(job, timeout=60)
    batch = (logs / f"batch-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), batch
    assert "the grader needs a node of its own: submit with --nodes=2 or more" in batch
    assert not list(logs.glob("*-grader.out")) and not (tmp_path / "out").exists()


REQUEUE_STEPS = 20
# Wall-clock figures differ between any two runs; every other logged value must repeat.
TIMING = ("grader_latency_s", "samples_per_s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The requeue test's job, uninterrupted: its metrics are what the requeued job must reproduce."""
    from distributed_ft.models.builtin import builtin_model_path

    # Build the built-in model now, so neither job is the one that builds it: today a run that builds it
    # continues from another random state (tests/distributed/test_reproducible_runs.py).
    builtin_model_path()
    tmp = tmp_path_factory.mktemp("ppo-reference")
    out, logs = tmp / "out", tmp / "logs"
    job = sbatch(["--nodes=2", "slurm/ppo.sbatch", "configs/ppo/quickstart.yaml", f"output.dir={out}",
                  *OVERRIDES, f"training.max_steps={REQUEUE_STEPS}"], logs)
    info = wait_for(job, timeout=300)
    assert info["JobState"] == "COMPLETED", (logs / f"batch-{job}.out").read_text()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_usr1_checkpoints_keeps_the_grader_up_requeues_and_resumes(tmp_path, uninterrupted):
    out, logs, steps = tmp_path / "out", tmp_path / "logs", REQUEUE_STEPS
    job = sbatch(["--nodes=2", "slurm/ppo.sbatch", "configs/ppo/quickstart.yaml", f"output.dir={out}",
                  *OVERRIDES, f"training.max_steps={steps}"], logs)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 150
    while not (metrics.exists() and metrics.read_text().strip()):  # the ranks' handlers are set
        assert time.monotonic() < deadline, f"no training progress: {job_info(job)}"
        assert job_info(job).get("JobState") not in TERMINAL, (logs / f"batch-{job}.out").read_text()
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    deadline = time.monotonic() + 200
    while (info := job_info(job)).get("JobState") not in TERMINAL or info.get("Restarts") != "1":
        assert time.monotonic() < deadline, f"job {job} did not requeue and finish: {info}"
        time.sleep(2)
    batch = (logs / f"batch-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", batch
    # First run: stopped with a checkpoint, and only then its grader (it ignored the USR1 sent to every step).
    first = re.search(rf"USR1 received.*?\[dft\] grader step {job}\.\d+ stopped\n\[dft\] ppo exited with 3\n"
                      rf"\[dft\] requeueing job {job} to continue from \S+/step-(\d{{8}})", batch, re.S)
    assert first, batch
    assert batch.count("[dft] grader ready at") == 2 and batch.rstrip().endswith("ppo exited with 0"), batch
    grader_log = (logs / f"dft-ppo-{job}-grader.out").read_text()
    assert grader_log.count("grader stopped after") == 2, grader_log  # both runs' graders shut down cleanly
    trainer_log = (logs / f"dft-ppo-{job}-node0.out").read_text()
    resumed = re.search(r"resumed from \S+/step-(\d{8}) at step (\d+)", trainer_log)
    assert resumed and int(resumed.group(1)) == int(first.group(1)) < steps, trainer_log
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["unscorable_rate"] == 0 for r in rows)
    # Exactly the uninterrupted job's run: rewards, KL, losses, clip fractions, ... step by step.
    assert [r["step"] for r in uninterrupted] == [r["step"] for r in rows]
    for got, want in zip(rows, uninterrupted):
        keys = sorted(k for k in want if not k.startswith("time/") and k not in TIMING)
        assert sorted(k for k in got if not k.startswith("time/") and k not in TIMING) == keys
        assert {k: got[k] for k in keys} == pytest.approx({k: want[k] for k in keys}, rel=1e-4, abs=1e-8), \
            f"step {want['step']}"
