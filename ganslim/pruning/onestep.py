"""One-step budgeted pruning (CAT, "Teachers Do More Than Teach"): one global threshold on channel
importance, found by bisection so the pruned network meets a MACs target, with no L1 schedule.

Importance of a channel is its normalization scale ``|gamma|`` where its group has an affine norm
(the scale a BatchNorm/InstanceNorm multiplies the channel by), else the L2 norm of the producing
filters (:func:`ganslim.pruning.slicing.group_importance`), or scores the caller gives (e.g. the gates of a
GAN Slimming run). Each group's scores are divided by their mean, so one threshold compares groups
fairly, as the gates of :mod:`ganslim.core.gating` are. The bisection is the gating module's
(:func:`~ganslim.core.gating.threshold_for_target`), so the result meets the target within one channel
(or one ``multiple``) of one group.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from ..core.gating import GateSet, MacsModel, prune_channels, threshold_for_target
from .slicing import group_importance
from ..core.targeting import Targets

__all__ = ["importance_scores", "onestep_masks", "onestep_prune", "most_important"]


def importance_scores(model: nn.Module, targets: Targets,
                      scores: Optional[Mapping[str, torch.Tensor]] = None) -> list[torch.Tensor]:
    """Per group, a non-negative score per channel with mean 1 (``scores`` overrides by group root)."""
    out = []
    for g in targets.groups:
        s = torch.as_tensor(scores[g.root]).detach().float().abs().cpu() if scores and g.root in scores \
            else group_importance(model, g)
        if s.numel() != g.size:
            raise ValueError(f"importance for {g.root} has {s.numel()} values, the group has {g.size} channels")
        s = s / s.mean().clamp_min(1e-12)
        # ties (e.g. norm scales still at their initial 1) would make the threshold drop whole groups at
        # once: break them by the filters' L2 norms, a thousandth of the weight
        f = group_importance(model, g, source="filters")
        out.append(s + 1e-3 * f / f.mean().clamp_min(1e-12))
    return out


def onestep_masks(model: nn.Module, targets: Targets, macs_model: MacsModel, target_macs: float, multiple: int = 1,
                  scores: Optional[Mapping[str, torch.Tensor]] = None) -> list[torch.Tensor]:
    """Boolean keep-mask per group: the channels above one global importance threshold, the threshold
    chosen by bisection so the network's MACs (``macs_model``) are at most ``target_macs`` (absolute)."""
    gates = GateSet(targets)
    with torch.no_grad():
        for g, s in zip(gates.gates, importance_scores(model, targets, scores)):
            g.copy_(s)
    _, alive = threshold_for_target(gates, macs_model, target_macs, multiple=multiple)
    return alive


def most_important(model: nn.Module, targets: Targets, alive: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keep-masks with as many channels per group as ``alive`` keeps, chosen by importance
    (:func:`importance_scores`: the largest norm scales) instead of by position; the MACs of a
    channel count do not depend on which channels they are."""
    out = []
    for s, a in zip(importance_scores(model, targets), alive):
        keep = torch.zeros_like(a, dtype=torch.bool)
        keep[torch.topk(s, int(a.sum())).indices] = True
        out.append(keep)
    return out


def onestep_prune(model: nn.Module, targets: Targets, alive: list[torch.Tensor], example_inputs: Any) -> nn.Module:
    """A physically pruned deep copy of ``model`` keeping the channels marked in ``alive``; the kept
    weights are the model's own (CAT then fine-tunes them by distillation)."""
    plain = copy.deepcopy(model)
    prune_channels(plain, targets.groups, alive, example_inputs)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain.eval()
