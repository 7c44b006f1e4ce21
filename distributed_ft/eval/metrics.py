"""Metric registry and metric computation (accuracy, F1, MSE, MAE, BLEU, ROUGE, exact match, token F1,
abstention, perplexity).

Each metric maps predictions and references to corpus scores plus, where meaningful, per-sample scores.
BLEU comes from sacrebleu (0-100 scale, with its signature string), ROUGE from rouge-score (F-measure,
0-1 scale, averaged over samples); the rest are simple enough to compute here.
"""
from __future__ import annotations

import difflib
import functools
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from distributed_ft.errors import EvalError
from distributed_ft.tasks import KINDS as TASK_TYPES
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# What counts as declining to answer, besides the reference itself (the abstain answer a QA file gives).
DEFAULT_ABSTAIN_PHRASES = ("the documents do not say", "i don't know", "i do not know", "not stated",
                           "no information", "cannot be answered", "unknown")


@dataclass(frozen=True)
class MetricOptions:
    rouge_stemmer: bool = True
    normalize_exact_match: bool = True
    abstain_phrases: tuple[str, ...] = DEFAULT_ABSTAIN_PHRASES


@dataclass
class MetricOutput:
    """Corpus scores (one metric may give several keys), per-sample scores and library signatures."""

    scores: dict[str, float]
    per_sample: list[dict[str, float]] | None = None
    signatures: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    name: str
    task_types: frozenset[str]
    description: str
    # compute(predictions, references, options) -> MetricOutput; None for metrics that need the model
    # (perplexity), which the evaluation driver computes from a teacher-forced forward pass.
    compute: Callable[[Sequence[Any], Sequence[Any], MetricOptions], MetricOutput] | None


# --- classification --------------------------------------------------------------------------------

def accuracy(predictions: Sequence[Any], references: Sequence[Any], options: MetricOptions) -> MetricOutput:
    hits = [float(p == r) for p, r in zip(predictions, references)]
    return MetricOutput({"accuracy": _mean(hits)}, [{"accuracy": h} for h in hits])


def macro_f1(predictions: Sequence[Any], references: Sequence[Any], options: MetricOptions) -> MetricOutput:
    """Macro-averaged F1 over every label seen in references or predictions (sklearn's default label set)."""
    labels = sorted(set(references) | set(predictions), key=repr)
    f1s = []
    for label in labels:
        tp = sum(1 for p, r in zip(predictions, references) if p == label and r == label)
        fp = sum(1 for p, r in zip(predictions, references) if p == label and r != label)
        fn = sum(1 for p, r in zip(predictions, references) if p != label and r == label)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return MetricOutput({"f1": _mean(f1s)})


# --- regression ------------------------------------------------------------------------------------

def mse(predictions: Sequence[Any], references: Sequence[Any], options: MetricOptions) -> MetricOutput:
    errs = [(float(p) - float(r)) ** 2 for p, r in zip(predictions, references)]
    return MetricOutput({"mse": _mean(errs)}, [{"mse": e} for e in errs])


def mae(predictions: Sequence[Any], references: Sequence[Any], options: MetricOptions) -> MetricOutput:
    errs = [abs(float(p) - float(r)) for p, r in zip(predictions, references)]
    return MetricOutput({"mae": _mean(errs)}, [{"mae": e} for e in errs])


# --- generation ------------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation (any Unicode P* character), collapse whitespace, strip."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return _SPACES.sub(" ", text).strip()


def exact_match(predictions: Sequence[str], references: Sequence[str], options: MetricOptions) -> MetricOutput:
    norm = normalize_text if options.normalize_exact_match else (lambda s: s)
    hits = [float(norm(str(p)) == norm(str(r))) for p, r in zip(predictions, references)]
    return MetricOutput({"exact_match": _mean(hits)}, [{"exact_match": h} for h in hits])


def token_f1(predictions: Sequence[str], references: Sequence[str], options: MetricOptions) -> MetricOutput:
    """SQuAD's answer F1: overlap of the normalised words of prediction and reference, per sample, averaged."""
    per = []
    for p, r in zip(predictions, references):
        pred, ref = normalize_text(str(p)).split(), normalize_text(str(r)).split()
        common = sum(min(pred.count(w), ref.count(w)) for w in set(pred))
        if not pred or not ref:
            per.append(float(pred == ref))
        elif common == 0:
            per.append(0.0)
        else:
            precision, recall = common / len(pred), common / len(ref)
            per.append(2 * precision * recall / (precision + recall))
    return MetricOutput({"token_f1": _mean(per)}, [{"token_f1": f} for f in per])


def abstention(predictions: Sequence[str], references: Sequence[str], options: MetricOptions) -> MetricOutput:
    """For questions the documents do not answer: abstained (the reference or an abstain phrase appears in
    the answer) or hallucinated (any other non-empty answer); an empty answer is neither."""
    phrases = [normalize_text(x) for x in options.abstain_phrases]
    per = []
    for p, r in zip(predictions, references):
        answer = normalize_text(str(p))
        wanted = [normalize_text(str(r))] + phrases
        abstained = bool(answer) and any(x and x in answer for x in wanted)
        per.append({"abstention": float(abstained), "hallucination": float(bool(answer) and not abstained)})
    return MetricOutput({k: _mean([s[k] for s in per]) for k in ("abstention", "hallucination")}, per)


def bleu(predictions: Sequence[str], references: Sequence[str], options: MetricOptions) -> MetricOutput:
    from sacrebleu.metrics import BLEU

    corpus = BLEU()
    score = corpus.corpus_score([str(p) for p in predictions], [[str(r) for r in references]])
    # Sentence BLEU with effective order is sacrebleu's recommended per-sample variant.
    sentence = BLEU(effective_order=True)
    per = [{"bleu": sentence.sentence_score(str(p), [str(r)]).score} for p, r in zip(predictions, references)]
    return MetricOutput({"bleu": score.score}, per, {"bleu": str(corpus.get_signature())})


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    """A RougeScorer whose tokenizer is rouge-score's own, with stems and tokenized texts memoised.

    Porter stemming dominates ROUGE time and evaluation texts repeat the same words (and each text is
    tokenized again for rougeLsum), so caching makes ROUGE several times faster with identical scores.
    """
    from nltk.stem import porter
    from rouge_score import tokenize, tokenizers
    from rouge_score.rouge_scorer import RougeScorer

    class _CachedStemmer:
        def __init__(self) -> None:
            self.stem = functools.lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem)

    class _CachingTokenizer(tokenizers.Tokenizer):
        def __init__(self) -> None:
            stemmer = _CachedStemmer() if use_stemmer else None
            self._tokenize = functools.lru_cache(maxsize=1 << 12)(lambda text: tuple(tokenize.tokenize(text, stemmer)))

        def tokenize(self, text):
            return list(self._tokenize(text))

    return RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer, tokenizer=_CachingTokenizer())


def rouge(predictions: Sequence[str], references: Sequence[str], options: MetricOptions) -> MetricOutput:
    scorer = _rouge_scorer(options.rouge_stemmer)
    per = []
    for p, r in zip(predictions, references):
        result = scorer.score(str(r), str(p))  # rouge-score takes (target, prediction)
        per.append({k: float(result[k].fmeasure) for k in ROUGE_TYPES})
    scores = {k: _mean([s[k] for s in per]) for k in ROUGE_TYPES}
    return MetricOutput(scores, per, {"rouge": rouge_signature(options)})


def rouge_signature(options: MetricOptions) -> str:
    """What a ROUGE number depends on, like sacrebleu's signature: library version, types, stemmer, tokenizer.

    The tokenizer is always rouge-score's default one (lower-cases, keeps only [a-z0-9] runs, so text in
    other scripts scores 0); rouge-score offers no named alternatives, only a custom object, so it is not an option.
    """
    return (f"rouge-score {_package_version('rouge-score')}|types:{','.join(ROUGE_TYPES)}"
            f"|stemmer:{'porter' if options.rouge_stemmer else 'none'}|tokenizer:default")


@functools.lru_cache(maxsize=None)
def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


# --- loss ------------------------------------------------------------------------------------------

def loss_and_perplexity(summed_loss: float, token_count: int) -> dict[str, float]:
    """Mean token loss and its exponent from a loss summed over `token_count` target tokens."""
    if token_count <= 0:
        return {"eval_loss": float("nan"), "perplexity": float("nan")}
    mean = float(summed_loss) / int(token_count)
    return {"eval_loss": mean, "perplexity": math.exp(mean) if mean < 700 else float("inf")}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


_GEN = frozenset({"generation"})
METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", frozenset({"classification"}), "fraction of exact label matches", accuracy),
    "f1": Metric("f1", frozenset({"classification"}), "macro-averaged F1 over labels", macro_f1),
    "mse": Metric("mse", frozenset({"regression"}), "mean squared error", mse),
    "mae": Metric("mae", frozenset({"regression"}), "mean absolute error", mae),
    "bleu": Metric("bleu", _GEN, "sacrebleu corpus BLEU (0-100)", bleu),
    "rouge": Metric("rouge", _GEN, "ROUGE-1/2/L/Lsum F-measure averaged over samples", rouge),
    "exact_match": Metric("exact_match", _GEN, "fraction of predictions equal to the reference", exact_match),
    "token_f1": Metric("token_f1", _GEN, "word-overlap F1 of answer and reference (SQuAD)", token_f1),
    "abstention": Metric("abstention", _GEN, "unanswerable questions: abstention and hallucination rates",
                         abstention),
    "perplexity": Metric("perplexity", _GEN, "exp of the mean reference-token loss (needs the model)", None),
}

DEFAULT_METRICS: dict[str, list[str]] = {
    "generation": ["exact_match", "bleu", "rouge"],
    "classification": ["accuracy", "f1"],
    "regression": ["mse", "mae"],
}


def default_metrics(task_type: str) -> list[str]:
    check_task_type(task_type)
    return list(DEFAULT_METRICS[task_type])


def check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        close = difflib.get_close_matches(str(task_type), TASK_TYPES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise EvalError(f"unknown task type '{task_type}'{hint}; valid: {', '.join(TASK_TYPES)}")


def check_metric_name(name: str) -> Metric:
    if name not in METRICS:
        close = difflib.get_close_matches(str(name), list(METRICS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise EvalError(f"unknown metric '{name}'{hint}; available: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def resolve_metrics(names: Sequence[str] | None, task_type: str, task: str | None = None) -> list[Metric]:
    """Look up metric names (None means the task type's defaults), refusing unknown or unfitting ones."""
    check_task_type(task_type)
    resolved = []
    for name in (default_metrics(task_type) if names is None else names):
        metric = check_metric_name(name)
        if task_type not in metric.task_types:
            where = f" (task '{task}')" if task else ""
            raise EvalError(f"metric '{name}' does not fit task type '{task_type}'{where}; "
                            f"it fits: {', '.join(sorted(metric.task_types))}")
        if metric not in resolved:
            resolved.append(metric)
    return resolved


def compute_metrics(names: Sequence[str] | None, predictions: Sequence[Any], references: Sequence[Any],
                    task_type: str, options: MetricOptions | None = None) -> MetricOutput:
    """Compute every named metric that works from predictions alone; merge scores and per-sample scores."""
    if len(predictions) != len(references):
        raise EvalError(f"{len(predictions)} predictions but {len(references)} references")
    options = options or MetricOptions()
    merged = MetricOutput({}, [{} for _ in predictions])
    for metric in resolve_metrics(names, task_type):
        if metric.compute is None:
            continue
        out = metric.compute(predictions, references, options)
        merged.scores.update(out.scores)
        merged.signatures.update(out.signatures)
        for row, extra in zip(merged.per_sample, out.per_sample or ()):
            row.update(extra)
    return merged
