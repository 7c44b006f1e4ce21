"""Python graders in sandboxed worker pools: limits stop bad samples, other samples are still scored."""
from __future__ import annotations

import os
import socket
import time

import pytest

from distributed_ft.errors import ConfigError
from distributed_ft.grader.engine import build_grader, grade_entries
from distributed_ft.grader.sandbox import probe_sandbox
from distributed_ft.grader.spec import parse_grader_spec

pytestmark = pytest.mark.skipif(probe_sandbox() is not None, reason=f"no sandbox here: {probe_sandbox()}")

SOURCE = '''
import os, socket
CALLS = []

def grade(sample, item):
    mode = sample["output_text"]
    CALLS.append(mode)
    if mode == "loop":
        while True:
            pass
    if mode == "alloc":
        block = bytearray(1 << 30)
        return float(len(block))
    if mode == "net":
        socket.create_connection((item["host"], item["port"]), timeout=2)
        return 1.0
    if mode == "write":
        with open(item["path"], "w") as fh:
            fh.write("escaped")
        return 1.0
    if mode == "local":
        with open("scratch.txt", "w") as fh:
            fh.write("ok")
        return float(len(os.listdir(".")))
    if mode == "exit":
        os._exit(7)
    if mode == "text":
        return "high"
    if mode == "calls":
        return float(len(CALLS))
    return float(len(mode)) / float(item.get("scale", 1))
'''


@pytest.fixture(scope="module")
def grader():
    g = build_grader(parse_grader_spec({"type": "python", "name": "py", "source": SOURCE, "timeout_s": 1.0,
                                        "memory_mb": 256, "workers": 2}))
    yield g
    g.close()


def test_scores_plain_samples(grader):
    res = grade_entries(grader, [{"sample": {"output_text": "abcd"}, "item": {"scale": 2}},
                                 {"sample": {"output_text": "abc"}, "item": {}}])
    assert [r.reward for r in res] == [2.0, 3.0]


def test_each_limit_fails_only_its_sample(grader, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    outside = tmp_path / "escape.txt"
    os.chmod(tmp_path, 0o777)
    item = {"host": "127.0.0.1", "port": listener.getsockname()[1], "path": str(outside)}
    modes = ["ok", "loop", "alloc", "net", "write", "local", "exit", "text", "okay!"]
    start = time.monotonic()
    res = grade_entries(grader, [{"sample": {"output_text": m}, "item": item} for m in modes])
    elapsed = time.monotonic() - start
    listener.close()
    by_mode = dict(zip(modes, res))
    assert by_mode["ok"].reward == 2.0 and by_mode["okay!"].reward == 5.0
    assert by_mode["local"].reward == 1.0  # its own folder is writable, and cleared between samples
    assert "time limit of 1s" in by_mode["loop"].error
    assert "MemoryError" in by_mode["alloc"].error or "died" in by_mode["alloc"].error
    assert "Network is unreachable" in by_mode["net"].error
    assert "Read-only file system" in by_mode["write"].error and not outside.exists()
    assert "exit code 7" in by_mode["exit"].error
    assert "expected a number" in by_mode["text"].error
    for mode in ("loop", "alloc", "net", "write", "exit", "text"):
        assert by_mode[mode].reward is None, mode
    assert elapsed < 8.0  # one time-out of 1 s, not one per remaining sample


def test_workers_are_long_lived(grader):
    # The module state survives between samples: one interpreter serves many samples.
    res = grade_entries(grader, [{"sample": {"output_text": "calls"}, "item": {}} for _ in range(40)])
    counts = [r.reward for r in res]
    assert max(counts) >= 20 and all(c is not None for c in counts)


def test_source_that_fails_to_load_is_config_error():
    spec = parse_grader_spec({"type": "python", "source": "import no_such_module_xyz\ndef grade(s, i):\n  return 1"})
    with pytest.raises(ConfigError, match="No module named 'no_such_module_xyz'"):
        build_grader(spec)


def test_refuses_without_sandbox_unless_opted_out(monkeypatch):
    from distributed_ft.grader import sandbox

    monkeypatch.setattr(sandbox, "probe_sandbox", lambda: "unshare failed: test")
    spec = {"type": "python", "source": "def grade(s, i):\n  return 0.5", "workers": 1}
    with pytest.raises(ConfigError, match="needs a sandbox.*allow_unsandboxed"):
        build_grader(parse_grader_spec(spec))
    g = build_grader(parse_grader_spec({**spec, "allow_unsandboxed": True}))
    try:
        assert not g.pool.sandboxed
        assert grade_entries(g, [{"sample": {"output_text": "x"}, "item": {}}])[0].reward == 0.5
    finally:
        g.close()
