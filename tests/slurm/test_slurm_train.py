"""Real two-node Slurm jobs (the local cluster of .ci/start_slurm): one ZeRO-2 rank per node,
signal -> checkpoint -> requeue -> resume, and a rank SIGKILLed in the middle of a checkpoint save."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.cluster import TERMINAL, job_info, module_marks
from tests.slurm.cluster import sbatch as submit
from tests.slurm.cluster import wait_for as wait_for_job

pytestmark = module_marks()

STEPS = 12
COMMON = [f"training.max_steps={STEPS}", "training.micro_batch_size=4", "training.warmup_steps=0",
          "logging.log_every=1", "logging.progress_bar=false", "eval.enabled=false",
          "data.validation_fraction=0.0", "data.train.0.num_examples=200", "data.train.1.num_examples=100",
          "data.train.2.num_examples=100", "data.train.3.num_examples=100"]
KILL_HOOK = '''\
"""Test hook: SIGKILL this rank just before it commits checkpoint step DFT_TEST_KILL_AT_STEP."""
import os
import signal

_step = os.environ.get("DFT_TEST_KILL_AT_STEP")
if _step:
    _rename = os.rename

    def _rename_or_die(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == "step-%08d" % int(_step):
            os.kill(os.getpid(), signal.SIGKILL)
        return _rename(src, dst, *args, **kwargs)

    os.rename = _rename_or_die
'''


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "DFT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SLURM_JOB_ID", None)
    env.pop("SLURM_NNODES", None)
    return {**env, **(extra or {})}


def sbatch(args: list[str], env: dict | None = None) -> str:
    for arg in args:  # sbatch does not create the folder of --output
        if arg.startswith("--output="):
            Path(arg.split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    return submit(args, _env(env))


def wait_for(job: str, timeout: float = 300, min_restarts: int = 0) -> dict:
    return wait_for_job(job, timeout, min_restarts)


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def node_logs(logs: Path, job: str) -> dict[int, str]:
    return {int(p.stem.rsplit("node", 1)[1]): p.read_text() for p in logs.glob(f"*-{job}-node*.out")}


def _run_config(tmp: Path) -> Path:
    config = tmp / "quick.yaml"
    shutil.copy(REPO / "configs" / "quickstart.yaml", config)
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-node run, submitted through `dft slurm render` + sbatch."""
    from distributed_ft.cluster.slurm import JobSpec, write

    tmp = tmp_path_factory.mktemp("slurm-ref")
    out, logs = tmp / "out", tmp / "logs"
    spec = JobSpec(config=str(_run_config(tmp)), overrides=[f"output.dir={out}", *COMMON], nodes=2,
                   gpus_per_node=0, log_dir=str(logs), workdir=str(REPO), job_name="dft-ref")
    script = write(spec, str(tmp / "job.sbatch"))
    job = sbatch([str(script)])
    info = wait_for(job)
    return {"job": job, "info": info, "out": out, "logs": logs, "script": script}


def test_two_nodes_one_zero2_rank_each_and_the_model_reloads(reference):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distributed_ft.models.builtin import builtin_model_path

    out, job = reference["out"], reference["job"]
    batch_log = (reference["logs"] / f"dft-ref-{job}.out").read_text()
    assert reference["info"]["JobState"] == "COMPLETED", batch_log
    assert "#SBATCH --nodes=2" in reference["script"].read_text()
    ranks = sorted((json.loads(p.read_text()) for p in (out / "ranks").glob("rank-*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["zero_stage"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    assert "DEEPSPEED" in ranks[0]["distributed_type"]
    # Each node's own log names its own node id and machine rank (not the batch shell's).
    logs = node_logs(reference["logs"], job)
    assert sorted(logs) == [0, 1]
    assert "node n1: SLURM_NODEID=0 machine_rank=0 ranks 0..0 of 2" in logs[0]
    assert "node n2: SLURM_NODEID=1 machine_rank=1 ranks 1..1 of 2" in logs[1]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The final model reloads through from_pretrained, complete, and holds trained (changed) weights.
    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    initial = load_file(str(builtin_model_path() / "model.safetensors"))
    trained = model.state_dict()
    changed = [k for k, v in initial.items() if not torch.equal(v, trained[k])]
    assert len(changed) > len(initial) // 2


def test_signal_checkpoints_requeues_and_resumes_to_the_same_loss(reference, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    job = sbatch(["--nodes=2", f"--output={logs}/batch-%j.out", "slurm/train.sbatch", str(_run_config(tmp_path)),
                  f"output.dir={out}", *COMMON], env={"DFT_LOG_DIR": str(logs)})
    deadline = time.monotonic() + 240
    while not metrics(out):  # signal once training is under way (the ranks' handlers are set)
        assert time.monotonic() < deadline, f"no training progress: {job_info(job)}"
        assert job_info(job).get("JobState") not in TERMINAL, (logs / f"batch-{job}.out").read_text()
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_for(job, timeout=400, min_restarts=1)
    batch_log = (logs / f"batch-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", batch_log
    assert "USR1 received" in batch_log and "requeueing job" in batch_log, batch_log
    node0 = node_logs(logs, job)[0]
    stopped = re.search(r"requeueing job \d+ to continue from \S+/step-(\d{8})", batch_log)
    resumed = re.search(r"resumed from \S+/step-(\d{8}) at step (\d+)", node0)
    assert stopped and resumed, node0
    assert int(stopped.group(1)) == int(resumed.group(1)) < STEPS  # stopped mid-run, continued from there
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ref = metrics(reference["out"])
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    assert (out / "final" / "model.safetensors").is_file()


def test_sigkill_during_checkpoint_save_keeps_the_previous_one(reference, tmp_path):
    out, logs, hook = tmp_path / "out", tmp_path / "logs", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    config = str(_run_config(tmp_path))
    args = ["--nodes=2", f"--output={logs}/batch-%j.out", "slurm/train.sbatch", config, f"output.dir={out}",
            "training.checkpoint_every=2", *COMMON]
    env = {"DFT_LOG_DIR": str(logs), "DFT_REQUEUE": "0"}
    killed = sbatch(args, env={**env, "DFT_TEST_KILL_AT_STEP": "4",
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))})
    info = wait_for(killed)
    assert info["JobState"] == "FAILED", (logs / f"batch-{killed}.out").read_text()
    checkpoints = out / "checkpoints"
    assert (checkpoints / ".tmp-step-00000004").is_dir()  # the save was cut off before its commit
    assert not (checkpoints / "step-00000004").exists()
    assert (checkpoints / "step-00000002" / "trainer_state.json").is_file()
    assert not (out / "final").exists()

    again = sbatch([*args, "training.resume_from=latest"], env=env)
    info = wait_for(again)
    node0 = node_logs(logs, again)[0]
    assert info["JobState"] == "COMPLETED", node0
    assert re.search(r"resumed from \S+/step-00000002 at step 2", node0), node0
    assert not (checkpoints / ".tmp-step-00000004").exists()  # leftovers of the killed save are gone
    ref = metrics(reference["out"])
    assert [r["loss"] for r in metrics(out)] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
