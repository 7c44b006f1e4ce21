"""Preference pairs: read from files (TRL's text or chat-messages form) or made from the built-in tasks,
normalised to {"prompt", "chosen", "rejected"} texts, with one-line errors naming file, row and field."""
from __future__ import annotations

import random
import string

from distributed_ft.data.builtin import LETTERS, builtin_rows
from distributed_ft.data.config import DatasetSpec
from distributed_ft.data.sources import column_names, load_rows
from distributed_ft.errors import DataError
from distributed_ft.preference.config import PairSource


class PairDataError(DataError):
    """A preference pair is missing a field, has an empty side, or prefers a side over itself."""


def load_pairs(source: PairSource, seed: int, render=None) -> list[dict]:
    """The pairs of one source. `render(messages, add_generation_prompt)` turns chat messages into text."""
    if source.builtin is not None:
        return builtin_pairs(source.builtin, source.num_examples or 1000, seed)
    rows = load_rows(DatasetSpec(path=source.path, split=source.split, num_examples=source.num_examples), seed)
    names = {canonical: source.columns.get(canonical, canonical) for canonical in ("prompt", "chosen", "rejected",
                                                                                    "margin")}
    present = set(column_names(rows))
    for side in ("chosen", "rejected"):
        if names[side] not in present:
            raise PairDataError(f"{source.path}: missing column '{names[side]}' (the {side} side; map it with "
                                f"columns.{side}); found {', '.join(sorted(present))}")
    return [normalise_pair(row, names, f"{source.path} row {i + 1}", render) for i, row in enumerate(rows)]


def normalise_pair(row: dict, names: dict[str, str], where: str, render=None) -> dict:
    chosen, rejected = row.get(names["chosen"]), row.get(names["rejected"])
    prompt = row.get(names["prompt"])
    chat = isinstance(chosen, list) or isinstance(rejected, list)
    if chat:
        prompt, chosen, rejected = _split_messages(prompt, chosen, rejected, where, render)
    for field, value in (("prompt", prompt if prompt is not None else ""), ("chosen", chosen),
                         ("rejected", rejected)):
        if not isinstance(value, str):
            raise PairDataError(f"{where}: field '{names[field]}' must be text, got {type(value).__name__}")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise PairDataError(f"{where}: field '{names[field]}' is empty")
    if chosen == rejected:
        raise PairDataError(f"{where}: fields '{names['chosen']}' and '{names['rejected']}' are identical")
    pair = {"prompt": prompt or "", "chosen": chosen, "rejected": rejected}
    if chat:  # prompt + completion is already the conversation as the chat rendering writes it
        pair["rendered"] = True
    margin = row.get(names["margin"])
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise PairDataError(f"{where}: field '{names['margin']}' must be a number, got {margin!r}")
        pair["margin"] = float(margin)
    return pair


def _split_messages(prompt, chosen, rejected, where: str, render):
    """Chat pairs: the shared prompt is an explicit `prompt` list or the common prefix of both conversations."""
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                  for m in value):
            raise PairDataError(f"{where}: field '{field}' must be a list of {{role, content}} messages")
    shared = list(prompt) if isinstance(prompt, list) else []
    if not shared:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        shared, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not chosen or not rejected:
        raise PairDataError(f"{where}: field '{'chosen' if not chosen else 'rejected'}' has no messages after "
                            "the shared prompt")
    render = render or _plain_render
    head = render(shared, True)
    return head, _completion(render, shared, chosen, head), _completion(render, shared, rejected, head)


def _completion(render, shared: list, answer: list, head: str) -> str:
    full = render(shared + answer, False)
    # a chat template renders the conversation as one text; the completion is what follows the prompt
    return full[len(head):] if full.startswith(head) else "".join(m["content"] for m in answer)


def _plain_render(messages: list[dict], add_generation_prompt: bool) -> str:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


# --- the built-in synthetic pair tasks -------------------------------------------------------------------
def builtin_pairs(task: str, n: int, seed: int) -> list[dict]:
    """A correct completion of built-in task `task` (chosen) against a corrupted one (rejected)."""
    rng = random.Random(f"pairs:{task}:{seed}")
    rows = builtin_rows(task, n, seed, generative=True)
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": corrupt(r["completion"], rng, task)}
            for r in rows]


def corrupt(completion: str, rng: random.Random, task: str = "") -> str:
    """The completion with one symbol replaced by another of its kind (a digit by a digit, a letter by a
    letter), so the rejected side looks plausible and differs in exactly one place. A sorted answer has two
    neighbours swapped instead: out of order, with the same digits."""
    if task == "sort":
        text = completion.strip()
        swaps = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
        if swaps:
            i = rng.choice(swaps)
            lead = completion[:len(completion) - len(completion.lstrip())]
            return lead + text[:i] + text[i + 1] + text[i] + text[i + 2:]
    if task == "parity":  # the other valid answer
        return completion.replace("0", "x").replace("1", "0").replace("x", "1")
    positions = [i for i, ch in enumerate(completion) if not ch.isspace()]
    i = rng.choice(positions)
    ch = completion[i]
    pool = string.digits if ch.isdigit() else LETTERS if ch in LETTERS else string.ascii_lowercase
    return completion[:i] + rng.choice([c for c in pool if c != ch]) + completion[i + 1:]


def split_pairs(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded shuffle, the held-out part never overlapping the training part."""
    order = list(range(len(pairs)))
    random.Random(f"split:{seed}").shuffle(order)
    held = int(round(len(pairs) * fraction))
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]


def build_pairs(config, seed: int, render=None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs for a `pairs` section; held-out pairs come from `validation` or are split off.
    Each pair carries its source's `task` name, under which its prompt is reported."""
    def read(sources, seed):
        return [{**p, "task": source.task_name} for source in sources for p in load_pairs(source, seed, render)]

    train = read(config.train, seed)
    if config.validation:
        held = read(config.validation, seed + 1)
    else:
        train, held = split_pairs(train, config.validation_fraction, seed)
    if not train:
        raise PairDataError("pairs.train: no training pairs left after holding out pairs.validation_fraction")
    return train, held[:config.eval_pairs]
