"""`dft plan`: the ZeRO paper's model-state accounting, trainable counts on the meta device, and the
estimate against memory measured on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from distributed_ft.cluster.plan import (GB, ModelShape, activation_bytes, make_plan, model_state_bytes,
                                         shape_from_run_config)
from distributed_ft.errors import ConfigError

from tests.conftest import REPO


def test_matches_zero_paper_table_1_for_7_5b_on_64_gpus():
    # ZeRO paper, Table 1 / Figure 1: Psi = 7.5B, K = 12, N_d = 64.
    psi = 7_500_000_000
    per_gpu = [model_state_bytes(psi, psi, 64, stage).total / GB for stage in (0, 1, 2, 3)]
    assert per_gpu == pytest.approx([120, 31.4, 16.6, 1.88], abs=0.05)
    # What each stage shards: stage 1 the optimizer states, 2 also the gradients, 3 also the weights.
    s1, s2, s3 = (model_state_bytes(psi, psi, 64, stage) for stage in (1, 2, 3))
    assert (s1.params, s1.grads, s1.optimizer) == (2 * psi, 2 * psi, 12 * psi / 64)
    assert (s2.params, s2.grads) == (2 * psi, 2 * psi / 64)
    assert s3.params == 2 * psi / 64


def test_offload_moves_states_to_cpu_and_frozen_weights_cost_only_their_weights():
    psi, trainable = 1_000_000_000, 10_000_000
    lora = model_state_bytes(psi, trainable, 8, 2)
    assert lora.total == 2 * psi + 2 * trainable / 8 + 12 * trainable / 8
    offloaded = model_state_bytes(psi, psi, 8, 3, offload="optimizer+params")
    assert offloaded.params == offloaded.optimizer == 0
    assert offloaded.cpu == 2 * psi / 8 + 12 * psi / 8
    with pytest.raises(ConfigError, match="stage 3"):
        model_state_bytes(psi, psi, 8, 2, offload="optimizer+params")
    with pytest.raises(ConfigError, match="--gpus"):
        model_state_bytes(psi, psi, 0, 2)


def test_recommendation_is_the_least_sharded_option_that_fits():
    psi = 7_500_000_000
    shape = ModelShape(psi, psi, 32, 4096, 32, 32000)
    big = make_plan(shape, 64, 80, seq_len=2048, micro_batch=1, checkpointing=True)
    assert big.recommended().option.stage == 2  # 16.6 GB of states fit; plain DDP's 120 GB do not
    small = make_plan(shape, 64, 16, seq_len=2048, micro_batch=1, checkpointing=True)
    assert small.recommended_launch() == "launch/zero3.yaml"
    one = make_plan(shape, 1, 80, seq_len=2048, micro_batch=1, checkpointing=True)
    assert one.recommended_launch() == "launch/zero3_offload.yaml"
    assert make_plan(shape, 1, 1, seq_len=2048, micro_batch=1).recommended() is None


def _weights_free_model_dir(tmp_path):
    """A model folder holding only config.json: planning must never need the weights."""
    from distributed_ft.models.builtin import builtin_model_path

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(builtin_model_path() / "config.json", folder / "config.json")
    return folder


def _run_config(tmp_path, strategy: str, model_dir):
    from distributed_ft.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {model_dir}}}
        data: {{train: [{{builtin: copy}}], max_length: 64}}
        strategy: {strategy}
        training: {{micro_batch_size: 8}}
        """))
    return load_config(path)


@pytest.mark.parametrize("strategy", ["{name: full}", "{name: lora, r: 4}",
                                      "{name: selective, top_k: 1}",
                                      "{name: additive, method: prefix_tuning, num_virtual_tokens: 8}"])
def test_trainable_counts_on_meta_device_equal_the_real_model(tmp_path, strategy):
    from transformers import AutoConfig, AutoModelForCausalLM

    from distributed_ft.strategies import count_parameters, get_strategy

    model_dir = _weights_free_model_dir(tmp_path)
    config = _run_config(tmp_path, strategy, model_dir)
    shape = shape_from_run_config(config)  # no weights file exists: this can only use the config
    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    real = get_strategy(config.strategy.name).apply(real, config.strategy, "causal_lm")
    assert (shape.trainable_params, shape.total_params) == count_parameters(real)
    if config.strategy.name != "full":
        assert shape.trainable_params < shape.total_params / 4


def test_cli_prints_every_stage_and_a_launch_config(tmp_path, capsys):
    from distributed_ft.cli import build_parser

    config_path = tmp_path / "run.yaml"
    config_path.write_text(f"model: {{name_or_path: {_weights_free_model_dir(tmp_path)}}}\n"
                           "data: {train: [{builtin: copy}], max_length: 64}\nstrategy: full\n")
    parser = build_parser()
    args = parser.parse_args(["plan", str(config_path), "--gpus", "2", "--gpu-memory", "16", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["offload"]) for r in out["rows"]][:5:2] == [(0, "none"), (2, "none"), (3, "none")]
    assert out["recommended_launch"] == "launch/ddp.yaml"  # a 0.8M-parameter model fits anywhere
    assert out["rows"][0]["states"] == 16 * out["model"]["total_params"]  # fp32 AdamW: 4 + 4 + 8 bytes


MEASURE = r"""
import gc, json, os, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.set_num_threads(1)
cfg = AutoConfig.from_pretrained(sys.argv[1])
b, s = int(sys.argv[2]), int(sys.argv[3])

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def train_step(b, s):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    states = sum(t.numel() * t.element_size() for p in model.parameters() for t in (p, p.grad))
    states += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    return sum(p.numel() for p in model.parameters()), states

def high_water_mark():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

train_step(1, 8)  # load kernels and libraries first: their memory is not the model's
gc.collect()
base = rss()
# Reset the peak to the current size so that import-time transients do not count (Linux >= 4.0).
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
n, states = train_step(b, s)
print(json.dumps({"params": n, "states": states, "peak": high_water_mark() - base}))
"""


def test_estimate_against_measured_peak_memory_on_cpu():
    """fp32 AdamW step of the built-in model, micro-batch 32 x 64 tokens (the quickstart's).

    Model states must match the tensors exactly; states + activations must bound the measured
    peak resident memory from above by at most 50% (the formula counts masks and buffers a small
    Llama on CPU does not keep). Large freed blocks go back to the OS so the peak is the live peak.
    """
    from transformers import AutoConfig

    from distributed_ft.models.builtin import builtin_model_path

    path = builtin_model_path()
    b, s = 32, 64
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(b), str(s)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = AutoConfig.from_pretrained(path)
    n = measured["params"]
    shape = ModelShape(n, n, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size)
    states = model_state_bytes(n, n, 1, 0, precision="fp32").total
    assert states == pytest.approx(measured["states"], rel=1e-3)  # AdamW's step counters are the difference
    estimate = states + activation_bytes(shape, s, b, act_width=4)
    assert 1.0 <= estimate / measured["peak"] <= 1.5, (estimate, measured)
