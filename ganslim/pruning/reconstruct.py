"""Least-squares reconstruction of a pruned or factorised student's convolutions from the teacher's
activations: the data-driven step of channel pruning (He et al., "Channel Pruning for Accelerating
Very Deep Neural Networks", 2017; ThiNet), applied once before the fine-tune.

A student cut from the teacher (``onestep``'s kept channels, ``separable``'s rank-1 factors) starts
with the teacher's weights on fewer inputs: each conv misses the removed channels' contributions and
the errors compound down the network. Here each of the student's convs, in forward order, gets the
weights that best reproduce the teacher's output of the same layer (its kept channels, before the
normalisation) from the input the student actually feeds it, earlier layers already reconstructed:

    W = argmin ||X W - Y||^2 + lambda ||W - W0||^2

``X``: what the layer's output is linear in (a conv's input patches, ``N*H*W x C_in*k*k``; for a
transposed conv its input spread by one-hot kernels), plus a column of ones for a bias, ``Y``: the
teacher's outputs at the kept channels, ``W0``: the student's current weights (the ridge pulls towards
them where the data say little). A conv without a bias whose output a per-channel normalisation takes
is fitted with an offset all the same, moved into the normalisation's running mean. One forward of
the teacher and two of the student (one finds the normalisations) on a batch or two; each layer is a
``D x D`` solve (``D = C_in*k*k``), a depthwise one a ``k*k`` solve per channel. Grouped convs other than
depthwise, and weights recomputed from others (spectral or weight norm), keep their weights.

Measured on the default task (``benchmarks/bench_peer.py``'s ``+reconstruct`` variants): a closer start
is not always a better fine-tune, so ``CompressConfig.reconstruct`` is opt-in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import as_input_tuple
from .slicing import _depthwise as _sliced_depthwise

__all__ = ["ConvTarget", "kept_channels", "conv_targets", "reconstruct_convs"]


@dataclass
class ConvTarget:
    """Student conv ``student`` should reproduce output channels ``channels`` (long, one per student
    output channel) of the teacher's module ``teacher``."""

    student: str
    teacher: str
    channels: torch.Tensor


def kept_channels(groups: Sequence, alive: Sequence[torch.Tensor], name: str, size: int) -> torch.Tensor:
    """The output channels of module ``name`` (``size`` of them before pruning) that a prune keeping
    ``alive[i]`` of ``groups[i]`` leaves, in their order: those of no group, and those of a group at a
    kept position (the ``channels``/``positions`` of its producer members)."""
    dead = set()
    for g, a in zip(groups, alive):
        for m in g.members:
            if m.name == name and m.role == "producer":
                dead.update(c for c, p in zip(m.channels, m.positions) if not bool(a[p]))
    return torch.tensor([c for c in range(size) if c not in dead], dtype=torch.long)


def _depthwise(mod: nn.Module) -> bool:
    """Slicing's depthwise conv without a channel multiplier (one output channel per input channel)."""
    return _sliced_depthwise(mod) and mod.out_channels == mod.in_channels


def _reconstructible(mod: nn.Module) -> bool:
    """A plain or depthwise ``Conv2d`` / ``ConvTranspose2d`` (a fit of its weights is linear least
    squares) whose weight is its own parameter (not recomputed from another by spectral or weight
    normalisation, which would undo the fit on the next forward)."""
    return (type(mod) in (nn.Conv2d, nn.ConvTranspose2d) and (mod.groups == 1 or _depthwise(mod))
            and isinstance(mod._parameters.get("weight"), nn.Parameter))


def conv_targets(unpruned: nn.Module, teacher: nn.Module, groups: Sequence, alive: Sequence[torch.Tensor],
                 teacher_name: Optional[Callable[[str], Optional[str]]] = None) -> list[ConvTarget]:
    """The convs of ``unpruned`` (the student before the channels of ``groups`` not in ``alive`` are
    removed; the module names survive the removal) that reproduce a teacher layer: a plain or depthwise
    ``Conv2d`` / ``ConvTranspose2d`` whose teacher counterpart (``teacher_name(name)``, default the same
    name; None: none) is a conv with as many output channels as it has before pruning.
    :func:`reconstruct_convs` fits them in the order the forward runs them."""
    tmods = dict(teacher.named_modules())
    out = []
    for name, mod in unpruned.named_modules():
        if not _reconstructible(mod):
            continue
        tname = teacher_name(name) if teacher_name is not None else name
        tmod = tmods.get(tname) if tname is not None else None
        if not isinstance(tmod, nn.modules.conv._ConvNd) or tmod.out_channels != mod.out_channels:
            continue
        out.append(ConvTarget(name, tname, kept_channels(groups, alive, name, mod.out_channels)))
    return out


def _design(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``mod``'s output is linear in: ``(N*L, C_in*k*k)`` (plain) or ``(C, N*L, k*k)`` (depthwise),
    float64, columns in the order of :func:`_flat_weight`. A conv's input patches (``unfold``); for a
    transposed conv, the transposed conv of ``x`` with one-hot kernels (one output channel per weight
    entry: stride, padding and output padding as the layer has them)."""
    x = x.double()
    kk = mod.kernel_size[0] * mod.kernel_size[1]
    if isinstance(mod, nn.ConvTranspose2d):
        cin = mod.in_channels
        per = 1 if _depthwise(mod) else cin  # input channels each output sees
        eye = torch.eye(per * kk, dtype=x.dtype, device=x.device).reshape(per * kk, per, *mod.kernel_size)
        if _depthwise(mod):  # (C, k*k, kh, kw): channel c's k*k one-hot kernels
            onehot = eye.transpose(0, 1).expand(cin, kk, *mod.kernel_size).contiguous()
        else:  # (C_in, C_in*k*k, kh, kw)
            onehot = eye.transpose(0, 1).contiguous()
        z = F.conv_transpose2d(x, onehot, None, mod.stride, mod.padding, mod.output_padding,
                               mod.groups, mod.dilation)  # (N, C_in*k*k, H', W')
        cols = z.flatten(2)
    else:
        padding = mod.padding
        if mod.padding_mode != "zeros":
            x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
            padding = 0
        if isinstance(padding, str):
            raise ValueError(f"string padding {padding!r} is not supported")
        cols = F.unfold(x, mod.kernel_size, mod.dilation, padding, mod.stride)  # (N, C_in*k*k, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if _depthwise(mod):
        return rows.reshape(rows.shape[0], -1, kk).transpose(0, 1)  # (C, N*L, kk)
    return rows


def _flat_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as ``(C_in*k*k, C_out)`` (plain) or ``(C, k*k, 1)`` (depthwise), float64."""
    w = mod.weight.detach().double()
    if _depthwise(mod):
        return w.reshape(w.shape[0], -1, 1)
    if isinstance(mod, nn.ConvTranspose2d):  # (C_in, C_out, kh, kw)
        return w.transpose(0, 1).reshape(w.shape[1], -1).t()
    return w.reshape(w.shape[0], -1).t()


def _set_flat_weight(mod: nn.Module, flat: torch.Tensor) -> None:
    w = mod.weight
    if _depthwise(mod):
        new = flat.reshape(w.shape)
    elif isinstance(mod, nn.ConvTranspose2d):
        new = flat.t().reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1)
    else:
        new = flat.t().reshape(w.shape)
    w.data.copy_(new.to(w.dtype))


def _solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + lam I)^-1 (C + lam W0)``, ``lam = ridge * mean(diag G)``, batched over leading dims."""
    d = gram.shape[-1]
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam[..., None, None] * eye, cross + lam[..., None, None] * w0)


def _normal_equations(mod: nn.Module, x: torch.Tensor, y: torch.Tensor, max_rows: int, ones: bool) -> tuple:
    """``(X^T X, X^T Y, Y^T Y)`` of the fit of ``mod`` (float64; batched per channel for a depthwise
    conv), with a last column of ones when ``ones`` (a bias or an offset), accumulated one image at a time over at most
    ``max_rows`` output positions in all (a fixed random subset of each image's when there are more:
    memory and time stay bounded on large images)."""
    n = x.shape[0]
    per_image = max(1, max_rows // n)
    gram = cross = energy = None
    for i in range(n):
        xd = _design(mod, x[i:i + 1])  # (L, D) or (C, L, kk)
        yi = y[i:i + 1].double().permute(0, 2, 3, 1).reshape(-1, mod.out_channels)  # (L, C_out)
        if _depthwise(mod):
            yi = yi.t().unsqueeze(-1)  # (C, L, 1)
        rows = xd.shape[-2]
        if rows > per_image:
            keep = torch.randperm(rows, generator=torch.Generator().manual_seed(i))[:per_image].to(xd.device)
            xd, yi = xd.index_select(-2, keep), yi.index_select(-2, keep)
        if ones:
            xd = torch.cat([xd, xd.new_ones(*xd.shape[:-1], 1)], -1)
        xt = xd.transpose(-2, -1)
        g, c, e = xt @ xd, xt @ yi, (yi * yi).sum()
        gram, cross, energy = (g, c, e) if gram is None else (gram + g, cross + c, energy + e)
    return gram, cross, energy


def _relative_error(gram: torch.Tensor, cross: torch.Tensor, energy: torch.Tensor, w: torch.Tensor) -> float:
    """``||XW - Y|| / ||Y||`` from the normal equations: ``W^T G W - 2 W^T C + Y^T Y``."""
    sq = (w * (gram @ w)).sum() - 2 * (w * cross).sum() + energy
    return float(sq.clamp_min(0).sqrt() / energy.clamp_min(1e-60).sqrt())


def _reconstruct_one(mod: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float, max_rows: int,
                     offset: bool = False) -> tuple[float, float, Optional[torch.Tensor]]:
    """Set ``mod``'s weights (and bias) to the ridge least-squares fit of ``y`` (``(N, C_out, H', W')``)
    from its input ``x``. ``offset``: a layer without a bias is fitted with one all the same (its output
    feeds a normalisation that subtracts a mean, where the caller puts it). Returns the relative error
    ``||XW - Y|| / ||Y||`` before and after (on the rows used), and that offset (``(C_out,)``, else None)."""
    cout = mod.out_channels
    ones = mod.bias is not None or offset
    w0 = _flat_weight(mod)
    if ones:
        b0 = mod.bias.detach().double() if mod.bias is not None else w0.new_zeros(cout)
        w0 = torch.cat([w0, b0.reshape(cout, 1, 1) if _depthwise(mod) else b0[None]], -2)
    gram, cross, energy = _normal_equations(mod, x, y, max_rows, ones)
    before = _relative_error(gram, cross, energy, w0)
    w = _solve(gram, cross, w0, ridge)
    after = _relative_error(gram, cross, energy, w)
    if not (after == after and after < before):  # NaN, or no better: the start was as good
        return before, before, None
    extra = None
    if ones:
        b = w[:, -1, 0] if _depthwise(mod) else w[-1]
        if mod.bias is not None:
            mod.bias.data.copy_(b.to(mod.bias.dtype))
        else:
            extra = b
        w = w[..., :-1, :]
    _set_flat_weight(mod, w)
    return before, after, extra


# normalisations that subtract a per-channel mean: a constant offset of a channel before them changes
# nothing with batch or instance statistics, and moves into the running mean with running statistics
_MEAN_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _norm_consumers(model: nn.Module, inputs: tuple, names: Sequence[str]) -> dict[str, nn.Module]:
    """For the layers ``names``: the per-channel normalisation that takes the layer's output directly
    as its input (found by one forward of ``model``), where there is one."""
    mods = dict(model.named_modules())
    produced: dict[str, torch.Tensor] = {}
    found: dict[str, nn.Module] = {}
    handles = []

    def out_hook(name):
        def hook(_m, _i, out):
            produced[name] = out
        return hook

    def norm_hook(norm):
        def hook(_m, args):
            for name, t in produced.items():
                if args and args[0] is t and name not in found and norm.num_features == t.shape[1]:
                    found[name] = norm
        return hook

    try:
        for name in names:
            handles.append(mods[name].register_forward_hook(out_hook(name)))
        for m in model.modules():
            if isinstance(m, _MEAN_NORMS):
                handles.append(m.register_forward_pre_hook(norm_hook(m)))
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def reconstruct_convs(student: nn.Module, teacher: nn.Module, batches: Sequence, targets: Sequence[ConvTarget],
                      ridge: float = 1e-3, max_rows: int = 1 << 16) -> dict[str, tuple[float, float]]:
    """Fit each conv of ``targets`` (in order) to its teacher layer, in place (see the module docstring).

    Args:
        student, teacher: the networks (both run in eval mode here; their modes are restored).
        batches: input tuples (or tensors) of the generator, e.g. one training batch of
            ``8x3x64x64``; concatenated into one forward each of the teacher and of the student.
        targets: from :func:`conv_targets`, with the student's names (after pruning).
        ridge: the pull towards the current weights, relative to the patches' mean energy.
        max_rows: output positions per layer the fit uses at most (a fixed random subset beyond).

    Returns ``{student conv: (relative error before, after)}`` on these batches. A layer whose fit
    came out no better than its starting weights (or not finite) keeps them; a layer that runs more
    than once per forward (shared weights), in the teacher or the student, is left alone."""
    if not targets:
        return {}
    tuples = [as_input_tuple(b) for b in batches]
    inputs = tuple(torch.cat([t[i] for t in tuples]) if isinstance(tuples[0][i], torch.Tensor) else tuples[0][i]
                   for i in range(len(tuples[0])))
    smods = dict(student.named_modules())
    tmods = dict(teacher.named_modules())
    for tg in targets:
        if tg.student not in smods or not _reconstructible(smods[tg.student]):
            raise ValueError(f"{tg.student}: not a plain or depthwise Conv2d / ConvTranspose2d of the student")
        if len(tg.channels) != smods[tg.student].out_channels:
            raise ValueError(f"{tg.student}: {smods[tg.student].out_channels} output channels, "
                             f"{len(tg.channels)} teacher channels given")
        if tg.teacher not in tmods:
            raise ValueError(f"{tg.teacher}: no such module in the teacher")
    wanted = {tg.student: tg for tg in targets}
    outputs: dict[str, torch.Tensor] = {}  # student conv -> the teacher's output at its channels
    calls: dict[str, int] = {}
    handles = []

    def keep(name: str, students: list):
        def hook(_m, _i, out):
            calls[name] = calls.get(name, 0) + 1
            for tg in students:  # a copy: a later in-place op must not rewrite it
                outputs[tg.student] = out.detach().index_select(1, tg.channels.to(out.device))
        return hook

    modes = (student.training, teacher.training)
    errors: dict[str, tuple[float, float]] = {}
    try:
        by_teacher: dict[str, list] = {}
        for tg in targets:
            by_teacher.setdefault(tg.teacher, []).append(tg)
        for name, students in by_teacher.items():
            handles.append(tmods[name].register_forward_hook(keep(name, students)))
        teacher.eval()
        teacher(*inputs)
        for h in handles:
            h.remove()
        handles = []
        student.eval()
        # a layer without a bias feeding a per-channel normalisation is fitted with an offset (the
        # normalisation's mean): without one the fit spends the weights on the mean, and the student's
        # next layers are fitted to activations a fine-tune with batch statistics would not see
        norms = _norm_consumers(student, inputs, [tg.student for tg in targets if smods[tg.student].bias is None])
        runs: dict[str, int] = {}
        originals: dict[str, tuple] = {}

        def fit(name: str):
            def hook(mod, args):
                runs[name] = runs.get(name, 0) + 1
                if runs[name] == 1 and calls.get(wanted[name].teacher) == 1:
                    norm = norms.get(name) if mod.bias is None else None
                    originals[name] = (mod.weight.detach().clone(), None if mod.bias is None else mod.bias.detach().clone(),
                                       None if norm is None or norm.running_mean is None else norm.running_mean.clone())
                    before, after, offset = _reconstruct_one(mod, args[0], outputs.pop(name), ridge, max_rows,
                                                             offset=norm is not None)
                    if offset is not None and norm.running_mean is not None:
                        # the norm subtracts a mean: the fitted offset goes into it (exact in eval mode;
                        # with batch or instance statistics the offset cancels anyway)
                        norm.running_mean.sub_(offset.to(norm.running_mean.dtype))
                    errors[name] = (before, after)
            return hook

        for tg in targets:
            handles.append(smods[tg.student].register_forward_pre_hook(fit(tg.student)))
        student(*inputs)
        for name, (w, b, mean) in originals.items():
            if runs[name] > 1:  # shared weights: fitted for their first use only, so given back
                smods[name].weight.data.copy_(w)
                if b is not None:
                    smods[name].bias.data.copy_(b)
                if mean is not None:
                    norms[name].running_mean.copy_(mean)
                del errors[name]
    finally:
        for h in handles:
            h.remove()
        student.train(modes[0])
        teacher.train(modes[1])
    return errors
