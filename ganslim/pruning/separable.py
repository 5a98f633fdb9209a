"""Depthwise-separable factorisation: the student architecture of the 40x results (GAN Compression's
and CAT's mobile ResNet, OMGD's students), made from any generator.

A ``k x k`` convolution ``C_in -> C_out`` costs ``k^2 C_in C_out`` MACs per output pixel; a depthwise
``k x k`` conv plus a pointwise ``1 x 1`` conv cost ``k^2 C + C_in C_out`` (``C`` the depthwise
conv's channels). :func:`make_separable` replaces, in place and by module (peft-style: the user's
class is not touched), every plain ``nn.Conv2d`` / ``nn.ConvTranspose2d`` for which this is cheaper by
an ``nn.Sequential`` of the two, so the result is still a plain ``torch.nn`` network: channel groups,
pruning, export and int8 work on it unchanged.

Which side is depthwise:

* strided convs: depthwise first (it takes the stride), so the pointwise conv runs at the lower
  output resolution;
* transposed convs: pointwise first, at the lower input resolution, then a depthwise transposed conv
  (it takes the stride and output padding);
* stride 1: the depthwise conv runs on the wider side (``C_in >= C_out``: first, else second), so the
  network keeps ``max(C_in, C_out)`` spatial filters.

``init="teacher"``: each channel's depthwise filter and its pointwise column (or row) are the best
rank-1 approximation (SVD) of the original kernel's slice for that channel, ``W[o, i, :, :] ~=
P[o, i] * D[c, :, :]``; the bias moves to the second conv. ``init="scratch"``: PyTorch's default
initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..core.targeting import module_matches

__all__ = ["SEPARABLE_INITS", "Factorization", "separable_cost", "factorize_conv", "convertible_convs",
           "make_separable"]

SEPARABLE_INITS = ("teacher", "scratch")


@dataclass(frozen=True)
class Factorization:
    """How one conv is factorised: ``depthwise_first`` and the MACs per output pixel before and after."""

    name: str
    depthwise_first: bool
    macs_before: float  # per output pixel
    macs_after: float

    @property
    def ratio(self) -> float:
        return self.macs_after / self.macs_before


def _plain_conv(m: nn.Module) -> bool:
    # exact types: a subclass may change forward (weight standardisation, custom padding...)
    return type(m) in (nn.Conv2d, nn.ConvTranspose2d) and m.groups == 1 and m.weight.shape[-2:].numel() > 1


def separable_cost(conv: nn.Module, name: str = "") -> Optional[Factorization]:
    """The factorisation of ``conv`` and its MACs per output pixel before/after (the papers'
    convention: a transposed conv counted by its output; the pointwise conv of a transposed conv runs
    at ``1 / prod(stride)`` of the output's pixels). None when ``conv`` is not a plain ungrouped
    ``k x k`` (k > 1) ``nn.Conv2d`` / ``nn.ConvTranspose2d``."""
    if not _plain_conv(conv):
        return None
    cin, cout = conv.in_channels, conv.out_channels
    k2 = conv.weight.shape[-2:].numel()
    before = float(k2 * cin * cout)
    if isinstance(conv, nn.ConvTranspose2d):
        upscale = float(torch.tensor(conv.stride).prod())
        return Factorization(name, False, before, cin * cout / upscale + k2 * cout)
    strided = any(s > 1 for s in conv.stride)
    dw_first = strided or cin >= cout
    return Factorization(name, dw_first, before, (k2 * cin if dw_first else k2 * cout) + cin * cout)


@torch.no_grad()
def _rank1(slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``slices (C, A, K) -> (u (C, A), v (C, K))`` with ``slices[c] ~= outer(u[c], v[c])`` (SVD), the
    singular value split evenly between the two factors."""
    U, S, Vh = torch.linalg.svd(slices.double(), full_matrices=False)
    s = S[:, :1].sqrt()
    return (U[:, :, 0] * s).to(slices.dtype), (Vh[:, 0, :] * s).to(slices.dtype)


def factorize_conv(conv: nn.Module, init: str = "teacher") -> nn.Sequential:
    """``conv`` (plain ``nn.Conv2d`` / ``nn.ConvTranspose2d``, groups 1, kernel > 1x1) as an
    ``nn.Sequential`` of a depthwise and a pointwise conv (order: module docstring); same input and
    output shapes, device and dtype. ``init``: ``"teacher"`` (per-channel rank-1 SVD of the kernel)
    or ``"scratch"``."""
    if init not in SEPARABLE_INITS:
        raise ValueError(f"init must be one of {SEPARABLE_INITS}, got {init!r}")
    plan = separable_cost(conv)
    if plan is None:
        raise ValueError(f"cannot factorise {conv!r}: only plain ungrouped Conv2d / ConvTranspose2d with a kernel above 1x1")
    cin, cout, ks = conv.in_channels, conv.out_channels, conv.kernel_size
    has_bias = conv.bias is not None
    kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    W = conv.weight.detach()
    if isinstance(conv, nn.ConvTranspose2d):  # W: (in, out, kh, kw); W[i, o] ~= P[o, i] D[o]
        pw = nn.Conv2d(cin, cout, 1, bias=False, **kw)
        dw = nn.ConvTranspose2d(cout, cout, ks, conv.stride, conv.padding, conv.output_padding, groups=cout,
                                bias=has_bias, dilation=conv.dilation, **kw)
        first, second, slices = pw, dw, W.permute(1, 0, 2, 3).reshape(cout, cin, -1)
    elif plan.depthwise_first:  # W: (out, in, kh, kw); W[o, i] ~= P[o, i] D[i]
        dw = nn.Conv2d(cin, cin, ks, conv.stride, conv.padding, conv.dilation, groups=cin, bias=False,
                       padding_mode=conv.padding_mode, **kw)
        pw = nn.Conv2d(cin, cout, 1, bias=has_bias, **kw)
        first, second, slices = dw, pw, W.permute(1, 0, 2, 3).reshape(cin, cout, -1)
    else:  # W[o, i] ~= P[o, i] D[o]
        pw = nn.Conv2d(cin, cout, 1, bias=False, **kw)
        dw = nn.Conv2d(cout, cout, ks, conv.stride, conv.padding, conv.dilation, groups=cout, bias=has_bias,
                       padding_mode=conv.padding_mode, **kw)
        first, second, slices = pw, dw, W.reshape(cout, cin, -1)
    if init == "teacher":
        u, v = _rank1(slices)  # per depthwise channel c: u[c] over the other side's channels, v[c] over the kernel
        with torch.no_grad():
            dw.weight.copy_(v.reshape(dw.weight.shape))
            if pw is first:  # the depthwise conv is on the output side
                pw.weight.copy_(u.reshape(pw.weight.shape))  # (out = c, in)
            else:
                pw.weight.copy_(u.t().reshape(pw.weight.shape))  # (out, in = c)
            if has_bias:
                second.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, second).train(conv.training)


def convertible_convs(model: nn.Module, exclude: Sequence[Any] = ()) -> list[Factorization]:
    """Every conv of ``model`` that :func:`make_separable` would factorise (cheaper after it), in
    module order; ``exclude``: name globs or module types to leave alone (as ``CompressConfig.exclude``)."""
    out = []
    for name, m in model.named_modules():
        plan = separable_cost(m, name)
        if plan is not None and plan.ratio < 1 and not module_matches(name, m, exclude):
            out.append(plan)
    return out


def make_separable(model: nn.Module, names: Optional[Sequence[str]] = None, exclude: Sequence[Any] = (),
                   init: str = "teacher") -> list[str]:
    """Factorise ``model``'s convs in place (:func:`factorize_conv`); returns the names replaced.

    ``names``: the convs to factorise (default: all of :func:`convertible_convs`, the ones that get
    cheaper); ``exclude``: name globs or module types to leave alone. A replaced conv's name now holds an
    ``nn.Sequential(first, second)``, so every other module keeps its name (distillation points,
    include/exclude globs).
    """
    chosen = [p.name for p in convertible_convs(model, exclude)] if names is None else list(names)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        setattr(parent, child, factorize_conv(conv, init))
    return chosen
