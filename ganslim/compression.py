"""``ganslim.compress`` (this module: ``ganslim.compression``): distillation + differentiable channel gating + physical channel removal.

Stages (each usable alone from its own module):
1. targeting (:mod:`ganslim.targeting`): coupled channel groups from torch-pruning's dependency graph;
2. distillation hooks and 1x1 mappings (:mod:`ganslim.distill`);
3. gates with an L1 proximal step, ρ steered so the MACs follow a schedule to the target
   (:mod:`ganslim.gating`), then a global threshold (bisection) that meets the target;
4. export: gates folded into the weights, zero channels removed physically, output checked equal;
5. fine-tune of the plain smaller student with the same distillation losses;
6. optional QAT (``quant="int8"``, :mod:`ganslim.quantization`): fake-quantize, calibrate, fine-tune,
   and measure the real int8 deployment in onnxruntime (:mod:`ganslim.deploy`);
7. report: MACs, params, size, CPU latency, fidelity to teacher and ground truth.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from . import distributed as dist
from . import measure
from .config import CompressConfig
from .distill import FeatureDistiller, auto_distill_points
from .gating import GateSet, MacsModel, export_pruned, macs_schedule, threshold_for_target
from .report import CompressReport, ModelStats
from .targeting import find_channel_groups
from .train import DistillTrainer, LossWeights, finetune, first_output, split_batch


@dataclass
class CompressResult:
    """``model``: plain ``nn.Module`` (no gates, hooks or mappings), physically smaller; with
    ``quant="int8"`` the fake-quantized QAT model (export it with ``ganslim.export(...,
    format="onnx-int8")``), and ``float_model`` the float student it was made from.
    ``report``: :class:`~ganslim.report.CompressReport` (``str()`` prints a table)."""

    model: nn.Module
    report: CompressReport
    config: CompressConfig
    float_model: Optional[nn.Module] = None
    supernet: Optional[nn.Module] = None  # strategy "ofa": the trained supernet (search it again for other budgets)

    def __iter__(self):  # allows ``model, report = ganslim.compress(...)``
        return iter((self.model, self.report))


@dataclass
class _Stage:
    """What a strategy stage hands to the shared fine-tune / QAT / report steps."""

    plain: nn.Module  # physically smaller student
    info: dict  # "rel_diff" of the export (float64, relative to the output scale), "kept" widths per group root
    targets: Any  # ganslim.targeting.Targets
    mapping: dict  # feature distillation pairs
    target_abs: Optional[float]  # MACs budget (absolute, at the example input)
    calibration: Any  # device_aware.LatencyCalibration or None
    weights: LossWeights
    search: Optional[dict] = None
    supernet: Optional[nn.Module] = None
    stage_steps: Optional[int] = None  # training steps before the fine-tune (None: cfg.steps)


def _first_batch(loader: Iterable) -> Any:
    try:
        it = iter(loader)
    except TypeError:
        raise TypeError(f"loader must be an iterable of batches, got {type(loader).__name__}") from None
    for batch in it:
        return batch
    raise ValueError("the loader yielded no batches")


def _resolve_mapping(cfg: CompressConfig, student: nn.Module, teacher: nn.Module, example, same_arch: bool) -> dict:
    layers = cfg.distill_layers
    if layers is None:
        s_pts = auto_distill_points(student, example, cfg.n_distill_layers)
        if same_arch:
            return {n: n for n in s_pts}
        t_pts = auto_distill_points(teacher, example, cfg.n_distill_layers)
        if len(s_pts) != len(t_pts):
            raise ValueError("could not pair distillation layers automatically between different student and teacher "
                             "architectures; pass distill_layers={student_layer: teacher_layer}")
        return dict(zip(s_pts, t_pts))
    if isinstance(layers, dict):
        return dict(layers)
    return {n: n for n in layers}


def model_stats(model: nn.Module, example, eval_pairs, teacher: Optional[nn.Module], cfg: CompressConfig,
                threads: int) -> ModelStats:
    """Measure one network: MACs (both conventions) on ``example``, params, size, latency on the
    first eval input, fidelity on ``eval_pairs`` [(inputs tuple, target or None)]."""
    st = ModelStats(
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
            :func:`ganslim.train.split_batch`; ``batch_fn`` overrides).
        config: :class:`CompressConfig`; keyword ``overrides`` replace its fields
            (e.g. ``target_macs=0.1, steps=500``).
        discriminator: optional; trained alongside with ``gan_mode`` loss (GAN Slimming's min-max).
        callbacks: ``fn(trainer, losses)`` after each step.

    Returns:
        :class:`CompressResult` with ``.model`` (plain, physically smaller) and ``.report``.
    """
    was_training = getattr(teacher, "training", None)
    try:
        return _compress(model, teacher, loader, config, discriminator, callbacks, **overrides)
    finally:  # the user's teacher leaves in the mode it came in, even when compress raises
        if isinstance(teacher, nn.Module):
            teacher.train(was_training)


def _compress(model: nn.Module, teacher: nn.Module, loader: Iterable, config: Optional[CompressConfig],
              discriminator: Optional[nn.Module], callbacks: Iterable[Callable], **overrides) -> CompressResult:
    cfg = (config or CompressConfig()).replace(**overrides).validate()
    dist.init_from_env()  # under torchrun: join its process group (no-op otherwise)
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
    if cfg.strategy == "auto":
        from .strategies import choose_strategy

        settings, why = choose_strategy(cfg.target_macs if cfg.target_latency_ms is None else None)
        cfg = cfg.replace(**settings)
        notes.append(f"strategy auto -> {why}")
    stage = {"slim": _slim_stage, "ofa": _ofa_stage, "onestep": _onestep_stage, "evolve": _evolve_stage}[cfg.strategy]
    stage_file = _ckpt(cfg, "stage.pt")
    st = _load_stage(stage_file, cfg) if stage_file and os.path.exists(stage_file) else None
    if st is None:
        st = stage(cfg, student, teacher, loader, example, inputs, teacher_macs, eval_pairs, stat_input, same_arch,
                   discriminator, callbacks)
        if stage_file:
            _save_stage(stage_file, st, cfg)
    else:
        notes.append(f"resumed: the {cfg.strategy} stage was read from {stage_file}")
    plain, info, targets, mapping = st.plain, st.info, st.targets, st.mapping
    target_abs, calibration, weights = st.target_abs, st.calibration, st.weights

    # fine-tune the plain smaller network (cheaper per step than the gated one)
    if cfg.finetune_steps > 0:
        ft_distiller = None
        if mapping and cfg.distill_weight and cfg.finetune_distill:
            ft_distiller = FeatureDistiller(plain, teacher, mapping, example, kind=cfg.distill_loss).to(device)
            batch_inputs = [t.to(device) for t in inputs]  # the first batch, split above
            with torch.no_grad():
                plain.eval()(*batch_inputs)
                teacher(*batch_inputs)
            ft_distiller.fit_maps()  # least-squares start for the 1x1 maps (nothing to fit for gka)
            ft_distiller.to(device)
        finetune(plain, teacher, loader, cfg.finetune_steps, cfg.finetune_lr, weights, ft_distiller, discriminator,
                 cfg.gan_mode, cfg.device, cfg.batch_fn, cfg.progress, callbacks, checkpoint=_ckpt(cfg, "finetune.pt"),
                 checkpoint_every=cfg.checkpoint_every)
        if ft_distiller is not None:
            ft_distiller.remove()
    plain.eval()

    qmodel = None
    if cfg.quant:
        from .quantization import QuantConfig, quantize, train_qat

        qcfg = QuantConfig(steps=cfg.quant_steps, lr=cfg.quant_lr, calib_batches=cfg.quant_calib_batches,
                           skip_first=cfg.quant_skip_first, skip_last=cfg.quant_skip_last,
                           recon_weight=cfg.recon_weight, gt_weight=cfg.gt_weight)
        qmodel = quantize(plain, loader, qcfg, batch_fn=cfg.batch_fn, example_inputs=example)
        train_qat(qmodel, teacher, loader, qcfg, batch_fn=cfg.batch_fn, device=cfg.device, progress=cfg.progress,
                  callbacks=callbacks)

    # ----------------------------------------------------------------- report
    threads = torch.get_num_threads()
    t_stats = model_stats(teacher, stat_input, eval_pairs, None, cfg, threads)
    s_stats = model_stats(plain, stat_input, eval_pairs, teacher, cfg, threads)
    target_fraction = None if target_abs is None else target_abs / teacher_macs
    if target_fraction is not None:
        # compare fractions: the report's MACs may be measured at another input size than the target's
        err = (s_stats.macs / t_stats.macs) / target_fraction - 1
        if abs(err) > 0.05:
            notes.append(f"student MACs are {err:+.1%} from the target")
    if st.search and cfg.target_latency_ms is not None:
        notes.append(f"latency budget {cfg.target_latency_ms:g} ms measured on sliced sub-networks during the search "
                     f"(chosen: {st.search['best_latency_ms']:.1f} ms); the exported student measures "
                     f"{s_stats.latency_ms or float('nan'):.1f} ms")
    if calibration is not None:
        got = f"; the student measures {s_stats.latency_ms:.1f} ms" if s_stats.latency_ms else ""
        notes.append(f"latency target {cfg.target_latency_ms:g} ms on {calibration.device} ({calibration.threads} threads, "
                     f"input {calibration.input_shape}) -> {calibration.macs_fraction:.3f} of the MACs, interpolated from "
                     f"{len(calibration.points)} measured slim variants{got}")
    report = CompressReport(
        teacher=t_stats, student=s_stats, input_shape=tuple(stat_input[0].shape), latency_threads=threads,
        widths={g.root: (info["kept"][g.root], g.size) for g in targets.groups}, skipped=dict(targets.skipped),
        distill_layers=mapping, target_macs=target_fraction,
        steps=cfg.steps if st.stage_steps is None else st.stage_steps, finetune_steps=cfg.finetune_steps,
        seconds=time.time() - t0, final_rho=cfg.rho if cfg.strategy == "slim" else None,
        export_rel_diff=info["rel_diff"], notes=notes, quant=cfg.quant,
        quant_steps=cfg.quant_steps if cfg.quant else 0, latency_target_ms=cfg.target_latency_ms,
        latency_calibration=[list(p) for p in calibration.points] if calibration is not None else [],
        strategy=cfg.strategy, search=st.search or {})
    if qmodel is not None and cfg.deploy_check and eval_pairs:
        from .deploy import measure_deployment

        report.deployment = measure_deployment(
            [("student fp32", plain, "onnx"), ("student int8 (QAT)", qmodel, "onnx-int8")], plain,
            [(tuple(t.cpu() for t in i), None if g is None else g.cpu()) for i, g in eval_pairs], teacher=teacher.cpu(),
            calib_loader=loader, batch_fn=cfg.batch_fn, threads=threads)
        teacher.to(device)
        report.seconds = time.time() - t0
    if qmodel is not None:
        return CompressResult(qmodel, report, cfg, float_model=plain, supernet=st.supernet)
    return CompressResult(plain, report, cfg, float_model=plain, supernet=st.supernet)


def _slim_stage(cfg: CompressConfig, student: nn.Module, teacher: nn.Module, loader: Iterable, example: tuple,
                inputs: tuple, teacher_macs: float, eval_pairs: list, stat_input: tuple, same_arch: bool,
                discriminator: Optional[nn.Module], callbacks: Iterable[Callable]):
    """GAN Slimming: gates + L1 proximal step + progressive pruning to the target, then removal."""
    device = torch.device(cfg.device)
    targets = find_channel_groups(student, example, include=cfg.include, exclude=cfg.exclude)
    macs_model = MacsModel(student, targets, measure.macs_by_module(student, example, "papers"))
    target_abs, calibration = None, None
    if cfg.target_latency_ms is not None or cfg.target_macs is not None:
        target_abs, calibration = _budget(cfg, student, targets, macs_model, example, stat_input, teacher_macs)

    mapping = _resolve_mapping(cfg, student, teacher, example, same_arch)
    distiller = FeatureDistiller(student, teacher, mapping, example, kind=cfg.distill_loss).to(device) \
        if mapping and cfg.distill_weight else None
    gates = GateSet.for_model(student, targets).to(device).attach(student)
    weights = _loss_weights(cfg, discriminator)
    groups = [{"params": list(student.parameters()), "lr": cfg.lr},
              {"params": list(gates.parameters()), "lr": cfg.gate_lr}]
    if distiller is not None and any(True for _ in distiller.parameters()):
        groups.append({"params": list(distiller.parameters()), "lr": cfg.lr})
    trainer = DistillTrainer(student, teacher, groups, weights, distiller, discriminator, cfg.lr, cfg.gan_mode,
                             cfg.device, cfg.batch_fn)

    # Progressive pruning (gradual magnitude schedule, cubic): every ``prune_every`` steps the channels
    # with the smallest normalised gates are switched off so the MACs follow
    # target + (total - target) * (1 - t/reach)^3, reaching the target at ``reach``; the L1 proximal
    # step keeps separating important from unimportant channels meanwhile.
    reach = max(1, int(cfg.target_reach * cfg.steps))
    start = min(int(cfg.prune_start * cfg.steps), reach - 1)
    ctl = {"macs": macs_model.total}  # for the progress bar

    def prox(tr: DistillTrainer) -> None:
        gates.prox_step(cfg.gate_lr, cfg.rho)
        k = tr.state.step
        if target_abs is not None and start < k <= reach and (k % cfg.prune_every == 0 or k == reach):
            goal = macs_schedule(k, start, reach, macs_model.total, target_abs)
            _, alive = threshold_for_target(gates, macs_model, goal)
            gates.set_masks(alive, final=False)
        if k % 5 == 0:
            ctl["macs"] = macs_model.macs(gates.alive())

    trainer.after_step.append(prox)

    def postfix() -> dict:
        return {"MACs": f"{ctl['macs'] / 1e9:.3f}G"}

    trainer.modules["gates"] = gates
    if distiller is not None:
        trainer.modules["distiller"] = distiller
    trainer.run(loader, cfg.steps, desc="ganslim gating", progress=cfg.progress, postfix=postfix, callbacks=callbacks,
                checkpoint=_ckpt(cfg, "gating.pt"), checkpoint_every=cfg.checkpoint_every)

    if target_abs is not None:
        _, alive = threshold_for_target(gates, macs_model, target_abs, multiple=cfg.channel_multiple)
        gates.set_masks(alive)
    student.eval()
    if distiller is not None:
        distiller.remove()  # before export copies the student, so no hook travels into the result
    plain, info = export_pruned(student, gates, example, tol=cfg.export_tol)
    gates.detach()

    return _Stage(plain, info, targets, mapping, target_abs, calibration, weights)


def _ofa_stage(cfg: CompressConfig, student: nn.Module, teacher: nn.Module, loader: Iterable, example: tuple,
               inputs: tuple, teacher_macs: float, eval_pairs: list, stat_input: tuple, same_arch: bool,
               discriminator: Optional[nn.Module], callbacks: Iterable[Callable]):
    """Once-for-all: supernet (sandwich rule) -> evolutionary search at the budget -> export."""
    from .search import Evaluator, SearchConfig, evolve, resolve_budget
    from .slicing import SliceConfig, make_supernet, recalibrate_bn
    from .supernet import SupernetConfig, train_supernet
    from .train import input_batches

    if discriminator is not None:
        raise ValueError("strategy='ofa' trains with distillation losses only; drop discriminator= or use strategy='slim'")
    supernet = make_supernet(student, example, SliceConfig(ratios=tuple(cfg.width_ratios), multiple=cfg.channel_multiple),
                             include=cfg.include, exclude=cfg.exclude, copy_model=False)
    budget = resolve_budget(supernet, cfg.target_macs if cfg.target_latency_ms is None else None, teacher_macs)
    scfg = SupernetConfig(steps=cfg.steps, lr=cfg.supernet_lr, random_subnets=cfg.random_subnets, seed=cfg.seed,
                          recon_weight=cfg.recon_weight, gt_weight=cfg.gt_weight, mse_weight=cfg.mse_weight)
    sinfo = train_supernet(supernet, teacher, loader, scfg, batch_fn=cfg.batch_fn, device=cfg.device,
                           progress=cfg.progress, checkpoint=cfg.supernet_checkpoint or _ckpt(cfg, "supernet.pt"),
                           callbacks=[lambda step, losses: [cb(None, losses) for cb in callbacks]] if callbacks else ())
    bn_inputs = [tuple(t.to(cfg.device) for t in b) for b in input_batches(loader, 4, cfg.batch_fn)]
    pairs = [(tuple(t.to(cfg.device) for t in i), None if g is None else g.to(cfg.device)) for i, g in eval_pairs]
    qcfg = SearchConfig(population=cfg.search_population, generations=cfg.search_generations, metric=cfg.search_metric,
                        seed=cfg.seed)
    evaluator = Evaluator(supernet, teacher, pairs, bn_inputs, qcfg.metric, latency_input=stat_input,
                          latency_repeats=qcfg.latency_repeats)
    result = evolve(supernet, evaluator, budget, cfg.target_latency_ms, qcfg, teacher_macs, progress=cfg.progress)
    result = dist.broadcast_object(result)  # with a latency budget the timings differ per process: rank 0 decides
    recalibrate_bn(supernet, bn_inputs, result.best.widths)
    plain = supernet.export(result.best.widths, tol=cfg.export_tol)
    supernet.set_widths(supernet.largest())
    info = {"rel_diff": supernet.last_export_diff, "kept": dict(result.best.widths)}
    weights = LossWeights(cfg.recon_weight, cfg.gt_weight, 0.0, 0.0, cfg.mse_weight)
    search_info = {"evaluations": result.evaluations, "seconds": result.seconds, "per_minute": result.per_minute,
                   "supernet_steps": sinfo["steps"], "supernet_seconds": sinfo["seconds"],
                   "resumed_from": sinfo["resumed_from"], "best_fitness": result.best.fitness,
                   "metric": qcfg.metric if isinstance(qcfg.metric, str) else getattr(qcfg.metric, "__name__", "metric"),
                   "best_macs_fraction": result.best.macs / teacher_macs, "best_latency_ms": result.best.latency_ms,
                   "pareto": [[c.macs / teacher_macs, c.fitness] for c in result.pareto()],
                   "generations": result.generations}
    return _Stage(plain, info, supernet.targets, {}, budget, None, weights, search_info, supernet)


def _budget(cfg: CompressConfig, student: nn.Module, targets, macs_model: MacsModel, example: tuple, stat_input: tuple,
            teacher_macs: float):
    """Absolute MACs budget (at the example input) from the MACs or latency target, checked reachable."""
    calibration = None
    if cfg.target_latency_ms is not None:
        from .device_aware import calibrate_latency

        calibration = calibrate_latency(student, targets, example, stat_input, cfg.target_latency_ms, device=cfg.device)
        calibration = dist.broadcast_object(calibration)  # timings differ per process: rank 0 decides
        if calibration.macs_fraction is None:
            raise ValueError(f"impossible latency target: {calibration.note}\n{calibration.table()}")
        target_abs = calibration.macs_fraction * macs_model.total
    else:
        target_abs = cfg.target_macs * teacher_macs if cfg.target_macs <= 1 else float(cfg.target_macs)
    floor = macs_model.macs([torch.nn.functional.one_hot(torch.tensor(0), g.size).bool() for g in targets.groups])
    if target_abs < floor:
        raise ValueError(f"impossible MACs target {target_abs / 1e9:.4g} G: keeping one channel per prunable group "
                         f"already costs {floor / 1e9:.4g} G ({floor / teacher_macs:.3%} of the teacher)")
    return target_abs, calibration


def _targets_and_budget(cfg: CompressConfig, student: nn.Module, example: tuple, stat_input: tuple, teacher_macs: float):
    """Channel groups, MACs model and absolute budget for the strategies that prune once (onestep, evolve)."""
    if cfg.target_macs is None and cfg.target_latency_ms is None:
        raise ValueError(f"strategy={cfg.strategy!r} needs target_macs or target_latency_ms")
    targets = find_channel_groups(student, example, include=cfg.include, exclude=cfg.exclude)
    macs_model = MacsModel(student, targets, measure.macs_by_module(student, example, "papers"))
    target_abs, calibration = _budget(cfg, student, targets, macs_model, example, stat_input, teacher_macs)
    return targets, macs_model, target_abs, calibration


def _loss_weights(cfg: CompressConfig, discriminator: Optional[nn.Module]) -> LossWeights:
    return LossWeights(cfg.recon_weight, cfg.gt_weight, cfg.distill_weight,
                       (cfg.adv_weight or 1.0) if discriminator is not None else 0.0, cfg.mse_weight)


def _onestep_stage(cfg: CompressConfig, student: nn.Module, teacher: nn.Module, loader: Iterable, example: tuple,
                   inputs: tuple, teacher_macs: float, eval_pairs: list, stat_input: tuple, same_arch: bool,
                   discriminator: Optional[nn.Module], callbacks: Iterable[Callable]):
    """CAT: one global threshold on the norm scales meets the budget; the fine-tune does the rest."""
    from .onestep import onestep_masks, onestep_prune

    targets, macs_model, target_abs, calibration = _targets_and_budget(cfg, student, example, stat_input, teacher_macs)
    alive = onestep_masks(student.eval(), targets, macs_model, target_abs, multiple=cfg.channel_multiple)
    plain = onestep_prune(student, targets, alive, example)
    kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, alive)}
    mapping = _resolve_mapping(cfg, plain, teacher, example, same_arch) if cfg.finetune_distill else {}
    weights = _loss_weights(cfg, discriminator)
    return _Stage(plain, {"rel_diff": 0.0, "kept": kept}, targets, mapping, target_abs, calibration, weights,
                  stage_steps=0)


def _evolve_stage(cfg: CompressConfig, student: nn.Module, teacher: nn.Module, loader: Iterable, example: tuple,
                  inputs: tuple, teacher_macs: float, eval_pairs: list, stat_input: tuple, same_arch: bool,
                  discriminator: Optional[nn.Module], callbacks: Iterable[Callable]):
    """Co-Evolutionary Compression: genetic search over channel masks, discriminator-aware fitness."""
    from .evolve import EvolveConfig, evolve_masks
    from .onestep import importance_scores, onestep_prune
    from .train import input_batches

    targets, macs_model, target_abs, calibration = _targets_and_budget(cfg, student, example, stat_input, teacher_macs)
    # fitness batches: held out from the start of the loader (the fine-tune cycles over them too)
    batches = [tuple(t.to(cfg.device) for t in b) for b in input_batches(loader, cfg.evolve_batches, cfg.batch_fn)]
    reverse = cfg.reverse_generator
    if reverse is not None:
        reverse.to(cfg.device).eval()
    if discriminator is not None:
        discriminator.to(cfg.device)
    was_d = discriminator.training if discriminator is not None else None
    if discriminator is not None:
        discriminator.eval()
    try:
        res = evolve_masks(student, teacher, targets, macs_model, target_abs, importance_scores(student, targets), batches,
                           discriminator, reverse,
                           EvolveConfig(population=cfg.evolve_population, generations=cfg.evolve_generations, seed=cfg.seed),
                           multiple=cfg.channel_multiple, progress=cfg.progress)
    finally:
        if discriminator is not None:
            discriminator.train(was_d)
    plain = onestep_prune(student, targets, res.alive, example)
    kept = {g.root: int(a.sum()) for g, a in zip(targets.groups, res.alive)}
    mapping = _resolve_mapping(cfg, plain, teacher, example, same_arch) if cfg.finetune_distill else {}
    weights = _loss_weights(cfg, discriminator)
    search = {"evaluations": res.evaluations, "seconds": res.seconds, "per_minute": 60 * res.evaluations / max(res.seconds, 1e-9),
              "best_fitness": res.fitness, "generations": res.history,
              "metric": "-L1 to teacher" + (" - D term" if discriminator is not None else "")
                        + (" - cycle" if reverse is not None else "")}
    return _Stage(plain, {"rel_diff": 0.0, "kept": kept}, targets, mapping, target_abs, calibration,
                  weights, search, stage_steps=0)


def _ckpt(cfg: CompressConfig, name: str) -> Optional[str]:
    if not cfg.checkpoint_dir:
        return None
    os.makedirs(cfg.checkpoint_dir, exist_ok=True)
    return os.path.join(cfg.checkpoint_dir, name)


def _save_stage(path: str, st: _Stage, cfg: CompressConfig) -> None:
    """The first stage's result (the pruned student as a pickled module, widths, budget; a supernet as
    its plain network) so a resumed run goes straight to the fine-tune."""
    from .train import atomic_torch_save

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


def _load_stage(path: str, cfg: CompressConfig) -> Optional[_Stage]:
    from .train import load_checkpoint

    state = load_checkpoint(path)
    if state.get("strategy") != cfg.strategy or state.get("target_macs") != cfg.target_macs:
        raise ValueError(f"{path} belongs to a run with strategy {state.get('strategy')!r}, target_macs "
                         f"{state.get('target_macs')}; use another checkpoint_dir or delete it")
    st = state["stage"]
    if state.get("supernet"):
        from .slicing import Supernet

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
