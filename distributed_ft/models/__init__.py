"""Loading models and tokenizers: Hugging Face ids, local folders and the built-in tiny model; a 4-bit base
(model.load_in_4bit) through models/quantization.py."""
from __future__ import annotations

from pathlib import Path

from distributed_ft.errors import ModelError
from distributed_ft.models.builtin import builtin_model_path
from distributed_ft.models.config import DTYPES
from distributed_ft.models.quantization import prepare_4bit_base, quantization_config
from distributed_ft.tasks import get_task


def resolve_model_path(model_cfg) -> str:
    if model_cfg.builtin:
        return str(builtin_model_path(model_cfg.builtin))
    name = model_cfg.name_or_path
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise ModelError(f"model folder does not exist: {name}")
    return str(Path(name).expanduser()) if looks_local else name


def load_tokenizer(path: str, model_cfg):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer of '{path}': {str(err).splitlines()[0]}") from None
    return tokenizer


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token; return True when a new token was added (embeddings must grow).

    A dedicated pad token is added rather than reusing EOS. Labels are masked by position in this
    project, never by token id, so even a pad == eos tokenizer keeps its EOS labels.
    """
    if tokenizer.pad_token is not None:
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def load_tokenizer_for(model_cfg):
    """(tokenizer with a pad token, model path, whether a pad token was added) for the configured model."""
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer(path, model_cfg)
    return tokenizer, path, ensure_pad_token(tokenizer)


def load_model(model_cfg, tokenizer, path: str, *, added_pad: bool = False, num_labels: int | None = None,
               label_names: list[str] | None = None):
    """The configured model through `from_pretrained`, fitted to `tokenizer`. A classifier's head is sized
    from `model.num_labels`, else from the data's `num_labels`; label names become id2label/label2id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                  dtype=getattr(torch, DTYPES[model_cfg.dtype]))
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    quantized = quantization_config(model_cfg)
    if quantized is not None:
        kwargs["quantization_config"] = quantized
    task = get_task(model_cfg.task)
    try:
        if not task.has_head:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            if task.kind == "regression":
                kwargs.update(num_labels=1, problem_type="regression")
            else:
                labels = model_cfg.num_labels or num_labels or 2
                if num_labels and labels < num_labels:
                    raise ModelError(f"the data has {num_labels} labels but model.num_labels is {labels}; "
                                     "raise it or leave it unset")
                kwargs.update(num_labels=labels, problem_type="single_label_classification")
                if label_names:
                    kwargs["id2label"] = dict(enumerate(label_names))
                    kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model '{path}': {str(err).splitlines()[0]}") from None
    if quantized is not None:
        prepare_4bit_base(model)
    if added_pad:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model
