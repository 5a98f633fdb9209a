"""The distillation training loop shared by every compression stage.

One step: teacher forward (no grad; skipped when the batch carries the teacher's precomputed output
under ``"teacher_output"`` and no feature distillation is active) -> student forward -> losses
(L1 to teacher output, L1 to ground truth when present, feature MSE through mappings, optional
adversarial term with a user discriminator) -> backward -> optimizer step -> callbacks (e.g. the
gates' proximal step). Progress bar with live losses; NaN/inf losses stop the run with a clear
error and the last good weights restored.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist
from . import memory_format as layout
from .precision import autocast, check_train_precision
from .._utils import first_output  # noqa: F401 - re-exported: the loop's callers import it from here

BatchFn = Callable[[Any], tuple]


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss becomes NaN or inf; the student holds its last good weights."""


def split_batch(batch: Any, batch_fn: Optional[BatchFn] = None) -> tuple[tuple[torch.Tensor, ...], Optional[torch.Tensor]]:
    """Map one loader batch to ``(generator inputs tuple, ground-truth target or None)``.

    Accepted without ``batch_fn``: a tensor (input only); a tuple/list ``(input, target, ...)``;
    a dict with an input under ``A``/``input``/``x``/``image``/``label`` and a target under
    ``target``/``y``/``gt`` (or ``image`` when the input is ``label``, as in SPADE). ``B`` of an
    unpaired (CycleGAN) batch is *not* a target: pass ``batch_fn`` for paired dicts.
    """
    if batch_fn is not None:
        out = batch_fn(batch)
        if isinstance(out, torch.Tensor):
            return (out,), None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("batch_fn must return an input tensor or a pair (inputs, target_or_None)")
        inputs, target = out
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        return inputs, target
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        target = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return (batch[0],), target
    if isinstance(batch, dict):
        for key in ("A", "input", "x", "image", "label"):
            if key == "image" and "label" in batch:
                continue
            if isinstance(batch.get(key), torch.Tensor):
                target = next((batch[k] for k in ("target", "y", "gt") if isinstance(batch.get(k), torch.Tensor)), None)
                if key == "label" and target is None and isinstance(batch.get("image"), torch.Tensor):
                    target = batch["image"]
                return (batch[key],), target
        raise TypeError(f"cannot find the generator input in a dict batch with keys {sorted(batch)}; "
                        "pass batch_fn=lambda b: (inputs, target_or_None)")
    raise TypeError(f"the loader yielded a {type(batch).__name__}; expected a tensor, a tuple (input, target) "
                    "or a dict, or pass batch_fn to map batches to generator inputs")


TEACHER_OUTPUT_KEY = "teacher_output"


def cached_teacher_output(batch: Any) -> Optional[torch.Tensor]:
    """The teacher's precomputed output carried by a dict batch under ``"teacher_output"`` (offline
    distillation: the teacher ran once over the data set, so training skips its forward), else None."""
    if isinstance(batch, dict):
        t = batch.get(TEACHER_OUTPUT_KEY)
        return t if isinstance(t, torch.Tensor) else None
    return None


def input_batches(loader: Iterable, n: int, batch_fn: Optional[BatchFn] = None) -> list[tuple[torch.Tensor, ...]]:
    """The generator inputs of the first ``n`` batches of ``loader`` (fewer if it ends sooner)."""
    out = []
    for batch in loader:
        out.append(split_batch(batch, batch_fn)[0])
        if len(out) >= n:
            break
    return out


def cycle(loader: Iterable) -> Iterator:
    """Iterate over ``loader`` forever; error if it yields nothing."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the loader yielded no batches")


def gan_loss(pred: torch.Tensor, real: bool, mode: str = "lsgan") -> torch.Tensor:
    """Adversarial loss on discriminator predictions (any shape): LSGAN, vanilla BCE or hinge."""
    if isinstance(pred, (list, tuple)):  # multi-scale discriminators (SPADE): average
        return sum(gan_loss(p[-1] if isinstance(p, (list, tuple)) else p, real, mode) for p in pred) / len(pred)
    if mode == "lsgan":
        return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(pred, torch.full_like(pred, 1.0 if real else 0.0))
    if mode == "hinge":
        return F.relu(1 - pred).mean() if real else F.relu(1 + pred).mean()
    raise ValueError(mode)


@dataclass
class LossWeights:
    recon: float = 1.0  # L1 to the teacher's output
    gt: float = 1.0  # L1 to the ground truth
    distill: float = 1.0  # feature MSE through the mappings
    adv: float = 0.0  # adversarial term (with a discriminator)
    mse: float = 0.0  # MSE to the ground truth (to the teacher's output without one): PSNR's own loss


def _run_on_batch(model: nn.Module, inputs: tuple, who: str, step: int):
    """``model(*inputs)``; a shape/dtype failure becomes one line naming the batch and the fix."""
    try:
        return model(*inputs)
    except RuntimeError as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(f"the {who} failed on the batch at step {step} (input shape {shapes}): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; every batch must have the layout "
                         "of the first one (channels, dtype), or pass batch_fn") from None


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (all ranks agree, so none waits alone in an all-reduce)."""
    bad = (~torch.isfinite(loss.detach()).all()).float()  # on the loss's device: no sync before the all-reduce
    if dist.is_distributed():
        bad = bad.to(dist.collective_device(bad.device))  # nccl rejects CPU tensors
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad)


def output_losses(s_out: torch.Tensor, t_out: torch.Tensor, target: Optional[torch.Tensor],
                  w: LossWeights) -> dict[str, torch.Tensor]:
    """The output-level distillation losses (weighted): L1 to the teacher's output, L1 to the ground
    truth when there is one, MSE to the ground truth (to the teacher's output without one)."""
    losses: dict[str, torch.Tensor] = {}
    if w.recon:
        losses["recon"] = w.recon * F.l1_loss(s_out, t_out)
    if w.gt and target is not None:
        if target.shape != s_out.shape:
            raise ValueError(f"ground truth {tuple(target.shape)} does not match the output {tuple(s_out.shape)}")
        losses["gt"] = w.gt * F.l1_loss(s_out, target)
    if w.mse:
        losses["mse"] = w.mse * F.mse_loss(s_out, target if target is not None and w.gt else t_out)
    return losses


@dataclass
class TrainState:
    step: int = 0
    losses: dict = field(default_factory=dict)


class DistillTrainer:
    """Trains ``student`` to imitate ``teacher``.

    ``extra_params``: further parameters trained with the student (mapping layers, gates as a
    separate param group via ``param_groups``). ``after_step`` callbacks run after each optimizer
    step with the trainer (the gates' proximal step lives there).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, param_groups: list[dict], weights: LossWeights,
                 distiller=None, discriminator: Optional[nn.Module] = None, d_lr: float = 2e-4,
                 gan_mode: str = "lsgan", device: str = "cpu", batch_fn: Optional[BatchFn] = None,
                 memory_format: str = "auto", precision: str = "fp32", cached_teacher_outputs: bool = True,
                 frozen_batchnorm: bool = False):
        self.student, self.teacher = student, teacher
        # True: the student's BatchNorm layers normalize with their running statistics and keep them
        # (eval mode) while the rest trains: a QAT fine-tune, whose quantizer ranges were calibrated on them
        self.frozen_batchnorm = frozen_batchnorm
        # batches' precomputed teacher outputs stand in for the teacher's forward; False runs ``teacher``
        # on every batch (a QAT fine-tune imitating the float model, not the teacher the outputs came from)
        self.cached_teacher_outputs = cached_teacher_outputs
        # channels-last training (ganslim.core.memory_format); decided in run(), after a probe forward
        self.channels_last = layout.resolve_memory_format(memory_format, device, student)
        # the convolutions' arithmetic (ganslim.core.precision): "fp32" or "bf16"
        self.precision = check_train_precision(precision)
        self.weights, self.distiller = weights, distiller
        self.device = torch.device(device)
        self.batch_fn = batch_fn
        self.opt = torch.optim.Adam(param_groups, betas=(0.5, 0.999))
        self.discriminator = discriminator
        self.gan_mode = gan_mode
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=d_lr, betas=(0.5, 0.999)) if discriminator is not None else None
        self.after_step: list[Callable[["DistillTrainer"], None]] = []
        self.state = TrainState()
        self._good = None
        self._presharded = False
        self.schedulers: list = []  # saved with checkpoints
        self.modules: dict[str, nn.Module] = {}  # further trained state saved with checkpoints (gates, mappings)

    def _snapshot(self) -> None:
        """Keep the student's state (weights and buffers, e.g. BatchNorm statistics) as the last good one,
        unless an update made it non-finite (then the previous one stays). Called before each step's
        forward, so a NaN loss restores the state after the last step whose loss was finite, undoing
        what the failed forward did to the buffers; copied into the same buffers each step."""
        sd = self.student.state_dict()
        floats = [v for v in sd.values() if v.is_floating_point()]
        if floats and not bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()):
            return
        good = self._good
        if good is None or good.keys() != sd.keys() or any(good[k].shape != v.shape or good[k].dtype != v.dtype
                                                            for k, v in sd.items()):
            self._good = {k: v.detach().clone() for k, v in sd.items()}
        else:
            with torch.no_grad():
                for k, v in sd.items():
                    good[k].copy_(v)

    def step(self, batch: Any) -> dict:
        """One optimisation step on ``batch``; returns the float losses."""
        self._snapshot()  # the state this step starts from: restored if its loss is not finite
        inputs, target = split_batch(batch, self.batch_fn)
        pre = self._presharded
        inputs = tuple(dist.shard(t, pre).to(self.device) for t in inputs)  # this rank's rows (torchrun)
        if self.channels_last:
            inputs = layout.to_channels_last(inputs)
        target = dist.shard(target, pre)
        cached = dist.shard(cached_teacher_output(batch), pre) if self.cached_teacher_outputs else None
        # bf16: the convolutions only; normalisations, additions, losses and updates in float32
        with autocast(self.precision, self.device, (self.student, self.teacher)):
            if cached is not None and not (self.distiller is not None and self.weights.distill):
                t_out = cached.to(self.device)  # offline distillation: no teacher forward this step
            else:  # feature distillation needs the teacher's activations: run it
                with torch.no_grad():
                    t_out = first_output(_run_on_batch(self.teacher, inputs, "teacher", self.state.step))
            s_out = first_output(_run_on_batch(self.student, inputs, "student", self.state.step))
        s_out, t_out = s_out.float(), t_out.float()
        if s_out.shape != t_out.shape:
            raise ValueError(f"student output {tuple(s_out.shape)} and teacher output {tuple(t_out.shape)} differ in shape")
        w = self.weights
        if target is not None:
            target = target.to(self.device)
        losses = output_losses(s_out, t_out, target, w)
        if self.distiller is not None and w.distill:
            losses["distill"] = w.distill * self.distiller.loss()
        if self.discriminator is not None and w.adv:
            losses["adv"] = w.adv * gan_loss(self.discriminator(s_out), True, self.gan_mode)
        total = sum(losses.values())
        if not _finite_everywhere(total):
            if self._good is not None:
                self.student.load_state_dict(self._good)
            bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise NonFiniteLossError(f"non-finite loss at step {self.state.step} ({bad}); the student keeps its last "
                                     "good weights. Lower the learning rates or check the inputs for NaN/inf.")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        dist.average_gradients(p for g in self.opt.param_groups for p in g["params"])
        self.opt.step()
        if self.discriminator is not None:
            real = target if target is not None else t_out
            d_loss = 0.5 * (gan_loss(self.discriminator(real.detach()), True, self.gan_mode)
                            + gan_loss(self.discriminator(s_out.detach()), False, self.gan_mode))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            dist.average_gradients(self.discriminator.parameters())
            self.opt_d.step()
            losses["D"] = d_loss
        self.state.step += 1
        for cb in self.after_step:
            cb(self)
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total"] = float(total.detach())
        self.state.losses = out
        return out

    # ----------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        """Everything a resumed run needs: student, optimizers, schedulers, registered ``modules``
        (gates, mapping layers), step, random states."""
        import random

        return {"student": self.student.state_dict(), "opt": self.opt.state_dict(),
                "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
                "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
                "schedulers": [s.state_dict() for s in self.schedulers],
                "modules": {k: m.state_dict() for k, m in self.modules.items()},
                "step": self.state.step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        import random

        missing = sorted(set(self.modules) - set(state["modules"]))
        if missing:
            raise ValueError(f"the checkpoint has no saved {', '.join(missing)} (written with other options or an "
                             "older ganslim); resume with the options it was written with, or delete it to start afresh")
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["opt"])
        if self.opt_d is not None and state.get("opt_d") is not None:
            self.opt_d.load_state_dict(state["opt_d"])
            self.discriminator.load_state_dict(state["discriminator"])
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        self.state.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def save_checkpoint(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (rank 0 only under torchrun)."""
        if dist.is_main():
            atomic_torch_save(self.state_dict(), path)

    def run(self, loader: Iterable, steps: int, desc: str = "train", progress: bool = True,
            postfix: Optional[Callable[[], dict]] = None, callbacks: Iterable[Callable] = (),
            checkpoint: Optional[str] = None, checkpoint_every: int = 200) -> None:
        """Run ``steps`` optimisation steps over ``loader`` (cycled) with a tqdm progress bar.

        ``checkpoint``: a file written atomically every ``checkpoint_every`` steps and at the end; when
        it exists at the start the run resumes from it (weights, optimizer, schedulers, registered
        modules, random states, and the same data position: the loader is fast-forwarded)."""
        if steps <= 0:
            return
        start = 0
        if checkpoint is not None and os.path.exists(checkpoint):
            self.load_state_dict(load_checkpoint(checkpoint))
            start = self.state.step
        self._presharded = dist.presharded(loader)
        it = cycle(loader)
        for _ in range(start):  # the batches the interrupted run had used
            next(it)
        if self.channels_last:
            first = next(it)
            it = itertools.chain([first], it)
            self._probe_channels_last(first)
        with layout.channels_last(*self._trained_modules()) if self.channels_last else contextlib.nullcontext():
            self._loop(it, start, steps, desc, progress, postfix, callbacks, checkpoint, checkpoint_every)

    def _trained_modules(self) -> list:
        mods = [self.student, self.teacher, self.discriminator, self.distiller, *self.modules.values()]
        return [m for m in mods if isinstance(m, nn.Module)]

    def _probe_channels_last(self, batch: Any) -> None:
        """Train in NCHW after all when the student or the teacher fails on channels-last inputs."""
        inputs, _ = split_batch(batch, self.batch_fn)
        inputs = tuple(t.to(self.device) for t in inputs)
        teacher_runs = cached_teacher_output(batch) is None or (self.distiller is not None and self.weights.distill)
        nets = {"student": self.student, "teacher": self.teacher} if teacher_runs else {"student": self.student}
        self.channels_last = layout.runs_channels_last(nets, inputs)

    def _loop(self, it, start, steps, desc, progress, postfix, callbacks, checkpoint, checkpoint_every) -> None:
        from tqdm.auto import tqdm

        self.student.train()
        if self.frozen_batchnorm:
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.teacher.eval()
        # an after_step callback may move the end (ganslim.core.budget.Deadline re-fits it to a time budget)
        self.total_steps = steps
        bar = tqdm(desc=desc, disable=not progress or not dist.is_main(), dynamic_ncols=True,
                   leave=True, mininterval=2.0, initial=start, total=steps)
        while self.state.step < self.total_steps:
            losses = self.step(next(it))
            for cb in callbacks:
                cb(self, losses)
            if bar.total != self.total_steps:
                bar.total = self.total_steps
            bar.update(1)
            if progress and (self.state.step % 5 == 0):
                info = {k: f"{v:.3f}" for k, v in losses.items() if k != "total"}
                if postfix is not None:
                    info.update(postfix())
                bar.set_postfix(info, refresh=False)
            if checkpoint is not None and (self.state.step % checkpoint_every == 0
                                           or self.state.step == self.total_steps):
                self.save_checkpoint(checkpoint)
        bar.close()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` of a ganslim training checkpoint with a clear error for a damaged or foreign file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"{path}: not a readable ganslim training checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); delete it to start afresh") from None


def lr_cosine(step: int, total: int, floor: float = 0.05) -> float:
    """Cosine factor from 1 to ``floor`` over ``total`` steps."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def finetune(model: nn.Module, teacher: nn.Module, loader: Iterable, steps: int, lr: float, weights: LossWeights,
             distiller=None, discriminator: Optional[nn.Module] = None, gan_mode: str = "lsgan", device: str = "cpu",
             batch_fn: Optional[BatchFn] = None, progress: bool = True, callbacks: Iterable[Callable] = (),
             desc: str = "ganslim fine-tune", checkpoint: Optional[str] = None, checkpoint_every: int = 200,
             d_lr: float = 2e-4, average: float = 0.0, bn_batches: int = 0, memory_format: str = "auto",
             deadline=None, precision: str = "fp32") -> nn.Module:
    """Distillation fine-tune of a plain (already compressed) ``model`` in place: ``steps`` Adam steps
    at ``lr`` with cosine decay (to 5%); ``distiller``'s mapping layers train alongside; a
    ``discriminator`` trains at its own constant ``d_lr``. Returns ``model`` in eval mode.

    How it ends (:mod:`ganslim.core.averaging`): ``average`` > 0 keeps an exponential moving average
    of the model's state with a horizon of ``average * steps`` steps and loads it at the end;
    ``bn_batches`` > 0 then re-estimates the BatchNorm statistics from that many batches of
    ``loader`` (a cumulative average instead of the running one's last ~10 batches).
    ``memory_format``: ``"auto"`` (channels-last on CPU for a model with depthwise convs), ``"channels_last"`` or
    ``"contiguous"`` (:mod:`ganslim.core.memory_format`); the model leaves in the layout it came in.
    ``deadline``: a :class:`ganslim.core.budget.Deadline` that may change the number of steps while
    they run (the cosine decay and the average's horizon follow the new number).
    ``precision``: the convolutions' arithmetic, ``"fp32"`` or ``"bf16"`` (:mod:`ganslim.core.precision`:
    faster where the CPU has AMX, at a measured cost in fidelity); weights, norms and losses stay float32."""
    if steps > 0:
        groups = [{"params": list(model.parameters()), "lr": lr}]
        if distiller is not None:
            groups.append({"params": list(distiller.parameters()), "lr": lr})
        tr = DistillTrainer(model, teacher, groups, weights, distiller, discriminator, d_lr, gan_mode, device, batch_fn,
                            memory_format=memory_format, precision=precision)
        tr.total_steps = steps  # run() sets it too; a deadline may move it, and the decay follows
        sched = torch.optim.lr_scheduler.LambdaLR(tr.opt, lambda s: lr_cosine(s, tr.total_steps))
        tr.after_step.append(lambda _: sched.step())
        tr.schedulers.append(sched)
        if distiller is not None:
            tr.modules["distiller"] = distiller
        avg = None
        if average > 0:
            from .averaging import WeightAverage

            avg = WeightAverage(model, max(1.0, average * steps))
            tr.after_step.append(lambda _: avg.update())
            tr.modules["average"] = avg
        if deadline is not None:
            def refit(trainer: DistillTrainer) -> None:
                total = deadline(trainer.state.step, trainer.total_steps)
                if total != trainer.total_steps:
                    trainer.total_steps = total
                    if avg is not None:
                        avg.decay = 1.0 - 1.0 / max(1.0, average * total)

            tr.after_step.append(refit)
        tr.run(loader, steps, desc=desc, progress=progress, callbacks=callbacks, checkpoint=checkpoint,
               checkpoint_every=checkpoint_every)
        if avg is not None:
            avg.copy_to()
        if bn_batches > 0:
            from .averaging import recalibrate_batchnorm

            pre = dist.presharded(loader)
            batches = [tuple(dist.shard(t, pre) for t in b) for b in input_batches(loader, bn_batches, batch_fn)]
            recalibrate_batchnorm(model, batches, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
