"""Memory planning: per-GPU peak memory of a training step for every ZeRO stage and offload choice.

The accounting (model states, 4-bit base weights, activations under checkpointing and the chunked loss,
optimizer-step temporaries, and how they add up in a step's two phases) is in cluster/memory.py. Here the
run's model is read from its config alone: built on the meta device with the run's strategy applied, so
trainable counts are exact and no weights are ever read; its 4-bit weights are those of the linear layers
from_pretrained would quantize (every nn.Linear but the output head).

Each row's peak is the larger of the step's forward/backward and its optimizer step. What it predicts is the
memory of the tensors the step allocates (torch.cuda.max_memory_allocated's measure), not what the process
reserves around them (CUDA context, allocator caches and fragmentation): a row fits when its peak stays under
90% of the GPU. bench/plan_memory.py compares it with the peak measured on CPU for each lever.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from distributed_ft.cluster.memory import (GB, ActivationBytes, ModelShape, StateBytes, activation_bytes,
                                           bytes_per_parameter, model_state_bytes, optimizer_step_bytes)
from distributed_ft.errors import ConfigError, ModelError

USABLE_FRACTION = 0.9  # leave room for the CUDA context, buffers and fragmentation
__all__ = ["GB", "ModelShape", "StateBytes", "activation_bytes", "bytes_per_parameter", "make_plan",
           "model_state_bytes", "plan_for_run_config", "shape_from_run_config"]


@dataclass(frozen=True)
class Option:
    stage: int
    offload: str  # "none", "optimizer", "optimizer+params"
    launch: str | None  # the launch config that runs it, when the project ships one

    @property
    def label(self) -> str:
        return f"ZeRO-{self.stage}" + ("" if self.offload == "none" else f" + offload {self.offload}")


OPTIONS = (
    Option(0, "none", "launch/ddp.yaml"),
    Option(1, "none", None),
    Option(2, "none", "launch/zero2.yaml"),
    Option(2, "optimizer", None),
    Option(3, "none", "launch/zero3.yaml"),
    Option(3, "optimizer", None),
    Option(3, "optimizer+params", "launch/zero3_offload.yaml"),
)


@dataclass
class PlanRow:
    option: Option
    states: StateBytes
    activations: ActivationBytes
    step_temporaries: float  # the optimizer step's own temporaries on the GPU
    grads_outlive_backward: bool  # DDP buckets, ZeRO partitions, accumulation: gradients exist in forward too
    available: bool = True  # False where the model cannot be loaded this way (a 4-bit base under ZeRO-3)

    @property
    def forward_backward(self) -> float:
        st = self.states
        return st.params + st.optimizer + (st.grads if self.grads_outlive_backward else 0.0) + self.activations.peak

    @property
    def optimizer_step(self) -> float:
        return self.states.total + self.step_temporaries

    @property
    def gpu_total(self) -> float:
        """The step's peak on one GPU: the larger of its two phases."""
        return max(self.forward_backward, self.optimizer_step)


@dataclass
class Plan:
    shape: ModelShape
    gpus: int
    gpu_memory_gb: float
    precision: str
    optimizer: str
    seq_len: int
    micro_batch: int
    checkpointing: bool
    loss_chunk_tokens: int | None = None
    rows: list[PlanRow] = field(default_factory=list)

    def fits(self, row: PlanRow) -> bool:
        return row.available and row.gpu_total <= self.gpu_memory_gb * GB * USABLE_FRACTION

    def recommended(self) -> PlanRow | None:
        """The least-sharded option with a shipped launch config that fits (sharding costs communication)."""
        for row in self.rows:
            if row.option.launch is None or (self.gpus == 1 and row.option.stage in (1, 2)):
                continue
            if row.option.stage == 3 and self.gpus == 1 and row.option.offload != "optimizer+params":
                continue  # ZeRO-3 over one process shards nothing
            if self.fits(row):
                return row
        return None

    def recommended_launch(self) -> str | None:
        row = self.recommended()
        if row is None:
            return None
        if row.option.stage == 0 and self.gpus == 1:
            return "launch/single.yaml"
        return row.option.launch


def make_plan(shape: ModelShape, gpus: int, gpu_memory_gb: float = 80.0, *, seq_len: int = 2048,
              micro_batch: int = 1, precision: str = "mixed", optimizer: str = "adamw",
              checkpointing: bool = False, loss_chunk_tokens: int | None = None, causal_lm: bool = True,
              eager_attention: bool = False, accumulation: int = 1, fused_optimizer: bool = False,
              per_tensor_optimizer: bool = False) -> Plan:
    """The plan of every option. `loss_chunk_tokens` None is the whole-batch logits; an unfused optimizer
    steps all tensors at once (torch on a GPU) or with `per_tensor_optimizer` one at a time (torch on CPU)."""
    if gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory must be positive, got {gpu_memory_gb}")
    grad_width = bytes_per_parameter("fp32" if shape.quantized_params else precision, optimizer)[1]
    act = activation_bytes(shape, seq_len, micro_batch, 2 if precision == "mixed" else 4, checkpointing,
                           loss_chunk_tokens, causal_lm, eager_attention, grad_width=grad_width)
    plan = Plan(shape, gpus, gpu_memory_gb, precision, optimizer, seq_len, micro_batch, checkpointing,
                loss_chunk_tokens)
    for option in OPTIONS:
        states = model_state_bytes(shape.total_params, shape.trainable_params, gpus, option.stage,
                                   option.offload, precision, optimizer, shape.quantized_params, shape.double_quant)
        shards = gpus if option.stage >= 1 else 1
        temporaries = optimizer_step_bytes(shape, optimizer, shards, option.offload, per_tensor_optimizer,
                                           fused_optimizer)
        outlive = gpus > 1 or option.stage > 0 or accumulation > 1
        # ZeRO-3 partitions every weight at load time; bitsandbytes' packed 4-bit weights cannot be partitioned
        available = not (shape.quantized_params and option.stage == 3)
        plan.rows.append(PlanRow(option, states, act, temporaries, outlive, available))
    return plan


def _model_config(model_cfg):
    """The Hugging Face config of the run's model (config.json only)."""
    from transformers import AutoConfig

    from distributed_ft.models import resolve_model_path

    path = resolve_model_path(model_cfg)
    try:
        return AutoConfig.from_pretrained(path, revision=model_cfg.revision,
                                          trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the model config of '{path}': {str(err).splitlines()[0]}") from None


def shape_from_run_config(config) -> ModelShape:
    """Build the model on the meta device, apply the run's strategy and count parameters."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from distributed_ft.strategies import count_parameters, get_strategy
    from distributed_ft.strategies.common import head_module

    hf_config = _model_config(config.model)
    task = config.model.task
    if task != "causal_lm":
        hf_config.num_labels = 1 if task == "regression" else (config.model.num_labels or 2)
    strategy = get_strategy(config.strategy.name)
    with init_empty_weights():
        try:
            if task == "causal_lm":
                model = AutoModelForCausalLM.from_config(hf_config)
            else:
                model = AutoModelForSequenceClassification.from_config(hf_config)
        except ValueError as err:
            raise ModelError(f"cannot build model type '{hf_config.model_type}': {str(err).splitlines()[0]}") from None
        quantized = _quantized_weights(model) if config.model.load_in_4bit else 0
        head = head_module(model)
        model = strategy.apply(model, config.strategy, task)
    trainable, total = count_parameters(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    if not strategy.trains:
        trainable, trained = 0, []
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return ModelShape(total_params=total, trainable_params=trainable,
                      num_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
                      hidden_size=int(getattr(text, "hidden_size", 0) or 0),
                      num_heads=int(getattr(text, "num_attention_heads", 0) or 0),
                      vocab_size=int(getattr(text, "vocab_size", 0) or 0),
                      intermediate_size=getattr(text, "intermediate_size", None),
                      num_kv_heads=getattr(text, "num_key_value_heads", None),
                      quantized_params=quantized, double_quant=config.model.bnb_4bit_use_double_quant,
                      head_trainable=bool(strategy.trains and head is not None
                                          and any(p.requires_grad for p in head[1].parameters())),
                      largest_trainable=max((p.numel() for p in trained), default=0))


def _quantized_weights(model) -> int:
    """Weights from_pretrained loads in 4 bits: those of every nn.Linear but the output head."""
    from torch import nn

    from distributed_ft.strategies.common import head_module

    head = head_module(model)
    skip = head[1] if head is not None else None
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not skip)


def plan_for_run_config(config, gpus: int, gpu_memory_gb: float = 80.0, *,
                        per_tensor_optimizer: bool = False) -> Plan:
    """A plan for a loaded RunConfig: its strategy, precision, optimizer, max_length, micro-batch and
    accumulation, activation checkpointing, loss path and 4-bit base."""
    training = config.training
    # `auto` is bf16 autocast where the device computes bf16, as GPUs of the last generations do
    mixed = training.mixed_precision != "no" or config.model.dtype != "fp32"
    causal = config.model.task == "causal_lm"
    return make_plan(shape_from_run_config(config), gpus, gpu_memory_gb, seq_len=config.data.max_length,
                     micro_batch=training.micro_batch_size, precision="mixed" if mixed else "fp32",
                     optimizer=training.optimizer, checkpointing=config.model.gradient_checkpointing,
                     loss_chunk_tokens=training.loss_chunk_tokens if causal else None, causal_lm=causal,
                     eager_attention=config.model.attn_implementation == "eager",
                     accumulation=training.gradient_accumulation_steps,
                     fused_optimizer=bool(getattr(training, "fused_optimizer", False)),
                     per_tensor_optimizer=per_tensor_optimizer)


def plan_as_dict(plan: Plan) -> dict:
    """The plan as JSON data (`dft plan --json`)."""
    from dataclasses import asdict

    rows = [{"stage": r.option.stage, "offload": r.option.offload, "launch": r.option.launch,
             **asdict(r.states), "states": r.states.total, "activations": r.activations.peak,
             "activation_parts": asdict(r.activations), "step_temporaries": r.step_temporaries,
             "forward_backward": r.forward_backward, "optimizer_step": r.optimizer_step,
             "gpu_total": r.gpu_total, "available": r.available, "fits": plan.fits(r)} for r in plan.rows]
    return {"model": asdict(plan.shape), "gpus": plan.gpus, "gpu_memory_gb": plan.gpu_memory_gb,
            "precision": plan.precision, "loss_chunk_tokens": plan.loss_chunk_tokens,
            "checkpointing": plan.checkpointing, "rows": rows, "recommended_launch": plan.recommended_launch()}


def format_plan(plan: Plan) -> str:
    s = plan.shape

    def gb(value: float) -> str:
        return f"{value / GB:9.2f}"

    loss = ("whole-batch logits" if plan.loss_chunk_tokens is None
            else f"loss in chunks of {plan.loss_chunk_tokens} tokens")
    quantized = f", {s.quantized_params:,} of them 4-bit" if s.quantized_params else ""
    lines = [
        f"model: {s.total_params:,} parameters{quantized}, {s.trainable_params:,} trainable; {s.num_layers} layers, "
        f"hidden {s.hidden_size}, {s.num_heads} heads, vocabulary {s.vocab_size}",
        f"per GPU with {plan.gpus} GPU(s) of {plan.gpu_memory_gb:g} GB, {plan.precision} precision, "
        f"{plan.optimizer}; activations for micro-batch {plan.micro_batch} x {plan.seq_len} tokens"
        + (" with gradient checkpointing" if plan.checkpointing else "") + f", {loss}",
        f"{'option':<32}{'params':>9}{'grads':>9}{'optim':>9}{'states':>9}{'activ.':>9}{'peak':>9}{'CPU':>9}  fits",
    ]
    for row in plan.rows:
        st = row.states
        verdict = "n/a (4-bit weights)" if not row.available else ("yes" if plan.fits(row) else "no")
        lines.append(f"{row.option.label:<32}{gb(st.params)}{gb(st.grads)}{gb(st.optimizer)}{gb(st.total)}"
                     f"{gb(row.activations.peak)}{gb(row.gpu_total)}{gb(st.cpu)}  {verdict}")
    lines.append("(GB = 1e9 bytes; peak = the larger of forward/backward and the optimizer step; CPU = offloaded "
                 "bytes per GPU; 'fits' leaves 10% of the GPU free)")
    rec = plan.recommended()
    if rec is None:
        lines.append("recommended: nothing fits; lower training.micro_batch_size, enable "
                     "model.gradient_checkpointing, use a parameter-efficient strategy, model.load_in_4bit, "
                     "or more GPUs")
    else:
        lines.append(f"recommended: {rec.option.label} -> {plan.recommended_launch()}")
    return "\n".join(lines)
