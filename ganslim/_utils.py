"""Small helpers shared across ganslim's modules."""
from __future__ import annotations

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
