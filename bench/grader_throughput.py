"""Grader service throughput: samples/s and per-request latency for batches of 64 over loopback HTTP.

Each grader runs as its own `python -m distributed_ft.grader serve` process.  Latency is measured with one request
in flight (keep-alive connection); throughput with GraderClient sending `--concurrency` requests at a time.

    python bench/grader_throughput.py [--requests 200] [--concurrency 4] [--only bleu,python]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distributed_ft.grader.client import GraderClient  # noqa: E402

TEXT = "{{ sample.output_text }}"
REF = "{{ item.reference_answer }}"
PY_SOURCE = """
def grade(sample, item):
    words = sample["output_text"].lower().split()
    ref = set(item["reference_answer"].lower().split())
    return sum(w in ref for w in words) / max(1, len(words))
"""
SPECS = {
    "string_check": {"type": "string_check", "name": "exact", "input": TEXT, "reference": REF, "operation": "ilike"},
    "bleu": {"type": "text_similarity", "name": "bleu", "input": TEXT, "reference": REF, "evaluation_metric": "bleu"},
    "rouge_l": {"type": "text_similarity", "name": "rouge_l", "input": TEXT, "reference": REF,
                "evaluation_metric": "rouge_l"},
    "python": {"type": "python", "name": "overlap", "source": PY_SOURCE, "workers": 2},
    "multi": {"type": "multi", "name": "combo", "calculate_output": "0.5 * exact + 0.3 * rouge + 0.2 * code",
              "graders": {"exact": {"type": "string_check", "input": TEXT, "reference": REF, "operation": "ilike"},
                          "rouge": {"type": "text_similarity", "input": TEXT, "reference": REF,
                                    "evaluation_metric": "rouge_l"},
                          "code": {"type": "python", "source": PY_SOURCE, "workers": 2}}},
}


def _batch(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        ref = f"the answer to question {i} is that the river flows north past {i % 17} old mills"
        hyp = f"I believe the river flows north past {i % 13} mills, so the answer to question {i} is north"
        out.append({"sample": {"output_text": hyp}, "item": {"reference_answer": ref}})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_one(name: str, spec: dict, requests: int, concurrency: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / f"{name}.json"
        cfg.write_text(json.dumps(spec))
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "DFT_GRADER_TOKEN"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen([sys.executable, "-m", "distributed_ft.grader", "serve", "--config", str(cfg),
                                 "--port", str(port), "--log-level", "error"], cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            GraderClient([url]).wait_healthy(120)
            with httpx.Client(timeout=60) as http:
                for i in range(5):  # warm-up: imports done lazily, caches, workers
                    http.post(f"{url}/grade", json={"items": _batch(batch, i * batch)}).raise_for_status()
                latencies = []
                for i in range(requests):
                    body = {"items": _batch(batch, i * batch)}
                    start = time.perf_counter()
                    resp = http.post(f"{url}/grade", json=body)
                    latencies.append((time.perf_counter() - start) * 1000)
                    results = resp.json()["results"]
                    assert all(r["reward"] is not None for r in results), results[0]
            client = GraderClient([url], timeout_s=60, batch_size=batch, max_concurrency=concurrency)
            entries = _batch(batch * requests)
            start = time.perf_counter()
            results = asyncio.run(client.agrade(entries))
            elapsed = time.perf_counter() - start
            assert client.unscorable == 0, [r.error for r in results if r.error][:1]
            server_health = httpx.get(f"{url}/health").json()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return {"grader": name, "samples_per_s": round(len(entries) / elapsed, 1),
            "seq_samples_per_s": round(batch * 1000 / (sum(latencies) / len(latencies)), 1),
            "p50_ms": round(_pct(latencies, 0.5), 2), "p99_ms": round(_pct(latencies, 0.99), 2),
            "server_p50_ms": server_health["latency_ms"]["p50"], "server_p99_ms": server_health["latency_ms"]["p99"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per phase and grader")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SPECS))
    args = parser.parse_args()
    names = [n for n in SPECS if not args.only or n in args.only.split(",")]
    print(f"cpus={os.cpu_count()} load_before={os.getloadavg()}", flush=True)
    print(f"{'grader':<14}{'samples/s':>11}{'seq s/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'srv p50':>9}{'srv p99':>9}")
    rows = []
    for name in names:
        row = bench_one(name, SPECS[name], args.requests, args.concurrency, args.batch)
        rows.append(row)
        print(f"{name:<14}{row['samples_per_s']:>11}{row['seq_samples_per_s']:>10}{row['p50_ms']:>9}"
              f"{row['p99_ms']:>9}{row['server_p50_ms']:>9}{row['server_p99_ms']:>9}", flush=True)
    print(f"load_after={os.getloadavg()}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
