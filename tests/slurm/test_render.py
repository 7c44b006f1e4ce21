"""`dft slurm render|submit` without a cluster: the rendered script, its per-node expansion (run
under stand-in srun/scontrol/python), and one-line errors for bad input."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_ft.cluster.slurm import JobSpec, SlurmError, check_allocation, render, submit, validate, write
from distributed_ft.errors import ConfigError

from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    for var in ("SLURM_JOB_ID", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(var, raising=False)


def _spec(**kw) -> JobSpec:
    base = dict(config=CONFIG, nodes=3, gpus_per_node=8, cpus_per_node=64, partition="gpu", time="02:00:00",
                account="proj", signal_lead=120, requeue=True,
                overrides=["training.max_steps=50", "output.dir=runs/a b"])
    return JobSpec(**{**base, **kw})


def test_render_fills_options_and_settings():
    text = render(_spec())
    options = re.findall(r"^#SBATCH (\S+)", text, re.M)
    for expected in ("--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                     "--time=02:00:00", "--account=proj", "--cpus-per-task=64", "--signal=B:USR1@120", "--requeue"):
        assert expected in options
    assert "LAUNCH_CONFIG=${DFT_LAUNCH_CONFIG:-launch/zero3.yaml}" in text
    assert "PROCS_PER_NODE=${DFT_PROCS_PER_NODE:-8}" in text and "EXPECTED_NODES=${DFT_EXPECTED_NODES:-3}" in text
    assert "DEFAULT_ARGS=(" in text and "'output.dir=runs/a b'" in text
    cpu = render(_spec(gpus_per_node=0, requeue=False, signal_lead=0))
    cpu_options = " ".join(re.findall(r"^#SBATCH (\S+)", cpu, re.M))
    assert "--no-requeue" in cpu_options and "--signal" not in cpu_options and "--gpus" not in cpu_options
    assert "launch/zero2_cpu.yaml" in cpu and "PROCS_PER_NODE=${DFT_PROCS_PER_NODE:-1}" in cpu


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_rendered_script_gives_every_node_its_own_machine_rank(tmp_path):
    """Stand-ins: srun runs the task once per node with that node's SLURM_NODEID; python records the launch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", 'echo "SRUN $*" | head -c 200; echo; for i in 0 1 2; do SLURM_NODEID=$i SLURMD_NODENAME=node$i "${@: -3}"; done\n')
    _stub(bin_dir, "scontrol", 'printf "node0\\nnode1\\nnode2\\n"\n')
    _stub(bin_dir, "scancel", "exit 0\n")
    _stub(bin_dir, "python", f'if [ "$2" = accelerate.commands.launch ]; then printf "LAUNCH|%s" "$*"; printf "|%s" "$@"; echo "|"; '
                             f'else exec {sys.executable} "$@"; fi\n')
    script = write(_spec(python=str(bin_dir / "python"), log_dir=str(tmp_path / "logs")), str(tmp_path / "job.sbatch"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "3",
           "SLURM_JOB_NODELIST": "node[0-2]", "SLURM_CPUS_PER_TASK": "64"}
    proc = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--kill-on-bad-exit=1 --nodes=3 --ntasks-per-node=1 --cpus-per-task=64" in proc.stdout
    launches = [line for line in proc.stdout.splitlines() if line.startswith("LAUNCH")]
    assert len(launches) == 3
    for node, line in enumerate(launches):
        assert f"--machine_rank {node} " in line
        assert "--num_machines 3 --num_processes 24" in line
        assert "--main_process_ip node0 --main_process_port 24242" in line
        assert "--deepspeed_multinode_launcher standard" in line
        # each user argument arrives as one argument, spaces included
        assert line.endswith(f"|distributed_ft|train|{CONFIG}|training.max_steps=50|output.dir=runs/a b|")
    assert [f"node{n}: SLURM_NODEID={n} machine_rank={n}" in proc.stdout for n in range(3)] == [True] * 3


def test_rendered_script_refuses_an_allocation_of_another_size(tmp_path):
    script = write(_spec(log_dir=str(tmp_path)), str(tmp_path / "job.sbatch"))
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_NNODES": "2"}
    proc = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: this script was rendered for 3 nodes but the allocation has 2 (SLURM_NNODES)"


@pytest.mark.parametrize("change, message", [
    (dict(config="configs/missing.yaml"), "config file not found: configs/missing.yaml"),
    (dict(launch="launch/missing.yaml"), "launch config not found: launch/missing.yaml"),
    (dict(nodes=0), "--nodes must be at least 1"),
    (dict(time="two hours"), "--time 'two hours' is not a Slurm time"),
    (dict(overrides=["training.bogus=1"]), "bogus"),
])
def test_bad_input_is_one_line(change, message):
    """The job's options and (as `dft slurm render` checks it) the run config fail before any script is written."""
    from distributed_ft.config import load_config

    spec = _spec(**change)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        render(spec, check_config=lambda: load_config(spec.config, spec.overrides))
    assert "\n" not in str(err.value)


def test_node_count_must_match_the_allocation(monkeypatch):
    check_allocation(3, {"SLURM_JOB_ID": "1", "SLURM_NNODES": "3"})
    check_allocation(3, {})  # outside an allocation anything goes
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    with pytest.raises(ConfigError, match=r"--nodes 3 does not match this allocation's 2 nodes \(SLURM_NNODES\)"):
        render(_spec())


def test_template_without_machine_rank_is_refused(tmp_path):
    template = tmp_path / "bad.sbatch"
    template.write_text((REPO / "slurm" / "train.sbatch").read_text().replace("--machine_rank \\$SLURM_NODEID", ""))
    with pytest.raises(ConfigError, match="no --machine_rank"):
        render(_spec(template=str(template)))
    render(_spec(template=str(template), nodes=1))  # one node needs no machine rank


def test_cli_render_and_submit_without_sbatch(tmp_path, monkeypatch, capsys):
    from distributed_ft.cli import build_parser

    parser = build_parser()
    out = tmp_path / "job.sbatch"
    args = parser.parse_args(["slurm", "render", CONFIG, "training.max_steps=30", "--nodes", "2", "--gpus-per-node",
                              "4", "--requeue", "--log-dir", str(tmp_path / "logs"), "-o", str(out)])
    assert args.func(args) == 0 and capsys.readouterr().out.strip() == str(out)
    assert "#SBATCH --nodes=2" in out.read_text() and (tmp_path / "logs").is_dir()
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(SlurmError, match="sbatch not found"):
        submit(out)


def test_ppo_job_renders_from_its_template_and_needs_a_grader_node():
    text = render(_spec(kind="ppo", config="configs/ppo/quickstart.yaml", overrides=["training.max_steps=5"]))
    assert "grader" in text and "--nodes=3" in " ".join(re.findall(r"^#SBATCH (\S+)", text, re.M))
    assert "DEFAULT_ARGS=(configs/ppo/quickstart.yaml training.max_steps=5)" in text
    with pytest.raises(ConfigError, match="at least 2 for a ppo job"):
        validate(_spec(kind="ppo", config="configs/ppo/quickstart.yaml", nodes=1))
    from distributed_ft.config import load_config

    with pytest.raises(ConfigError, match="grader"):  # an SFT config is not a PPO config
        validate(_spec(kind="ppo", config=CONFIG), check_config=lambda: load_config(CONFIG, kind="ppo"))
