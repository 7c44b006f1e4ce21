"""QLoRA under real 2-process launches on CPU: DDP and ZeRO-2 train a 4-bit base with the losses of one process;
ZeRO-3, which would partition the 4-bit weights, is refused with one line before any model loads."""
from __future__ import annotations

import importlib.util

import pytest

from tests.distributed.launch import column, run_train

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                 reason='bitsandbytes is not installed (pip install -e ".[qlora]")')]

CONFIG = "configs/qlora.yaml"
COMMON = ["training.max_steps=6", "training.warmup_steps=0", "eval.enabled=false", "logging.log_every=1",
          "logging.progress_bar=false", "data.train.0.num_examples=300", "data.train.1.num_examples=300",
          "training.loss_chunk_tokens=16", "training.mixed_precision=no"]  # fp32 under every launcher


def micro(kind: str) -> str:
    return f"training.micro_batch_size={8 if kind == 'single' else 4}"  # the same global batch of 8


def test_ddp_and_zero2_train_a_4bit_base_as_one_process_does(tmp_path):
    runs = {kind: tmp_path / kind for kind in ("single", "ddp", "zero2")}
    for kind, out in runs.items():
        run_train(kind, CONFIG, out, micro(kind), *COMMON)
    single = column(runs["single"], "loss")
    assert len(single) == 6 and single[-1] < single[0] - 0.5, single
    for kind in ("ddp", "zero2"):
        assert column(runs[kind], "loss") == pytest.approx(single, rel=1e-4), kind
        assert (runs[kind] / "final" / "adapter_model.safetensors").is_file(), kind


def test_zero3_is_refused_with_one_line(tmp_path):
    # accelerate exits 1 when a rank fails
    proc = run_train("zero3", CONFIG, tmp_path / "zero3", micro("zero3"), *COMMON, expect=1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("model.load_in_4bit cannot run under DeepSpeed ZeRO-3" in line for line in errors), \
        proc.stderr[-3000:]
    assert not (tmp_path / "zero3" / "metrics.jsonl").exists()
