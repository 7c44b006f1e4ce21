"""Reading raw rows for one DatasetSpec: local files and hub datasets through `datasets`, or builtins."""
from __future__ import annotations

import contextlib
from pathlib import Path

from distributed_ft.data.builtin import BUILTIN_TASK_TYPES, builtin_rows
from distributed_ft.data.config import DatasetSpec
from distributed_ft.errors import DataError

DEFAULT_BUILTIN_EXAMPLES = 2000

# File extension -> `datasets` packaged loader.
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextlib.contextmanager
def _quiet_datasets():
    """Silence `datasets` progress bars while loading; restores the previous setting."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_rows(spec: DatasetSpec, seed: int, *, generative: bool = False):
    """Rows for `spec`: a list of dicts (builtin) or a `datasets.Dataset` (files, hub), capped at num_examples.

    `generative` asks builtins for their prompt/completion form; `seed` only affects builtins.
    """
    task = spec.task_name
    if spec.builtin is not None:
        n = spec.num_examples or DEFAULT_BUILTIN_EXAMPLES
        wants_generative = generative and BUILTIN_TASK_TYPES[spec.builtin] != "causal_lm"
        return builtin_rows(spec.builtin, n, seed, generative=wants_generative)
    if spec.path is not None:
        ds = _load_file(spec.path, spec.split, task)
    else:
        ds = _load_hub(spec, task)
    if len(ds) == 0:
        raise DataError(f"task '{task}': {spec.source} is empty (0 rows)")
    if spec.num_examples is not None and spec.num_examples < len(ds):
        ds = ds.select(range(spec.num_examples))
    return ds


def _load_file(path: str, split: str, task: str):
    file = Path(path)
    if not file.exists():
        raise DataError(f"task '{task}': data file not found: {path}")
    if not file.is_file():
        raise DataError(f"task '{task}': data path is not a file: {path}")
    loader = LOADERS.get(file.suffix.lower())
    if loader is None:
        raise DataError(f"task '{task}': unsupported file extension '{file.suffix}' for {path} "
                        f"(supported: {', '.join(LOADERS)})")
    # `datasets` fails obscurely on an empty file, so refuse it first.
    if file.stat().st_size == 0 or (loader != "parquet" and not file.read_text(errors="replace").strip()):
        raise DataError(f"task '{task}': {path} is empty (0 rows)")
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(loader, data_files=str(file), split=split)
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
            if "corresponds to no data" in str(err):  # how `datasets` reports a split with zero rows
                raise DataError(f"task '{task}': {path} is empty (0 rows)") from None
            raise DataError(f"task '{task}': cannot read {path} as {loader} (split '{split}'): "
                            f"{_first_line(err)}") from None


def _load_hub(spec: DatasetSpec, task: str):
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(spec.hub, spec.hub_config, split=spec.split)
        except Exception as err:  # noqa: BLE001 - network, auth, missing dataset/config/split
            raise DataError(f"task '{task}': cannot load {spec.source} split '{spec.split}': "
                            f"{_first_line(err)}") from None


def column_names(rows) -> list[str]:
    """Column names of a Dataset or of a list of dict rows (union over rows, in first-seen order)."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)
