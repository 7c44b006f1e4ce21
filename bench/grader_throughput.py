"""Grader service throughput: samples/s and per-request latency for batches of 64 over loopback HTTP.

Each grader runs as its own `python -m distributed_ft grader serve` process.  Latency is measured with one request
in flight (keep-alive connection); throughput with GraderClient sending `--concurrency` requests at a time.

    python bench/grader_throughput.py [--requests 200] [--concurrency 4] [--only bleu,python]
    python bench/grader_throughput.py --smoke   # every grader: 1 warm-up, then 2 requests of 4 samples per phase

Prints and writes bench/results/grader_throughput-*.json. No throughput target; exits 1 if a server fails to
start or a sample comes back without a finite reward.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
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
from bench.common import Sanity, exit_status, machine_load, parse_args, versions, write_results  # noqa: E402
from distributed_ft.grader.client import GraderClient, GraderUnavailable  # noqa: E402

SMOKE = {"requests": 2, "concurrency": 2, "batch": 4, "warmup": 1}

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


def _bad_rewards(results) -> list:
    """The results without a finite numeric reward (dicts from /grade, or GradeResult objects)."""
    bad = []
    for r in results:
        reward = r.get("reward") if isinstance(r, dict) else r.reward
        if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
            bad.append(r)
    return bad


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 120.0) -> None:
    """Wait for the server's /health; fail at once if the server process has exited."""
    deadline = time.monotonic() + timeout_s
    client = GraderClient([url])
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the grader server exited with status {proc.returncode} before it was ready")
        try:
            client.wait_healthy(min(2.0, max(0.1, deadline - time.monotonic())))
            return
        except GraderUnavailable:
            if time.monotonic() >= deadline:
                raise


def bench_one(name: str, spec: dict, requests: int, concurrency: int, batch: int, warmup: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / f"{name}.json"
        cfg.write_text(json.dumps(spec))
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "DFT_GRADER_TOKEN"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen([sys.executable, "-m", "distributed_ft", "grader", "serve", "--config", str(cfg),
                                 "--port", str(port), "--log-level", "error"], cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, url, 120)
            with httpx.Client(timeout=60) as http:
                for i in range(warmup):  # warm-up: imports done lazily, caches, workers
                    http.post(f"{url}/grade", json={"items": _batch(batch, i * batch)}).raise_for_status()
                latencies = []
                for i in range(requests):
                    body = {"items": _batch(batch, i * batch)}
                    start = time.perf_counter()
                    resp = http.post(f"{url}/grade", json=body)
                    latencies.append((time.perf_counter() - start) * 1000)
                    resp.raise_for_status()
                    results = resp.json()["results"]
                    bad = _bad_rewards(results)
                    if len(results) != batch or bad:
                        raise RuntimeError(f"{name}: {len(results)} results for {batch} samples, "
                                           f"{len(bad)} without a finite reward, e.g. {(bad or results)[:1]}")
            client = GraderClient([url], timeout_s=60, batch_size=batch, max_concurrency=concurrency)
            entries = _batch(batch * requests)
            start = time.perf_counter()
            results = asyncio.run(client.agrade(entries))
            elapsed = time.perf_counter() - start
            bad = _bad_rewards(results)
            if client.unscorable or bad or len(results) != len(entries):
                raise RuntimeError(f"{name}: {len(results)} results for {len(entries)} samples, {len(bad)} without "
                                   f"a finite reward: {[r.error for r in bad][:1]}")
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
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per grader before the latency phase")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SPECS))
    args = parse_args(parser, SMOKE)
    names = [n for n in SPECS if not args.only or n in args.only.split(",")]
    unknown = sorted(set(filter(None, args.only.split(","))) - set(SPECS))
    if unknown:
        parser.error(f"unknown grader {unknown[0]} (valid: {', '.join(SPECS)})")
    load_before = machine_load()
    if args.smoke:
        print("SMOKE RUN (tiny sizes: the figures say nothing about speed)")
    print(f"cpus={os.cpu_count()} load_before={os.getloadavg()}", flush=True)
    print(f"{'grader':<14}{'samples/s':>11}{'seq s/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'srv p50':>9}{'srv p99':>9}")
    rows, sanity = [], Sanity()
    for name in names:
        row = bench_one(name, SPECS[name], args.requests, args.concurrency, args.batch, args.warmup)
        sanity.finite(f"{name}: samples/s", row["samples_per_s"], positive=True)
        sanity.finite(f"{name}: sequential samples/s", row["seq_samples_per_s"], positive=True)
        rows.append(row)
        print(f"{name:<14}{row['samples_per_s']:>11}{row['seq_samples_per_s']:>10}{row['p50_ms']:>9}"
              f"{row['p99_ms']:>9}{row['server_p50_ms']:>9}{row['server_p99_ms']:>9}", flush=True)
    print(f"load_after={os.getloadavg()}")
    print(json.dumps(rows))
    path = write_results("grader_throughput", {
        "args": vars(args), "graders": rows, "load_before": load_before, "load_after": machine_load(),
        "sanity_failures": sanity.failures, "versions": versions()}, smoke=args.smoke)
    print(f"results: {path.relative_to(ROOT)}")
    return exit_status(sanity, True, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
