"""ganslim: compress existing GAN generators.

Public API (kept stable): ``compress``, ``save``, ``load``, ``bench``, ``export``, ``make_supernet``.

Layout (subpackages imported on first use, e.g. ``ganslim.adapters.SlimSession``):

* ``compression`` (``compress``), ``config`` (``CompressConfig``), ``cli``, ``demo``, ``data``;
* ``strategies``: one file per compression strategy, in a registry;
* ``core``: channel groups, gates, the slim controller, distillation, the training loop, torchrun;
* ``pruning``: one-step threshold, genetic masks, width slicing, supernet training and search,
  device-aware budgets;
* ``deployment``: checkpoints, ONNX / int8 ONNX, quantization-aware training (not named ``export``:
  that is the function ``ganslim.export``);
* ``measure``: MACs, params, latency, fidelity, side-by-side benchmarks, the report;
* ``zoo`` (reference generators), ``adapters`` (official repositories).

The flat paths of earlier releases (``ganslim.gating``, ``ganslim.checkpoint`` ...) still import, for
one release (:mod:`ganslim._compat`).
"""
from __future__ import annotations

import importlib

from . import _compat

__version__ = "0.1.0"

_compat.install()

# Public names resolved lazily so `import ganslim` stays cheap and each submodule stands alone.
_LAZY = {
    "save": "ganslim.deployment.checkpoint",
    "load": "ganslim.deployment.checkpoint",
    "compress": "ganslim.compression",
    "CompressConfig": "ganslim.config",
    "CompressResult": "ganslim.compression",
    "bench": "ganslim.measure.benchmarking",
    "export": "ganslim.deployment.deploy",
    "quantize": "ganslim.deployment.quantization",
    "make_supernet": "ganslim.pruning.slicing",
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
