"""``strategy="halp"``: channels chosen under a latency budget of the device at hand (HALP-style).

A per-layer latency table of the device (:mod:`ganslim.measure.latency_table`; timed once, cached) plus
a remainder fitted on whole-network timings of a few uniform cuts predicts the latency of any widths;
:func:`ganslim.pruning.latency_select.latency_masks` then keeps the most important channels per
millisecond until the prediction meets the budget. The budget is ``target_latency_ms``, or with a MACs
target the *measured* latency of the uniform cut at that MACs budget (the trivial peer): the result runs
as fast as the peer and keeps the channels that the device makes cheap. Its MACs are then usually
above the MACs target (the report says by how much). Then compress's fine-tune, as for every strategy.
"""
from __future__ import annotations

import time

import torch

from ..pruning.latency_select import LatencySelection, latency_masks
from ..pruning.onestep import onestep_prune
from ..pruning.uniform import uniform_alive, uniform_masks
from ..core import distributed as dist
from .base import StageResult, Strategy, StrategyContext, register_strategy
from .common import budget, loss_weights, resolve_mapping, targets_and_macs
from ..measure.latency_table import LatencyModel, LatencyTable, runtime_ms

FIT_RATIOS = (1.0, 0.5, 0.25)  # uniform cuts timed whole to fit the table's remainder (with the budget's cut)


def measured_ms(model, targets, alive, example, stat_input, runtime: str, threads: int, repeats: int = 7) -> float:
    """Fastest-pass latency (ms, as the table's entries) of ``model`` pruned to ``alive``, run on
    ``stat_input`` in ``runtime`` (:func:`ganslim.measure.latency_table.runtime_ms`)."""
    return runtime_ms(onestep_prune(model, targets, alive, example), stat_input, runtime, threads, repeats=repeats)


def fitted_latency_model(ctx: StrategyContext, targets, macs_model, extra=(), fit_repeats: int = 7):
    """The device's latency model of ``ctx.student`` in halp's runtime and table (``ctx.config.halp``):
    ``(table, entries cached before, model, fit, time_ms)``. ``model`` is fitted on whole-network
    timings (``fit``: ``[(keep-masks, ms)]``) of the uniform cuts at ``FIT_RATIOS`` of the widths and
    the ``extra`` keep-masks; ``time_ms(masks, repeats=7)`` times the network ``masks`` leave (ms,
    fastest pass) on ``ctx.stat_input``, exported as deployed (:func:`measured_ms`)."""
    opts = ctx.config.halp
    student = ctx.student.eval()
    stat_input = tuple(t.cpu() for t in ctx.stat_input)
    example = tuple(t.cpu() for t in ctx.example)
    threads = torch.get_num_threads()
    table = LatencyTable(runtime=opts.runtime, threads=threads, path=opts.table)
    cached = len(table)
    model = LatencyModel(student, targets, stat_input, table, macs_model=macs_model)

    def time_ms(masks, repeats: int = 7) -> float:
        return measured_ms(student, targets, masks, example, stat_input, opts.runtime, threads, repeats=repeats)

    fit = [(a, time_ms(a, fit_repeats)) for a in [uniform_alive(targets.groups, r) for r in FIT_RATIOS] + list(extra)]
    model.fit(fit)
    return table, cached, model, fit, time_ms


def _select(ctx: StrategyContext, student, targets, macs_model, peer, target_abs) -> tuple:
    """``(keep-masks, notes)``: the device's latency model fitted (with ``peer``, the uniform cut at the
    MACs budget ``target_abs``, when the budget is in MACs), then the most importance per predicted ms
    within the latency budget (the peer's predicted latency, or ``target_latency_ms``)."""
    cfg, opts = ctx.config, ctx.options
    t0 = time.time()
    table, cached, model, fit, _ = fitted_latency_model(ctx, targets, macs_model, [peer] if peer is not None else [])
    if peer is None:
        target_ms = float(cfg.target_latency_ms)
        why = f"latency target {target_ms:g} ms"
    else:
        # the peer's latency in the model's own units: the model's bias cancels between the two
        target_ms = model.predict(peer)
        why = (f"the uniform cut at {target_abs / ctx.teacher_macs:.3g} of the MACs measures {fit[-1][1]:.1f} ms, "
               f"predicted {target_ms:.1f} ms ({opts.runtime}): the latency budget")
    notes = []
    try:
        alive = latency_masks(student, targets, model, target_ms, step=opts.step)
    except ValueError:
        if peer is None:
            raise
        # the model ranks the peer below the narrowest widths allowed: its timings are noise
        # (a loaded machine, a network too small to time); keep the peer rather than guess
        alive = LatencySelection(peer)
        alive.predicted_ms = target_ms
        notes.append("halp: the latency model is inconsistent on this device (the uniform cut is predicted "
                     "faster than every group at its floor); kept the uniform cut")
    table.save()
    errors = ", ".join(f"{e:+.1%}" for e in model.errors(fit))
    notes.append(f"halp: {why}; latency table {table.path} ({cached} entries cached, {table.timed} timed), "
                 f"fit {model.scale:.2f} x table + {model.c0:.2f} ms + {model.c1:.2f} ms x elementwise fraction, "
                 f"fit errors {errors}; selected {alive.moves} moves, predicted {alive.predicted_ms:.1f} ms, "
                 f"{time.time() - t0:.0f} s")
    return alive, notes


@register_strategy
class HalpStrategy(Strategy):
    name = "halp"
    paper = "HALP"
    summary = "most importance per millisecond under a latency budget, from a per-layer latency table of the device"
    options_section = "halp"  # HalpOptions

    def run(self, ctx: StrategyContext) -> StageResult:
        cfg, opts = ctx.config, ctx.options
        if str(cfg.device) != "cpu" and opts.runtime == "onnxruntime":
            raise ValueError("strategy='halp' with latency_runtime='onnxruntime' times the CPU; use "
                             "latency_runtime='eager' to select for the GPU")
        student = ctx.student.eval()
        targets, macs_model = targets_and_macs(ctx)
        peer = target_abs = None
        if cfg.target_latency_ms is None:
            target_abs, _ = budget(ctx, targets, macs_model)
            peer, _ = uniform_masks(targets, macs_model, target_abs, multiple=cfg.channel_multiple)
        # timings differ per process: rank 0 times and selects (and alone writes the table's cache file),
        # every rank takes its selection and its note
        chosen = _select(ctx, student, targets, macs_model, peer, target_abs) if dist.is_main() else None
        alive, notes = dist.broadcast_object(chosen)
        plain = onestep_prune(student, targets, list(alive), ctx.example)
        kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, alive)}
        mapping = resolve_mapping(ctx, plain) if cfg.loss.finetune_distill else {}
        return StageResult(plain, kept, targets, loss_weights(ctx), mapping=mapping, target_abs=None,
                           stage_steps=0, notes=notes)
