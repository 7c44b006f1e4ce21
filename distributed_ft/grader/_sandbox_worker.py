"""Long-lived worker for python graders (run as a script with `python -I`, no package imports).

It is started inside the sandbox (see sandbox.py), applies resource limits, adds the interpreter's package
folders it was given to sys.path, compiles the grader source once and then grades batches: one JSON line
in per batch, one JSON line out per sample, on a private fd.
"""
import json
import math
import os
import resource
import shutil
import site
import sys

MAX_ERROR_CHARS = 2000  # keeps a reply line small; the parent cuts what reaches a client further


def _clear(workdir):
    for entry in os.scandir(workdir):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def serve(workdir, memory_bytes, cpu, timeout_s, site_dirs):
    for folder in site_dirs:
        site.addsitedir(folder)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # the grader's prints must not reach the protocol channel
    os.dup2(devnull, 2)  # nor fill the parent's start-up error file
    os.chdir(workdir)
    if cpu >= 0:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    reader = sys.stdin
    init = json.loads(reader.readline())
    namespace = {"__name__": "__grader__"}
    try:
        exec(compile(init["source"], "<grader>", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise TypeError("source does not define grade(sample, item)")
    except BaseException as err:  # report any failure of the grader's module code to the parent
        out.write(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"[:MAX_ERROR_CHARS]}) + "\n")
        return
    out.write(json.dumps({"ok": True}) + "\n")
    for line in reader:
        for sample, item in json.loads(line):
            # CPU-time backstop: a runaway sample dies by SIGXCPU even if the parent is gone.
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_soft = int(usage.ru_utime + usage.ru_stime + timeout_s) + 2
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, resource.RLIM_INFINITY))
            try:
                value = grade(sample, item)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"grade() returned {type(value).__name__}, expected a number")
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"grade() returned non-finite {value}")
                reply = {"r": value}
            except MemoryError:
                reply = {"e": "MemoryError: memory limit exceeded"}
            except BaseException as err:  # user code may raise anything, SystemExit included
                reply = {"e": f"{type(err).__name__}: {err}"[:MAX_ERROR_CHARS]}
            try:
                _clear(workdir)
            except OSError:
                pass
            out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    # --serve WORKDIR MEMORY_BYTES CPU TIMEOUT_S [SITE_DIR ...]
    serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6:])
