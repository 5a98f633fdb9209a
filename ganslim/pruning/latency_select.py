"""Channel selection under a latency budget with a measured latency model (HALP, "Hardware-Aware
Latency Pruning"): keep the channels that carry the most importance per millisecond of the device.

Greedy: from the full network, repeatedly take ``step`` channels (the least important ones) away from
the group whose removal loses the least importance per millisecond saved, as the latency model
(:class:`ganslim.measure.latency_table.LatencyModel`) predicts it, until the prediction meets the
budget. Importance is CAT's (:func:`ganslim.pruning.onestep.importance_scores`: normalised norm
scales, mean 1 per group). Where the kernels compute channels in blocks, removing ``step`` channels
may save nothing; the group is then offered a larger cut (up to ``4 * step``) so the selection moves
to the next step of the latency staircase instead of paying for channels that cost nothing to keep.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

from ..core.targeting import Targets
from .onestep import importance_scores

__all__ = ["latency_masks", "LatencySelection"]


class LatencySelection(list):
    """The keep-masks (a list, one per group) with ``predicted_ms``, the widths and the number of
    greedy moves."""

    predicted_ms: float = float("nan")
    moves: int = 0


def latency_masks(model: nn.Module, targets: Targets, latency_model, target_ms: float, step: int = 8,
                  scores: Optional[Mapping[str, torch.Tensor]] = None, min_fraction: float = 0.125,
                  min_channels: int = 2, progress: Optional[Callable[[float], None]] = None) -> LatencySelection:
    """Boolean keep-mask per channel group whose predicted latency (ms, ``latency_model.predict``) is
    at most ``target_ms``, chosen greedily by importance lost per millisecond saved.

    Each group keeps at least ``max(min_channels, ceil(min_fraction * size))`` channels, and whole
    ``step``s of channels where its size allows. Raises ``ValueError`` when the floors alone are
    predicted above ``target_ms``. ``progress(predicted_ms)`` is called after every move.
    """
    groups = targets.groups
    imp = importance_scores(model, targets, scores)
    order = [torch.argsort(s, descending=True, stable=True) for s in imp]
    ranked = [s[o] for s, o in zip(imp, order)]  # scores sorted high -> low
    floors = [min(g.size, max(1, min_channels, math.ceil(min_fraction * g.size))) for g in groups]
    widths = [g.size for g in groups]

    def masks(ws) -> list[torch.Tensor]:
        out = []
        for o, w, g in zip(order, ws, groups):
            a = torch.zeros(g.size, dtype=torch.bool)
            a[o[:w]] = True
            out.append(a)
        return out

    lowest = latency_model.predict(masks(floors))
    if lowest > target_ms:
        raise ValueError(f"impossible latency target {target_ms:.3g} ms: every group at its floor is predicted at "
                         f"{lowest:.3g} ms on this device")
    current = latency_model.predict(masks(widths))
    moves = 0
    while current > target_ms:
        best = None  # (importance lost per ms saved, group, new width, new latency)
        for gi, w in enumerate(widths):
            if w <= floors[gi]:
                continue
            for k in range(1, 5):
                new = max(floors[gi], (w - 1) // step * step - (k - 1) * step) if w > step else max(floors[gi], w - k)
                trial = list(widths)
                trial[gi] = new
                lat = latency_model.predict(masks(trial))
                saved = current - lat
                if saved > 1e-6 * max(current, 1.0):
                    lost = float(ranked[gi][new:w].sum())
                    cand = (lost / saved, gi, new, lat)
                    if best is None or cand[0] < best[0]:
                        best = cand
                    break
                if new == floors[gi]:
                    break
        if best is None:  # no cut saves time any more: the floors' prediction decides (checked above)
            widths, current = list(floors), lowest
            break
        _, gi, new, current = best
        widths[gi] = new
        moves += 1
        if progress is not None:
            progress(current)
    out = LatencySelection(masks(widths))
    out.predicted_ms, out.moves = current, moves
    return out
