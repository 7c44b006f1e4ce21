"""Rollouts: encode prompts, sample responses, and score tokens with policy, reference and value passes.

Layout of one batch: queries left-padded to a common length P, responses right-padded to max_new_tokens R.
Position ids follow the attention mask (as `generate` does) so forward passes see the same positions as
sampling. A response token is real up to and including the first EOS.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distributed_ft.rl.math import entropy_from_logits, logprobs_from_logits
from distributed_ft.tasks import IGNORE_INDEX


@dataclass
class Rollout:
    query: torch.Tensor           # [n, P] long, left padded
    query_mask: torch.Tensor      # [n, P] long
    response: torch.Tensor        # [n, R] long, right padded
    mask: torch.Tensor            # [n, R] float: real response tokens
    texts: list[str]
    items: list[dict]
    prompts: list[str]
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    scores: torch.Tensor | None = None     # [n] float, 0 where unscorable
    scorable: torch.Tensor | None = None   # [n] float 0/1
    errors: list[str | None] = field(default_factory=list)


_PER_SAMPLE = ("response", "mask", "logprobs", "ref_logprobs", "values", "entropy", "scores", "scorable")
_LISTS = ("texts", "items", "prompts", "errors")


def select_rollout(ro: Rollout, rows: list[int]) -> Rollout:
    """The rollout of the given samples, in that order."""
    idx = torch.tensor(rows, dtype=torch.long)
    fields = {name: None if getattr(ro, name) is None else getattr(ro, name)[idx] for name in _PER_SAMPLE}
    lists = {name: [getattr(ro, name)[i] for i in rows] if getattr(ro, name) else [] for name in _LISTS}
    return Rollout(query=ro.query[idx], query_mask=ro.query_mask[idx], **fields, **lists)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of several (queries re-padded on the left to the widest; responses share max_new_tokens)."""
    width = max(p.query.shape[1] for p in parts)

    def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    query = torch.cat([left_pad(p.query, pad_id) for p in parts])
    query_mask = torch.cat([left_pad(p.query_mask, 0) for p in parts])
    fields = {name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
              for name in _PER_SAMPLE}
    lists = {name: [x for p in parts for x in getattr(p, name)] for name in _LISTS}
    return Rollout(query=query, query_mask=query_mask, **fields, **lists)


def encode_queries(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from distributed_ft.data import encode_prompt

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        if e:
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
    return ids, mask


def response_mask(response: torch.Tensor, eos_id: int | None, pad_id: int | None = None) -> torch.Tensor:
    """1 for tokens up to and including the first EOS; 0 after it."""
    if eos_id is None:
        return torch.ones_like(response, dtype=torch.float32)
    is_eos = (response == eos_id).long()
    before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before each position
    return (before == 0).float()


def generate(policy, query: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int, do_sample: bool,
             temperature: float, top_p: float, eos_id: int | None, pad_id: int, synced: bool = False) -> torch.Tensor:
    """Responses [n, max_new_tokens] (right padded with pad_id) from an unwrapped (gathered) policy.

    `synced`: every rank keeps stepping until all are done (ZeRO-3 runs a small collective per forward pass
    even with the parameters gathered), so ranks must also call this the same number of times.
    """
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
                  synced_gpus=synced)
    if do_sample:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = policy.generate(input_ids=query, attention_mask=query_mask, **kwargs)
    response = out[:, query.shape[1]:]
    if response.shape[1] < max_new_tokens:
        pad = torch.full((response.shape[0], max_new_tokens - response.shape[1]), pad_id, dtype=response.dtype,
                         device=response.device)
        response = torch.cat([response, pad], 1)
    return response


def decode(tokenizer, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(r[m > 0].tolist(), skip_special_tokens=True)
            for r, m in zip(response.cpu(), mask.cpu())]


def model_inputs(query, query_mask, response, mask) -> dict:
    attention = torch.cat([query_mask, mask.to(query_mask.dtype)], 1)
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": torch.cat([query, response], 1), "attention_mask": attention, "position_ids": position_ids}


def response_labels(query: torch.Tensor, response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels of a forward over query + response: the real response tokens, IGNORE_INDEX elsewhere."""
    return torch.cat([torch.full_like(query, IGNORE_INDEX), response.masked_fill(mask == 0, IGNORE_INDEX)], 1)


def score_tokens(model, query, query_mask, response, mask, *, mode: str | None, temperature: float,
                 want_entropy: bool = False, chunked=None):
    """(logprobs, values | None, entropy | None) of the response tokens, each [n, R].

    The logits at position P+t-1 predict response token t; the value there is the state's value before it.
    `mode` is the trained module's (rl/model.py), None for a plain causal LM (the frozen reference). With
    `chunked`, that causal LM's head applied a chunk of tokens at a time (engine/chunked_loss.py), no
    full-vocabulary logits exist and only the real response tokens are scored (0 after the first EOS).
    """
    inputs = model_inputs(query, query_mask, response, mask)
    inputs.update({"use_cache": False} if mode is None else {"mode": mode})
    start, width = query.shape[1] - 1, response.shape[1]
    if chunked is None:
        output = model(**inputs)
        logits, values = (output.logits, None) if mode is None else output
        logits = logits[:, start:start + width].float() / temperature
        logprobs = logprobs_from_logits(logits, response)
        entropy = entropy_from_logits(logits) if want_entropy else None
    else:
        logprobs, entropy, output = chunked.token_logprobs(model, inputs, response_labels(query, response, mask),
                                                           temperature=temperature, entropy=want_entropy)
        values = None if mode is None else output[1]
        logprobs = logprobs[:, start:]
        entropy = None if entropy is None else entropy[:, start:]
    if values is not None:
        values = values[:, start:start + width].float()
    return logprobs, values, entropy
