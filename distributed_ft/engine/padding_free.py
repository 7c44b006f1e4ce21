"""Padding-free passes: a micro-batch's examples laid end to end in one row, each attending only to itself (a causal
LM's loss; a reward model's scores, each read at its example's last token).

The row's position ids restart at every example, and the cumulative example boundaries travel with the forward
as transformers' varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`). flash-attention's varlen kernel reads them
where a model runs `flash_attention_2`/`_3`; for `sdpa` the model is switched to `DOCUMENT_ATTENTION`, which runs
causal sdpa over each example's slice of the row, so no compute goes to padding or to pairs across examples (a
packed block mask still computes every pair). Calls without the kwargs (evaluation, generation, padded batches)
take transformers' own sdpa path unchanged, masks included.

`padding_free_for` decides once per model whether the path is exact: a forward of two short examples laid end
to end must give the logits (or scores) each gives alone. What it cannot follow (eager attention, prompt-learning adapters'
virtual tokens, sliding windows, soft-capping, attention biases) falls back to length-grouped passes, with the
reason in the run log. The switch lives in the config's `_attn_implementation`, which transformers does not
save, so a saved model loads with sdpa.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from distributed_ft.data.collate import flat_inputs
from distributed_ft.engine.chunked_loss import bare_model

DOCUMENT_ATTENTION = "dft_document_sdpa"
_VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "position_bias", "s_aux")
_checked: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-interface signature: query/key/value [batch, heads, tokens, head_dim]; returns
    [batch, tokens, heads, head_dim]. With `cu_seq_lens_q` (one row of examples end to end) each example
    attends causally to itself; without it this is transformers' sdpa attention."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    refused = [name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if refused or query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(f"document attention cannot follow {refused or 'a batch of several rows or a mask'}")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dtype = query.dtype
    if query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        # CPU attention kernels are slower in half precision than in fp32 (measured: bf16 flash backward 1.7x
        # fp32's on a native-bf16 core), and fp32 only rounds less; the projections around it stay in bf16
        query, key, value = query.float(), key.float(), value.float()
    sizes = _sizes(bounds)
    # split, not slicing in a loop: split's backward concatenates the pieces' gradients instead of adding
    # zero-filled full-size ones
    outputs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
               for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))]
    return torch.cat(outputs, 2).to(dtype).transpose(1, 2).contiguous(), None


def _sizes(bounds: torch.Tensor) -> list[int]:
    """The example lengths of `bounds`, read once per forward: every layer gets the same tensor, and on a GPU
    each read is a device sync."""
    if _last_bounds[0] is not bounds:
        _last_bounds[:] = [bounds, torch.diff(bounds).tolist()]
    return _last_bounds[1]


_last_bounds: list = [None, []]


def register_document_attention() -> None:
    """Make DOCUMENT_ATTENTION a transformers attention implementation, with sdpa's masks for the calls that
    fall back to sdpa."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(DOCUMENT_ATTENTION, document_attention)
    AttentionMaskInterface.register(DOCUMENT_ATTENTION, sdpa_mask)


def padding_free_for(model: torch.nn.Module, task: str, enabled: bool) -> str | None:
    """Switch `model` (unwrapped: a transformers model, or a PEFT model around one) to padding-free passes
    where they are exact: a causal LM's loss, or a sequence-classification model's scores (`flat_scores`).
    Returns None when it is on, else why not. Call it on every rank at the same point: under ZeRO-3 the
    check's forwards are collective."""
    if not enabled:
        return "training.padding_free is off"
    if task not in _CHECKS:
        return f"task {task}"
    if getattr(model, "peft_config", None) and any(
            getattr(c, "is_prompt_learning", False) for c in model.peft_config.values()):
        return "a prompt-learning adapter prepends virtual tokens to every row"
    bare = bare_model(model)
    implementation = getattr(bare.config, "_attn_implementation", None)
    if implementation not in ("sdpa", DOCUMENT_ATTENTION, *_VARLEN_IMPLEMENTATIONS):
        return f"attention implementation {implementation!r} takes no example boundaries"
    if model not in _checked:
        if implementation == "sdpa":
            register_document_attention()
            bare.config._attn_implementation = DOCUMENT_ATTENTION
        _checked[model] = _refused(_CHECKS[task], model, bare)
        if _checked[model] is not None and implementation == "sdpa":
            bare.config._attn_implementation = "sdpa"
    return _checked[model]


def flat_scores(model: torch.nn.Module, rows: list[list[int]], pad_id: int | None) -> torch.Tensor:
    """A sequence-classification model's logits [rows, labels] for token rows laid end to end in one forward
    (`model` may be the prepared wrapper; padding_free_for(..., "sequence_classification", ...) said yes).
    Each row is scored where the padded forward scores it: at its rightmost token that is not the pad token."""
    head = bare_model(_unwrapped(model)).score
    device = next(model.parameters()).device
    ids = torch.tensor([t for row in rows for t in row], device=device)[None]
    positions = torch.cat([torch.arange(len(row)) for row in rows]).to(device)[None]
    ends, start = [], 0
    for row in rows:
        last = next((j for j in range(len(row) - 1, -1, -1) if row[j] != pad_id), 0)
        ends.append(start + last)
        start += len(row)
    caught = []
    handle = head.register_forward_hook(lambda _m, _i, output: caught.append(output))
    try:
        model(**flat_inputs(ids, positions))
    finally:
        handle.remove()
    return caught[-1][0, ends]


def _causal_lm_check(model: torch.nn.Module, bare: torch.nn.Module, first: torch.Tensor, second: torch.Tensor):
    """(two examples end to end, each alone): the logits of every position."""
    row = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))]).to(row.device)[None]
    together = model(**flat_inputs(row, positions)).logits[0]
    return together, torch.cat([model(input_ids=first[None]).logits[0], model(input_ids=second[None]).logits[0]])


def _scores_check(model: torch.nn.Module, bare: torch.nn.Module, first: torch.Tensor, second: torch.Tensor):
    """(the two rows scored end to end, each scored alone): their sequence logits."""
    if not isinstance(getattr(bare, "score", None), torch.nn.Module):
        raise ValueError(f"{type(bare).__name__} has no `score` head applied at every position")
    together = flat_scores(model, [first.tolist(), second.tolist()], bare.config.get_text_config().pad_token_id)
    return together, torch.cat([model(input_ids=first[None]).logits, model(input_ids=second[None]).logits])


_CHECKS = {"causal_lm": _causal_lm_check, "sequence_classification": _scores_check}


@torch.no_grad()
def _refused(check, model: torch.nn.Module, bare: torch.nn.Module) -> str | None:
    """Why two short examples end to end do not give what each gives alone, or None when they do."""
    device = next(bare.parameters()).device
    config = bare.config.get_text_config()
    vocab, pad = getattr(config, "vocab_size", 16), getattr(config, "pad_token_id", None)
    tokens = [t % vocab for t in range(1, 20) if t % vocab != pad][:8]
    first, second = torch.tensor(tokens[:5], device=device), torch.tensor(tokens[5:8], device=device)
    was_training = model.training
    model.eval()
    try:
        together, alone = check(model, bare, first, second)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError) as err:
        return f"the model refused examples end to end ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    together, alone = together.float(), alone.float()
    if together.shape != alone.shape or float((together - alone).abs().max()) > 1e-3 * (1 + float(alone.abs().max())):
        return "examples end to end do not give what each gives alone"
    return None


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP's or DeepSpeed's wrapper."""
    return getattr(model, "module", model)
