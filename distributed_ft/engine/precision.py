"""Which mixed precision a run computes in. `training.mixed_precision: auto` (the default) is bf16 autocast
where the device computes bf16 natively, fp32 elsewhere: on a CPU with avx512_bf16 / amx_bf16 (or Arm's bf16)
autocast roughly halves a step, while a CPU without them emulates bf16 through fp32 and is slower than fp32.
Weights stay fp32 either way (autocast keeps fp32 master weights)."""
from __future__ import annotations

from distributed_ft.engine.cpu_features import native_bf16, read_cpuinfo


def resolve_mixed_precision(asked: str, model_dtype: str = "fp32", deepspeed: bool = False,
                            auto_fp32: str | None = None) -> tuple[str, str]:
    """(accelerate's mixed_precision, why) for the asked `training.mixed_precision` on this machine; `auto_fp32`
    says why a run kind keeps `auto` at fp32."""
    import torch

    if asked != "auto":
        return asked, "training.mixed_precision"
    if auto_fp32:
        return "no", f"auto: {auto_fp32}"
    if model_dtype != "fp32":
        return "no", f"auto: the weights are {model_dtype} already (model.dtype)"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU computes bf16"
        return "no", "auto: this GPU has no bf16"
    if deepspeed:  # DeepSpeed's bf16 mode holds bf16 weights and gradients; CPU runs stay in fp32 there
        return "no", "auto: DeepSpeed on CPU trains in fp32"
    if native_bf16(read_cpuinfo()):
        return "bf16", "auto: this CPU computes bf16 natively"
    return "no", "auto: this CPU would emulate bf16"
