"""Pool of long-lived sandboxed worker processes that run a python grader's `grade(sample, item)`.

Each worker runs under bubblewrap in a fresh root that holds only what it needs, read-only: `/usr`, the
interpreter's prefix and its site-packages (at neutral paths under /sandbox), and the worker script; a
private tmpfs is its only writable folder. It has its own pid, network (nothing but its own loopback),
IPC and UTS namespaces, runs as nobody (uid 65534) with no capabilities, and has a memory limit
(RLIMIT_AS) and one CPU. Nothing else of the host exists inside: not /etc, /root, the home folder or the
checkout. Samples are sent in batches; each sample has a wall-time limit. A worker that exceeds it or
dies is killed and replaced, and only that sample becomes unscorable.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import select
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distributed_ft.errors import ConfigError, DftError

log = logging.getLogger(__name__)
WORKER_SCRIPT = str(Path(__file__).with_name("_sandbox_worker.py"))
STARTUP_TIMEOUT_S = 60.0
WORKDIR_PREFIX = "dft-grader-"
# Error text from grader code reaches clients: cut it, so a grader cannot ship out whatever it read.
ERROR_TEXT_CAP = 500
NOBODY = "65534"
INSIDE = "/sandbox"  # where the interpreter, its packages and the worker script appear in the sandbox

_probe_lock = threading.Lock()
_probe_result: str | None = None
_probe_done = False


def _site_dirs() -> list[str]:
    """The interpreter's package folders (the virtualenv's included) that exist, without duplicates."""
    found = list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return [d for i, d in enumerate(found) if os.path.isdir(d) and d not in found[:i]]


def sandbox_command(worker_args: list[str]) -> list[str]:
    """The bubblewrap command that runs the worker script in a fresh, read-only, allowlisted root."""
    executable = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--uid", NOBODY, "--gid", NOBODY,
           "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
           "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
           "--dir", INSIDE, "--ro-bind", WORKER_SCRIPT, f"{INSIDE}/worker.py"]
    env = {"PATH": "/usr/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if executable.startswith("/usr/"):
        python = executable
    else:  # an interpreter outside /usr (pyenv, conda): its prefix appears at a neutral path
        cmd += ["--ro-bind", prefix, f"{INSIDE}/python"]
        python = f"{INSIDE}/python/" + os.path.relpath(executable, prefix)
        env["LD_LIBRARY_PATH"] = f"{INSIDE}/python/lib"  # libpython of a shared build
    sites = []
    for i, folder in enumerate(_site_dirs()):
        if folder.startswith("/usr/"):
            sites.append(folder)
        else:
            cmd += ["--ro-bind", folder, f"{INSIDE}/site/{i}"]
            sites.append(f"{INSIDE}/site/{i}")
    cmd += ["--chdir", "/tmp", "--clearenv"]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    return cmd + [python, "-I", f"{INSIDE}/worker.py", "--serve", "/tmp", *worker_args, *sites]


def probe_sandbox() -> str | None:
    """None if bubblewrap runs the worker's interpreter here, else the reason not (checked once per process)."""
    global _probe_result, _probe_done
    with _probe_lock:
        if not _probe_done:
            _probe_done = True
            if shutil.which("bwrap") is None:
                _probe_result = "bubblewrap ('bwrap') is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
            else:
                cmd = sandbox_command([])
                cmd = cmd[:cmd.index("-I") + 1] + ["-c", "import json"]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                    if proc.returncode != 0:
                        _probe_result = f"bwrap failed: {(proc.stderr.strip().splitlines() or [proc.returncode])[-1]}"
                except (OSError, subprocess.TimeoutExpired) as err:
                    _probe_result = f"bwrap failed: {err}"
        return _probe_result


def remove_stale_workdirs() -> None:
    """Delete worker folders left behind by grader processes that were killed (their pid is gone)."""
    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{WORKDIR_PREFIX}*-*"):
        owner = path.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(path, ignore_errors=True)


class WorkerDied(RuntimeError):
    pass


class _Worker:
    """One sandboxed interpreter with the grader source loaded."""

    def __init__(self, source: str, memory_mb: int, cpu: int, sandboxed: bool, name: str, timeout_s: float):
        self.source, self.memory_mb, self.cpu, self.sandboxed, self.name = source, memory_mb, cpu, sandboxed, name
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None
        self._stderr = None
        self._buf = b""

    def start(self) -> None:
        limits = [str(self.memory_mb * 1024 * 1024), str(self.cpu), str(self.timeout_s)]
        # Sandboxed, the worker's folder is its own tmpfs; without a sandbox, a private host folder.
        self.workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
        os.chmod(self.workdir, 0o700)
        if self.sandboxed:
            cmd = sandbox_command(limits)
        else:
            cmd = [sys.executable, "-I", WORKER_SCRIPT, "--serve", self.workdir] + limits
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.workdir, "TMPDIR": self.workdir,
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._buf = b""
        # start-up errors (namespaces, mounts, interpreter) land here; the worker then points stderr at /dev/null
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     env=env, cwd=self.workdir, start_new_session=True)
        self._send({"source": self.source})
        try:
            reply = self._readline(time.monotonic() + STARTUP_TIMEOUT_S)
        except (WorkerDied, TimeoutError) as err:
            self._stderr.seek(0)
            lines = self._stderr.read()[-4000:].decode(errors="replace").strip().splitlines()
            self.kill()
            detail = f": {lines[-1]}" if lines else ""
            raise DftError(f"python grader '{self.name}': sandboxed worker failed to start "
                           f"({err or 'no answer'}){detail}") from None
        if not reply.get("ok"):
            self.kill()
            raise ConfigError(f"python grader '{self.name}': loading source failed: {reply.get('error')}")

    def _send(self, obj) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise WorkerDied(f"cannot write to worker: {err}") from None

    def _readline(self, deadline: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self.proc.wait()
                raise WorkerDied(f"exit code {code}" if code >= 0 else f"killed by signal {-code}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise WorkerDied("garbled reply from worker") from None
        if not isinstance(reply, dict):
            raise WorkerDied("garbled reply from worker")
        return reply

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except (OSError, AttributeError):
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def grade(self, tasks: list, timeout_s: float) -> list[tuple[float | None, str | None]]:
        """Grade tasks in order; a time-out or crash fails that sample, restarts the worker and goes on."""
        results: list[tuple[float | None, str | None]] = []
        while len(results) < len(tasks):
            pending = tasks[len(results):]
            try:
                if not self.alive():
                    self.start()
                self._send(pending)
                for _ in pending:
                    reply = self._readline(time.monotonic() + timeout_s)
                    if "r" in reply and isinstance(reply["r"], (int, float)):
                        results.append((float(reply["r"]), None))
                    else:
                        results.append((None, f"python grader: {reply.get('e', 'bad reply')}"[:ERROR_TEXT_CAP]))
            except TimeoutError:
                results.append((None, f"python grader: time limit of {timeout_s:g}s exceeded"))
                self.kill()
            except WorkerDied as err:
                results.append((None, f"python grader: sandbox process died ({err})"))
                self.kill()
        return results


class SandboxPool:
    """Fixed-size pool of sandboxed workers for one python grader."""

    def __init__(self, source: str, name: str = "python", workers: int = 2, timeout_s: float = 120.0,
                 memory_mb: int = 2048, allow_unsandboxed: bool = False):
        reason = probe_sandbox()
        if reason is not None and not allow_unsandboxed:
            raise ConfigError(f"python grader '{name}' needs a sandbox but {reason}; "
                              "set allow_unsandboxed: true to run it without one")
        self.sandboxed = reason is None
        remove_stale_workdirs()
        if not self.sandboxed:
            log.warning("python grader '%s' runs WITHOUT a sandbox (%s)", name, reason)
        self.timeout_s = timeout_s
        ncpu = os.cpu_count() or 1
        self._workers = [_Worker(source, memory_mb, i % ncpu, self.sandboxed, name, timeout_s) for i in range(workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        try:
            for future in [self._executor.submit(w.start) for w in self._workers]:
                future.result()
        except BaseException:
            self.close()
            raise
        for worker in self._workers:
            self._idle.put(worker)

    @property
    def size(self) -> int:
        return len(self._workers)

    def ready(self) -> bool:
        return bool(self._workers)

    def _run_chunk(self, tasks: list) -> list:
        worker = self._idle.get()
        try:
            return worker.grade(tasks, self.timeout_s)
        finally:
            self._idle.put(worker)

    def grade(self, pairs: list[tuple[dict, dict]]) -> list[tuple[float | None, str | None]]:
        """(reward, error) per (sample, item) pair, in order."""
        if not pairs:
            return []
        tasks = [[sample, item] for sample, item in pairs]
        n = min(len(self._workers), len(tasks))
        step = -(-len(tasks) // n)
        chunks = [tasks[i:i + step] for i in range(0, len(tasks), step)]
        out: list = []
        for part in self._executor.map(self._run_chunk, chunks):
            out.extend(part)
        return out

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []
        self._executor.shutdown(wait=False, cancel_futures=True)
