"""Mobile ResNet generator of GAN Compression (Li et al., 2020): the CycleGAN/pix2pix ResNet with
every residual-block conv replaced by a depthwise-separable one. Keys follow the official
``MobileResnetGenerator``: ``model.<i>`` in one ``nn.Sequential``; each block's
``conv_block.<j>.conv.0`` is the depthwise 3x3 conv, ``conv.1`` the norm between the two,
``conv.2`` the pointwise 1x1 conv.

Norms: ``norm`` is the official ``--norm`` choice (``instance``, ``batch``, ``none``) plus ``group``
(``nn.GroupNorm``, affine, ``groups`` groups or fewer where a width is not divisible), which the
official code does not offer and ganslim adds because GroupNorm generators are common elsewhere and
behave differently in deployment (no folding into the conv, statistics per image). As in the official
``SeparableConv2d``, the norm *inside* each separable conv is instance norm whatever ``norm`` is;
``separable_norm`` changes that.

Mobile ResNet-9, ngf 64, instance norm: 1.987 M parameters; 18.31 G MACs at 1x3x256x256 in the
papers' convention (transposed convs counted by output size): most of both are in the full convs of
the stem, the downsampling and the upsampling, which stay dense.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import register_model
from .resnet import get_norm_layer

__all__ = ["MobileResnetGenerator", "MobileResnetBlock", "SeparableConv2d", "mobile_resnet_9blocks"]

NORMS = ("instance", "batch", "none", "group")


def _norm_factory(norm: str, groups: int):
    if norm == "group":
        return lambda c: nn.GroupNorm(math.gcd(groups, c), c)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return get_norm_layer(norm)


class SeparableConv2d(nn.Module):
    """Depthwise ``k x k`` conv (``groups=in_channels``), norm, pointwise 1x1 conv: ``conv.0/1/2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 norm_layer=None, use_bias: bool = True):
        super().__init__()
        norm_layer = norm_layer or get_norm_layer("instance")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size, stride=stride, padding=padding, groups=in_channels,
                      bias=use_bias),
            norm_layer(in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=use_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MobileResnetBlock(nn.Module):
    """``x + conv_block(x)``; ``conv_block`` is ``[pad] sep norm ReLU Dropout [pad] sep norm``."""

    def __init__(self, dim: int, padding_type: str, norm_layer, separable_norm, dropout_rate: float, use_bias: bool):
        super().__init__()
        pads = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d}
        if padding_type not in (*pads, "zero"):
            raise NotImplementedError(f"padding_type must be 'reflect', 'replicate' or 'zero', got {padding_type!r}")

        def padded_separable() -> list[nn.Module]:
            p = 1 if padding_type == "zero" else 0
            sep = SeparableConv2d(dim, dim, 3, padding=p, norm_layer=separable_norm, use_bias=use_bias)
            return [sep] if padding_type == "zero" else [pads[padding_type](1), sep]

        layers = padded_separable() + [norm_layer(dim), nn.ReLU(True), nn.Dropout(dropout_rate)]
        layers += padded_separable() + [norm_layer(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class MobileResnetGenerator(nn.Module):
    """One ``nn.Sequential`` named ``model``: 7x7 stem to ``ngf``, two stride-2 convs to ``4ngf``,
    ``n_blocks`` :class:`MobileResnetBlock`, two stride-2 transposed convs back to ``ngf``, a 7x7
    conv (reflection pad 3, with bias) and tanh. Input ``(B, input_nc, H, W)``, H and W multiples of 4."""

    def __init__(self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "instance",
                 dropout_rate: float = 0.0, n_blocks: int = 9, padding_type: str = "reflect",
                 separable_norm: str = "instance", groups: int = 8):
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        super().__init__()
        self._ganslim_init = dict(input_nc=input_nc, output_nc=output_nc, ngf=ngf, norm=norm,
                                  dropout_rate=dropout_rate, n_blocks=n_blocks, padding_type=padding_type,
                                  separable_norm=separable_norm, groups=groups)
        norm_layer = _norm_factory(norm, groups)
        inner = _norm_factory(separable_norm, groups)
        bias = norm == "instance"  # the official convention: a conv has a bias when instance norm follows

        def conv_norm_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
            return [conv, norm_layer(channels), nn.ReLU(True)]

        widths = [ngf, 2 * ngf, 4 * ngf]
        layers: list[nn.Module] = [nn.ReflectionPad2d(3)]
        layers += conv_norm_relu(nn.Conv2d(input_nc, ngf, kernel_size=7, bias=bias), ngf)
        for cin, cout in zip(widths, widths[1:]):
            layers += conv_norm_relu(nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=bias), cout)
        layers += [MobileResnetBlock(widths[-1], padding_type, norm_layer, inner, dropout_rate, bias)
                   for _ in range(n_blocks)]
        for cin, cout in zip(widths[:0:-1], widths[-2::-1]):
            up = nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1, bias=bias)
            layers += conv_norm_relu(up, cout)
        self.model = nn.Sequential(*layers, nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7),
                                   nn.Tanh())

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - official argument name
        return self.model(input)


@register_model("mobile_resnet_9blocks")
def mobile_resnet_9blocks(input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "instance",
                          **kw) -> MobileResnetGenerator:
    """GAN Compression's ``--netG mobile_resnet_9blocks``."""
    return MobileResnetGenerator(input_nc, output_nc, ngf, norm=norm, n_blocks=9, **kw)
