"""Once-for-all width slicing: any generator becomes a supernet whose channel groups run at a chosen width.

GAN Compression's second lever, generalised to any architecture. The prunable channel groups come
from torch-pruning's dependency graph (:mod:`ganslim.core.targeting`), so coupled channels (residual
adds, concatenations, norms, depthwise convs) always share one width: a width is chosen *per
group*, never per layer, which makes inconsistent widths impossible by construction.

* Channels are first **reordered by importance** inside each group (norm scale ``|gamma|`` where the
  group has an affine norm, else the L2 norm of the producers' filters; or scores the user gives,
  e.g. GAN Slimming gates), physically and function-preservingly, so a width ``k`` means the
  ``k`` most useful channels: the group's leading positions.
* **Slicing** replaces the ``forward`` of each touched layer *instance* (the user's class is not
  touched; :meth:`Supernet.detach` restores it) with one that runs on the leading channels only:
  real smaller convolutions, so small sub-networks are cheaper to train and evaluate.
* A **sub-network** (``{group root: width}``) is exported as a plain module of standard layers with
  the real smaller weights copied in (torch-pruning removes the other channels physically) and its
  output is checked equal to the sliced supernet's.
* BatchNorm statistics are shared by all widths while training; :func:`recalibrate_bn` re-estimates
  them for one sub-network before it is evaluated or exported (as OFA does).
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import as_float64, as_input_tuple, first_output, in_float64, relative_difference
from ..core.averaging import cumulative_batchnorm_statistics, tracked_batchnorms
from ..core.gating import MacsModel, prune_channels
from ..core.targeting import NORM_TYPES, ChannelGroup, Targets, find_channel_groups
from .thin_conv import is_thin, thin_conv2d

__all__ = ["SliceConfig", "Supernet", "make_supernet", "recalibrate_bn", "width_choices", "SliceError"]

Widths = dict  # {group root name: kept channels}


class SliceError(ValueError):
    """A width configuration or a layer the supernet cannot slice; the message names it."""


@dataclass
class SliceConfig:
    """Candidate widths of every channel group: ``ratios`` of its full size, rounded up to a multiple
    of ``multiple`` channels (8 suits CPU/GPU kernels), at least ``min_channels``.
    ``importance``: ``"magnitude"`` (norm ``|gamma|`` or filter L2 norm) or ``"none"`` (keep the order)."""

    ratios: Sequence[float] = (0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5, 0.625, 0.75, 1.0)
    multiple: int = 8
    min_channels: int = 2  # a layer cut to one channel is a bottleneck no fine-tune repairs
    importance: str = "magnitude"

    def validate(self) -> "SliceConfig":
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise SliceError(f"width ratios must lie in (0, 1], got {list(self.ratios)}")
        if self.multiple < 1 or self.min_channels < 1:
            raise SliceError("multiple and min_channels must be >= 1")
        if self.importance not in ("magnitude", "none"):
            raise SliceError(f"importance must be 'magnitude' or 'none', got {self.importance!r}")
        return self


def width_choices(size: int, cfg: SliceConfig) -> list[int]:
    """Sorted distinct widths for a group of ``size`` channels; always includes ``size`` itself."""
    out = {size}
    for r in cfg.ratios:
        k = -(-int(round(r * size * 1000)) // 1000)  # ceil without float noise
        k = -(-k // cfg.multiple) * cfg.multiple
        out.add(int(min(size, max(cfg.min_channels, k))))
    return sorted(out)


# ------------------------------------------------------------------------------------------ importance
@torch.no_grad()
def group_importance(model: nn.Module, group: ChannelGroup, source: str = "auto") -> torch.Tensor:
    """Score per position of ``group`` (higher = keep first): the sum over the group's affine norms
    of ``|gamma|`` (a conv feeding a norm is rescaled by it, so its filter norm says little) or,
    without one (or with ``source="filters"``), the sum over producers of the filters' L2 norms;
    each member normalised to mean 1."""
    score = torch.zeros(group.size)
    norms = [m for m in group.members if m.role == "norm"
             and getattr(model.get_submodule(m.name), "weight", None) is not None] if source != "filters" else []
    members = norms or [m for m in group.members if m.role == "producer"]
    if not norms and source != "filters" and any(m.role == "norm" for m in group.members):
        # only non-affine norms (CycleGAN's InstanceNorm): they divide each channel by its own spread, so
        # the producing filters' norms say nothing; what the consumers do with a channel does
        members = [m for m in group.members if m.role == "consumer"] or members
    for mem in members:
        mod = model.get_submodule(mem.name)
        w = mod.weight.detach().float().cpu()
        if isinstance(mod, NORM_TYPES):
            s = w.abs()
        elif mem.role == "consumer":
            s = _input_channel_norms(mod, w)
        elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
            s = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
            s = s.repeat(mod.groups)
        else:
            s = w.reshape(w.shape[0], -1).norm(dim=1)
        vals = s[mem.channels]
        score[mem.positions] += vals / vals.mean().clamp_min(1e-12)
    return score


def _input_channel_norms(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """L2 norm of the weights that read each input channel of a conv / transposed conv / linear."""
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):  # (in, out/groups, k...)
        return w.reshape(w.shape[0], -1).norm(dim=1)
    if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:  # depthwise: (C, 1, k...)
        return w.reshape(w.shape[0], -1).norm(dim=1).repeat_interleave(max(1, mod.in_channels // w.shape[0]))
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)  # (out, in, k...) / linear (out, in)


def _member_index(dim: int, mem, order: torch.Tensor) -> torch.Tensor:
    """Index over a layer's channel dim that moves the channel at old position ``order[p]`` to position p."""
    idx = torch.arange(dim)
    pos_to_ch = dict(zip(mem.positions, mem.channels))
    for p in mem.positions:
        idx[pos_to_ch[p]] = pos_to_ch[int(order[p])]
    return idx


def _depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups == mod.in_channels


@torch.no_grad()
def reorder_channels(model: nn.Module, groups: Sequence[ChannelGroup], orders: Sequence[torch.Tensor]) -> None:
    """Permute every group's channels in place so position ``p`` holds old position ``orders[g][p]``.
    The network computes the same function afterwards (every coupled layer is permuted alike)."""
    for group, order in zip(groups, orders):
        if torch.equal(order, torch.arange(group.size)):
            continue
        for mem in group.members:
            mod = model.get_submodule(mem.name)
            if mem.role == "norm":
                idx = _member_index(mod.num_features, mem, order)
                for t in (getattr(mod, "weight", None), getattr(mod, "bias", None),
                          getattr(mod, "running_mean", None), getattr(mod, "running_var", None)):
                    if t is not None:
                        t.copy_(t[idx])
                continue
            transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
            if transposed and mod.groups > 1:
                raise SliceError(f"{mem.name}: grouped transposed convs cannot be sliced")
            w = mod.weight
            if mem.role == "producer":
                idx = _member_index(_channels(mod, "out"), mem, order)
                if _depthwise(mod):
                    w.copy_(w[idx])  # depthwise: in and out channels move together (weight dim 0)
                else:
                    w.copy_(w.index_select(1 if transposed else 0, idx))
                if mod.bias is not None:
                    mod.bias.copy_(mod.bias[idx])
            elif not _depthwise(mod):  # consumer: input channels (a depthwise conv moved with its outputs)
                idx = _member_index(_channels(mod, "in"), mem, order)
                w.copy_(w.index_select(0 if transposed else 1, idx))


# ------------------------------------------------------------------------------------------ slicing
def _sel(t: Optional[torch.Tensor], idx, dim: int = 0) -> Optional[torch.Tensor]:
    if t is None or idx is None:
        return t
    if isinstance(idx, slice):
        return t[idx] if dim == 0 else t[:, idx]
    return t.index_select(dim, idx)


def _as_index(keep: torch.Tensor):
    """A ``slice`` when the kept channels are a leading run (views, no copy), else an index tensor."""
    n = int(keep.sum())
    if bool(keep[:n].all()):
        return slice(0, n)
    return keep.nonzero().flatten()


# How many equal batches recalibrate_bn concatenated into the batch of the forward it runs (1: none);
# every BatchNorm of the supernet then normalises and counts them as separate batches.
_MERGED_BATCHES: contextvars.ContextVar[int] = contextvars.ContextVar("ganslim_merged_batches", default=1)


def _sliced_forward(mod: nn.Module, state: dict, x: torch.Tensor, *args, **kwargs):
    """Forward of one layer restricted to ``state["in"]`` / ``state["out"]`` channels (None = all)."""
    cin, cout = state.get("in"), state.get("out")
    thin = state.get("thin", False) and not torch.is_grad_enabled()  # evaluations only: training keeps the direct conv
    if cin is None and cout is None and not thin and not (_MERGED_BATCHES.get() > 1
                                                          and isinstance(mod, nn.modules.batchnorm._BatchNorm)):
        return state["orig"](x, *args, **kwargs)
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        w = _sel(_sel(mod.weight, cin, 0), cout, 1)
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[w.dim() - 2]
        return fn(x, w, _sel(mod.bias, cout), mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)
    if isinstance(mod, nn.modules.conv._ConvNd):
        groups = mod.groups
        if _depthwise(mod):
            w, b = _sel(mod.weight, cout), _sel(mod.bias, cout)
            groups = w.shape[0]
        else:
            w, b = _sel(_sel(mod.weight, cout, 0), cin, 1), _sel(mod.bias, cout)
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        padding = mod.padding
        if mod.padding_mode != "zeros":
            x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
            padding = 0
        if thin:  # a few output channels: as a strided conv that fills the vector registers (thin_conv)
            return thin_conv2d(x, w, b, (padding, padding) if isinstance(padding, int) else padding)
        return fn(x, w, b, mod.stride, padding, mod.dilation, groups)
    if isinstance(mod, nn.Linear):
        return F.linear(x, _sel(_sel(mod.weight, cout, 0), cin, 1), _sel(mod.bias, cout))
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return _sliced_batch_norm(mod, cout, x)
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        rm, rv = _sel(mod.running_mean, cout), _sel(mod.running_var, cout)
        use_input_stats = mod.training or not mod.track_running_stats
        out = F.instance_norm(x, rm, rv, _sel(mod.weight, cout), _sel(mod.bias, cout), use_input_stats,
                              mod.momentum if mod.momentum is not None else 0.1, mod.eps)
        _write_back(mod, cout, rm, rv)
        return out
    raise SliceError(f"cannot slice {type(mod).__name__}")


def _write_back(mod, idx, rm, rv) -> None:
    # index_select copies: running statistics updated on the copy go back to the shared buffers
    if mod.training and rm is not None and not isinstance(idx, slice):
        with torch.no_grad():
            mod.running_mean[idx] = rm
            mod.running_var[idx] = rv


def _sliced_batch_norm(mod: nn.modules.batchnorm._BatchNorm, idx, x: torch.Tensor) -> torch.Tensor:
    # mirrors nn.BatchNorm's own forward (momentum None = cumulative average), on a channel subset
    merged = _MERGED_BATCHES.get()
    if merged > 1 and mod.training:
        return _merged_batch_norm(mod, idx, x, merged)
    factor = 0.0 if mod.momentum is None else mod.momentum
    if mod.training and mod.track_running_stats and mod.num_batches_tracked is not None:
        mod.num_batches_tracked.add_(1)
        factor = 1.0 / float(mod.num_batches_tracked) if mod.momentum is None else mod.momentum
    use_batch = mod.training or (mod.running_mean is None and mod.running_var is None)
    track = not mod.training or mod.track_running_stats
    rm, rv = _sel(mod.running_mean, idx), _sel(mod.running_var, idx)
    out = F.batch_norm(x, rm if track else None, rv if track else None, _sel(mod.weight, idx), _sel(mod.bias, idx),
                       use_batch, factor, mod.eps)
    _write_back(mod, idx, rm, rv)
    return out


def _merged_batch_norm(mod: nn.modules.batchnorm._BatchNorm, idx, x: torch.Tensor, parts: int) -> torch.Tensor:
    """Train-mode BatchNorm of ``x`` (``(parts * B, C, ...)``, ``parts`` equal batches concatenated) as
    ``parts`` calls of :func:`_sliced_batch_norm` on the batches one after the other would compute it:
    each part normalised by its own statistics and counted in the running ones as a batch of its own.
    The same kernel on the same slices, written into one output (no concatenation pass): bit-identical."""
    n = x.shape[0] // parts
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # each part a dense slice, as a batch of its own would be
    track = mod.track_running_stats and mod.num_batches_tracked is not None
    rm, rv = _sel(mod.running_mean, idx), _sel(mod.running_var, idx)
    w, b = _sel(mod.weight, idx), _sel(mod.bias, idx)
    out = torch.empty_like(x)
    acc = torch.promote_types(x.dtype, torch.float32)  # the kernel's statistics type (bf16 input: float32)
    save_mean, save_invstd = (x.new_empty(x.shape[1], dtype=acc) for _ in range(2))
    for j in range(parts):
        factor = 0.0 if mod.momentum is None else mod.momentum
        if track:
            mod.num_batches_tracked.add_(1)
            factor = 1.0 / float(mod.num_batches_tracked) if mod.momentum is None else mod.momentum
        torch.ops.aten.native_batch_norm.out(x[j * n:(j + 1) * n], w, b, rm if track else None, rv if track else None,
                                             True, factor, mod.eps, out=out[j * n:(j + 1) * n],
                                             save_mean=save_mean, save_invstd=save_invstd)
    _write_back(mod, idx, rm, rv)
    return out


def _channels(mod: nn.Module, side: str) -> int:
    if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return mod.num_features
    if isinstance(mod, nn.Linear):
        return mod.in_features if side == "in" else mod.out_features
    return mod.in_channels if side == "in" else mod.out_channels


class Supernet(nn.Module):
    """A generator whose channel groups run at any of their candidate widths (weight sharing).

    ``model``: the (reordered) network; its layers' forwards are replaced per instance while the
    supernet is attached. ``groups``: the channel groups; ``choices[root]``: candidate widths.
    Call :meth:`set_widths` then run ``supernet(x)`` (or ``supernet.model(x)``).
    """

    def __init__(self, model: nn.Module, targets: Targets, example_inputs: Any, config: SliceConfig,
                 base_macs: Optional[Mapping[str, int]] = None):
        super().__init__()
        from .. import measure

        self.model = model
        self.targets = targets
        self.groups: list[ChannelGroup] = list(targets.groups)
        self.config = config
        self.example_inputs = tuple(t.detach()[:1].cpu() for t in as_input_tuple(example_inputs))
        self.choices: dict[str, list[int]] = {g.root: width_choices(g.size, config) for g in self.groups}
        base = dict(base_macs) if base_macs is not None else measure.macs_by_module(model, self.example_inputs, "papers")
        self._macs = MacsModel(model, targets, base)
        self._states: dict[str, dict] = {}
        self._bn_calls: Optional[tuple] = None  # BatchNorm calls per forward (recalibrate_bn's early stop)
        # set_widths' cache: layer -> indices of the groups touching it; (layer, their widths) -> indices
        self._touching: dict[str, list[int]] = {}
        for gi, g in enumerate(self.groups):
            for mem in g.members:
                if gi not in self._touching.setdefault(mem.name, []):
                    self._touching[mem.name].append(gi)
        self._index_cache: dict = {}
        self.last_export_diff: Optional[float] = None
        self._widths: Widths = self.largest()
        self.attach()

    # ------------------------------------------------------------------ configurations
    def largest(self) -> Widths:
        return {r: c[-1] for r, c in self.choices.items()}

    def smallest(self) -> Widths:
        return {r: c[0] for r, c in self.choices.items()}

    def sample(self, rng: random.Random) -> Widths:
        """A uniformly random configuration (each group's width drawn from its choices)."""
        return {r: rng.choice(c) for r, c in self.choices.items()}

    def check(self, widths: Mapping[str, int]) -> Widths:
        """Validate a configuration: every group named once, widths within ``1..size``."""
        missing = [g.root for g in self.groups if g.root not in widths]
        extra = [k for k in widths if k not in self.choices]
        if missing or extra:
            raise SliceError(f"a width configuration must name every channel group once; missing {missing[:4]}, "
                             f"unknown {extra[:4]}")
        out = {}
        for g in self.groups:
            k = int(widths[g.root])
            if not 1 <= k <= g.size:
                raise SliceError(f"group {g.root}: width {k} outside 1..{g.size}")
            out[g.root] = k
        return out

    def alive(self, widths: Mapping[str, int]) -> list[torch.Tensor]:
        """Boolean per group position: kept (the leading ``widths[root]`` positions)."""
        out = []
        for g in self.groups:
            a = torch.zeros(g.size, dtype=torch.bool)
            a[: int(widths[g.root])] = True
            out.append(a)
        return out

    def macs(self, widths: Optional[Mapping[str, int]] = None) -> float:
        """MACs (papers' convention) of a sub-network at the example input's size (exact for convs)."""
        widths = self._widths if widths is None else widths
        return self._macs.prefix_macs([int(widths[g.root]) for g in self.groups])  # == macs(alive(widths))

    @property
    def total_macs(self) -> float:
        """MACs of the full-width network at the example input's size."""
        return self._macs.total

    # ------------------------------------------------------------------ slicing
    def attach(self) -> "Supernet":
        """Replace the forward of every layer a group touches (instance attribute; idempotent)."""
        touched = {m.name for g in self.groups for m in g.members}
        for name in sorted(touched):
            mod = self.model.get_submodule(name)
            if name in self._states:
                continue
            if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm,
                                    nn.modules.instancenorm._InstanceNorm)):
                raise SliceError(f"{name}: {type(mod).__name__} cannot be sliced")
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and not _depthwise(mod):
                raise SliceError(f"{name}: grouped conv (groups={mod.groups}) cannot be sliced")
            if _depthwise(mod) and mod.out_channels != mod.in_channels:
                raise SliceError(f"{name}: depthwise conv with a channel multiplier cannot be sliced")
            # a conv to a few channels (the output layer) is evaluated in thin_conv's strided form
            thin = (type(mod) is nn.Conv2d and isinstance(mod.padding, tuple)
                    and is_thin(mod.weight, mod.stride, mod.dilation, mod.groups))
            state = {"orig": mod.forward, "in": None, "out": None, "thin": thin}
            self._states[name] = state

            def fwd(x, *args, _mod=mod, _state=state, **kwargs):
                return _sliced_forward(_mod, _state, x, *args, **kwargs)

            mod.forward = fwd
        self.set_widths(self._widths)
        return self

    @contextlib.contextmanager
    def attached(self):
        """``with supernet.attached(): ...``: the layers run sliced inside the block and get their own
        forward back on every exit path (the one undo path of the patching)."""
        was = bool(self._states)
        self.attach()
        try:
            yield self
        finally:
            if not was:
                self.detach()

    def detach(self) -> None:
        """Give every layer its own forward back (the model computes the full-width function)."""
        for name in self._states:
            mod = self.model.get_submodule(name)
            if "forward" in mod.__dict__:
                del mod.forward
        self._states = {}

    @contextlib.contextmanager
    def direct_thin_convs(self):
        """``with supernet.direct_thin_convs(): ...``: the thin convs (the output layer) run as the direct
        convs an exported sub-network has, also without gradients (:mod:`ganslim.pruning.thin_conv` is
        for the search's fitness forwards, not for timing what will be deployed)."""
        flags = {name: st["thin"] for name, st in self._states.items()}
        for st in self._states.values():
            st["thin"] = False
        try:
            yield self
        finally:
            for name, flag in flags.items():
                if name in self._states:
                    self._states[name]["thin"] = flag

    def set_widths(self, widths: Mapping[str, int]) -> "Supernet":
        """Make the next forward passes run the sub-network ``widths`` (``{group root: channels}``)."""
        widths = self.check(widths)
        self._widths = widths
        if not self._states:
            return self
        # A layer's kept channels depend only on the widths of the groups that touch it, and a search
        # sets hundreds of configurations drawn from a few widths per group: each layer's indices are
        # computed once per combination of those widths and kept.
        for name, st in self._states.items():
            gis = self._touching.get(name, [])
            key = (name, tuple(widths[self.groups[gi].root] for gi in gis))
            idx = self._index_cache.get(key)
            if idx is None:
                idx = self._index_cache[key] = self._layer_index(name, gis, widths)
            st["in"], st["out"] = idx
        return self

    def _layer_index(self, name: str, gis: list[int], widths: Widths) -> tuple:
        """``(in, out)`` channel indices (None = all, a slice for a leading run) of layer ``name`` at ``widths``."""
        mod = self.model.get_submodule(name)
        kin = kout = None
        for gi in gis:
            g = self.groups[gi]
            alive = torch.arange(g.size) < int(widths[g.root])
            for mem in g.members:
                if mem.name != name:
                    continue
                if mem.role == "consumer":
                    kin = torch.ones(_channels(mod, "in"), dtype=torch.bool) if kin is None else kin
                    kin[mem.channels] = alive[mem.positions]
                else:
                    kout = torch.ones(_channels(mod, "out"), dtype=torch.bool) if kout is None else kout
                    kout[mem.channels] = alive[mem.positions]
        if _depthwise(mod):  # the in and out channels of a depthwise conv are one set
            kout = kin if kout is None else (kout if kin is None else kout & kin)
            kin = None
        return (None if kin is None or bool(kin.all()) else _as_index(kin),
                None if kout is None or bool(kout.all()) else _as_index(kout))

    @property
    def widths(self) -> Widths:
        return dict(self._widths)

    def forward(self, *inputs):
        return self.model(*inputs)

    # ------------------------------------------------------------------ export
    def export(self, widths: Optional[Mapping[str, int]] = None, tol: float = 1e-4) -> nn.Module:
        """The sub-network ``widths`` as a plain module of standard layers (real smaller weights),
        its output checked equal to the sliced supernet's on the example input: both run in float64,
        ``max |diff| / max |output|`` <= ``tol`` (kept in ``last_export_diff``).
        Run :func:`recalibrate_bn` for these widths first when the network has BatchNorm."""
        widths = self.check(self._widths if widths is None else widths)
        prev = self._widths
        self.set_widths(widths)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), in_float64(self.model):
                ref = first_output(self.model(*as_float64(self.example_inputs)))
            plain = self.plain_copy()
        finally:
            self.set_widths(prev)
            self.model.train(was_training)
        prune_channels(plain, self.groups, self.alive(widths), self.example_inputs)
        plain.eval()
        with torch.no_grad(), in_float64(plain):
            out = first_output(plain(*as_float64(self.example_inputs)))
        diff = relative_difference(out, ref)
        self.last_export_diff = diff
        if not diff <= tol:
            raise SliceError(f"exported sub-network differs from the sliced supernet by {diff:.3g} of the output's "
                             f"scale (> {tol}, float64)")
        for p in plain.parameters():
            p.requires_grad_(True)
        return plain

    def plain_copy(self) -> nn.Module:
        """A deep copy of the full-width network without the slicing forwards (e.g. to save it)."""
        attached = bool(self._states)
        self.detach()
        try:
            return copy.deepcopy(self.model)
        finally:
            if attached:
                self.attach()

    def __deepcopy__(self, memo):
        # the slicing forwards are closures over this model's layers: copy the plain network and
        # slice the copy afresh
        new = Supernet(self.plain_copy(), self.targets, self.example_inputs, self.config, base_macs=self._macs.base)
        new.train(self.training)
        return new.set_widths(self._widths)

    def describe(self) -> dict:
        """JSON-serialisable description (group roots, sizes, choices, slicing config, example shapes)."""
        return {"groups": [{"root": g.root, "size": g.size, "choices": self.choices[g.root]} for g in self.groups],
                "ratios": list(self.config.ratios), "multiple": self.config.multiple,
                "min_channels": self.config.min_channels,
                "input_shapes": [list(t.shape) for t in self.example_inputs]}


def make_supernet(model: nn.Module, example_inputs: Any, config: Optional[SliceConfig] = None,
                  include: Optional[Sequence] = None, exclude: Sequence = (),
                  importance: Optional[Mapping[str, torch.Tensor]] = None, copy_model: bool = True,
                  reorder: bool = True) -> Supernet:
    """Turn ``model`` into a width-sliceable :class:`Supernet` (a deep copy unless ``copy_model=False``).

    Args:
        example_inputs: a tensor ``(N, C, H, W)`` or tuple of the model's inputs (tracing, MACs).
        config: :class:`SliceConfig` (candidate width ratios, rounding multiple, importance).
        include/exclude: as for :func:`ganslim.core.targeting.find_channel_groups`.
        importance: optional ``{group root: score per channel}`` (e.g. gate magnitudes); overrides
            ``config.importance`` for the groups it names.
        reorder: sort channels by importance (off for a supernet that is already ordered).
    """
    cfg = (config or SliceConfig()).validate()
    net = copy.deepcopy(model) if copy_model else model
    inputs = as_input_tuple(example_inputs)
    targets = find_channel_groups(net, inputs, include=include, exclude=exclude)
    if reorder and (cfg.importance != "none" or importance):
        orders = []
        for g in targets.groups:
            if importance and g.root in importance:
                s = torch.as_tensor(importance[g.root]).detach().float().cpu().abs()
                if s.numel() != g.size:
                    raise SliceError(f"importance for {g.root} has {s.numel()} values, the group has {g.size} channels")
            elif cfg.importance == "magnitude":
                s = group_importance(net, g)
            else:
                s = -torch.arange(g.size, dtype=torch.float)
            orders.append(torch.argsort(s, descending=True, stable=True))
        reorder_channels(net, targets.groups, orders)
    return Supernet(net, targets, inputs, cfg)


# recalibrate_bn merges equal batches into one forward up to this many input elements (4 batches of
# 8x3x64x64 are 0.4M). The merged forward holds all the batches' activations at once (at the cap, a
# 64-channel full-resolution activation of 3-channel images is 90 MB in float32); past it the per-call
# costs merging saves are small beside the work anyway.
MERGE_MAX_ELEMENTS = 1 << 20


def _merged_inputs(supernet: Supernet, batches: list) -> Optional[tuple]:
    """``batches`` (tuples of inputs) concatenated along the batch axis into one input tuple, when one
    forward of it gives the statistics the separate forwards give: several batches, each position a
    tensor of the same shape, dtype and device in every batch (or the same non-tensor value), every
    BatchNorm run by the supernet (:func:`_merged_batch_norm` keeps the parts apart), no
    active dropout (its random draws would differ), at most ``MERGE_MAX_ELEMENTS`` input elements.
    Else None. The generator's other layers must treat samples independently (convolutions, pads,
    activations, instance norm: the field's generators do)."""
    if len(batches) < 2 or not supernet._states:
        return None
    first = batches[0]
    if any(len(b) != len(first) for b in batches):
        return None
    for pos, ref in enumerate(first):
        if isinstance(ref, torch.Tensor):
            if ref.dim() == 0 or any(not isinstance(b[pos], torch.Tensor) or b[pos].shape != ref.shape
                                     or b[pos].dtype != ref.dtype or b[pos].device != ref.device for b in batches):
                return None
        elif any(b[pos] is not ref for b in batches):
            return None
    tensors = [t for t in first if isinstance(t, torch.Tensor)]
    if not tensors or sum(t.numel() for t in tensors) * len(batches) > MERGE_MAX_ELEMENTS:
        return None
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in supernet._states
           for n, m in supernet.model.named_modules()):
        return None  # a BatchNorm the supernet does not run would normalise the merged batch as one
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in supernet.model.modules()):
        return None
    out = []
    for pos, ref in enumerate(first):
        if not isinstance(ref, torch.Tensor):
            out.append(ref)
            continue
        cat = torch.cat([b[pos] for b in batches])
        if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
            cat = cat.contiguous(memory_format=torch.channels_last)  # the layout the caller chose
        out.append(cat)
    return tuple(out)


@contextlib.contextmanager
def statistics_forwards(supernet: Supernet, batches: list, merge: bool = True) -> Iterator[list[tuple]]:
    """The set-up of a BatchNorm re-estimation, shared by :func:`recalibrate_bn` and the search's
    prefix reuse: inside, the running statistics are reset and averaged cumulatively, and the yielded
    list holds the input tuples to run: the ``batches`` merged into one (each BatchNorm still counting
    them as separate batches) where :func:`_merged_inputs` finds that exact and ``merge`` allows, else
    the batches as given."""
    merged = _merged_inputs(supernet, batches) if merge else None
    with cumulative_batchnorm_statistics(supernet.model):
        token = _MERGED_BATCHES.set(len(batches)) if merged is not None else None
        try:
            yield [merged] if merged is not None else list(batches)
        finally:
            if token is not None:
                _MERGED_BATCHES.reset(token)


@torch.no_grad()
def recalibrate_bn(supernet: Supernet, batches: Iterable[tuple], widths: Optional[Mapping[str, int]] = None,
                   merge: bool = True) -> int:
    """Re-estimate the BatchNorm running statistics of the sub-network ``widths`` (default: the
    current one) from ``batches`` (tuples of generator inputs): statistics reset, then a cumulative
    average over the batches in train mode, no gradients. Returns the number of BatchNorm layers
    recalibrated (0 for instance-norm networks: nothing to do).

    ``merge``: run equal batches as one forward of their concatenation, each BatchNorm normalising and
    counting them as the separate batches they are (bit-identical statistics, fewer and larger
    convolution calls: 4 batches of 8x3x64x64 of a search's sub-network take about 0.8x the time).
    Used where :func:`_merged_inputs` finds it exact; ``False`` runs one forward per batch."""
    bns = tracked_batchnorms(supernet.model)
    if not bns:
        return 0
    if widths is not None:
        supernet.set_widths(widths)
    # Only the statistics are wanted: once the forward has made as many BatchNorm calls as a whole
    # forward makes, the rest of the network (e.g. the output conv) is skipped. Same statistics, less
    # work. A width never removes a layer, so the count is kept from one sub-network to the next (a
    # search recalibrates hundreds); should a forward call other BatchNorms than the counted ones,
    # the count is taken again from whole forwards.
    cached = getattr(supernet, "_bn_calls", None)  # (calls per forward, ids of the BatchNorms called)
    expected: list[int] = [cached[0]] if cached else []
    calls, seen = [0], set()
    mismatch = False

    def count(mod, *_):
        seen.add(id(mod))
        calls[0] += 1
        if expected and calls[0] == expected[0]:
            raise _StatisticsDone

    batches = list(batches)
    with statistics_forwards(supernet, batches, merge) as runs:
        hooks = [m.register_forward_hook(count) for m in bns]
        try:
            for inputs in runs:
                calls[0] = 0
                seen.clear()
                try:
                    supernet.model(*inputs)
                except _StatisticsDone:
                    pass
                if not expected:
                    expected.append(calls[0])
                    supernet._bn_calls = (calls[0], frozenset(seen))
                elif cached and seen != cached[1]:
                    mismatch = True
                    break
        finally:
            for h in hooks:
                h.remove()
    if mismatch:
        supernet._bn_calls = None
        return recalibrate_bn(supernet, batches, merge=merge)
    return len(bns)


class _StatisticsDone(Exception):
    """Raised from the last BatchNorm call of a recalibration forward (nothing after it is needed)."""
