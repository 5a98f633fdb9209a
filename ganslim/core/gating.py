"""Differentiable channel gates with an L1 proximal step, and physical removal of gated-off channels.

GAN Slimming's recipe on any generator: every prunable channel group (see :mod:`ganslim.core.targeting`)
gets a learnable per-channel scale ``gate`` (init 1). Forward hooks multiply the outputs of the
group's gate points by it, so the user's class is untouched. After each optimizer step
:meth:`GateSet.prox_step` soft-thresholds the gates (the proximal operator of ``rho * |g|_1``), so
gates reach *exactly* zero. :func:`fold_and_prune` then folds the gates into the gated layers
(norm affine or conv weights) and removes zero channels physically with torch-pruning, leaving a
plain module of standard layers whose output equals the gated network's.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import math
import struct
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .._utils import as_float64, first_output, in_float64, relative_difference
from .targeting import NORM_TYPES, ChannelGroup, Targets, as_input_tuple, inplace_disabled


class GateSet(nn.Module):
    """Gate vectors for a list of channel groups: ``gates[i]`` has shape ``(groups[i].size,)``."""

    def __init__(self, targets: Targets, init: float = 1.0, priority: Optional[Sequence[torch.Tensor]] = None):
        super().__init__()
        self.groups: list[ChannelGroup] = list(targets.groups)
        self.gates = nn.ParameterList([nn.Parameter(torch.full((g.size,), float(init))) for g in self.groups])
        # masks fix channels that were decided off (threshold / target); 1 = alive
        for i, g in enumerate(self.groups):
            self.register_buffer(f"mask_{i}", torch.ones(g.size))
        # Why a priority: a gate is a learned *relative* multiplier that starts at 1, so on its own it
        # ranks channels by noise until training has separated them. It stays exactly at 1 while the
        # student still equals its teacher (zero loss: always so with instance norm, which behaves alike
        # in train and eval), and after a few steps differs by ~1e-3. A global threshold inside that
        # narrow band dropped whole groups to one channel (CycleGAN, CartoonGAN). Channels are ranked by
        # the scale they leave the gate with, gate x priority, the priority being the teacher's channel
        # importance (norm scale; for non-affine norms the consumers' weights), mean 1 per group: the
        # same ranking CAT's one-step pruning uses while the gates are still 1, GAN Slimming's once
        # training has spread them (with batch norm it then equals ranking by gate x gamma).
        self._priority_fn: Optional[Callable[[], Sequence[torch.Tensor]]] = None
        for i, g in enumerate(self.groups):
            self.register_buffer(f"priority_{i}", torch.ones(g.size), persistent=False)
        if priority is not None:
            self.set_priority(priority)
        self._handles: list = []
        self._final = False

    @torch.no_grad()
    def set_priority(self, priority: Sequence[torch.Tensor]) -> None:
        """Per group, a non-negative score per channel (any scale: divided by its mean here)."""
        if len(priority) != len(self.groups) or any(torch.as_tensor(p).numel() != g.size
                                                    for p, g in zip(priority, self.groups)):
            raise ValueError("priority needs one score per channel of every group")
        for i, p in enumerate(priority):
            p = torch.as_tensor(p).detach().float().flatten().abs().cpu()
            getattr(self, f"priority_{i}").copy_(p / p.mean().clamp_min(1e-12))

    @classmethod
    def for_model(cls, model: nn.Module, targets: Targets) -> "GateSet":
        """Gates at 1 whose channels rank by gate x ``model``'s current channel importance (norm scales,
        or for non-affine norms the consumers' weights; :func:`ganslim.pruning.onestep.importance_scores`)."""
        from ..pruning.onestep import importance_scores

        gates = cls(targets, priority=importance_scores(model, targets))
        gates._priority_fn = lambda: importance_scores(model, targets)  # refreshed as the student trains
        return gates

    # ----------------------------------------------------------------- hooks
    def effective(self, i: int) -> torch.Tensor:
        """The scale group ``i`` applies: its gate divided by the gate's mean magnitude.

        Why: the layers after a gate almost always end in a norm, which undoes a uniform scaling of
        the whole group. Raw gates could then shrink a whole group for free under L1, and magnitudes
        of different groups would not be comparable. Normalised, only *relative* importance inside a
        group changes the output, and one global threshold compares groups fairly."""
        g = self.gates[i]
        return g / g.abs().mean().clamp_min(1e-12)

    def _scale_for(self, module_name: str, n_channels: int) -> Callable[[], torch.Tensor]:
        """Per-channel scale for one gate point, combining every group that covers its channels."""
        parts = []
        for gi, g in enumerate(self.groups):
            if module_name not in g.gate_points:
                continue
            for mem in g.member(module_name):
                if mem.role == "consumer":
                    continue
                parts.append((gi, torch.tensor(mem.channels), torch.tensor(mem.positions)))

        def scale() -> torch.Tensor:
            s = torch.ones(n_channels, device=self.gates[0].device, dtype=self.gates[0].dtype)
            for gi, ch, pos in parts:
                s = s.index_put((ch.to(s.device),), self.effective(gi)[pos.to(s.device)])
            return s

        return scale

    def attach(self, model: nn.Module) -> "GateSet":
        """Register forward hooks on ``model`` (the student). Idempotent."""
        self.detach()
        points = sorted({p for g in self.groups for p in g.gate_points})
        for name in points:
            mod = model.get_submodule(name)
            n = _out_channels(mod)
            scale = self._scale_for(name, n)

            def hook(m, inp, out, scale=scale):
                s = scale()  # channels on dim 1 of (N, C, *spatial); an unbatched (C,) output is scaled as is
                return out * (s if out.dim() == 1 else s.view(1, -1, *([1] * (out.dim() - 2))))

            self._handles.append(mod.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        """Remove the hooks; the model computes its ungated function again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ----------------------------------------------------------------- sparsity
    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"mask_{i}") for i in range(len(self.groups))]

    @torch.no_grad()
    def prox_step(self, lr: float, rho: float) -> None:
        """Proximal step of ``rho * |g|_1``: soft-threshold ``g <- sign(g) * max(|g| - lr * rho, 0)``
        (masked-off gates stay 0), then rescale each group to mean magnitude 1. The rescaling leaves
        the network unchanged (the forward uses :meth:`effective`) and keeps the threshold in units
        of a group's average gate."""
        t = lr * rho
        for g, m in zip(self.gates, self.masks()):
            g.copy_(torch.sign(g) * torch.clamp(g.abs() - t, min=0.0) * m)
            mean = g.abs().mean()
            if mean > 0:
                g.div_(mean)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for g, m in zip(self.gates, self.masks()):
            g.mul_(m)

    @torch.no_grad()
    def alive(self) -> list[torch.Tensor]:
        """Boolean per group: channel still alive (gate non-zero and not masked). After
        :meth:`set_masks` the masks decide alone (a kept channel may have a zero gate when widths
        were rounded to a multiple)."""
        if self._final:
            return [m > 0 for m in self.masks()]
        out = []
        for g, m in zip(self.gates, self.masks()):
            a = (g != 0) & (m > 0)
            if not bool(a.any()):  # never empty a group: keep its strongest channel
                a = a.clone()
                a[int(g.abs().argmax())] = True
            out.append(a)
        return out

    @torch.no_grad()
    def set_masks(self, alive: list[torch.Tensor], final: bool = True) -> None:
        """Switch off the channels not in ``alive`` (bool per channel of each group). ``final``: the
        masks alone decide what survives export (widths rounded up may keep a zero gate)."""
        for i, a in enumerate(alive):
            if not bool(a.any()):
                raise ValueError(f"group {self.groups[i].root} would lose every channel")
            getattr(self, f"mask_{i}").copy_(a.float())
        self._final = final
        self.apply_masks()

    def priorities(self) -> list[torch.Tensor]:
        return [getattr(self, f"priority_{i}") for i in range(len(self.groups))]

    @torch.no_grad()
    def ranking(self) -> list[torch.Tensor]:
        """Per group, a float64 score per channel for the global threshold: ``|gate| * mask * priority``
        (the priority refreshed from the student first, when the gates were made by :meth:`for_model`).
        Masked-off channels score 0."""
        if self._priority_fn is not None:
            self.set_priority(self._priority_fn())
        out = []
        for g, m, p in zip(self.gates, self.masks(), self.priorities()):
            out.append(g.detach().abs().double().cpu() * m.double().cpu() * p.double().clamp_min(1e-6))
        return out

    @contextlib.contextmanager
    def attached(self, model: nn.Module):
        """``with gates.attached(model): ...``: hooks on ``model`` for the block, removed on every exit path."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def l1(self) -> torch.Tensor:
        return sum(g.abs().sum() for g in self.gates)

    def sparsity(self) -> float:
        """Fraction of gated channels that are off."""
        alive = self.alive()
        return 1.0 - sum(int(a.sum()) for a in alive) / max(1, sum(a.numel() for a in alive))


def _out_channels(mod: nn.Module) -> int:
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return mod.out_channels
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.out_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return mod.num_features
    raise TypeError(f"cannot gate {type(mod).__name__}")


# --------------------------------------------------------------------- MACs accounting
class MacsModel:
    """Exact-for-convs MACs estimate of the network a set of masks would leave.

    A conv's MACs scale with (kept in / in) x (kept out / out) (depthwise: kept out / out); a norm's
    with kept / total; modules no group touches keep their MACs. ``base_macs`` maps module names
    to their MACs at full width (papers' convention, from :func:`ganslim.measure.macs_by_module`).
    """

    def __init__(self, model: nn.Module, targets: Targets, base_macs: dict[str, int]):
        self.base = {k: float(v) for k, v in base_macs.items()}
        self.groups = targets.groups
        self.total = sum(self.base.values())
        self._prefix: Optional[dict] = None  # tables of prefix_macs, built on first use
        self._index: Optional[dict] = None  # the same as index tensors (kept_channels)
        self._plan: Optional[list] = None  # prefix_macs: per module its base and the group indices of each side
        self._fractions: dict = {}  # prefix_macs: kept fraction per (module, side) and the widths of its groups
        self.kind: dict[str, str] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        for name in self.base:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(mod, nn.modules.conv._ConvNd):
                self.sizes[name] = (mod.in_channels, mod.out_channels)
                self.kind[name] = "depthwise" if mod.groups > 1 else "conv"
            elif isinstance(mod, nn.Linear):
                self.sizes[name] = (mod.in_features, mod.out_features)
                self.kind[name] = "conv"
            elif isinstance(mod, NORM_TYPES) and hasattr(mod, "num_features"):
                self.sizes[name] = (mod.num_features, mod.num_features)
                self.kind[name] = "norm"

    def macs(self, alive: list[torch.Tensor]) -> float:
        """MACs (papers' convention) of the network that keeps the channels marked in ``alive``."""
        kept_in = {n: torch.ones(s[0]) for n, s in self.sizes.items()}
        kept_out = {n: torch.ones(s[1]) for n, s in self.sizes.items()}
        for g, a in zip(self.groups, alive):
            af = a.float().cpu()
            for mem in g.members:
                if mem.name in self.sizes:
                    (kept_in if mem.role == "consumer" else kept_out)[mem.name][mem.channels] = af[mem.positions]
        total = 0.0
        for n, b in self.base.items():
            kind = self.kind.get(n)
            if kind == "conv":
                total += b * float(kept_in[n].mean()) * float(kept_out[n].mean())
            elif kind in ("depthwise", "norm"):
                total += b * float(kept_out[n].mean())
            else:
                total += b
        return total

    def kept_channels(self, alive: list[torch.Tensor]) -> dict[str, tuple[int, int]]:
        """``{module name: (kept input channels, kept output channels)}`` of every conv, linear and
        norm layer once the channels marked in ``alive`` are removed (the latency table's shapes)."""
        if self._index is None:  # the prefix tables' positions as index tensors, built once
            self._index = {k: (size, untouched, [(gi, torch.tensor(ps, dtype=torch.long)) for gi, ps in groups])
                           for k, (size, untouched, groups) in self._tables().items()}
        alive = [a.bool().cpu() for a in alive]
        out = {}
        for name, (n_in, n_out) in self.sizes.items():
            counts = []
            for side, n in (("in", n_in), ("out", n_out)):
                entry = self._index.get((name, side))
                if entry is None:
                    counts.append(n)
                else:
                    _, untouched, groups = entry
                    counts.append(untouched + sum(int(alive[gi][ps].sum()) for gi, ps in groups))
            out[name] = (counts[0], counts[1])
        return out

    def prefix_macs(self, widths: Sequence[int]) -> float:
        """:meth:`macs` of the masks that keep the leading ``widths[i]`` positions of group ``i`` (a
        supernet's sub-network), the same float to the last bit, without building masks: the
        architecture search asks for thousands of these while it samples candidates. Each module
        side's kept fraction depends only on the widths of the few groups that write it and is kept
        per those widths (the search draws each group's width from a handful)."""
        if self._plan is None:
            tables = self._tables()
            plan = []
            for n, b in self.base.items():
                kind = self.kind.get(n)
                sides = ("in", "out") if kind == "conv" else ("out",) if kind in ("depthwise", "norm") else ()
                plan.append((b, [((n, side), tuple(gi for gi, _ in tables[(n, side)][2]))
                                 for side in sides if (n, side) in tables]))
            self._plan = plan
        memo = self._fractions
        total = 0.0
        for b, sides in self._plan:
            term = b
            for key, gis in sides:  # the order of macs(): base * in fraction * out fraction
                k = (key, tuple(widths[gi] for gi in gis))
                f = memo.get(k)
                if f is None:
                    f = memo[k] = self._kept_fraction(key[0], key[1], widths)
                term *= f
            total += term
        return total

    def _tables(self) -> dict:
        if self._prefix is None:
            self._prefix = self._prefix_tables()
        return self._prefix

    def _prefix_tables(self) -> dict:
        # per (module, side): its channel count, the channels no group writes (always kept), and per
        # group the sorted positions of the channels it writes last (the mask assignment order of macs())
        writer: dict[tuple[str, str], dict[int, tuple[int, int]]] = {}
        for gi, g in enumerate(self.groups):
            for mem in g.members:
                if mem.name in self.sizes:
                    d = writer.setdefault((mem.name, "in" if mem.role == "consumer" else "out"), {})
                    for c, p in zip(mem.channels, mem.positions):
                        d[int(c)] = (gi, int(p))
        tables = {}
        for (name, side), d in writer.items():
            size = self.sizes[name][0 if side == "in" else 1]
            per_group: dict[int, list[int]] = {}
            for gi, p in d.values():
                per_group.setdefault(gi, []).append(p)
            tables[(name, side)] = (size, size - len(d), [(gi, sorted(ps)) for gi, ps in per_group.items()])
        return tables

    def _kept_fraction(self, name: str, side: str, widths: Sequence[int]) -> float:
        entry = self._prefix.get((name, side))
        if entry is None:
            return 1.0
        size, untouched, groups = entry
        kept = untouched + sum(bisect.bisect_left(ps, widths[gi]) for gi, ps in groups)
        # float32, as the mean of macs()'s float32 mask: the float64 quotient rounded to float32 is the
        # correctly rounded float32 quotient (53 >= 2 * 24 + 2 bits: double rounding is innocuous)
        return struct.unpack("f", struct.pack("f", kept / size))[0]


def gated_macs_by_module(model: nn.Module, targets: Targets, example_inputs, convention: str = "papers") -> dict[str, int]:
    """Per-module MACs of ``model`` at full width as :func:`export_pruned` will leave it, the base for a
    :class:`MacsModel` of a gated run. Folding a gate into a norm without an affine weight (CycleGAN's
    ``InstanceNorm2d(affine=False)``) makes that norm affine, which the papers' convention counts at one
    MAC per output element (0 without): counted here so that the exported student meets its target."""
    from .. import measure

    plain = [name for name in sorted({p for g in targets.groups for p in g.gate_points})
             if isinstance(model.get_submodule(name), NORM_TYPES) and not _has_affine(model.get_submodule(name))]
    if not plain:
        return measure.macs_by_module(model, example_inputs, convention)
    shadow = copy.deepcopy(model)  # the user's network keeps its norms as they are
    for name in plain:
        _make_affine(shadow.get_submodule(name), torch.ones(shadow.get_submodule(name).num_features))
    return measure.macs_by_module(shadow, example_inputs, convention)


def _has_affine(norm: nn.Module) -> bool:
    return getattr(norm, "affine", True) and getattr(norm, "weight", None) is not None


def _make_affine(norm: nn.Module, scale: torch.Tensor) -> None:
    """Give a norm without an affine weight one: weight ``scale``, bias 0 (what folding a gate into it does)."""
    norm.affine = True
    norm.weight = nn.Parameter(scale.clone())
    norm.bias = nn.Parameter(torch.zeros_like(scale))


def macs_schedule(step: int, start: int, reach: int, total_macs: float, target_macs: float) -> float:
    """MACs allowed at ``step`` by the cubic gradual-pruning schedule: the full network until
    ``start``, then ``target + (total - target) * (1 - (step - start) / (reach - start))^3``, the target
    from ``reach`` on."""
    if step <= start:
        return total_macs
    t = min(1.0, (step - start) / max(1, reach - start))
    return target_macs + (total_macs - target_macs) * (1.0 - t) ** 3


def width_floors(sizes: Sequence[int], macs_model: MacsModel, target_macs: float, min_fraction: float = 0.125,
                 min_channels: int = 2) -> list[int]:
    """The fewest channels each group may keep: ``max(min_channels, ceil(min_fraction * size))`` (at
    most its size), or 1 everywhere when those floors alone exceed ``target_macs`` (the target wins).
    Why: a layer cut to one channel is a bottleneck no fine-tune repairs, and a global threshold (or a
    random mask) can otherwise pass above a whole group whose scores lie close together."""
    floors = [min(n, max(1, min_channels, math.ceil(min_fraction * n))) for n in sizes]
    at_floor = [torch.arange(n) < f for n, f in zip(sizes, floors)]
    if any(f > 1 for f in floors) and macs_model.macs(at_floor) > target_macs:
        return [1] * len(sizes)
    return floors


def threshold_for_target(gates: GateSet, macs_model: MacsModel, target_macs: float, iters: int = 60,
                         multiple: int = 1, min_fraction: float = 0.125, min_channels: int = 2
                         ) -> tuple[float, list[torch.Tensor]]:
    """Global threshold ``tau`` on the channels' ranking scores (:meth:`GateSet.ranking`; bisection)
    so that the channels above it give at most ``target_macs`` MACs. Returns ``(tau, alive masks)``.

    Each group keeps at least its :func:`width_floors` channels. With ``multiple``
    > 1 each group's kept count is rounded up to a multiple of it (hardware-friendly widths: vector
    units and oneDNN/cuDNN kernels prefer channel counts divisible by 8)."""
    mags = gates.ranking()
    order = [torch.argsort(v, descending=True, stable=True) for v in mags]
    lo, hi = 0.0, float(torch.cat(mags).max()) + 1e-12
    floors = width_floors([v.numel() for v in mags], macs_model, target_macs, min_fraction, min_channels)

    def alive_at(tau: float) -> list[torch.Tensor]:
        out = []
        for v, idx, f in zip(mags, order, floors):
            k = max(f, int((v > tau).sum()))
            if multiple > 1:
                k = min(v.numel(), -(-k // multiple) * multiple)
            a = torch.zeros(v.numel(), dtype=torch.bool)
            a[idx[:k]] = True
            out.append(a)
        return out

    if macs_model.macs(alive_at(lo)) <= target_macs:
        return lo, alive_at(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if macs_model.macs(alive_at(mid)) > target_macs:
            lo = mid
        else:
            hi = mid
    alive = alive_at(hi)
    if multiple > 1:
        alive = _fill_blocks(alive, mags, order, macs_model, target_macs, multiple)
    return hi, alive


def _fill_blocks(alive: list[torch.Tensor], mags: list[torch.Tensor], order: list[torch.Tensor], macs_model: "MacsModel",
                 target_macs: float, multiple: int) -> list[torch.Tensor]:
    """Rounding widths up to a multiple makes the bisection stop well below the target (a global
    threshold moves whole blocks at once); add blocks of ``multiple`` channels greedily, the block
    with the largest mean gate first, while the MACs stay within the target."""
    alive = [a.clone() for a in alive]
    while True:
        best, best_score = None, -1.0
        for gi, (a, v, idx) in enumerate(zip(alive, mags, order)):
            k = int(a.sum())
            if k >= v.numel():
                continue
            nxt = idx[k:k + multiple]
            score = float(v[nxt].mean())
            if score <= best_score:
                continue
            trial = [x if j != gi else x.clone() for j, x in enumerate(alive)]
            trial[gi][nxt] = True
            if macs_model.macs(trial) <= target_macs:
                best, best_score = trial, score
        if best is None:
            return alive
        alive = best


# --------------------------------------------------------------------- export
@torch.no_grad()
def fold_gates(model: nn.Module, gates: GateSet) -> None:
    """Multiply each gate into the layer it follows: a norm's affine (made affine if it was not) or a
    conv/linear's output weights and bias. ``model`` must not have the gate hooks attached."""
    points = sorted({p for g in gates.groups for p in g.gate_points})
    for name in points:
        mod = model.get_submodule(name)
        s = gates._scale_for(name, _out_channels(mod))().detach().to(next(iter(mod.parameters()), gates.gates[0]).device)
        if isinstance(mod, NORM_TYPES):
            if _has_affine(mod):
                mod.weight.mul_(s)
                mod.bias.mul_(s)
            else:
                _make_affine(mod, s)
        elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
            # weight: (in, out/groups, k...) -> scale dim 1 per output channel
            g = mod.groups
            w = mod.weight.view(g, mod.in_channels // g, mod.out_channels // g, *mod.weight.shape[2:])
            w.mul_(s.view(g, 1, mod.out_channels // g, *([1] * (mod.weight.dim() - 2))))
            if mod.bias is not None:
                mod.bias.mul_(s)
        elif isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            mod.weight.mul_(s.view(-1, *([1] * (mod.weight.dim() - 1))))
            if mod.bias is not None:
                mod.bias.mul_(s)
        else:
            raise TypeError(f"cannot fold a gate into {type(mod).__name__} ({name})")


def prune_dead_channels(model: nn.Module, gates: GateSet, example_inputs) -> dict[str, int]:
    """Remove every channel whose gate is off, physically, with torch-pruning.
    Returns ``{group root: kept channels}``."""
    return prune_channels(model, gates.groups, gates.alive(), example_inputs)


def prune_channels(model: nn.Module, groups: list[ChannelGroup], alive: list[torch.Tensor], example_inputs) -> dict[str, int]:
    """Remove, physically and with torch-pruning's dependency graph, every position of each group
    not marked in ``alive[i]`` (bool per position). Returns ``{group root: kept channels}``."""
    import torch_pruning as tp

    inputs = as_input_tuple(example_inputs)
    was_training = model.training
    model.eval()
    with inplace_disabled(model):
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=list(inputs) if len(inputs) > 1 else inputs[0],
                                                   verbose=False)
    model.train(was_training)
    kept = {}
    for g, keep in zip(groups, alive):
        root = model.get_submodule(g.root)
        dead = [i for i, a in enumerate(keep.tolist()) if not a]
        kept[g.root] = g.size - len(dead)
        if not dead:
            continue
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, idxs=dead)
        if not dg.check_pruning_group(group):
            raise RuntimeError(f"torch-pruning refused to prune group {g.root}")
        group.prune()
    return kept


def export_pruned(model: nn.Module, gates: GateSet, example_inputs, tol: float = 1e-4) -> tuple[nn.Module, dict]:
    """Gated ``model`` -> plain, physically smaller copy with the same output.

    Works on a deep copy: folds gates, removes dead channels, and checks that the result's output
    equals the gated network's on ``example_inputs``: both run in float64 (the exported weights stay
    float32), and ``max |pruned - gated| / max |gated|`` must be <= ``tol``. A correct export differs
    by the float32 rounding of the folded weights (about 1e-7 of the output's scale, the same on every
    CPU); a channel that leaks past a gate differs by orders of magnitude more. Returns ``(plain
    model, info)``; info holds ``rel_diff`` and the ``kept`` widths.
    """
    inputs = as_input_tuple(example_inputs)
    gates.apply_masks()
    # masks may have kept one channel of an otherwise dead group: make the gate state match alive()
    alive = gates.alive()
    with torch.no_grad():
        for gvec, a in zip(gates.gates, alive):
            gvec.mul_(a.to(gvec.dtype))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), in_float64(model, gates), gates.attached(model):
            ref = first_output(model(*as_float64(inputs)))
    finally:
        model.train(was_training)
    if not torch.isfinite(ref).all():
        raise FloatingPointError("the gated student's output is not finite (NaN/inf): its training diverged; "
                                 "lower the learning rates or check the losses before exporting")
    plain = copy.deepcopy(model)
    fold_gates(plain, gates)
    kept = prune_dead_channels(plain, gates, inputs)
    plain.eval()
    with torch.no_grad(), in_float64(plain):
        out = plain(*as_float64(inputs))
    diff = relative_difference(out, ref)
    if not diff <= tol:
        raise RuntimeError(f"pruned network differs from the gated one by {diff:.3g} of the output's scale (> {tol}, "
                           "float64); a layer between a gate and its consumer does not keep zero channels at zero")
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain, {"rel_diff": diff, "kept": kept}
