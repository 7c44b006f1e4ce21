"""Shared fixtures: an isolated cache for the built-in model and helpers to run the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _quiet_environment(tmp_path_factory):
    # One built-in model cache for the whole session, outside the user's home.
    os.environ.setdefault("DFT_CACHE_DIR", str(tmp_path_factory.mktemp("dft-cache")))
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Several processes share two cores in CI: one thread each avoids OpenMP spin-wait collapse.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def in_ci() -> bool:
    """CI sets CI=true: there the tiers it depends on (Slurm, the sandbox) must run, never skip silently."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip a test whose tier is missing here, but fail it in CI."""
    if in_ci():
        pytest.fail(f"CI needs this tier, but {reason}")
    pytest.skip(reason)


def run_dft(*args, cwd=None, env=None, timeout=600):
    """Run `python -m distributed_ft ...` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "distributed_ft", *map(str, args)], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster (and steadier on a shared machine) on one thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def run_outputs_stand_in(tmp_path, monkeypatch):
    """Run from a folder holding configs/ and stand-ins for the files earlier runs write, which some shipped
    configs read when they load (configs/ppo/reward_model.yaml: the grader spec `dft rm configs/rm/quickstart.yaml`
    leaves in runs/rm/), so those configs load on a checkout where that run never happened."""
    import shutil

    (tmp_path / "configs").symlink_to(REPO / "configs")
    spec = tmp_path / "runs" / "rm" / "grader.yaml"
    spec.parent.mkdir(parents=True)
    shutil.copy(REPO / "configs" / "ppo" / "grader_letters.yaml", spec)
    monkeypatch.chdir(tmp_path)
    return tmp_path
