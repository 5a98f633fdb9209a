"""``strategy="ofa"``: once-for-all (GAN Compression, generalised). A width-sliced supernet trained
with the sandwich rule, then an evolutionary search at the MACs or measured-latency budget; the chosen
sub-network is exported as plain modules. ``steps`` are supernet steps."""
from __future__ import annotations

from ..core import distributed as dist
from ..pruning.search import Evaluator, SearchConfig, evolve, resolve_budget
from ..pruning.slicing import SliceConfig, make_supernet, recalibrate_bn
from ..pruning.supernet import SupernetConfig, train_supernet
from ..core.train import LossWeights, input_batches
from .base import SearchSummary, StageResult, Strategy, StrategyContext, register_strategy


@register_strategy
class OfaStrategy(Strategy):
    name = "ofa"
    paper = "GAN Compression"
    summary = "once-for-all supernet (sandwich rule) + evolutionary search at the budget"
    needs_target = False  # without one the search is unconstrained
    accepts_discriminator = False
    options_section = "ofa"  # OfaOptions

    def run(self, ctx: StrategyContext) -> StageResult:
        cfg, opts = ctx.config, ctx.options
        supernet = make_supernet(ctx.student, ctx.example,
                                 SliceConfig(ratios=tuple(opts.width_ratios), multiple=cfg.channel_multiple),
                                 include=cfg.include, exclude=cfg.exclude, copy_model=False)
        budget = resolve_budget(supernet, cfg.target_macs if cfg.target_latency_ms is None else None, ctx.teacher_macs)
        scfg = SupernetConfig(steps=cfg.steps, lr=opts.lr, random_subnets=opts.random_subnets, seed=cfg.seed,
                              recon_weight=cfg.loss.recon_weight, gt_weight=cfg.loss.gt_weight, mse_weight=cfg.loss.mse_weight)
        callbacks = list(ctx.callbacks)
        sinfo = train_supernet(supernet, ctx.teacher, ctx.loader, scfg, batch_fn=cfg.batch_fn, device=cfg.device,
                               memory_format=cfg.memory_format, precision=cfg.train_precision,
                               progress=cfg.progress, checkpoint=opts.checkpoint or ctx.checkpoint("supernet.pt"),
                               callbacks=[lambda step, losses: [cb(None, losses) for cb in callbacks]] if callbacks else ())
        bn_inputs = [tuple(t.to(cfg.device) for t in b) for b in input_batches(ctx.loader, opts.bn_batches, cfg.batch_fn)]
        pairs = [(tuple(t.to(cfg.device) for t in i), None if g is None else g.to(cfg.device)) for i, g in ctx.eval_pairs]
        qcfg = SearchConfig(population=opts.population, generations=opts.generations,
                            metric=opts.metric, seed=cfg.seed, bn_batches=opts.bn_batches,
                            workers=opts.workers if cfg.device == "cpu" else 1, precision=opts.precision,
                            prefix_cache_mb=opts.prefix_cache_mb)
        evaluator = Evaluator(supernet, ctx.teacher, pairs, bn_inputs, qcfg.metric, latency_input=ctx.stat_input,
                              latency_repeats=qcfg.latency_repeats, workers=qcfg.workers, precision=qcfg.precision,
                              prefix_cache_mb=qcfg.prefix_cache_mb)
        try:
            result = evolve(supernet, evaluator, budget, cfg.target_latency_ms, qcfg, ctx.teacher_macs, progress=cfg.progress)
        finally:
            evaluator.close()
        result = dist.broadcast_object(result)  # with a latency budget the timings differ per process: rank 0 decides
        recalibrate_bn(supernet, bn_inputs, result.best.widths)
        plain = supernet.export(result.best.widths, tol=cfg.export_tol)
        supernet.set_widths(supernet.largest())
        search = SearchSummary(
            evaluations=result.evaluations, seconds=result.seconds, best_fitness=result.best.fitness,
            metric=qcfg.metric if isinstance(qcfg.metric, str) else getattr(qcfg.metric, "__name__", "metric"),
            generations=list(result.generations), best_macs_fraction=result.best.macs / ctx.teacher_macs,
            best_latency_ms=result.best.latency_ms, supernet_steps=sinfo["steps"],
            supernet_seconds=sinfo["seconds"], resumed_from=sinfo["resumed_from"],
            pareto=[[c.macs / ctx.teacher_macs, c.fitness] for c in result.pareto()], precision=evaluator.precision)
        weights = LossWeights(cfg.loss.recon_weight, cfg.loss.gt_weight, 0.0, 0.0, cfg.loss.mse_weight)
        return StageResult(plain, dict(result.best.widths), supernet.targets, weights,
                           rel_diff=supernet.last_export_diff, target_abs=budget, search=search, supernet=supernet)
