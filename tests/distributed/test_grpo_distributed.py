"""The critic-free family distributed for real: the GRPO quickstart learns under 2 ZeRO-2 ranks and resumes
to the same steps; a fixed rollout batch gives one process's advantages and update on 2 DDP ranks (batch
whitening, REINFORCE++) and on 2 ZeRO-3 ranks (GRPO with a KL loss term)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.grader_process import start_grader, stop
from tests.distributed.launch import FP32
from tests.distributed.test_ppo_distributed import ENV, LAUNCH, PROBE, ZERO2, computed, rows

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/grpo/quickstart.yaml"
# 2 ranks: the same global minibatch of 64 samples (16 prompts x 4) as one process with 4 accumulation steps.
LEARN = ["training.max_steps=10", "training.checkpoint_every=5", "training.gradient_accumulation_steps=2",
         "grpo.eval_prompts=24", "logging.progress_bar=false"]


def run_grpo(launch: list[str], out: Path, *overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [*launch, "-m", "distributed_ft", "grpo", CONFIG, f"output.dir={out}", FP32, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def grader_url():
    proc, url = start_grader("configs/ppo/grader_letters.yaml", env=ENV)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def learned(tmp_path_factory, grader_url):
    out = tmp_path_factory.mktemp("grpo") / "zero2"
    run_grpo(ZERO2, out, *LEARN, "grader.config=null", f"grader.urls=[{grader_url}]")
    return out


def test_grpo_quickstart_raises_held_out_reward_under_zero2(learned):
    report = json.loads((learned / "eval" / "grpo_reward.json").read_text())
    before, after = report["before"]["mean_reward"], report["after"]["mean_reward"]
    assert report["before"]["scored"] == report["after"]["scored"] == 24
    assert after > before + 0.15, report
    history = rows(learned)
    assert [r["step"] for r in history] == list(range(1, 11))
    assert all(r["samples"] == 64 and r["unscorable"] == 0 for r in history)
    # One optimizer step per rollout: the update is on-policy, so nothing is clipped.
    assert all(r["clipfrac_low"] == r["clipfrac_high"] == 0 for r in history)
    ranks = [json.loads(p.read_text()) for p in sorted((learned / "ranks").glob("rank-*.json"))]
    assert [r["world_size"] for r in ranks] == [2, 2] and "DEEPSPEED" in ranks[0]["distributed_type"]
    assert (learned / "final" / "model.safetensors").is_file() and not (learned / "final" / "critic").exists()


def test_grpo_resume_repeats_the_same_steps(learned, tmp_path, grader_url):
    checkpoint = learned / "checkpoints" / "step-00000005"
    out = tmp_path / "resumed"
    run_grpo(ZERO2, out, *LEARN, "grader.config=null", f"grader.urls=[{grader_url}]",
             f"training.resume_from={checkpoint}")
    resumed, straight = rows(out), rows(learned)
    assert [r["step"] for r in resumed] == list(range(6, 11))
    for a, b in zip(resumed, straight[5:]):
        a, b = computed(a), computed(b)
        assert a.keys() == b.keys()
        for key in a:
            expected = b[key] if b[key] is None else pytest.approx(b[key], rel=1e-4, abs=1e-6)
            assert a[key] == expected, (a["step"], key)


def probe(launch: list[str], out: Path, micro: int, *overrides: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    common = ["grpo.rollout_batch_size=4", "grpo.num_generations=4", "grpo.max_new_tokens=6", "grpo.ppo_epochs=2",
              "training.optimizer=sgd", "training.learning_rate=0.05", "training.max_grad_norm=null",
              "training.gradient_accumulation_steps=2", f"training.micro_batch_size={micro}",
              "output.overwrite=true", "logging.progress_bar=false", *overrides]
    proc = subprocess.run([*launch, str(PROBE), CONFIG, str(out), FP32, *common], cwd=REPO, env={**os.environ, **ENV},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return json.loads((out / "probe.json").read_text()), load_file(str(out / "delta.safetensors"))


def assert_same_update(single, d1, multi, d2):
    assert single["world"] == 1 and multi["world"] == 2
    assert multi["stats"] == pytest.approx(single["stats"], rel=1e-5, abs=1e-7)
    assert d1.keys() == d2.keys() and not any("value_head" in k for k in d1)
    torch.testing.assert_close(d2["probe.advantages"], d1["probe.advantages"], rtol=1e-5, atol=1e-6)
    assert float(d1["probe.advantages"].abs().max()) > 0.1
    assert max(float(t.abs().max()) for k, t in d1.items() if k != "probe.advantages") > 1e-3  # it moved
    for name in d1:
        torch.testing.assert_close(d2[name], d1[name], rtol=1e-4, atol=1e-6, msg=name)


REINFORCE_SINGLE_UPDATE = ("grpo.algorithm=reinforce_pp_baseline", "grpo.kl.beta=0", "grpo.ppo_epochs=1")


@pytest.fixture(scope="module")
def single_reinforce(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "single"
    return probe([sys.executable], out, 8, *REINFORCE_SINGLE_UPDATE)


def test_groups_on_two_ddp_ranks_give_one_process_advantages_and_update(single_reinforce, tmp_path):
    """REINFORCE++ with a group baseline: group means on each rank, then whitening over both ranks' tokens:
    the same advantages and parameter change as one process. One optimizer step per rollout, so the
    rollout's scoring pass is skipped and the update's own pass gives the old log-probs (ratio 1)."""
    single, d1 = single_reinforce
    ddp, d2 = probe([*LAUNCH, "--config_file", "launch/ddp_cpu.yaml"], tmp_path / "ddp", 4, *REINFORCE_SINGLE_UPDATE)
    assert single["stats"]["approx_kl"] == 0 and single["stats"]["clipfrac_low"] == 0
    assert_same_update(single, d1, ddp, d2)


def test_zero3_grpo_update_with_kl_loss_matches_single_process(tmp_path):
    single, d1 = probe([sys.executable], tmp_path / "single", 8, "grpo.kl.beta=0.04")
    zero3, d3 = probe([*LAUNCH, "--config_file", "launch/zero3_cpu.yaml"], tmp_path / "zero3", 4, "grpo.kl.beta=0.04")
    assert single["stats"]["kl_loss"] > 0  # the reference (a ZeRO-3 wrapped copy) took part
    assert_same_update(single, d1, zero3, d3)


def test_sigterm_stops_grpo_at_a_step_boundary_with_a_checkpoint(tmp_path, grader_url):
    """The shared loop's stop: SIGTERM mid-run -> the step in progress finishes, a checkpoint of it is
    written, the run exits with EXIT_STOPPED (3) and resumes from it."""
    import signal
    import time

    from distributed_ft.engine.checkpoint import latest_checkpoint
    from distributed_ft.engine.signals import EXIT_STOPPED

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "distributed_ft", "grpo", CONFIG, f"output.dir={out}", "training.max_steps=200",
           "training.checkpoint_every=1000", "grader.config=null", f"grader.urls=[{grader_url}]",
           "grpo.eval_prompts=0", "logging.progress_bar=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    logged = len(rows(out))
    assert 2 <= logged < 200
    state = json.loads((latest_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())
    assert state["step"] == logged and state["prompts"]["position"] == 16 * logged
