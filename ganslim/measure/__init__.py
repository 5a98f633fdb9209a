"""Measurement core: MACs, parameters, model size, latency, peak memory, image fidelity.

MACs convention
---------------
All compute figures are multiply-accumulates (MACs) of ONE forward pass of the batch given
(1 MAC = one fused multiply-add; FLOPs ~= 2 x MACs). Two conventions:

* ``"papers"`` (default): torchprofile's rules, as used by GAN Compression / CAT / OMGD. A
  ``ConvTranspose2d`` is counted by its OUTPUT size, ``N*H_out*W_out*C_out*(C_in/groups)*k_h*k_w``;
  norms without an affine weight, ReLU/Tanh/padding/add/cat cost nothing. The pix2pix/CycleGAN
  ResNet-9 (ngf 64) at 1x3x256x256 is 56,799,264,768 MACs = **56.80 G** (its convolutions only).
* ``"true"``: fvcore's standard count -- real work: transposed convs by INPUT size, plus fvcore's
  estimates for norms/up-sampling. ResNet-9 at 256² is 49,681,530,880 = **49.68 G**.

Other units: parameters are element counts; sizes and memory are MB = 10**6 bytes; latency is
milliseconds per forward pass of the whole batch; PSNR in dB, images in ``[-1, 1]`` by default.
"""
from __future__ import annotations

from .fidelity import compare_outputs, fidelity_to_target, psnr, psnr_per_image, ssim, ssim_per_image
from .latency import LatencyStats, PairedLatency, measure_latency, paired_latency, throughput
from .macs import CONVENTIONS, count_macs, macs_by_module
from .memory import count_params, model_size_mb, peak_memory_mb

__all__ = [
    "CONVENTIONS",
    "count_macs",
    "macs_by_module",
    "count_params",
    "model_size_mb",
    "peak_memory_mb",
    "LatencyStats",
    "measure_latency",
    "PairedLatency",
    "paired_latency",
    "throughput",
    "psnr",
    "psnr_per_image",
    "ssim",
    "ssim_per_image",
    "compare_outputs",
    "fidelity_to_target",
]
