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
# Resolution changes of the Transformer: (stride-2 layer, 3x3 conv, norm, in width, out width).
_DOWN_STEPS = (("conv02_1", "conv02_2", "in02_1", 64, 128), ("conv03_1", "conv03_2", "in03_1", 128, 256))
_UP_STEPS = (("deconv01_1", "deconv01_2", "in12_1", 256, 128), ("deconv02_1", "deconv02_2", "in13_1", 128, 64))
_STEM = ("refpad01_1", "conv01_1", "in01_1")
_HEAD = ("refpad12_1", "deconv03_1")


class InstanceNormalization(nn.Module):
    """Per-sample, per-channel normalisation over H x W with a learnt ``scale`` and ``shift``.

    ``(N, C, H, W) -> (N, C, H, W)``: ``(x - mean) / sqrt(var + eps) * scale + shift`` with the
    biased variance.  A fresh module starts from ``scale`` ~ U(0, 1) and ``shift`` = 0 (the
    released code's starting point; it only matters before a checkpoint is loaded).
    """

    def __init__(self, dim: int, eps: float = 1e-9):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.empty(dim).uniform_(0.0, 1.0))
        self.shift = nn.Parameter(torch.zeros(dim))

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
        # Registration order = state_dict order of the released checkpoints.
        put = self.add_module
        put(_STEM[0], nn.ReflectionPad2d(3))
        put(_STEM[1], nn.Conv2d(3, 64, 7))
        put(_STEM[2], InstanceNormalization(64))
        for strided, conv, norm, cin, cout in _DOWN_STEPS:
            put(strided, nn.Conv2d(cin, cout, 3, stride=2, padding=1))
            put(conv, nn.Conv2d(cout, cout, 3, padding=1))
            put(norm, InstanceNormalization(cout))
        for k in _RES_BLOCKS:  # each residual block: (pad, conv, norm) twice, 256 channels
            for half in ("1", "2"):
                put(f"refpad{k}_{half}", nn.ReflectionPad2d(1))
                put(f"conv{k}_{half}", nn.Conv2d(256, 256, 3))
                put(f"in{k}_{half}", InstanceNormalization(256))
        for strided, conv, norm, cin, cout in _UP_STEPS:
            put(strided, nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1))
            put(conv, nn.Conv2d(cout, cout, 3, padding=1))
            put(norm, InstanceNormalization(cout))
        put(_HEAD[0], nn.ReflectionPad2d(3))
        put(_HEAD[1], nn.Conv2d(64, 3, 7))

    def _through(self, names, x: torch.Tensor) -> torch.Tensor:
        """Apply the named submodules in turn."""
        for name in names:
            x = self._modules[name](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self._through(_STEM, x))
        for step in _DOWN_STEPS:
            y = F.relu(self._through(step[:3], y))
        for k in _RES_BLOCKS:
            h = F.relu(self._through((f"refpad{k}_1", f"conv{k}_1", f"in{k}_1"), y))
            y = y + self._through((f"refpad{k}_2", f"conv{k}_2", f"in{k}_2"), h)
        for step in _UP_STEPS:
            y = F.relu(self._through(step[:3], y))
        return torch.tanh(self._through(_HEAD, y))


class CartoonGANResBlock(nn.Module):
    """znxlwm ``resnet_block``: ``x + IN(conv2(relu(IN(conv1(x)))))``, shape-preserving."""

    def __init__(self, channel: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channel, channel, kernel, stride, padding)
        self.conv1_norm = nn.InstanceNorm2d(channel)
        self.conv2 = nn.Conv2d(channel, channel, kernel, stride, padding)
        self.conv2_norm = nn.InstanceNorm2d(channel)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - upstream name
        hidden = torch.relu(self.conv1_norm(self.conv1(input)))
        return input + self.conv2_norm(self.conv2(hidden))


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
        w1, w2, w4 = nf, 2 * nf, 4 * nf

        def resample(first: nn.Module, width: int) -> list[nn.Module]:
            # a stride-2 (transposed) conv, a 3x3 conv at the new width, instance norm, ReLU
            return [first, nn.Conv2d(width, width, 3, 1, 1), nn.InstanceNorm2d(width), nn.ReLU(True)]

        self.down_convs = nn.Sequential(
            nn.Conv2d(in_nc, w1, 7, 1, 3), nn.InstanceNorm2d(w1), nn.ReLU(True),
            *resample(nn.Conv2d(w1, w2, 3, 2, 1), w2),
            *resample(nn.Conv2d(w2, w4, 3, 2, 1), w4),
        )
        self.resnet_blocks = nn.Sequential(*(CartoonGANResBlock(w4) for _ in range(nb)))
        self.up_convs = nn.Sequential(
            *resample(nn.ConvTranspose2d(w4, w2, 3, 2, 1, 1), w2),
            *resample(nn.ConvTranspose2d(w2, w1, 3, 2, 1, 1), w1),
            nn.Conv2d(w1, out_nc, 7, 1, 3), nn.Tanh(),
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
