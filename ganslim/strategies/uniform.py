"""``strategy="uniform"``: the trivial peer every compression result should be compared with, the
teacher's architecture made uniformly narrower at the budget (:mod:`ganslim.pruning.uniform`), then
compress's fine-tune. ``uniform_init="teacher"`` starts from the teacher's leading channels,
``"scratch"`` from PyTorch's default initialisation (a small network of the same family trained with
ganslim's losses, data and steps)."""
from __future__ import annotations

from ..pruning.onestep import onestep_prune
from ..pruning.uniform import reinitialize, uniform_masks
from .base import StageResult, Strategy, StrategyContext, register_strategy
from .common import loss_weights, resolve_mapping, targets_and_budget


@register_strategy
class UniformStrategy(Strategy):
    name = "uniform"
    paper = "baseline"
    summary = "the teacher's family uniformly narrower (every group the same fraction), teacher's or fresh weights"
    options_section = "uniform"  # UniformOptions

    def run(self, ctx: StrategyContext) -> StageResult:
        cfg = ctx.config
        targets, macs_model, target_abs, calibration = targets_and_budget(ctx)
        alive, _ = uniform_masks(targets, macs_model, target_abs, multiple=cfg.channel_multiple)
        plain = onestep_prune(ctx.student, targets, alive, ctx.example)
        if ctx.options.init == "scratch":
            reinitialize(plain, seed=cfg.seed)
        kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, alive)}
        mapping = resolve_mapping(ctx, plain) if cfg.loss.finetune_distill else {}
        return StageResult(plain, kept, targets, loss_weights(ctx), mapping=mapping, target_abs=target_abs,
                           calibration=calibration, stage_steps=0)
