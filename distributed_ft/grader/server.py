"""HTTP grading service (FastAPI on uvicorn): POST /grade, POST /validate, GET /health.

Binds to loopback by default.  When DFT_GRADER_TOKEN is set every request must carry
`Authorization: Bearer <token>`; listening on any other host is refused unless it is set.
uvicorn handles SIGTERM/SIGINT by finishing in-flight requests; sandbox workers are then stopped.
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
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from distributed_ft.errors import ConfigError
from distributed_ft.grader.engine import Grader, build_grader, grade_entries
from distributed_ft.grader.spec import load_grader_spec, parse_grader_spec

log = logging.getLogger("distributed_ft.grader.server")
TOKEN_ENV = "DFT_GRADER_TOKEN"
MAX_ITEMS_PER_REQUEST = 100_000
WARN_EVERY_S = 10.0


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
        self.requests = self.samples = self.unscorable = self.bad_requests = 0
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

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self._latency_ms)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
        return {"requests": self.requests, "samples": self.samples, "unscorable": self.unscorable,
                "bad_requests": self.bad_requests, "latency_ms": {"p50": pick(0.5), "p99": pick(0.99)},
                "uptime_s": round(time.time() - self.started, 1)}


def create_app(grader: Grader, token: str | None = None, grader_type: str = "", workers: int = 4) -> FastAPI:
    """The FastAPI application serving `grader`."""
    app = FastAPI(title="distributed_ft grader", docs_url=None, redoc_url=None, openapi_url=None)
    stats = Stats()
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grade")
    expected = f"Bearer {token}".encode() if token else None
    app.state.stats, app.state.grader, app.state.executor = stats, grader, executor
    last_warning = [-1e9]

    def _error(status: int, message: str) -> JSONResponse:
        stats.bad_request()
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong bearer token")
        return await call_next(request)

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


def serve(config_path: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load the grader in `config_path` and serve it until SIGTERM/SIGINT."""
    import uvicorn

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
        app = create_app(grader, token, spec.type)
        log.info("grader '%s' (%s) ready on http://%s:%d%s", grader.name, spec.type, host, port,
                 " (bearer token required)" if token else "")
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=30)
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
