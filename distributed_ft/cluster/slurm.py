"""Slurm job scripts: render slurm/train.sbatch for one run config and submit it with sbatch.

The template is a working script on its own; rendering rewrites its two marked blocks (the
#SBATCH options and the run settings) so the result runs with a plain `sbatch FILE`.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distributed_ft.errors import ConfigError, DftError

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = {"train": "train.sbatch", "eval": "eval.sbatch", "ppo": "ppo.sbatch", "grpo": "ppo.sbatch"}
_BLOCK = r"(# >>> {name}[^\n]*\n)(.*?)(# <<< {name}[^\n]*\n)"


class SlurmError(DftError):
    """sbatch is missing or refused the job."""


@dataclass
class JobSpec:
    config: str
    nodes: int = 1
    gpus_per_node: int = 0
    launch: str | None = None  # default: launch/zero3.yaml with GPUs, launch/zero2_cpu.yaml without
    processes_per_node: int | None = None  # default: one per GPU, 1 on CPU nodes
    cpus_per_node: int | None = None  # CPUs for the node's task (all its ranks and data loading)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    signal_lead: int = 300
    requeue: bool = False
    job_name: str | None = None
    overrides: list[str] = field(default_factory=list)
    kind: str = "train"
    template: str | None = None
    log_dir: str = "slurm-logs"
    python: str = sys.executable
    workdir: str | None = None


def template_path(kind: str = "train", template: str | None = None) -> Path:
    if template is not None:
        path = Path(template)
        if not path.is_file():
            raise ConfigError(f"sbatch template not found: {template}")
        return path
    if kind not in TEMPLATES:
        raise ConfigError(f"unknown job kind '{kind}'; expected one of: {', '.join(TEMPLATES)}")
    for base in (Path.cwd(), REPO):
        path = base / "slurm" / TEMPLATES[kind]
        if path.is_file():
            return path
    raise ConfigError(f"slurm/{TEMPLATES[kind]} not found in {Path.cwd()} or {REPO}")


def default_launch(gpus_per_node: int) -> str:
    return "launch/zero3.yaml" if gpus_per_node > 0 else "launch/zero2_cpu.yaml"


def check_allocation(nodes: int, env: dict | None = None) -> None:
    """Inside a Slurm allocation the requested node count must be the allocation's."""
    env = os.environ if env is None else env
    allocated = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if env.get("SLURM_JOB_ID") and allocated and int(allocated) != nodes:
        raise ConfigError(f"--nodes {nodes} does not match this allocation's {allocated} nodes "
                          f"(SLURM_NNODES); request {allocated} or submit from outside the allocation")


def validate(spec: JobSpec, check_config: Callable[[], object] | None = None) -> str:
    """Check the job's inputs (the run config too, with `check_config`); returns the launch config path.
    Every problem is one line."""
    min_nodes = 2 if spec.kind in ("ppo", "grpo") else 1  # RL: trainer nodes plus one grader node
    if spec.nodes < min_nodes:
        raise ConfigError(f"--nodes must be at least {min_nodes} for a {spec.kind} job, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 or more, got {spec.gpus_per_node}")
    if spec.processes_per_node is not None and spec.processes_per_node < 1:
        raise ConfigError(f"--processes-per-node must be at least 1, got {spec.processes_per_node}")
    if spec.cpus_per_node is not None and spec.cpus_per_node < 1:
        raise ConfigError(f"--cpus-per-node must be at least 1, got {spec.cpus_per_node}")
    if spec.signal_lead < 0:
        raise ConfigError(f"--signal-lead must be 0 or more seconds, got {spec.signal_lead}")
    if spec.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", spec.time):
        raise ConfigError(f"--time '{spec.time}' is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
    if not Path(spec.config).is_file():
        raise ConfigError(f"config file not found: {spec.config}")
    if check_config is not None:
        check_config()
    launch = spec.launch or default_launch(spec.gpus_per_node)
    if not Path(launch).is_file():
        raise ConfigError(f"launch config not found: {launch}")
    check_allocation(spec.nodes)
    return launch


def _job_name(spec: JobSpec) -> str:
    return spec.job_name or f"dft-{spec.kind}-{Path(spec.config).stem}"


def _options_block(spec: JobSpec) -> str:
    lines = [f"--job-name={_job_name(spec)}", f"--nodes={spec.nodes}", "--ntasks-per-node=1"]
    if spec.gpus_per_node:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_node:
        lines.append(f"--cpus-per-task={spec.cpus_per_node}")
    for flag, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account)):
        if value:
            lines.append(f"--{flag}={value}")
    if spec.signal_lead:
        lines.append(f"--signal=B:USR1@{spec.signal_lead}")
    lines.append("--requeue" if spec.requeue else "--no-requeue")
    lines += ["--open-mode=append", f"--output={spec.log_dir}/%x-%j.out",
              f"--chdir={spec.workdir or Path.cwd()}"]
    return "".join(f"#SBATCH {line}\n" for line in lines)


def _settings_block(spec: JobSpec, launch: str) -> str:
    procs = spec.processes_per_node or max(spec.gpus_per_node, 1)
    args = " ".join(shlex.quote(a) for a in [spec.config, *spec.overrides])
    values = (("LAUNCH_CONFIG", "DFT_LAUNCH_CONFIG", launch), ("PROCS_PER_NODE", "DFT_PROCS_PER_NODE", procs),
              ("REQUEUE", "DFT_REQUEUE", int(spec.requeue)), ("PYTHON", "DFT_PYTHON", spec.python),
              ("EXPECTED_NODES", "DFT_EXPECTED_NODES", spec.nodes), ("LOG_DIR", "DFT_LOG_DIR", spec.log_dir))
    lines = [f"{var}=${{{env}:-{shlex.quote(str(value))}}}" for var, env, value in values]
    lines.append(f"DEFAULT_ARGS=({args})")
    return "\n".join(lines) + "\n"


def _replace_block(text: str, name: str, body: str, source: Path) -> str:
    pattern = re.compile(_BLOCK.format(name=re.escape(name)), re.S)
    if not pattern.search(text):
        raise ConfigError(f"{source}: no '# >>> {name}' ... '# <<< {name}' block to fill in")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


def render(spec: JobSpec, check_config: Callable[[], object] | None = None) -> str:
    """The sbatch script for `spec` as text."""
    launch = validate(spec, check_config)
    source = template_path(spec.kind, spec.template)
    text = source.read_text()
    if spec.nodes > 1 and "--machine_rank" not in text:
        raise ConfigError(f"{source}: the launch command has no --machine_rank; every node would start as "
                          f"machine 0 (pass --machine_rank \\$SLURM_NODEID)")
    text = _replace_block(text, "sbatch options", _options_block(spec), source)
    return _replace_block(text, "run settings", _settings_block(spec, launch), source)


def write(spec: JobSpec, out: str | None = None, check_config: Callable[[], object] | None = None) -> Path:
    path = Path(out) if out else Path(spec.log_dir) / f"{_job_name(spec)}.sbatch"
    text = render(spec, check_config)
    # sbatch does not create the folder of --output: without it the job fails before it starts.
    (Path(spec.workdir or Path.cwd()) / spec.log_dir).mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def submit(script: Path) -> str:
    """Submit with sbatch; returns the job id."""
    cmd = ["sbatch", "--parsable", str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run on a Slurm login node (or install slurm-client)") from None
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlurmError(f"sbatch refused {script}: {message[-1] if message else 'exit ' + str(proc.returncode)}")
    return proc.stdout.strip().split(";")[0]
