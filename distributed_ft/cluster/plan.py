"""Memory planning: per-GPU memory of model states for every ZeRO stage and offload choice.

Model states follow the ZeRO paper (Rajbhandari et al., 2020): with mixed-precision Adam each
trainable parameter costs 2 bytes (fp16/bf16 weight) + 2 bytes (gradient) + 12 bytes (fp32 master
weight, momentum, variance). Stage 1 shards the optimizer states over the data-parallel GPUs,
stage 2 also the gradients, stage 3 also the weights. Frozen parameters (LoRA, prefix, selective)
only hold their weights. Trainable counts come from the model's config built on the meta device
with the run's strategy applied, so no weights are ever read.

Activations (Korthikanti et al., 2022, no recomputation, no tensor parallelism), per micro-batch:
    act_bytes = L * s * b * h * (34 + 5 * a * s / h) * (act_width / 2)  +  2 * s * b * V * 4
with L layers, s sequence length, b micro-batch, h hidden size, a attention heads, V vocabulary and
act_width the bytes of one activation value (2 for bf16/fp16, 4 for fp32); the last term holds the
fp32 logits and their gradient. With gradient checkpointing only each layer's input is kept,
    act_bytes = L * s * b * h * act_width + (one layer as above) + logits term.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from distributed_ft.errors import ConfigError, ModelError

GB = 1e9  # the ZeRO paper's GB
USABLE_FRACTION = 0.9  # leave room for the CUDA context, buffers and fragmentation

# (weight, gradient, optimizer) bytes per parameter. Mixed precision keeps an fp32 master copy in
# the optimizer states; pure fp32 training does not.
_OPTIMIZER_BYTES = {  # optimizer -> (mixed precision, fp32)
    "adamw": (12, 8), "adam": (12, 8),
    "sgd": (8, 4),  # master copy + momentum / momentum
    "adafactor": (4, 0),  # master copy; factored second moments are O(rows + cols), left out
}


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
class StateBytes:
    """Bytes of model states for one GPU (and what offload moves to CPU memory, per GPU)."""

    params: float
    grads: float
    optimizer: float
    cpu: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def bytes_per_parameter(precision: str = "mixed", optimizer: str = "adamw") -> tuple[int, int, int]:
    """(weight, gradient, optimizer state) bytes per parameter; precision is 'mixed' or 'fp32'."""
    if optimizer not in _OPTIMIZER_BYTES:
        raise ConfigError(f"no memory model for optimizer '{optimizer}'; known: {', '.join(_OPTIMIZER_BYTES)}")
    mixed, fp32 = _OPTIMIZER_BYTES[optimizer]
    return (2, 2, mixed) if precision == "mixed" else (4, 4, fp32)


def model_state_bytes(total_params: int, trainable_params: int, gpus: int, stage: int,
                      offload: str = "none", precision: str = "mixed", optimizer: str = "adamw") -> StateBytes:
    """Per-GPU model-state bytes for ZeRO `stage` over `gpus` data-parallel GPUs."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    w, g, k = bytes_per_parameter(precision, optimizer)
    params = w * total_params / (gpus if stage >= 3 else 1)
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


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, act_width: int = 2,
                     checkpointing: bool = False) -> float:
    """Activation memory of one micro-batch (see the module docstring for the formula)."""
    s, b, h, a, L = seq_len, micro_batch, shape.hidden_size, shape.num_heads, shape.num_layers
    per_layer = s * b * h * (34 + 5 * a * s / h) * (act_width / 2)
    logits = 2 * s * b * shape.vocab_size * 4
    if checkpointing:
        return L * s * b * h * act_width + per_layer + logits
    return L * per_layer + logits


@dataclass
class PlanRow:
    option: Option
    states: StateBytes
    activations: float

    @property
    def gpu_total(self) -> float:
        return self.states.total + self.activations


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
    rows: list[PlanRow] = field(default_factory=list)

    def fits(self, row: PlanRow) -> bool:
        return row.gpu_total <= self.gpu_memory_gb * GB * USABLE_FRACTION

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
              checkpointing: bool = False) -> Plan:
    if gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory must be positive, got {gpu_memory_gb}")
    act = activation_bytes(shape, seq_len, micro_batch, 2 if precision == "mixed" else 4, checkpointing)
    plan = Plan(shape, gpus, gpu_memory_gb, precision, optimizer, seq_len, micro_batch, checkpointing)
    for option in OPTIONS:
        states = model_state_bytes(shape.total_params, shape.trainable_params, gpus, option.stage,
                                   option.offload, precision, optimizer)
        plan.rows.append(PlanRow(option, states, act))
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
        model = strategy.apply(model, config.strategy, task)
    trainable, total = count_parameters(model)
    if not strategy.trains:
        trainable = 0
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return ModelShape(total_params=total, trainable_params=trainable,
                      num_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
                      hidden_size=int(getattr(text, "hidden_size", 0) or 0),
                      num_heads=int(getattr(text, "num_attention_heads", 0) or 0),
                      vocab_size=int(getattr(text, "vocab_size", 0) or 0))


def plan_for_run_config(config, gpus: int, gpu_memory_gb: float = 80.0) -> Plan:
    """A plan for a loaded RunConfig: its strategy, precision, optimizer, max_length and micro-batch."""
    training = config.training
    mixed = training.mixed_precision != "no" or config.model.dtype != "fp32"
    return make_plan(shape_from_run_config(config), gpus, gpu_memory_gb, seq_len=config.data.max_length,
                     micro_batch=training.micro_batch_size, precision="mixed" if mixed else "fp32",
                     optimizer=training.optimizer, checkpointing=config.model.gradient_checkpointing)


def plan_as_dict(plan: Plan) -> dict:
    """The plan as JSON data (`dft plan --json`)."""
    from dataclasses import asdict

    rows = [{"stage": r.option.stage, "offload": r.option.offload, "launch": r.option.launch,
             **asdict(r.states), "states": r.states.total, "activations": r.activations,
             "gpu_total": r.gpu_total, "fits": plan.fits(r)} for r in plan.rows]
    return {"model": asdict(plan.shape), "gpus": plan.gpus, "gpu_memory_gb": plan.gpu_memory_gb,
            "precision": plan.precision, "rows": rows, "recommended_launch": plan.recommended_launch()}


def format_plan(plan: Plan) -> str:
    s = plan.shape

    def gb(value: float) -> str:
        return f"{value / GB:9.2f}"

    lines = [
        f"model: {s.total_params:,} parameters, {s.trainable_params:,} trainable; {s.num_layers} layers, "
        f"hidden {s.hidden_size}, {s.num_heads} heads, vocabulary {s.vocab_size}",
        f"per GPU with {plan.gpus} GPU(s) of {plan.gpu_memory_gb:g} GB, {plan.precision} precision, "
        f"{plan.optimizer}; activations for micro-batch {plan.micro_batch} x {plan.seq_len} tokens"
        + (" with gradient checkpointing" if plan.checkpointing else ""),
        f"{'option':<32}{'params':>9}{'grads':>9}{'optim':>9}{'states':>9}{'+activ.':>9}{'CPU':>9}  fits",
    ]
    for row in plan.rows:
        st = row.states
        lines.append(f"{row.option.label:<32}{gb(st.params)}{gb(st.grads)}{gb(st.optimizer)}{gb(st.total)}"
                     f"{gb(row.gpu_total)}{gb(st.cpu)}  {'yes' if plan.fits(row) else 'no'}")
    lines.append("(GB = 1e9 bytes; CPU = offloaded bytes per GPU; 'fits' leaves 10% of the GPU free)")
    rec = plan.recommended()
    if rec is None:
        lines.append("recommended: nothing fits; lower training.micro_batch_size, enable "
                     "model.gradient_checkpointing, use a parameter-efficient strategy or more GPUs")
    else:
        lines.append(f"recommended: {rec.option.label} -> {plan.recommended_launch()}")
    return "\n".join(lines)
