"""The trivial peer: the teacher's family made uniformly narrower. Every prunable channel group keeps
the same fraction of its channels (its leading ones), the largest fraction whose network meets the
MACs budget; optionally re-initialised, so the peer is "the same architecture at a smaller width,
trained from scratch" rather than a pruned teacher."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.gating import MacsModel
from ..core.targeting import Targets

__all__ = ["uniform_alive", "uniform_masks", "reinitialize"]


def uniform_alive(groups, ratio: float, multiple: int = 1, floor: int = 1) -> list[torch.Tensor]:
    """Keep-mask per channel group: its leading ``round(size * ratio)`` channels, at least ``floor``,
    rounded up to a ``multiple`` (never above the group's size)."""
    out = []
    for g in groups:
        k = max(min(floor, g.size), int(round(g.size * ratio)))
        if multiple > 1:
            k = min(g.size, -(-k // multiple) * multiple)
        out.append(torch.arange(g.size) < k)
    return out


def uniform_masks(targets: Targets, macs_model: MacsModel, target_macs: float, multiple: int = 1) -> tuple[list, float]:
    """``(keep-masks, ratio)``: each group keeps its leading ``ratio`` of channels
    (:func:`uniform_alive`), the largest ratio whose MACs (``macs_model``, absolute) are at most
    ``target_macs``. Every group keeps at least two channels (as the other strategies do) unless
    only one meets the budget."""
    floor = 2 if macs_model.macs(uniform_alive(targets.groups, 0.0, multiple, 2)) <= target_macs else 1

    def masks(ratio: float) -> list[torch.Tensor]:
        return uniform_alive(targets.groups, ratio, multiple, floor)

    lo, hi = 0.0, 1.0
    if macs_model.macs(masks(hi)) <= target_macs:
        return masks(hi), hi
    for _ in range(40):  # bisection on the common width ratio; MACs are monotone in it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs_model.macs(masks(mid)) <= target_macs else (lo, mid)
    return masks(lo), lo


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every layer's own ``reset_parameters`` (PyTorch's default init), in place, from ``seed``; norm
    running statistics are reset too. Layers without one keep their values."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in model.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    finally:
        torch.random.set_rng_state(gen_state)
    return model
