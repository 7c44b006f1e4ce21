"""The grader as a real separate HTTP process: same rewards as local grading, sandbox faults, auth, failover."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from distributed_ft.grader.client import GraderClient, GraderUnavailable
from distributed_ft.grader.engine import grade_entries, load_grader
from distributed_ft.grader.sandbox import probe_sandbox
from tests.conftest import skip_or_fail_in_ci

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-123"

MULTI = {
    "type": "multi", "name": "combo", "calculate_output": "0.5 * exact + 0.3 * bleu + 0.2 * code",
    "graders": {
        "exact": {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.ref }}", "operation": "ilike"},
        "bleu": {"type": "text_similarity", "name": "bleu", "input": "{{ sample.output_text }}",
                 "reference": "{{ item.ref }}", "evaluation_metric": "bleu"},
        "code": {"type": "python", "name": "code", "timeout_s": 1.0, "memory_mb": 256, "workers": 2,
                 "source": ("import socket\n"
                            "def grade(sample, item):\n"
                            "    t = sample['output_text']\n"
                            "    if t == 'loop':\n"
                            "        while True: pass\n"
                            "    if t == 'alloc':\n"
                            "        return float(len(bytearray(1 << 30)))\n"
                            "    if t == 'net':\n"
                            "        socket.create_connection(('127.0.0.1', item['port']), timeout=2)\n"
                            "    if t == 'write':\n"
                            "        open(item['path'], 'w').write('x')\n"
                            "    return min(1.0, len(t) / 40)\n")}},
}
SIMPLE = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
          "reference": "{{ item.ref }}", "operation": "eq"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m distributed_ft grader serve` in a child process."""

    def __init__(self, config: Path, port: int, log: Path, token: str | None = None, log_level: str = "warning"):
        self.config, self.port, self.log, self.token, self.log_level = config, port, log, token, log_level
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        env = {k: v for k, v in os.environ.items() if k != "DFT_GRADER_TOKEN"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if self.token:
            env["DFT_GRADER_TOKEN"] = self.token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distributed_ft", "grader", "serve", "--config", str(self.config),
             "--port", str(self.port), "--log-level", self.log_level],
            cwd=ROOT, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        return self

    def wait(self, timeout_s: float = 60.0) -> "Server":
        GraderClient([self.url], token=self.token).wait_healthy(timeout_s)
        return self

    def stop(self, sig: int = signal.SIGKILL) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode if self.proc else None


def _write(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def multi_server(tmp_path_factory):
    if probe_sandbox() is not None:
        skip_or_fail_in_ci(f"no sandbox here: {probe_sandbox()}")
    tmp = tmp_path_factory.mktemp("grader")
    cfg = _write(tmp / "multi.json", MULTI)
    server = Server(cfg, _free_port(), tmp / "server.log", log_level="info").start()
    try:
        yield server.wait()
    finally:
        server.stop(signal.SIGTERM)


ENTRIES = [
    {"sample": {"output_text": "The capital of France is Paris"}, "item": {"ref": "Paris"}},
    {"sample": {"output_text": "Paris is the capital of France"}, "item": {"ref": "Paris is the capital of France"}},
    {"sample": {"output_text": "I think it is Lyon"}, "item": {"ref": "paris"}},
    {"sample": {"output_text": "no reference given"}, "item": {}},
]


def test_http_batch_equals_local_check(multi_server):
    client = GraderClient([multi_server.url], timeout_s=30, batch_size=3)
    remote = client.grade(ENTRIES)  # 2 requests of <= 3 entries, sent concurrently
    local_grader = load_grader(multi_server.config)
    try:
        local = grade_entries(local_grader, ENTRIES)
    finally:
        local_grader.close()
    assert [r.to_dict() for r in remote] == [r.to_dict() for r in local]
    assert [r.reward is None for r in remote] == [False, False, False, True]
    assert remote[1].reward == pytest.approx(0.5 + 0.3 + 0.2 * 30 / 40)
    assert "item has no field 'ref'" in remote[3].error
    assert client.unscorable_rate == pytest.approx(0.25)


def test_sandbox_faults_over_http_keep_server_serving(multi_server, tmp_path):
    outside = tmp_path / "outside.txt"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    item = {"ref": "paris", "port": listener.getsockname()[1], "path": str(outside)}
    texts = ["paris", "loop", "alloc", "net", "write", "paris paris"]
    client = GraderClient([multi_server.url], timeout_s=30)
    res = client.grade([{"sample": {"output_text": t}, "item": item} for t in texts])
    listener.close()
    bad = {t: r for t, r in zip(texts, res) if r.reward is None}
    assert set(bad) == {"loop", "alloc", "net", "write"}
    assert "time limit" in bad["loop"].error
    assert "Connection refused" in bad["net"].error  # the sandbox has only its own loopback
    assert bad["write"].error and not outside.exists()  # the host's folders do not exist inside
    assert res[0].reward == pytest.approx(0.5 + 0.3 * 1.0 + 0.2 * 5 / 40)
    health = httpx.get(f"{multi_server.url}/health").json()
    assert health["ready"] and health["samples"] >= len(texts) and health["unscorable"] >= 4
    assert health["latency_ms"]["p99"] >= health["latency_ms"]["p50"] > 0
    again = client.grade([{"sample": {"output_text": "paris"}, "item": item}])
    assert again[0].reward == pytest.approx(res[0].reward)


def test_validate_endpoint_and_bad_requests(multi_server):
    url = multi_server.url
    ok = httpx.post(f"{url}/validate", json=MULTI).json()
    assert ok == {"ok": True, "error": None}
    bad_formula = httpx.post(f"{url}/validate", json={**MULTI, "calculate_output": "exact +* 2"}).json()
    assert not bad_formula["ok"] and "calculate_output" in bad_formula["error"]
    unknown = httpx.post(f"{url}/validate", json={"type": "regex"}).json()
    assert "unknown grader type 'regex'" in unknown["error"]
    no_ref = httpx.post(f"{url}/validate", json={"type": "string_check", "input": "x", "operation": "eq"}).json()
    assert "missing required field 'reference'" in no_ref["error"]
    resp = httpx.post(f"{url}/grade", json={"items": ENTRIES, "grader": SIMPLE})
    assert resp.status_code == 400 and "'grader'" in resp.json()["error"]
    assert httpx.post(f"{url}/grade", content=b"{oops").status_code == 400


def test_client_times_out_on_unresponsive_server():
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    client = GraderClient([f"http://127.0.0.1:{silent.getsockname()[1]}"], timeout_s=0.5, max_retries=1,
                          backoff_s=0.1)
    start = time.monotonic()
    res = client.grade([{"sample": {"output_text": "x"}, "item": {"ref": "x"}}] * 3)
    elapsed = time.monotonic() - start
    silent.close()
    assert all(r.reward is None and "unreachable after 2 attempts" in r.error for r in res)
    assert elapsed < 3.0
    with pytest.raises(GraderUnavailable, match="3/3 samples unscorable"):
        client.raise_if_unscorable_above(0.5)


def test_token_failover_kill_and_restart(tmp_path):
    cfg = _write(tmp_path / "s.json", SIMPLE)
    a = Server(cfg, _free_port(), tmp_path / "a.log", token=TOKEN).start()
    b = Server(cfg, _free_port(), tmp_path / "b.log", token=TOKEN).start()
    try:
        a.wait()
        b.wait()
        batch = [{"sample": {"output_text": t}, "item": {"ref": "yes"}} for t in ["yes", "no"]] * 8
        expected = [1.0, 0.0] * 8
        # without the token the server refuses
        assert httpx.post(f"{a.url}/grade", json={"items": batch}).status_code == 401
        assert httpx.get(f"{a.url}/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = GraderClient([a.url, b.url], timeout_s=2.0, max_retries=2, backoff_s=0.05, token=TOKEN,
                              batch_size=2, cooldown_s=1.0)
        assert [r.reward for r in client.grade(batch)] == expected
        served = {s.url: httpx.get(f"{s.url}/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
                  for s in (a, b)}
        assert all(h["requests"] > 0 for h in served.values())  # round robin used both

        a.stop()  # killed: the second URL takes over
        assert [r.reward for r in client.grade(batch)] == expected

        b.stop()  # both down: calls fail within the timeout and samples are unscorable
        start = time.monotonic()
        res = client.grade(batch[:4])
        assert time.monotonic() - start < 10.0
        assert all(r.reward is None and "unreachable" in r.error for r in res)
        assert client.unscorable_rate == pytest.approx(4 / 36)

        a.start().wait()  # restarted server is picked up again
        time.sleep(1.0)  # past the client's cooldown for a
        assert [r.reward for r in client.grade(batch)] == expected
        health = httpx.get(f"{a.url}/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert health["samples"] == len(batch)
    finally:
        a.stop()
        b.stop()


def test_sigterm_shuts_down_cleanly(multi_server):
    # Runs last among the tests of the shared server: it stops it.
    pid = multi_server.proc.pid
    kids = [p for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]
    assert kids, "the sandbox workers should be children of the server"
    assert multi_server.stop(signal.SIGTERM) == 0
    time.sleep(0.5)
    assert not any(Path(f"/proc/{p}").exists() for p in kids)
    assert not list(Path("/tmp").glob(f"dft-grader-{pid}-*"))
    assert "grader stopped after" in multi_server.log.read_text()
