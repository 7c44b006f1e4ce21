"""Long-lived sandboxed worker for python graders (run as a script with `python -I`, no package imports).

Stage `--setup` runs as root inside fresh net/mount/pid namespaces: it makes every mount read-only except the
worker's own folder, then re-executes itself through `setpriv` with all capabilities dropped, so nothing (not even
uid 0) can remount or write outside that folder.  Stage `--serve` applies resource limits, compiles the grader source
once and then grades batches: one JSON line in per batch, one JSON line out per sample, on a private fd.
"""
import ctypes
import json
import math
import os
import resource
import shutil
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_NOATIME, MS_NODIRATIME = 1, 2, 4, 8, 1024, 2048
MS_REMOUNT, MS_BIND, MS_RELATIME = 32, 4096, 1 << 21
_KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


def _mount(libc, src, target, flags):
    if libc.mount(src.encode() if src else None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def setup(workdir, argv_rest):
    libc = ctypes.CDLL(None, use_errno=True)
    _mount(libc, workdir, workdir, MS_BIND)  # own mount point, so it stays writable below
    mounts = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            mounts.append((fields[4].replace("\\040", " "), fields[5]))
    for target, opts in mounts:
        if target == workdir:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in opts.split(","):
            flags |= _KEEP_FLAGS.get(opt, 0)
        try:
            _mount(libc, None, target, flags)
        except OSError:
            if target == "/":
                raise
    os.execv("/usr/bin/setpriv", [
        "setpriv", "--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
        "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked,+keep_caps_locked",
        sys.executable, "-I", os.path.abspath(__file__), "--serve", workdir] + argv_rest)


def _clear(workdir):
    for entry in os.scandir(workdir):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def serve(workdir, memory_bytes, cpu, timeout_s):
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
        out.write(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}) + "\n")
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
                reply = {"e": f"{type(err).__name__}: {err}"[:2000]}
            try:
                _clear(workdir)
            except OSError:
                pass
            out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    mode, folder = sys.argv[1], sys.argv[2]
    if mode == "--setup":
        setup(folder, sys.argv[3:])
    else:
        serve(folder, int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
