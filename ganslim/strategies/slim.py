"""``strategy="slim"``: GAN Slimming. Gates with an L1 proximal step and a cubic MACs schedule
(:class:`ganslim.core.slimming.SlimController`), trained with distillation (and the discriminator when one
is given), then a global threshold meets the target and the dead channels are removed physically."""
from __future__ import annotations

import torch

from ..core.distill import FeatureDistiller
from ..core.gating import MacsModel, gated_macs_by_module
from ..core.slimming import SlimController, SlimSchedule
from ..core.targeting import find_channel_groups
from ..core.train import DistillTrainer
from .base import StageResult, Strategy, StrategyContext, register_strategy
from .common import budget, loss_weights, resolve_mapping


@register_strategy
class SlimStrategy(Strategy):
    name = "slim"
    paper = "GAN Slimming"
    summary = "gates + L1 proximal step + progressive pruning to the target, then removal"
    needs_target = False  # without a target: L1 only, the gates decide
    options_section = "slim"  # SlimOptions

    def run(self, ctx: StrategyContext) -> StageResult:
        cfg, opts, student, device = ctx.config, ctx.options, ctx.student, torch.device(ctx.config.device)
        targets = find_channel_groups(student, ctx.example, include=cfg.include, exclude=cfg.exclude)
        macs_model = MacsModel(student, targets, gated_macs_by_module(student, targets, ctx.example))  # as exported
        target_abs, calibration = None, None
        if cfg.target_latency_ms is not None or cfg.target_macs is not None:
            target_abs, calibration = budget(ctx, targets, macs_model)

        mapping = resolve_mapping(ctx)
        distiller = None
        if mapping and cfg.loss.distill_weight:
            distiller = ctx.hooks.enter_context(
                FeatureDistiller(student, ctx.teacher, mapping, ctx.example, kind=cfg.loss.distill_loss)).to(device)
        ctl = SlimController(student, targets, macs_model, target_abs,
                             SlimSchedule(cfg.steps, opts.gate_lr, opts.rho, opts.prune_start, opts.target_reach,
                                          opts.prune_every, cfg.channel_multiple)).to(device)
        gates = ctl.gates
        weights = loss_weights(ctx)
        groups = [{"params": list(student.parameters()), "lr": cfg.lr},
                  {"params": list(gates.parameters()), "lr": opts.gate_lr}]
        if distiller is not None and any(True for _ in distiller.parameters()):
            groups.append({"params": list(distiller.parameters()), "lr": cfg.lr})
        trainer = DistillTrainer(student, ctx.teacher, groups, weights, distiller, ctx.discriminator, cfg.loss.d_lr,
                                 cfg.loss.gan_mode, cfg.device, cfg.batch_fn, memory_format=cfg.memory_format,
                                 precision=cfg.train_precision)
        shown = {"macs": macs_model.total}  # for the progress bar

        def control(tr: DistillTrainer) -> None:
            ctl.regularize()
            ctl.step(tr.state.step)
            if tr.state.step % 5 == 0:
                shown["macs"] = ctl.macs()

        trainer.after_step.append(control)
        trainer.modules["gates"] = gates
        if distiller is not None:
            trainer.modules["distiller"] = distiller
        with ctl.attached():  # the gates' hooks come off however training ends
            trainer.run(ctx.loader, cfg.steps, desc="ganslim gating", progress=cfg.progress,
                        postfix=lambda: {"MACs": f"{shown['macs'] / 1e9:.3f}G"}, callbacks=ctx.callbacks,
                        checkpoint=ctx.checkpoint("gating.pt"), checkpoint_every=cfg.checkpoint_every)
            ctl.finalize()
            student.eval()
            if distiller is not None:
                distiller.remove()  # before export copies the student, so no hook travels into the result
            plain, info = ctl.export(ctx.example, tol=cfg.export_tol)
        return StageResult(plain, info["kept"], targets, weights, rel_diff=info["rel_diff"], mapping=mapping,
                           target_abs=target_abs, calibration=calibration)
