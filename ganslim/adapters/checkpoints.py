"""Official checkpoints -> ganslim networks, with errors that name the fix.

* :func:`read_state_dict`: a ``.pth`` state dict (plain, ``{"state_dict": ...}`` or DataParallel
  ``module.`` keys); a missing file names the flag to pass.
* :func:`load_matching`: ``load_state_dict`` that, on any key or shape mismatch, says which keys
  differ and which command-line flags the checkpoint was trained with (see :func:`guess_pix2pix_flags`).
* :func:`strip_spectral_norm`: remove ``torch.nn.utils.spectral_norm`` from every layer, keeping
  the effective weight (``weight_orig / sigma``), so channel surgery sees plain convs.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional

import torch
import torch.nn as nn

from .errors import AdapterError

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def read_state_dict(path: str | os.PathLike, flag: str = "--teacher_checkpoint",
                    example: str = "checkpoints/<name>/latest_net_G.pth") -> dict[str, torch.Tensor]:
    """Read a ``.pth`` generator state dict on the CPU."""
    p = os.fspath(path) if path is not None else ""
    if not p:
        raise AdapterError(f"no teacher checkpoint given: pass {flag} PATH (e.g. {example})")
    if not os.path.isfile(p):
        hint = ""
        d = os.path.dirname(p) or "."
        if os.path.isdir(d):
            near = sorted(f for f in os.listdir(d) if f.endswith(".pth"))[:6]
            if near:
                hint = f"; .pth files in {d}: {', '.join(near)}"
        raise AdapterError(f"teacher checkpoint {p} does not exist: pass {flag} with the path of your trained "
                           f"generator (e.g. {example}){hint}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise AdapterError(f"cannot read {p} as a PyTorch state dict ({type(e).__name__}: {e}); pass the generator's "
                           f".pth file written by the repository (e.g. {example})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterError(f"{p} is not a state dict of tensors; pass the generator's .pth file (e.g. {example})")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
    return sd


def _drop_stale_instance_norm_keys(net: nn.Module, sd: dict) -> dict:
    """Checkpoints from PyTorch < 0.4 carry running stats for InstanceNorm layers that have none now
    (the repository's own ``load_networks`` patches them the same way)."""
    mods = dict(net.named_modules())
    out = {}
    for k, v in sd.items():
        mod_name, _, leaf = k.rpartition(".")
        m = mods.get(mod_name)
        if leaf in _RUNNING and isinstance(m, nn.modules.instancenorm._InstanceNorm) and getattr(m, leaf, None) is None:
            continue
        out[k] = v
    return out


def mismatch(net: nn.Module, sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """None when ``sd`` loads into ``net`` strictly, else a short description of the differences."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (checkpoint vs network: {'; '.join(shapes[:3])})")
    return ", ".join(parts)


def load_matching(net: nn.Module, sd: Mapping[str, torch.Tensor], path: str = "checkpoint",
                  flags: str = "", hint: Optional[str] = None) -> nn.Module:
    """Strict ``load_state_dict`` with a message naming the fix: ``flags`` describes what ``net`` was
    built with (e.g. ``"--netG resnet_9blocks --ngf 64 --norm instance"``), ``hint`` what the
    checkpoint looks like (e.g. the output of :func:`describe_flags`)."""
    sd = _drop_stale_instance_norm_keys(net, dict(sd))
    diff = mismatch(net, sd)
    if diff is not None:
        msg = f"{path} does not match the generator built from {flags or 'the given options'}: {diff}."
        msg += f" The checkpoint looks like {hint}: pass those flags." if hint else \
            " Pass the same generator flags the checkpoint was trained with."
        raise AdapterError(msg)
    net.load_state_dict(sd)
    return net


# --------------------------------------------------------------------- pytorch-CycleGAN-and-pix2pix
def guess_pix2pix_flags(sd: Mapping[str, torch.Tensor]) -> Optional[dict]:
    """The ``define_G`` flags of a pytorch-CycleGAN-and-pix2pix generator state dict:
    ``{"netG", "ngf", "norm", "input_nc", "output_nc"}``, or None if it is neither a ResNet nor a U-Net."""
    norm = "batch" if any(k.endswith("running_mean") for k in sd) else "instance"
    if "model.1.weight" in sd and sd["model.1.weight"].dim() == 4 and sd["model.1.weight"].shape[-1] == 7:
        w = sd["model.1.weight"]
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.conv_block\.", k))}
        convs = [int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.weight$", k)) and sd[k].dim() == 4]
        last = sd[f"model.{max(convs)}.weight"]
        return {"netG": f"resnet_{len(blocks)}blocks", "ngf": int(w.shape[0]), "norm": norm,
                "input_nc": int(w.shape[1]), "output_nc": int(last.shape[0])}
    if "model.model.0.weight" in sd:
        w = sd["model.model.0.weight"]
        depth = max(k.count("model.") for k in sd) - 1  # num_downs: one "model." per nested block, plus the root
        out = sd.get("model.model.3.weight")
        return {"netG": f"unet_{2 ** depth}", "ngf": int(w.shape[0]), "norm": norm, "input_nc": int(w.shape[1]),
                "output_nc": int(out.shape[1]) if out is not None else None}
    return None


def describe_flags(flags: Optional[dict]) -> Optional[str]:
    if not flags:
        return None
    s = f"--netG {flags['netG']} --ngf {flags['ngf']} --norm {flags['norm']}"
    if flags.get("input_nc") not in (None, 3):
        s += f" --input_nc {flags['input_nc']}"
    if flags.get("output_nc") not in (None, 3):
        s += f" --output_nc {flags['output_nc']}"
    return s


# --------------------------------------------------------------------- spectral norm
def strip_spectral_norm(model: nn.Module) -> int:
    """Remove ``torch.nn.utils.spectral_norm`` from every layer in place (the weight becomes the
    effective ``weight_orig / sigma`` with the stored power-iteration vectors). Returns how many layers
    changed. Parametrization-based spectral norm (``torch.nn.utils.parametrizations``) is removed too."""
    from torch.nn.utils import parametrize

    n = 0
    was = model.training
    model.eval()  # eval: sigma from the stored u, v (no power iteration that would change them)
    for m in model.modules():
        hooks = [h for h in m._forward_pre_hooks.values() if type(h).__name__ == "SpectralNorm"]
        for h in hooks:
            torch.nn.utils.remove_spectral_norm(m, name=h.name)
            n += 1
        if hooks:
            _drop_spectral_norm_load_hooks(m)
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                if any(type(p).__name__ == "_SpectralNorm" for p in m.parametrizations[name]):
                    parametrize.remove_parametrizations(m, name, leave_parametrized=True)
                    n += 1
    model.train(was)
    return n


def _drop_spectral_norm_load_hooks(m: nn.Module) -> None:
    """``remove_spectral_norm`` leaves its load-state-dict pre-hook behind (torch wraps it in a
    ``_WrappedHook`` that its ``isinstance`` check misses, seen in torch 2.13 and 2.14), so loading the
    plain layer's own state dict later fails with "Missing key(s): weight_orig, weight_u"."""
    for k, h in list(m._load_state_dict_pre_hooks.items()):
        fn = getattr(h, "hook", h)
        if type(fn).__name__ == "SpectralNormLoadStateDictPreHook" or \
                type(getattr(fn, "__self__", None)).__name__ == "SpectralNormLoadStateDictPreHook":
            del m._load_state_dict_pre_hooks[k]


def has_spectral_norm_keys(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("weight_orig") for k in sd)
