"""The `data` config section: which datasets to train and validate on, and how to tokenize them."""
from __future__ import annotations

from pathlib import PurePath
from typing import Literal

from pydantic import Field, model_validator

from distributed_ft.strict import StrictModel

BuiltinName = Literal["arithmetic", "reverse", "sort", "copy", "parity", "count", "handbook"]
FormatName = Literal["auto", "text", "prompt_completion", "chat", "instruction", "qa", "classification",
                     "regression", "documents"]

# Canonical column names a row can be mapped onto through `columns`.
CANONICAL_COLUMNS = ("prompt", "completion", "text", "label", "value", "messages", "instruction", "input",
                     "output", "question", "answer")
# The parts of the built-in handbook corpus, chosen with `split` (see data/documents/corpus.py).
HANDBOOK_DOCUMENT_SPLITS = ("documents", "heldout")
HANDBOOK_QA_SPLITS = ("qa_trained", "qa_docs_only", "unanswerable", "abstain")


class DocumentsOptions(StrictModel):
    """How a `format: documents` folder is read, cleaned, chunked and split."""

    # fnmatch patterns on the path relative to the folder (`*` also crosses sub-folders)
    include: list[str] = ["*"]
    exclude: list[str] = []
    hidden: bool = False                          # read hidden files and folders (names starting with '.')
    text_field: str = "text"                      # the field of a .jsonl row that holds a document
    chunk_tokens: int | None = Field(default=None, ge=16)   # default: data.max_length
    overlap_tokens: int = Field(default=32, ge=0)
    # the fraction of documents (not chunks) held out for validation, whole
    holdout_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    near_duplicate_threshold: float = Field(default=0.85, gt=0.0, le=1.0)
    # a line on at least this fraction of a document's pages (and on 2 or more) is a header or footer
    boilerplate_fraction: float = Field(default=0.6, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _overlap_fits(self):
        if self.chunk_tokens is not None and self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be below chunk_tokens ({self.chunk_tokens})")
        return self


class DatasetSpec(StrictModel):
    """One dataset: a built-in synthetic task, a local file, or a hub dataset."""

    builtin: BuiltinName | None = None
    path: str | list[str] | None = None   # a list of files, or a folder, only with format: documents
    hub: str | None = None
    hub_config: str | None = None
    split: str = "train"
    format: FormatName = "auto"
    columns: dict[str, str] = {}
    weight: float = Field(default=1.0, gt=0)
    task: str | None = None
    num_examples: int | None = Field(default=None, ge=1)
    documents: DocumentsOptions | None = None

    @model_validator(mode="after")
    def _one_source(self):
        given = [name for name in ("builtin", "path", "hub") if getattr(self, name) is not None]
        if len(given) != 1:
            found = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(f"set exactly one of builtin, path and hub ({found})")
        unknown = sorted(set(self.columns) - set(CANONICAL_COLUMNS))
        if unknown:
            raise ValueError(f"columns key '{unknown[0]}' is not a canonical column "
                             f"(valid: {', '.join(CANONICAL_COLUMNS)})")
        if self.builtin is not None and (self.columns or self.format != "auto"):
            raise ValueError(f"builtin '{self.builtin}' takes no 'format' or 'columns'")
        if self.builtin == "handbook" and self.split not in HANDBOOK_DOCUMENT_SPLITS + HANDBOOK_QA_SPLITS:
            raise ValueError(f"builtin 'handbook' needs a split: one of "
                             f"{', '.join(HANDBOOK_DOCUMENT_SPLITS + HANDBOOK_QA_SPLITS)} (got '{self.split}')")
        if self.format == "documents" and self.path is None:
            raise ValueError("format: documents needs a path: a folder or a list of files")
        if isinstance(self.path, list) and (not self.path or self.format != "documents"):
            raise ValueError("a list of paths needs format: documents and at least one file")
        if self.documents is not None and not self.is_documents:
            raise ValueError("'documents' options apply only to format: documents (or the handbook's document splits)")
        if self.hub_config is not None and self.hub is None:
            raise ValueError("hub_config applies only to a hub dataset")
        if self.task is not None and not self.task.strip():
            raise ValueError("task name must not be empty")
        return self

    @property
    def task_name(self) -> str:
        """The task this dataset feeds: `task`, else the builtin name, file stem or hub name."""
        if self.task:
            return self.task
        if self.builtin == "handbook" and self.split != "documents":
            return f"handbook_{self.split}"
        if self.builtin:
            return self.builtin
        if isinstance(self.path, list):
            return "documents"
        if self.path:
            return PurePath(self.path).stem
        return self.hub.rstrip("/").split("/")[-1]

    @property
    def source(self) -> str:
        """A short human description of where the rows come from, for error messages."""
        if self.builtin:
            return f"builtin '{self.builtin}'" + (f" ({self.split})" if self.builtin == "handbook" else "")
        if isinstance(self.path, list):
            return f"{len(self.path)} files ({self.path[0]}, ...)" if len(self.path) > 1 else self.path[0]
        if self.path:
            return self.path
        return f"hub dataset '{self.hub}'" + (f" ({self.hub_config})" if self.hub_config else "")


    @property
    def is_documents(self) -> bool:
        """Whether this dataset is a set of documents to clean and chunk (not rows)."""
        return self.format == "documents" or (self.builtin == "handbook" and self.split in HANDBOOK_DOCUMENT_SPLITS)

    @property
    def documents_options(self) -> DocumentsOptions:
        return self.documents or DocumentsOptions()


class DataConfig(StrictModel):
    """Training and validation datasets, sequence length, loss masking and packing."""

    train: list[DatasetSpec] = Field(min_length=1)
    validation: list[DatasetSpec] | None = None
    validation_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)
    max_length: int = Field(default=256, gt=0)
    overlong: Literal["truncate", "drop"] = "truncate"
    loss_on: Literal["completion", "all"] = "completion"
    packing: bool = False

    @model_validator(mode="after")
    def _checks(self):
        if self.validation and self.validation_fraction > 0:
            raise ValueError("validation_fraction cannot be combined with validation datasets; use one")
        seen: set[str] = set()
        for spec in self.train:
            if spec.task_name in seen:
                raise ValueError(f"task name '{spec.task_name}' is used by two train datasets; "
                                 f"give one a distinct 'task'")
            seen.add(spec.task_name)
        return self
