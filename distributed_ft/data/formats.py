"""Row formats: map columns, detect the format, and normalise rows into one of three shapes.

generation:     {"prompt": str, "completion": str}   (text, prompt_completion, chat, instruction, qa)
classification: {"text": str, "label": int | str}   (string labels are mapped to ids by the caller)
regression:     {"text": str, "value": float}
"""
from __future__ import annotations

from typing import Any

from distributed_ft.errors import DataError

REQUIRED = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "qa": ("question", "answer"),
    "classification": ("text", "label"),
    "regression": ("text", "value"),
}
OPTIONAL = {"instruction": ("input",)}
KIND = {"text": "generation", "prompt_completion": "generation", "chat": "generation",
        "instruction": "generation", "qa": "generation", "classification": "classification", "regression": "regression"}

# Checked in order: the first format whose required columns are all present wins. `qa` is never guessed:
# question/answer columns are as often meant as a prompt/completion mapping, so it is asked for by name.
DETECT_ORDER = ("chat", "instruction", "prompt_completion", "classification", "regression", "text")

# Question/answer rows: the same template at training and evaluation, so a closed-book question is asked
# exactly as the trained pairs were.
QA_PROMPT = "Question: {question}\nAnswer:"

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def resolve_columns(present: list[str], fmt: str, columns: dict[str, str], task: str, source: str,
                    kind: str | None = None) -> tuple[str, dict[str, str]]:
    """Return (format, canonical name -> column name), checking that every needed column exists.

    With `kind` ("generation", "classification", "regression"), "auto" only considers formats of that kind
    and an explicit format of another kind is refused.
    """
    listing = ", ".join(present) or "none"
    for canonical, column in columns.items():
        if column not in present:
            raise DataError(f"task '{task}': column '{column}' (mapped to '{canonical}') not found in "
                            f"{source} (columns: {listing})")
    available = {c: c for c in present}
    available.update(columns)
    if fmt != "auto" and kind is not None and KIND[fmt] != kind:
        raise DataError(f"task '{task}': format '{fmt}' gives {KIND[fmt]} rows, but this model needs "
                        f"{kind} rows ({source})")
    if fmt == "auto":
        for candidate in DETECT_ORDER:
            if kind is not None and KIND[candidate] != kind:
                continue
            if all(c in available for c in REQUIRED[candidate]):
                fmt = candidate
                break
        else:
            wanted = f"{kind} " if kind else ""
            raise DataError(f"task '{task}': cannot detect a {wanted}format in {source} (columns: {listing}); "
                            f"set 'format' and map names with 'columns'")
    for needed in REQUIRED[fmt]:
        if needed not in available:
            raise DataError(f"task '{task}': format '{fmt}' needs column '{needed}', not found in {source} "
                            f"(columns: {listing}); map it with columns: {{{needed}: <column>}}")
    wanted = REQUIRED[fmt] + OPTIONAL.get(fmt, ())
    return fmt, {c: available[c] for c in wanted if c in available}


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def normalise(rows, fmt: str, mapping: dict[str, str], tokenizer, task: str, source: str
              ) -> tuple[str, list[dict]]:
    """Normalise rows of format `fmt` (columns per `mapping`); returns (kind, rows).

    Chat rows without an assistant turn come back with an empty completion (dropped later as empty).
    """
    if not isinstance(rows, list):
        # One columnar read of the needed columns; iterating a Dataset row by row is far slower.
        table = rows.select_columns(sorted(set(mapping.values())))[:]
        cols = {canonical: table[column] for canonical, column in mapping.items()}
    else:
        cols = {canonical: [row.get(column) for row in rows] for canonical, column in mapping.items()}
    n = len(next(iter(cols.values())))
    if fmt == "text":
        out = [{"prompt": "", "completion": _str(t)} for t in cols["text"]]
    elif fmt == "prompt_completion":
        out = [{"prompt": _str(p), "completion": _str(c)} for p, c in zip(cols["prompt"], cols["completion"])]
    elif fmt == "instruction":
        inputs = cols.get("input", [None] * n)
        out = [{"prompt": _alpaca(_str(i), _str(x)), "completion": _str(o)}
               for i, x, o in zip(cols["instruction"], inputs, cols["output"])]
    elif fmt == "qa":
        out = [qa_row(q, a) for q, a in zip(cols["question"], cols["answer"])]
    elif fmt == "chat":
        out = [render_chat(m, tokenizer, task, source, index) for index, m in enumerate(cols["messages"])]
    elif fmt == "classification":
        out = [{"text": _str(t), "label": _label(v, task, source, i)}
               for i, (t, v) in enumerate(zip(cols["text"], cols["label"]))]
    else:
        out = [{"text": _str(t), "value": _value(v, task, source, i)}
               for i, (t, v) in enumerate(zip(cols["text"], cols["value"]))]
    return KIND[fmt], out


def qa_row(question: Any, answer: Any) -> dict:
    """A question/answer pair as a prompt/completion row (the answer follows the prompt after one space)."""
    return {"prompt": QA_PROMPT.format(question=_str(question).strip()), "completion": " " + _str(answer).strip()}


def _alpaca(instruction: str, input_text: str) -> str:
    if input_text.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def simple_chat_prompt(messages: list[dict]) -> str:
    """The fallback template for tokenizers without one: '<|role|>\\ncontent\\n' turns, then '<|assistant|>\\n'."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def render_chat(messages: Any, tokenizer, task: str, source: str, index: int) -> dict:
    """prompt = conversation up to the last assistant turn plus the generation prompt; completion = that turn."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"task '{task}': row {index} of {source}: 'messages' must be a list of "
                        f"{{role, content}} mappings")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return {"prompt": "", "completion": ""}
    history = [{"role": m["role"], "content": _str(m["content"])} for m in messages[:last]]
    if has_chat_template(tokenizer):
        try:
            prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - templates raise arbitrary errors on odd conversations
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"task '{task}': row {index} of {source}: the chat template failed: {first}") from None
    else:
        prompt = simple_chat_prompt(history)
    return {"prompt": prompt, "completion": _str(messages[last]["content"])}


def _label(value: Any, task: str, source: str, index: int) -> int | str | None:
    """Integers (also bools, integral floats, digit strings) stay ints; other strings stay names."""
    if value is None or isinstance(value, int):
        return None if value is None else int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.lstrip("-").isdigit() else text
    raise DataError(f"task '{task}': row {index} of {source}: label {value!r} is not an integer or a name")


def _value(value: Any, task: str, source: str, index: int) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"task '{task}': row {index} of {source}: value {value!r} is not a number") from None
