"""Feature distillation (GAN Compression): forward hooks on named student/teacher layers and learned
1x1 conv mappings from student width to teacher width.

``L_distill = sum_t mean((map_t(S_t(x)) - T_t(x))^2) / var(T_t(x))`` over chosen layer pairs ``t``. Hooks come off
with :meth:`FeatureDistiller.remove`, or at the end of a ``with`` block (both classes here are context
managers); the user's classes are never modified.

``kind="gka"``: CAT's global kernel alignment instead, ``L = sum_t 1 - KA(S_t, T_t)`` with
:func:`kernel_alignment` over every pixel of the batch: no mapping layers, any widths, invariant to
channel permutation and to scaling of either side.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .targeting import as_input_tuple


class FeatureRecorder:
    """Records the outputs of named modules during forward passes (``.features[name]``)."""

    def __init__(self, model: nn.Module, names: list[str], detach: bool = False):
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        mods = [(name, model.get_submodule(name)) for name in names]  # a wrong name fails before any hook is on
        for name, mod in mods:

            def hook(m, inp, out, name=name):
                t = out[0] if isinstance(out, (tuple, list)) else out
                self.features[name] = t.detach() if detach else t

            self._handles.append(mod.register_forward_hook(hook))

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        """Take the hooks off (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FeatureRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _candidate_points(model: nn.Module, inputs: tuple) -> list[tuple[str, tuple[int, ...], bool]]:
    """Modules in order of forward completion with a 4-D output that is a new tensor:
    ``(name, output shape, is_container)``. The final output and the input are excluded."""
    seen: dict[int, int] = {}
    order: list[tuple[str, torch.Tensor, bool]] = []
    handles = []
    for name, m in model.named_modules():
        if name == "":
            continue

        def hook(mod, inp, out, name=name, container=len(list(m.children())) > 0):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                order.append((name, out, container))

        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            final = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    final_ids = {id(final)} if isinstance(final, torch.Tensor) else set()
    input_ids = {id(t) for t in inputs}
    out = []
    for name, t, container in order:
        if id(t) in final_ids or id(t) in input_ids or id(t) in seen:
            continue  # a Sequential's output is its last child's tensor: keep the innermost (first) one
        seen[id(t)] = 1
        out.append((name, tuple(t.shape), container))
    return out


def auto_distill_points(model: nn.Module, example_inputs, k: int = 4) -> list[str]:
    """Choose ``k`` distillation layers for an unknown network.

    Takes the spatial size that carries the most feature channels x layers (usually the bottleneck),
    prefers block outputs (container modules whose output is a new tensor, e.g. residual blocks),
    then activations, and returns ``k`` evenly spaced names in forward order.
    """
    inputs = as_input_tuple(example_inputs)
    was = model.training
    model.eval()
    try:
        cands = _candidate_points(model, inputs)
    finally:
        model.train(was)
    if not cands:
        return []
    weight: dict[tuple[int, int], int] = {}
    for _, shape, _ in cands:
        weight[shape[2:]] = weight.get(shape[2:], 0) + shape[1]
    best = max(weight, key=weight.get)
    at_size = [(n, s, c) for n, s, c in cands if s[2:] == best]
    blocks = [n for n, _, c in at_size if c]
    acts = [n for n, _, c in at_size if isinstance(model.get_submodule(n), (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU))]
    pool = blocks if len(blocks) >= k else acts if len(acts) >= k else [n for n, _, _ in at_size]
    if len(pool) <= k:
        return pool
    idx = torch.linspace(0, len(pool) - 1, k + 1)[1:].round().long().tolist()  # skip the very first
    return [pool[i] for i in dict.fromkeys(idx)]


def kernel_alignment(fs: torch.Tensor, ft: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Linear kernel alignment (CKA when ``center``) between two feature maps of the same batch and
    spatial size, ``(N, C_s, H, W)`` and ``(N, C_t, H, W)``: every pixel of every image is a sample,
    ``X`` is ``(N*H*W, C_s)``, ``Y`` is ``(N*H*W, C_t)``, and
    ``KA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` in [0, 1] (1: the same up to an orthogonal map
    and a scale). Costs ``C_s x C_t`` Gram products, never ``(NHW)^2``."""
    x = fs.transpose(0, 1).reshape(fs.shape[1], -1).T.float()
    y = ft.transpose(0, 1).reshape(ft.shape[1], -1).T.float()
    if center:
        x = x - x.mean(0, keepdim=True)
        y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    return cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-12)


class FeatureDistiller(nn.Module):
    """Distillation between ``mapping = {student_layer: teacher_layer}``.

    Holds the 1x1 conv mapping layers (``maps``, trained with the student) and the hooks on both
    networks. Call ``loss()`` after a forward pass of both student and teacher.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, mapping: Mapping[str, str], example_inputs,
                 kind: str = "mse"):
        super().__init__()
        if kind not in ("mse", "gka"):
            raise ValueError(f"distillation loss must be 'mse' or 'gka', got {kind!r}")
        self.kind = kind
        self.mapping = dict(mapping)
        inputs = as_input_tuple(example_inputs)
        self.student_rec = FeatureRecorder(student, list(self.mapping))
        self.teacher_rec = FeatureRecorder(teacher, [])  # replaced below; remove() works whatever happens next
        try:
            self.teacher_rec = FeatureRecorder(teacher, list(self.mapping.values()), detach=True)
            self._init_maps(student, teacher, inputs, kind)
        except BaseException:  # a failed construction leaves no hook behind
            self.remove()
            raise

    def _init_maps(self, student: nn.Module, teacher: nn.Module, inputs: tuple, kind: str) -> None:
        """One forward of both networks (eval mode, restored after) and the identity-started 1x1 maps."""
        was_s, was_t = student.training, teacher.training
        student.eval()
        teacher.eval()
        try:
            with torch.no_grad():
                student(*inputs)
                teacher(*inputs)
        finally:
            student.train(was_s)
            teacher.train(was_t)
        self.maps = nn.ModuleDict()
        for s_name, t_name in self.mapping.items():
            fs = self.student_rec.features.get(s_name)
            ft = self.teacher_rec.features.get(t_name)
            if fs is None or ft is None:
                raise ValueError(f"distillation layer {s_name if fs is None else t_name!r} produced no tensor in a forward pass")
            if fs.shape[2:] != ft.shape[2:]:
                raise ValueError(f"distillation pair {s_name!r} -> {t_name!r}: spatial sizes differ "
                                 f"({tuple(fs.shape[2:])} vs {tuple(ft.shape[2:])})")
            if kind == "gka":
                continue  # width-independent: no mapping layer
            conv = nn.Conv2d(fs.shape[1], ft.shape[1], 1)
            with torch.no_grad():  # identity when widths match (student copied from teacher)
                conv.weight.zero_()
                conv.bias.zero_()
                n = min(fs.shape[1], ft.shape[1])
                conv.weight[:n, :n, 0, 0] = torch.eye(n)
            self.maps[_key(s_name)] = conv
        self.student_rec.clear()
        self.teacher_rec.clear()

    @torch.no_grad()
    def fit_maps(self) -> None:
        """Least-squares refit of each mapping from the features of the last forward pass (used after
        channels were removed so the maps start aligned). ``W = T S^T (S S^T + eps I)^-1``."""
        if self.kind == "gka":
            return
        for s_name, t_name in self.mapping.items():
            fs, ft = self.student_rec.features[s_name], self.teacher_rec.features[t_name]
            s = fs.detach().transpose(0, 1).reshape(fs.shape[1], -1)
            t = ft.detach().transpose(0, 1).reshape(ft.shape[1], -1)
            s1 = torch.cat([s, torch.ones(1, s.shape[1])], 0)
            a = s1 @ s1.T + 1e-3 * torch.eye(s1.shape[0])
            w = torch.linalg.solve(a, s1 @ t.T).T  # (Ct, Cs+1)
            conv = nn.Conv2d(fs.shape[1], ft.shape[1], 1)
            conv.weight.copy_(w[:, :-1, None, None])
            conv.bias.copy_(w[:, -1])
            self.maps[_key(s_name)] = conv

    def loss(self) -> torch.Tensor:
        """Sum over layer pairs of the MSE between mapped student and teacher features, divided by the
        teacher feature's variance (so every pair weighs about the same whatever its magnitude:
        residual trunks grow large, and unnormalised they drown the output losses)."""
        total = 0.0
        for s_name, t_name in self.mapping.items():
            # float32 whatever the forward's arithmetic (bf16 autocast records bf16 features)
            fs = self.student_rec.features[s_name].float()
            ft = self.teacher_rec.features[t_name].float()
            if self.kind == "gka":
                total = total + (1.0 - kernel_alignment(fs, ft))
            else:
                total = total + F.mse_loss(self.maps[_key(s_name)](fs), ft) / _variance(ft).clamp_min(1e-6)
        self.student_rec.clear()
        self.teacher_rec.clear()
        return total

    def remove(self) -> None:
        """Take the hooks off both networks (idempotent)."""
        self.student_rec.remove()
        self.teacher_rec.remove()

    def __enter__(self) -> "FeatureDistiller":
        """``with FeatureDistiller(...) as d:`` (or ``ExitStack.enter_context``): the hooks come off
        however the block ends."""
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def _variance(t: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of every element of ``t``; under torchrun over the *global* batch (sums
    all-reduced), so the loss's normaliser and hence the gradients match a one-process run."""
    from . import distributed as dist

    if not dist.is_distributed():
        return t.var()
    t = t.detach().double()
    stats = torch.stack([t.sum(), (t * t).sum(), torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)])
    stats = stats.to(dist.collective_device(stats.device))  # nccl rejects CPU tensors
    torch.distributed.all_reduce(stats)
    s, ss, n = stats.tolist()
    return torch.tensor((ss - s * s / n) / max(n - 1.0, 1.0), dtype=t.dtype if t.is_floating_point() else torch.float32,
                        device=t.device).float()


def _key(name: str) -> str:
    return name.replace(".", "__") or "__root__"
