"""The reward side of PPO: a grader server started for the run (or given by URL) and non-blocking requests.

With `grader.config` the main process starts `python -m distributed_ft grader serve` on a free port, every
rank learns the URL by broadcast, and the server is stopped when the run ends (also on errors). Requests run
on a background thread so the reference and value forward passes overlap the grading round trip.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from distributed_ft.engine.logging import logger
from distributed_ft.errors import ConfigError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalGraderProcess:
    """A grader server child process; `stop` terminates it (then kills it after a grace period)."""

    def __init__(self, spec_path: str, host: str, log_path: Path, port: int | None = None):
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "distributed_ft", "grader", "serve", "--config", str(spec_path),
               "--host", host, "--port", str(self.port), "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # a Ctrl-C to the trainer must not kill it first
        logger.info(f"grader: started {spec_path} at {self.url} (pid {self.proc.pid}, log {self.log_path})")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_grader(grader_cfg, accelerator, run_dir: Path):
    """Collective: (GraderClient on every rank, LocalGraderProcess on the main process or None)."""
    from accelerate.utils import broadcast_object_list

    from distributed_ft.grader.client import GraderClient

    local = None
    urls = list(grader_cfg.urls or [])
    if grader_cfg.config is not None:
        world = accelerator.num_processes
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        from distributed_ft.grader.server import is_loopback

        if world > local_world and is_loopback(grader_cfg.host):
            raise ConfigError("grader.host is a loopback address but the run spans several nodes; set grader.host "
                              "to an address other nodes reach (with DFT_GRADER_TOKEN) or give grader.urls")
        box = [None]
        if accelerator.is_main_process:
            local = LocalGraderProcess(grader_cfg.config, grader_cfg.host, Path(run_dir) / "grader.log")
            box = [local.url]
        if accelerator.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        urls = [box[0]]
    client = GraderClient(urls, timeout_s=grader_cfg.timeout_s, max_retries=grader_cfg.retries, cooldown_s=1.0)
    try:
        client.wait_healthy(grader_cfg.startup_timeout_s)
    except Exception:
        if local is not None:
            local.stop()
        raise
    return client, local


class AsyncGrader:
    """Starts a grading request and returns a Future of (results, seconds)."""

    def __init__(self, client):
        self.client = client
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-grade")

    def submit(self, texts: list[str], items: list[dict]) -> Future:
        batch = [{"sample": {"output_text": t}, "item": it} for t, it in zip(texts, items)]

        def run():
            started = time.perf_counter()
            results = self.client.grade(batch)
            return results, time.perf_counter() - started

        return self._pool.submit(run)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
