"""``strategy="uniform"``: the trivial peer every compression result should be compared with, the
teacher's architecture made uniformly narrower at the budget (:mod:`ganslim.pruning.uniform`), then
compress's fine-tune. ``uniform_init="teacher"`` starts from the teacher's leading channels,
``"scratch"`` from PyTorch's default initialisation (a small network of the same family trained with
ganslim's losses, data and steps). ``uniform_widths="latency"`` then moves each set of like groups to
nearby widths this device runs faster per MAC (:mod:`ganslim.pruning.latency_widths`): no longer the
trivial peer, but the same family at about the same MACs, shaped for the runtime."""
from __future__ import annotations

from ..core import distributed as dist
from ..pruning.latency_widths import latency_widths, leading_masks
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
        notes = []
        if ctx.options.widths == "latency":
            alive, note = device_widths(ctx, targets, macs_model, target_abs, alive)
            notes.append(note)
        plain = onestep_prune(ctx.student, targets, alive, ctx.example)
        if ctx.options.init == "scratch":
            reinitialize(plain, seed=cfg.seed)
        kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, alive)}
        mapping = resolve_mapping(ctx, plain) if cfg.loss.finetune_distill else {}
        return StageResult(plain, kept, targets, loss_weights(ctx), mapping=mapping, target_abs=target_abs,
                           calibration=calibration, stage_steps=0, notes=notes)


def device_widths(ctx: StrategyContext, targets, macs_model, target_abs: float, alive: list) -> tuple[list, str]:
    """``(keep-masks, note)``: ``alive`` (leading channels per group) moved to the widths
    :func:`ganslim.pruning.latency_widths.latency_widths` finds on this device, in halp's
    ``latency_runtime`` (its latency table ranks, whole networks timed on ``ctx.stat_input`` decide)."""
    # imported here: importing halp when this module loads would register it before uniform, and the
    # registry's order is the order the strategies are listed in
    from .halp import fitted_latency_model

    cfg, opts = ctx.config, ctx.config.halp
    if str(cfg.device) != "cpu" and opts.runtime == "onnxruntime":
        raise ValueError("uniform_widths='latency' with latency_runtime='onnxruntime' times the CPU; use "
                         "latency_runtime='eager' to shape the widths for the GPU")
    found = table = cached = None
    if dist.is_main():  # timings differ per process: rank 0 searches, every rank takes its widths
        table, cached, model, _, time_ms = fitted_latency_model(ctx, targets, macs_model, [alive], fit_repeats=3)
        step = cfg.channel_multiple if (cfg.channel_multiple or 1) > 1 else opts.step
        found = latency_widths(targets.groups, macs_model, [int(a.sum()) for a in alive], target_abs,
                               lambda masks: time_ms(masks, 3), model.predict, step=step)
        table.save()
    found = dist.broadcast_object(found)
    where = (f"latency table {table.path} ({cached} entries cached, {table.timed} timed)" if table is not None
             else "searched by rank 0")
    note = (f"uniform_widths='latency' ({opts.runtime}): widths {found.start} -> {found.counts}, "
            f"{macs_model.total / found.start_macs:.2f}x -> {macs_model.total / found.macs:.2f}x fewer MACs, "
            f"{found.start_ms:.2f} -> {found.ms:.2f} ms timed side by side; {found.timed} networks timed, "
            f"{where}, {found.seconds:.0f} s")
    return leading_masks(targets.groups, found.counts), note
