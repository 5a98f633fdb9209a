"""Steps several strategies share: the MACs budget (from a MACs or latency target), the feature
distillation pairs, the fine-tune's loss weights."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..core import distributed as dist
from .. import measure
from ..core.distill import auto_distill_points
from ..core.gating import MacsModel
from ..core.targeting import find_channel_groups
from ..core.train import LossWeights
from .base import StrategyContext


def resolve_mapping(ctx: StrategyContext, student: Optional[nn.Module] = None, teacher_points: bool = False) -> dict:
    """``{student layer: teacher layer}`` for feature distillation: ``config.distill_layers`` or the
    automatic points (same names when the student started as a copy of the teacher; chosen on the
    teacher with ``teacher_points``, for students whose layers were replaced under the same names)."""
    cfg, student = ctx.config, student if student is not None else ctx.student
    layers = cfg.loss.distill_layers
    if layers is None:
        s_pts = auto_distill_points(ctx.teacher if teacher_points else student, ctx.example, cfg.loss.n_distill_layers)
        if ctx.same_arch:
            return {n: n for n in s_pts}
        t_pts = auto_distill_points(ctx.teacher, ctx.example, cfg.loss.n_distill_layers)
        if len(s_pts) != len(t_pts):
            raise ValueError("could not pair distillation layers automatically between different student and teacher "
                             "architectures; pass distill_layers={student_layer: teacher_layer}")
        return dict(zip(s_pts, t_pts))
    if isinstance(layers, dict):
        return dict(layers)
    return {n: n for n in layers}


def loss_weights(ctx: StrategyContext) -> LossWeights:
    """The training losses' weights from the configuration (adversarial only with a discriminator)."""
    cfg = ctx.config
    return LossWeights(cfg.loss.recon_weight, cfg.loss.gt_weight, cfg.loss.distill_weight,
                       (cfg.loss.adv_weight or 1.0) if ctx.discriminator is not None else 0.0, cfg.loss.mse_weight)


def macs_target(ctx: StrategyContext) -> float:
    """``config.target_macs`` as absolute MACs at the example input (a fraction <= 1 of the teacher's)."""
    cfg = ctx.config
    return cfg.target_macs * ctx.teacher_macs if cfg.target_macs <= 1 else float(cfg.target_macs)


def budget(ctx: StrategyContext, targets, macs_model: MacsModel):
    """``(absolute MACs budget at the example input, latency calibration or None)`` from the MACs or
    the latency target, checked reachable (one channel per group must fit)."""
    cfg, student = ctx.config, ctx.student
    calibration = None
    if cfg.target_latency_ms is not None:
        from ..pruning.device_aware import calibrate_latency

        calibration = calibrate_latency(student, targets, ctx.example, ctx.stat_input, cfg.target_latency_ms,
                                        device=cfg.device)
        calibration = dist.broadcast_object(calibration)  # timings differ per process: rank 0 decides
        if calibration.macs_fraction is None:
            raise ValueError(f"impossible latency target: {calibration.note}\n{calibration.table()}")
        target_abs = calibration.macs_fraction * macs_model.total
    else:
        target_abs = macs_target(ctx)
    floor = macs_model.macs([torch.nn.functional.one_hot(torch.tensor(0), g.size).bool() for g in targets.groups])
    if target_abs < floor:
        raise ValueError(f"impossible MACs target {target_abs / 1e9:.4g} G: keeping one channel per prunable group "
                         f"already costs {floor / 1e9:.4g} G ({floor / ctx.teacher_macs:.3%} of the teacher)")
    return target_abs, calibration


def targets_and_macs(ctx: StrategyContext):
    """``(targets, macs_model)``: the student's prunable channel groups (the configuration's
    include/exclude) and the MACs model of their widths, at the example input."""
    cfg = ctx.config
    targets = find_channel_groups(ctx.student, ctx.example, include=cfg.include, exclude=cfg.exclude)
    return targets, MacsModel(ctx.student, targets, measure.macs_by_module(ctx.student, ctx.example, "papers"))


def targets_and_budget(ctx: StrategyContext):
    """Channel groups, MACs model and absolute budget for the strategies that prune once (onestep,
    evolve; compress has checked that a target is given): ``(targets, macs_model, target_abs, calibration)``."""
    targets, macs_model = targets_and_macs(ctx)
    target_abs, calibration = budget(ctx, targets, macs_model)
    return targets, macs_model, target_abs, calibration


def reconstruct_student(ctx: StrategyContext, unpruned: nn.Module, plain: nn.Module, targets, alive,
                        replaced: tuple = ()) -> Optional[str]:
    """Least-squares reconstruction (:mod:`ganslim.pruning.reconstruct`) of ``plain`` (``unpruned``
    with the channels not in ``alive`` removed) from the teacher's activations on the first training
    batch. ``replaced``: convs ``make_separable`` turned into ``Sequential(first, second)``: the second
    reproduces the teacher's conv, the first has no teacher layer. Returns a note for the report."""
    from ..pruning.reconstruct import conv_targets, reconstruct_convs

    if not ctx.same_arch:  # a student of the user's own design: its layers need not be the teacher's
        return None

    def teacher_name(name: str) -> Optional[str]:
        for r in replaced:
            if name == r + ".1":
                return r
            if name.startswith(r + "."):
                return None
        return name

    convs = conv_targets(unpruned, ctx.teacher, targets.groups, alive, teacher_name)
    if not convs:
        return None
    device = next(plain.parameters()).device
    batch = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in ctx.inputs)
    errors = reconstruct_convs(plain, ctx.teacher, [batch], convs)
    if not errors:
        return None
    if dist.is_distributed():  # every rank trains from the same weights: rank 0's fit
        state = dist.broadcast_object({k: v.cpu() for k, v in plain.state_dict().items()})
        plain.load_state_dict(state)
    before = sum(b for b, _ in errors.values()) / len(errors)
    after = sum(a for _, a in errors.values()) / len(errors)
    return (f"reconstruct: {len(errors)} convs fitted to the teacher's layers by least squares "
            f"(mean relative error {before:.3f} -> {after:.3f} on the first batch)")
