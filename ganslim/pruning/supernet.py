"""Supernet training (once-for-all, sandwich rule) and supernet checkpoints.

:func:`train_supernet` distils the teacher into a width-sliceable :class:`~ganslim.pruning.slicing.Supernet`
with weight sharing: every step accumulates the gradients of the largest sub-network, the
smallest, and ``random_subnets`` uniformly random ones (the sandwich rule of once-for-all networks,
as GAN Compression trains its "once-for-all" generator), then takes one optimizer step. The losses
are the output-level distillation losses of :mod:`ganslim.core.train` (L1 to the teacher, L1 + MSE to
the ground truth), so batches that carry ``"teacher_output"`` never run the teacher.

Training is resumable: with ``checkpoint=PATH`` the supernet weights, optimizer and scheduler
state, step, and random states are written atomically every ``save_every`` steps; a new call with
the same path continues from there (the loader is fast-forwarded to the same batch).

:func:`save_supernet` / :func:`load_supernet`: one ``.safetensors`` file (a ganslim checkpoint of the
ordered full-width network, reloadable without its class) whose metadata records the channel
groups and their candidate widths; ``ganslim search`` reads it.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..core import distributed as dist
from ..core import memory_format as layout
from ..core.precision import autocast, check_train_precision
from .slicing import SliceConfig, Supernet, make_supernet
from ..core.train import (LossWeights, NonFiniteLossError, _finite_everywhere, atomic_torch_save, cached_teacher_output, cycle,
                    first_output, lr_cosine, output_losses, split_batch)

__all__ = ["SupernetConfig", "train_supernet", "save_supernet", "load_supernet"]


@dataclass
class SupernetConfig:
    """Supernet training. ``steps`` optimizer steps; each accumulates the largest, the smallest and
    ``random_subnets`` random sub-networks. Learning rate with cosine decay to 5%."""

    steps: int = 2000
    lr: float = 1e-3
    random_subnets: int = 2
    seed: int = 0
    save_every: int = 200  # steps between resumable checkpoints (when a checkpoint path is given)
    recon_weight: float = 2.0
    gt_weight: float = 10.0
    mse_weight: float = 50.0

    def validate(self) -> "SupernetConfig":
        if self.steps < 0 or self.random_subnets < 0 or self.save_every < 1:
            raise ValueError("steps and random_subnets must be >= 0, save_every >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        return self


def train_supernet(supernet: Supernet, teacher: nn.Module, loader: Iterable, config: Optional[SupernetConfig] = None,
                   batch_fn: Optional[Callable] = None, device: str = "cpu", progress: bool = True,
                   checkpoint: Optional[str | os.PathLike] = None, callbacks: Iterable[Callable] = (),
                   memory_format: str = "auto", precision: str = "fp32") -> dict:
    """Train ``supernet`` in place by distillation from ``teacher`` (sandwich rule, weight sharing).

    Args:
        loader: batches as for :func:`ganslim.compress` (``batch_fn`` maps anything else).
        checkpoint: resumable state file; an existing one is resumed (its step, optimizer, RNG).
        callbacks: ``fn(step, losses)`` after each optimizer step.
        memory_format: ``"auto"`` (channels-last on CPU for a network with depthwise convs),
            ``"channels_last"`` or ``"contiguous"`` (:mod:`ganslim.core.memory_format`).
        precision: the convolutions' arithmetic, ``"fp32"`` or ``"bf16"`` (weights, optimizer, norms and
            losses stay float32; :mod:`ganslim.core.precision`).
    Returns:
        ``{"steps", "seconds", "losses" (last step, summed over sub-networks), "resumed_from"}``.
    """
    cfg = (config or SupernetConfig()).validate()
    check_train_precision(precision)
    dev = torch.device(device)
    supernet.to(dev)
    teacher.to(dev).eval()
    weights = LossWeights(cfg.recon_weight, cfg.gt_weight, 0.0, 0.0, cfg.mse_weight)
    opt = torch.optim.Adam(supernet.model.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_cosine(s, cfg.steps))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    start = 0
    ckpt = pathlib.Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        try:
            state = torch.load(ckpt, map_location=dev, weights_only=False)
            supernet.model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except Exception as e:
            raise ValueError(f"{ckpt}: cannot resume supernet training from it ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); delete it to start afresh") from None
        start = int(state["step"])
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
    from tqdm.auto import tqdm

    pre = dist.presharded(loader)
    it = cycle(loader)
    for _ in range(start):  # same data position as the interrupted run
        next(it)
    channels_last = layout.resolve_memory_format(memory_format, dev, supernet.model)
    if channels_last:  # peeked, not drawn from a new iterator: the data order and RNG stay as without it
        first = next(it)
        it = itertools.chain([first], it)
        probe = tuple(t.to(dev) for t in split_batch(first, batch_fn)[0])
        channels_last = layout.runs_channels_last({"supernet": supernet.model}, probe)
    # the teacher too: the full-width sub-network starts as its copy, and the same kernels keep the L1
    # to its output at exactly zero there (other kernels would make its subgradient rounding noise)
    with layout.channels_last(supernet.model, teacher) if channels_last else contextlib.nullcontext():
        supernet.model.train()
        t0 = time.time()
        losses: dict = {}
        bar = tqdm(range(start, cfg.steps), desc="ganslim supernet", disable=not progress or not dist.is_main(), dynamic_ncols=True,
                   mininterval=2.0, initial=start, total=cfg.steps)
        for step in bar:
            batch = next(it)
            inputs, target = split_batch(batch, batch_fn)
            inputs = tuple(dist.shard(t, pre).to(dev) for t in inputs)  # this rank's rows under torchrun
            if channels_last:
                inputs = layout.to_channels_last(inputs)
            target = dist.shard(target, pre).to(dev) if target is not None else None
            t_out = dist.shard(cached_teacher_output(batch), pre)
            if t_out is None:
                with torch.no_grad(), autocast(precision, dev, (teacher,)):
                    t_out = first_output(teacher(*inputs))
            t_out = t_out.to(dev).float()
            configs = [supernet.largest(), supernet.smallest()] + [supernet.sample(rng) for _ in range(cfg.random_subnets)]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            losses = {}
            for widths in configs:
                supernet.set_widths(widths)
                with autocast(precision, dev, (supernet.model,)):
                    s_out = first_output(supernet.model(*inputs))
                out = output_losses(s_out.float(), t_out, target, weights)
                loss = sum(out.values())
                if not _finite_everywhere(loss):
                    raise NonFiniteLossError(f"non-finite supernet loss at step {step} ({float(loss):.4g}); lower the "
                                             "learning rate or check the inputs for NaN/inf")
                loss.backward()
                total += float(loss.detach())
                for k, v in out.items():
                    losses[k] = losses.get(k, 0.0) + float(v.detach())
            dist.average_gradients(supernet.model.parameters())
            opt.step()
            sched.step()
            losses["total"] = total
            for cb in callbacks:
                cb(step + 1, losses)
            if progress and step % 5 == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            if ckpt is not None and dist.is_main() and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
                atomic_torch_save({"model": supernet.model.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "step": step + 1, "python_rng": rng.getstate(),
                                    "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, ckpt)
        bar.close()
    supernet.set_widths(supernet.largest())  # leave the full network active (each step sets its own widths)
    supernet.model.eval()
    return {"steps": cfg.steps, "seconds": time.time() - t0, "losses": losses, "resumed_from": start}


def save_supernet(supernet: Supernet, path: str | os.PathLike, metadata: Optional[dict] = None) -> pathlib.Path:
    """Write ``supernet`` (ordered full-width weights + architecture + channel groups and candidate
    widths) to ``path`` (.safetensors, atomic). Reload with :func:`load_supernet`."""
    from ..deployment.checkpoint import save

    meta = dict(metadata or {})
    meta["supernet"] = supernet.describe()
    return save(supernet.plain_copy(), path, metadata=meta)


def load_supernet(path: str | os.PathLike, model: Optional[nn.Module] = None) -> Supernet:
    """Load a supernet written by :func:`save_supernet` (no original class needed; ``model=`` loads
    the weights into your own instance instead). Its channel groups are traced again and checked
    against the recorded ones."""
    from ..deployment.checkpoint import CheckpointError, load, read_metadata

    meta = (read_metadata(path).get("metadata") or {}).get("supernet")
    if not meta:
        raise CheckpointError(f"{path}: not a ganslim supernet (no 'supernet' metadata); write one with "
                              "ganslim compress --strategy ofa or ganslim.supernet.save_supernet")
    net = load(path, model=model)
    example = tuple(torch.zeros(*shape) for shape in meta["input_shapes"])
    cfg = SliceConfig(ratios=tuple(meta["ratios"]), multiple=int(meta["multiple"]),
                      min_channels=int(meta.get("min_channels", 1)))
    sn = make_supernet(net, example, cfg, copy_model=False, reorder=False)
    recorded = {g["root"]: g["size"] for g in meta["groups"]}
    found = {g.root: g.size for g in sn.groups}
    if recorded != found:
        raise CheckpointError(f"{path}: the channel groups traced now {sorted(found.items())[:3]}... differ from the "
                              f"recorded ones {sorted(recorded.items())[:3]}...")
    for g in meta["groups"]:
        sn.choices[g["root"]] = [int(c) for c in g["choices"]]
    sn.set_widths(sn.largest())
    return sn

