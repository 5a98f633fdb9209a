"""GAN Slimming's controller: the one place that drives gates to a MACs target.

Used by :func:`ganslim.compress` (``strategy="slim"``) and by :class:`ganslim.adapters.SlimSession`
(inside a host's own training loop), in Torch-Pruning's style: the training loop owns the optimizer
and calls, once per optimizer step,

    ctl.regularize()      # L1 proximal step on the gates (after the optimizer step)
    ctl.step(k)           # progressive pruning: switch channels off so the MACs follow the schedule

and once at the end ``ctl.finalize()`` (a global threshold meets the target exactly; the masks are
final) before ``ctl.export(...)`` folds the gates and removes the dead channels physically.

Schedule (gradual magnitude pruning, cubic): every ``prune_every`` steps between ``prune_start`` and
``target_reach`` (fractions of ``steps``) the channels with the smallest gate x priority are switched
off so that the MACs follow ``target + (total - target) * (1 - t)^3``, reaching the target at
``target_reach``; the L1 proximal step keeps separating important from unimportant channels meanwhile.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

from .gating import GateSet, MacsModel, export_pruned, macs_schedule, threshold_for_target
from .targeting import Targets


@dataclass
class SlimSchedule:
    """When the gates prune: ``steps`` optimizer steps of gating; the first channel goes off after
    ``prune_start * steps``, the MACs reach the target at ``target_reach * steps``, a decision every
    ``prune_every`` steps. ``rho``: L1 strength (units of a group's mean gate per unit ``gate_lr``);
    ``channel_multiple``: final widths rounded up to a multiple."""

    steps: int
    gate_lr: float = 2e-3
    rho: float = 1.0
    prune_start: float = 0.1
    target_reach: float = 0.6
    prune_every: int = 10
    channel_multiple: int = 1

    @property
    def reach(self) -> int:
        return max(1, int(self.target_reach * self.steps))

    @property
    def start(self) -> int:
        return min(int(self.prune_start * self.steps), self.reach - 1)


class SlimController:
    """Gates on ``student`` (created here, ranked by gate x the student's channel importance) driven to
    ``target_macs`` (absolute MACs of ``macs_model``, or None: L1 only, no pruning schedule).

    The gates are attached as forward hooks by :meth:`attached` (a context manager: they come off
    however the block ends) or :meth:`attach` / :meth:`detach`."""

    def __init__(self, student: nn.Module, targets: Targets, macs_model: MacsModel, target_macs: float | None,
                 schedule: SlimSchedule):
        self.student, self.targets, self.macs_model = student, targets, macs_model
        self.target_macs = target_macs
        self.schedule = schedule
        self.gates = GateSet.for_model(student, targets)
        self.final = False

    # ----------------------------------------------------------------- hooks (one owner)
    def attach(self) -> "SlimController":
        self.gates.attach(self.student)
        return self

    def detach(self) -> None:
        self.gates.detach()

    @contextlib.contextmanager
    def attached(self) -> Iterator["SlimController"]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    # ----------------------------------------------------------------- per step
    def regularize(self) -> None:
        """L1 proximal step on the gates (call after the optimizer step that updated them)."""
        self.gates.prox_step(self.schedule.gate_lr, self.schedule.rho)

    def step(self, k: int) -> None:
        """Progressive pruning at optimizer step ``k`` (1-based): on a decision step, switch channels off
        so the MACs meet the cubic schedule's allowance."""
        s = self.schedule
        if self.final or self.target_macs is None:
            return
        if s.start < k <= s.reach and (k % s.prune_every == 0 or k == s.reach):
            goal = macs_schedule(k, s.start, s.reach, self.macs_model.total, self.target_macs)
            _, alive = threshold_for_target(self.gates, self.macs_model, goal)
            self.gates.set_masks(alive, final=False)

    def finalize(self) -> None:
        """A global threshold meets the target exactly (widths rounded to ``channel_multiple``); the
        masks are final from now on."""
        if self.target_macs is not None:
            _, alive = threshold_for_target(self.gates, self.macs_model, self.target_macs,
                                            multiple=self.schedule.channel_multiple)
            self.gates.set_masks(alive)
        self.final = True

    # ----------------------------------------------------------------- status / export
    def macs(self) -> float:
        """MACs (papers' convention, at the MACs model's input) of the network the current masks leave."""
        return self.macs_model.macs(self.gates.alive())

    def export(self, example_inputs, tol: float = 1e-4) -> tuple[nn.Module, dict]:
        """A plain, physically smaller copy of the student (gates folded, dead channels removed, output
        checked equal to the gated student; see :func:`ganslim.core.gating.export_pruned`). The student must
        carry no other hooks that a copy would take along."""
        return export_pruned(self.student, self.gates, example_inputs, tol=tol)

    def to(self, device) -> "SlimController":
        self.gates.to(device)
        return self
