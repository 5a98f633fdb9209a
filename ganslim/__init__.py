"""ganslim: compress existing GAN generators.

Public API (kept stable): ``compress``, ``save``, ``load``, ``bench``, ``export``, ``make_supernet``.
Submodules (imported on first use, e.g. ``ganslim.adapters.SlimSession``): ``zoo`` (reference
generators), ``data`` (embedded default data), ``measure`` (MACs, params, latency, fidelity),
``checkpoint`` (safetensors save/load), ``quantization`` (QAT with ModelOpt), ``deploy`` (ONNX / int8
ONNX export, onnxruntime runner), ``slicing`` / ``supernet`` / ``search`` (once-for-all), ``onestep``,
``evolve``, ``distributed`` (torchrun), ``adapters`` (official repositories).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names resolved lazily so `import ganslim` stays cheap and each submodule stands alone.
_LAZY = {
    "save": "ganslim.checkpoint",
    "load": "ganslim.checkpoint",
    "compress": "ganslim.compression",
    "CompressConfig": "ganslim.config",
    "CompressResult": "ganslim.compression",
    "bench": "ganslim.benchmarking",
    "export": "ganslim.deploy",
    "quantize": "ganslim.quantization",
    "make_supernet": "ganslim.slicing",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"ganslim.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"ganslim.{name}":
                raise
    raise AttributeError(f"module 'ganslim' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
