"""A thin convolution (a few output channels, e.g. a generator's 7x7 conv to RGB) computed as a
strided convolution with ``s*s`` times the output channels, then depth-to-space.

oneDNN's CPU convolutions compute output channels in blocks of 8/16 (one vector register), so a
conv to 3 channels costs about what a conv to 16 does: on the search's held-out photo (256x384) the
7x7 output conv was the largest single call of a candidate's forward. The same conv is exactly

    y[o, s*P + r_h, s*Q + r_w] = conv2d(x, W, stride=s)[o*s*s + r_h*s + r_w, P, Q]

with ``W[o, r_h, r_w]`` the original kernel shifted by ``(r_h, r_w)`` inside a kernel ``s-1`` taps
larger (zeros elsewhere), followed by ``pixel_shuffle`` and a crop: ``(k+s-1)^2 / k^2`` times the
multiply-adds (1.3x for 7x7, s=2) in a shape that fills the registers (12 of 16 lanes instead of 3).
The sums are the original ones with zero products added, so the result equals the direct conv up to
float rounding. ``benchmarks/bench_search.py`` times a search's candidates with both forms in turns
(its "thin output conv, paired" line; the AMD EPYC: 0.95 of the time, the same fitnesses bit for bit). The same identity in an ONNX graph: :func:`ganslim.deployment.onnx_rewrite.space_to_depth_thin_conv`.

Used by the supernet's sliced forward (:mod:`ganslim.pruning.slicing`) when no gradient is taken,
i.e. in the search's candidate evaluations; training keeps the direct conv.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["THIN_MAX_OUT", "is_thin", "strided_weight", "thin_conv2d"]

THIN_MAX_OUT = 4  # at most this many output channels: with 4*4 = 16 outputs the strided form fills a register
_STRIDE = 2


def is_thin(weight: torch.Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int,
            max_out: int = THIN_MAX_OUT) -> bool:
    """Whether a conv2d with this ``weight`` (``[C_out, C_in, kh, kw]``) is rewritten: at most
    ``max_out`` outputs, kernel at least 3x3, stride 1, dilation 1, one group."""
    return (weight.dim() == 4 and weight.shape[0] <= max_out and min(weight.shape[2:]) >= 3 and groups == 1
            and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1))


def strided_weight(weight: torch.Tensor, s: int = _STRIDE) -> torch.Tensor:
    """``[C_out, C_in, kh, kw]`` -> ``[C_out*s*s, C_in, kh+s-1, kw+s-1]``: output ``o*s*s + r_h*s + r_w``
    holds the kernel shifted by ``(r_h, r_w)`` (the phase that ``pixel_shuffle`` puts at row offset
    ``r_h``, column offset ``r_w``)."""
    co, ci, kh, kw = weight.shape
    w = weight.new_zeros(co, s, s, ci, kh + s - 1, kw + s - 1)
    for rh in range(s):
        for rw in range(s):
            w[:, rh, rw, :, rh:rh + kh, rw:rw + kw] = weight
    return w.reshape(co * s * s, ci, kh + s - 1, kw + s - 1)


def thin_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int] = (0, 0),
                s: int = _STRIDE) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=padding)`` (``x``: ``[N, C_in, H, W]``, zero padding
    ``(p_h, p_w)``) computed in the strided form above; the output ``[N, C_out, H', W']`` in ``x``'s
    memory format. Equal to the direct conv up to float rounding."""
    kh, kw = weight.shape[2:]
    ph, pw = (int(p) for p in padding)
    h, w_ = x.shape[-2] + 2 * ph, x.shape[-1] + 2 * pw
    ho, wo = h - kh + 1, w_ - kw + 1
    # rows / columns the strided conv reads: whole phases of s outputs, the last phase's extra taps
    need_h = s * ((ho + s - 1) // s - 1) + kh + s - 1
    need_w = s * ((wo + s - 1) // s - 1) + kw + s - 1
    if ph or pw or need_h > h or need_w > w_:  # zeros: the padding asked for, then what the last phase reads
        x = F.pad(x, (pw, pw + need_w - w_, ph, ph + need_h - h))
    b = None if bias is None else bias.repeat_interleave(s * s)
    y = F.pixel_shuffle(F.conv2d(x, strided_weight(weight, s), b, stride=s), s)
    if y.shape[-2] != ho or y.shape[-1] != wo:
        y = y[..., :ho, :wo]
    return y
