"""Arithmetic of training: float32, or the convolutions in bf16 (``train_precision="bf16"``).

Under :func:`autocast` the convolutions and linear layers compute in bf16 (torch.autocast casts
their inputs and weights), and hand their outputs back in float32: the weights, the optimizer's
state, the normalisations, the residual sums, the activations and the losses stay float32, and the
image-facing convs (RGB in or out) compute in float32 too. bf16 keeps float32's exponent range, so
no loss scaling is needed.

Why opt-in, not the default: ``benchmarks/bench_precision.py`` on a 2-core CPU with AMX measured
training steps 1.7-1.9x faster for teacher-sized ResNets and CartoonGAN (SPADE 1.45x, U-Net 0.91x)
but only 1.07-1.30x for the default teacher's plain students (0.79x: the separable one), and every
compression it ran in bf16 ended below float32 at the same seed: -0.14 dB (uniform 1/10), -0.27 dB
(onestep 1/20), -1.43 dB (slim 1/10, whose gated first stage trains the full-width network), for
0.71-0.98x of the wall time. Use it where time matters more than the last tenths of a dB, and measure.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

__all__ = ["TRAIN_PRECISIONS", "native_bf16_cpu", "check_train_precision", "autocast"]

TRAIN_PRECISIONS = ("fp32", "bf16")


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 convolutions natively (AMX tiles or AVX512-BF16) and this torch's
    oneDNN uses them; elsewhere bf16 is emulated and slower than float32."""
    try:
        return bool((torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # torch builds without the private probes: assume not
        return False


def check_train_precision(setting: str) -> str:
    """``setting`` if it is one of :data:`TRAIN_PRECISIONS`, else a ValueError."""
    if setting not in TRAIN_PRECISIONS:
        raise ValueError(f"train_precision must be one of {TRAIN_PRECISIONS}, got {setting!r}")
    return setting


# A conv with this few channels on a side faces the image (RGB in, RGB out): it gains nothing from
# bf16 units and carries the image's own precision, so it stays float32 (as in the int8 export).
IMAGE_CHANNELS = 4


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device = "cpu",
             modules: Iterable[Optional[nn.Module]] = ()) -> Iterator[None]:
    """Within the block, the convolutions and linear layers of ``modules`` compute in bf16 when
    ``precision`` is ``"bf16"``; nothing changes for ``"fp32"``.

    Only their arithmetic is bf16 (torch.autocast casts their inputs and weights): each hands its
    output back in float32, so the normalisations, residual additions and activations between them
    stay float32 (a residual trunk summed in bf16 can round away the small corrections each block
    adds; a variant with everything in bf16 lost more fidelity in bench_precision.py),
    and the image-facing convs (``IMAGE_CHANNELS`` or fewer channels in or out) run in float32."""
    if precision != "bf16":
        yield
        return
    dev = torch.device(device).type
    layers = [m for mod in modules if mod is not None for m in mod.modules()
              if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    thin = {m for m in layers if isinstance(m, nn.modules.conv._ConvNd)
            and min(m.in_channels, m.out_channels) <= IMAGE_CHANNELS}

    def float32_in(module, inputs):
        torch.set_autocast_enabled(dev, False)  # back on after the layer (below), and at the block's end
        return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)

    def float32_out(module, inputs, output):
        if module in thin:
            torch.set_autocast_enabled(dev, True)
        return output.float() if isinstance(output, torch.Tensor) and output.dtype == torch.bfloat16 else output

    hooks = [m.register_forward_pre_hook(float32_in) for m in thin]
    hooks += [m.register_forward_hook(float32_out) for m in layers]
    try:
        with torch.autocast(dev, dtype=torch.bfloat16):
            yield
    finally:
        for h in hooks:
            h.remove()
