"""``strategy="separable"``: the student of the 40x papers (GAN Compression's and CAT's mobile ResNet)
made from the teacher itself. Its ``k x k`` convolutions become depthwise + pointwise pairs
(:mod:`ganslim.pruning.separable`, initialised from the teacher's kernels by per-channel rank-1 SVD),
those that save the most first and no more than the budget needs; then every channel group is cut
alike to the budget (the uniform cut: a little when factorising alone nearly meets it, much at 1/40;
its leading channels, or with ``separable_keep="important"`` the same number ranked by norm scale);
with ``reconstruct`` (opt-in) the factors and kept weights are refitted by least squares to the
teacher's layers (:mod:`ganslim.pruning.reconstruct`); then compress's fine-tune."""
from __future__ import annotations

from .. import measure
from ..pruning.onestep import most_important, onestep_prune
from ..pruning.separable import convertible_convs, make_separable
from ..pruning.uniform import reinitialize, uniform_masks
from .base import StageResult, Strategy, StrategyContext, register_strategy
from .common import loss_weights, macs_target, reconstruct_student, resolve_mapping, targets_and_budget


def plan_factorization(ctx: StrategyContext, target_abs: float) -> list[str]:
    """Names of the convs to factorise: by MACs saved (largest first, measured at the example input),
    stopping before the one that would take the network below ``target_abs`` (absolute MACs), so the
    uniform cut that follows lands on the budget; all of them when even that stays above it."""
    per_module = measure.macs_by_module(ctx.student, ctx.example, "papers")
    total = float(sum(per_module.values()))
    plans = convertible_convs(ctx.student, exclude=ctx.options.exclude)
    savings = sorted(((per_module.get(p.name, 0) * (1 - p.ratio), p.name) for p in plans), reverse=True)
    chosen = []
    for saved, name in savings:
        if total - saved < target_abs:
            break
        chosen.append(name)
        total -= saved
    return chosen


@register_strategy
class SeparableStrategy(Strategy):
    name = "separable"
    paper = "GAN Compression / CAT (mobile ResNet)"
    summary = ("k x k convs factorised into depthwise + pointwise (rank-1 SVD of the teacher's kernels) "
               "until the budget, then the uniform cut")
    options_section = "separable"  # SeparableOptions
    # MobileNet's rounding. At widths like 13 / 26 / 51 a depthwise conv and a channels-last BatchNorm
    # fall off the CPU's 8-float vector blocks: at 1/40 of the default teacher the student with
    # 16 / 24 / 48 trained at 50 ms per step instead of ~80 (all 12000 steps in 11.1 min, +0.05 dB, where
    # 13 / 26 / 51 fitted 11120 in the 15-minute budget, -0.28 dB) and runs in 15.7 instead of 41.9 ms
    # in onnxruntime (batch 1, 256x384; benchmarks/results/bench_40x_multiple8.json).
    default_channel_multiple = 8
    # the latency calibration is made on the unfactorised network: it does not hold after factorising
    accepts_latency_target = False

    def run(self, ctx: StrategyContext) -> StageResult:
        cfg, opts = ctx.config, ctx.options
        if cfg.target_latency_ms is not None and not self.accepts_latency_target:
            raise ValueError("strategy 'separable' takes a MACs target (target_macs); a latency target is "
                             "calibrated on the unfactorised network: use strategy='halp' for latency budgets")
        replaced = make_separable(ctx.student, names=plan_factorization(ctx, macs_target(ctx)), init=opts.init)
        # the channel groups, MACs model and budget check of the factorised network
        targets, macs_model, target_abs, _ = targets_and_budget(ctx)
        multiple = cfg.channel_multiple
        alive, ratio = uniform_masks(targets, macs_model, target_abs, multiple=multiple)
        # The default rounding gives way where it would cost the budget (a narrow network): over it,
        # or more than 5% under it. A multiple the user asked for is kept.
        while (ctx.default_channel_multiple and multiple > 1
               and not 0.95 * target_abs <= macs_model.macs(alive) <= target_abs):
            multiple //= 2
            alive, ratio = uniform_masks(targets, macs_model, target_abs, multiple=multiple)
        if opts.keep == "important" and opts.init == "teacher":  # the same counts, the channels ranked
            alive = most_important(ctx.student.eval(), targets, alive)
        plain = onestep_prune(ctx.student, targets, alive, ctx.example)
        if opts.init == "scratch":
            reinitialize(plain, seed=cfg.seed)
        recon = None
        if cfg.reconstruct and opts.init == "teacher":  # the factors and kept weights refitted to the teacher's layers
            recon = reconstruct_student(ctx, ctx.student, plain, targets, alive, tuple(replaced))
        kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, alive)}
        # distillation points chosen on the teacher: every module the factorisation did not replace
        # keeps its name, and a replaced conv's name holds its depthwise + pointwise pair
        mapping = resolve_mapping(ctx, plain, teacher_points=True) if cfg.loss.finetune_distill else {}
        notes = [f"separable: {len(replaced)} convs factorised into depthwise + pointwise "
                 f"({opts.init} init), then every channel group cut to {ratio:.3f} of its width"
                 + (f", widths rounded up to multiples of {multiple}" if multiple > 1 else "")]
        if multiple != cfg.channel_multiple:
            notes.append(f"separable: widths in multiples of {cfg.channel_multiple} would miss the MACs budget by "
                         f"more than 5% on this network; multiples of {multiple} instead")
        if recon:
            notes.append(recon)
        return StageResult(plain, kept, targets, loss_weights(ctx), mapping=mapping, target_abs=target_abs,
                           stage_steps=0, notes=notes)
