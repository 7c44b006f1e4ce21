"""The `model` config section: where the model comes from and how it is loaded."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distributed_ft.strict import StrictModel
from distributed_ft.tasks import ModelTask

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ModelConfig(StrictModel):
    name_or_path: str | None = None
    builtin: Literal["tiny"] | None = None
    task: ModelTask = "causal_lm"
    num_labels: int | None = Field(default=None, ge=1)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    # QLoRA: the base's linear layers loaded as 4-bit bitsandbytes weights (the head and embeddings stay as they
    # are), frozen under an adapter. The names are transformers' BitsAndBytesConfig keywords; the defaults are
    # the QLoRA paper's (NF4, double quantization), and the compute dtype defaults to model.dtype.
    load_in_4bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    bnb_4bit_use_double_quant: bool = True

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name_or_path is None) == (self.builtin is None):
            raise ValueError("set exactly one of model.name_or_path and model.builtin")
        return self

    @model_validator(mode="after")
    def _4bit_options_need_4bit(self):
        # a value other than the default: a run's resolved config.yaml holds every field, and must load back
        options = sorted(name for name, field in type(self).model_fields.items()
                         if name.startswith("bnb_4bit_") and getattr(self, name) != field.default)
        if options and not self.load_in_4bit:
            raise ValueError(f"model.{options[0]} is set but model.load_in_4bit is false; set load_in_4bit: true "
                             "or remove it")
        return self
