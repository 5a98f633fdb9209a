"""The machine line every benchmark writes into its results: CPU model and the kernel-relevant flags."""
from __future__ import annotations

import os
import platform

import torch

from ganslim.measure.latency_table import device_fingerprint
from ganslim.measure.machine import cpu_features, cpu_flags, cpu_model, describe_machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 avx512vl
power management:

processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 avx512vl
"""


def test_model_and_kernel_flags_come_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert cpu_model(str(info)) == "AMD EPYC 9R14 96-Core Processor"
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vl"}
    # only the flags that choose kernels, in a fixed order; no AMX on this CPU
    assert cpu_features(str(info)) == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    line = describe_machine(threads=3, cpuinfo=str(info))
    assert line.startswith("AMD EPYC 9R14 96-Core Processor (")
    assert "avx512_vnni avx512_bf16)" in line and "amx" not in line
    assert f"{os.cpu_count()} cores, 3 threads, torch {torch.__version__}" in line
    assert describe_machine(threads=1, onnxruntime=True, cpuinfo=str(info)).split(", ")[-1].startswith("onnxruntime ")


def test_without_cpuinfo_the_platform_names_the_machine(tmp_path):
    missing = str(tmp_path / "none")
    assert cpu_model(missing) == (platform.processor() or platform.machine())
    assert cpu_features(missing) == [] and cpu_flags(missing) is None  # int8_saturates then assumes the worst
    assert describe_machine(threads=2, cpuinfo=missing).startswith(f"{cpu_model(missing)} ({platform.machine()}), ")


def test_the_latency_tables_fingerprint_names_this_cpu():
    # the latency cache is keyed by the CPU model: the same name the benchmarks' machine line gives
    safe = "".join(ch if ch.isalnum() or ch in ".+-" else "-" for ch in cpu_model())
    assert device_fingerprint("eager", threads=2).startswith(f"{safe}_2t_torch")
