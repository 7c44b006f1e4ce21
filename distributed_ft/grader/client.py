"""Training-side client of the grading service: batched async requests over several servers.

Requests go round robin over the URLs, skipping a URL for `cooldown_s` after it failed (so a restarted server is
picked up again afterwards); each request has a timeout and is retried with exponential backoff on another URL.
Samples whose request finally fails come back unscorable (reward None) with the reason, never as 0.
Retried: transport errors, timeouts, 5xx, 408 and 429 (a 503 "busy" waits at least its Retry-After first).
Not retried: other 4xx, e.g. 413 (body or one entry over the server's size limits) or 422: the samples of that
request come back unscorable with the server's message.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, Iterable

import httpx

from distributed_ft.errors import DftError
from distributed_ft.grader import TOKEN_ENV
from distributed_ft.grader.results import GradeResult

RETRYABLE_STATUS = frozenset({408, 429})  # and every 5xx
MAX_RETRY_AFTER_S = 30.0


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(resp.headers.get("retry-after", 0))))
    except ValueError:  # an HTTP date: not sent by our server
        return 0.0


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]


class GraderUnavailable(DftError):
    """No grading server became healthy, or too many samples could not be scored."""


class GraderClient:
    """Client for one or more grader servers (`grade` blocks, `agrade` is the coroutine).

    `token` defaults to $DFT_GRADER_TOKEN.  Not thread-safe; use one client per training process.
    """

    def __init__(self, urls: list[str] | str, timeout_s: float = 60.0, max_retries: int = 2, backoff_s: float = 0.5,
                 token: str | None = None, batch_size: int = 64, max_concurrency: int = 8, cooldown_s: float = 5.0):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise DftError("GraderClient needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.batch_size, self.max_concurrency, self.cooldown_s = batch_size, max_concurrency, cooldown_s
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._rr = itertools.count()
        self._failed_at: dict[str, float] = {}
        self.samples = 0
        self.unscorable = 0

    # -- server choice -------------------------------------------------------------------------------------------
    def _pick(self, avoid: str | None = None) -> str:
        """Next URL in round-robin order that has not failed recently; the longest-failed one if all have."""
        now = time.monotonic()
        n = len(self.urls)
        start = next(self._rr)
        order = [self.urls[(start + k) % n] for k in range(n)]
        healthy = [u for u in order if now - self._failed_at.get(u, -1e18) >= self.cooldown_s]
        preferred = [u for u in healthy if u != avoid] or healthy
        if preferred:
            return preferred[0]
        return min(order, key=lambda u: (u == avoid and n > 1, self._failed_at.get(u, 0.0)))

    def _mark(self, url: str, ok: bool) -> None:
        if ok:
            self._failed_at.pop(url, None)
        else:
            self._failed_at[url] = time.monotonic()

    # -- grading -------------------------------------------------------------------------------------------------
    @staticmethod
    def _entry(entry: Any) -> dict:
        if isinstance(entry, tuple) and len(entry) == 2:
            sample, item = entry
            return {"sample": {"output_text": sample} if isinstance(sample, str) else sample, "item": item}
        return entry

    async def _post_batch(self, http: httpx.AsyncClient, entries: list[dict]) -> list[GradeResult]:
        last_error = "no attempt"
        url = None
        wait_at_least = 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(max(wait_at_least, self.backoff_s * 2 ** (attempt - 1)))
                wait_at_least = 0.0
            url = self._pick(avoid=url)
            try:
                resp = await http.post(f"{url}/grade", json={"items": entries}, headers=self._headers,
                                       timeout=self.timeout_s)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                last_error = f"{url}: {type(err).__name__}: {err or 'timed out'}"
                self._mark(url, ok=False)
                continue
            if resp.status_code >= 500 or resp.status_code in RETRYABLE_STATUS:
                last_error = f"{url}: HTTP {resp.status_code}: {_detail(resp)}"
                wait_at_least = _retry_after(resp)
                self._mark(url, ok=False)
                continue
            self._mark(url, ok=True)
            if resp.status_code != 200:  # the request itself is wrong (e.g. 413, 422): retrying will not help
                return [GradeResult.failed(f"grader refused the request: HTTP {resp.status_code}: {_detail(resp)}")
                        for _ in entries]
            try:
                results = resp.json()["results"]
                if not isinstance(results, list) or len(results) != len(entries):
                    raise ValueError("wrong number of results")
                return [GradeResult.from_dict(r) for r in results]
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                last_error = f"{url}: malformed response ({err})"
                self._mark(url, ok=False)
        return [GradeResult.failed(f"grader unreachable after {self.max_retries + 1} attempts ({last_error})")
                for _ in entries]

    async def agrade(self, batch: Iterable[Any]) -> list[GradeResult]:
        """Grade entries ({"sample": {...}, "item": {...}} or (output_text | sample, item) tuples), in order."""
        entries = [self._entry(e) for e in batch]
        chunks = [entries[i:i + self.batch_size] for i in range(0, len(entries), self.batch_size)]
        gate = asyncio.Semaphore(self.max_concurrency)

        async def run(http: httpx.AsyncClient, chunk: list[dict]) -> list[GradeResult]:
            async with gate:
                return await self._post_batch(http, chunk)

        async with httpx.AsyncClient() as http:
            parts = await asyncio.gather(*(run(http, c) for c in chunks))
        results = [r for part in parts for r in part]
        self.samples += len(results)
        self.unscorable += sum(r.reward is None for r in results)
        return results

    def grade(self, batch: Iterable[Any]) -> list[GradeResult]:
        """Blocking form of `agrade` (not for use inside a running event loop)."""
        return asyncio.run(self.agrade(batch))

    # -- health and statistics -----------------------------------------------------------------------------------
    async def ahealth(self) -> dict[str, dict | str]:
        """/health of every URL (or the error text for URLs that did not answer)."""
        async with httpx.AsyncClient(timeout=min(self.timeout_s, 5.0)) as http:
            async def one(url: str):
                try:
                    resp = await http.get(f"{url}/health", headers=self._headers)
                    resp.raise_for_status()
                    return resp.json()
                except (httpx.HTTPError, ValueError) as err:
                    return f"{type(err).__name__}: {err}"
            answers = await asyncio.gather(*(one(u) for u in self.urls))
        return dict(zip(self.urls, answers))

    def wait_healthy(self, timeout_s: float = 120.0, require_all: bool = False, poll_s: float = 0.2) -> dict:
        """Block until one (or every) server reports ready; GraderUnavailable after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            health = asyncio.run(self.ahealth())
            ready = [u for u, h in health.items() if isinstance(h, dict) and h.get("ready")]
            if ready and (not require_all or len(ready) == len(self.urls)):
                for url in ready:
                    self._mark(url, ok=True)
                return health
            if time.monotonic() >= deadline:
                raise GraderUnavailable(f"grader not ready after {timeout_s:g}s: "
                                        + "; ".join(f"{u}: {h if isinstance(h, str) else 'not ready'}"
                                                    for u, h in health.items() if u not in ready))
            time.sleep(poll_s)

    @property
    def unscorable_rate(self) -> float:
        return self.unscorable / self.samples if self.samples else 0.0

    def raise_if_unscorable_above(self, threshold: float) -> None:
        """Raise GraderUnavailable when the share of unscorable samples so far exceeds `threshold`."""
        if self.samples and self.unscorable_rate > threshold:
            raise GraderUnavailable(f"{self.unscorable}/{self.samples} samples unscorable "
                                    f"({self.unscorable_rate:.1%} > {threshold:.1%})")
