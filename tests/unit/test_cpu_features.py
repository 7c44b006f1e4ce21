"""Native bf16 detection from /proc/cpuinfo text, and the run log's line and warning about it."""
from __future__ import annotations

import logging

import pytest

from distributed_ft.engine.cpu_allocator import users_choice
from distributed_ft.engine.cpu_features import cpu_model, native_bf16, read_cpuinfo, report_cpu_precision
from tests.conftest import run_dft

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme de pse avx avx2 fma bmi2 sha_ni
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm sve
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, native", [(EPYC, False), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True),
                                          ("", None), ("processor\t: 0\n", None)])
def test_native_bf16_from_cpuinfo(text, native):
    assert native_bf16(text) is native


def test_cpu_model_names_the_processor():
    assert cpu_model(EPYC) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model(GRAVITON3) == "unknown CPU"


@pytest.mark.parametrize("text, precision, warns", [(EPYC, "bf16", True), (EPYC, "no", False),
                                                    (SAPPHIRE_RAPIDS, "bf16", False)])
def test_report_warns_only_for_emulated_bf16(caplog, text, precision, warns):
    with caplog.at_level(logging.INFO, logger="distributed_ft"):
        report_cpu_precision(precision, text)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(infos) == 1 and infos[0].startswith("device: CPU (") and "bf16" in infos[0]
    assert len(warnings) == int(warns)
    if warns:
        assert "emulates" in warnings[0] and "training.mixed_precision=no" in warnings[0]


def test_a_cpu_run_logs_bf16_support_and_the_loss_path(tmp_path):
    """The run log of a CPU training run says whether bf16 is native and which loss path runs; asking for bf16
    on a CPU that emulates it adds one warning line."""
    proc = run_dft("train", "configs/full.yaml", f"output.dir={tmp_path / 'run'}", "training.max_steps=1",
                   "training.warmup_steps=0", "training.mixed_precision=bf16", "eval.enabled=false",
                   "logging.progress_bar=false", "data.train.0.num_examples=16", "data.train.1.num_examples=16",
                   "data.validation_fraction=0.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert sum(line.startswith("[dft] device: CPU (") for line in lines) == 1
    assert sum("loss: chunked cross-entropy over 1024 tokens" in line for line in lines) == 1
    emulated = native_bf16(read_cpuinfo()) is False
    assert sum("torch emulates it" in line for line in lines) == int(emulated)


@pytest.mark.parametrize("asked, cpuinfo, dtype, deepspeed, chosen", [
    ("auto", SAPPHIRE_RAPIDS, "fp32", False, "bf16"),   # native bf16: autocast
    ("auto", GRAVITON3, "fp32", False, "bf16"),
    ("auto", EPYC, "fp32", False, "no"),                # emulated: fp32 is faster
    ("auto", "", "fp32", False, "no"),                  # unknown: the safe choice
    ("auto", SAPPHIRE_RAPIDS, "bf16", False, "no"),     # the weights are bf16 already
    ("auto", SAPPHIRE_RAPIDS, "fp32", True, "no"),      # DeepSpeed on CPU trains in fp32
    ("bf16", EPYC, "fp32", False, "bf16"),              # asked for: kept (and warned about at run time)
    ("no", SAPPHIRE_RAPIDS, "fp32", False, "no"),
])
def test_auto_mixed_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, asked, cpuinfo, dtype, deepspeed,
                                                                     chosen):
    import torch

    from distributed_ft.engine import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: cpuinfo)
    assert precision.resolve_mixed_precision(asked, dtype, deepspeed)[0] == chosen


def test_a_run_says_which_precision_it_chose(tmp_path):
    proc = run_dft("train", "configs/full.yaml", f"output.dir={tmp_path / 'run'}", "training.max_steps=1",
                   "training.warmup_steps=0", "eval.enabled=false", "logging.progress_bar=false",
                   "data.train.0.num_examples=16", "data.train.1.num_examples=16", "data.validation_fraction=0.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("[dft] device: CPU (")]
    native = native_bf16(read_cpuinfo())
    expected = "bf16 autocast (auto: this CPU computes bf16 natively)" if native else "fp32 (auto: this CPU"
    assert f"precision {expected}" in line, line
    chosen = users_choice()  # the user's allocator settings are left alone
    assert (f"memory: the allocator as set ({chosen})" if chosen else "memory: freed memory kept for reuse") in line, \
        line


@pytest.mark.parametrize("bf16_supported, chosen", [(True, "bf16"), (False, "no")])
def test_auto_mixed_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, bf16_supported, chosen):
    import torch

    from distributed_ft.engine import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert precision.resolve_mixed_precision("auto")[0] == chosen
    assert precision.resolve_mixed_precision("auto", "fp32", False, "a reason")[0] == "no"
