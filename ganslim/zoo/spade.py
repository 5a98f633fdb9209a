"""SPADE / GauGAN generator (Park et al. 2019), keys identical to the official
``models.networks.generator.SPADEGenerator`` of NVlabs/SPADE.

Layout (``nf = ngf``; every block is a :class:`SPADEResnetBlock` conditioned on the label map)::

    fc          conv3x3 semantic_nc -> 16nf on the label map downsampled to sh x sw
                (Linear z_dim -> 16nf*sh*sw when use_vae)
    head_0      16nf -> 16nf          (sh x sw)        then x2 upsample
    G_middle_0  16nf -> 16nf                           (x2 upsample here too for "more"/"most")
    G_middle_1  16nf -> 16nf                           then x2 upsample
    up_0..up_3  16nf -> 8nf -> 4nf -> 2nf -> nf       (x2 upsample between them)
    up_4        nf -> nf/2                             (only for "most", after one more x2)
    conv_img    conv3x3 -> 3, after leaky_relu(0.2), then tanh

A block holds ``conv_0``/``conv_1`` (and ``conv_s``, 1x1 without bias, when fin != fout) and the
matching ``norm_0``/``norm_1``/``norm_s`` :class:`SPADE` modules (``param_free_norm``,
``mlp_shared.0``, ``mlp_gamma``, ``mlp_beta``; 128 hidden channels, hard-coded upstream).  When
``'spectral' in norm_G`` the block convs are wrapped with ``torch.nn.utils.spectral_norm``, which
gives the keys ``weight_orig`` (parameter) and ``weight_u``/``weight_v`` (buffers).

``syncbatch`` (the upstream default) is built as ``nn.BatchNorm2d(affine=False)``: the official
``SynchronizedBatchNorm2d`` subclasses ``_BatchNorm`` and has the same buffers
(``running_mean``, ``running_var``, ``num_batches_tracked``), so checkpoints load unchanged and a
single-process run computes the same thing.

Sizes measured against the official class (norm_G ``spectralspadesyncbatch3x3``, ngf 64;
parameters do not depend on the crop size unless use_vae; MACs with transposed convs counted
by output size, as in the ResNet file):

==========================================  ===========  ==========================
config                                      params       MACs
==========================================  ===========  ==========================
Cityscapes labels (35 + instance = 36 ch)   93.048 M     146.3 G at 256x256 ("normal")
  same, 512x256, "more" (upstream setting)  93.048 M     281.3 G
  same, "most"                              93.571 M
ADE20K (150 + dontcare, no instance)        96.492 M
COCO-Stuff (182 + dontcare + instance)      97.481 M
Cityscapes labels, use_vae, crop 256        109.558 M
==========================================  ===========  ==========================
"""
from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init
from torch.nn.utils import spectral_norm

from . import register_model

_UPSAMPLING_LAYERS = {"normal": 5, "more": 6, "most": 7}


class SPADE(nn.Module):
    """Spatially-adaptive normalisation ``norm(x) * (1 + gamma(seg)) + beta(seg)``.

    ``config_text`` reads ``spade<norm><k>x<k>``, e.g. ``spadesyncbatch3x3`` or
    ``spadeinstance5x5``; ``<norm>`` is the parameter-free norm (``instance``, ``batch`` or
    ``syncbatch``) and ``k`` the kernel of the three MLP convs.  ``x``: ``(N, norm_nc, H, W)``;
    ``segmap``: ``(N, label_nc, h, w)``, resized to ``H x W`` (nearest) before the MLP.
    """

    nhidden = 128  # width of the shared embedding; fixed upstream

    def __init__(self, config_text: str, norm_nc: int, label_nc: int):
        super().__init__()
        if not config_text.startswith("spade"):
            raise ValueError(f"SPADE config must start with 'spade', got {config_text!r}")
        found = re.search(r"spade(\D+)(\d)x\d", config_text)
        if found is None:
            raise ValueError(f"cannot parse SPADE config {config_text!r}")
        norm_type, ks = found.group(1), int(found.group(2))
        if norm_type == "instance":
            self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        elif norm_type in ("syncbatch", "batch"):
            self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        else:
            raise ValueError(f"{norm_type} is not a recognized param-free norm type in SPADE")
        pw = ks // 2
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_nc, self.nhidden, kernel_size=ks, padding=pw),
            nn.ReLU(),
        )
        self.mlp_gamma = nn.Conv2d(self.nhidden, norm_nc, kernel_size=ks, padding=pw)
        self.mlp_beta = nn.Conv2d(self.nhidden, norm_nc, kernel_size=ks, padding=pw)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """Pre-activation residual block with SPADE norms: ``(N, fin, H, W) -> (N, fout, H, W)``.

    ``out = shortcut(x) + conv_1(act(norm_1(conv_0(act(norm_0(x, seg))), seg)))`` with
    ``act = leaky_relu(0.2)``; the shortcut is ``conv_s(norm_s(x, seg))`` when ``fin != fout``
    and the identity otherwise.  ``seg``: ``(N, semantic_nc, h, w)``, any size.
    """

    def __init__(self, fin: int, fout: int, norm_G: str = "spectralspadesyncbatch3x3", semantic_nc: int = 36):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = nn.Conv2d(fin, fmiddle, kernel_size=3, padding=1)
        self.conv_1 = nn.Conv2d(fmiddle, fout, kernel_size=3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, kernel_size=1, bias=False)
        if "spectral" in norm_G:
            # Wrapped after all three exist, like upstream, so a seeded build draws the same
            # random numbers (weights, then the power-iteration vectors u, v) in the same order.
            self.conv_0 = spectral_norm(self.conv_0)
            self.conv_1 = spectral_norm(self.conv_1)
            if self.learned_shortcut:
                self.conv_s = spectral_norm(self.conv_s)
        spade_config = norm_G.replace("spectral", "")
        self.norm_0 = SPADE(spade_config, fin, semantic_nc)
        self.norm_1 = SPADE(spade_config, fmiddle, semantic_nc)
        if self.learned_shortcut:
            self.norm_s = SPADE(spade_config, fin, semantic_nc)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.shortcut(x, seg)
        dx = self.conv_0(self.actvn(self.norm_0(x, seg)))
        dx = self.conv_1(self.actvn(self.norm_1(dx, seg)))
        return x_s + dx

    def shortcut(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        if self.learned_shortcut:
            return self.conv_s(self.norm_s(x, seg))
        return x

    @staticmethod
    def actvn(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 2e-1)


def semantic_channels(label_nc: int, no_instance: bool = False, contain_dontcare_label: bool = False) -> int:
    """Channels of the generator input as upstream computes ``opt.semantic_nc``."""
    return label_nc + (1 if contain_dontcare_label else 0) + (0 if no_instance else 1)


class SPADEGenerator(nn.Module):
    """SPADE generator: one-hot label map ``(N, semantic_nc, H, W)`` -> image ``(N, 3, Ho, Wo)``.

    ``Wo = sw * 2**n`` and ``Ho = sh * 2**n`` with ``n`` = 5/6/7 for ``num_upsampling_layers``
    normal/more/most, ``sw = crop_size // 2**n`` and ``sh = round(sw / aspect_ratio)``; the label
    map is normally given at that output size (it is resized with nearest interpolation wherever
    it is used, so any size works).  ``semantic_nc`` defaults to ``label_nc`` plus one channel
    for the instance-edge map (unless ``no_instance``) and one for the don't-care label (if
    ``contain_dontcare_label``).

    With ``use_vae`` the generator starts from a style code ``z`` ``(N, z_dim)`` instead of the
    downsampled label map (``z`` is drawn from N(0, 1) when omitted).  ``init_type`` applies the
    upstream ``BaseNetwork.init_weights`` (default xavier with gain 0.02, as ``define_G`` does);
    ``None`` keeps PyTorch's default initialisation.
    """

    def __init__(
        self,
        label_nc: int,
        ngf: int = 64,
        crop_size: int = 256,
        aspect_ratio: float = 1.0,
        num_upsampling_layers: str = "normal",
        norm_G: str = "spectralspadesyncbatch3x3",
        no_instance: bool = False,
        contain_dontcare_label: bool = False,
        semantic_nc: int | None = None,
        use_vae: bool = False,
        z_dim: int = 256,
        init_type: str | None = "xavier",
        init_variance: float = 0.02,
    ):
        super().__init__()
        if num_upsampling_layers not in _UPSAMPLING_LAYERS:
            raise ValueError(f"num_upsampling_layers [{num_upsampling_layers}] not recognized")
        if semantic_nc is None:
            semantic_nc = semantic_channels(label_nc, no_instance, contain_dontcare_label)
        self._ganslim_init = dict(
            label_nc=label_nc, ngf=ngf, crop_size=crop_size, aspect_ratio=float(aspect_ratio),
            num_upsampling_layers=num_upsampling_layers, norm_G=norm_G, no_instance=no_instance,
            contain_dontcare_label=contain_dontcare_label, semantic_nc=semantic_nc, use_vae=use_vae,
            z_dim=z_dim, init_type=init_type, init_variance=init_variance,
        )
        self.ngf = nf = ngf
        self.semantic_nc = semantic_nc
        self.num_upsampling_layers = num_upsampling_layers
        self.use_vae = use_vae
        self.z_dim = z_dim
        self.sw, self.sh = self.compute_latent_vector_size(crop_size, aspect_ratio, num_upsampling_layers)

        if use_vae:
            self.fc = nn.Linear(z_dim, 16 * nf * self.sw * self.sh)
        else:
            self.fc = nn.Conv2d(semantic_nc, 16 * nf, 3, padding=1)

        def block(fin: int, fout: int) -> SPADEResnetBlock:
            return SPADEResnetBlock(fin, fout, norm_G=norm_G, semantic_nc=semantic_nc)

        self.head_0 = block(16 * nf, 16 * nf)
        self.G_middle_0 = block(16 * nf, 16 * nf)
        self.G_middle_1 = block(16 * nf, 16 * nf)
        self.up_0 = block(16 * nf, 8 * nf)
        self.up_1 = block(8 * nf, 4 * nf)
        self.up_2 = block(4 * nf, 2 * nf)
        self.up_3 = block(2 * nf, nf)
        final_nc = nf
        if num_upsampling_layers == "most":
            self.up_4 = block(nf, nf // 2)
            final_nc = nf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

        if init_type is not None:
            self.init_weights(init_type, init_variance)

    @staticmethod
    def compute_latent_vector_size(crop_size: int, aspect_ratio: float = 1.0,
                                   num_upsampling_layers: str = "normal") -> tuple[int, int]:
        """``(sw, sh)``: width and height of the first feature map."""
        n = _UPSAMPLING_LAYERS[num_upsampling_layers]
        sw = crop_size // (2**n)
        sh = round(sw / aspect_ratio)
        return sw, sh

    def init_weights(self, init_type: str = "xavier", gain: float = 0.02) -> None:
        """Upstream ``BaseNetwork.init_weights``: BatchNorm weights ~ N(1, gain), conv/linear
        weights by ``init_type``, biases zero (spectral-normed convs get ``weight_orig`` set)."""

        def init_one(m: nn.Module) -> None:
            name = type(m).__name__
            if "BatchNorm2d" in name:
                if getattr(m, "weight", None) is not None:
                    init.normal_(m.weight.data, 1.0, gain)
                if getattr(m, "bias", None) is not None:
                    init.constant_(m.bias.data, 0.0)
                return
            if not (("Conv" in name or "Linear" in name) and hasattr(m, "weight")):
                return
            w = m.weight_orig if hasattr(m, "weight_orig") else m.weight
            if init_type == "normal":
                init.normal_(w.data, 0.0, gain)
            elif init_type == "xavier":
                init.xavier_normal_(w.data, gain=gain)
            elif init_type == "xavier_uniform":
                init.xavier_uniform_(w.data, gain=1.0)
            elif init_type == "kaiming":
                init.kaiming_normal_(w.data, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                init.orthogonal_(w.data, gain=gain)
            elif init_type == "none":
                m.reset_parameters()
            else:
                raise NotImplementedError(f"initialization method [{init_type}] is not implemented")
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias.data, 0.0)

        self.apply(init_one)

    def forward(self, input: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A002
        seg = input
        if self.use_vae:
            if z is None:
                z = torch.randn(input.size(0), self.z_dim, dtype=torch.float32, device=input.device)
            x = self.fc(z).view(-1, 16 * self.ngf, self.sh, self.sw)
        else:
            x = self.fc(F.interpolate(seg, size=(self.sh, self.sw)))

        x = self.head_0(x, seg)
        x = self.up(x)
        x = self.G_middle_0(x, seg)
        if self.num_upsampling_layers in ("more", "most"):
            x = self.up(x)
        x = self.G_middle_1(x, seg)

        for blk in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = self.up(x)
            x = blk(x, seg)
        if self.num_upsampling_layers == "most":
            x = self.up(x)
            x = self.up_4(x, seg)

        x = self.conv_img(F.leaky_relu(x, 2e-1))
        return torch.tanh(x)


_OPT_DEFAULTS: dict[str, Any] = dict(
    ngf=64, crop_size=256, aspect_ratio=1.0, num_upsampling_layers="normal",
    norm_G="spectralspadesyncbatch3x3", no_instance=False, contain_dontcare_label=False,
    use_vae=False, z_dim=256, init_type="xavier", init_variance=0.02,
)


def from_opt(opt: Any) -> SPADEGenerator:
    """Build from an upstream-style options namespace (``argparse.Namespace``, ``SimpleNamespace``
    or a dict) using the official attribute names: ``label_nc``, ``ngf``, ``crop_size``,
    ``aspect_ratio``, ``num_upsampling_layers``, ``norm_G``, ``no_instance``,
    ``contain_dontcare_label``, ``semantic_nc`` (optional), ``use_vae``, ``z_dim``,
    ``init_type``, ``init_variance``.  Missing attributes take the defaults of
    :class:`SPADEGenerator`."""
    if isinstance(opt, dict):
        opt = SimpleNamespace(**opt)
    kw = {k: getattr(opt, k, v) for k, v in _OPT_DEFAULTS.items()}
    return SPADEGenerator(label_nc=opt.label_nc, semantic_nc=getattr(opt, "semantic_nc", None), **kw)


@register_model("spade")
def spade(label_nc: int = 35, **kwargs) -> SPADEGenerator:
    """SPADE generator; keyword arguments as :class:`SPADEGenerator` (default: Cityscapes labels
    plus the instance-edge channel, 256x256 output, spectral norm + sync-batch SPADE 3x3)."""
    return SPADEGenerator(label_nc=label_nc, **kwargs)
