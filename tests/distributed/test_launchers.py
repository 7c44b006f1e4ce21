"""What the README promises about launching, each checked on a real 2-process CPU run: ZeRO-3 with CPU
offload, torchrun, the literal `accelerate launch --config_file launch/ddp_cpu.yaml -m distributed_ft train
CONFIG`, resuming ZeRO-3 and DDP runs from a mid-run checkpoint, and the end-of-run evaluation inside DDP and
ZeRO-3 runs. Runs are shared with test_gradient_scale.py (tests/distributed/launch.py: same global batch of 8,
AdamW, no clipping, checkpoint at step 3 of 6, evaluation on)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import (CONFIG, MID, REPO, SHARED, STEPS, column, launcher, run_train, shared_run,
                                      train_rows)

pytestmark = pytest.mark.distributed


def ranks(run_dir: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank-*.json")]
    return sorted(found, key=lambda r: r["rank"])


def test_readme_ddp_cpu_command_trains_two_ranks_like_one_process(tmp_path_factory):
    """`accelerate launch --config_file launch/ddp_cpu.yaml -m distributed_ft train CONFIG`, with no
    ACCELERATE_USE_CPU or other flag: two data-parallel ranks, the single process's losses."""
    prefix, env = launcher("ddp")
    assert [Path(prefix[0]).name, *prefix[1:]] == ["accelerate", "launch", "--config_file", "launch/ddp_cpu.yaml",
                                                   "-m", "distributed_ft"] and env == {}
    run = shared_run(tmp_path_factory, "ddp")
    info = ranks(run)
    assert [(r["rank"], r["world_size"]) for r in info] == [(0, 2), (1, 2)]
    assert all("MULTI_CPU" in r["distributed_type"] for r in info), info
    assert column(run, "loss") == pytest.approx(column(shared_run(tmp_path_factory, "single"), "loss"), rel=1e-5)


def test_torchrun_trains_two_ranks_with_the_ddp_losses(tmp_path_factory):
    """`torchrun --nproc_per_node 2 -m distributed_ft train CONFIG` (no accelerate config at all)."""
    run = shared_run(tmp_path_factory, "torchrun")
    info = ranks(run)
    assert [(r["rank"], r["world_size"]) for r in info] == [(0, 2), (1, 2)]
    assert all("MULTI_CPU" in r["distributed_type"] for r in info), info
    reference = column(shared_run(tmp_path_factory, "ddp"), "loss")
    assert len(reference) == STEPS
    assert column(run, "loss") == pytest.approx(reference, rel=1e-6)


def test_zero3_offload_trains_sharded_with_the_zero3_losses(tmp_path_factory):
    """launch/zero3_offload_cpu.yaml: launch/zero3_offload.yaml's DeepSpeed config (ZeRO-3, parameters and
    optimizer states offloaded to CPU) on 2 CPU processes."""
    run = shared_run(tmp_path_factory, "zero3_offload")
    info = ranks(run)
    assert [(r["rank"], r["world_size"], r["zero_stage"]) for r in info] == [(0, 2, 3), (1, 2, 3)]
    assert all(r["local_parameters"] < 0.55 * r["total_parameters"] for r in info)  # sharded, not replicated
    zero3 = shared_run(tmp_path_factory, "zero3")
    # measured: ~5e-7 relative (the offloaded optimizer is DeepSpeed's CPU Adam, not torch's AdamW)
    assert column(run, "loss") == pytest.approx(column(zero3, "loss"), rel=1e-5)
    assert column(run, "grad_norm") == pytest.approx(column(zero3, "grad_norm"), rel=1e-4)
    assert (run / "final" / "model.safetensors").is_file()


def test_zero3_offload_trains_with_the_configured_optimizer(tmp_path_factory):
    """training.optimizer=sgd, no clipping: ZeRO-3 + offload must give the single process's SGD losses."""
    reference = column(shared_run(tmp_path_factory, "sgd_single"), "loss")
    assert column(shared_run(tmp_path_factory, "sgd_zero3_offload"), "loss") == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("kind", ["ddp", "zero3"])
def test_resume_from_a_mid_run_checkpoint_gives_the_uninterrupted_losses(tmp_path_factory, kind):
    """The same launch, resuming the 6-step run's step-3 checkpoint into a new output folder: steps 4..6 log
    the losses (and gradient norms) the uninterrupted run logged."""
    full = shared_run(tmp_path_factory, kind)
    checkpoint = full / "checkpoints" / f"step-{MID:08d}"
    assert (checkpoint / "trainer_state.json").is_file()
    out = tmp_path_factory.mktemp(f"resume-{kind}") / "run"
    _, overrides = SHARED[kind]
    proc = run_train(kind, CONFIG, out, *overrides, f"training.resume_from={checkpoint}", "eval.enabled=false")
    assert f"at step {MID}" in proc.stdout + proc.stderr
    resumed, reference = train_rows(out), train_rows(full)
    assert [r["step"] for r in resumed] == list(range(MID + 1, STEPS + 1))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference[MID:]], rel=1e-6)
    assert [r["grad_norm"] for r in resumed] == pytest.approx([r["grad_norm"] for r in reference[MID:]], rel=1e-5)


def _scores(report: dict, which: str) -> dict[tuple[str, str], float | None]:
    return {(task, metric): row[which] for task, info in report["tasks"].items()
            for metric, row in info["metrics"].items()}


def _assert_same_scores(got: dict, expected: dict) -> None:
    assert set(got) == set(expected) and len(got) >= 6
    for key, value in expected.items():
        assert value is not None and got[key] is not None, key
        if key[1] in ("perplexity", "eval_loss"):  # token losses summed in another order across processes
            assert math.isclose(got[key], value, rel_tol=1e-5), (key, got[key], value)
        else:
            assert got[key] == value, (key, got[key], value)


@pytest.mark.parametrize("kind", ["ddp", "zero3"])
def test_end_of_run_evaluation_equals_a_single_process_evaluation(tmp_path_factory, kind):
    """eval/report.json of a DDP / ZeRO-3 run holds baseline and fine-tuned scores for every task and metric;
    the baseline equals the single-process run's baseline (same untrained model) and the fine-tuned scores
    equal `dft eval` in one process on that run's saved final model."""
    run = shared_run(tmp_path_factory, kind)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["meta"]["world_size"] == 2 and report["meta"]["steps"] == STEPS
    assert {task: info["n"] for task, info in report["tasks"].items()} == {"arithmetic": 6, "copy": 6}
    single = json.loads((shared_run(tmp_path_factory, "single") / "eval" / "report.json").read_text())
    _assert_same_scores(_scores(report, "baseline"), _scores(single, "baseline"))
    baseline, tuned = _scores(report, "baseline"), _scores(report, "fine_tuned")
    assert tuned[("copy", "perplexity")] < baseline[("copy", "perplexity")]  # the evaluated model trained

    out = tmp_path_factory.mktemp(f"eval-{kind}") / "eval"
    proc = subprocess.run([sys.executable, "-m", "distributed_ft", "eval", str(run / "config.yaml"),
                           "model.builtin=null", f"model.name_or_path={run}", f"output.dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads((out / "eval" / "report.json").read_text())
    _assert_same_scores(_scores(again, "fine_tuned"), tuned)
