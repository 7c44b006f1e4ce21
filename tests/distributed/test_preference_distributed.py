"""`dft dpo` and `dft rm` on 2 real CPU ranks give one process's loss curve and held-out figures for the same
global batch: DPO with LoRA under DDP and ZeRO-2 (reference = adapter disabled), DPO with full fine-tuning
under ZeRO-3 (the frozen reference sharded like the policy), the reward model under ZeRO-2 and ZeRO-3."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import FP32

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
# DeepSpeed clips inside its own engine; without clipping both sides compute the very same update.
SMALL = ["pairs.train.0.num_examples=200", "training.max_steps=4", "training.warmup_steps=0", "logging.log_every=1", "pairs.eval_pairs=16",
         "logging.progress_bar=false", "training.max_grad_norm=null"]
FULL = ["strategy={name: full}", "training.learning_rate=0.0005"]


def run(recipe: str, launch: str | None, out: Path, micro: int, *extra: str) -> Path:
    prefix = [*LAUNCH, launch] if launch else [sys.executable]
    cmd = [*prefix, "-m", "distributed_ft", recipe, f"configs/{recipe}/quickstart.yaml", f"output.dir={out}", FP32,
           f"training.micro_batch_size={micro}", *SMALL, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return out


def curve(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(one: Path, two: Path) -> None:
    a, b = curve(one), curve(two)
    assert len(a) == len(b) == 4 and max(a) - min(a) > 1e-3  # the steps differ: it trains
    assert b == pytest.approx(a, rel=1e-4)
    fa, fb = (json.loads((o / "preference_eval.json").read_text()) for o in (one, two))
    assert fb["final"]["pairs"] == fa["final"]["pairs"] == 16
    assert fb["final"] == pytest.approx(fa["final"], rel=1e-4, abs=1e-6)
    ranks = [json.loads(p.read_text()) for p in sorted((two / "ranks").glob("rank-*.json"))]
    assert [r["world_size"] for r in ranks] == [2, 2]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Each recipe's one-process run, made once for the 2-rank runs compared with it."""
    made = {}

    def get(recipe: str, *extra: str) -> Path:
        key = (recipe, *extra)
        if key not in made:
            made[key] = run(recipe, None, tmp_path_factory.mktemp(recipe), 8, *extra)
        return made[key]
    return get


@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_dpo_lora_equals_one_process(tmp_path, one_process, launch):
    same_run(one_process("dpo"), run("dpo", f"launch/{launch}_cpu.yaml", tmp_path / launch, 4))


def test_dpo_full_zero3_equals_one_process_with_a_sharded_reference(tmp_path):
    two = run("dpo", "launch/zero3_cpu.yaml", tmp_path / "zero3", 4, *FULL)
    same_run(run("dpo", None, tmp_path / "one", 8, *FULL), two)
    for rank in sorted((two / "ranks").glob("rank-*.json")):
        info = json.loads(rank.read_text())
        assert info["zero_stage"] == 3 and info["local_parameters"] * 2 == info["total_parameters"]
        assert info["reference_local_parameters"] == info["local_parameters"]  # half of the copy, too


@pytest.mark.parametrize("launch", ["zero2", "zero3"])
def test_rm_equals_one_process(tmp_path, one_process, launch):
    two = run("rm", f"launch/{launch}_cpu.yaml", tmp_path / launch, 4, "training.learning_rate=0.001")
    same_run(one_process("rm", "training.learning_rate=0.001"), two)
    assert (two / "final" / "model.safetensors").is_file() and (two / "grader.yaml").is_file()
    for rank in sorted((two / "ranks").glob("rank-*.json")):
        assert json.loads(rank.read_text())["zero_stage"] == int(launch[-1])
