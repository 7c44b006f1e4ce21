"""The byte accounting behind `dft plan`: model states per ZeRO stage and offload, 4-bit base weights, the
activations a training step keeps (with or without activation checkpointing, whole-batch or chunked loss) and
the optimizer step's temporaries. Everything is per GPU and per micro-batch; nothing is measured here.

Model states follow the ZeRO paper (Rajbhandari et al., 2020): with mixed-precision Adam each trainable
parameter costs 2 bytes (16-bit weight) + 2 (gradient) + 12 (fp32 master weight, momentum, variance); in fp32,
4 + 4 + 8. Stage 1 shards the optimizer states over the data-parallel GPUs, stage 2 also the gradients, stage 3
also the weights; offload moves the optimizer states (and under stage 3 the weights) to CPU memory. Frozen
parameters hold only their weights. A 4-bit base (model.load_in_4bit, bitsandbytes NF4/FP4) holds its quantized
linear weights in 0.5 byte each plus one absmax constant per block of 64 (fp32, or 8-bit with a fp32 constant
per 256 blocks under double quantization); the rest of the model (embeddings, norms, head, adapters) is fp32, as
PEFT's prepare_model_for_kbit_training upcasts it and keeps adapters in fp32.

Activations are counted tensor by tensor for a Llama-style decoder layer (pre-norm, SDPA attention, gated MLP)
as autograd saves them, per token, with h hidden, h_kv the key/value width, m the MLP width, a heads, in the
activation width (2 bytes for bf16/fp16, 4 for fp32):
    per layer = (6h + 2h_kv + 4m) x width + 4a
(the layer input, the normed input, q and k after RoPE, v, the attention output, the residual after
attention, the normed residual; the MLP's gate, up, act(gate) and act(gate)*up; the attention's fp32
log-sum-exp). Eager attention adds its a x s probabilities per token. A plain (ungated) MLP keeps 2m, so there
the count is an upper bound. With activation checkpointing a layer keeps only its input, h x width, and the
backward recomputes one layer at a time. The step's activation peak is the layers' sum plus the larger of
  - the loss at its peak: the final norm's input and output, and then, over the whole batch, three fp32
    vocabulary-wide copies (the logits, their log-softmax, its gradient), or, with the chunked loss
    (training.loss_chunk_tokens), a copy of the labelled positions' hidden states and the same three copies for
    one chunk only (each chunk's logits are recomputed in backward); a trained head's gradient is summed over
    the chunks, with up to three head-sized gradients alive at once;
  - one layer's backward: the recomputed layer (checkpointing) and two MLP-wide gradient temporaries.

Phases. A step's peak is the larger of its forward/backward (weights + optimizer states + activations, plus
the gradients where they outlive the step: DDP's buckets, ZeRO's partitions, gradient accumulation; one process
without accumulation creates them in backward as it frees the activations) and its optimizer step (weights +
gradients + optimizer states + the step's temporaries: torch's Adam/AdamW computes sqrt(v)/correction as a new
tensor, for all tensors at once on a GPU, one tensor at a time (two of the largest) on CPU; its fused kernel,
training.fused_optimizer, allocates none).

Calibrated on CPU in fp32 (bench/plan_memory.py: PyTorch's allocator counts the tensors of a real training
step through the engine): the counts above are the ones measured there, not fitted factors. The 16-bit width
is the formula's assumption; GPU kernels may keep a few more or fewer buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from distributed_ft.errors import ConfigError

GB = 1e9  # the ZeRO paper's GB
FP32 = 4

# (weight, gradient, optimizer) bytes per parameter. Mixed precision keeps an fp32 master copy in
# the optimizer states; pure fp32 training does not.
_OPTIMIZER_BYTES = {  # optimizer -> (mixed precision, fp32)
    "adamw": (12, 8), "adam": (12, 8),
    "sgd": (8, 4),  # master copy + momentum / momentum
    "adafactor": (4, 0),  # master copy; factored second moments are O(rows + cols), left out
}
# the optimizers whose step allocates a temporary the size of the tensors it updates (sqrt of the variance)
_STEP_TEMPORARY = {"adamw", "adam"}

QUANT_BLOCK = 64  # bitsandbytes' 4-bit block: one absmax constant per 64 weights
NESTED_BLOCK = 256  # double quantization: one fp32 constant per 256 of those 8-bit constants


def bytes_per_parameter(precision: str = "mixed", optimizer: str = "adamw") -> tuple[int, int, int]:
    """(weight, gradient, optimizer state) bytes per parameter; precision is 'mixed' or 'fp32'."""
    if optimizer not in _OPTIMIZER_BYTES:
        raise ConfigError(f"no memory model for optimizer '{optimizer}'; known: {', '.join(_OPTIMIZER_BYTES)}")
    mixed, fp32 = _OPTIMIZER_BYTES[optimizer]
    return (2, 2, mixed) if precision == "mixed" else (4, 4, fp32)


def quantized_bytes_per_weight(double_quant: bool = True) -> float:
    """Bytes of one 4-bit weight with its share of the block constants."""
    if double_quant:
        return 0.5 + 1 / QUANT_BLOCK + FP32 / (QUANT_BLOCK * NESTED_BLOCK)
    return 0.5 + FP32 / QUANT_BLOCK


@dataclass
class StateBytes:
    """Bytes of model states for one GPU (and what offload moves to CPU memory, per GPU)."""

    params: float
    grads: float
    optimizer: float
    cpu: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(total_params: int, trainable_params: int, gpus: int, stage: int,
                      offload: str = "none", precision: str = "mixed", optimizer: str = "adamw",
                      quantized_params: int = 0, double_quant: bool = True) -> StateBytes:
    """Per-GPU model-state bytes for ZeRO `stage` over `gpus` data-parallel GPUs; `quantized_params` of the
    frozen weights are 4-bit (and then everything else is fp32, see the module docstring)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if quantized_params:
        w, g, k = bytes_per_parameter("fp32", optimizer)
        weights = quantized_bytes_per_weight(double_quant) * quantized_params + w * (total_params - quantized_params)
    else:
        w, g, k = bytes_per_parameter(precision, optimizer)
        weights = w * total_params
    params = weights / (gpus if stage >= 3 else 1)
    grads = g * trainable_params / (gpus if stage >= 2 else 1)
    optim = k * trainable_params / (gpus if stage >= 1 else 1)
    cpu = 0.0
    if "optimizer" in offload:
        cpu += optim
        optim = 0.0
    if "params" in offload:
        if stage != 3:
            raise ConfigError("parameter offload needs ZeRO stage 3")
        cpu += params
        params = 0.0
    return StateBytes(params, grads, optim, cpu)


@dataclass
class ModelShape:
    total_params: int
    trainable_params: int
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    intermediate_size: int | None = None  # None: 4 x hidden
    num_kv_heads: int | None = None  # None: as many as the heads
    quantized_params: int = 0  # frozen linear weights loaded in 4 bits
    double_quant: bool = True
    head_trainable: bool = False  # the output head's weight trains (its gradient is summed over loss chunks)
    largest_trainable: int = 0  # elements of the largest trainable tensor (per-tensor optimizer temporaries)

    @property
    def mlp(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def kv_width(self) -> int:
        heads = self.num_kv_heads or self.num_heads
        return self.hidden_size * heads // max(self.num_heads, 1)


@dataclass(frozen=True)
class Workload:
    """What one micro-batch of a step computes: its tokens and the levers that change what it keeps."""

    seq_len: int
    micro_batch: int
    act_width: int = 2  # bytes of one activation value
    checkpointing: bool = False
    loss_chunk_tokens: int | None = None  # None: the whole batch's logits at once
    causal_lm: bool = True  # other tasks' logits are a few values an example
    eager_attention: bool = False

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


@dataclass
class ActivationBytes:
    """Activation bytes of one micro-batch: what the layers keep, and the two moments that add to it."""

    layers: float  # kept by the decoder layers for backward (under checkpointing: each layer's input)
    loss: float  # the loss at its peak (see the module docstring)
    layer_backward: float  # one layer's backward: its recomputed activations and gradient temporaries

    @property
    def peak(self) -> float:
        return self.layers + max(self.loss, self.layer_backward)


def per_layer_bytes(shape: ModelShape, work: Workload) -> float:
    """What one decoder layer keeps for backward without checkpointing (module docstring)."""
    h, w = shape.hidden_size, work.act_width
    per_token = (6 * h + 2 * shape.kv_width + 4 * shape.mlp) * w + FP32 * shape.num_heads
    if work.eager_attention:
        per_token += shape.num_heads * work.seq_len * w
    return work.tokens * per_token


def loss_bytes(shape: ModelShape, work: Workload, grad_width: int) -> float:
    """The final norm and the loss path at its peak, the trained head's summed gradient included."""
    h, v, w = shape.hidden_size, shape.vocab_size, work.act_width
    tokens = work.tokens
    final_norm = 2 * tokens * h * w
    if not work.causal_lm:
        return final_norm
    head_grad = v * h * grad_width if shape.head_trainable else 0.0
    if work.loss_chunk_tokens is None:
        logits = tokens * v * FP32
        return final_norm + max(3 * logits, logits + head_grad)
    labelled = max(tokens - work.micro_batch, 1)  # the last position of each row has no next token
    chunk = min(work.loss_chunk_tokens, labelled)
    logits = chunk * v * FP32
    states = labelled * h * w
    if math.ceil(labelled / chunk) > 1:
        return final_norm + states + max(3 * logits + head_grad, logits + 3 * head_grad)
    return final_norm + states + max(3 * logits, logits + head_grad)


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, act_width: int = 2,
                     checkpointing: bool = False, loss_chunk_tokens: int | None = None, causal_lm: bool = True,
                     eager_attention: bool = False, grad_width: int | None = None) -> ActivationBytes:
    """Activation memory of one micro-batch (see the module docstring for what is counted)."""
    work = Workload(seq_len, micro_batch, act_width, checkpointing, loss_chunk_tokens, causal_lm, eager_attention)
    layer = per_layer_bytes(shape, work)
    mlp_grads = 2 * work.tokens * shape.mlp * act_width
    if checkpointing:
        layers = shape.num_layers * work.tokens * shape.hidden_size * act_width
        backward = layer + mlp_grads
    else:
        layers, backward = shape.num_layers * layer, mlp_grads
    return ActivationBytes(layers, loss_bytes(shape, work, grad_width or act_width), backward)


def optimizer_step_bytes(shape: ModelShape, optimizer: str, shards: int, offload: str = "none",
                         per_tensor: bool = False, fused: bool = False) -> float:
    """The optimizer step's temporaries on the GPU: Adam/AdamW's fp32 sqrt(v)/correction, for all of this
    GPU's trainable tensors at once (torch's multi-tensor step on GPU) or for one tensor at a time (its
    per-tensor step, as on CPU: two temporaries of the largest tensor). None for the fused kernel (it updates
    in place) or where the optimizer is offloaded."""
    if fused or optimizer not in _STEP_TEMPORARY or "optimizer" in offload or not shape.trainable_params:
        return 0.0
    if per_tensor:
        return 2 * FP32 * shape.largest_trainable
    return FP32 * shape.trainable_params / shards
