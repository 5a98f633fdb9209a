"""CartoonGAN generator (Chen et al. 2018) as used by the public PyTorch test code,
Yijunmaverick/CartoonGAN-Test-Pytorch-Torch ``network/Transformer.py`` (class ``Transformer``),
whose converted ``{Hayao,Hosoda,Paprika,Shinkai}_net_G_float.pth`` weights load here with
``strict=True``.

Module names are the upstream flat ones::

    refpad01_1 conv01_1 in01_1                      7x7, 3 -> 64
    conv02_1 conv02_2 in02_1                        3x3 s2 + 3x3, 64 -> 128
    conv03_1 conv03_2 in03_1                        3x3 s2 + 3x3, 128 -> 256
    refpadKK_1 convKK_1 inKK_1 refpadKK_2 convKK_2 inKK_2    residual blocks, KK = 04 .. 11
    deconv01_1 deconv01_2 in12_1                    convT 3x3 s2 + 3x3, 256 -> 128
    deconv02_1 deconv02_2 in13_1                    convT 3x3 s2 + 3x3, 128 -> 64
    refpad12_1 deconv03_1                           7x7, 64 -> 3, then tanh

The norms are the upstream hand-written :class:`InstanceNormalization` (parameters ``scale`` and
``shift``, eps 1e-9, biased variance over H x W), not ``nn.InstanceNorm2d``.  The released
weights expect **BGR** input scaled to [-1, 1] and produce BGR in [-1, 1] (see upstream
``test.py``).  11.130 M parameters; 61.6 G MACs at 1x3x256x256 (transposed convs counted by
output size, as in the ResNet file).

znxlwm/pytorch-CartoonGAN (the popular training re-implementation) uses a *different* generator
with ``nn.Sequential`` keys (``down_convs.*``, ``resnet_blocks.<i>.conv1/conv2``, ``up_convs.*``)
and affine-free ``nn.InstanceNorm2d``; it is provided as :class:`CartoonGANGenerator` and
registered as ``cartoongan_znxlwm`` (11.120 M parameters and 61.6 G MACs at 256x256 with its
training defaults nf 64, nb 8).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model

_RES_BLOCKS = tuple(f"{k:02d}" for k in range(4, 12))  # "04" .. "11"


class InstanceNormalization(nn.Module):
    """Per-sample, per-channel normalisation over H x W with a learnt ``scale`` and ``shift``.

    ``(N, C, H, W) -> (N, C, H, W)``: ``(x - mean) / sqrt(var + eps) * scale + shift`` with the
    biased variance.  Fresh modules draw ``scale`` from U(0, 1) and set ``shift`` to 0, as upstream.
    """

    def __init__(self, dim: int, eps: float = 1e-9):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.uniform_()
            self.shift.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        mean = flat.mean(2)[:, :, None, None]
        var = flat.var(2, correction=0)[:, :, None, None]
        out = (x - mean) / torch.sqrt(var + self.eps)
        return out * self.scale[None, :, None, None] + self.shift[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, eps={self.eps}"


class Transformer(nn.Module):
    """CartoonGAN generator: ``(N, 3, H, W) -> (N, 3, H, W)``, H and W multiples of 4, BGR in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self._ganslim_init: dict = {}
        self.refpad01_1 = nn.ReflectionPad2d(3)
        self.conv01_1 = nn.Conv2d(3, 64, 7)
        self.in01_1 = InstanceNormalization(64)
        self.conv02_1 = nn.Conv2d(64, 128, 3, 2, 1)
        self.conv02_2 = nn.Conv2d(128, 128, 3, 1, 1)
        self.in02_1 = InstanceNormalization(128)
        self.conv03_1 = nn.Conv2d(128, 256, 3, 2, 1)
        self.conv03_2 = nn.Conv2d(256, 256, 3, 1, 1)
        self.in03_1 = InstanceNormalization(256)
        # Eight residual blocks registered in upstream order (pad, conv, norm) x 2.
        for k in _RES_BLOCKS:
            for j in ("1", "2"):
                self.add_module(f"refpad{k}_{j}", nn.ReflectionPad2d(1))
                self.add_module(f"conv{k}_{j}", nn.Conv2d(256, 256, 3))
                self.add_module(f"in{k}_{j}", InstanceNormalization(256))
        self.deconv01_1 = nn.ConvTranspose2d(256, 128, 3, 2, 1, 1)
        self.deconv01_2 = nn.Conv2d(128, 128, 3, 1, 1)
        self.in12_1 = InstanceNormalization(128)
        self.deconv02_1 = nn.ConvTranspose2d(128, 64, 3, 2, 1, 1)
        self.deconv02_2 = nn.Conv2d(64, 64, 3, 1, 1)
        self.in13_1 = InstanceNormalization(64)
        self.refpad12_1 = nn.ReflectionPad2d(3)
        self.deconv03_1 = nn.Conv2d(64, 3, 7)

    def _res_block(self, k: str, x: torch.Tensor) -> torch.Tensor:
        m = self._modules
        y = F.relu(m[f"in{k}_1"](m[f"conv{k}_1"](m[f"refpad{k}_1"](x))))
        return m[f"in{k}_2"](m[f"conv{k}_2"](m[f"refpad{k}_2"](y))) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.in01_1(self.conv01_1(self.refpad01_1(x))))
        y = F.relu(self.in02_1(self.conv02_2(self.conv02_1(y))))
        y = F.relu(self.in03_1(self.conv03_2(self.conv03_1(y))))
        for k in _RES_BLOCKS:
            y = self._res_block(k, y)
        y = F.relu(self.in12_1(self.deconv01_2(self.deconv01_1(y))))
        y = F.relu(self.in13_1(self.deconv02_2(self.deconv02_1(y))))
        return torch.tanh(self.deconv03_1(self.refpad12_1(y)))


class CartoonGANResBlock(nn.Module):
    """znxlwm ``resnet_block``: ``x + IN(conv2(relu(IN(conv1(x)))))``, shape-preserving."""

    def __init__(self, channel: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channel, channel, kernel, stride, padding)
        self.conv1_norm = nn.InstanceNorm2d(channel)
        self.conv2 = nn.Conv2d(channel, channel, kernel, stride, padding)
        self.conv2_norm = nn.InstanceNorm2d(channel)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - upstream name
        x = F.relu(self.conv1_norm(self.conv1(input)), True)
        return input + self.conv2_norm(self.conv2(x))


class CartoonGANGenerator(nn.Module):
    """Generator of znxlwm/pytorch-CartoonGAN (``networks.generator``), keys identical:
    ``(N, in_nc, H, W) -> (N, out_nc, H, W)``, H and W multiples of 4.

    Defaults follow its training script (``--ngf 64 --nb 8``); upstream's class defaults are
    ``nf=32, nb=6``.  Weights are initialised like upstream ``utils.initialize_weights``
    (conv weights ~ N(0, 0.02), zero biases).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 8):
        super().__init__()
        self._ganslim_init = dict(in_nc=in_nc, out_nc=out_nc, nf=nf, nb=nb)
        self.input_nc, self.output_nc, self.nf, self.nb = in_nc, out_nc, nf, nb
        self.down_convs = nn.Sequential(
            nn.Conv2d(in_nc, nf, 7, 1, 3), nn.InstanceNorm2d(nf), nn.ReLU(True),
            nn.Conv2d(nf, nf * 2, 3, 2, 1), nn.Conv2d(nf * 2, nf * 2, 3, 1, 1),
            nn.InstanceNorm2d(nf * 2), nn.ReLU(True),
            nn.Conv2d(nf * 2, nf * 4, 3, 2, 1), nn.Conv2d(nf * 4, nf * 4, 3, 1, 1),
            nn.InstanceNorm2d(nf * 4), nn.ReLU(True),
        )
        self.resnet_blocks = nn.Sequential(*[CartoonGANResBlock(nf * 4, 3, 1, 1) for _ in range(nb)])
        self.up_convs = nn.Sequential(
            nn.ConvTranspose2d(nf * 4, nf * 2, 3, 2, 1, 1), nn.Conv2d(nf * 2, nf * 2, 3, 1, 1),
            nn.InstanceNorm2d(nf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(nf * 2, nf, 3, 2, 1, 1), nn.Conv2d(nf, nf, 3, 1, 1),
            nn.InstanceNorm2d(nf), nn.ReLU(True),
            nn.Conv2d(nf, out_nc, 7, 1, 3), nn.Tanh(),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - upstream name
        return self.up_convs(self.resnet_blocks(self.down_convs(input)))


@register_model("cartoongan")
def cartoongan() -> Transformer:
    """CartoonGAN test-code generator (Yijunmaverick ``Transformer``); no options upstream."""
    return Transformer()


@register_model("cartoongan_znxlwm")
def cartoongan_znxlwm(in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 8) -> CartoonGANGenerator:
    """znxlwm/pytorch-CartoonGAN generator (different keys from ``cartoongan``)."""
    return CartoonGANGenerator(in_nc, out_nc, nf, nb)
