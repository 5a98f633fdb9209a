"""Small helpers shared across ganslim's modules."""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Tuple

import torch


def as_input_tuple(example_inputs: Any) -> Tuple[torch.Tensor, ...]:
    """Normalise model inputs: a tensor or a tuple/list of tensors -> tuple (passed positionally)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def first_output(out: Any) -> torch.Tensor:
    """The image tensor of a generator's output (first item of a tuple/list/dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_output(out[0])
    if isinstance(out, dict) and out:
        return first_output(next(iter(out.values())))
    raise TypeError(f"generator returned {type(out).__name__}, not an image tensor")


@contextlib.contextmanager
def in_float64(*modules: torch.nn.Module):
    """Run ``modules`` in float64 for the block, then give every floating parameter and buffer back its
    own storage (bit-exact; the tensors keep their identity, so optimizers and hooks are unaffected).

    Why: an export is checked by comparing two networks that compute the same function in a different
    order of operations. In float32 the difference is rounding, and how much depends on which CPU
    kernels run; in float64 a correct export differs by ~1e-12 of the output's scale, and a wrong one
    by far more, on every machine."""
    saved = []
    seen = set()
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                saved.append((t, t.data))
                t.data = t.data.double()
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


def as_float64(inputs: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def relative_difference(out: Any, ref: Any) -> float:
    """``max |out - ref| / max |ref|`` over the generators' image outputs (:func:`first_output`); nan
    when either is not finite."""
    out, ref = first_output(out), first_output(ref)
    if out.shape != ref.shape:
        raise ValueError(f"outputs differ in shape: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("nan")
    scale = float(ref.abs().max())
    return float((out.double() - ref.double()).abs().max()) / max(scale, 1e-12)


def set_training(model: torch.nn.Module, mode: bool) -> None:
    """``model.train(mode)``. When no module of ``model`` overrides ``train`` (the field's generators:
    none does), the flags are set in one flat pass instead of ``Module.train``'s recursion through
    ``Module.__setattr__``: the architecture search switches a supernet between train mode (BatchNorm
    re-estimation) and eval mode three times per candidate, each time through every module."""
    mods = list(model.modules())
    if any(type(m).train is not torch.nn.Module.train for m in mods):
        model.train(mode)
        return
    for m in mods:
        m.__dict__["training"] = mode  # what Module.__setattr__ does for a plain attribute
