"""Image fidelity: PSNR and SSIM in torch, and output comparisons between generators.

Images are ``(N, C, H, W)`` batches (a single ``(C, H, W)`` or ``(H, W)`` image is also
accepted) with values in ``[-1, 1]`` by default -- the range of a Tanh generator -- hence the
default ``data_range=2.0``. Batch results are the mean of the per-image values. Computations are
done in float64 on the tensors' own device.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .latency import _eval_on, _model_device
from .._utils import as_input_tuple, first_output

__all__ = ["psnr", "ssim", "compare_outputs", "fidelity_to_target"]

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]

_WIN = 11
_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03


def _as_nchw(x: Any) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    elif x.dim() != 4:
        raise ValueError(f"expected an image (H, W), (C, H, W) or a batch (N, C, H, W); got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def _pair(x: Any, y: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_nchw(x), _as_nchw(y)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y.to(x.device)


def psnr_per_image(x: Any, y: Any, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB of every image of a batch: ``(N,)`` float64 tensor;
    ``10 * log10(data_range**2 / MSE)`` with the MSE over ``C*H*W``; ``inf`` where identical."""
    x, y = _pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range**2 / mse)
    return torch.where(mse == 0, torch.full_like(out, math.inf), out)


def psnr(x: Any, y: Any, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, averaged over the images of the batch.

    Args:
        x, y: ``(N, C, H, W)`` (or one ``(C, H, W)`` / ``(H, W)`` image), same shape.
        data_range: max - min of the value range (2.0 for images in ``[-1, 1]``; 1.0 for
            ``[0, 1]``; 255 for uint8).

    Returns:
        mean over images of ``10 * log10(data_range**2 / MSE_image)`` (dB); ``float("inf")``
        if the images are identical (if any image of the batch is identical the mean is inf).
    """
    return float(psnr_per_image(x, y, data_range).mean())


def _gaussian_window(device: torch.device) -> torch.Tensor:
    r = (_WIN - 1) // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (t / _SIGMA) ** 2)
    return g / g.sum()


def ssim_per_image(x: Any, y: Any, data_range: float = 2.0) -> torch.Tensor:
    """SSIM of every image of a batch: ``(N,)`` float64 tensor (mean over channels and pixels)."""
    x, y = _pair(x, y)
    n, c, h, w = x.shape
    if h < _WIN or w < _WIN:
        raise ValueError(f"SSIM needs images of at least {_WIN}x{_WIN} pixels, got {h}x{w}")
    g = _gaussian_window(x.device)
    gh = g.view(1, 1, _WIN, 1).expand(c, 1, _WIN, 1)
    gw = g.view(1, 1, 1, _WIN).expand(c, 1, 1, _WIN)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # 'valid' separable filtering == skimage's filter-then-crop of (win-1)/2 pixels per side
        return F.conv2d(F.conv2d(t, gh, groups=c), gw, groups=c)

    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def ssim(x: Any, y: Any, data_range: float = 2.0) -> float:
    """Structural similarity (Wang et al. 2004), averaged over channels, pixels and images.

    Gaussian window of 11 taps, sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
    covariances, each channel separately; the SSIM map is averaged over the pixels whose window
    lies inside the image (a 5-pixel border is dropped). This is
    ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=0, data_range=data_range)`` per image.

    Args:
        x, y: ``(N, C, H, W)`` (or ``(C, H, W)`` / ``(H, W)``), H and W at least 11.
        data_range: max - min of the value range (2.0 for ``[-1, 1]``).

    Returns:
        mean SSIM (dimensionless, at most 1).
    """
    return float(ssim_per_image(x, y, data_range).mean())


# --------------------------------------------------------------------------- model comparisons
def _run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    dev = _model_device(model)
    inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in inputs)
    return first_output(model(*inputs))


class _Mean:
    def __init__(self) -> None:
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor, data_range: float) -> None:
        b = b.to(a.device)
        self.psnr_sum += float(psnr_per_image(a, b, data_range).sum())
        self.ssim_sum += float(ssim_per_image(a, b, data_range).sum())
        self.n += _as_nchw(a).shape[0]

    def result(self) -> Dict[str, float]:
        if self.n == 0:
            raise ValueError("no batches given")
        return {"psnr": self.psnr_sum / self.n, "ssim": self.ssim_sum / self.n, "n_images": self.n}


def compare_outputs(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    batch_fn: Optional[Callable[[Any], Inputs]] = None,
    data_range: float = 2.0,
) -> Dict[str, float]:
    """Mean PSNR/SSIM between the outputs of two generators on the same inputs.

    Args:
        model_a, model_b: generators producing ``(N, C, H, W)`` images (or a tuple/dict whose
            first tensor is the image); run in ``eval()`` mode under ``torch.no_grad()``,
            training flags restored afterwards. Inputs go to each model's own device.
        batches: iterable of batches; each a tensor ``(N, C, H, W)`` or a tuple of tensors
            (several model inputs).
        batch_fn: optional ``batch -> model inputs`` (a tensor or tuple), e.g. to drop labels.
        data_range: value range of the outputs (2.0 for Tanh outputs in ``[-1, 1]``).

    Returns:
        ``{"psnr": dB, "ssim": float, "n_images": int}`` -- means over all images (not over
        batches), with ``model_a``'s output as the reference. PSNR is ``inf`` if the outputs
        are identical.
    """
    acc = _Mean()
    with _eval_on(model_a, _model_device(model_a)), _eval_on(model_b, _model_device(model_b)), torch.no_grad():
        for batch in batches:
            inputs = as_input_tuple(batch_fn(batch) if batch_fn is not None else batch)
            acc.add(_run(model_a, inputs), _run(model_b, inputs), data_range)
    return acc.result()


def fidelity_to_target(
    model: nn.Module,
    pairs: Iterable[Tuple[Any, torch.Tensor]],
    data_range: float = 2.0,
) -> Dict[str, float]:
    """Mean PSNR/SSIM of a generator's outputs against ground-truth targets.

    Args:
        model: generator, run in ``eval()`` mode under ``torch.no_grad()`` (flags restored).
        pairs: iterable of ``(input, target)``: ``input`` a tensor ``(N, C_in, H, W)`` or a tuple
            of tensors, ``target`` the expected ``(N, C, H, W)`` images (same range as the output).
        data_range: value range (2.0 for ``[-1, 1]``).

    Returns:
        ``{"psnr": dB, "ssim": float, "n_images": int}`` -- means over all images.
    """
    acc = _Mean()
    with _eval_on(model, _model_device(model)), torch.no_grad():
        for inp, target in pairs:
            out = _run(model, as_input_tuple(inp))
            acc.add(out, target, data_range)
    return acc.result()
