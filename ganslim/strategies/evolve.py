"""``strategy="evolve"``: Co-Evolutionary Compression. A genetic search over binary channel masks;
fitness: fidelity to the teacher, minus the discriminator's disagreement (``discriminator=``), minus
the cycle error through ``reverse_generator`` (the other CycleGAN direction)."""
from __future__ import annotations

from ..pruning.evolve import EvolveConfig, evolve_masks
from ..pruning.onestep import importance_scores, onestep_prune
from ..core.train import input_batches
from .base import SearchSummary, StageResult, Strategy, StrategyContext, register_strategy
from .common import loss_weights, resolve_mapping, targets_and_budget


@register_strategy
class EvolveStrategy(Strategy):
    name = "evolve"
    paper = "Co-Evolutionary Compression"
    summary = "genetic search over channel masks, discriminator-aware fitness"
    options_section = "evolve"  # EvolveOptions

    def run(self, ctx: StrategyContext) -> StageResult:
        cfg, opts, discriminator = ctx.config, ctx.options, ctx.discriminator
        targets, macs_model, target_abs, calibration = targets_and_budget(ctx)
        # fitness batches: held out from the start of the loader (the fine-tune cycles over them too)
        batches = [tuple(t.to(cfg.device) for t in b) for b in input_batches(ctx.loader, opts.batches, cfg.batch_fn)]
        reverse = opts.reverse_generator
        if reverse is not None:
            reverse.to(cfg.device).eval()
        was_d = discriminator.training if discriminator is not None else None
        if discriminator is not None:
            discriminator.to(cfg.device).eval()
        try:
            res = evolve_masks(ctx.student, ctx.teacher, targets, macs_model, target_abs,
                               importance_scores(ctx.student, targets), batches, discriminator, reverse,
                               EvolveConfig(population=opts.population, generations=opts.generations,
                                            seed=cfg.seed),
                               multiple=cfg.channel_multiple, progress=cfg.progress)
        finally:
            if discriminator is not None:
                discriminator.train(was_d)
        plain = onestep_prune(ctx.student, targets, res.alive, ctx.example)
        kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, res.alive)}
        mapping = resolve_mapping(ctx, plain) if cfg.loss.finetune_distill else {}
        search = SearchSummary(
            evaluations=res.evaluations, seconds=res.seconds, best_fitness=res.fitness, generations=list(res.history),
            metric="-L1 to teacher" + (" - D term" if discriminator is not None else "")
                   + (" - cycle" if reverse is not None else ""),
            best_macs_fraction=res.macs / ctx.teacher_macs)
        return StageResult(plain, kept, targets, loss_weights(ctx), mapping=mapping, target_abs=target_abs,
                           calibration=calibration, search=search, stage_steps=0)
