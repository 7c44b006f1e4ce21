"""4-bit base models (QLoRA): the `model` section's load_in_4bit options as transformers' BitsAndBytesConfig,
the preparation PEFT gives a k-bit base before adapters go on it, and the launches a 4-bit base cannot run in.

from_pretrained quantizes every linear layer but the output head as it loads (bitsandbytes Linear4bit holding
Params4bit: two 4-bit values a byte, plus one absmax constant per block of 64, itself 8-bit under double
quantization); embeddings and norms keep their dtype.
"""
from __future__ import annotations

import logging

from distributed_ft.errors import ConfigError
from distributed_ft.models.config import DTYPES

INSTALL_HINT = 'pip install -e ".[qlora]"'


def quantization_config(model_cfg):
    """transformers' BitsAndBytesConfig for `model_cfg`, or None when the base is not loaded in 4 bits."""
    if not model_cfg.load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    require_4bit_support()
    compute = model_cfg.bnb_4bit_compute_dtype or model_cfg.dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=getattr(torch, DTYPES[compute]),
                              bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant)


def saved_quantization_config(recorded: dict):
    """The BitsAndBytesConfig a base was trained under, from the quantization_config its model config recorded."""
    from transformers import BitsAndBytesConfig

    require_4bit_support()
    return BitsAndBytesConfig.from_dict(recorded)


def require_4bit_support() -> None:
    """What loading a 4-bit base in this process needs: bitsandbytes installed, and no ZeRO-3 launch."""
    require_bitsandbytes()
    refuse_zero3()


def require_bitsandbytes() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.load_in_4bit needs bitsandbytes, which is not installed: {INSTALL_HINT}")
    quiet_optional_kernel_notice()


def quiet_optional_kernel_notice() -> None:
    """bitsandbytes' CPU backend (imported by PEFT whenever it is installed) looks for an optional fused-kernel
    package on import and warns when it is absent; the kernels it falls back to compute the same result."""
    backend_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _OptionalKernelFilter) for f in backend_log.filters):
        backend_log.addFilter(_OptionalKernelFilter())


def refuse_zero3() -> None:
    """ZeRO-3 partitions every parameter across ranks at load time; bitsandbytes' packed weights and their
    per-block constants cannot be partitioned so. transformers reads the same flag to shard from_pretrained."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ConfigError("model.load_in_4bit cannot run under DeepSpeed ZeRO-3 (4-bit weights cannot be "
                          "partitioned); launch with launch/single.yaml, ddp.yaml or zero2.yaml")


def prepare_4bit_base(model) -> None:
    """PEFT's prepare_model_for_kbit_training: every base weight frozen, 16-bit weights that were not
    quantized (embeddings, norms, head) upcast to fp32 for stable adapter training. Gradient checkpointing is
    left to model.gradient_checkpointing.

    On a CPU with bf16 instructions bitsandbytes repacks a 4-bit weight in place for a bf16 inference kernel
    the first time its layer runs in eval mode without gradients. That kernel computes in bf16 and passes no
    gradient to the layer's input, so a model evaluated before training (the baseline evaluation) would then
    train wrongly; it also needs out_features divisible by 32. It is turned off: every call dequantizes and
    computes in the compute dtype, in training and evaluation alike."""
    from bitsandbytes.nn import Linear4bit
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


class _OptionalKernelFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()
