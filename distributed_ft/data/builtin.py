"""Built-in synthetic tasks: small, deterministic, self-checking data generated here.

Generative tasks give {"prompt", "completion"} rows; `parity` gives {"text", "label"} (classification) and
`count` gives {"text", "value"} (regression). Both also have a generative form ("... =" -> " 1") so every
task can be mixed into one causal-LM run. Sequences stay short (under ~25 tokens with a small BPE) so a
tiny model learns them on a CPU. Rows within one call never repeat an input, so a held-out fraction never
overlaps the training rows.
"""
from __future__ import annotations

import random
import string
from typing import Callable

from distributed_ft.errors import DataError

BUILTIN_TASK_TYPES: dict[str, str] = {
    "arithmetic": "causal_lm",
    "reverse": "causal_lm",
    "sort": "causal_lm",
    "copy": "causal_lm",
    "parity": "sequence_classification",
    "count": "regression",
}

LETTERS = "abcdefgh"  # a small alphabet keeps the tasks quick to learn for a tiny model
MAX_OPERAND = 49


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.5:
        return {"prompt": f"{a}+{b}=", "completion": str(a + b)}
    a, b = max(a, b), min(a, b)  # keep results non-negative
    return {"prompt": f"{a}-{b}=", "completion": str(a - b)}


def _letters(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(low, high))]


def _reverse(rng: random.Random) -> dict:
    items = _letters(rng, 2, 5)
    return {"prompt": f"reverse: {' '.join(items)} =", "completion": " " + " ".join(reversed(items))}


def _copy(rng: random.Random) -> dict:
    items = _letters(rng, 2, 5)
    return {"prompt": f"copy: {' '.join(items)} =", "completion": " " + " ".join(items)}


def _sort(rng: random.Random) -> dict:
    # Digits without spaces: one token each with a digit-splitting tokenizer.
    digits = [rng.choice(string.digits) for _ in range(rng.randint(2, 6))]
    return {"prompt": f"sort: {''.join(digits)} =", "completion": " " + "".join(sorted(digits))}


def _parity(rng: random.Random) -> dict:
    bits = "".join(rng.choice("01") for _ in range(rng.randint(4, 12)))
    return {"text": f"parity: {bits}", "label": bits.count("1") % 2}


def _count(rng: random.Random) -> dict:
    items = _letters(rng, 1, 8)
    return {"text": f"count: {' '.join(items)}", "value": float(len(items))}


_GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "arithmetic": _arithmetic, "reverse": _reverse, "sort": _sort, "copy": _copy,
    "parity": _parity, "count": _count,
}


def _as_generative(row: dict) -> dict:
    """The generative form of a classification/regression row: "<text> =" -> " <answer>"."""
    if "prompt" in row:
        return row
    answer = row["label"] if "label" in row else int(row["value"])
    return {"prompt": f"{row['text']} =", "completion": f" {answer}"}


def builtin_rows(name: str, n: int, seed: int, *, generative: bool = False) -> list[dict]:
    """`n` distinct rows of task `name`, the same for the same seed.

    With generative=True, parity and count come as prompt/completion rows too.
    """
    if name not in _GENERATORS:
        raise DataError(f"unknown builtin task '{name}' (valid: {', '.join(_GENERATORS)})")
    # A string seed is hashed deterministically by `random` (unlike hash(), which is salted per process).
    rng = random.Random(f"{name}:{seed}")
    make = _GENERATORS[name]
    rows: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(rows) < n:
        row = make(rng)
        key = row.get("prompt", row.get("text"))
        if key in seen:
            # A long run of repeats means the task has (almost) no unseen inputs left.
            misses += 1
            if misses > 20_000:
                raise DataError(f"builtin task '{name}' cannot produce {n} distinct examples "
                                f"(found {len(rows)}); lower num_examples")
            continue
        misses = 0
        seen.add(key)
        rows.append(_as_generative(row) if generative else row)
    return rows


def builtin_corpus(seed: int = 0) -> list[str]:
    """Texts covering every built-in task (both forms) plus printable ASCII, to train a small tokenizer."""
    texts: list[str] = []
    for name in _GENERATORS:
        for row in builtin_rows(name, 300, seed, generative=True):
            texts.append(row["prompt"] + row["completion"])
        if BUILTIN_TASK_TYPES[name] != "causal_lm":
            texts.extend(row["text"] for row in builtin_rows(name, 300, seed))
    # Every printable character, so files with other text never fall back to <unk> for a single char.
    texts.append(" ".join(string.printable.strip()))
    texts.append(string.ascii_letters + string.digits + string.punctuation)
    return texts
