"""Launching `dft train` the way a user does (one process, accelerate launch, torchrun) and reading what
runs write; plus a small set of named runs that several test modules share, each run once per session.

Only the user-facing entry points are used (`python -m distributed_ft ...` under a launcher), never the
library's modules, so these helpers survive refactors of the library's internals.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DFT = [sys.executable, "-m", "distributed_ft"]
# Topologies are compared in fp32: bf16 autocast (`auto` on a CPU with native bf16) rounds differently when the
# same batch is split differently, which would hide a real disagreement below its noise
FP32 = "training.mixed_precision=no"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate(launch_config: str, port: bool = True) -> list[str]:
    # A free rendezvous port unless the command must be the README's literal one: other runs on the machine
    # (another test session) would otherwise collide on accelerate's default 29500.
    extra = ["--main_process_port", str(free_port())] if port else []
    return [str(BIN / "accelerate"), "launch", "--config_file", launch_config, *extra, "-m", "distributed_ft"]


def launcher(kind: str) -> tuple[list[str], dict]:
    """The command prefix (up to and including `-m distributed_ft`) and extra environment of a launch kind."""
    if kind == "single":
        return list(DFT), {}
    if kind == "ddp":  # the README's command, literally: no ACCELERATE_USE_CPU, no extra flag
        return _accelerate("launch/ddp_cpu.yaml", port=False), {}
    if kind in ("zero2", "zero3", "zero3_offload"):
        return _accelerate(f"launch/{kind}_cpu.yaml"), {"DS_ACCELERATOR": "cpu"}
    if kind == "torchrun":  # the README's `torchrun --nproc_per_node N -m distributed_ft train CONFIG`
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "distributed_ft"], {}
    raise ValueError(f"unknown launch kind {kind!r}")


def train_command(kind: str, config: str, out: Path, *overrides: str) -> tuple[list[str], dict]:
    prefix, env = launcher(kind)
    return [*prefix, "train", config, f"output.dir={out}", FP32, *overrides], env


def run_train(kind: str, config: str, out: Path, *overrides: str, env: dict | None = None, expect: int = 0,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `dft train` under `kind` to the end; asserts its exit code."""
    cmd, launch_env = train_command(kind, config, out, *overrides)
    proc = run_to_end(cmd, {**os.environ, **launch_env, **(env or {})}, timeout)
    assert proc.returncode == expect, (f"{' '.join(cmd)}\nexit {proc.returncode}\n"
                                       + proc.stdout[-2000:] + proc.stderr[-6000:])
    return proc


def run_to_end(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a launch to its end, output captured; on timeout its ranks are killed with it (kill_tree), so they
    cannot load the machine for the tests after it."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)}\nno exit within {timeout} s\n" + stdout[-2000:] + stderr[-6000:])
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def start_train(kind: str, config: str, out: Path, *overrides: str, log: Path, env: dict | None = None):
    """Start `dft train` under `kind` in the background, output to `log` (no pipe to fill up)."""
    cmd, launch_env = train_command(kind, config, out, *overrides)
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **launch_env, **(env or {})}, stdout=handle,
                            stderr=subprocess.STDOUT)
    handle.close()
    return proc


def rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows of training steps (not periodic evaluations)."""
    return [r for r in rows(run_dir) if "loss" in r]


def column(run_dir: Path, key: str) -> list:
    return [r.get(key) for r in train_rows(run_dir)]


def wait_until(predicate, proc: subprocess.Popen, timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(poll)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a launcher started (their RANK / LOCAL_RANK environment)."""
    ranks = {}
    for pid in descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"RANK" in env and b"LOCAL_RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher we started and everything below it (only if it is still running)."""
    if proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()


# --- runs shared between test modules ------------------------------------------------------------------------
# The same global batch of 8 everywhere: micro 8 in one process, micro 4 on each of 2 ranks. Where evaluation
# runs, a model-dependent metric (perplexity) sits next to the generation metrics, so reports are not all zeros.
CONFIG = "configs/full.yaml"
STEPS = 6
MID = 3  # the checkpoint step the resume tests continue from
DATA = ["data.train.0.num_examples=300", "data.train.1.num_examples=300", "data.validation_fraction=0.02"]
EVAL = ["eval.enabled=true", "eval.max_new_tokens=8", "eval.batch_size=8",
        "eval.metrics={arithmetic: [exact_match, perplexity], copy: [exact_match, bleu, perplexity]}"]
BASE = [f"training.max_steps={STEPS}", "training.warmup_steps=0", "logging.log_every=1",
        "logging.progress_bar=false", *DATA]
# AdamW as configured, never clipping (a norm of 1e6 is never reached), so grad_norm is logged everywhere.
ADAMW = [*BASE, "training.max_grad_norm=1000000", f"training.checkpoint_every={MID}", "eval.enabled=false"]
# Plain SGD (momentum 0.9): the update is proportional to the gradient, so a wrong factor changes the losses.
SGD = [*BASE, "training.optimizer=sgd", "training.learning_rate=0.05", "eval.enabled=false"]


def micro(kind: str, global_batch: int = 8) -> str:
    return f"training.micro_batch_size={global_batch if kind == 'single' else global_batch // 2}"


EVALUATED = ("single", "ddp", "zero3")  # evaluation does not change training; it runs where a test reads it
SHARED: dict[str, tuple[str, list[str]]] = {
    **{kind: (kind, [*ADAMW, micro(kind), *(EVAL if kind in EVALUATED else [])])
       for kind in ("single", "ddp", "zero2", "zero3", "zero3_offload", "torchrun")},
    "sgd_single": ("single", [*SGD, "training.max_grad_norm=null", micro("single")]),
    "sgd_ddp": ("ddp", [*SGD, "training.max_grad_norm=null", micro("ddp")]),
    "sgd_zero3_offload": ("zero3_offload", [*SGD, "training.max_grad_norm=null", micro("zero3_offload")]),
    "sgd_noclip_single": ("single", [*SGD, "training.max_grad_norm=1000000", micro("single")]),
    "sgd_accum_single": ("single", [*SGD, "training.max_grad_norm=1000000", "training.micro_batch_size=4",
                                    "training.gradient_accumulation_steps=2"]),
}
_DONE: dict[str, Path] = {}


def shared_run(tmp_path_factory, name: str) -> Path:
    """The run directory of the named shared run, trained on first use (once per test session)."""
    if name not in _DONE:
        kind, overrides = SHARED[name]
        out = tmp_path_factory.mktemp(f"shared-{name}") / "run"
        run_train(kind, CONFIG, out, *overrides)
        _DONE[name] = out
    return _DONE[name]
