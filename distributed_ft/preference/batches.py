"""Tokenized pairs and their batches: chosen and rejected sides stacked into one [chosen; rejected] batch,
so one forward scores both (or a few, over rows of similar lengths: `score_in_groups`)."""
from __future__ import annotations

import torch

from distributed_ft.engine.length_groups import length_groups

from distributed_ft.errors import DataError
from distributed_ft.tasks import IGNORE_INDEX


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_lm_pair(tokenizer, pair: dict, max_length: int, max_prompt_length: int) -> dict:
    """{"prompt", "chosen", "rejected"} token ids for a causal LM; each completion ends with EOS. An over-long
    prompt keeps its last tokens, then a completion that still does not fit is cut on the right."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; preference data needs one to end a completion")
    prompt = _ids(tokenizer, pair["prompt"], True)[-max_prompt_length:]
    out = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        full = _ids(tokenizer, pair["prompt"] + pair[side], False)
        bare = _ids(tokenizer, pair["prompt"], False)
        # the completion's tokens as they fall after the prompt in the whole text, when the prompt is a prefix
        completion = full[len(bare):] if full[:len(bare)] == bare else _ids(tokenizer, pair[side], False)
        out[side] = (completion + [tokenizer.eos_token_id])[:max_length - len(prompt)]
    if "margin" in pair:
        out["margin"] = pair["margin"]
    return out


def collate_lm_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels of shape [2B, T]: rows 0..B-1 chosen, B..2B-1 rejected; labels are
    the completion tokens (IGNORE_INDEX on prompt and padding)."""
    rows = [(p["prompt"], p[side]) for side in ("chosen", "rejected") for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (prompt, completion) in enumerate(rows):
        seq = prompt + completion
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        labels[i, len(prompt):len(seq)] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def tokenize_rm_pair(tokenizer, pair: dict, max_length: int, render) -> dict:
    """Each side as the reward model reads it: `render` (the grader's rendering) of prompt + completion, or
    prompt + completion as they are for a chat pair, which the same rendering has already written."""
    out = {}
    for side in ("chosen", "rejected"):
        text = pair["prompt"] + pair[side] if pair.get("rendered") else render(pair["prompt"], pair[side])
        out[side] = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
    out["margin"] = pair.get("margin")
    return out


def collate_rm_pairs(pairs: list[dict], pad_id: int, default_margin: float) -> dict[str, torch.Tensor]:
    rows = [p[side] for side in ("chosen", "rejected") for p in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "margin": pair_margins(pairs, default_margin)}


def pair_margins(pairs: list[dict], default_margin: float) -> torch.Tensor:
    """Each pair's margin, the config's where the pair has none."""
    return torch.tensor([default_margin if p.get("margin") is None else p["margin"] for p in pairs])


def score_in_groups(lengths: torch.Tensor, pass_cost: int | None, score) -> tuple[torch.Tensor, ...]:
    """score(rows, width) -> per-row tensors of those rows, padded to `width`, called once per length group
    (engine/length_groups.py; one group of every row when `pass_cost` is None); the results are put back in
    row order by a differentiable gather, so the gradient is the one the whole padded batch gives, up to float
    rounding."""
    groups = [list(range(len(lengths)))] if pass_cost is None else length_groups(lengths.tolist(), pass_cost)
    if len(groups) == 1:
        return score(torch.arange(len(lengths)), int(lengths.max()))
    parts = [score(torch.tensor(g), int(lengths[g].max())) for g in groups]
    inverse = torch.argsort(torch.tensor([i for g in groups for i in g]))
    return tuple(torch.cat(column)[inverse.to(column[0].device)] for column in zip(*parts))
