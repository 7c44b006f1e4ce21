"""Batch collation: right-pad token lists into tensors for the model, or lay them end to end in one row."""
from __future__ import annotations

import torch

from distributed_ft.tasks import IGNORE_INDEX


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into input_ids, attention_mask, labels, task_ids (and position_ids).

    Generative examples give labels (B, T) with -100 on padding; classification labels are long (B,),
    regression labels float (B,). position_ids appear when any example is packed.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in examples)
    batch_size = len(examples)
    input_ids = torch.full((batch_size, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "task_ids": torch.tensor([ex["task_id"] for ex in examples], dtype=torch.long)}
    if "labels" in examples[0]:
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(examples):
            labels[row, :len(ex["labels"])] = torch.tensor(ex["labels"], dtype=torch.long)
        batch["labels"] = labels
    else:
        is_float = any(isinstance(ex["label"], float) for ex in examples)
        batch["labels"] = torch.tensor([ex["label"] for ex in examples],
                                       dtype=torch.float32 if is_float else torch.long)
    if any("position_ids" in ex for ex in examples):
        position_ids = torch.zeros((batch_size, width), dtype=torch.long)
        for row, ex in enumerate(examples):
            positions = ex.get("position_ids", range(len(ex["input_ids"])))
            position_ids[row, :len(positions)] = torch.tensor(list(positions), dtype=torch.long)
        batch["position_ids"] = position_ids
    return batch


def collate_flat(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Generative examples end to end in one row, no padding: input_ids, position_ids (restarting at every
    example), labels (each example's first label masked, so no loss term crosses examples; the shift drops it
    anyway), example_of (the example each token belongs to), all [1, total tokens]; task_ids [examples]."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    tokens, labels, positions, owners = [], [], [], []
    for index, ex in enumerate(examples):
        n = len(ex["input_ids"])
        tokens.extend(ex["input_ids"])
        labels.extend([IGNORE_INDEX] + list(ex["labels"][1:n]) + [IGNORE_INDEX] * (n - len(ex["labels"])))
        positions.extend(ex.get("position_ids", range(n)))
        owners.extend([index] * n)
    row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
    return {"input_ids": row(tokens), "labels": row(labels), "position_ids": row(positions),
            "example_of": row(owners), "task_ids": torch.tensor([ex["task_id"] for ex in examples], dtype=torch.long)}


def flat_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The forward arguments of one row [1, tokens] of examples end to end whose position ids restart at 0 at
    each example (and inside a packed one): the row, and its example boundaries as transformers' varlen kwargs
    (read by flash-attention's varlen kernel and by engine/padding_free.py's document attention)."""
    starts = (position_ids[0] == 0).nonzero()[:, 0]
    bounds = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)
    longest = int(torch.diff(bounds).max())
    # an all-ones mask: transformers then builds no mask of its own (none is needed inside an example) and
    # does not infer a packed block mask from the restarting position ids
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": torch.ones_like(input_ids),
            "use_cache": False, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": longest, "max_length_k": longest}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The forward arguments for a collated training batch.

    A packed batch (position_ids present) goes without the 2D padding mask and without a cache: transformers
    then reads the example boundaries from position_ids and keeps each packed example from attending to the
    others (block-causal attention). Right padding needs no mask under causal attention: no real token sees it,
    and its labels are ignored. A flat batch (collate_flat) goes as one row with its example boundaries.
    """
    if "example_of" in batch:
        return flat_inputs(batch["input_ids"], batch["position_ids"])
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
