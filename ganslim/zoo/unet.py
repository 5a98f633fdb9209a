"""U-Net generator of pix2pix/CycleGAN, keys identical to the official ``networks.UnetGenerator``.

The network is built recursively from the innermost block outwards, so the keys nest:
``model.model.0`` is the outermost down-conv, ``model.model.1`` the next block,
``model.model.1.model.1`` its down-conv, ``model.model.1.model.3`` the block inside it, ...
Each :class:`UnetSkipConnectionBlock` holds one ``nn.Sequential`` called ``model``:

* outermost: ``[down-conv, <block>, ReLU, up-convT, Tanh]``
* middle:    ``[LeakyReLU, down-conv, norm, <block>, ReLU, up-convT, norm(, Dropout)]``
* innermost: ``[LeakyReLU, down-conv, ReLU, up-convT, norm]``

The activations are in place, exactly as upstream.  Note what that implies, and what the
official checkpoints were trained with: a non-outermost block's first op is an in-place
``LeakyReLU`` on its input, so the skip branch it concatenates (``cat([x, model(x)])``) carries
``leaky_relu(x)``, not ``x``.  Rewriting the activations out of place would change the outputs.

Sizes (3 -> 3 channels, ngf 64; MACs at 1x3xSxS, transposed convs counted by output size as in
the ResNet file):

=========  =====  ===================  ===========
name       S      params (batch/inst)  MACs
=========  =====  ===================  ===========
unet_256   256    54.414 M / 54.410 M  18.14 G
unet_128   128    41.829 M / 41.826 M  4.51 G
=========  =====  ===================  ===========

The input side must be divisible by ``2 ** num_downs`` (256 for ``unet_256``, 128 for
``unet_128``); the innermost feature map is then 1x1.  With batch norm in ``train()`` mode a
1x1 innermost map needs a batch larger than one.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register_model
from .resnet import _norm_class, _uses_bias, get_norm_layer


def _norm_name(norm_layer) -> str:
    """``--norm`` name of a norm factory, for ``_ganslim_init``."""
    base = _norm_class(norm_layer)
    return "batch" if base is nn.BatchNorm2d else "instance" if base is nn.InstanceNorm2d else "none"


class UnetSkipConnectionBlock(nn.Module):
    """One U-Net level: ``x -> cat([x, up(submodule(down(x)))])`` (outermost: no concatenation).

    Input ``(N, input_nc or outer_nc, H, W)``; output ``(N, 2*outer_nc, H, W)`` for inner levels
    and ``(N, outer_nc, H, W)`` for the outermost one.  ``H`` and ``W`` must be even.
    """

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None,
                 submodule: nn.Module | None = None, outermost: bool = False, innermost: bool = False,
                 norm_layer=nn.BatchNorm2d, use_dropout: bool = False):
        super().__init__()
        self.outermost = outermost
        bias = _uses_bias(norm_layer)  # same rule as the ResNet generator
        in_ch = outer_nc if input_nc is None else input_nc

        def down_conv():
            return nn.Conv2d(in_ch, inner_nc, kernel_size=4, stride=2, padding=1, bias=bias)

        def up_conv(cin: int, with_bias: bool):
            return nn.ConvTranspose2d(cin, outer_nc, kernel_size=4, stride=2, padding=1, bias=with_bias)

        if outermost:
            # The last layer feeds Tanh directly, so it always has a bias.
            layers = [down_conv(), submodule, nn.ReLU(True), up_conv(2 * inner_nc, True), nn.Tanh()]
        elif innermost:
            layers = [nn.LeakyReLU(0.2, True), down_conv(),
                      nn.ReLU(True), up_conv(inner_nc, bias), norm_layer(outer_nc)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down_conv(), norm_layer(inner_nc), submodule,
                      nn.ReLU(True), up_conv(2 * inner_nc, bias), norm_layer(outer_nc)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        # self.model starts with an in-place LeakyReLU, which rewrites x before it is concatenated
        # (upstream behaviour, kept on purpose).
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix U-Net: ``(N, input_nc, H, W) -> (N, output_nc, H, W)``, H and W divisible by
    ``2 ** num_downs``.

    ``norm_layer`` is an upstream-style factory; alternatively pass ``norm`` as
    ``"batch"``/``"instance"``/``"none"`` (used when ``norm_layer`` is omitted, default batch as
    in the official class signature; the factories below default to instance).
    """

    def __init__(self, input_nc: int = 3, output_nc: int = 3, num_downs: int = 8, ngf: int = 64,
                 norm_layer=None, use_dropout: bool = False, norm: str | None = None):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5, got {num_downs}")
        if norm_layer is None:
            norm_layer = get_norm_layer(norm or "batch")
        self._ganslim_init = dict(input_nc=input_nc, output_nc=output_nc, num_downs=num_downs, ngf=ngf,
                                  use_dropout=use_dropout, norm=norm or _norm_name(norm_layer))
        # Built inside out.  After the innermost level come num_downs - 5 more levels at 8 ngf (the
        # only ones that may use dropout), then three that halve the width (8 -> 4 -> 2 -> 1 ngf)
        # and finally the outermost level, which maps to output_nc.
        levels = [(8, 8, use_dropout)] * (num_downs - 5) + [(4, 8, False), (2, 4, False), (1, 2, False)]
        inner = UnetSkipConnectionBlock(8 * ngf, 8 * ngf, norm_layer=norm_layer, innermost=True)
        for outer_mult, inner_mult, dropout in levels:
            inner = UnetSkipConnectionBlock(outer_mult * ngf, inner_mult * ngf, submodule=inner,
                                            norm_layer=norm_layer, use_dropout=dropout)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=inner,
                                             outermost=True, norm_layer=norm_layer)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - official argument name
        return self.model(input)


@register_model("unet_256")
def unet_256(input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "instance",
             use_dropout: bool = False) -> UnetGenerator:
    """``--netG unet_256`` (num_downs 8; pix2pix's default generator, 256x256 inputs)."""
    return UnetGenerator(input_nc, output_nc, 8, ngf, norm=norm, use_dropout=use_dropout)


@register_model("unet_128")
def unet_128(input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "instance",
             use_dropout: bool = False) -> UnetGenerator:
    """``--netG unet_128`` (num_downs 7, 128x128 inputs)."""
    return UnetGenerator(input_nc, output_nc, 7, ngf, norm=norm, use_dropout=use_dropout)
