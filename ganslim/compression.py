"""``ganslim.compress`` (this module: ``ganslim.compression``): one call from a trained generator to a
physically smaller one.

1. a strategy (:mod:`ganslim.strategies`, chosen by ``strategy=``) turns compress's copy of the
   student into a plain smaller network at the budget: ``slim`` (gates + L1, GAN Slimming),
   ``onestep`` (CAT), ``ofa`` (supernet + search, GAN Compression), ``evolve`` (Co-Evolutionary
   Compression), ``auto`` (the measured winner);
2. fine-tune of the plain smaller student with the distillation losses (:mod:`ganslim.core.train`);
3. optional QAT (``quant="int8"``, :mod:`ganslim.deployment.quantization`): fake-quantize, calibrate, fine-tune,
   and measure the real int8 deployment in onnxruntime (:mod:`ganslim.deployment.deploy`);
4. report: MACs, params, size, CPU latency, fidelity to teacher and ground truth.

Every hook compress puts on a network is entered into one ``ExitStack``, closed on every exit path.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .core import budget, distributed as dist
from . import measure
from .config import CompressConfig
from .core.distill import FeatureDistiller
from .measure.report import CompressReport
from .measure.stats import ModelStats
from .strategies import StageResult, StrategyContext, get_strategy
from .core.train import finetune, first_output, split_batch


@dataclass
class CompressResult:
    """``model``: plain ``nn.Module`` (no gates, hooks or mappings), physically smaller; with
    ``quant="int8"`` the fake-quantized QAT model (export it with ``ganslim.export(...,
    format="onnx-int8")``), and ``float_model`` the float student it was made from.
    ``report``: :class:`~ganslim.measure.report.CompressReport` (``str()`` prints a table)."""

    model: nn.Module
    report: CompressReport
    config: CompressConfig
    float_model: Optional[nn.Module] = None
    supernet: Optional[nn.Module] = None  # strategy "ofa": the trained supernet (search it again for other budgets)

    def __iter__(self):  # allows ``model, report = ganslim.compress(...)``
        return iter((self.model, self.report))


def _first_batch(loader: Iterable) -> Any:
    try:
        it = iter(loader)
    except TypeError:
        raise TypeError(f"loader must be an iterable of batches, got {type(loader).__name__}") from None
    for batch in it:
        return batch
    raise ValueError("the loader yielded no batches")


def model_stats(model: nn.Module, example, eval_pairs, teacher: Optional[nn.Module], cfg: CompressConfig,
                threads: int) -> ModelStats:
    """Measure one network: MACs (both conventions) on ``example``, params, size, latency on the
    first eval input, fidelity on ``eval_pairs`` [(inputs tuple, target or None)]."""
    st = ModelStats(
        name=type(model).__name__, threads=threads,
        macs=float(measure.count_macs(model, example, "papers")),
        macs_true=float(measure.count_macs(model, example, "true")),
        params=measure.count_params(model),
        size_mb=measure.model_size_mb(model),
    )
    if (cfg.measure_latency or cfg.target_latency_ms is not None) and eval_pairs:
        lat = measure.measure_latency(model, eval_pairs[0][0], warmup=2, repeats=7, threads=threads, max_seconds=30)
        st.latency_ms, st.latency_p90_ms = lat.median_ms, lat.p90_ms
    if eval_pairs:
        if teacher is not None and teacher is not model:
            f = measure.compare_outputs(teacher, model, [p[0] for p in eval_pairs])
            st.psnr_to_teacher, st.ssim_to_teacher = f["psnr"], f["ssim"]
        with_gt = [(i, t) for i, t in eval_pairs if t is not None]
        if with_gt:
            f = measure.fidelity_to_target(model, with_gt)
            st.psnr_to_gt, st.ssim_to_gt = f["psnr"], f["ssim"]
    return st


def compress(model: nn.Module, teacher: nn.Module, loader: Iterable, config: Optional[CompressConfig] = None,
             discriminator: Optional[nn.Module] = None, callbacks: Iterable[Callable] = (), **overrides) -> CompressResult:
    """Compress ``model`` (a copy of ``teacher`` or a smaller student) to imitate ``teacher``.

    Args:
        model: the student to slim; when it *is* ``teacher`` it is deep-copied. Never modified in place.
        teacher: the trained generator; run in eval mode without gradients.
        loader: iterable of batches (tensor, ``(input, target)`` tuple, or dict; see
            :func:`ganslim.core.train.split_batch`; ``batch_fn`` overrides).
        config: :class:`CompressConfig`; keyword ``overrides`` replace its fields
            (e.g. ``target_macs=0.1, steps=500``).
        discriminator: optional; trained alongside with ``gan_mode`` loss (GAN Slimming's min-max).
        callbacks: ``fn(trainer, losses)`` after each step.

    Returns:
        :class:`CompressResult` with ``.model`` (plain, physically smaller) and ``.report``.
    """
    was_training = getattr(teacher, "training", None)
    try:
        # every hook compress puts on a network (distillation recorders on the teacher...) is entered
        # here: they come off on every exit path, a NaN loss or an interrupt included
        with contextlib.ExitStack() as hooks:
            return _compress(model, teacher, loader, config, discriminator, callbacks, hooks, **overrides)
    finally:  # the user's teacher leaves in the mode it came in, even when compress raises
        if isinstance(teacher, nn.Module):
            teacher.train(was_training)


def _compress(model: nn.Module, teacher: nn.Module, loader: Iterable, config: Optional[CompressConfig],
              discriminator: Optional[nn.Module], callbacks: Iterable[Callable], hooks: contextlib.ExitStack,
              **overrides) -> CompressResult:
    cfg = (config or CompressConfig()).replace(**overrides).validate()
    dist.init_from_env(device=cfg.device)  # under torchrun: join its process group (nccl for CUDA, else gloo)
    if not dist.is_main():  # under torchrun: one progress bar, rank 0's
        cfg = cfg.replace(progress=False)
    if not isinstance(model, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("model and teacher must be torch.nn.Module instances")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    same_arch = model is teacher
    try:
        student = copy.deepcopy(model).to(device)
    except RuntimeError as e:  # e.g. torch.nn.utils.spectral_norm's computed weight after a forward
        raise ValueError(f"cannot copy {type(model).__name__} ({e}); if it uses spectral or weight norm, bake it into "
                         "plain weights first: ganslim.adapters.strip_spectral_norm(model)") from e
    for p in student.parameters():  # a frozen teacher passed as the model: the student must train
        p.requires_grad_(True)
    teacher.to(device).eval()

    first = _first_batch(loader)
    inputs, target = split_batch(first, cfg.batch_fn)
    for t in inputs:
        if not torch.isfinite(t).all():
            raise ValueError("the first batch contains NaN or inf values")
    example = tuple(t[:1].to(device) for t in inputs)
    with torch.no_grad():
        t_out = first_output(teacher(*example))
        s_out = first_output(student.eval()(*example))
    if t_out.shape != s_out.shape:
        raise ValueError(f"student output {tuple(s_out.shape)} differs from teacher output {tuple(t_out.shape)}: "
                         "the teacher does not match this student/data")
    if target is not None and target[:1].shape != t_out.shape:
        raise ValueError(f"ground truth {tuple(target[:1].shape)} does not match the generator output {tuple(t_out.shape)}")

    teacher_macs = float(measure.count_macs(teacher, example, "papers"))
    eval_pairs = _eval_pairs(cfg, first)  # for the report, and the latency budget's deployment input
    # MACs and latency at the evaluation input (a whole image) when there is one, else at one training sample
    stat_input = tuple(t[:1].to(device) for t in eval_pairs[0][0]) if eval_pairs else example
    notes = []
    batch = int(inputs[0].shape[0])
    if batch < 8 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        notes.append(f"batches of {batch}: a BatchNorm student's statistics from so few samples are noisy; use 8 or "
                     "more (the default teacher at 1/20, onestep, 3000 steps: -2.81 dB at batch 4, -0.73 dB at batch 8)")
    if cfg.strategy == "auto":
        from .strategies import choose_strategy

        settings, why = choose_strategy(cfg.target_macs if cfg.target_latency_ms is None else None, teacher=teacher,
                                        steps=cfg.steps + cfg.finetune_steps)
        cfg = cfg.replace(**settings)
        notes.append(f"strategy auto -> {why}")
    strategy = get_strategy(cfg.strategy)
    default_multiple = cfg.channel_multiple is None
    if default_multiple:  # the strategy's own rounding (8 for separable, else 1)
        cfg = cfg.replace(channel_multiple=strategy.default_channel_multiple)
    if strategy.needs_target and cfg.target_macs is None and cfg.target_latency_ms is None:
        raise ValueError(f"strategy={cfg.strategy!r} needs target_macs or target_latency_ms")
    if discriminator is not None and not strategy.accepts_discriminator:
        raise ValueError(f"strategy={cfg.strategy!r} trains with distillation losses only; drop discriminator= or "
                         "use strategy='slim' or 'evolve'")
    ctx = StrategyContext(cfg, student, teacher, loader, example, inputs, teacher_macs, eval_pairs, stat_input,
                          same_arch, discriminator, callbacks, hooks, options=strategy.options(cfg),
                          default_channel_multiple=default_multiple)
    stage_file = ctx.checkpoint("stage.pt")
    st = _load_stage(stage_file, cfg) if stage_file and os.path.exists(stage_file) else None
    if st is None:
        st = strategy.run(ctx)
        if stage_file:
            _save_stage(stage_file, st, cfg)
    else:
        notes.append(f"resumed: the {cfg.strategy} stage was read from {stage_file}")
    plain, targets, mapping = st.plain, st.targets, st.mapping
    target_abs, calibration, weights = st.target_abs, st.calibration, st.weights

    # the teacher's report first: it does not change, and under a time budget its cost stands for the
    # student's (a smaller network), which comes after the fine-tune
    threads = torch.get_num_threads()
    report_start = time.time()
    t_stats = model_stats(teacher, stat_input, eval_pairs, None, cfg, threads)
    report_s = time.time() - report_start

    # fine-tune the plain smaller network (cheaper per step than the gated one)
    if cfg.finetune_steps > 0:
        ft_distiller = None
        if mapping and cfg.loss.distill_weight and cfg.loss.finetune_distill:
            ft_distiller = hooks.enter_context(
                FeatureDistiller(plain, teacher, mapping, example, kind=cfg.loss.distill_loss)).to(device)
            batch_inputs = [t.to(device) for t in inputs]  # the first batch, split above
            with torch.no_grad():
                plain.eval()(*batch_inputs)
                teacher(*batch_inputs)
            ft_distiller.fit_maps()  # least-squares start for the 1x1 maps (nothing to fit for gka)
            ft_distiller.to(device)

        def run_finetune(steps, callbacks=callbacks, checkpoint=ctx.checkpoint("finetune.pt"), progress=cfg.progress,
                         bn_batches=cfg.finetune_bn_batches, deadline=None):
            finetune(plain, teacher, loader, steps, cfg.finetune_lr, weights, ft_distiller, discriminator,
                     cfg.loss.gan_mode, cfg.device, cfg.batch_fn, progress, callbacks, checkpoint=checkpoint,
                     checkpoint_every=cfg.checkpoint_every, d_lr=cfg.loss.d_lr, average=cfg.finetune_average,
                     bn_batches=bn_batches, memory_format=cfg.memory_format, deadline=deadline,
                     precision=cfg.train_precision)

        if cfg.time_budget_min is None:
            run_finetune(cfg.finetune_steps)
        else:
            fit, deadline = _fit_time_budget(cfg, ctx, t0, report_s, run_finetune, (plain, ft_distiller, discriminator))
            if fit.steps == 0:
                warnings.warn(f"{fit.note()}: the first stage used the whole time budget, the student is not "
                              "fine-tuned; raise time_budget_min", stacklevel=3)
            run_finetune(fit.steps, deadline=deadline)
            cfg = cfg.replace(finetune_steps=fit.steps)  # what ran: the report and the result's config say so
            notes.append(fit.note())
        if ft_distiller is not None:
            ft_distiller.remove()
    plain.eval()

    qmodel, q = None, cfg.quantization
    if q.mode:
        from .deployment.quantization import QuantConfig, quantize, train_qat

        qcfg = QuantConfig(steps=q.steps, lr=q.lr, range_lr=q.range_lr, calib_batches=q.calib_batches, skip_first=q.skip_first,
                           skip_last=q.skip_last, reference=q.reference, recon_weight=cfg.loss.recon_weight, gt_weight=cfg.loss.gt_weight,
                           mse_weight=cfg.loss.mse_weight)
        qmodel = quantize(plain, loader, qcfg, batch_fn=cfg.batch_fn, example_inputs=example)
        train_qat(qmodel, teacher, loader, qcfg, batch_fn=cfg.batch_fn, device=cfg.device, progress=cfg.progress,
                  callbacks=callbacks)

    # ----------------------------------------------------------------- report
    s_stats = model_stats(plain, stat_input, eval_pairs, teacher, cfg, threads)
    target_fraction = None if target_abs is None else target_abs / teacher_macs
    if target_fraction is not None:
        # compare fractions: the report's MACs may be measured at another input size than the target's
        err = (s_stats.macs / t_stats.macs) / target_fraction - 1
        if abs(err) > 0.05:
            notes.append(f"student MACs are {err:+.1%} from the target")
    if st.search is not None and st.search.best_latency_ms is not None and cfg.target_latency_ms is not None:
        # ofa times sliced sub-networks during its search; onestep/evolve turn the latency target into
        # a MACs budget first (the calibration note below)
        notes.append(f"latency budget {cfg.target_latency_ms:g} ms measured on sliced sub-networks during the search "
                     f"(chosen: {st.search.best_latency_ms:.1f} ms); the exported student measures "
                     f"{s_stats.latency_ms or float('nan'):.1f} ms")
    notes.extend(getattr(st, "notes", []))  # stages saved by an older version have none
    if calibration is not None:
        got = f"; the student measures {s_stats.latency_ms:.1f} ms" if s_stats.latency_ms else ""
        notes.append(f"latency target {cfg.target_latency_ms:g} ms on {calibration.device} ({calibration.threads} threads, "
                     f"input {calibration.input_shape}) -> {calibration.macs_fraction:.3f} of the MACs, interpolated from "
                     f"{len(calibration.points)} measured slim variants{got}")
    report = CompressReport(
        teacher=t_stats, student=s_stats, input_shape=tuple(stat_input[0].shape), latency_threads=threads,
        widths={g.root: (st.kept[g.root], g.size) for g in targets.groups}, skipped=dict(targets.skipped),
        distill_layers=mapping, target_macs=target_fraction,
        steps=cfg.steps if st.stage_steps is None else st.stage_steps, finetune_steps=cfg.finetune_steps,
        seconds=time.time() - t0, final_rho=cfg.slim.rho if cfg.strategy == "slim" else None,
        export_rel_diff=st.rel_diff, notes=notes, quant=q.mode,
        quant_steps=q.steps if q.mode else 0, latency_target_ms=cfg.target_latency_ms,
        latency_calibration=[list(p) for p in calibration.points] if calibration is not None else [],
        strategy=cfg.strategy, search=st.search.to_dict() if st.search is not None else {},
        train_precision=cfg.train_precision)
    if qmodel is not None and q.deploy_check and eval_pairs:
        from .deployment.deploy import measure_deployment

        # the float student quantized without QAT beside it: its int8 file runs the RGB ends in integer
        # kernels too, so it can be the faster one, and at some budgets the closer one
        report.deployment = measure_deployment(
            [("student fp32", plain, "onnx"), ("student int8 (QAT)", qmodel, "onnx-int8"),
             ("student int8 (PTQ, no QAT)", plain, "onnx-int8")], plain,
            [(tuple(t.cpu() for t in i), None if g is None else g.cpu()) for i, g in eval_pairs], teacher=teacher.cpu(),
            calib_loader=loader, batch_fn=cfg.batch_fn, threads=threads)
        teacher.to(device)
        report.seconds = time.time() - t0
    if qmodel is not None:
        return CompressResult(qmodel, report, cfg, float_model=plain, supernet=st.supernet)
    return CompressResult(plain, report, cfg, float_model=plain, supernet=st.supernet)


def _fit_time_budget(cfg: CompressConfig, ctx: StrategyContext, t0: float, report_s: float,
                     run_finetune: Callable, trained: tuple) -> tuple:
    """``(fit, deadline)``: how many of ``cfg.finetune_steps`` fit in what is left of
    ``cfg.time_budget_min`` (:mod:`ganslim.core.budget`; a few steps of the real fine-tune timed, then
    undone), and the :class:`~ganslim.core.budget.Deadline` that re-fits it from the fine-tune's own
    pace. A resumed run reads the number its first part ended with and keeps it (no deadline)."""
    record = ctx.checkpoint("time_budget.json")
    fit = budget.load_fit(record, cfg.finetune_steps)
    if fit is not None:
        return fit, None
    started = ctx.checkpoint("finetune.pt")
    if started and os.path.exists(started):
        raise ValueError(f"{started} is a fine-tune started without a time budget; resume it without "
                         "time_budget_min, or delete it to start the fine-tune afresh")
    with budget.preserved_state(trained):
        step_s, overhead_s = budget.time_steps(
            lambda n, cb: run_finetune(n, callbacks=[cb], checkpoint=None, progress=False, bn_batches=0))
    # after the fine-tune: the report (its teacher half timed above) and the BatchNorm re-estimation
    # (forward passes only, so at most a training step each)
    tail_s = overhead_s + report_s + cfg.finetune_bn_batches * step_s
    budget_s, elapsed_s = cfg.time_budget_min * 60, time.time() - t0
    steps = budget.agree_on_steps(budget.fit_steps(budget_s, elapsed_s, step_s, tail_s, cfg.finetune_steps))
    fit = budget.BudgetFit(steps=steps, requested=cfg.finetune_steps, step_ms=step_s * 1e3, budget_s=budget_s,
                           left_s=budget_s - elapsed_s, tail_s=tail_s)
    budget.save_fit(record, fit)
    return fit, budget.Deadline(t0 + budget_s, tail_s, fit, record)


def _save_stage(path: str, st: StageResult, cfg: CompressConfig) -> None:
    """The first stage's result (the pruned student as a pickled module, widths, budget; a supernet as
    its plain network) so a resumed run goes straight to the fine-tune."""
    from .core.train import atomic_torch_save

    sn = st.supernet
    state = {"strategy": cfg.strategy, "target_macs": cfg.target_macs, "stage": dataclasses.replace(st, supernet=None),
             "supernet": None if sn is None else {"model": sn.plain_copy(), "config": sn.config,
                                                   "example": sn.example_inputs, "choices": sn.choices}}
    if dist.is_main():
        try:
            atomic_torch_save(state, path)
        except Exception as e:  # noqa: BLE001 - e.g. a class defined inside a function cannot be pickled
            warnings.warn(f"cannot checkpoint the compression stage to {path} ({type(e).__name__}: {e}); a resumed "
                          "run will redo it", stacklevel=3)


def _load_stage(path: str, cfg: CompressConfig) -> Optional[StageResult]:
    from .core.train import load_checkpoint

    state = load_checkpoint(path)
    if state.get("strategy") != cfg.strategy or state.get("target_macs") != cfg.target_macs:
        raise ValueError(f"{path} belongs to a run with strategy {state.get('strategy')!r}, target_macs "
                         f"{state.get('target_macs')}; use another checkpoint_dir or delete it")
    st = state["stage"]
    if state.get("supernet"):
        from .pruning.slicing import Supernet

        s = state["supernet"]
        st.supernet = Supernet(s["model"], st.targets, s["example"], s["config"])
        st.supernet.choices = s["choices"]
    return st


def _eval_pairs(cfg: CompressConfig, first_batch) -> list:
    """``[(inputs tuple, target or None)]`` for the report: ``cfg.eval_inputs`` or the first batch."""
    src = cfg.eval_inputs
    if src is None:
        inputs, target = split_batch(first_batch, cfg.batch_fn)
        return [(inputs, target)]
    pairs = []
    for item in src:
        inputs, target = split_batch(item, cfg.batch_fn)
        pairs.append((inputs, target))
    return pairs
