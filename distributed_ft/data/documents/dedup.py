"""Exact and near-duplicate detection for documents and paragraphs (MinHash + LSH from datasketch).

One index serves a whole run: held-out documents are added first, so a training document or paragraph
that repeats held-out text is found and left out. Each entry remembers whether it is held out, so the
caller can tell a plain duplicate from held-out overlap. Each entry costs a 16-byte digest and, for
texts long enough for MinHash, 128 32-bit hash values plus its LSH band keys: no text is kept.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

NUM_PERM = 128
# Paragraphs with fewer words than this are left alone: short lines ("Overview", "Thank you.") repeat
# legitimately, and their shingles are too few for MinHash anyway.
MIN_WORDS = 8
SHINGLE = {"document": 5, "paragraph": 3}
# Templated paragraphs that differ in a name or a number ("Project X has the code A.") are facts, not
# copies: paragraphs need a higher similarity than documents to count as near-duplicates.
PARAGRAPH_FLOOR = 0.9
_WORDS = re.compile(r"\w+")


class DuplicateIndex:
    def __init__(self, threshold: float):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self._thresholds = {"document": threshold, "paragraph": max(threshold, PARAGRAPH_FLOOR)}
        self._template = MinHash(num_perm=NUM_PERM)
        self._minhash = MinHash
        self._lsh = {level: MinHashLSH(threshold=t, num_perm=NUM_PERM) for level, t in self._thresholds.items()}
        self._exact: dict[str, dict[bytes, bool]] = {level: {} for level in SHINGLE}
        self._signatures: dict[str, dict[int, tuple[np.ndarray, bool]]] = {level: {} for level in SHINGLE}

    def check(self, level: str, text: str, *, held_out: bool) -> str | None:
        """None if `text` is new (it is then added); else what it repeats: 'exact' or 'near' (a duplicate
        of text already kept) or 'held_out' (text of a held-out document)."""
        words = _WORDS.findall(text.lower())
        if level == "paragraph" and len(words) < MIN_WORDS:
            return None
        digest = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
        exact = self._exact[level]
        if digest in exact:
            return _verdict(exact[digest], "exact")
        signature = None
        if len(words) >= MIN_WORDS:
            signature = self._signature(words, SHINGLE[level])
            match = self._near(level, signature)
            if match is not None:
                return _verdict(match, "near")
        exact[digest] = held_out
        if signature is not None:
            key = len(self._signatures[level])
            self._signatures[level][key] = (signature.hashvalues.copy(), held_out)
            self._lsh[level].insert(key, signature)
        return None

    def _signature(self, words: list[str], size: int):
        shingles = {" ".join(words[i:i + size]).encode() for i in range(max(1, len(words) - size + 1))}
        m = self._minhash(num_perm=NUM_PERM, permutations=self._template.permutations,
                          **({"scheme": self._template.scheme} if hasattr(self._template, "scheme") else {}))
        m.update_batch(list(shingles))
        return m

    def _near(self, level: str, signature) -> bool | None:
        # LSH gives candidates; the estimated Jaccard similarity decides (fewer false positives).
        best = None
        for key in self._lsh[level].query(signature):
            values, held_out = self._signatures[level][key]
            if float(np.mean(values == signature.hashvalues)) >= self._thresholds[level]:
                best = held_out if best is None else (best or held_out)
        return best


def _verdict(held_out: bool, how: str) -> str:
    return "held_out" if held_out else how
