"""Optional dependencies (``pip install 'ganslim[<extra>]'``), imported where they are first needed.

ganslim's core (compression, adapters, checkpoints, measurement) needs only torch and light packages,
so that ``pip install ganslim`` inside an existing training environment leaves that environment as it
is. What only some users need is an extra:

* ``quant``: int8 quantization-aware training (NVIDIA ModelOpt, plus ``requests`` and
  ``huggingface_hub``, which ModelOpt imports without declaring them);
* ``deploy``: ONNX export and the onnxruntime runner (``onnx``, ``onnxruntime``);
* ``all``: both.

:func:`require` imports a module of an extra and, when it (or one of its own imports) is missing,
raises ``ModuleNotFoundError`` with the command that installs the extra.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# extra -> (what it is for, the distributions it installs)
EXTRAS = {
    "quant": ("int8 quantization (ganslim.quantization, quant='int8')", "nvidia-modelopt, requests, huggingface_hub"),
    "deploy": ("ONNX export and the onnxruntime runner (ganslim.export, OnnxModule, onnxruntime benchmarks)",
               "onnx, onnxruntime"),
}


def hint(extra: str) -> str:
    """The install command for ``extra``, with what it is for."""
    what, dists = EXTRAS.get(extra, (f"the {extra!r} features", extra))
    return f"{what} needs the ganslim[{extra}] extra: pip install 'ganslim[{extra}]' (installs {dists})"


def require(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``; when that fails for a missing module, a
    ``ModuleNotFoundError`` whose message names ``pip install 'ganslim[<extra>]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or module
        raise ModuleNotFoundError(f"No module named {missing!r} (needed by {module}): {hint(extra)}",
                                  name=missing) from e
