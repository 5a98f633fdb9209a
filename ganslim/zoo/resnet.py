"""ResNet generator of pix2pix/CycleGAN (Johnson et al. style), keys identical to the official
``networks.ResnetGenerator``: ``model.<i>`` in one ``nn.Sequential``; residual blocks hold
``conv_block.<j>`` (convs at 1 and 5, or 1 and 6 with dropout).

ResNet-9, ngf 64, instance norm: 11.378 M parameters; 56.8 G MACs at 1x3x256x256 in the
papers' convention (transposed convs counted by output size).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from . import register_model


def get_norm_layer(norm: str = "instance"):
    """Norm factory as in the official code: batch (affine, running stats) or instance (neither)."""
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {norm!r}")


def _uses_bias(norm_layer) -> bool:
    # The official code adds conv biases only when the norm is InstanceNorm (BatchNorm has its own shift).
    if isinstance(norm_layer, functools.partial):
        return norm_layer.func is nn.InstanceNorm2d
    return norm_layer is nn.InstanceNorm2d


class ResnetBlock(nn.Module):
    """Residual block ``x + conv_block(x)``; ``conv_block`` keeps the official layer order."""

    def __init__(self, dim: int, padding_type: str, norm_layer, use_dropout: bool, use_bias: bool):
        super().__init__()
        self.conv_block = self.build_conv_block(dim, padding_type, norm_layer, use_dropout, use_bias)

    @staticmethod
    def _pad(padding_type: str):
        if padding_type == "reflect":
            return [nn.ReflectionPad2d(1)], 0
        if padding_type == "replicate":
            return [nn.ReplicationPad2d(1)], 0
        if padding_type == "zero":
            return [], 1
        raise NotImplementedError(f"padding [{padding_type}] is not implemented")

    def build_conv_block(self, dim, padding_type, norm_layer, use_dropout, use_bias) -> nn.Sequential:
        layers: list[nn.Module] = []
        pad, p = self._pad(padding_type)
        layers += pad + [nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias), norm_layer(dim), nn.ReLU(True)]
        if use_dropout:
            layers += [nn.Dropout(0.5)]
        pad, p = self._pad(padding_type)
        layers += pad + [nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias), norm_layer(dim)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """pix2pix/CycleGAN ResNet generator. Input/output ``(N, C, H, W)`` with H, W multiples of 4."""

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        ngf: int = 64,
        norm_layer=None,
        use_dropout: bool = False,
        n_blocks: int = 9,
        padding_type: str = "reflect",
        norm: str | None = None,
    ):
        assert n_blocks >= 0
        super().__init__()
        if norm_layer is None:
            norm_layer = get_norm_layer(norm or "instance")
        # Recorded so ganslim.save can rebuild the class with the same options.
        self._ganslim_init = dict(
            input_nc=input_nc, output_nc=output_nc, ngf=ngf, use_dropout=use_dropout,
            n_blocks=n_blocks, padding_type=padding_type,
            norm=norm or ("batch" if isinstance(norm_layer, functools.partial) and norm_layer.func is nn.BatchNorm2d else "instance"),
        )
        use_bias = _uses_bias(norm_layer)
        model: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]
        n_downsampling = 2
        for i in range(n_downsampling):
            mult = 2**i
            model += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                norm_layer(ngf * mult * 2),
                nn.ReLU(True),
            ]
        mult = 2**n_downsampling
        for _ in range(n_blocks):
            model += [ResnetBlock(ngf * mult, padding_type, norm_layer, use_dropout, use_bias)]
        for i in range(n_downsampling):
            mult = 2 ** (n_downsampling - i)
            model += [
                nn.ConvTranspose2d(ngf * mult, int(ngf * mult / 2), kernel_size=3, stride=2, padding=1,
                                   output_padding=1, bias=use_bias),
                norm_layer(int(ngf * mult / 2)),
                nn.ReLU(True),
            ]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - official argument name
        return self.model(input)


@register_model("resnet_9blocks")
def resnet_9blocks(input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "instance",
                   use_dropout: bool = False, **kw) -> ResnetGenerator:
    """CycleGAN's default generator (``--netG resnet_9blocks``)."""
    return ResnetGenerator(input_nc, output_nc, ngf, norm=norm, use_dropout=use_dropout, n_blocks=9, **kw)


@register_model("resnet_6blocks")
def resnet_6blocks(input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "instance",
                   use_dropout: bool = False, **kw) -> ResnetGenerator:
    """``--netG resnet_6blocks``."""
    return ResnetGenerator(input_nc, output_nc, ngf, norm=norm, use_dropout=use_dropout, n_blocks=6, **kw)
