"""Memory layout of training: channels-last (NHWC) tensors for the convolutions.

Why: on CPU, oneDNN runs convolutions natively in NHWC; with PyTorch's default NCHW tensors each conv
reorders its input and output. ``benchmarks/bench_layout.py`` (batch-8 training steps of 64x64 crops,
forward + backward + Adam, 2 AVX2 cores) measured the gain to depend on the network: a 1/40
depthwise-separable student of the default teacher trained 1.33x faster in channels-last (depthwise
convs have the least arithmetic per byte moved, so the reorders weigh most there), while plain-conv
generators ranged from 0.84x (U-Net 256) to 1.10x (the default teacher). Inference at batch 1 was
faster for every network measured (1.07x-1.89x). So ``"auto"`` trains in channels-last only a network
with depthwise convs, on CPU.

The layout is a property of the tensors, not of the network: the same module computes the same
function either way (up to floating-point summation order). :func:`channels_last` converts the
4-D parameters and buffers of the given modules for the duration of a ``with`` block and converts
exactly those back afterwards, so checkpoints, exports and the caller's own modules leave training
in the layout they entered it. Convert the teacher with its student: a student that starts as the
teacher's copy then computes bit-identical outputs, and the L1 to the teacher's output stays exactly
0 instead of a subgradient of rounding noise.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

__all__ = ["MEMORY_FORMATS", "has_depthwise_conv", "resolve_memory_format", "channels_last", "to_channels_last", "channels_last_failure",
           "runs_channels_last", "ChannelsLast"]

# "auto": channels-last where it was measured to help (CPU, a network with depthwise convs), NCHW elsewhere
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def has_depthwise_conv(model: nn.Module) -> bool:
    """Whether ``model`` has a depthwise convolution (groups == in_channels > 1)."""
    return any(isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def resolve_memory_format(setting: str, device: str | torch.device = "cpu", model: Optional[nn.Module] = None) -> bool:
    """Whether to train ``model`` in channels-last: ``"channels_last"`` yes, ``"contiguous"`` no,
    ``"auto"`` yes on CPU for a network with depthwise convs (the 1/40 separable student's training
    steps 1.33x faster, ``benchmarks/bench_layout.py``), no otherwise (plain-conv generators trained
    within -16% to +10% of NCHW there; CUDA not measured)."""
    if setting not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cpu" and model is not None and has_depthwise_conv(model)
    return setting == "channels_last"


def _four_d(modules) -> Iterator[torch.Tensor]:
    seen = set()
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.dim() == 4 and id(t) not in seen:
                seen.add(id(t))
                yield t


@contextlib.contextmanager
def channels_last(*modules: Optional[nn.Module]) -> Iterator[None]:
    """Within the block, the 4-D parameters and buffers of ``modules`` (None entries skipped) are
    channels-last; on exit (also on an exception) the ones converted go back to contiguous NCHW.
    Parameters keep their identity (``.data`` is swapped), so optimizers holding them stay valid."""
    converted = []
    try:
        with torch.no_grad():
            for t in _four_d(modules):
                if t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last):
                    t.data = t.data.contiguous(memory_format=torch.channels_last)
                    converted.append(t)
        yield
    finally:
        with torch.no_grad():
            for t in converted:
                t.data = t.data.contiguous()
                if isinstance(t, nn.Parameter) and t.grad is not None:
                    t.grad = t.grad.contiguous()


def to_channels_last(tensors: tuple) -> tuple:
    """The 4-D tensors of ``tensors`` in channels-last (the others as they are)."""
    return tuple(t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t
                 for t in tensors)


def channels_last_failure(model: nn.Module, inputs: tuple) -> Optional[str]:
    """Why ``model`` cannot run channels-last inputs (e.g. a ``.view`` on an activation that needs
    NCHW strides), or None when it can. Runs one forward in eval mode without gradients, inside
    :func:`channels_last`, so nothing of the model changes."""
    was_training = model.training
    try:
        with channels_last(model), torch.no_grad():
            model.eval()(*to_channels_last(inputs))
    except RuntimeError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    finally:
        model.train(was_training)
    return None


def runs_channels_last(nets: Mapping[str, nn.Module], inputs: tuple) -> bool:
    """Whether every network of ``nets`` (name -> module) runs channels-last ``inputs``
    (:func:`channels_last_failure`); when one does not, warns naming it and returns False (the
    caller trains in NCHW)."""
    for who, net in nets.items():
        why = channels_last_failure(net, inputs)
        if why is not None:
            warnings.warn(f"training in NCHW: the {who} fails on channels-last inputs ({why}); pass "
                          "memory_format='contiguous' to skip this check", stacklevel=3)
            return False
    return True


class ChannelsLast(nn.Module):
    """Runs ``model`` (its own copy) in channels-last: 4-D parameters and buffers converted once,
    4-D inputs converted on each call; outputs are channels-last tensors of the same values. For
    CPU inference, where every network measured ran faster this way at batch 1
    (``benchmarks/bench_layout.py``); ``ganslim bench --runtimes eager-channels-last`` times it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        import copy

        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, *inputs):
        return self.model(*to_channels_last(inputs))
