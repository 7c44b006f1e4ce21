"""On a CUDA GPU: one training step of the built-in tiny model through SFTRun with bf16 autocast, on the GPU,
giving the loss the CPU in fp32 gives for the same batch and weights. Skipped without a GPU (conftest.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.gpu

# A fresh process: accelerate keeps one device / mixed-precision setting per process.
ONE_STEP = r"""
import json, sys
import torch
from distributed_ft.data.collate import collate, model_inputs
from distributed_ft.engine.losses import loss_terms, per_example_loss
from distributed_ft.recipes.sft import SFTRun

job = SFTRun(sys.argv[1], sys.argv[2:]).build()
data, training = job.data, job.config.training
# The CPU fp32 reference: the untrained model (still on the CPU, fp32) on the sampler's first global batch.
idx = data.sampler(training.seed).next_indices(training.micro_batch_size)
batch = collate([data.train[i] for i in idx], job.tokenizer.pad_token_id)
with torch.no_grad():
    logits = job.model(**model_inputs(batch)).logits
cpu = float(per_example_loss(logits, batch["labels"], "causal_lm").sum()) / sum(loss_terms(data.train[i], "causal_lm")
                                                                             for i in idx)
job.prepare()
device = str(next(job.model.parameters()).device)
result = job.train()
job.close()
print("RESULT " + json.dumps({"cpu_fp32_loss": cpu, "loss": result.losses[0], "device": device,
                              "mixed_precision": str(job.accelerator.mixed_precision)}))
"""


def test_one_bf16_training_step_on_cuda_matches_cpu_fp32(tmp_path):
    """Planted bug that makes it fail (seen on a CPU-only machine with the skip bypassed): the run not placing
    the model on the GPU (device 'cpu'). A wrong autocast or loss on the GPU fails the 2% loss comparison."""
    proc = subprocess.run([sys.executable, "-c", ONE_STEP, "configs/full.yaml", f"output.dir={tmp_path / 'run'}",
                           "training.max_steps=1", "training.warmup_steps=0", "training.micro_batch_size=8",
                           "training.mixed_precision=bf16", "eval.enabled=false", "data.validation_fraction=0.0",
                           "data.train.0.num_examples=64", "data.train.1.num_examples=32",
                           "logging.progress_bar=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["device"].startswith("cuda"), result
    assert result["mixed_precision"] == "bf16", result
    assert math.isfinite(result["loss"]), result
    assert result["loss"] == pytest.approx(result["cpu_fp32_loss"], rel=2e-2), result
