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


def _no_norm(channels: int) -> nn.Module:
    return nn.Identity()


# What the official "--norm" choices build: batch norm keeps its affine scale/shift and running
# statistics (so its checkpoints carry them); instance norm has neither.
_NORMS = {
    "batch": functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True),
    "instance": functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False),
    "none": _no_norm,
}


def get_norm_layer(norm: str = "instance"):
    """``channels -> norm module`` factory for the official ``--norm`` names: ``batch``,
    ``instance`` or ``none``."""
    if not isinstance(norm, str) or norm not in _NORMS:
        raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {norm!r}")
    return _NORMS[norm]


def _norm_class(norm_layer):
    """The class a norm factory builds (a ``functools.partial`` is unwrapped; others as given)."""
    return norm_layer.func if isinstance(norm_layer, functools.partial) else norm_layer


def _uses_bias(norm_layer) -> bool:
    # A convention of the official code, kept because it decides which bias keys the checkpoints
    # hold: a conv has a bias exactly when the norm after it is instance norm (not with batch norm,
    # which brings its own shift, and not with "none" either).
    return _norm_class(norm_layer) is nn.InstanceNorm2d


def _padded_conv3x3(dim: int, padding_type: str, bias: bool) -> list[nn.Module]:
    """A 3x3 ``dim -> dim`` conv that keeps the size: explicit pad layer + conv, or zero padding in the conv."""
    pad_layers = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d}
    if padding_type == "zero":
        return [nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=bias)]
    if padding_type not in pad_layers:
        raise NotImplementedError(f"padding_type must be 'reflect', 'replicate' or 'zero', got {padding_type!r}")
    return [pad_layers[padding_type](1), nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=bias)]


class ResnetBlock(nn.Module):
    """``x + conv_block(x)`` at constant width ``dim``.

    ``conv_block`` is ``[pad] conv norm ReLU [Dropout(0.5)] [pad] conv norm``; the pads are layers
    of their own unless ``padding_type == "zero"``, so with reflect or replicate padding the convs
    sit at indices 1 and 5 (1 and 6 with dropout), as in the official checkpoints.
    """

    def __init__(self, dim: int, padding_type: str, norm_layer, use_dropout: bool, use_bias: bool):
        super().__init__()
        first = _padded_conv3x3(dim, padding_type, use_bias) + [norm_layer(dim), nn.ReLU(True)]
        if use_dropout:
            first.append(nn.Dropout(0.5))
        second = _padded_conv3x3(dim, padding_type, use_bias) + [norm_layer(dim)]
        self.conv_block = nn.Sequential(*first, *second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """pix2pix/CycleGAN ResNet generator: ``(N, input_nc, H, W) -> (N, output_nc, H, W)``, H and W
    multiples of 4.

    One ``nn.Sequential`` named ``model``: a 7x7 stem (reflection pad 3) to ``ngf`` channels, two
    stride-2 3x3 convs to ``2ngf`` and ``4ngf``, ``n_blocks`` :class:`ResnetBlock` at ``4ngf``, two
    stride-2 3x3 transposed convs back to ``ngf``, and a 7x7 conv (reflection pad 3, always with
    bias) followed by tanh.  Every conv but the last is followed by the norm and ReLU(in place).
    """

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
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        super().__init__()
        if norm_layer is None:
            norm_layer = get_norm_layer(norm or "instance")
        # Recorded so ganslim.save can rebuild the class with the same options.
        self._ganslim_init = dict(
            input_nc=input_nc, output_nc=output_nc, ngf=ngf, use_dropout=use_dropout,
            n_blocks=n_blocks, padding_type=padding_type,
            norm=norm or ("batch" if isinstance(norm_layer, functools.partial) and norm_layer.func is nn.BatchNorm2d else "instance"),
        )
        bias = _uses_bias(norm_layer)

        def conv_norm_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
            return [conv, norm_layer(channels), nn.ReLU(True)]

        widths = [ngf, 2 * ngf, 4 * ngf]  # stem, after the first and after the second downsampling
        layers: list[nn.Module] = [nn.ReflectionPad2d(3)]
        layers += conv_norm_relu(nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=bias), ngf)
        for cin, cout in zip(widths, widths[1:]):
            layers += conv_norm_relu(nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=bias), cout)
        layers += [ResnetBlock(widths[-1], padding_type, norm_layer, use_dropout, bias) for _ in range(n_blocks)]
        for cin, cout in zip(widths[:0:-1], widths[-2::-1]):
            up = nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1, bias=bias)
            layers += conv_norm_relu(up, cout)
        to_image = nn.Conv2d(ngf, output_nc, kernel_size=7)  # unpadded; the pad layer before it does that
        self.model = nn.Sequential(*layers, nn.ReflectionPad2d(3), to_image, nn.Tanh())

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
