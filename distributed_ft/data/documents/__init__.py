"""Documents as training data: read a folder of files, clean, de-duplicate, chunk and split it by document.

readers (one function per file type) -> clean (normalise, headers/footers, paragraphs) -> dedup (exact and
MinHash near-duplicates) -> chunk (token-aware, on paragraph and heading boundaries) -> ingest (the whole
path, streamed, with a report); corpus writes the built-in demo handbook and its questions.
"""
from distributed_ft.data.documents.ingest import DocumentReader, DocumentsReport, DocumentsResult, documents_summary
from distributed_ft.data.documents.readers import EXTRA_HINT

__all__ = ["DocumentReader", "DocumentsReport", "DocumentsResult", "EXTRA_HINT", "documents_summary"]
