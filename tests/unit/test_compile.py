"""`training.compile: true`: the same run compiled and eager trains to the same losses and saves the same
tensors under the same names (the model is compiled in place, so nothing gains a wrapper's prefix); the other
run kinds refuse it in one line."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from distributed_ft.config import load_config
from distributed_ft.errors import ConfigError
from tests.conftest import run_dft

RUN = ["training.max_steps=3", "training.warmup_steps=0", "training.mixed_precision=no", "eval.enabled=false",
       "logging.log_every=1", "logging.progress_bar=false", "data.train.0.num_examples=32",
       "data.train.1.num_examples=32", "data.validation_fraction=0.0"]


def run(tmp_path, compiled: bool):
    out = tmp_path / ("compiled" if compiled else "eager")
    proc = run_dft("train", "configs/full.yaml", f"output.dir={out}", f"training.compile={str(compiled).lower()}",
                   *RUN, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return proc.stderr, losses, load_file(str(out / "final" / "model.safetensors"))


def test_compiled_and_eager_runs_agree(tmp_path):
    eager_log, eager, eager_weights = run(tmp_path, compiled=False)
    compiled_log, compiled, compiled_weights = run(tmp_path, compiled=True)
    assert "torch.compile" in compiled_log and "torch.compile" not in eager_log
    assert len(eager) == 3 and eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, rel=1e-4)  # fp32; kernels fused differently round differently
    assert compiled_weights.keys() == eager_weights.keys()
    for name, tensor in eager_weights.items():
        assert compiled_weights[name].allclose(tensor, rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("config, kind", [("configs/dpo/quickstart.yaml", "dpo"), ("configs/rm/quickstart.yaml", "rm"),
                                          ("configs/ppo/quickstart.yaml", "ppo"),
                                          ("configs/grpo/quickstart.yaml", "grpo")])
def test_other_run_kinds_refuse_compile(config, kind):
    with pytest.raises(ConfigError, match="training.compile applies to `dft train`"):
        load_config(config, ["training.compile=true"], kind=kind)
