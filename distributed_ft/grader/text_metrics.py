"""Text-similarity metrics for `text_similarity` graders, each a float computed by the field's library.

fuzzy_match: rapidfuzz ratio / 100.  bleu: sacrebleu sentence BLEU / 100.  rouge_N / rouge_l: rouge-score F-measure.
gleu: sentence-level Google-BLEU (Wu et al. 2016) written here, because none of the installed metric libraries
ships it: min(n-gram precision, n-gram recall) over all 1..4-grams, on sacrebleu's 13a tokens.
cosine: see `hf_models.Embedder`.
Large batches are split over a pool of metric processes, since these pure-Python metrics are CPU-bound.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from typing import Callable

MIN_PER_PROCESS = 16  # smaller batches are scored in-process: inter-process traffic would cost more
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()

from rapidfuzz import fuzz
_ROUGE_TYPES = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}


def fuzzy_match(hyp: str, ref: str) -> float:
    return fuzz.ratio(hyp, ref) / 100.0


@lru_cache(maxsize=None)
def _bleu():
    from sacrebleu.metrics import BLEU  # imported on first use: metric libraries are slow to import

    return BLEU(effective_order=True)


@lru_cache(maxsize=None)
def _tokenize_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def bleu(hyp: str, ref: str) -> float:
    return _bleu().sentence_score(hyp, [ref]).score / 100.0


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def gleu(hyp: str, ref: str, min_n: int = 1, max_n: int = 4) -> float:
    tokenize = _tokenize_13a()
    hyp_tokens, ref_tokens = tokenize(hyp).split(), tokenize(ref).split()
    hyp_ngrams = Counter({k: v for k, v in _ngrams(hyp_tokens, max_n).items() if len(k) >= min_n})
    ref_ngrams = Counter({k: v for k, v in _ngrams(ref_tokens, max_n).items() if len(k) >= min_n})
    total = max(sum(hyp_ngrams.values()), sum(ref_ngrams.values()))
    if total == 0:
        return 0.0
    return sum((hyp_ngrams & ref_ngrams).values()) / total


@lru_cache(maxsize=None)
def _rouge(kind: str):
    from rouge_score import rouge_scorer  # pulls in nltk and scipy: only when a rouge metric is used

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


def rouge(kind: str) -> Callable[[str, str], float]:
    rouge_type = _ROUGE_TYPES[kind]

    def score(hyp: str, ref: str) -> float:
        return _rouge(rouge_type).score(ref, hyp)[rouge_type].fmeasure

    return score


def pairwise_metric(name: str) -> Callable[[str, str], float]:
    """The function for a non-embedding metric name (its library loaded now); KeyError for unknown names."""
    if name in _ROUGE_TYPES:
        _rouge(_ROUGE_TYPES[name])
        return rouge(name)
    if name == "bleu":
        _bleu()
    elif name == "gleu":
        _tokenize_13a()
    return {"fuzzy_match": fuzzy_match, "bleu": bleu, "gleu": gleu}[name]


def _score_chunk(name: str, hyps: list[str], refs: list[str]) -> list[float]:
    metric = pairwise_metric(name)
    return [metric(h, r) for h, r in zip(hyps, refs)]


def default_processes() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _get_pool(processes: int, name: str) -> ProcessPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < processes:
            if _pool is not None:
                _pool.shutdown(wait=False)
            # forkserver: the server process has threads, and fork() with threads is unsafe
            ctx = multiprocessing.get_context("forkserver")
            _pool, _pool_size = ProcessPoolExecutor(max_workers=processes, mp_context=ctx), processes
        return _pool


def score_many(name: str, hyps: list[str], refs: list[str], processes: int = 1) -> list[float]:
    """`name` for each (hyp, ref) pair; batches of at least 2 * MIN_PER_PROCESS use `processes` processes."""
    parts = min(processes, len(hyps) // MIN_PER_PROCESS)
    if parts <= 1:
        return _score_chunk(name, hyps, refs)
    pool = _get_pool(processes, name)
    step = -(-len(hyps) // parts)
    futures = [pool.submit(_score_chunk, name, hyps[i:i + step], refs[i:i + step])
               for i in range(0, len(hyps), step)]
    return [score for future in futures for score in future.result()]
