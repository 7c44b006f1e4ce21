"""Batch collation: right-pad token lists into tensors for the model."""
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


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The forward arguments for a collated training batch.

    A packed batch (position_ids present) goes without the 2D padding mask and without a cache: transformers
    then reads the example boundaries from position_ids and keeps each packed example from attending to the
    others (block-causal attention). Right padding needs no mask under causal attention: no real token sees it,
    and its labels are ignored.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
