"""Device-aware budgets: turn a latency target measured on *this* device into a MACs target.

MACs are a poor proxy for latency on real hardware (thin layers are memory-bound, kernels prefer
some widths), so ``compress(..., target_latency_ms=...)`` measures instead of guessing: the network is
physically pruned to a few uniform widths (every channel group scaled alike), each variant's
latency is measured on the device and input at hand, and the MACs fraction whose measured latency
meets the target is interpolated (log-log, between measured points). The compression then runs
with that MACs target and the report gives the student's measured latency next to the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .. import measure
from .._utils import as_input_tuple
from .uniform import uniform_alive

DEFAULT_WIDTHS = (1.0, 0.7, 0.5, 0.35, 0.25, 0.17, 0.12, 0.08)


@dataclass
class LatencyCalibration:
    """Measured ``(macs_fraction, latency_ms)`` points of uniformly slimmed copies of a network on one
    device (``device``, ``threads``, input shape ``input_shape``) and the fraction chosen for a target."""

    points: list = field(default_factory=list)  # [(width ratio, MACs fraction, latency ms)]
    target_ms: Optional[float] = None
    macs_fraction: Optional[float] = None
    device: str = "cpu"
    threads: int = 1
    input_shape: tuple = ()
    note: str = ""

    def table(self) -> str:
        lines = ["width  MACs fraction  latency ms"]
        lines += [f"{w:5.2f}  {f:13.4f}  {ms:10.2f}" for w, f, ms in self.points]
        return "\n".join(lines)


def calibrate_latency(model: nn.Module, targets, example_inputs: Any, latency_inputs: Any, target_ms: float,
                      widths: Sequence[float] = DEFAULT_WIDTHS, device: Optional[str] = None, repeats: int = 7,
                      threads: Optional[int] = None) -> LatencyCalibration:
    """Measure uniformly slimmed copies of ``model`` and pick the MACs fraction meeting ``target_ms``.

    Args:
        model: the network to be compressed (not modified: copies are pruned).
        targets: its channel groups (:func:`ganslim.core.targeting.find_channel_groups`).
        example_inputs: the input the channel groups were found with (for export checks).
        latency_inputs: the deployment input whose latency matters (e.g. one full image).
        target_ms: latency target in milliseconds on ``device`` (default: where ``model`` is).
    Returns:
        :class:`LatencyCalibration`; ``macs_fraction`` is None when even the thinnest variant misses
        the target (its ``note`` says so), 1.0 when the unpruned network already meets it.
    """
    from ..core.gating import GateSet, MacsModel, export_pruned

    if not target_ms > 0:
        raise ValueError(f"target_latency_ms must be > 0, got {target_ms}")
    example = as_input_tuple(example_inputs)
    lat_in = as_input_tuple(latency_inputs)
    macs_model = MacsModel(model, targets, measure.macs_by_module(model, example, "papers"))
    cal = LatencyCalibration(target_ms=target_ms, threads=threads or torch.get_num_threads(),
                             input_shape=tuple(lat_in[0].shape))
    for w in sorted(set(widths), reverse=True):
        if w >= 1.0:
            variant = model
            frac = 1.0
        else:
            gates = GateSet(targets).to(next((p.device for p in model.parameters()), torch.device("cpu")))
            alive = uniform_alive(targets.groups, w)
            gates.set_masks(alive)
            variant, _ = export_pruned(model, gates, example, tol=float("inf"))
            frac = macs_model.macs(alive) / macs_model.total
        lat = measure.measure_latency(variant, lat_in, warmup=2, repeats=repeats, threads=threads, device=device,
                                      max_seconds=20)
        cal.device = lat.device
        cal.points.append((float(w), float(frac), float(lat.median_ms)))
        if lat.median_ms < 0.7 * target_ms:
            break  # thinner variants only matter when this one is still too slow
    pts = sorted(cal.points, key=lambda p: p[1])  # by MACs fraction, ascending
    if pts[-1][2] <= target_ms:
        cal.macs_fraction, cal.note = 1.0, "the unpruned network already meets the latency target"
        return cal
    if pts[0][2] > target_ms:
        cal.note = (f"even {pts[0][1]:.3f} of the MACs takes {pts[0][2]:.2f} ms > {target_ms} ms on {cal.device}: "
                    "the target cannot be met by slimming alone here")
        return cal
    for (f0, l0), (f1, l1) in zip([(p[1], p[2]) for p in pts], [(p[1], p[2]) for p in pts[1:]]):
        if l0 <= target_ms <= l1:
            if l1 == l0:
                cal.macs_fraction = f0
            else:  # log-log interpolation between the two measured points
                t = (math.log(target_ms) - math.log(l0)) / (math.log(l1) - math.log(l0))
                cal.macs_fraction = math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
            break
    return cal
