"""Whether this CPU computes bf16 natively; where it does not, torch emulates bf16 through fp32, slowly."""
from __future__ import annotations

from pathlib import Path

from distributed_ft.engine.logging import logger

CPUINFO = Path("/proc/cpuinfo")
# x86: AVX512-BF16 or AMX-BF16 instructions; Arm: the BF16 extension ("Features" line)
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def read_cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text()
    except OSError:  # not Linux
        return None


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor listed (x86 "flags", Arm "Features")."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model"):
            return value.strip()
    return "unknown CPU"


def native_bf16(cpuinfo: str | None) -> bool | None:
    """True or False from the CPU's flags; None when they cannot be read."""
    if not cpuinfo:
        return None
    flags = cpu_flags(cpuinfo)
    return bool(flags & BF16_FLAGS) if flags else None


def report_cpu_precision(mixed_precision: str, cpuinfo: str | None = None, precision: str | None = None,
                         allocator: str | None = None) -> None:
    """Log whether bf16 is native here (and `precision`, the run's choice; `allocator`, what cpu_allocator did),
    and warn when bf16 mixed precision is asked for where it is emulated."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    native = native_bf16(cpuinfo)
    where = cpu_model(cpuinfo) if cpuinfo else "this CPU"
    state = {True: "native", False: "emulated (no avx512_bf16/amx_bf16)", None: "unknown"}[native]
    logger.info(f"device: CPU ({where}); bf16 {state}" + (f"; precision {precision}" if precision else "")
                + (f"; memory: {allocator}" if allocator else ""))
    if mixed_precision == "bf16" and native is False:
        logger.warning("training.mixed_precision=bf16 on a CPU without native bf16: torch emulates it, which is "
                       "usually slower than fp32 (set training.mixed_precision=no)")
