"""Causal-LM cross-entropy and per-token log-probs from the final hidden states, a chunk of tokens at a time.

A batch's full-vocabulary logits (batch x tokens x vocab, in fp32 for the loss) are often the largest
tensors of a step. Here the model runs through its prepared wrapper (DDP, DeepSpeed engine) with
`logits_to_keep=1`, a forward hook on its decoder catches the hidden states the LM head reads, and the
head is applied to `chunk_tokens` labelled positions at a time. In training each chunk runs under
non-reentrant activation checkpointing, so its logits are recomputed in backward and one chunk's logits
are alive at a time; every parameter still receives its gradient once (DDP's and ZeRO's hooks see one
gradient, as with full logits). The head is called as a module, so PEFT's wrappers (LoRA on the head,
modules_to_save) and ZeRO-3's gathering hooks apply to each call; under ZeRO-3 each call gathers the head's
weights, so ranks make the same number of calls (a rank with fewer tokens adds empty chunks). Prompt tuning's
virtual tokens are dropped from the hidden states as the full-logits path drops their logits.

The same chunks give the SFT loss (per-example sums of token cross-entropy) and, for DPO and PPO/GRPO, each
labelled token's log-prob (-cross-entropy; with a sampling temperature, and the entropy where asked).
`chunked_loss_for` and `chunked_logprobs_for` decide once per model whether the path applies: not for other
tasks, nor where the head's output is not the logits (softcapping, logit scales: a config field names them)
or the model cannot keep few logits; a check on a few tokens compares both paths and catches what no field
names.
A fused GPU kernel (Liger's fused linear cross-entropy) could avoid the recompute; it is not used here.
"""
from __future__ import annotations

import contextlib
import functools
import math
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distributed_ft.engine.logging import logger
from distributed_ft.engine.losses import sum_by_example
from distributed_ft.tasks import IGNORE_INDEX

# transformers config fields that change the head's output into other logits, with their neutral value
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_soft_cap": None, "logit_scale": 1.0,
                     "logits_scaling": 1.0, "lm_head_multiplier": 1.0, "unpadded_vocab_size": None}
_PROBE_TOKENS = 8
_checked: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()
_logged: set[str] = set()


class ChunkedHead:
    """The LM head of one causal LM applied to its decoder's hidden states a chunk of tokens at a time: per-example
    summed token cross-entropy (calling it) or per-token log-probs (`token_logprobs`)."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int, agree: Callable[[int], int] | None = None):
        bare = bare_model(model)
        self.decoder, self.head = bare.get_decoder(), bare.get_output_embeddings()
        self.chunk_tokens = chunk_tokens
        # Under ZeRO-3 each head call gathers the head's weights collectively: all ranks make as many calls
        # (`agree` returns the largest count over the ranks).
        self.agree = agree

    def __call__(self, model: torch.nn.Module, inputs: dict, labels: torch.Tensor,
                 example_of: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of token losses of each example, shape [examples] (rows, or with `example_of` the examples laid
        end to end in them, as losses.per_example_loss); `model` may be the prepared wrapper."""
        _, hidden, autocast = self._forward(model, inputs, labels)
        with autocast():  # the head runs in the precision the model's forward ran in
            return per_example_from_hidden(self.head, hidden, labels, self.chunk_tokens, self.agree, example_of)

    def token_logprobs(self, model: torch.nn.Module, inputs: dict, labels: torch.Tensor, *, temperature: float = 1.0,
                       entropy: bool = False):
        """(log-probs [batch, tokens - 1] of each next labelled token, 0 elsewhere; the entropies of the same
        positions, or None; the model's own output, whose logits are the last position's only)."""
        output, hidden, autocast = self._forward(model, inputs, labels)
        with autocast():
            logprobs, entropies = token_logprobs_from_hidden(self.head, hidden, labels, self.chunk_tokens, self.agree,
                                                             temperature=temperature, entropy=entropy)
        return logprobs, entropies, output

    def _forward(self, model: torch.nn.Module, inputs: dict, labels: torch.Tensor):
        """(the model's output, the hidden states of the labelled sequence, the autocast its forward ran in)."""
        with _caught(self.decoder) as caught:
            output = model(**inputs, logits_to_keep=1)
        hidden, autocast = caught[-1]
        # prompt tuning prepends virtual tokens: keep the real positions, as the full-logits path does
        return output, hidden[:, -labels.shape[1]:], autocast


def per_example_from_hidden(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                            agree: Callable[[int], int] | None = None,
                            example_of: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example sums of next-token cross-entropy from the hidden states [batch, tokens, hidden], with the
    head applied to `chunk_tokens` labelled positions at a time; examples are rows, or given by `example_of`."""
    keep, states, wanted = _labelled(hidden, labels)
    losses = torch.cat(_in_chunks(_head_cross_entropy, head, states, wanted, chunk_tokens, agree))
    if example_of is not None:
        return sum_by_example(losses, example_of[:, 1:][keep], example_of)
    rows = keep.nonzero()[:, 0]  # the example of each labelled position
    return torch.zeros(labels.shape[0], dtype=losses.dtype, device=losses.device).index_add(0, rows, losses)


def token_logprobs_from_hidden(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                               agree: Callable[[int], int] | None = None, *, temperature: float = 1.0,
                               entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies or None), each [batch, tokens - 1]: position t holds the next-token distribution's
    log-prob of labels[:, t + 1] (logits divided by `temperature`), 0 where that label is IGNORE_INDEX; the head
    applied to `chunk_tokens` labelled positions at a time."""
    keep, states, wanted = _labelled(hidden, labels)
    score = functools.partial(_head_logprobs, temperature=temperature, entropy=entropy)
    pieces = _in_chunks(score, head, states, wanted, chunk_tokens, agree)
    columns = [torch.cat(column) for column in zip(*pieces)] if entropy else [torch.cat(pieces)]
    placed = [torch.zeros(keep.shape, dtype=c.dtype, device=c.device).masked_scatter(keep, c) for c in columns]
    return placed[0], (placed[1] if entropy else None)


def _labelled(hidden: torch.Tensor, labels: torch.Tensor):
    """(mask of the positions whose next token is labelled, their hidden states, those next tokens)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return keep, hidden[:, :-1][keep], targets[keep]


def _in_chunks(score: Callable, head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
               agree: Callable[[int], int] | None) -> list:
    """score(head, states, targets) of each chunk of `chunk_tokens` positions, in order."""
    n_chunks = max(1, math.ceil(len(targets) / chunk_tokens))
    if agree is not None:
        n_chunks = agree(n_chunks)  # ranks with fewer tokens add empty chunks
    return [_chunk(score, head, states[i * chunk_tokens:(i + 1) * chunk_tokens],
                   targets[i * chunk_tokens:(i + 1) * chunk_tokens]) for i in range(n_chunks)]


def _chunk(score: Callable, head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor):
    if torch.is_grad_enabled():
        # No metadata check of the recomputed tensors: under ZeRO-3 the head's weights are saved as the
        # parameters themselves, which are re-partitioned after the recompute and gathered again before use.
        return checkpoint(score, head, states, targets, use_reentrant=False, determinism_check="none")
    return score(head, states, targets)


def _head_cross_entropy(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="none")


def _head_logprobs(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                   entropy: bool):
    logits = head(states).float()
    if temperature != 1.0:
        logits = logits / temperature
    if not entropy:
        return -F.cross_entropy(logits, targets, reduction="none")
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def chunked_loss_for(model: torch.nn.Module, task: str, chunk_tokens: int | None,
                     agree: Callable[[int], int] | None = None) -> ChunkedHead | None:
    """The chunked loss for `model` (unwrapped: a transformers causal LM, or a PEFT model around one), or None
    where the full-logits path must be used; the path taken is logged once."""
    return _chunked_for(model, task, chunk_tokens, agree, "loss",
                        "chunked cross-entropy over {} tokens at a time, logits recomputed in backward")


def chunked_logprobs_for(model: torch.nn.Module, chunk_tokens: int | None, agree: Callable[[int], int] | None = None,
                         what: str = "log-probs") -> ChunkedHead | None:
    """The chunked per-token log-probs of causal LM `model` (unwrapped, as for chunked_loss_for), or None where the
    full logits must be used; the path taken is logged once, as `what: ...`."""
    return _chunked_for(model, "causal_lm", chunk_tokens, agree, what,
                        "chunked log-softmax over {} tokens at a time, logits recomputed in backward")


def chunked_logprob_paths(accelerator, chunk_tokens: int | None, policy: torch.nn.Module,
                          reference: torch.nn.Module | None, policy_what: str, reference_what: str) -> tuple:
    """The chunked log-prob paths of a policy and of its frozen reference (None: it has none), each None where
    that model needs its full logits. Collective under ZeRO-3 (a probe forward of each model): every rank calls
    it at the same point."""
    from distributed_ft.engine.distributed import agree_on_max

    agree, unwrap = agree_on_max(accelerator), accelerator.unwrap_model
    policy_head = chunked_logprobs_for(unwrap(policy), chunk_tokens, agree, policy_what)
    if reference is None:
        return policy_head, None
    return policy_head, chunked_logprobs_for(unwrap(reference), chunk_tokens, agree, reference_what)


def _chunked_for(model: torch.nn.Module, task: str, chunk_tokens: int | None, agree: Callable[[int], int] | None,
                 what: str, chunked: str) -> ChunkedHead | None:
    reason = None
    if task != "causal_lm":
        reason = f"task {task}"
    elif chunk_tokens is None:
        reason = "training.loss_chunk_tokens is null"
    else:
        if model not in _checked:
            _checked[model] = _unsupported(model)
        reason = _checked[model]
    if reason is not None:
        _log_once(f"{what}: full-vocabulary logits ({reason})")
        return None
    _log_once(f"{what}: {chunked.format(chunk_tokens)}")
    return ChunkedHead(model, chunk_tokens, agree)


def _unsupported(model: torch.nn.Module) -> str | None:
    """Why the chunked path cannot reproduce this model's loss, or None when it can."""
    bare = bare_model(model)
    if not (hasattr(bare, "get_decoder") and hasattr(bare, "get_output_embeddings")):
        return f"{type(bare).__name__} has no decoder/output-embedding accessors"
    if bare.get_output_embeddings() is None:
        return f"{type(bare).__name__} has no output embeddings"
    config = bare.config.get_text_config() if hasattr(bare.config, "get_text_config") else bare.config
    for name, neutral in _LOGIT_TRANSFORMS.items():
        if getattr(config, name, neutral) != neutral:
            return f"the model's {name}={getattr(config, name)} transforms the head's output"
    try:
        return _probe(model, bare)
    except (TypeError, ValueError, AttributeError, RuntimeError) as err:
        return f"the model refused a forward with logits_to_keep ({type(err).__name__}: {err})"


@torch.no_grad()
def _probe(model: torch.nn.Module, bare: torch.nn.Module) -> str | None:
    """Compare the head applied to the caught hidden states with the model's own logits on a few tokens.

    Every process runs it at the same point with the same tokens (a collective under ZeRO-3) and reaches the
    same answer."""
    device = next(bare.parameters()).device
    config = bare.config.get_text_config() if hasattr(bare.config, "get_text_config") else bare.config
    ids = (torch.arange(1, _PROBE_TOKENS + 1, device=device) % getattr(config, "vocab_size", _PROBE_TOKENS + 1))[None]
    was_training = model.training
    model.eval()
    try:
        with _caught(bare.get_decoder()) as caught:
            full = model(input_ids=ids).logits
            kept = model(input_ids=ids, logits_to_keep=1).logits
        if len(caught) != 2:
            return "the decoder's output could not be caught"
        hidden, autocast = caught[0]
        with autocast():
            ours = bare.get_output_embeddings()(hidden[:, -_PROBE_TOKENS:])
    finally:
        model.train(was_training)
    full = full[:, -_PROBE_TOKENS:].float()
    if kept.shape[1] != 1:
        return "the model ignores logits_to_keep"
    scale = 1e-3 * (1.0 + float(full.abs().max()))
    if ours.shape != full.shape or float((ours.float() - full).abs().max()) > scale:
        return "the head's output differs from the model's logits"
    if float((kept[:, -1].float() - full[:, -1]).abs().max()) > scale:
        return "logits_to_keep changes the model's last logits"
    return None


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers and modules_to_save sit in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _caught(decoder: torch.nn.Module):
    """Collect (last hidden states, autocast in force) of each decoder call inside the block."""
    caught: list = []

    def hook(_module, _inputs, output):
        caught.append((output[0], _autocast_now(output[0].device.type)))

    handle = decoder.register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def _autocast_now(device_type: str) -> Callable:
    """A context factory re-entering the autocast in force now (accelerate autocasts the model's forward)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext
    dtype = torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type, dtype=dtype)


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
