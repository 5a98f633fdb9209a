"""A strategy written the way a user would add one: this file and its registration, nothing else.

``fraction``: every prunable group keeps the same leading fraction of its channels, a fixed one
given as the strategy's own option (no MACs target: it declares ``needs_target = False``), then
compress's fine-tune. The option lives in the strategy's own dataclass, filled from
``CompressConfig.strategy_options``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ganslim.core.targeting import find_channel_groups
from ganslim.pruning.onestep import onestep_prune
from ganslim.strategies import StageResult, Strategy, StrategyContext, register_strategy
from ganslim.strategies.common import loss_weights


@dataclass
class FractionOptions:
    fraction: float = 0.5  # of every group's channels kept (at least one)


@register_strategy
class FractionStrategy(Strategy):
    name = "fraction"
    paper = "example"
    summary = "a fixed fraction of every layer's leading channels"
    needs_target = False
    options_class = FractionOptions

    def run(self, ctx: StrategyContext) -> StageResult:
        cfg = ctx.config
        targets = find_channel_groups(ctx.student, ctx.example, include=cfg.include, exclude=cfg.exclude)
        masks = [torch.arange(g.size) < max(1, round(g.size * ctx.options.fraction)) for g in targets.groups]
        plain = onestep_prune(ctx.student, targets, masks, ctx.example)
        kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, masks)}
        return StageResult(plain, kept, targets, loss_weights(ctx), stage_steps=0)
