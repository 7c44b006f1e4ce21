"""The Slurm tier cannot vanish silently: without a usable cluster the slurm tests skip on a workstation but
fail under CI (CI=true), before anything is submitted. Runs pytest on a slurm module with no Slurm client on
PATH; needs no cluster itself."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

MODULE = "tests/slurm/test_slurm_ppo.py"


def _pytest_without_slurm(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # no sinfo / sbatch here
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", MODULE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_slurm_tests_skip_without_a_cluster_outside_ci(tmp_path):
    proc = _pytest_without_slurm(tmp_path, None)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "skipped" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_slurm_tests_fail_without_a_cluster_under_ci(tmp_path, ci):
    proc = _pytest_without_slurm(tmp_path, ci)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "skipped" not in proc.stdout and "passed" not in proc.stdout
    assert "CI is set but the Slurm tests cannot run: Slurm client not installed" in proc.stdout
