"""A strategy written the way a user would add one: this file and its registration, nothing else.

``uniform``: every prunable group keeps the same leading fraction of its channels, the largest that
meets the MACs budget (the "uniformly narrower network" baseline), then compress's fine-tune. Its own
option (``min_channels``) lives in its own dataclass, filled from ``CompressConfig.strategy_options``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ganslim.pruning.onestep import onestep_prune
from ganslim.strategies import StageResult, Strategy, StrategyContext, register_strategy
from ganslim.strategies.common import loss_weights, targets_and_budget


@dataclass
class UniformOptions:
    min_channels: int = 1  # every group keeps at least this many channels


@register_strategy
class UniformStrategy(Strategy):
    name = "uniform"
    paper = "baseline"
    summary = "the same leading fraction of every layer's channels"
    options_class = UniformOptions

    def run(self, ctx: StrategyContext) -> StageResult:
        targets, macs_model, target_abs, calibration = targets_and_budget(ctx)
        floor = ctx.options.min_channels

        def alive(ratio: float) -> list[torch.Tensor]:
            return [torch.arange(g.size) < max(floor, int(g.size * ratio)) for g in targets.groups]

        lo, hi = 0.0, 1.0
        for _ in range(30):  # bisection on the width ratio
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if macs_model.macs(alive(mid)) <= target_abs else (lo, mid)
        masks = alive(lo)
        plain = onestep_prune(ctx.student, targets, masks, ctx.example)
        kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, masks)}
        return StageResult(plain, kept, targets, loss_weights(ctx), target_abs=target_abs, calibration=calibration,
                           stage_steps=0)
