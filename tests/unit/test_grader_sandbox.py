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
from tests.conftest import skip_or_fail_in_ci



@pytest.fixture(autouse=True)
def _needs_the_sandbox():
    if probe_sandbox() is not None:
        skip_or_fail_in_ci(f"no sandbox here: {probe_sandbox()}")

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
    assert "Connection refused" in by_mode["net"].error  # only the sandbox's own loopback exists
    assert by_mode["write"].error and not outside.exists()  # the host's folders do not exist inside
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


READER = '''
import os

def grade(sample, item):
    path = sample["output_text"]
    if path == "numpy":
        import numpy
        return float(numpy.arange(4).sum())
    if path == "long":
        raise ValueError("x" * 5000)
    if os.path.isdir(path):
        return float(len(os.listdir(path)))
    with open(path) as fh:
        return float(len(fh.read()))
'''


def test_the_sandbox_sees_only_its_allowlist(tmp_path):
    """Files of the host (secrets, the home folder, the checkout) do not exist inside, while a grader that
    imports numpy still scores. Planted bug seen failing: /etc and /root bound into the sandbox."""
    from pathlib import Path
    import secrets

    import distributed_ft
    from distributed_ft.grader.sandbox import ERROR_TEXT_CAP

    token = Path.home() / f".dft-sandbox-test-token-{secrets.token_hex(4)}"
    token.write_text("hf_secret")
    repo_file = Path(distributed_ft.__file__).resolve().parents[1] / "README.md"
    secret_paths = ["/etc/shadow", "/etc/passwd", "/root", str(Path.home()), str(token), str(repo_file),
                    str(Path(distributed_ft.__file__)), os.path.join(os.sys.prefix, "pyvenv.cfg")]
    g = build_grader(parse_grader_spec({"type": "python", "source": READER, "workers": 1, "timeout_s": 10}))
    try:
        res = grade_entries(g, [{"sample": {"output_text": p}, "item": {}} for p in secret_paths + ["numpy", "long"]])
    finally:
        g.close()
        token.unlink()
    for path, result in zip(secret_paths, res):
        assert result.reward is None and "FileNotFoundError" in result.error, (path, result)
    assert res[-2].reward == 6.0
    assert res[-1].reward is None and len(res[-1].error) == ERROR_TEXT_CAP and "ValueError: xxx" in res[-1].error
