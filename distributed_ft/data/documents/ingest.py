"""From a folder (or a list of files) to training and held-out text rows, every step counted.

Files stream one at a time (read -> normalise -> strip headers/footers -> de-duplicate -> chunk), so a
folder of any size needs memory for its chunks and the duplicate index only. Held-out documents are
whole documents: those of a `data.validation` entry (read first) and those `holdout_fraction` picks.
"""
from __future__ import annotations

import fnmatch
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from distributed_ft.data.config import DatasetSpec, DocumentsOptions
from distributed_ft.data.documents.chunk import Chunk, TokenCounter, chunk_blocks
from distributed_ft.data.documents.clean import blocks, normalise_page, strip_boilerplate
from distributed_ft.data.documents.dedup import DuplicateIndex
from distributed_ft.data.documents.readers import EXTRA_HINT, RawDocument, missing_extra, read_file
from distributed_ft.errors import DataError

SAMPLES = 5  # chunks kept in the report as examples
COUNTS = ("hyphenations_joined", "boilerplate_lines", "empty_documents", "exact_duplicate_documents",
          "near_duplicate_documents", "held_out_overlap_documents", "exact_duplicate_paragraphs",
          "near_duplicate_paragraphs", "held_out_overlap_paragraphs")


@dataclass
class DocumentsReport:
    """What one documents dataset became: for `dft data inspect`, the run log and the tests."""

    task: str
    role: str                                   # train or validation
    source: str
    files_listed: int = 0
    files_excluded: int = 0                     # left out by include / exclude
    documents_read: int = 0
    documents_kept: int = 0
    documents_held_out: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (file, reason)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    chunks: dict[str, int] = field(default_factory=lambda: {"train": 0, "held_out": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "held_out": 0})
    bytes_read: int = 0
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        out["skipped"] = [{"file": f, "reason": r} for f, r in self.skipped]
        return out


@dataclass
class DocumentsResult:
    train: list[dict]        # text rows: {"prompt": "", "completion": chunk, "source", "chunk", "pages", "section"}
    held_out: list[dict]
    report: DocumentsReport


class DocumentReader:
    """Reads every documents dataset of one data config against one duplicate index."""

    def __init__(self, tokenizer, max_length: int, seed: int, *, progress: bool = False):
        package = missing_extra()
        if package is not None:
            raise DataError(f"format: documents needs {package} and the rest of the documents extra: {EXTRA_HINT}")
        self.counter = TokenCounter(tokenizer)
        self.max_length = max_length
        self.seed = seed
        self.progress = progress
        self.index: DuplicateIndex | None = None
        self.reports: list[DocumentsReport] = []
        # Room for the special tokens tokenization adds around a text (BOS, EOS).
        self.reserved = len(tokenizer("a")["input_ids"]) - len(self.counter.ids(["a"])[0]) + 1

    def read(self, spec: DatasetSpec, folder: str | list[str], *, held_out: bool,
             holdout_fraction: float = 0.0) -> DocumentsResult:
        """Clean and chunk `folder`; every document is held out (held_out=True) or `holdout_fraction` of them."""
        options = spec.documents_options
        task = spec.task_name
        if self.index is None:
            self.index = DuplicateIndex(options.near_duplicate_threshold)
        elif self.index.threshold != options.near_duplicate_threshold:
            # One index finds duplicates across datasets (and held-out overlap), so it has one threshold.
            raise DataError(f"task '{task}': every documents dataset needs the same near_duplicate_threshold "
                            f"({self.index.threshold} before, {options.near_duplicate_threshold} here)")
        report = DocumentsReport(task, "validation" if held_out else "train", spec.source)
        self.reports.append(report)
        budget = (options.chunk_tokens or self.max_length) - self.reserved
        if budget <= options.overlap_tokens:
            raise DataError(f"task '{task}': chunks of {budget} text tokens leave no room beside "
                            f"overlap_tokens {options.overlap_tokens}; raise data.max_length or documents.chunk_tokens")
        files = _list_files(folder, options, task, report)
        per_document: list[list[Chunk]] = []
        for document in self._documents(files, options, report, task):
            if spec.num_examples is not None and len(per_document) >= spec.num_examples:
                break
            chunks = self._clean_and_chunk(document, options, report, held_out, budget)
            if chunks:
                per_document.append(chunks)
        report.documents_kept = len(per_document)
        if not per_document:
            raise DataError(f"task '{task}': nothing readable in {spec.source} ({_why_nothing(report)})")
        held = set(range(len(per_document))) if held_out else _pick_held_out(len(per_document), holdout_fraction,
                                                                              self.seed, task)
        train, heldout = [], []
        for i, chunks in enumerate(per_document):
            (heldout if i in held else train).extend(_row(c) for c in chunks)
        report.documents_held_out = len(held)
        for name, rows in (("train", train), ("held_out", heldout)):
            report.chunks[name] = len(rows)
            report.tokens[name] = sum(r["tokens"] for r in rows)
        report.samples = [{k: v for k, v in r.items() if k != "prompt"} for r in (train or heldout)[:SAMPLES]]
        return DocumentsResult(train, heldout, report)

    def _documents(self, files: list[tuple[Path, str]], options: DocumentsOptions, report: DocumentsReport,
                   task: str) -> Iterator[RawDocument]:
        from tqdm.auto import tqdm

        bar = tqdm(files, desc=f"reading {task}", unit="file", disable=None if self.progress else True, leave=False)
        for path, source in bar:
            for item in read_file(path, source, options.text_field):
                if isinstance(item, tuple):
                    report.skipped.append(item)
                    continue
                report.documents_read += 1
                report.bytes_read += item.size
                report.by_type[item.kind] = report.by_type.get(item.kind, 0) + 1
                yield item
        bar.close()

    def _clean_and_chunk(self, document: RawDocument, options: DocumentsOptions, report: DocumentsReport,
                         held_out: bool, budget: int) -> list[Chunk]:
        counts = report.counts
        pages = []
        for page in document.pages:
            text, joined = normalise_page(page)
            counts["hyphenations_joined"] += joined
            pages.append(text)
        pages, removed = strip_boilerplate(pages, options.boilerplate_fraction)
        counts["boilerplate_lines"] += removed
        parts = blocks(pages)
        if not parts:
            counts["empty_documents"] += 1
            return []
        verdict = self.index.check("document", "\n".join(b.text for b in parts), held_out=held_out)
        if verdict is not None:
            counts[_COUNT_OF[verdict] + "_documents"] += 1
            return []
        kept = []
        for block in parts:
            # Headings repeat legitimately ("Overview"); only paragraphs are de-duplicated.
            verdict = None if block.heading else self.index.check("paragraph", block.text, held_out=held_out)
            if verdict is None:
                kept.append(block)
            else:
                counts[_COUNT_OF[verdict] + "_paragraphs"] += 1
        if not any(not b.heading for b in kept):
            counts["empty_documents"] += 1
            return []
        return chunk_blocks(kept, document.source, self.counter, budget, options.overlap_tokens)


_COUNT_OF = {"exact": "exact_duplicate", "near": "near_duplicate", "held_out": "held_out_overlap"}


def _row(chunk: Chunk) -> dict:
    return {"prompt": "", "completion": chunk.text, **chunk.position(), "tokens": chunk.tokens}


def _pick_held_out(n: int, fraction: float, seed: int, task: str) -> set[int]:
    """round(fraction * n) whole documents (at least 1, never all), by a per-task seeded shuffle."""
    if fraction <= 0 or n < 2:
        return set()
    k = min(n - 1, max(1, round(fraction * n)))
    order = list(range(n))
    random.Random(f"{seed}:{task}:documents").shuffle(order)
    return set(order[:k])


def _list_files(folder: str | list[str], options: DocumentsOptions, task: str,
                report: DocumentsReport) -> list[tuple[Path, str]]:
    """(path, name shown in reports) of every file to read, in a stable order."""
    if isinstance(folder, list):
        files = []
        for name in folder:
            path = Path(name)
            if path.is_file():
                files.append((path, name))
            else:
                report.skipped.append((name, "not found" if not path.exists() else "not a file"))
        report.files_listed = len(folder)
        if not files:
            raise DataError(f"task '{task}': none of the {len(folder)} listed files exists ({folder[0]}, ...)")
        return files
    root = Path(folder)
    if not root.exists():
        raise DataError(f"task '{task}': documents folder not found: {folder}")
    if root.is_file():
        report.files_listed = 1
        return [(root, root.name)]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in sorted(names):
            path = Path(directory) / name
            rel = path.relative_to(root).as_posix()
            report.files_listed += 1
            if not _selected(rel, options):
                report.files_excluded += 1
                continue
            files.append((path, rel))
    if not files:
        excluded = f"; all {report.files_excluded} excluded by include/exclude" if report.files_excluded else ""
        raise DataError(f"task '{task}': documents folder {folder} has no files to read{excluded}")
    return files


def _selected(rel: str, options: DocumentsOptions) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if not options.hidden and any(part.startswith(".") for part in rel.split("/")):
        return False
    included = any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in options.include)
    return included and not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in options.exclude)


def _why_nothing(report: DocumentsReport) -> str:
    parts = [f"{report.files_listed} files"]
    if report.skipped:
        file, reason = report.skipped[0]
        more = f" and {len(report.skipped) - 1} more" if len(report.skipped) > 1 else ""
        parts.append(f"{len(report.skipped)} unreadable: {file}: {reason}{more}")
    removed = {k: v for k, v in report.counts.items() if v and k != "hyphenations_joined"}
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in removed.items()]
    return ", ".join(parts)


def documents_summary(report: DocumentsReport) -> str:
    """One line: what a documents dataset became (the run log prints it; `dft data inspect` details it)."""
    removed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.counts.items() if v)
    return (f"data {report.task} (documents, {report.role}): {report.documents_read} documents read from "
            f"{report.files_listed} files, {len(report.skipped)} skipped, {report.files_excluded} excluded; "
            f"{report.documents_kept} kept ({report.documents_held_out} held out); "
            f"{report.chunks['train']} train / {report.chunks['held_out']} held-out chunks, "
            f"{report.tokens['train']} / {report.tokens['held_out']} tokens"
            + (f"; removed: {removed}" if removed else ""))
