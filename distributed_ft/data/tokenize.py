"""Tokenization of normalised rows into training examples, with loss masking, length limits and packing.

Generative example: {"input_ids", "labels", "task_id"}; labels are -100 on the prompt (loss_on="completion").
The completion is followed by the tokenizer's EOS, whose label is always kept. Masking is done by position
(prompt length), never by comparing token ids, so a tokenizer whose pad token is its EOS still learns to stop.

Prompt/completion boundary: the full text is tokenized once; when the prompt's own tokens are a prefix of it
(the usual case), the rest is the completion. Otherwise the completion is tokenized on its own and appended,
so the prompt tokens always equal `encode_prompt(prompt)`, which is what generation is fed at evaluation.

Over-long generative examples (overlong="truncate") keep the completion and EOS whole and cut the prompt from
the left (its leading special tokens stay); when even the completion does not fit, the sequence is cut on the
right. Classification/regression texts are cut on the right, keeping the tokenizer's trailing special tokens.
"""
from __future__ import annotations

from distributed_ft.errors import DataError
from distributed_ft.tasks import IGNORE_INDEX

COUNT_KEYS = ("kept", "truncated", "dropped_overlong", "dropped_empty")


def new_counts() -> dict[str, int]:
    return dict.fromkeys(COUNT_KEYS, 0)


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text when add_special_tokens=True (e.g. [BOS], [])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    return [], []


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        # Same ids as tokenizer(texts), without building a BatchEncoding per text (several times faster).
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _prefix_for(text: str, prefix: list[int], bos_token: str | None) -> list[int]:
    # A chat template usually writes the BOS itself; adding it again would double it.
    if prefix and bos_token and text.startswith(bos_token):
        return []
    return prefix


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The token ids of a prompt exactly as training saw them: leading special tokens + the prompt's tokens."""
    prefix, _ = special_affixes(tokenizer)
    return _prefix_for(prompt, prefix, tokenizer.bos_token) + _encode(tokenizer, [prompt])[0]


def tokenize_generative(rows: list[dict], tokenizer, *, task_id: int, max_length: int, overlong: str,
                        loss_on: str) -> tuple[list[dict], dict[str, int], list[int]]:
    """Tokenize {"prompt","completion"} rows; returns (examples, counts, index of the row behind each example)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; generative data needs one to mark the end of a completion")
    prefix, _ = special_affixes(tokenizer)
    prompts = [r["prompt"] for r in rows]
    prompt_ids = _encode(tokenizer, prompts)
    full_ids = _encode(tokenizer, [r["prompt"] + r["completion"] for r in rows])
    counts, examples, kept = new_counts(), [], []
    for index, (row, p, full) in enumerate(zip(rows, prompt_ids, full_ids)):
        if not row["completion"].strip():
            counts["dropped_empty"] += 1
            continue
        c = full[len(p):] if full[:len(p)] == p else _encode(tokenizer, [row["completion"]])[0]
        if not c:
            counts["dropped_empty"] += 1
            continue
        pre = _prefix_for(row["prompt"], prefix, tokenizer.bos_token)
        head, tail = pre + p, c + [eos]
        truncated = len(head) + len(tail) > max_length
        if truncated and overlong == "drop":
            counts["dropped_overlong"] += 1
            continue
        if truncated and p and max_length - len(tail) > len(pre):
            head = pre + p[len(p) - (max_length - len(tail) - len(pre)):]
        masked = [IGNORE_INDEX] * len(head) if loss_on == "completion" else list(head)
        input_ids, labels = (head + tail)[:max_length], (masked + tail)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            counts["dropped_overlong"] += 1
            continue
        counts["kept"] += 1
        counts["truncated"] += int(truncated)
        examples.append({"input_ids": input_ids, "labels": labels, "task_id": task_id})
        kept.append(index)
    return examples, counts, kept


def tokenize_labelled(rows: list[dict], tokenizer, *, task_id: int, max_length: int, overlong: str,
                      key: str) -> tuple[list[dict], dict[str, int], list[int]]:
    """Tokenize {"text", key} rows (key "label" -> int, "value" -> float) into {"input_ids","label","task_id"}."""
    prefix, suffix = special_affixes(tokenizer)
    bodies = _encode(tokenizer, [r["text"] for r in rows])
    counts, examples, kept = new_counts(), [], []
    for index, (row, body) in enumerate(zip(rows, bodies)):
        if not row["text"].strip() or not body or row[key] is None:
            counts["dropped_empty"] += 1
            continue
        pre = _prefix_for(row["text"], prefix, tokenizer.bos_token)
        ids = pre + body + suffix
        truncated = len(ids) > max_length
        if truncated:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            room = max_length - len(pre) - len(suffix)
            ids = pre + body[:room] + suffix if room > 0 else ids[:max_length]
        counts["kept"] += 1
        counts["truncated"] += int(truncated)
        label = float(row[key]) if key == "value" else int(row[key])
        examples.append({"input_ids": ids, "label": label, "task_id": task_id})
        kept.append(index)
    return examples, counts, kept


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedily pack whole examples (in order) into sequences of at most max_length tokens.

    position_ids restart at 0 for every example, and the first label of every example is masked so no
    example is trained to predict the start of the next one.
    """
    packed: list[dict] = []
    current: dict | None = None
    for ex in examples:
        n = len(ex["input_ids"])
        if current is None or len(current["input_ids"]) + n > max_length:
            current = {"input_ids": [], "labels": [], "position_ids": [], "task_id": ex["task_id"]}
            packed.append(current)
        current["input_ids"].extend(ex["input_ids"])
        current["labels"].extend([IGNORE_INDEX] + ex["labels"][1:])
        current["position_ids"].extend(range(n))
    return packed
