"""Data: read, normalise, split, tokenize and mix the configured datasets into training examples.

`build_data` is the one entry point; it returns a DataBundle and logs nothing (counts are in `stats`, and
what each documents dataset became in `documents`). Train examples are stored task by task, so a
WeightedMixSampler over `task_sizes` indexes them directly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from distributed_ft.data.builtin import BUILTIN_TASK_TYPES
from distributed_ft.data.collate import collate
from distributed_ft.data.config import DataConfig, DatasetSpec
from distributed_ft.data.formats import normalise, resolve_columns
from distributed_ft.data.mixing import WeightedMixSampler
from distributed_ft.data.sources import column_names, load_rows
from distributed_ft.data.tokenize import encode_prompt, pack, tokenize_generative, tokenize_labelled
from distributed_ft.errors import ConfigError, DataError
from distributed_ft.tasks import get_task

__all__ = ["DataBundle", "DataConfig", "DatasetSpec", "WeightedMixSampler", "build_data", "collate", "encode_prompt"]
# Validation builtins are generated from a different seed than the training ones.
VALIDATION_SEED_OFFSET = 1_000_003


@dataclass
class DataBundle:
    train: list[dict]
    tasks: list[str]                       # train tasks, in order; a train example's task_id indexes this
    task_sizes: list[int]                  # train examples per task (after packing, if packed)
    weights: list[float]
    stats: dict[str, dict[str, int]]       # per train task: kept, truncated, dropped_* (+ sequences if packed)
    validation_stats: dict[str, dict[str, int]]
    eval_records: list[dict] | None        # one per validation example, same order; references are stripped
    num_labels: int | None                 # classification only
    label_names: list[str] | None          # when classification labels were names, label id -> name
    train_rows: dict[str, list[dict]]      # the normalised training rows of each task, before tokenization
    documents: list = field(default_factory=list)   # a DocumentsReport per documents dataset, validation first

    def solved_examples(self, task: str, n: int) -> list[tuple[str, str]]:
        """The first `n` (prompt, completion) pairs of a generation task's training rows (few-shot prompts)."""
        return [(r["prompt"].strip(), r["completion"].strip()) for r in self.train_rows.get(task, [])[:n]]

    def sampler(self, seed: int) -> WeightedMixSampler:
        return WeightedMixSampler(self.task_sizes, self.weights, seed)



def build_data(cfg: DataConfig, tokenizer, *, task_type: str, seed: int, progress: bool = False) -> DataBundle:
    """Build train/validation examples for a model of `task_type` from the `data` config.

    `progress` shows a progress bar while documents are read (the main process only).
    """
    kind = get_task(task_type).kind
    if cfg.packing and task_type != "causal_lm":
        raise ConfigError(f"data.packing applies only to causal_lm models, not {task_type}")
    specs = list(cfg.train) + list(cfg.validation or [])
    reader = _document_reader(specs, tokenizer, task_type, cfg.max_length, seed, progress)

    # Held-out documents are read before the training ones, so training leaves out whatever they contain.
    val_rows: dict[str, list[dict]] | None = None
    held_documents: dict[str, list[dict]] = {}
    for spec in cfg.validation or []:
        if spec.is_documents:
            result = reader.read(spec, _document_path(spec), held_out=True)
            held_documents.setdefault(spec.task_name, []).extend(result.held_out)

    tasks = [spec.task_name for spec in cfg.train]
    train_rows, split_off = {}, {}
    for task, spec in zip(tasks, cfg.train):
        if spec.is_documents:
            # Whole documents are held out (never chunks of one), by the dataset's own fraction or the global one.
            fraction = spec.documents_options.holdout_fraction or cfg.validation_fraction
            result = reader.read(spec, _document_path(spec), held_out=False, holdout_fraction=fraction)
            train_rows[task] = result.train
            if result.held_out:
                split_off[task] = result.held_out
        else:
            train_rows[task] = _normalised_rows(spec, tokenizer, task_type, seed)
    if cfg.validation_fraction > 0:
        val_rows = {}
        for task, spec in zip(tasks, cfg.train):
            if not spec.is_documents:
                train_rows[task], val_rows[task] = hold_out(train_rows[task], cfg.validation_fraction, seed, task)
    elif cfg.validation:
        val_rows = {}
        for spec in cfg.validation:
            if spec.is_documents:
                val_rows.setdefault(spec.task_name, []).extend(held_documents.pop(spec.task_name, []))
                continue
            rows = _normalised_rows(spec, tokenizer, task_type, seed + VALIDATION_SEED_OFFSET)
            # Synthetic tasks are validated on unseen inputs; the handbook's trained questions are asked as trained.
            if spec.builtin not in (None, "handbook") and spec.task_name in train_rows:
                rows = _without_inputs_of(rows, train_rows[spec.task_name])
            val_rows.setdefault(spec.task_name, []).extend(rows)
    if split_off:
        val_rows = val_rows if val_rows is not None else {}
        for task, rows in split_off.items():
            val_rows.setdefault(task, []).extend(rows)

    label_names = num_labels = None
    if kind == "classification":
        label_names, num_labels = _map_labels(train_rows, val_rows or {})

    train, stats, sizes = [], {}, []
    for task_id, task in enumerate(tasks):
        examples, counts, _ = _tokenize(train_rows[task], tokenizer, cfg, kind, task_id)
        if not examples:
            raise DataError(f"task '{task}': no training examples left after tokenization "
                            f"({_describe(counts)}); check max_length and the data")
        if cfg.packing:
            examples = pack(examples, cfg.max_length)
            counts["sequences"] = len(examples)
        sizes.append(len(examples))
        train.extend(examples)
        stats[task] = counts

    eval_records = None
    validation_stats: dict[str, dict[str, int]] = {}
    if val_rows is not None:
        eval_records = []
        for task, rows in val_rows.items():
            # Tokenized as training would be, so the same length rules decide which rows are evaluated.
            examples, counts, kept = _tokenize(rows, tokenizer, cfg, kind, task_id=0)
            if not examples:
                raise DataError(f"task '{task}': no validation examples left after tokenization "
                                f"({_describe(counts)})")
            eval_records.extend(_record(task, rows[i], kind) for i in kept)
            validation_stats[task] = counts

    return DataBundle(train=train, tasks=tasks, task_sizes=sizes, weights=[spec.weight for spec in cfg.train],
                      stats=stats, validation_stats=validation_stats, eval_records=eval_records,
                      num_labels=num_labels, label_names=label_names, train_rows=train_rows,
                      documents=[] if reader is None else reader.reports)


def _document_reader(specs: list[DatasetSpec], tokenizer, task_type: str, max_length: int, seed: int,
                     progress: bool):
    """The reader shared by every documents dataset (one duplicate index for the run), or None."""
    documents = [spec for spec in specs if spec.is_documents]
    if not documents:
        return None
    if task_type != "causal_lm":
        raise DataError(f"task '{documents[0].task_name}': documents are text for a causal_lm model, "
                        f"not for a {task_type} model")
    from distributed_ft.data.documents import DocumentReader

    return DocumentReader(tokenizer, max_length, seed, progress=progress)


def _document_path(spec: DatasetSpec):
    if spec.builtin == "handbook":
        from distributed_ft.data.documents.corpus import handbook_folder

        return str(handbook_folder(spec.split))
    return spec.path


def _normalised_rows(spec: DatasetSpec, tokenizer, task_type: str, seed: int) -> list[dict]:
    task, kind = spec.task_name, get_task(task_type).kind
    if spec.builtin == "handbook":
        from distributed_ft.data.documents.corpus import questions

        if task_type != "causal_lm":
            raise DataError(f"task '{task}': the handbook's questions need a causal_lm model, not {task_type}")
        rows = questions(spec.split)[:spec.num_examples]
        return normalise(rows, "qa", {"question": "question", "answer": "answer"}, tokenizer, task, spec.source)[1]
    if spec.builtin is not None:
        native = BUILTIN_TASK_TYPES[spec.builtin]
        # Every builtin has a generative form; classification/regression models need the native type.
        if task_type != "causal_lm" and native != task_type:
            raise DataError(f"task '{task}': builtin '{spec.builtin}' is a {native} task, "
                            f"but the model task is {task_type}")
        return load_rows(spec, seed, generative=task_type == "causal_lm")
    rows = load_rows(spec, seed)
    fmt, mapping = resolve_columns(column_names(rows), spec.format, spec.columns, task, spec.source, kind)
    _, normalised = normalise(rows, fmt, mapping, tokenizer, task, spec.source)
    return normalised


def hold_out(rows: list[dict], fraction: float, seed: int, task: str) -> tuple[list[dict], list[dict]]:
    """Split off round(fraction * n) rows (at least 1, never all) chosen by a per-task seeded shuffle."""
    n = len(rows)
    n_val = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
    order = list(range(n))
    random.Random(f"{seed}:{task}:validation").shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _input_of(row: dict) -> str:
    return row.get("prompt", row.get("text"))


def _without_inputs_of(rows: list[dict], train: list[dict]) -> list[dict]:
    seen = {_input_of(r) for r in train}
    return [r for r in rows if _input_of(r) not in seen]


def _map_labels(train_rows: dict, val_rows: dict) -> tuple[list[str] | None, int]:
    """Integer labels stay as they are; if any label is a name, all labels become ids of sorted train names."""
    train_labels = [r["label"] for rows in train_rows.values() for r in rows if r["label"] is not None]
    val_labels = [r["label"] for rows in val_rows.values() for r in rows if r["label"] is not None]
    if any(isinstance(label, str) for label in train_labels + val_labels):
        names = sorted({str(label) for label in train_labels})
        ids = {name: i for i, name in enumerate(names)}
        for task, rows in val_rows.items():
            for r in rows:
                if r["label"] is not None and str(r["label"]) not in ids:
                    raise DataError(f"task '{task}': validation label '{r['label']}' never occurs in the "
                                    f"training data (labels: {', '.join(names)})")
        for rows in list(train_rows.values()) + list(val_rows.values()):
            for r in rows:
                if r["label"] is not None:
                    r["label"] = ids[str(r["label"])]
        return names, max(2, len(names))
    negative = [label for label in train_labels + val_labels if label < 0]
    if negative:
        raise DataError(f"classification labels must be >= 0 (found {negative[0]})")
    return None, max(2, max(train_labels + val_labels, default=0) + 1)


def _tokenize(rows: list[dict], tokenizer, cfg: DataConfig, kind: str, task_id: int):
    if kind == "generation":
        return tokenize_generative(rows, tokenizer, task_id=task_id, max_length=cfg.max_length,
                                   overlong=cfg.overlong, loss_on=cfg.loss_on)
    return tokenize_labelled(rows, tokenizer, task_id=task_id, max_length=cfg.max_length, overlong=cfg.overlong,
                             key="label" if kind == "classification" else "value")


def _record(task: str, row: dict, kind: str) -> dict:
    if kind == "generation":
        return {"task": task, "prompt": row["prompt"], "reference": row["completion"].strip()}
    key = "label" if kind == "classification" else "value"
    return {"task": task, "text": row["text"], key: row[key]}


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
