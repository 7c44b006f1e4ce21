"""`dft plan`: the ZeRO paper's model-state accounting, trainable counts on the meta device, the memory levers
(activation checkpointing, chunked loss, 4-bit base, offload, the fused optimizer) each moving the prediction by
what it removes, and what a run config feeds it. The prediction against memory measured in real training steps,
lever by lever, is bench/plan_memory.py."""
from __future__ import annotations

import json
import shutil
import textwrap

import pytest

from distributed_ft.cluster.memory import quantized_bytes_per_weight
from distributed_ft.cluster.plan import (GB, ModelShape, activation_bytes, make_plan, model_state_bytes,
                                         plan_for_run_config, shape_from_run_config)
from distributed_ft.errors import ConfigError


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


# A Llama-7B-like shape: 32 layers, hidden 4096, MLP 11008, vocabulary 32000; 6.5B of its weights in linear layers.
LLAMA7B = dict(num_layers=32, hidden_size=4096, num_heads=32, vocab_size=32000, intermediate_size=11008)
LINEAR_7B = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
TOTAL_7B = LINEAR_7B + 2 * 32000 * 4096 + 65 * 4096


def test_chunked_loss_keeps_one_chunk_of_logits_instead_of_the_whole_batch():
    shape = ModelShape(TOTAL_7B, 40_000_000, **LLAMA7B)  # a LoRA run: the head is frozen
    s, b, V, h = 2048, 4, 32000, 4096
    whole = activation_bytes(shape, s, b, act_width=2)
    chunked = activation_bytes(shape, s, b, act_width=2, loss_chunk_tokens=1024)
    assert chunked.layers == whole.layers  # the decoder layers keep the same tensors
    final_norm = 2 * s * b * h * 2
    assert whole.loss == final_norm + 3 * s * b * V * 4  # logits, log-softmax, gradient: fp32, the whole batch
    labelled = s * b - b
    assert chunked.loss == final_norm + labelled * h * 2 + 3 * 1024 * V * 4  # one chunk's, and the hidden states
    assert whole.loss - chunked.loss == 3 * (s * b - 1024) * V * 4 - labelled * h * 2
    # a chunk as large as the batch saves nothing but costs the copy of the hidden states
    one_chunk = activation_bytes(shape, s, b, act_width=2, loss_chunk_tokens=10 ** 6)
    assert one_chunk.loss == pytest.approx(whole.loss + labelled * h * 2 - 3 * b * V * 4)
    # a trained head's gradient is summed over the chunks: up to three of them alive at the last chunks
    trained_head = ModelShape(TOTAL_7B, TOTAL_7B, **LLAMA7B, head_trainable=True)
    summed = activation_bytes(trained_head, s, b, act_width=2, loss_chunk_tokens=1024)
    assert summed.loss - chunked.loss == max(3 * 1024 * V * 4 + V * h * 2, 1024 * V * 4 + 3 * V * h * 2) \
        - 3 * 1024 * V * 4


def test_activation_checkpointing_keeps_each_layers_input_and_recomputes_one_layer():
    shape = ModelShape(TOTAL_7B, 40_000_000, **LLAMA7B)
    s, b, h, m, a, L = 2048, 1, 4096, 11008, 32, 32
    plain = activation_bytes(shape, s, b, act_width=2)
    ckpt = activation_bytes(shape, s, b, act_width=2, checkpointing=True)
    per_layer = s * b * ((6 * h + 2 * h + 4 * m) * 2 + 4 * a)
    assert plain.layers == L * per_layer
    assert ckpt.layers == L * s * b * h * 2
    assert ckpt.layer_backward == per_layer + 2 * s * b * m * 2  # one layer recomputed, its MLP gradients
    assert ckpt.loss == plain.loss
    assert plain.peak / ckpt.peak > 4  # 32 layers of ~100 kB a token against one layer's and their inputs


def test_4bit_base_divides_the_linear_weights_by_about_4_and_keeps_the_rest_fp32():
    trainable = 40_000_000
    bf16 = model_state_bytes(TOTAL_7B + trainable, trainable, 1, 0, precision="mixed")
    nf4 = model_state_bytes(TOTAL_7B + trainable, trainable, 1, 0, precision="mixed", quantized_params=LINEAR_7B)
    rest = TOTAL_7B + trainable - LINEAR_7B
    # 0.5 byte a weight + an 8-bit absmax per 64 + an fp32 constant per 256 of those
    assert quantized_bytes_per_weight(True) == 0.5 + 1 / 64 + 4 / (64 * 256)
    assert quantized_bytes_per_weight(False) == 0.5 + 4 / 64
    assert nf4.params == pytest.approx(LINEAR_7B * (0.5 + 1 / 64 + 4 / 16384) + 4 * rest)
    linear_bf16, linear_nf4 = 2 * LINEAR_7B, nf4.params - 4 * rest
    assert linear_bf16 / linear_nf4 == pytest.approx(3.88, abs=0.01)
    assert bf16.params / nf4.params > 2.9  # 13.6 GB -> 4.6 GB for the whole 7B base (1 GB of it fp32 embeddings)
    # the adapters train in fp32 over a 4-bit base (PEFT keeps them so): 4 + 8 bytes of gradient and Adam
    assert (nf4.grads, nf4.optimizer) == (4 * trainable, 8 * trainable)


def test_4bit_plan_marks_zero3_unavailable_and_recommends_a_single_gpu():
    shape = ModelShape(TOTAL_7B + 40_000_000, 40_000_000, **LLAMA7B, quantized_params=LINEAR_7B)
    plan = make_plan(shape, 1, 16, seq_len=2048, micro_batch=1, checkpointing=True, loss_chunk_tokens=1024)
    assert [r.available for r in plan.rows] == [r.option.stage != 3 for r in plan.rows]
    assert not any(plan.fits(r) for r in plan.rows if r.option.stage == 3)
    assert plan.recommended_launch() == "launch/single.yaml"  # a 7B QLoRA run fits a 16 GB GPU (5.9 GB)
    bf16 = make_plan(ModelShape(TOTAL_7B + 40_000_000, 40_000_000, **LLAMA7B), 1, 16, seq_len=2048, micro_batch=1,
                     checkpointing=True, loss_chunk_tokens=1024)
    assert not bf16.fits(bf16.rows[0])  # the same LoRA over a bf16 base does not (15 GB)


def test_offload_and_the_fused_optimizer_remove_the_optimizer_steps_temporaries():
    psi = 1_000_000_000
    shape = ModelShape(psi, psi, 16, 2048, 16, 32000, largest_trainable=65_536_000)
    multi = make_plan(shape, 8, 80, seq_len=1024, loss_chunk_tokens=1024)
    zero2, zero2_offload = multi.rows[2], multi.rows[3]
    assert zero2.step_temporaries == 4 * psi / 8  # all of this GPU's fp32 partition at once
    assert zero2_offload.step_temporaries == 0 and zero2_offload.states.optimizer == 0
    assert zero2.gpu_total - zero2_offload.gpu_total >= zero2.states.optimizer
    fused = make_plan(shape, 8, 80, seq_len=1024, loss_chunk_tokens=1024, fused_optimizer=True)
    assert all(r.step_temporaries == 0 for r in fused.rows)
    per_tensor = make_plan(shape, 1, 80, seq_len=1024, per_tensor_optimizer=True)
    assert per_tensor.rows[0].step_temporaries == 2 * 4 * 65_536_000  # torch's CPU step: two of the largest


def test_one_process_makes_gradients_as_it_frees_activations():
    """Without data parallelism or accumulation the gradients are created in backward as the activations go:
    the peak is the larger phase, not their sum; with either, the gradients exist through forward too."""
    psi = 1_000_000_000
    shape = ModelShape(psi, psi, 16, 2048, 16, 32000)
    alone = make_plan(shape, 1, 80, seq_len=1024, micro_batch=4, fused_optimizer=True).rows[0]
    st, act = alone.states, alone.activations.peak
    assert alone.gpu_total == max(st.params + st.optimizer + act, st.total)
    accumulating = make_plan(shape, 1, 80, seq_len=1024, micro_batch=4, fused_optimizer=True, accumulation=2).rows[0]
    assert accumulating.gpu_total == st.total + act
    ddp = make_plan(shape, 2, 80, seq_len=1024, micro_batch=4, fused_optimizer=True).rows[0]
    assert ddp.forward_backward == st.total + act


def test_the_run_configs_levers_reach_the_plan(tmp_path):
    """What `dft plan` reads from a run config: checkpointing, the chunk size, the 4-bit base and its linears."""
    model_dir = _weights_free_model_dir(tmp_path)
    base = _run_config(tmp_path, "{name: lora, r: 4}", model_dir)
    plain = plan_for_run_config(base, 1)
    assert plain.loss_chunk_tokens == 1024 and not plain.checkpointing
    assert plain.shape.quantized_params == 0
    path = tmp_path / "run4.yaml"
    path.write_text(f"model: {{name_or_path: {model_dir}, load_in_4bit: true, gradient_checkpointing: true}}\n"
                    "data: {train: [{builtin: copy}], max_length: 64}\nstrategy: {name: lora, r: 4}\n"
                    "training: {micro_batch_size: 8, loss_chunk_tokens: 128}\n")
    from distributed_ft.config import load_config

    quantized = plan_for_run_config(load_config(path), 1)
    h, m, L = 128, 344, 4  # the built-in tiny model: every block's q, k, v, o, gate, up, down; not the head
    assert quantized.shape.quantized_params == L * (4 * h * h + 3 * h * m)
    assert quantized.checkpointing and quantized.loss_chunk_tokens == 128
    assert quantized.rows[0].states.params < plain.rows[0].states.params
    assert not quantized.rows[4].available and plain.rows[4].available
