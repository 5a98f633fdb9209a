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

from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init
from torch.nn.utils import spectral_norm

from . import register_model

_UPSAMPLING_LAYERS = {"normal": 5, "more": 6, "most": 7}

_SPADE_PREFIX = "spade"
_PARAM_FREE_NORMS = ("instance", "batch", "syncbatch")


def _spade_config_error(text: str) -> ValueError:
    forms = ", ".join(f"'{_SPADE_PREFIX}{n}KxK'" for n in _PARAM_FREE_NORMS)
    return ValueError(f"SPADE norm config {text!r} not understood; expected one of {forms} with K the kernel "
                      f"size of the modulation convs (e.g. 'spadesyncbatch3x3', 'spadeinstance5x5')")


def _read_norm_and_kernel(text: str, at: int) -> tuple[str, int] | None:
    """Read ``<name><k>x<d>`` right after the ``spade`` that starts at ``text[at]``.

    ``<name>`` is the whole (non-empty) stretch of non-digit characters that follows, ``<k>`` and
    ``<d>`` are single decimal digits; only ``<k>`` is used and whatever follows ``<d>`` is ignored.
    ``None`` when the text there does not have that shape.
    """
    begin = at + len(_SPADE_PREFIX)
    end = begin
    while end < len(text) and not text[end].isdecimal():
        end += 1
    tail = text[end:end + 3]
    if end == begin or len(tail) < 3 or not (tail[0].isdecimal() and tail[1] == "x" and tail[2].isdecimal()):
        return None
    return text[begin:end], int(tail[0])


def parse_spade_config(text: str) -> tuple[str, int]:
    """``"spadesyncbatch3x3"`` -> ``("syncbatch", 3)``: the parameter-free norm and the kernel size.

    The text must begin with ``spade``.  Should the part after that first ``spade`` not read as
    ``<name><k>x<d>``, any later ``spade`` in the text is tried in turn, so that every string the
    official option parser accepts is accepted here too, with the same result.  The name is not
    checked here (see :class:`SPADE`).
    """
    if not text.startswith(_SPADE_PREFIX):
        raise _spade_config_error(text)
    at = 0
    while at >= 0:
        found = _read_norm_and_kernel(text, at)
        if found is not None:
            return found
        at = text.find(_SPADE_PREFIX, at + 1)
    raise _spade_config_error(text)


def _param_free_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    # "syncbatch" needs no separate module here: in one process it is plain batch norm, and the
    # cross-GPU version keeps the same buffers, so its checkpoints load into nn.BatchNorm2d.
    return nn.BatchNorm2d(channels, affine=False)


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: ``norm(x) * (1 + gamma(seg)) + beta(seg)``.

    ``config_text`` names the parameter-free norm and the kernel of the modulation convs as
    ``spade<norm><k>x<k>`` (see :func:`parse_spade_config`), e.g. ``spadesyncbatch3x3`` or
    ``spadeinstance5x5``; ``<norm>`` is ``instance``, ``batch`` or ``syncbatch``.  ``x``:
    ``(N, norm_nc, H, W)``; ``segmap``: ``(N, label_nc, h, w)``, brought to ``H x W`` by
    nearest-neighbour resizing before the modulation convs.
    """

    nhidden = 128  # channels between the shared conv and the gamma/beta convs (a constant of the design)

    def __init__(self, config_text: str, norm_nc: int, label_nc: int):
        super().__init__()
        kind, k = parse_spade_config(config_text)
        if kind not in _PARAM_FREE_NORMS:
            raise _spade_config_error(config_text)
        same = k // 2  # "same" padding for odd k
        self.param_free_norm = _param_free_norm(kind, norm_nc)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, self.nhidden, kernel_size=k, padding=same), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(self.nhidden, norm_nc, kernel_size=k, padding=same)
        self.mlp_beta = nn.Conv2d(self.nhidden, norm_nc, kernel_size=k, padding=same)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        seg = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        features = self.mlp_shared(seg)
        scale = 1 + self.mlp_gamma(features)
        return self.param_free_norm(x) * scale + self.mlp_beta(features)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class SPADEResnetBlock(nn.Module):
    """Pre-activation residual block with SPADE norms: ``(N, fin, H, W) -> (N, fout, H, W)``.

    ``out = skip + conv_1(act(norm_1(conv_0(act(norm_0(x, seg))), seg)))`` with
    ``act = leaky_relu(0.2)``; ``skip`` is ``conv_s(norm_s(x, seg))`` (a learned 1x1 projection,
    ``learned_shortcut``) when ``fin != fout`` and ``x`` itself otherwise.  The inner width is
    ``min(fin, fout)``.  ``seg``: ``(N, semantic_nc, h, w)``, any size.
    """

    def __init__(self, fin: int, fout: int, norm_G: str = "spectralspadesyncbatch3x3", semantic_nc: int = 36):
        super().__init__()
        inner = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = nn.Conv2d(fin, inner, kernel_size=3, padding=1)
        self.conv_1 = nn.Conv2d(inner, fout, kernel_size=3, padding=1)
        convs = [self.conv_0, self.conv_1]
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, kernel_size=1, bias=False)
            convs.append(self.conv_s)
        if "spectral" in norm_G:
            # spectral_norm edits each conv in place (weight -> weight_orig + u/v buffers).  It runs
            # only once all convs exist, so a seeded build draws its random numbers (all weights
            # first, then the u/v vectors) in the same order as the official one.
            for conv in convs:
                spectral_norm(conv)
        spade_text = norm_G.replace("spectral", "")
        self.norm_0 = SPADE(spade_text, fin, semantic_nc)
        self.norm_1 = SPADE(spade_text, inner, semantic_nc)
        if self.learned_shortcut:
            self.norm_s = SPADE(spade_text, fin, semantic_nc)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        skip = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        h = self.conv_0(_lrelu(self.norm_0(x, seg)))
        return skip + self.conv_1(_lrelu(self.norm_1(h, seg)))


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
            raise ValueError(f"num_upsampling_layers must be one of {', '.join(_UPSAMPLING_LAYERS)}; "
                             f"got {num_upsampling_layers!r}")
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

        # First feature map (16 nf channels at sh x sw): projected from the style code, or a 3x3 conv
        # on the label map shrunk to that size.
        head_c = 16 * nf
        self.fc = nn.Linear(z_dim, head_c * self.sh * self.sw) if use_vae else nn.Conv2d(semantic_nc, head_c, 3, padding=1)

        # Block name -> (input, output) width in units of nf, in registration (= key) order.
        widths = {"head_0": (16, 16), "G_middle_0": (16, 16), "G_middle_1": (16, 16),
                  "up_0": (16, 8), "up_1": (8, 4), "up_2": (4, 2), "up_3": (2, 1)}
        for name, (cin, cout) in widths.items():
            self.add_module(name, SPADEResnetBlock(cin * nf, cout * nf, norm_G=norm_G, semantic_nc=semantic_nc))
        last_width = nf
        if num_upsampling_layers == "most":
            last_width = nf // 2
            self.up_4 = SPADEResnetBlock(nf, last_width, norm_G=norm_G, semantic_nc=semantic_nc)
        self.conv_img = nn.Conv2d(last_width, 3, 3, padding=1)
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
        """Re-initialise as the official ``BaseNetwork.init_weights`` does, so a seeded build
        matches: weights of conv and linear layers by ``init_type`` (``none``: PyTorch's own
        ``reset_parameters``), affine batch-norm scales ~ N(1, gain), every bias zero.  Only
        ``normal``, ``xavier`` and ``orthogonal`` use ``gain``.  A spectral-normed conv gets its
        ``weight_orig`` set."""
        if init_type not in _WEIGHT_INITS and init_type != "none":
            known = ", ".join([*_WEIGHT_INITS, "none"])
            raise NotImplementedError(f"init_type {init_type!r} is not supported (choose from {known})")
        self.apply(lambda m: _init_module(m, init_type, gain))

    def _stages(self) -> Iterator[tuple[bool, SPADEResnetBlock]]:
        """``(upsample x2 first?, block)`` in forward order."""
        extra = self.num_upsampling_layers in ("more", "most")
        yield False, self.head_0
        yield True, self.G_middle_0
        yield extra, self.G_middle_1
        for blk in (self.up_0, self.up_1, self.up_2, self.up_3):
            yield True, blk
        if self.num_upsampling_layers == "most":
            yield True, self.up_4

    def forward(self, input: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A002
        seg = input
        if not self.use_vae:
            x = self.fc(F.interpolate(seg, size=(self.sh, self.sw)))
        else:
            if z is None:  # no style code given: a random one
                z = torch.randn(seg.shape[0], self.z_dim, dtype=torch.float32, device=seg.device)
            head_c = 16 * self.ngf
            x = self.fc(z).view(-1, head_c, self.sh, self.sw)
        for upsample, blk in self._stages():
            if upsample:
                x = self.up(x)
            x = blk(x, seg)
        return torch.tanh(self.conv_img(_lrelu(x)))


_WEIGHT_INITS: dict[str, Callable[[torch.Tensor, float], Any]] = {
    "normal": lambda w, gain: init.normal_(w, 0.0, gain),
    "xavier": lambda w, gain: init.xavier_normal_(w, gain=gain),
    "xavier_uniform": lambda w, gain: init.xavier_uniform_(w, gain=1.0),
    "kaiming": lambda w, gain: init.kaiming_normal_(w, a=0, mode="fan_in"),
    "orthogonal": lambda w, gain: init.orthogonal_(w, gain=gain),
}


def _init_module(m: nn.Module, init_type: str, gain: float) -> None:
    """One step of :meth:`SPADEGenerator.init_weights` (modules are recognised by class name, as
    upstream, so wrappers such as a sync-batch-norm class are covered too)."""
    kind = type(m).__name__
    bias = getattr(m, "bias", None)
    if "BatchNorm2d" in kind:
        weight = getattr(m, "weight", None)
        if weight is not None:
            init.normal_(weight, 1.0, gain)
    elif ("Conv" in kind or "Linear" in kind) and hasattr(m, "weight"):
        if init_type == "none":
            m.reset_parameters()
        else:
            _WEIGHT_INITS[init_type](getattr(m, "weight_orig", m.weight), gain)
    else:
        return
    if bias is not None:
        with torch.no_grad():
            bias.zero_()


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
