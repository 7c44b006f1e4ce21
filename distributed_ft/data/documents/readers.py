"""One reader per file type: a file in, its text out as pages (a list of strings), nothing else.

Headings come out as Markdown headings (`# `, `## `) whatever the format, so the chunker finds section
boundaries the same way in every type; paragraphs are separated by blank lines. A reader raises
`Unreadable` with a short reason for a file it cannot parse; the caller names the file and skips it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

EXTRA_HINT = "pip install 'distributed_ft[documents]'"
# The modules the `documents` extra brings, by import name -> package name.
EXTRA_MODULES = {"pypdf": "pypdf", "docx": "python-docx", "bs4": "beautifulsoup4", "datasketch": "datasketch"}


class Unreadable(Exception):
    """A file (or a row of one) that cannot be turned into text; the message is the reason."""


@dataclass
class RawDocument:
    source: str            # the file (relative to the folder), with '#row N' for a jsonl row
    kind: str              # the reader that read it: txt, md, html, pdf, docx, jsonl
    pages: list[str]
    size: int              # bytes read from disk for this document


def missing_extra() -> str | None:
    """The first package of the `documents` extra that is not installed, else None."""
    import importlib.util

    for module, package in EXTRA_MODULES.items():
        if importlib.util.find_spec(module) is None:
            return package
    return None


def _decode(data: bytes) -> str:
    if b"\x00" in data[:4096]:
        raise Unreadable("binary content, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Old Windows exports are the usual non-UTF-8 text; cp1252 leaves a few bytes undefined.
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            raise Unreadable("not UTF-8 or cp1252 text") from None


def read_text(path: Path) -> list[str]:
    # A form feed is a page break in plain-text exports; pages let repeated headers be found.
    return _decode(path.read_bytes()).split("\f")


_BLOCKS = ("p", "div", "section", "article", "li", "tr", "pre", "blockquote", "dt", "dd", "table", "ul", "ol",
           "br", "hr", "figcaption", "caption")
# Page furniture and code, not document text.
_DROPPED = ("script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "svg", "head")


def read_html(path: Path) -> list[str]:
    from bs4 import BeautifulSoup

    html = _decode(path.read_bytes())
    soup = BeautifulSoup(html, _html_parser())
    for tag in soup.find_all(_DROPPED):
        tag.decompose()
    for level in range(1, 7):
        for tag in soup.find_all(f"h{level}"):
            tag.insert_before(f"\n\n{'#' * level} ")
            tag.insert_after("\n\n")
    for tag in soup.find_all(_BLOCKS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    for cell in soup.find_all(("td", "th")):
        cell.insert_after(" ")
    # Inline elements join without a separator (as a browser shows them); blocks got blank lines above.
    return [soup.get_text()]


def _html_parser() -> str:
    import importlib.util

    return "lxml" if importlib.util.find_spec("lxml") is not None else "html.parser"


def read_pdf(path: Path) -> list[str]:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a damaged file is reported once, by us
    try:
        reader = pypdf.PdfReader(str(path))
        if reader.is_encrypted:
            # Many PDFs are encrypted with an empty user password and open anyway; AES needs a crypto
            # library pypdf may not find (DependencyError).
            try:
                if not reader.decrypt(""):
                    raise Unreadable("encrypted (needs a password)")
            except (FileNotDecryptedError, NotImplementedError, DependencyError) as err:
                raise Unreadable(f"encrypted ({_first_line(err)})") from None
        # Layout mode keeps vertical gaps as blank lines: the paragraph breaks plain mode loses.
        return [page.extract_text(extraction_mode="layout") or "" for page in reader.pages]
    except Unreadable:
        raise
    except FileNotDecryptedError:
        raise Unreadable("encrypted (needs a password)") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError,
            RecursionError, AssertionError) as err:
        raise Unreadable(f"not a readable PDF ({_first_line(err)})") from None


def read_docx(path: Path) -> list[str]:
    import docx
    from docx.table import Table

    try:
        document = docx.Document(str(path))
    except Exception as err:  # noqa: BLE001 - python-docx raises zip, XML and key errors on bad files
        raise Unreadable(f"not a readable .docx ({_first_line(err)})") from None
    parts = []
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            parts.extend(" ".join(cell.text for cell in row.cells) for row in block.rows)
            continue
        text = block.text
        # The style id ("Heading2", "Title") straight from the paragraph's XML: python-docx's public
        # `style` looks the style up in the styles part, which costs milliseconds per paragraph.
        style = block._p.style or ""
        level = "1" if style == "Title" else style[len("Heading"):] if style.startswith("Heading") else ""
        parts.append(f"{'#' * int(level)} {text}" if level.isdigit() and text.strip() else text)
    return ["\n\n".join(parts)]


READERS: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    ".txt": ("txt", read_text), ".text": ("txt", read_text), ".md": ("md", read_text),
    ".markdown": ("md", read_text), ".html": ("html", read_html), ".htm": ("html", read_html),
    ".pdf": ("pdf", read_pdf), ".docx": ("docx", read_docx),
}
SUPPORTED = tuple(READERS) + (".jsonl",)


def read_file(path: Path, source: str, text_field: str) -> Iterator[RawDocument | tuple[str, str]]:
    """The documents in one file: RawDocuments, or (source, reason) for what could not be read.

    A .jsonl file is one document per row (its `text_field`); every other file is one document.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, source, text_field)
        return
    if suffix not in READERS:
        yield source, f"unsupported file type '{suffix or path.name}' (supported: {', '.join(SUPPORTED)})"
        return
    kind, reader = READERS[suffix]
    try:
        size = path.stat().st_size
        pages = reader(path)
    except Unreadable as err:
        yield source, str(err)
        return
    except OSError as err:
        yield source, f"cannot read ({_first_line(err)})"
        return
    yield RawDocument(source, kind, pages, size)


def _read_jsonl(path: Path, source: str, text_field: str) -> Iterator[RawDocument | tuple[str, str]]:
    try:
        handle = path.open("rb")
    except OSError as err:
        yield source, f"cannot read ({_first_line(err)})"
        return
    with handle:
        for number, line in enumerate(handle, 1):  # one row at a time: large exports stay out of memory
            if not line.strip():
                continue
            where = f"{source}#row{number}"
            try:
                row = json.loads(line)
            except ValueError:
                yield where, "not a JSON object"
                continue
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                yield where, f"no string field '{text_field}' (set documents.text_field)"
                continue
            yield RawDocument(where, "jsonl", [text], len(line))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
