"""On CPU the engine makes glibc keep freed memory for the next step: freed tensors' pages stay in the process (no
new page faults when the next step allocates again), except very large blocks, which go back to the system as
before; unless the user chose allocator settings."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")

# resident memory with and after one tensor of 256 MiB, then before, with and after 16 tensors of 16 MiB
PROBE = """
import json, os, sys
import torch
from distributed_ft.engine.cpu_allocator import keep_freed_memory

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

said = keep_freed_memory() if sys.argv[1] == "keep" else None
tensor = torch.ones(64 << 20)  # first: later, the heap's own free space may serve a block this large
held_large = resident()
del tensor
after_large = before = resident()
tensors = [torch.ones(4 << 20) for _ in range(16)]
held = resident()
del tensors
print(json.dumps({"said": said, "before": before, "held": held, "after": resident(), "held_large": held_large,
                  "after_large": after_large}))
"""
MIB = 1 << 20


def probe(mode: str, **env) -> dict:
    # without the settings the engine leaves alone (cpu_allocator.users_choice), so the probe sees glibc's defaults
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("MALLOC_", "GLIBC_TUNABLES")) and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**environ, **env}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_memory_stays_in_the_process_only_when_kept():
    default, kept = probe("default"), probe("keep")
    assert default["held"] - default["before"] > 200 * MIB  # the tensors were resident
    assert default["held"] - default["after"] > 200 * MIB   # glibc gave it back: the next step faults it in again
    assert kept["held"] - kept["before"] > 200 * MIB
    assert kept["held"] - kept["after"] < 16 * MIB           # kept for the next allocation
    assert kept["held_large"] - kept["after_large"] > 200 * MIB  # above 32 MiB: given back
    assert "kept for reuse" in kept["said"]


def test_the_users_allocator_settings_are_left_alone():
    chosen = probe("keep", MALLOC_ARENA_MAX="2")
    assert chosen["said"] == "the allocator as set (MALLOC_ARENA_MAX)"
    assert chosen["held"] - chosen["after"] > 200 * MIB     # glibc's default behaviour, untouched
