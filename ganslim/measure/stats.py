"""One measured network: the row type shared by the compress report (teacher, student, deployment
table) and ``ganslim bench``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

NOT_COMPUTED = "not computed"  # FID / LPIPS without the user's local feature networks


@dataclass
class ModelStats:
    """Measured figures of one network on one runtime; a figure not measured is None.

    Units: ``macs`` in the papers' convention (a multiply-add, conv/linear/norm) and ``macs_true``
    (every multiply-add), one forward of the measured input; ``params`` a count; ``size_mb`` in MB
    (10^6 bytes: the file when there is one, else fp32 weights); latency median / p90 in ms per
    forward of the whole input batch on ``threads`` CPU threads (or ``device``); ``throughput`` in
    images/s; ``peak_mb`` peak activation memory (MB); PSNR in dB, SSIM in [0, 1] to the teacher's
    output, the ground truth and (deployed files) the float PyTorch student; ``int8_ops``: integer
    kernels in the optimised onnxruntime graph. ``*_x``: reference / this (costs: > 1 is cheaper).
    """

    name: str = ""
    runtime: str = "eager"  # eager | compile | onnxruntime | onnxruntime-int8
    device: str = "cpu"
    threads: Optional[int] = None
    macs: Optional[float] = None
    macs_true: Optional[float] = None
    params: Optional[int] = None
    size_mb: Optional[float] = None
    latency_ms: Optional[float] = None
    latency_p90_ms: Optional[float] = None
    latency_paired_ms: Optional[float] = None  # median ms when timed in alternating turns with the other rows
    speedup_paired: Optional[float] = None  # the reference's time / this one's, taken within each round, median
    throughput: Optional[float] = None
    peak_mb: Optional[float] = None
    psnr_to_teacher: Optional[float] = None
    ssim_to_teacher: Optional[float] = None
    psnr_to_gt: Optional[float] = None
    ssim_to_gt: Optional[float] = None
    psnr_to_float: Optional[float] = None
    fid: Any = NOT_COMPUTED
    lpips: Any = NOT_COMPUTED
    int8_ops: Optional[int] = None
    macs_x: Optional[float] = None
    params_x: Optional[float] = None
    size_x: Optional[float] = None
    latency_x: Optional[float] = None
    peak_x: Optional[float] = None
    error: Optional[str] = None  # why this row could not be measured (the other rows still are)
    notes: list = field(default_factory=list)

    def set_ratios(self, reference: "ModelStats") -> "ModelStats":
        """Fill the ``*_x`` columns: ``reference`` / this, for MACs, params, size, latency and peak memory."""
        def ratio(a, b):
            return a / b if a is not None and b else None

        self.macs_x = ratio(reference.macs, self.macs)
        self.params_x = ratio(reference.params, self.params)
        self.size_x = ratio(reference.size_mb, self.size_mb)
        self.latency_x = ratio(reference.latency_ms, self.latency_ms)
        self.peak_x = ratio(reference.peak_mb, self.peak_mb)
        return self
