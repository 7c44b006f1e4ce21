"""Graded samples for pointwise graders: {"prompt", "output", "reference", "score"} rows, made by running an
existing grader over samples (`dft grader label`) and read back with one-line errors naming file, row, field."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from distributed_ft.errors import DataError

GRADED_FIELDS = ("prompt", "output", "reference")


class GradedDataError(DataError):
    """A graded sample is missing a field or has a score that is not a number."""


def read_samples(path: str) -> list[dict]:
    """JSONL rows, each an object with a text `output` (what the grader scores)."""
    file = Path(path)
    if not file.is_file():
        raise GradedDataError(f"samples file not found: {path}")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise GradedDataError(f"{path} row {number}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise GradedDataError(f"{path} row {number}: must be a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("output"), str):
            raise GradedDataError(f"{path} row {number}: field 'output' must be text (the sample to grade)")
        rows.append(row)
    if not rows:
        raise GradedDataError(f"{path} is empty (0 rows)")
    return rows


@dataclass
class LabelReport:
    labelled: int
    unscorable: int
    samples_per_s: float


def label_samples(grader, rows: list[dict], batch_size: int = 64) -> tuple[list[dict], LabelReport]:
    """Each row with the grader's `score` (None, plus `grade_error`, when it could not be scored). The grader
    sees the row as the item, so its templates read {{ item.reference }}, {{ item.prompt }}, ..."""
    from distributed_ft.grader.engine import grade_entries

    out, unscorable = [], 0
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        results = grade_entries(grader, [{"sample": {"output_text": r["output"]}, "item": r} for r in batch])
        for row, result in zip(batch, results):
            graded = {**row, "score": result.reward}
            if result.reward is None:
                unscorable += 1
                graded["grade_error"] = result.error
            out.append(graded)
    elapsed = max(time.perf_counter() - started, 1e-9)
    return out, LabelReport(len(out), unscorable, round(len(out) / elapsed, 1))


def grader_samples_per_s(grader, rows: list[dict], batch_size: int = 64, min_seconds: float = 1.0) -> float:
    """`grader`'s throughput on `rows`, run as `dft grader label` runs it (label_samples, batches of `batch_size`),
    after one untimed batch (a process pool's or a model's first call measures its start-up, not its speed) and
    over whole passes until `min_seconds` have gone by (one pass of a rule grader takes milliseconds)."""
    label_samples(grader, rows[:batch_size], batch_size)
    done, started = 0, time.perf_counter()
    while not done or time.perf_counter() - started < min_seconds:
        label_samples(grader, rows, batch_size)
        done += len(rows)
    return round(done / (time.perf_counter() - started), 1)


def label_file(grader_config: str, input_path: str, output_path: str, batch_size: int = 64) -> LabelReport:
    from distributed_ft.grader.engine import load_grader

    rows = read_samples(input_path)
    grader = load_grader(grader_config)
    try:
        graded, report = label_samples(grader, rows, batch_size)
    finally:
        grader.close()
    Path(output_path).write_text("".join(json.dumps(r) + "\n" for r in graded))
    return report


def check_graded(row: dict, where: str) -> dict:
    """A graded sample as a pointwise objective reads it: three texts and a finite numeric score."""
    for field in GRADED_FIELDS:
        if field not in row:
            raise GradedDataError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], str):
            raise GradedDataError(f"{where}: field '{field}' must be text, got {type(row[field]).__name__}")
    score = row.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise GradedDataError(f"{where}: field 'score' must be a number, got {score!r}")
    return {**{field: row[field] for field in GRADED_FIELDS}, "score": float(score)}


def read_graded(path: str) -> list[dict]:
    return [check_graded(row, f"{path} row {i + 1}") for i, row in enumerate(read_samples(path))]


# The grader that scores the built-in samples, as a grader spec: the rule grader the trained model is timed
# against (builtin_graded calls its metric directly, which gives the same scores without the grader engine).
BUILTIN_GRADER = {"type": "text_similarity", "name": "fuzzy_match", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.reference }}", "evaluation_metric": "fuzzy_match"}


def builtin_graded(task: str, n: int, seed: int) -> list[dict]:
    """Outputs of built-in task `task` with 0 to 3 symbols corrupted, each scored against the correct answer
    by the `text_similarity` grader's fuzzy_match (a rule grader): graded samples that need no download."""
    from distributed_ft.data.builtin import builtin_rows
    from distributed_ft.grader.text_metrics import fuzzy_match
    from distributed_ft.preference.pairs import corrupt

    rng = random.Random(f"graded:{task}:{seed}")
    out = []
    for row in builtin_rows(task, n, seed, generative=True):
        output = row["completion"]
        for _ in range(rng.randint(0, 3)):
            output = corrupt(output, rng)
        out.append({"prompt": row["prompt"], "output": output, "reference": row["completion"],
                    "score": fuzzy_match(output, row["completion"])})
    return out


def source_grader_spec(config):
    """The spec of the grader that scored a `samples` section's rows: `samples.grader`, else BUILTIN_GRADER when
    every source is built in; None for file samples whose grader is not named."""
    from distributed_ft.grader.spec import load_grader_spec, parse_grader_spec

    if config.grader is not None:
        return load_grader_spec(config.grader)
    if all(source.builtin is not None for source in config.train):
        return parse_grader_spec(BUILTIN_GRADER, "the built-in samples' grader")
    return None


def build_graded(config, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) graded samples for a `samples` section."""
    from distributed_ft.preference.pairs import split_pairs

    rows = []
    for source in config.train:
        if source.builtin is not None:
            rows += builtin_graded(source.builtin, source.num_examples or 1000, seed)
        else:
            rows += read_graded(source.path)[:source.num_examples]
    train, held = split_pairs(rows, config.validation_fraction, seed)
    if not train or len(held) < 2:
        raise GradedDataError(f"samples: {len(rows)} graded samples leave too few for training and a held-out set")
    return train, held[:config.eval_samples]
