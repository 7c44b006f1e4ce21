"""HTTP grading service (FastAPI on uvicorn): POST /grade, POST /validate, GET /health.

Binds to loopback by default.  When DFT_GRADER_TOKEN is set every request must carry
`Authorization: Bearer <token>`; listening on any other host is refused unless it is set.
uvicorn handles SIGTERM/SIGINT by finishing in-flight requests; sandbox workers are then stopped.

What one request may cost is bounded (`ServerLimits`, set by `dft grader serve` options), checked in this
order before the endpoint runs, each refusal a JSON `{"error": ...}` naming the limit and its option:
token (401) -> Content-Length over the body limit (413, nothing read) -> a slot among `max_concurrent`
requests with a body (waits up to `queue_timeout_s` for one, then 503 with Retry-After) -> the body, read
in chunks as it arrives: over the body limit while streaming (413, chunked bodies included, so an
oversized body is never held whole) or not complete within `body_timeout_s` (408).  These refusals close
the connection.  POST /grade then refuses an entry whose sample or item JSON is over `max_item_bytes`
(413 with its `index`).  GET requests (/health) take no slot, so health stays answerable under load.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from distributed_ft.errors import ConfigError
from distributed_ft.grader import TOKEN_ENV
from distributed_ft.grader.engine import Grader, build_grader, grade_entries
from distributed_ft.grader.spec import load_grader_spec, parse_grader_spec

log = logging.getLogger("distributed_ft.grader.server")
MAX_ITEMS_PER_REQUEST = 100_000
WARN_EVERY_S = 10.0
MiB = 1 << 20
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request may cost; each refusal names the limit and the serve option setting it."""

    max_body_bytes: int = 32 * MiB     # --max-body-bytes: a request body, from Content-Length or while streaming
    max_item_bytes: int = 1 * MiB      # --max-item-bytes: the JSON of one entry's sample, or of its item
    max_concurrent: int = 64           # --max-concurrent: requests with a body being read or graded at once
    queue_timeout_s: float = 10.0      # --queue-timeout: wait for a slot this long, then 503 (0: refuse at once)
    body_timeout_s: float = 30.0       # --body-timeout: the whole body must arrive within this, else 408
    keep_alive_s: float = 5.0          # --keep-alive-timeout: idle keep-alive connections close after this

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_item_bytes", "max_concurrent"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"grader server limit {name} must be at least 1, got {getattr(self, name)}")
        for name in ("body_timeout_s", "keep_alive_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"grader server limit {name} must be positive, got {getattr(self, name)}")
        if not float(self.queue_timeout_s) >= 0:
            raise ConfigError(f"grader server limit queue_timeout_s must be >= 0, got {self.queue_timeout_s}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Stats:
    """Request/sample/error counters and a rolling window of request latencies."""

    def __init__(self, window: int = 4096):
        self._lock = threading.Lock()
        self.requests = self.samples = self.unscorable = self.bad_requests = self.busy = 0
        self.in_flight = 0  # requests holding a slot (set by the limits middleware, on the event loop)
        self._latency_ms: deque[float] = deque(maxlen=window)
        self.started = time.time()

    def record(self, samples: int, unscorable: int, latency_ms: float) -> None:
        with self._lock:
            self.requests += 1
            self.samples += samples
            self.unscorable += unscorable
            self._latency_ms.append(latency_ms)

    def bad_request(self) -> None:
        with self._lock:
            self.bad_requests += 1

    def refused_busy(self) -> None:
        with self._lock:
            self.busy += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self._latency_ms)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
        return {"requests": self.requests, "samples": self.samples, "unscorable": self.unscorable,
                "bad_requests": self.bad_requests, "busy": self.busy, "in_flight": self.in_flight,
                "latency_ms": {"p50": pick(0.5), "p99": pick(0.99)},
                "uptime_s": round(time.time() - self.started, 1)}


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LimitsMiddleware:
    """Plain ASGI middleware: the token, the body size and read deadline, and the concurrency bound."""

    def __init__(self, app, limits: ServerLimits, stats: Stats, expected_auth: bytes | None):
        self.app, self.limits, self.stats, self.expected = app, limits, stats, expected_auth
        self._slots = asyncio.Semaphore(limits.max_concurrent)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if self.expected is not None:
            given = next((v for k, v in headers if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                await self._refuse(send, 401, "missing or wrong bearer token")
                return
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await self._drain(receive, headers, 0, int(length), self._deadline())
            await self._refuse(send, 413, f"request body of {int(length)} bytes is over the limit of {limit} "
                                          "bytes (--max-body-bytes)")
            return
        if not await self._enter():
            self.stats.refused_busy()
            await self._refuse(send, 503, f"server busy: {self.limits.max_concurrent} requests already in flight "
                                          f"(--max-concurrent), none finished within {self.limits.queue_timeout_s:g}s "
                                          "(--queue-timeout); retry later", busy=True)
            return
        self.stats.in_flight += 1
        try:
            deadline = self._deadline()
            try:
                body = await self._read_body(receive, deadline)
            except _Refused as err:
                if err.status == 413:
                    await self._drain(receive, headers, self.limits.max_body_bytes, None, deadline)
                await self._refuse(send, err.status, err.message)
                return
            if body is None:  # the client went away
                return
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.stats.in_flight -= 1
            self._slots.release()

    async def _enter(self) -> bool:
        if not self._slots.locked():
            await self._slots.acquire()  # free slot: returns at once
            return True
        if self.limits.queue_timeout_s <= 0:
            return False
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.queue_timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.limits.body_timeout_s

    async def _read_body(self, receive, deadline: float) -> bytes | None:
        """The whole body, refused (413) as soon as it grows over the limit or (408) when it arrives too late."""
        loop = asyncio.get_running_loop()
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _Refused(408, f"request body not received within {self.limits.body_timeout_s:g}s "
                                    f"(--body-timeout; {size} bytes arrived)") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise _Refused(413, f"request body is over the limit of {self.limits.max_body_bytes} bytes "
                                    "(--max-body-bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _drain(self, receive, headers, size: int, announced: int | None, deadline: float) -> None:
        """Read and drop the rest of a refused body (up to twice the limit, until `deadline`), keeping nothing.

        Closing a connection whose client is still sending makes the kernel reset it, and the client may then lose
        the refusal it has not read yet (httpx reports "server disconnected"; our client would retry).  Skipped for
        bodies announced over twice the limit, and for clients waiting for 100-continue (they send nothing yet).
        """
        cap = 2 * self.limits.max_body_bytes
        if (announced is not None and announced > cap) or any(k == b"expect" for k, _ in headers):
            return
        loop = asyncio.get_running_loop()
        while size <= cap:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send, status: int, message: str, busy: bool = False) -> None:
        if not busy:
            self.stats.bad_request()
        payload = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]  # the body may be unread: this connection cannot be reused
        if busy:
            headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _oversized_entry(items: list[Any], limit: int) -> tuple[int, str, int] | None:
    """(index, 'sample' or 'item', JSON size in bytes) of the first entry part over `limit`, or None."""
    for i, entry in enumerate(items):
        if not isinstance(entry, dict):
            continue  # malformed: unscorable anyway, and bounded by the body limit
        for part in ("sample", "item"):
            value = entry.get(part)
            if value is None:
                continue
            size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
            if size > limit:
                return i, part, size
    return None


def create_app(grader: Grader, token: str | None = None, grader_type: str = "", workers: int = 4,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI application serving `grader` within `limits` (ServerLimits() defaults when None)."""
    limits = limits or ServerLimits()
    app = FastAPI(title="distributed_ft grader", docs_url=None, redoc_url=None, openapi_url=None)
    stats = Stats()
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grade")
    expected = f"Bearer {token}".encode() if token else None
    app.state.stats, app.state.grader, app.state.executor, app.state.limits = stats, grader, executor, limits
    app.add_middleware(LimitsMiddleware, limits=limits, stats=stats, expected_auth=expected)
    last_warning = [-1e9]

    def _error(status: int, message: str, **extra: Any) -> JSONResponse:
        stats.bad_request()
        return JSONResponse({"error": message, **extra}, status_code=status)

    async def _json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError as err:
            raise ValueError(f"request body is not valid JSON ({err})") from None

    @app.post("/grade")
    async def grade(request: Request):
        start = time.perf_counter()
        try:
            body = await _json_body(request)
        except ValueError as err:
            return _error(400, str(err))
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            return _error(400, "request body must be {\"items\": [{\"sample\": ..., \"item\": ...}, ...]}")
        extra = sorted(set(body) - {"items"})
        if extra:
            return _error(400, f"unknown key '{extra[0]}' in request (the grader is fixed by the server config)")
        items = body["items"]
        if len(items) > MAX_ITEMS_PER_REQUEST:
            return _error(413, f"too many items ({len(items)} > {MAX_ITEMS_PER_REQUEST})")
        oversized = _oversized_entry(items, limits.max_item_bytes)
        if oversized is not None:
            index, part, size = oversized
            return _error(413, f"items[{index}].{part} is {size} bytes of JSON, over the per-item limit of "
                               f"{limits.max_item_bytes} bytes (--max-item-bytes)", index=index)
        results = await asyncio.get_running_loop().run_in_executor(executor, grade_entries, grader, items)
        latency_ms = (time.perf_counter() - start) * 1000
        bad = [r for r in results if r.reward is None]
        stats.record(len(results), len(bad), latency_ms)
        if bad and time.monotonic() - last_warning[0] > WARN_EVERY_S:  # rate-limited: training sends many
            last_warning[0] = time.monotonic()
            log.warning("graded %d samples, %d unscorable (first: %s) in %.1f ms",
                        len(results), len(bad), bad[0].error, latency_ms)
        else:
            log.debug("graded %d samples (%d unscorable) in %.1f ms", len(results), len(bad), latency_ms)
        if stats.requests % 500 == 0:
            log.info("grader stats %s", stats.snapshot())
        return JSONResponse({"results": [r.to_dict() for r in results]})

    @app.post("/validate")
    async def validate(request: Request):
        try:
            body = await _json_body(request)
            parse_grader_spec(body, "request")
        except (ValueError, ConfigError) as err:
            return JSONResponse({"ok": False, "error": str(err)})
        return JSONResponse({"ok": True, "error": None})

    @app.get("/health")
    async def health():
        return JSONResponse({"ready": grader.ready(), "grader": grader.name, "type": grader_type,
                             **stats.snapshot()})

    return app


def serve(config_path: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          limits: ServerLimits | None = None) -> None:
    """Load the grader in `config_path` and serve it within `limits` until SIGTERM/SIGINT."""
    import uvicorn

    limits = limits or ServerLimits()

    token = os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and token is None:
        raise ConfigError(f"refusing to listen on non-loopback host '{host}' without {TOKEN_ENV} set "
                          "(clients must then send it as a bearer token)")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = load_grader_spec(config_path)
    grader = build_grader(spec)
    app = None
    try:
        app = create_app(grader, token, spec.type, limits=limits)
        log.info("grader '%s' (%s) ready on http://%s:%d%s", grader.name, spec.type, host, port,
                 " (bearer token required)" if token else "")
        log.info("request limits: %s", limits)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=30, timeout_keep_alive=limits.keep_alive_s)
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with these no-op handlers that
        # re-raise returns here, so the sandbox workers and their folders are cleaned up below.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        uvicorn.Server(config).run()
    finally:
        if app is not None:
            log.info("grader stopped after %s", app.state.stats.snapshot())
            app.state.executor.shutdown(wait=False, cancel_futures=True)
        grader.close()
