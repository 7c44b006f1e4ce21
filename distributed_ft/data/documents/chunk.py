"""Token-aware chunking on paragraph and heading boundaries, with overlap.

A chunk is filled with whole blocks (paragraphs) while they fit in its token budget; a heading always
starts a new chunk, so a section is never glued to the end of the previous one. A chunk that continues
the same section starts with the previous chunk's last sentences (up to `overlap` tokens), so a fact cut
by the boundary is whole in one of them. A block longer than the budget is split at sentence ends, and
a sentence longer than the budget at token boundaries.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from distributed_ft.data.documents.clean import Block

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
SEPARATOR = "\n\n"


@dataclass
class Chunk:
    text: str
    source: str
    index: int            # position of the chunk in its document, from 0
    first_page: int       # 1-based pages the chunk's text comes from
    last_page: int
    section: str          # the heading the chunk sits under ('' before the first heading)
    tokens: int           # tokens of the text alone (no special tokens)

    def position(self) -> dict:
        pages = str(self.first_page) if self.first_page == self.last_page else f"{self.first_page}-{self.last_page}"
        return {"source": self.source, "chunk": self.index, "pages": pages, "section": self.section}


class TokenCounter:
    """Token counts and token-level cuts with one tokenizer, several texts at a time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._backend = backend
        # What joining two blocks with SEPARATOR adds to their token counts.
        self.separator = max(0, self.count([f"a{SEPARATOR}a"])[0] - 2 * self.count(["a"])[0])

    def ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def count(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.ids(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class _Unit:
    text: str
    tokens: int
    heading: bool
    page: int


def chunk_blocks(blocks: list[Block], source: str, counter: TokenCounter, budget: int, overlap: int) -> list[Chunk]:
    """The chunks of one document's blocks; every chunk's text has at most `budget` tokens."""
    units = _units(blocks, counter, budget)
    separator = counter.separator
    chunks: list[Chunk] = []
    current: list[_Unit] = []
    section = ""
    chunk_section = ""

    def close(carry: bool, force: bool = False) -> list[_Unit]:
        """Emit the current chunk; returns the units that start the next one (its overlap)."""
        if not current or (not force and all(u.heading for u in current)):
            return list(current)  # only headings so far: they stay with what follows
        text = SEPARATOR.join(u.text for u in current)
        chunks.append(Chunk(text, source, len(chunks), current[0].page + 1, current[-1].page + 1, chunk_section,
                            sum(u.tokens for u in current) + separator * (len(current) - 1)))
        return _tail(current, counter, overlap) if carry and overlap else []

    for unit in units:
        if unit.heading:
            current = close(carry=False)
            section = unit.text.lstrip("#").strip()
            if not current:
                chunk_section = section
            current.append(unit)
            continue
        size = sum(u.tokens for u in current) + separator * len(current) + unit.tokens
        if current and size > budget:
            if all(u.heading for u in current):  # headings alone, then a block that fills a chunk by itself
                close(carry=False, force=True)
                current = []
            else:
                current = close(carry=True)
                while current and sum(u.tokens for u in current) + separator * len(current) + unit.tokens > budget:
                    current.pop(0)
            chunk_section = section
        if not current:
            chunk_section = section
        current.append(unit)
    close(carry=False, force=True)
    return chunks


def _units(blocks: list[Block], counter: TokenCounter, budget: int) -> list[_Unit]:
    counts = counter.count([b.text for b in blocks])
    out: list[_Unit] = []
    for block, n in zip(blocks, counts):
        if n <= budget:
            out.append(_Unit(block.text, n, block.heading, block.page))
            continue
        for piece in _split_long(block.text, counter, budget):
            out.append(_Unit(piece, counter.count([piece])[0], block.heading, block.page))
    return out


def _split_long(text: str, counter: TokenCounter, budget: int) -> list[str]:
    """Pieces of at most `budget` tokens: whole sentences where they fit, token windows where not."""
    sentences = _SENTENCE_END.split(text)
    pieces: list[str] = []
    current, size = [], 0
    for sentence, n in zip(sentences, counter.count(sentences)):
        if n > budget:
            if current:
                pieces.append(" ".join(current))
                current, size = [], 0
            ids = counter.ids([sentence])[0]
            pieces.extend(counter.decode(ids[i:i + budget]) for i in range(0, len(ids), budget))
            continue
        if current and size + 1 + n > budget:
            pieces.append(" ".join(current))
            current, size = [], 0
        current.append(sentence)
        size += n + (1 if size else 0)
    if current:
        pieces.append(" ".join(current))
    return [p for p in pieces if p]


def _tail(units: list[_Unit], counter: TokenCounter, overlap: int) -> list[_Unit]:
    """The last sentences of a chunk, up to `overlap` tokens, as units that start the next chunk."""
    last = units[-1]
    if last.heading:
        return []
    sentences = _SENTENCE_END.split(last.text)
    counts = counter.count(sentences)
    kept, size = [], 0
    for sentence, n in zip(reversed(sentences), reversed(counts)):
        if size + n > overlap:
            break
        kept.insert(0, sentence)
        size += n + 1
    if not kept:
        return []
    text = " ".join(kept)
    return [_Unit(text, counter.count([text])[0], False, last.page)]
