"""CartoonGAN (Yijunmaverick/CartoonGAN-Test-Pytorch-Torch ``network/Transformer.py``): compress a
pretrained ``*_net_G_float.pth`` with nothing but a folder of photos.

The teacher's outputs are the targets (no cartoon data, no discriminator). The released
``InstanceNormalization`` overrides ``__call__`` (forward hooks on it never fire) and is unknown to
the channel dependency graph, so :func:`convert_instance_norms` replaces it by the numerically
identical ``nn.InstanceNorm2d(affine=True, eps=1e-9)`` first; feature distillation hooks the convs.
The released weights expect BGR input in [-1, 1] (see the repository's ``test.py``): the loader here
feeds BGR, and the slim network takes exactly the same preprocessing.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from .checkpoints import load_matching, read_state_dict
from .errors import AdapterError

# conv outputs inside the residual trunk (the custom norms after them are replaced, but the convs are
# the stable hook points in both the official class and ganslim's zoo copy)
DISTILL_CONVS = ("conv05_2", "conv07_2", "conv09_2", "conv11_2")


def _is_custom_instance_norm(m: nn.Module) -> bool:
    scale, shift = getattr(m, "scale", None), getattr(m, "shift", None)
    return (isinstance(scale, nn.Parameter) and isinstance(shift, nn.Parameter) and scale.dim() == 1
            and scale.shape == shift.shape and "instancenorm" in type(m).__name__.lower())


def convert_instance_norms(model: nn.Module) -> int:
    """Replace every CartoonGAN ``InstanceNormalization`` (``scale``/``shift``, biased variance, eps
    inside the square root) by an equal ``nn.InstanceNorm2d(affine=True)``. Returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_custom_instance_norm(child):
                norm = nn.InstanceNorm2d(child.scale.numel(), eps=float(getattr(child, "eps", 1e-9)), affine=True)
                with torch.no_grad():
                    norm.weight.copy_(child.scale)
                    norm.bias.copy_(child.shift)
                setattr(parent, name, norm.to(child.scale.device))
                n += 1
    return n


def load_transformer(checkpoint: str, model: Optional[nn.Module] = None) -> nn.Module:
    """The teacher: ``model`` (the official ``Transformer()``; default ganslim's zoo copy with the same
    keys) loaded from ``checkpoint``, norms converted, eval mode."""
    if model is None:
        from ..zoo.cartoongan import Transformer

        model = Transformer()
    sd = read_state_dict(checkpoint, flag="--checkpoint", example="pretrained_model/Hayao_net_G_float.pth")
    if "conv01_1.weight" not in sd:
        raise AdapterError(f"{checkpoint} is not a CartoonGAN Transformer checkpoint (no conv01_1.weight); pass one of the "
                           "released *_net_G_float.pth files (Hayao, Hosoda, Paprika, Shinkai)")
    load_matching(model, sd, checkpoint, "network/Transformer.py (class Transformer)")
    convert_instance_norms(model)
    return model.eval()


def bgr(batch):
    """Loader batch (RGB in [-1, 1]) -> the Transformer's BGR input; no ground truth (teacher targets)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return x[:, [2, 1, 0]], None


def compress_folder(checkpoint: str, photos: str, out: str, *, target_macs: float = 0.1, crop: int = 128,
                    batch_size: int = 4, model: Optional[nn.Module] = None, **overrides):
    """Compress a CartoonGAN checkpoint on a folder of photos and save the slim network (``ganslim.save``).
    ``overrides``: :class:`ganslim.CompressConfig` fields (``steps``, ``finetune_steps``, ``device`` ...).
    Returns the :class:`ganslim.CompressResult`."""
    from ..deployment.checkpoint import save
    from ..compression import compress
    from ..data import ImageFolder

    if not os.path.isdir(photos):
        raise AdapterError(f"photo folder {photos} does not exist: pass --photos with a folder of .jpg/.png photos")
    teacher = load_transformer(checkpoint, model)
    try:
        ds = ImageFolder(photos, crop=crop, length=max(64, batch_size * 16))
    except ValueError as e:
        raise AdapterError(f"{e}; pass a folder of photos at least {crop} px on each side, or a smaller --crop") from None
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    names = dict(teacher.named_modules())
    overrides.setdefault("distill_layers", [n for n in DISTILL_CONVS if n in names] or None)
    overrides.setdefault("batch_fn", bgr)
    result = compress(teacher, teacher, loader, target_macs=target_macs, **overrides)
    save(result.model, out, metadata={"source": "CartoonGAN Transformer", "checkpoint": os.path.basename(checkpoint),
                                      "input": "BGR in [-1, 1], as the CartoonGAN test code"})
    return result
