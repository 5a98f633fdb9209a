"""GAN Slimming inside someone else's training loop.

:class:`SlimSession` holds what :func:`ganslim.compress` builds internally (channel groups, gates,
feature distillation, the MACs schedule) but lets the *host* own the loop: its data, its optimizer
for the generator, its discriminator and GAN loss. Per iteration the host adds two calls::

    session = SlimSession(student, teacher, example_inputs, target_macs=0.1, steps=total_iters)
    for batch in host_loader:                      # the host's own loop
        fake = student(x)                          # gated student (hooks attached by the session)
        loss_G = host_gan_loss(fake) + sum(session.losses(fake, x).values())
        opt_G.zero_grad(); loss_G.backward(); opt_G.step()
        session.step()                             # gates: optimizer + L1 proximal step + MACs schedule
    slim = session.save("slim.safetensors")        # plain, physically smaller network (ganslim.save)

During the first ``steps`` iterations the L1 proximal step pushes gates to zero and the channels
with the smallest gates are switched off on a cubic schedule so the MACs reach ``target_macs`` at
``target_reach * steps``; at ``steps`` a global threshold meets the target exactly and the masks are
final. Training may go on afterwards (fine-tuning the masked network); :meth:`export` folds the
gates and removes the dead channels at any time.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import measure
from .._utils import as_input_tuple, first_output
from ..core.distill import FeatureDistiller, FeatureRecorder, auto_distill_points
from ..core.gating import MacsModel, gated_macs_by_module
from ..core.slimming import SlimController, SlimSchedule
from ..core.targeting import find_channel_groups
from .errors import AdapterError


class SlimSession:
    """Gates + distillation + MACs schedule on ``student`` (modified in place: hooks only, its class and
    parameters are untouched until :meth:`export`, which works on a copy).

    Args:
        student: the generator the host trains (usually a copy of the teacher).
        teacher: the trained generator; frozen, eval mode.
        example_inputs: one input batch (tensor or tuple) at the training resolution.
        target_macs: fraction of the teacher's MACs (0.1 = 10x fewer) or absolute MACs when > 1.
        steps: iterations of the gating phase (the host's iterations, or fewer); the masks are final after it.
        recon_weight: L1 between student and teacher outputs (the teacher's output is a pseudo target).
        distill_weight: variance-normalised feature MSE through 1x1 mappings (GAN Compression).
        distill_layers: ``{student_layer: teacher_layer}`` or names (same on both); None: automatic.
        gate_lr / lr: learning rates of the gates and of the mapping layers (own Adam, so the host's
            optimizer stays as it is).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, example_inputs: Any, *, target_macs: float = 0.1,
                 steps: int = 1000, recon_weight: float = 1.0, distill_weight: float = 1.0,
                 distill_layers: Optional[Mapping[str, str] | Sequence[str]] = None, n_distill_layers: int = 4,
                 gate_lr: float = 2e-3, lr: float = 2e-4, rho: float = 1.0, prune_start: float = 0.1,
                 target_reach: float = 0.6, prune_every: int = 10, channel_multiple: int = 1,
                 include: Optional[Sequence] = None, exclude: Sequence = ()):
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise AdapterError("student and teacher must be torch.nn.Module instances")
        if student is teacher:
            raise AdapterError("the student must be a separate network: pass copy.deepcopy(teacher) as the student")
        if target_macs is None or not target_macs > 0:
            raise AdapterError(f"target_macs must be > 0 (a fraction of the teacher's MACs, e.g. 0.1), got {target_macs}")
        if steps < 1:
            raise AdapterError(f"steps (iterations of the gating phase) must be >= 1, got {steps}")
        self.student, self.teacher = student, teacher
        self.steps = int(steps)
        self.recon_weight, self.distill_weight = float(recon_weight), float(distill_weight)
        self.device = next(iter(student.parameters())).device
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        example = tuple(t[:1].to(self.device) for t in as_input_tuple(example_inputs))
        self.example = example
        was = student.training
        student.eval()
        with torch.no_grad():
            s_out, t_out = first_output(student(*example)), first_output(teacher(*example))
        student.train(was)
        if s_out.shape != t_out.shape:
            raise AdapterError(f"student output {tuple(s_out.shape)} differs from teacher output {tuple(t_out.shape)}: "
                               "build the student with the teacher's generator flags")

        self.targets = find_channel_groups(student, example, include=include, exclude=exclude)
        self.macs_model = MacsModel(student, self.targets, gated_macs_by_module(student, self.targets, example))
        self.teacher_macs = float(measure.count_macs(teacher, example, "papers"))
        self.target_abs = target_macs * self.teacher_macs if target_macs <= 1 else float(target_macs)
        floor = self.macs_model.macs([F.one_hot(torch.tensor(0), g.size).bool() for g in self.targets.groups])
        if self.target_abs < floor:
            raise AdapterError(f"impossible target_macs {target_macs}: keeping one channel per prunable group already "
                               f"costs {floor / self.teacher_macs:.3%} of the teacher; raise target_macs")

        if distill_weight and distill_layers is None:
            pts = auto_distill_points(student, example, n_distill_layers)
            distill_layers = {n: n for n in pts}
        elif distill_layers is not None and not isinstance(distill_layers, Mapping):
            distill_layers = {n: n for n in distill_layers}
        self.mapping = dict(distill_layers or {})
        self.distiller = FeatureDistiller(student, teacher, self.mapping, example).to(self.device) \
            if self.mapping and distill_weight else None
        # the same controller as compress(strategy="slim"): gates, L1 proximal step, MACs schedule
        self.controller = SlimController(student, self.targets, self.macs_model, self.target_abs,
                                         SlimSchedule(self.steps, float(gate_lr), float(rho), prune_start, target_reach,
                                                      int(prune_every), int(channel_multiple)))
        self.gates = self.controller.to(self.device).attach().gates
        groups = [{"params": list(self.gates.parameters()), "lr": gate_lr}]
        if self.distiller is not None:
            groups.append({"params": list(self.distiller.parameters()), "lr": lr})
        self.opt = torch.optim.Adam(groups, betas=(0.5, 0.999))
        self.iteration = 0
        self.last_teacher_output: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- per iteration
    @torch.no_grad()
    def teacher_output(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's output on ``inputs`` (also records its features for distillation)."""
        self.last_teacher_output = first_output(self.teacher(*inputs))
        return self.last_teacher_output

    def losses(self, student_output: torch.Tensor, *inputs: torch.Tensor,
               teacher_output: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Weighted distillation losses for the generator, to add to the host's own loss:
        ``recon`` (L1 to the teacher's output) and ``distill`` (features). Call right after the
        student's forward on ``inputs``; the teacher runs here unless ``teacher_output`` is given
        (then its features must come from a teacher forward on the same inputs)."""
        s_out = first_output(student_output)
        if teacher_output is None:
            if not inputs:
                raise AdapterError("losses() needs the generator inputs (or teacher_output=) to run the teacher")
            teacher_output = self.teacher_output(*inputs)
        if teacher_output.shape != s_out.shape:
            raise AdapterError(f"student output {tuple(s_out.shape)} and teacher output {tuple(teacher_output.shape)} differ")
        out: dict[str, torch.Tensor] = {}
        if self.recon_weight:
            out["recon"] = self.recon_weight * F.l1_loss(s_out, teacher_output)
        if self.distiller is not None:
            missing = [n for n in self.mapping if n not in self.distiller.student_rec.features]
            if missing:
                raise AdapterError(f"no student features for {missing[0]!r}: call losses() right after the student's "
                                   "forward pass on the same inputs")
            out["distill"] = self.distill_weight * self.distiller.loss()
        return out

    def step(self) -> None:
        """After the host's optimizer step: update gates and mappings, L1 proximal step, MACs schedule."""
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.iteration += 1
        k = self.iteration
        if self.final:
            self.gates.apply_masks()
            return
        self.controller.regularize()
        self.controller.step(k)
        if k >= self.steps:
            self.finalize()

    def finalize(self) -> None:
        """Fix the masks at the target now (a global threshold on the gates); training may continue."""
        self.controller.finalize()

    # ----------------------------------------------------------------- status
    @property
    def final(self) -> bool:
        """Whether the masks are final (the gating phase ended or :meth:`finalize` was called)."""
        return self.controller.final

    @property
    def macs_fraction(self) -> float:
        """MACs of the network the current masks would leave, as a fraction of the teacher's."""
        return self.macs_model.macs(self.gates.alive()) / self.teacher_macs

    def status(self) -> dict:
        return {"iteration": self.iteration, "macs_fraction": self.macs_fraction, "final": self.final,
                "sparsity": self.gates.sparsity()}

    # ----------------------------------------------------------------- export
    def export(self, finalize: bool = True) -> nn.Module:
        """A plain, physically smaller copy of the student (gates folded, dead channels removed, output
        checked equal to the gated student). ``finalize``: meet the target first if the gating phase has
        not ended yet (the session then stays final). The student keeps training with its hooks."""
        if finalize and not self.final:
            self.finalize()
        if self.distiller is not None:
            self.distiller.student_rec.remove()  # no hook may travel into the copy
        try:
            plain, info = self.controller.export(self.example)
        finally:
            self.controller.attach()
            if self.distiller is not None:
                self.distiller.student_rec = FeatureRecorder(self.student, list(self.mapping))
        plain.eval()
        self.last_export = info
        return plain

    def save(self, path: str | os.PathLike, metadata: Optional[dict] = None, finalize: bool = True) -> nn.Module:
        """:meth:`export` and write it with :func:`ganslim.save` (safetensors + architecture; reloads with
        :func:`ganslim.load` without any class). Returns the exported network (on the CPU)."""
        from ..deployment.checkpoint import save

        plain = self.export(finalize=finalize).cpu()
        meta = {"ganslim_adapter": self.status(), "teacher_macs": self.teacher_macs,
                "example_shape": list(self.example[0].shape)}
        meta.update(metadata or {})
        save(plain, path, metadata=meta)
        return plain

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"gates": self.gates.state_dict(), "maps": self.distiller.state_dict() if self.distiller else {},
                "opt": self.opt.state_dict(), "iteration": self.iteration, "final": self.final}

    def load_state_dict(self, state: Mapping) -> None:
        self.gates.load_state_dict(state["gates"])
        if self.distiller is not None and state.get("maps"):
            self.distiller.load_state_dict(state["maps"])
        self.opt.load_state_dict(state["opt"])
        self.iteration, self.controller.final = int(state["iteration"]), bool(state["final"])
        self.gates._final = self.final

    def close(self) -> None:
        """Take every hook off the student and the teacher."""
        self.controller.detach()
        if self.distiller is not None:
            self.distiller.remove()


def student_from_teacher(teacher: nn.Module) -> nn.Module:
    """The usual student: a trainable deep copy of the teacher."""
    s = copy.deepcopy(teacher)
    for p in s.parameters():
        p.requires_grad_(True)
    return s
