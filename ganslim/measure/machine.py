"""The machine a measurement ran on, for the results of every benchmark.

Why: latency ratios, int8 speed-ups and even trained PSNRs (other kernels round differently, and
training follows the rounding) depend on the CPU, and the same commands have run on Intel Xeons with
AMX and on AMD EPYCs without it. ``platform.machine()`` only says ``x86_64``; the CPU model and the
instruction-set extensions the int8 and bf16 kernels dispatch on tell them apart.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

__all__ = ["cpu_model", "cpu_flags", "cpu_features", "describe_machine", "KERNEL_FEATURES"]

# the x86 flags that change which convolution kernels run: vector width, int8 dot products
# (VNNI; without it onnxruntime's u8 x s8 products saturate), native bf16, AMX tiles
KERNEL_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo_field(name: str, cpuinfo: str) -> Optional[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model(cpuinfo: str = CPUINFO) -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``, e.g. ``"AMD EPYC"``), else what
    :func:`platform.processor` or :func:`platform.machine` say."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str = CPUINFO) -> Optional[frozenset]:
    """The CPU's feature flags (``/proc/cpuinfo``'s ``flags``), or None where they cannot be read (not
    Linux, not x86, no such file)."""
    flags = _cpuinfo_field("flags", cpuinfo)
    return None if flags is None else frozenset(flags.split())


def cpu_features(cpuinfo: str = CPUINFO) -> list[str]:
    """Which of :data:`KERNEL_FEATURES` the CPU has, in that order (empty where the flags cannot be
    read, e.g. not Linux or not x86)."""
    flags = cpu_flags(cpuinfo) or frozenset()
    return [f for f in KERNEL_FEATURES if f in flags]


def describe_machine(threads: Optional[int] = None, onnxruntime: bool = False, cpuinfo: str = CPUINFO) -> str:
    """One line naming the machine, e.g. ``"AMD EPYC (x86_64; avx2 avx512f avx512_vnni avx512_bf16),
    2 cores, 2 threads, torch 2.13.0+cpu"``; ``threads`` default: ``torch.get_num_threads()``;
    ``onnxruntime``: add its version."""
    import torch

    feats = " ".join(cpu_features(cpuinfo))
    line = (f"{cpu_model(cpuinfo)} ({platform.machine()}{'; ' + feats if feats else ''}), {os.cpu_count()} cores, "
            f"{threads if threads is not None else torch.get_num_threads()} threads, torch {torch.__version__}")
    if onnxruntime:
        try:
            import onnxruntime as ort

            line += f", onnxruntime {ort.__version__}"
        except ImportError:
            line += ", no onnxruntime"
    return line
