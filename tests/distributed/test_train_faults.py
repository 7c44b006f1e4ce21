"""Real faults outside Slurm: a process SIGKILLed in the middle of a checkpoint save, and one rank of a
2-rank DDP run sent SIGTERM on its own. Both must resume to exactly the uninterrupted losses (the shared runs
of tests/distributed/launch.py, which these runs repeat with faults added)."""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.distributed.launch import (ADAMW, CONFIG, MID, SHARED, STEPS, column, kill_tree, micro, rank_pids,
                                      rows, run_train, shared_run, start_train, wait_until)

pytestmark = pytest.mark.distributed  # real runs in their own processes, like the rest of this folder

# Test hook, loaded by every process of a run as sitecustomize (nothing in the library changes): the commit
# of checkpoint step DFT_TEST_PAUSE_AT_STEP (the rename of its temporary folder into place) touches
# DFT_TEST_PAUSE_MARKER, then blocks until DFT_TEST_CONTINUE_FILE exists (or for good without one), so the
# test acts at that exact point of the run, whatever the machine's speed.
PAUSE_HOOK = '''\
import os
import time

_step = os.environ.get("DFT_TEST_PAUSE_AT_STEP")
if _step:
    _name = "step-%08d" % int(_step)

    def _pausing(original):
        def commit(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == _name:
                open(os.environ["DFT_TEST_PAUSE_MARKER"], "w").close()
                go = os.environ.get("DFT_TEST_CONTINUE_FILE")
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and not (go and os.path.exists(go)):
                    time.sleep(0.05)
            return original(src, dst, *args, **kwargs)
        return commit

    os.rename = _pausing(os.rename)
    os.replace = _pausing(os.replace)
'''


def _pause_env(tmp: Path, step: int, continue_file: Path | None = None) -> tuple[dict, Path]:
    hook, marker = tmp / "hook", tmp / "paused"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    env = {"DFT_TEST_PAUSE_AT_STEP": str(step), "DFT_TEST_PAUSE_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    if continue_file is not None:
        env["DFT_TEST_CONTINUE_FILE"] = str(continue_file)
    return env, marker


def test_sigkill_during_checkpoint_save_is_ignored_and_resume_is_exact(tmp_path, tmp_path_factory):
    """checkpoint_every=2; the save of step 4 is SIGKILLed after its folder is written but before it is
    renamed into place. Resuming with resume_from=latest ignores and removes `.tmp-step-00000004`, continues
    from step 2 and logs the uninterrupted run's losses."""
    out = tmp_path / "run"
    overrides = [*ADAMW, micro("single"), "training.checkpoint_every=2", "eval.enabled=false"]
    env, marker = _pause_env(tmp_path, 4)
    proc = start_train("single", CONFIG, out, *overrides, log=tmp_path / "killed.log", env=env)
    try:
        wait_until(marker.exists, proc, 300, "pause before the commit of checkpoint step 4")
        checkpoints = out / "checkpoints"
        assert (checkpoints / ".tmp-step-00000004").is_dir()  # written, not yet renamed
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        kill_tree(proc)
    assert not (checkpoints / "step-00000004").exists() and (checkpoints / ".tmp-step-00000004").is_dir()
    assert (checkpoints / "step-00000002" / "trainer_state.json").is_file()
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4] and not (out / "final").exists()

    resumed = run_train("single", CONFIG, out, *overrides, "training.resume_from=latest")
    log = resumed.stdout + resumed.stderr
    assert re.search(r"resumed from \S*step-00000002 at step 2", log), log[-3000:]
    assert not (checkpoints / ".tmp-step-00000004").exists()  # the cut-off save was cleaned up
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    reference = column(shared_run(tmp_path_factory, "single"), "loss")  # same training, uninterrupted
    assert column(out, "loss") == pytest.approx(reference, rel=1e-6)
    assert (out / "final" / "model.safetensors").is_file()


def _exit_codes(launcher_output: str) -> dict[int, int]:
    """{rank: exit code} from the torch elastic agent's failure summary."""
    return {int(rank): int(code) for rank, code in
            re.findall(r"rank\s*:\s*(\d+)\s*\(local_rank[^)]*\)\s*\n\s*exitcode\s*:\s*(-?\d+)", launcher_output)}


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_exactly(tmp_path, tmp_path_factory):
    """2-rank DDP (the README's accelerate command, the shared 6-step run's config). While rank 0 commits the
    step-3 checkpoint, only rank 1's process gets SIGTERM. Both ranks stop at the next step boundary (4) with
    exit code 3, leaving exactly one new complete checkpoint (step 4's), and resume_from=latest then logs the
    uninterrupted run's losses for steps 5 and 6."""
    from distributed_ft.engine.checkpoint import complete_checkpoints

    _, overrides = SHARED["ddp"]
    overrides = [*overrides, "eval.enabled=false"]
    out, log, go = tmp_path / "run", tmp_path / "stopped.log", tmp_path / "continue"
    env, marker = _pause_env(tmp_path, MID, continue_file=go)
    proc = start_train("ddp", CONFIG, out, *overrides, log=log, env=env)
    try:
        wait_until(marker.exists, proc, 300, f"the commit of checkpoint step {MID}")
        ranks = rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)  # rank 1 alone; rank 0 is inside the commit
        go.touch()
        proc.wait(300)
    finally:
        kill_tree(proc)
    text = log.read_text()
    assert _exit_codes(text) == {0: 3, 1: 3}, text[-4000:]  # the launcher itself reports a failed worker (1)
    stop = MID + 1
    assert [r["step"] for r in rows(out)] == list(range(1, stop + 1))
    found = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in found] == [f"step-{MID:08d}", f"step-{stop:08d}"]  # one new: the stop's
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert re.search(rf"stopping at step {stop}\b", text), text[-3000:]  # rank 0, told through the reduce
    assert not (out / "final").exists()

    proc = run_train("ddp", CONFIG, out, *overrides, "training.resume_from=latest")
    assert f"at step {stop}" in proc.stdout + proc.stderr
    reference = shared_run(tmp_path_factory, "ddp")  # the same run, uninterrupted
    assert [r["step"] for r in rows(out)] == list(range(1, STEPS + 1))
    assert column(out, "loss") == pytest.approx(column(reference, "loss"), rel=1e-6)
    assert column(out, "grad_norm") == pytest.approx(column(reference, "grad_norm"), rel=1e-5)
