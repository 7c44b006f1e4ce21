"""The local Slurm cluster as the slurm tests use it: availability, submitting, waiting, clean-up."""
from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO, in_ci

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SUBMITTED: list[str] = []  # jobs submitted by the running module; tests/slurm/conftest.py cancels leftovers


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client not installed (sinfo/sbatch missing); run .ci/start_slurm"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if out.returncode != 0:
        return f"local Slurm cluster is not up (sinfo: {out.stderr.strip()[:200]}); run .ci/start_slurm"
    usable = {line.split()[0] for line in out.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].rstrip("*~#") in ("idle", "mix", "alloc", "comp")}
    if len(usable) < 2:
        return f"the local Slurm cluster needs 2 usable nodes, sinfo shows: {out.stdout.strip() or 'none'}"
    return None


def module_marks() -> list:
    """`slurm`, plus a skip with the reason when the cluster is not usable, except under CI, where
    tests/slurm/conftest.py fails the module's tests instead."""
    problem = cluster_problem()
    return [pytest.mark.slurm] + ([pytest.mark.skip(reason=problem)] if problem and not in_ci() else [])


def sbatch(args: list[str], env: dict) -> str:
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", *args], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    SUBMITTED.append(job)
    return job


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job: str, timeout: float, min_restarts: int = 0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in TERMINAL and int(info.get("Restarts", 0)) >= min_restarts:
            return info
        time.sleep(2)
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    pytest.fail(f"job {job} did not finish in {timeout}s: {job_info(job)}")
