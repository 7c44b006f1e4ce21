"""Cleaning one document's pages: text normalisation, header/footer removal and paragraph blocks.

Each function returns what it removed or changed as a count, so nothing disappears unreported.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

# A word broken at a line end ("knowl-\nedge"); only joined when the next part starts lower-case, so
# "Jean-\nPierre" and "2024-\n2025" keep their hyphen.
_HYPHENATED = re.compile(r"([^\W\d_])-\n[ \t]*([a-z])")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f\u3000]+")
_LIST_ITEM = re.compile(r"^([-*+\u2022]|\d+[.)])\s")
_HEADING = re.compile(r"^#{1,6} ")
_DIGITS = re.compile(r"\d+")
# How many lines at the top and the bottom of a page may be a header or footer.
EDGE_LINES = 3
SHORT_LINE_WORDS = 8


@dataclass
class Block:
    text: str
    heading: bool
    page: int          # 0-based page the block starts on


def normalise_page(text: str) -> tuple[str, int]:
    """NFKC (ligatures, full-width forms), one kind of space and newline, soft hyphens out, words broken
    at line ends joined; returns (text, hyphenations joined). Line structure is kept for what follows."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\u00ad", "")
    text, joined = _HYPHENATED.subn(r"\1\2", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return "\n".join(lines), joined


def _keys(line: str) -> set[str]:
    """What makes a line the same on two pages: its text, or for a short line (a page number, "Page 3
    of 9") its text with digits masked. Long lines keep their digits, so templated text ("Finding 2: the
    archive holds 14 boxes") is never taken for a footer."""
    keys = {line}
    if len(line.split()) <= SHORT_LINE_WORDS:
        keys.add("\0" + _DIGITS.sub("#", line.lower()))
    return keys


def strip_boilerplate(pages: list[str], fraction: float) -> tuple[list[str], int]:
    """Drop lines near the top or bottom of a page that recur there on most pages (headers, footers,
    page numbers); returns (pages, lines removed). Documents of one page have none."""
    if len(pages) < 2:
        return pages, 0
    split = [page.split("\n") for page in pages]
    edges = []
    for lines in split:
        idx = [i for i, line in enumerate(lines) if line]
        edges.append(set(idx[:EDGE_LINES] + idx[-EDGE_LINES:]))
    counts: dict[str, int] = {}
    for lines, edge in zip(split, edges):
        for key in set().union(*(_keys(lines[i]) for i in edge)):
            counts[key] = counts.get(key, 0) + 1
    needed = max(2, math.ceil(fraction * len(pages)))
    repeated = {key for key, n in counts.items() if n >= needed}
    if not repeated:
        return pages, 0
    out, removed = [], 0
    for lines, edge in zip(split, edges):
        kept = [line for i, line in enumerate(lines) if not (i in edge and _keys(line) & repeated)]
        removed += len(lines) - len(kept)
        out.append("\n".join(kept))
    return out, removed


def blocks(pages: list[str]) -> list[Block]:
    """Paragraphs and headings in reading order. Lines of one paragraph are joined with a space (a PDF's
    line wrapping) unless a line is a heading or a list item; a paragraph cut by a page break is rejoined."""
    out: list[Block] = []
    for number, page in enumerate(pages):
        first_on_page = True
        for para in re.split(r"\n\s*\n", page):
            lines = [line for line in para.split("\n") if line]
            if not lines:
                continue
            current: list[str] = []
            for line in lines:
                if _HEADING.match(line) or (len(lines) == 1 and looks_like_heading(line)):
                    _flush(out, current, number)
                    out.append(Block(line, True, number))
                    current = []
                    continue
                if current and _LIST_ITEM.match(line):
                    current[-1] += "\n" + line
                else:
                    current.append(line)
            if current and first_on_page and out and _continues(out[-1], current[0]) and out[-1].page < number:
                out[-1].text += " " + " ".join(current)
                current = []
            first_on_page = False
            _flush(out, current, number)
    return out


def looks_like_heading(line: str) -> bool:
    """A short line standing alone, capitalised, without closing punctuation: a heading in a text or PDF
    file, which has no heading marks. It only decides where chunks may start; the text is kept as is."""
    words = line.split()
    return 0 < len(words) <= 8 and line[:1].isupper() and not line.rstrip().endswith((".", ",", ";", "!", "?", ":"))


def _flush(out: list[Block], lines: list[str], page: int) -> None:
    if lines:
        out.append(Block(" ".join(lines), False, page))
        lines.clear()


def _continues(previous: Block, line: str) -> bool:
    return not previous.heading and not previous.text.rstrip().endswith((".", "!", "?", ":", ";", '"', ")")) \
        and line[:1].islower()
