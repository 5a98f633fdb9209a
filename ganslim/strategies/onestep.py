"""``strategy="onestep"``: CAT's one-step pruning. One global threshold on the teacher's normalised
channel importance meets the MACs target; no training before the fine-tune. With ``reconstruct``
(opt-in) the kept weights are then refitted by least squares to the teacher's layers
(:mod:`ganslim.pruning.reconstruct`)."""
from __future__ import annotations

from ..pruning.onestep import onestep_masks, onestep_prune
from .base import StageResult, Strategy, StrategyContext, register_strategy
from .common import loss_weights, reconstruct_student, resolve_mapping, targets_and_budget


@register_strategy
class OneStepStrategy(Strategy):
    name = "onestep"
    paper = "CAT"
    summary = "one global threshold on the norm scales meets the budget; the fine-tune does the rest"

    def run(self, ctx: StrategyContext) -> StageResult:
        cfg = ctx.config
        targets, macs_model, target_abs, calibration = targets_and_budget(ctx)
        alive = onestep_masks(ctx.student.eval(), targets, macs_model, target_abs, multiple=cfg.channel_multiple)
        plain = onestep_prune(ctx.student, targets, alive, ctx.example)
        notes = []
        if cfg.reconstruct:  # the kept weights refitted to the teacher's layers (they miss the removed channels)
            notes.append(reconstruct_student(ctx, ctx.student, plain, targets, alive))
        kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, alive)}
        mapping = resolve_mapping(ctx, plain) if cfg.loss.finetune_distill else {}
        return StageResult(plain, kept, targets, loss_weights(ctx), mapping=mapping, target_abs=target_abs,
                           calibration=calibration, stage_steps=0, notes=[n for n in notes if n])
