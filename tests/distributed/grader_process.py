"""A real grader server process for tests: started on a free port, stopped cleanly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def start_grader(spec: str, port: int | None = None, env: dict | None = None):
    """A grader server process and its URL, once healthy."""
    from distributed_ft.grader.client import GraderClient
    from distributed_ft.rl.grading import free_port

    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distributed_ft", "grader", "serve", "--config", spec,
                             "--port", str(port), "--log-level", "warning"], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        GraderClient(url, timeout_s=5).wait_healthy(60)
    except Exception:
        proc.kill()
        raise
    return proc, url


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
