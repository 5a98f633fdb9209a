"""Widths moved to where this device's kernels are fast, each choice timed as a whole network.

A width cut chosen by MACs alone lands on channel counts the runtime's kernels handle badly: on an
AVX-512 CPU onnxruntime runs convolutions in blocks of 16 channels (NCHWc), so a 38-channel residual
trunk runs through the slower plain path, and a 10-channel last layer widens the rewritten RGB output
conv to 40 channels where 32 fit its blocks (``ganslim profile`` of the exported file shows both;
``benchmarks/bench_frontier.py --variants uniform-latency`` measures what the search gains).

:func:`latency_widths` starts from keep-counts that meet a MACs budget and gives each set of like
groups (groups whose layers have the same MACs, e.g. the inner channels of the nine residual blocks)
one width from its own and the nearby multiples of ``step``. Of the combinations whose MACs stay within
``[min_fraction, 1]`` of the budget (the student keeps nearly the capacity it was given), a cheap
predictor (the device's per-layer latency table) ranks them by MACs per millisecond (speed-up
per MACs reduction, up to a constant); the best few are exported and timed whole, because part of what decides
(layout reorders, the rewritten thin ends) lies between the layers, and the fastest per MAC is kept
when it beats the starting widths timed beside it.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

__all__ = ["WidthSearch", "candidate_widths", "like_groups", "latency_widths", "leading_masks"]


def leading_masks(groups, counts: Sequence[int]) -> list[torch.Tensor]:
    """Keep-mask per group: its leading ``counts[i]`` channels."""
    return [torch.arange(g.size) < int(k) for g, k in zip(groups, counts)]


def like_groups(groups, macs_model) -> list[list[int]]:
    """Indices of the groups that are alike, in order of first appearance: the same size and the
    same MACs in every member layer (role and count), e.g. the inner channels of identical residual
    blocks. Like groups get one width, which keeps the search small and the network regular."""
    classes: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        members = tuple(sorted((m.role, round(macs_model.base.get(m.name, 0.0))) for m in g.members))
        classes.setdefault((g.size, members), []).append(i)
    return list(classes.values())


@dataclass
class WidthSearch:
    """What :func:`latency_widths` did: the counts it started from and ended with, their MACs and
    measured milliseconds (the fastest pass; the final pair re-timed side by side), how many networks
    it timed, in how many seconds."""

    start: list[int]
    counts: list[int]
    start_macs: float
    macs: float
    start_ms: float
    ms: float
    timed: int
    seconds: float
    trace: list = field(default_factory=list)  # (counts, macs, ms) of every network timed in the ranking

    @property
    def speedup(self) -> float:
        """Measured speed-up of the chosen widths over the starting ones (> 1: faster)."""
        return self.start_ms / self.ms


def candidate_widths(k: int, size: int, step: int, spread: float = 1.6) -> list[int]:
    """``k`` and the multiples of ``step`` from ``k / spread`` to ``k * spread`` (within ``[1, size]``;
    ``size`` itself when it is in that range)."""
    lo, hi = k / spread, min(size, k * spread)
    out = {k} | {c for c in range(step, size + 1, step) if lo <= c <= hi} | ({size} if size <= hi else set())
    return sorted(out)


def _options(groups, macs_model, classes, start, step, spread, max_combinations) -> list[list[int]]:
    """Candidate widths per class of like groups, at most ``max_combinations`` combinations: first
    each class's :func:`candidate_widths`; if that is too many (networks with many unlike groups, as
    U-Net), each class's width and the multiples of ``step`` just below and above it; then the classes
    with the fewest MACs keep their width, until the product fits."""
    def class_macs(cls):
        names = {m.name for i in cls for m in groups[i].members}
        return sum(macs_model.base.get(n, 0.0) for n in names)

    options = [candidate_widths(start[cls[0]], groups[cls[0]].size, step, spread) for cls in classes]
    if math.prod(len(o) for o in options) > max_combinations:
        options = []
        for cls in classes:
            k, size = start[cls[0]], groups[cls[0]].size
            below, above = max(step, k // step * step), -(-k // step) * step
            options.append(sorted({k} | {c for c in (below, above) if 1 <= c <= size}))
    for i in sorted(range(len(classes)), key=lambda i: class_macs(classes[i])):
        if math.prod(len(o) for o in options) <= max_combinations:
            break
        options[i] = [start[classes[i][0]]]
    return options


def latency_widths(groups, macs_model, counts: Sequence[int], target_macs: float,
                   time_ms: Callable[[list[torch.Tensor]], float],
                   predict_ms: Optional[Callable[[list[torch.Tensor]], float]] = None, *, step: int = 8,
                   min_fraction: float = 0.85, spread: float = 1.6, top: int = 8, tie: float = 0.03,
                   max_combinations: int = 5000,
                   progress: Optional[Callable[[str], None]] = None) -> WidthSearch:
    """Move the keep-counts ``counts`` (one per group of ``groups``, leading channels) to widths on
    which the device does more MACs per millisecond, within the MACs budget.

    ``macs_model``: :class:`ganslim.core.gating.MacsModel` of the unpruned network; ``target_macs``:
    the budget (absolute MACs, same convention); ``time_ms(masks)``: measured milliseconds of the
    network those keep-masks leave (e.g. exported and timed in onnxruntime on the deployment input);
    ``predict_ms(masks)``: a cheap estimate of the same (e.g. :meth:`LatencyModel.predict
    <ganslim.measure.latency_table.LatencyModel.predict>`); without one, candidates are ranked by
    MACs alone.

    Every set of like groups (:func:`like_groups`) takes one width from :func:`candidate_widths`
    (its width in ``counts`` and the multiples of ``step`` within a factor ``spread`` of it; fewer
    where that makes more than ``max_combinations`` combinations, :func:`_options`); of the
    combinations whose MACs lie in ``[min_fraction * target_macs, target_macs]``, the ``top`` with
    the most MACs per predicted ms are timed whole. Of those within ``tie`` (a fraction) of the most
    MACs per measured ms (speed-up per MACs reduction, up to a constant), the one with the most MACs
    (capacity; nearer rates than that are timing noise) is timed again beside ``counts``, alternately,
    3 times each; ``counts`` is kept unless the choice does more MACs per ms there.
    """
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    if len(counts) != len(groups):
        raise ValueError(f"{len(counts)} counts for {len(groups)} groups")
    t0 = time.time()
    start = [int(k) for k in counts]

    def macs_of(c: Sequence[int]) -> float:  # == macs_model.macs(leading_masks(groups, c)), without masks
        return macs_model.prefix_macs(c)

    if macs_of(start) > target_macs * (1 + 1e-9):
        raise ValueError("the starting widths exceed the MACs budget")
    lo, hi = min_fraction * target_macs, target_macs * (1 + 1e-9)
    classes = like_groups(groups, macs_model)
    options = _options(groups, macs_model, classes, start, step, spread, max_combinations)
    n_comb = math.prod(len(o) for o in options)
    ranked = []
    for choice in itertools.product(*options):
        c = list(start)
        for cls, w in zip(classes, choice):
            for i in cls:
                c[i] = w
        macs = macs_of(c)
        if lo <= macs <= hi:
            score = macs / predict_ms(leading_masks(groups, c)) if predict_ms else macs
            ranked.append((score, c))
    ranked.sort(key=lambda r: -r[0])
    if progress:
        progress(f"{len(ranked)} of {n_comb} width combinations in the MACs window; timing {min(top, len(ranked))}")
    trace = []
    for _, c in [(None, start)] + ranked[:top]:
        if any(c == t[0] for t in trace):
            continue
        trace.append((c, macs_of(c), float(time_ms(leading_masks(groups, c)))))
    top_rate = max(m / ms for _, m, ms in trace)
    # within ``tie`` of the best rate the timings cannot tell the networks apart: keep the most MACs
    best = max((t for t in trace if t[1] / t[2] >= top_rate * (1 - tie)), key=lambda t: t[1])[0]
    start_ms = end_ms = trace[0][2]
    if best != start:  # the two again, side by side: a session's speed drifts on a shared machine
        start_ms = end_ms = float("inf")
        for _ in range(3):
            start_ms = min(start_ms, float(time_ms(leading_masks(groups, start))))
            end_ms = min(end_ms, float(time_ms(leading_masks(groups, best))))
        if macs_of(best) / end_ms <= macs_of(start) / start_ms:
            best, end_ms = start, start_ms
    if progress:
        progress(f"widths {best}: {macs_of(best) / 1e9:.3f} GMACs, {end_ms:.2f} ms (from {start_ms:.2f} ms)")
    return WidthSearch(start=start, counts=best, start_macs=macs_of(start), macs=macs_of(best), start_ms=start_ms,
                       ms=end_ms, timed=len(trace), seconds=time.time() - t0, trace=trace)
