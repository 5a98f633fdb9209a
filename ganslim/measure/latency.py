"""Wall-clock latency of a forward pass: warm-up, timed repeats, robust statistics."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._utils import as_input_tuple as _as_tuple

__all__ = ["LatencyStats", "measure_latency", "throughput"]

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class LatencyStats:
    """Latency statistics of ``repeats`` timed forward passes, all times in milliseconds.

    Attributes:
        median_ms: median time of one forward pass of the whole batch (ms).
        p90_ms: 90th percentile (linear interpolation) of the timed passes (ms).
        mean_ms: arithmetic mean (ms).
        min_ms: fastest pass (ms).
        repeats: number of timed passes actually run (may be below the requested number when
            ``max_seconds`` cut the measurement short; never below 3).
        threads: ``torch.get_num_threads()`` in force while timing (intra-op CPU threads).
        device: device the model ran on, e.g. ``"cpu"`` or ``"cuda:0"``.
        batch_size: ``N`` of the first input tensor (images per forward pass).
        input_shape: shape of the first input tensor, e.g. ``(1, 3, 256, 256)``.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    repeats: int
    threads: int
    device: str
    batch_size: int
    input_shape: Tuple[int, ...]

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        return (f"{self.median_ms:.2f} ms median (p90 {self.p90_ms:.2f}, mean {self.mean_ms:.2f}, "
                f"min {self.min_ms:.2f}) over {self.repeats} runs; {shape} on {self.device}, "
                f"{self.threads} thread{'s' if self.threads != 1 else ''}; "
                f"{throughput(self):.1f} img/s")


def throughput(stats: LatencyStats) -> float:
    """Images per second at the median latency: ``batch_size / (median_ms / 1000)``."""
    if stats.median_ms <= 0:
        return float("inf")
    return stats.batch_size / (stats.median_ms / 1000.0)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _num_threads(threads: Optional[int]):
    old = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@contextlib.contextmanager
def _eval_on(model: nn.Module, device: torch.device):
    """Model in eval mode on ``device``; original device and training flags restored after."""
    flags = [(m, m.training) for m in model.modules()]
    original = _model_device(model)
    model.eval()
    moved = original != device
    if moved:
        model.to(device)
    try:
        yield model
    finally:
        if moved:
            model.to(original)
        for m, flag in flags:
            m.training = flag


def measure_latency(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    max_seconds: Optional[float] = None,
) -> LatencyStats:
    """Time ``model(*example_inputs)`` with ``time.perf_counter`` under ``torch.inference_mode()``.

    Args:
        model: the network; run in ``eval()`` mode (training flags restored afterwards).
        example_inputs: a tensor ``(N, C, H, W)`` or a tuple of tensors (several inputs). They are
            moved to ``device`` (copies; the caller's tensors are untouched).
        warmup: untimed passes first (oneDNN/cuDNN algorithm selection, caches).
        repeats: timed passes requested (>= 1).
        threads: ``torch.set_num_threads`` value for the measurement; the previous value is
            restored afterwards. ``None`` keeps the current setting.
        device: where to run; ``None`` = where the model's parameters are (CPU for a model
            without parameters). A model moved for the measurement is moved back afterwards.
            On CUDA every timed pass is bracketed by ``torch.cuda.synchronize()``.
        max_seconds: optional cap on the total time (warm-up + timing, seconds): warm-up and
            repeats stop early once it is exceeded, but at least 3 timed passes are always run.

    Returns:
        :class:`LatencyStats` (milliseconds per forward pass of the whole batch).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    dev = torch.device(device) if device is not None else _model_device(model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    is_cuda = dev.type == "cuda"

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(dev)

    inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in _as_tuple(example_inputs))
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    input_shape = tuple(first.shape) if first is not None else ()
    batch_size = int(input_shape[0]) if input_shape else 1
    min_repeats = min(3, repeats)

    times: list[float] = []
    with _num_threads(threads), _eval_on(model, dev), torch.inference_mode():
        n_threads = torch.get_num_threads()
        start = time.perf_counter()

        def over_budget() -> bool:
            return max_seconds is not None and time.perf_counter() - start > max_seconds

        for _ in range(warmup):
            model(*inputs)
            sync()
            if over_budget():
                break
        for i in range(repeats):
            if i >= min_repeats and over_budget():
                break
            sync()
            t0 = time.perf_counter()
            model(*inputs)
            sync()
            times.append((time.perf_counter() - t0) * 1000.0)

    arr = np.asarray(times, dtype=np.float64)
    return LatencyStats(
        median_ms=float(np.median(arr)),
        p90_ms=float(np.percentile(arr, 90)),
        mean_ms=float(arr.mean()),
        min_ms=float(arr.min()),
        repeats=len(times),
        threads=n_threads,
        device=str(dev),
        batch_size=batch_size,
        input_shape=input_shape,
    )
