"""Real 2-process training on CPU (DDP over gloo, DeepSpeed ZeRO-2 and ZeRO-3) against one process."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import FP32, run_to_end

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "distributed" / "scripts" / "train_probe.py"
STEPS = 8
COMMON = [f"training.max_steps={STEPS}", "training.learning_rate=0.003", "training.warmup_steps=0",
          "training.max_grad_norm=0.5", "logging.log_every=1", "eval.enabled=false",
          "data.train.0.num_examples=300", "data.train.1.num_examples=300", "data.validation_fraction=0.0",
          # the loss 16 tokens at a time: several chunks per micro-batch, and under ZeRO-3 ranks with fewer
          # tokens than the other pad with empty chunks (each chunk gathers the head's weights)
          "training.loss_chunk_tokens=16"]
LAUNCH = {
    "single": ([sys.executable], {}),
    "ddp": ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/ddp_cpu.yaml"],
            {"ACCELERATE_USE_CPU": "1"}),
    "zero2": ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/zero2_cpu.yaml"],
              {"DS_ACCELERATOR": "cpu"}),
    "zero3": ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/zero3_cpu.yaml"],
              {"DS_ACCELERATOR": "cpu"}),
}


def launch(kind: str, config: str, out: Path, *extra: str, cache: Path | None = None,
           extensions: Path | None = None) -> Path:
    prefix, env = LAUNCH[kind]
    if cache is not None:  # a fresh cache: every rank builds the built-in model after the process group is up
        env = {**env, "DFT_CACHE_DIR": str(cache)}
    if extensions is not None:  # where torch would JIT-compile C++ ops (DeepSpeed's CPU collectives)
        env = {**env, "TORCH_EXTENSIONS_DIR": str(extensions)}
    micro = 8 if kind == "single" else 4  # the same global batch of 8 in every run
    cmd = [*prefix, str(SCRIPT), config, f"output.dir={out}", f"training.micro_batch_size={micro}", FP32, *COMMON,
           *extra]
    proc = run_to_end(cmd, {**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows]


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank-*.json"))]


def reload_logits(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    probe = json.loads((run_dir / "probe.json").read_text())
    final = Path(probe["final"])
    if (final / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        reloaded = model(input_ids=torch.tensor(probe["input_ids"])).logits
    return torch.tensor(probe["logits"]), reloaded


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return {kind: launch(kind, "configs/full.yaml", root / kind, cache=root / "cache" if kind == "ddp" else None,
                         extensions=root / "torch_extensions")
            for kind in LAUNCH}


def test_deepspeed_launches_compile_nothing(full_runs):
    """DeepSpeed's CPU backend would JIT-build a shared-memory all-reduce at its first launch (minutes on a small
    machine, under a lock a killed build leaves behind); training never calls it, so no launch builds it."""
    extensions = full_runs["zero3"].parent / "torch_extensions"
    built = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*")) if extensions.exists() else []
    assert built == []


def test_loss_curves_match_single_process(full_runs):
    reference = losses(full_runs["single"])
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for kind in ("ddp", "zero2", "zero3"):
        assert losses(full_runs[kind]) == pytest.approx(reference, rel=2e-4, abs=2e-5), kind


def test_chunked_loss_draws_the_whole_batch_logits_curve(full_runs, tmp_path):
    """Every run above computes its loss in chunks; one process computing the whole batch's logits at once
    draws the same loss and gradient-norm curves."""
    plain = launch("single", "configs/full.yaml", tmp_path / "plain", "training.loss_chunk_tokens=null")
    chunked = full_runs["single"]
    assert losses(chunked) == pytest.approx(losses(plain), rel=1e-5)
    norms = [[json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()]
             for run in (chunked, plain)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_topology_and_zero3_sharding(full_runs):
    assert [r["world_size"] for r in ranks(full_runs["single"])] == [1]
    for kind in ("ddp", "zero2", "zero3"):
        assert sorted(r["rank"] for r in ranks(full_runs[kind])) == [0, 1], kind
    shards = ranks(full_runs["zero3"])
    assert all(r["zero_stage"] == 3 for r in shards)
    for shard in shards:  # each rank holds about half of every parameter
        assert 0.45 < shard["local_parameters"] / shard["total_parameters"] < 0.55, shard
    assert sum(r["local_parameters"] for r in shards) >= shards[0]["total_parameters"]
    single = ranks(full_runs["single"])[0]
    assert single["local_parameters"] == single["total_parameters"]


@pytest.mark.parametrize("kind", list(LAUNCH))
def test_saved_model_reloads_to_in_memory_logits(full_runs, kind):
    in_memory, reloaded = reload_logits(full_runs[kind])
    assert torch.allclose(in_memory, reloaded, atol=1e-4), (in_memory - reloaded).abs().max()


def test_zero3_lora_adapter_is_complete_and_reloads(tmp_path):
    run = launch("zero3", "configs/lora.yaml", tmp_path / "lora")
    final = json.loads((run / "probe.json").read_text())["final"]
    from safetensors.torch import load_file

    adapter = load_file(str(Path(final) / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any("lora_A" in k for k in adapter) and any("lora_B" in k for k in adapter)
    in_memory, reloaded = reload_logits(run)
    assert torch.allclose(in_memory, reloaded, atol=1e-4)
