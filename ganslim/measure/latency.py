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

__all__ = ["LatencyStats", "PairedLatency", "measure_latency", "paired_latency", "throughput"]

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


def _timing_setup(model: nn.Module, device: Union[str, torch.device, None], example_inputs: Inputs):
    """``(device, sync, inputs on it, first input's shape)`` for timing ``model``: the device defaults to
    the model's (a bare ``"cuda"`` becomes the current one); ``sync()`` waits for CUDA work (no-op on CPU)."""
    dev = torch.device(device) if device is not None else _model_device(model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in _as_tuple(example_inputs))
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    return dev, sync, inputs, tuple(first.shape) if first is not None else ()


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
    dev, sync, inputs, input_shape = _timing_setup(model, device, example_inputs)
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


@dataclass(frozen=True)
class PairedLatency:
    """Latencies of several models timed in alternating short turns (:func:`paired_latency`).

    Attributes:
        median_ms: per model, the median time of one forward pass (ms).
        ratio: per model, the median over rounds of its time divided by model 0's time *in the same
            round* (model 0's entry is 1.0): a ratio from which the machine's slow drifts cancel.
        ratio_iqr: per model, the 25th and 75th percentiles of those per-round ratios.
        rounds: timed rounds (each ran every model once).
        threads, device, input_shape: as in :class:`LatencyStats`.
    """

    median_ms: Tuple[float, ...]
    ratio: Tuple[float, ...]
    ratio_iqr: Tuple[Tuple[float, float], ...]
    rounds: int
    threads: int
    device: str
    input_shape: Tuple[int, ...]

    def __str__(self) -> str:
        return "; ".join(f"model {i}: {ms:.2f} ms, {r:.3f}x of model 0 (IQR {lo:.3f}-{hi:.3f})"
                         for i, (ms, r, (lo, hi)) in enumerate(zip(self.median_ms, self.ratio, self.ratio_iqr)))


def paired_latency(models: Sequence[nn.Module], example_inputs: Inputs, *, rounds: int = 30, passes: int = 2,
                   warmup: int = 1, threads: Optional[int] = None,
                   device: Union[str, torch.device, None] = None, settle_ms: float = 25.0) -> PairedLatency:
    """Time ``models`` side by side on one input: ``rounds`` rounds, in each of which every model takes a
    turn (the order rotated from round to round) of one untimed pass and ``passes`` timed ones; a
    model's time in a round is the mean of its timed passes, the ratios are taken within each round,
    then their median.

    On a shared machine the speed drifts over seconds (other tenants, clocks): timing one model's
    repeats and then the other's puts that drift into their ratio (the int8 / fp32 ratio of one
    student measured 0.53 and 0.84 minutes apart). Short alternating turns put both under the same
    conditions. Right after another model, the next one shares the cores with that model's
    still-spinning worker threads (onnxruntime, OpenMP): timed pass by pass, a 57 ms student measured
    102 ms. So each turn opens with a pause of ``settle_ms`` (the timing thread sleeps, the other
    model's threads get the cores to wind down and block) and one untimed pass. The untimed pass alone
    was not enough on 2 cores after a 250 ms onnxruntime teacher: an int8 student timed 18 ms alone
    measured 25 ms paired, and 18-20 ms with a 20-100 ms pause. Models run in ``eval()`` mode under
    ``torch.inference_mode()`` on ``device`` (default: the first model's), with ``threads`` CPU
    threads (flags, devices and threads restored after).

    Args:
        models: two or more networks taking the same inputs (e.g. an fp32 and an int8 ``OnnxModule``).
        example_inputs: a tensor ``(N, C, H, W)`` or a tuple of tensors.
        rounds: timed rounds (>= 3); passes: timed passes per turn (>= 1); warmup: untimed rounds first.
        settle_ms: pause (ms) before each turn, not timed (>= 0).
    Returns:
        :class:`PairedLatency` (ms per forward pass of the whole batch; ratios to ``models[0]``).
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError("paired_latency needs at least two models")
    if rounds < 3:
        raise ValueError(f"rounds must be >= 3, got {rounds}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if not settle_ms >= 0:
        raise ValueError(f"settle_ms must be >= 0, got {settle_ms}")
    dev, sync, inputs, input_shape = _timing_setup(models[0], device, example_inputs)
    n = len(models)
    times = np.zeros((rounds, n))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_num_threads(threads))
        for m in models:
            stack.enter_context(_eval_on(m, dev))
        stack.enter_context(torch.inference_mode())
        n_threads = torch.get_num_threads()
        for r in range(-warmup, rounds):
            for k in range(n):
                i = (r + k) % n  # rotated: no model always runs right after the same other one
                if settle_ms > 0:
                    time.sleep(settle_ms / 1000.0)  # the previous model's threads wind down
                models[i](*inputs)  # the turn's untimed pass
                sync()
                total = 0.0
                for _ in range(passes):
                    t0 = time.perf_counter()
                    models[i](*inputs)
                    sync()
                    total += time.perf_counter() - t0
                if r >= 0:
                    times[r, i] = total * 1000.0 / passes
    ratios = times / times[:, :1]
    return PairedLatency(
        median_ms=tuple(float(v) for v in np.median(times, axis=0)),
        ratio=tuple(float(v) for v in np.median(ratios, axis=0)),
        ratio_iqr=tuple((float(a), float(b)) for a, b in zip(*np.percentile(ratios, [25, 75], axis=0))),
        rounds=rounds, threads=n_threads, device=str(dev), input_shape=input_shape)
