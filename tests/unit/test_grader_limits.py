"""Grader server limits against a real uvicorn server on a loopback socket (in a thread of this process).

Body size (Content-Length and chunked), per-entry size, slow bodies, the concurrency bound, and how the
client treats each refusal (413: unscorable, not retried; 503: retried after Retry-After).
"""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import httpx
import pytest
import uvicorn

from distributed_ft.cli import build_parser
from distributed_ft.errors import ConfigError
from distributed_ft.grader.client import GraderClient
from distributed_ft.grader.engine import Grader
from distributed_ft.grader.results import GradeResult
from distributed_ft.grader.server import ServerLimits, create_app

pytestmark = pytest.mark.timeout(60)
SMALL = ServerLimits(max_body_bytes=64 << 10, max_item_bytes=1000, max_concurrent=2, queue_timeout_s=0.3,
                     body_timeout_s=1.0, keep_alive_s=5.0)
OK_BODY = {"items": [{"sample": {"output_text": "a"}, "item": {"ref": "a"}},
                     {"sample": {"output_text": "b"}, "item": {"ref": "a"}}]}


class StubGrader(Grader):
    """1.0 when output_text equals item.ref; a batch holding "block" waits until `release` is set."""

    name = "stub"

    def __init__(self):
        self.release = threading.Event()
        self.blocked = threading.Semaphore(0)  # one count per batch now waiting on `release`

    def grade_batch(self, pairs):
        if any(s["output_text"] == "block" for s, _ in pairs):
            self.blocked.release()
            assert self.release.wait(20), "test never released the grader"
        return [GradeResult(float(s["output_text"] == i.get("ref"))) for s, i in pairs]


@contextmanager
def running(limits: ServerLimits = SMALL, token: str | None = None):
    grader = StubGrader()
    app = create_app(grader, token, "stub", workers=8, limits=limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="critical", access_log=False, timeout_keep_alive=limits.keep_alive_s)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    try:
        yield url, grader, app
    finally:
        grader.release.set()
        server.should_exit = True
        thread.join(10)
        app.state.executor.shutdown(wait=False, cancel_futures=True)
        sock.close()


def _served_normally(url: str) -> None:
    resp = httpx.post(f"{url}/grade", json=OK_BODY, timeout=5)
    assert resp.status_code == 200
    assert [r["reward"] for r in resp.json()["results"]] == [1.0, 0.0]


def _raw(url: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
    return conn


def _read_response(conn: socket.socket) -> tuple[int, dict, dict, str | None]:
    """(status, headers, JSON body, then "eof", "reset" or None: how the server closed the connection)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += conn.recv(65536)
    try:
        closed = "eof" if conn.recv(1) == b"" else None
    except ConnectionResetError:
        closed = "reset"
    return int(lines[0].split()[1]), headers, json.loads(body), closed


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


# --- body size -------------------------------------------------------------------------------------------------
def test_content_length_over_limit_is_refused_before_the_body_is_sent():
    with running() as (url, _, _app):
        conn = _raw(url)
        # Headers only, announcing 1 GB: a server that read (or buffered) the body first would never answer.
        conn.sendall(b"POST /grade HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        status, headers, body, closed = _read_response(conn)
        conn.close()
        assert status == 413 and closed and headers["connection"] == "close"
        assert "1000000000 bytes" in body["error"] and "65536 bytes (--max-body-bytes)" in body["error"]
        _served_normally(url)


def test_refused_body_up_to_twice_the_limit_is_drained_before_the_refusal():
    # Closing while the client still sends makes the kernel reset the connection, which can lose the unread 413;
    # so the server first reads and drops the rest of a body of up to twice the limit (keeping none of it).
    with running() as (url, _, _app):
        conn = _raw(url)
        conn.sendall(b"POST /grade HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 50000)
        conn.settimeout(0.3)
        with pytest.raises(socket.timeout):
            conn.recv(1)  # still reading: neither answered nor closed while the client is mid-body
        conn.settimeout(5)
        conn.sendall(b"x" * 50000)
        status, _, body, closed = _read_response(conn)
        conn.close()
        assert status == 413 and closed == "eof" and "100000 bytes" in body["error"]
        _served_normally(url)


def test_oversized_body_sent_by_httpx_is_413_and_the_next_request_is_served():
    with running() as (url, _, _app):
        big = json.dumps({"items": [{"sample": {"output_text": "x" * 900}, "item": {}}] * 200})  # ~190 KB
        resp = httpx.post(f"{url}/grade", content=big, headers={"content-type": "application/json"}, timeout=5)
        assert resp.status_code == 413 and "--max-body-bytes" in resp.json()["error"]
        _served_normally(url)
        # Just under the limit is graded: the limit is the body size, not something smaller.
        entries = [{"sample": {"output_text": "a"}, "item": {"ref": "a", "pad": "p" * 900}}] * 60
        assert len(json.dumps({"items": entries})) < SMALL.max_body_bytes
        assert httpx.post(f"{url}/grade", json={"items": entries}, timeout=5).status_code == 200


def test_chunked_body_over_limit_is_refused_while_streaming():
    with running() as (url, _, _app):
        conn = _raw(url)
        conn.sendall(b"POST /grade HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 16384
        for _ in range(6):  # 96 KiB > 64 KiB, and the body never ends (no final 0-length chunk)
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, headers, body, closed = _read_response(conn)
        conn.close()
        assert status == 413 and closed
        assert "over the limit of 65536 bytes (--max-body-bytes)" in body["error"]
        _served_normally(url)
        assert _health(url)["in_flight"] == 0  # the refused request gave its slot back


# --- per-entry size --------------------------------------------------------------------------------------------
def test_oversized_entry_is_refused_naming_its_index():
    with running() as (url, _, _app):
        def entry(text: str, ref: str = "a") -> dict:
            return {"sample": {"output_text": text}, "item": {"ref": ref}}
        at_limit = "y" * (SMALL.max_item_bytes - len(json.dumps({"output_text": ""}, separators=(",", ":"))))
        assert httpx.post(f"{url}/grade", json={"items": [entry(at_limit)]}, timeout=5).status_code == 200
        resp = httpx.post(f"{url}/grade", json={"items": [entry("a"), entry("a"), entry(at_limit + "y")]}, timeout=5)
        assert resp.status_code == 413 and resp.json()["index"] == 2
        assert resp.json()["error"] == ("items[2].sample is 1001 bytes of JSON, over the per-item limit of 1000 "
                                        "bytes (--max-item-bytes)")
        resp = httpx.post(f"{url}/grade", json={"items": [entry("a", ref="r" * 2000), entry("a")]}, timeout=5)
        assert resp.status_code == 413 and resp.json()["index"] == 0 and "items[0].item" in resp.json()["error"]
        _served_normally(url)


def test_client_makes_refused_samples_unscorable_without_retrying():
    with running() as (url, _, _app):
        client = GraderClient([url], timeout_s=5, max_retries=3, backoff_s=0.01, batch_size=100)
        before = _health(url)["bad_requests"]
        big_item = [("a", {"ref": "a"}), ("b", {"ref": "b" * 5000})]  # entry 1's item is over 1000 bytes
        results = client.grade(big_item)
        assert [r.reward for r in results] == [None, None]  # never 0
        assert all("HTTP 413" in r.error and "items[1].item" in r.error for r in results)
        too_big = [("x" * 900, {"ref": "x" * 90})] * 80  # each entry is fine, the 80 KB body is not
        results = client.grade(too_big)
        assert all(r.reward is None and "HTTP 413" in r.error and "--max-body-bytes" in r.error for r in results)
        assert _health(url)["bad_requests"] - before == 2  # one request each: not retried
        assert client.unscorable_rate == 1.0
        assert [r.reward for r in client.grade([("a", {"ref": "a"})])] == [1.0]


# --- slow bodies -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_slow_body_gets_408_in_time_while_others_are_served(framing):
    limits = replace(SMALL, body_timeout_s=1.5)
    with running(limits) as (url, _, _app):
        conn = _raw(url)
        header = b"Content-Length: 4000" if framing == "content-length" else b"Transfer-Encoding: chunked"
        start = time.monotonic()
        conn.sendall(b"POST /grade HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header + b"\r\n\r\n")
        stop = threading.Event()

        def trickle():  # a byte every 0.1 s: never idle, but the body would take minutes
            piece = b"1\r\n \r\n" if framing == "chunked" else b" "
            while not stop.is_set():
                try:
                    conn.sendall(piece)
                except OSError:
                    return
                time.sleep(0.1)

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        _served_normally(url)  # another client is served meanwhile, promptly
        assert time.monotonic() - t0 < 1.0
        status, headers, body, closed = _read_response(conn)
        elapsed = time.monotonic() - start
        stop.set()
        conn.close()
        assert status == 408 and closed
        assert limits.body_timeout_s <= elapsed < limits.body_timeout_s + 1.5
        assert "not received within 1.5s (--body-timeout" in body["error"]
        _served_normally(url)


# --- concurrency -----------------------------------------------------------------------------------------------
def _block_in_thread(url: str, out: list) -> threading.Thread:
    body = {"items": [{"sample": {"output_text": "block"}, "item": {"ref": "block"}}]}
    thread = threading.Thread(target=lambda: out.append(httpx.post(f"{url}/grade", json=body, timeout=20)),
                              daemon=True)
    thread.start()
    return thread


def test_concurrency_bound_refuses_the_extra_request_with_retry_after():
    with running() as (url, grader, _app):
        out: list = []
        threads = [_block_in_thread(url, out) for _ in range(SMALL.max_concurrent)]
        for _ in threads:
            assert grader.blocked.acquire(timeout=10)  # both limit slots are now grading
        t0 = time.monotonic()
        resp = httpx.post(f"{url}/grade", json=OK_BODY, timeout=5)
        waited = time.monotonic() - t0
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert "2 requests already in flight (--max-concurrent)" in resp.json()["error"]
        assert SMALL.queue_timeout_s <= waited < SMALL.queue_timeout_s + 1.0  # it queued, then gave up
        health = _health(url)  # GET takes no slot: still answered
        assert health["in_flight"] == 2 and health["busy"] == 1
        grader.release.set()
        for thread in threads:
            thread.join(10)
        assert [r.status_code for r in out] == [200, 200]
        _served_normally(url)
        assert _health(url)["in_flight"] == 0


def test_request_waits_for_a_slot_within_the_queue_timeout():
    limits = replace(SMALL, max_concurrent=1, queue_timeout_s=10.0)
    with running(limits) as (url, grader, _app):
        out: list = []
        first = _block_in_thread(url, out)
        assert grader.blocked.acquire(timeout=10)
        queued: list = []
        second = threading.Thread(target=lambda: queued.append(httpx.post(f"{url}/grade", json=OK_BODY, timeout=20)),
                                  daemon=True)
        second.start()
        time.sleep(0.5)
        assert not queued  # still waiting for the slot, not refused
        grader.release.set()
        first.join(10)
        second.join(10)
        assert out[0].status_code == 200 and queued[0].status_code == 200
        assert [r["reward"] for r in queued[0].json()["results"]] == [1.0, 0.0]


def test_client_retries_a_busy_server_after_retry_after():
    limits = replace(SMALL, max_concurrent=1, queue_timeout_s=0.0)
    with running(limits) as (url, grader, _app):
        out: list = []
        first = _block_in_thread(url, out)
        assert grader.blocked.acquire(timeout=10)
        client = GraderClient([url], timeout_s=5, max_retries=2, backoff_s=0.05)
        got: list = []
        t0 = time.monotonic()
        worker = threading.Thread(target=lambda: got.extend(client.grade([("a", {"ref": "a"})])), daemon=True)
        worker.start()
        deadline = time.monotonic() + 5
        while _health(url)["busy"] < 1:  # the client's first attempt was refused as busy
            assert time.monotonic() < deadline
            time.sleep(0.02)
        grader.release.set()
        worker.join(10)
        first.join(10)
        assert [r.reward for r in got] == [1.0]  # retried and scored, not unscorable
        assert time.monotonic() - t0 >= 1.0  # waited the Retry-After, not just the 0.05 s backoff


# --- auth order, options ---------------------------------------------------------------------------------------
def test_token_is_checked_before_the_body_limit():
    with running(token="secret") as (url, _, _app):
        conn = _raw(url)
        conn.sendall(b"POST /grade HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        status, _, body, _ = _read_response(conn)
        conn.close()
        assert status == 401 and body["error"] == "missing or wrong bearer token"
        auth = {"Authorization": "Bearer secret"}
        assert httpx.post(f"{url}/grade", json=OK_BODY, headers=auth, timeout=5).status_code == 200
        assert httpx.post(f"{url}/grade", json=OK_BODY, timeout=5).status_code == 401


def test_serve_options_reach_the_app_and_uvicorn(tmp_path, monkeypatch):
    cfg = tmp_path / "g.json"
    cfg.write_text(json.dumps({"type": "string_check", "input": "a", "reference": "a", "operation": "eq"}))
    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.setdefault("config", self.config))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # serve() must not change this test process's handlers
    monkeypatch.delenv("DFT_GRADER_TOKEN", raising=False)
    parser = build_parser()
    args = parser.parse_args(["grader", "serve", "--config", str(cfg), "--max-body-bytes", "1234",
                              "--max-item-bytes", "99", "--max-concurrent", "3", "--queue-timeout", "0",
                              "--body-timeout", "2.5", "--keep-alive-timeout", "7", "--log-level", "error"])
    assert args.func(args) == 0
    config = seen["config"]
    assert config.app.state.limits == ServerLimits(1234, 99, 3, 0.0, 2.5, 7.0)
    assert config.timeout_keep_alive == 7.0
    defaults = parser.parse_args(["grader", "serve", "--config", str(cfg)])
    assert ServerLimits(defaults.max_body_bytes, defaults.max_item_bytes, defaults.max_concurrent,
                        defaults.queue_timeout, defaults.body_timeout, defaults.keep_alive_timeout) == ServerLimits()
    assert ServerLimits() == ServerLimits(32 << 20, 1 << 20, 64, 10.0, 30.0, 5.0)


@pytest.mark.parametrize("field, value", [("max_body_bytes", 0), ("max_concurrent", 0), ("body_timeout_s", 0),
                                          ("queue_timeout_s", -1)])
def test_bad_limits_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        ServerLimits(**{field: value})
