"""Server pieces that need no process: start-up refusal, loopback detection, latency statistics."""
from __future__ import annotations

import json

import pytest

from distributed_ft.errors import ConfigError
from distributed_ft.grader.server import Stats, is_loopback, serve


def test_refuses_non_loopback_without_token(tmp_path, monkeypatch):
    monkeypatch.delenv("DFT_GRADER_TOKEN", raising=False)
    cfg = tmp_path / "g.json"
    cfg.write_text(json.dumps({"type": "string_check", "input": "a", "reference": "a", "operation": "eq"}))
    with pytest.raises(ConfigError, match="non-loopback host '0.0.0.0' without DFT_GRADER_TOKEN"):
        serve(cfg, host="0.0.0.0", port=1)


@pytest.mark.parametrize("host, expected", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                            ("grader.example", False)])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_stats_percentiles():
    stats = Stats()
    for ms in range(1, 101):
        stats.record(samples=64, unscorable=ms % 10 == 0, latency_ms=float(ms))
    snap = stats.snapshot()
    assert snap["requests"] == 100 and snap["samples"] == 6400 and snap["unscorable"] == 10
    assert snap["latency_ms"] == {"p50": 51.0, "p99": 100.0}
