"""How a fine-tune ends: an exponential moving average of the student's weights, and BatchNorm
statistics re-estimated from many batches.

Why: after a fine-tune the last step's weights carry the last steps' gradient noise, and a BatchNorm's
running statistics (momentum 0.1) are dominated by its last ~10 batches (80 crops at batch 8): on one
held-out photo two runs that differ only in their seeds ended 0.45 dB apart at 1/10
(``benchmarks/bench_seeds.py``). Averaging the weights over the last few percent of the steps and
taking the statistics as a cumulative average over many batches removes both sources.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .._utils import set_training
from . import distributed as dist

__all__ = ["WeightAverage", "recalibrate_batchnorm", "tracked_batchnorms", "cumulative_batchnorm_statistics"]


class WeightAverage:
    """Exponential moving average of ``model``'s state (parameters and floating-point buffers, e.g.
    BatchNorm statistics; integer buffers are copied), ``decay = 1 - 1 / horizon_steps``: a state
    ``horizon_steps`` updates old weighs ``1/e`` of the newest one.

    Call :meth:`update` after each optimizer step, :meth:`copy_to` to load the average into the model.
    ``state_dict``/``load_state_dict`` make it resumable (a training checkpoint carries it). The
    average starts from the model's state at construction."""

    def __init__(self, model: nn.Module, horizon_steps: float):
        if horizon_steps < 1:
            raise ValueError(f"horizon_steps must be >= 1 (1: no averaging), got {horizon_steps}")
        self.model = model
        self.decay = 1.0 - 1.0 / float(horizon_steps)
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def _pairs(self):
        state = self.model.state_dict()
        if state.keys() != self.average.keys():
            raise ValueError("the model's state changed keys since the average was started")
        return [(self.average[k], v.detach()) for k, v in state.items()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average ``1 - decay`` of the way to the model's current state."""
        floats, others = [], []
        for a, v in self._pairs():
            (floats if a.is_floating_point() else others).append((a, v))
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [v for _, v in floats], 1.0 - self.decay)
        for a, v in others:
            a.copy_(v)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: Optional[nn.Module] = None) -> None:
        """Load the average into ``model`` (default: the averaged model itself)."""
        (model or self.model).load_state_dict(self.average)

    def state_dict(self) -> dict:
        return {"average": self.average, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if state["average"].keys() != self.average.keys():
            raise ValueError("the saved weight average belongs to another model")
        with torch.no_grad():
            for k, v in state["average"].items():
                self.average[k].copy_(v)
        self.updates = int(state["updates"])


def tracked_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def cumulative_batchnorm_statistics(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Inside: the statistics of every tracked BatchNorm of ``model`` reset and accumulated as a
    cumulative average (momentum None) by the forwards run there, ``model`` in train mode; yields those
    BatchNorms. After: their momenta and the model's train/eval flag restored, the statistics kept."""
    bns = tracked_batchnorms(model)
    momenta = [m.momentum for m in bns]
    was_training = model.training
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        set_training(model, True)
        yield bns
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        set_training(model, was_training)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                          device: "str | torch.device" = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` as a cumulative average
    over ``batches`` (tuples of generator inputs, ``(B, C, H, W)`` each), in train mode without
    gradients; the rest of the state is untouched and the train/eval flag is restored. Under torchrun
    each rank estimates from the batches it is given, then the ranks' estimates are averaged, so all
    ranks end with the same statistics. Returns the number of BatchNorm layers re-estimated (0 for a
    network without BatchNorm, e.g. instance norm: nothing runs)."""
    if not tracked_batchnorms(model):
        return 0
    batches = list(batches)
    if not batches:
        raise ValueError("recalibrate_batchnorm got no batches")
    with cumulative_batchnorm_statistics(model) as bns:
        for inputs in batches:
            model(*(t.to(device) for t in inputs))
    dist.average_tensors([buf for m in bns for buf in (m.running_mean, m.running_var)])
    return len(bns)
