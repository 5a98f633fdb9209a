"""Old import paths, kept for one release: ``ganslim.gating`` is ``ganslim.core.gating`` and so on.

The flat modules moved into subpackages that show the architecture (``core``, ``pruning``,
``strategies``, ``deployment``, ``measure``). A meta-path finder answers the old names with the *same*
module objects (not copies): ``from ganslim.gating import GateSet`` gives the class that
``ganslim.core.gating`` defines, monkeypatching either name patches both, and pickles written with
the old paths (resumable stage checkpoints) still load. Importing an old path warns once.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old module -> where it lives now
    "ganslim.targeting": "ganslim.core.targeting",
    "ganslim.gating": "ganslim.core.gating",
    "ganslim.slimming": "ganslim.core.slimming",
    "ganslim.distill": "ganslim.core.distill",
    "ganslim.train": "ganslim.core.train",
    "ganslim.distributed": "ganslim.core.distributed",
    "ganslim.genetic": "ganslim.core.genetic",
    "ganslim.onestep": "ganslim.pruning.onestep",
    "ganslim.evolve": "ganslim.pruning.evolve",
    "ganslim.slicing": "ganslim.pruning.slicing",
    "ganslim.supernet": "ganslim.pruning.supernet",
    "ganslim.search": "ganslim.pruning.search",
    "ganslim.device_aware": "ganslim.pruning.device_aware",
    "ganslim.checkpoint": "ganslim.deployment.checkpoint",
    "ganslim.archspec": "ganslim.deployment.archspec",
    "ganslim.deploy": "ganslim.deployment.deploy",
    "ganslim.onnx_rewrite": "ganslim.deployment.onnx_rewrite",
    "ganslim.quantization": "ganslim.deployment.quantization",
    "ganslim.benchmarking": "ganslim.measure.benchmarking",
    "ganslim.report": "ganslim.measure.report",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path works for one release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(MOVED[spec.name])  # the module itself keeps its own name and spec

    def exec_module(self, module):
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
