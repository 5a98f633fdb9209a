"""Shared-prefix reuse for a search's sub-network evaluations (issue 17, search throughput).

An evolutionary search evaluates hundreds of sub-networks that differ in a few widths: a child
keeps most of its parent's widths, and the generator's first layers (the full-resolution stem, the
downsampling convs) are set by the first few width groups, which the whole population soon shares.
The generator's forward (its ``torch.fx`` graph) is cut into a chain of segments wherever a single
activation is all the rest needs (between the layers and residual blocks of pix2pix/CycleGAN's
ResNet generators; a U-Net's skips leave one, after its first conv, whose output the next in-place
LeakyReLU overwrites, so a U-Net gains nothing). The activation after segment ``j``, and the
BatchNorm statistics re-estimated up to it, depend only on the widths of the groups touching
segments ``0..j``. :class:`PrefixCache` keeps them (for the re-estimation forward and for each
evaluation input) keyed by those widths, and the next sub-network that shares them starts from
there: the same kernels on the same tensors, so the same numbers bit for bit, without the prefix's
work. Measured by ``benchmarks/bench_search.py``.

Memory is bounded (least recently used entries go first); a generator that does not trace, whose
traced forward differs between train and eval mode, or that takes several inputs, is evaluated
whole, as before.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .._utils import set_training
from ..core.averaging import tracked_batchnorms
from .slicing import Supernet, statistics_forwards

__all__ = ["PrefixCache", "chain_segments"]


def _segment_module(gm: torch.fx.GraphModule, nodes: list, source, result) -> torch.fx.GraphModule:
    """The nodes ``nodes`` of ``gm``'s graph as a module of one input (the value ``source``, or the
    graph's placeholder) returning ``result`` (a node, or the output node's argument); the layers
    are ``gm``'s own objects, so the supernet's slicing applies."""
    g = torch.fx.Graph()
    env: dict = {source: g.placeholder("x")}

    def arg(n):
        if n not in env:  # a parameter or buffer read in an earlier segment: read again here
            env[n] = g.node_copy(n, arg)
        return env[n]

    for n in nodes:
        env[n] = g.node_copy(n, arg)
    g.output(torch.fx.node.map_arg(result, arg))
    return torch.fx.GraphModule(gm, g)


def chain_segments(model: nn.Module, example_inputs: tuple) -> Optional[list[tuple[nn.Module, set]]]:
    """``model``'s forward as a chain of segments ``[(module, names of the layers it calls)]``: each
    segment takes the previous one's output as its only input (the cut points are where a single
    value is all the rest of the forward needs; the residual blocks of a ResNet generator stay
    whole). From ``torch.fx`` (the model itself when it is a ``GraphModule``, else its trace). None
    when the model has several inputs, does not trace, traces to other code in train and in eval
    mode (a branch on ``self.training`` would be frozen into the trace, and the re-estimation runs in
    train mode), has no cut point, or the chain's output on ``example_inputs`` is not ``model``'s bit
    for bit."""
    if len(example_inputs) != 1 or not isinstance(example_inputs[0], torch.Tensor):
        return None
    if isinstance(model, torch.fx.GraphModule):
        gm = model  # its forward is this graph in either mode
    else:
        was = model.training
        try:
            traced = []
            for mode in (True, False):
                model.train(mode)
                traced.append(torch.fx.symbolic_trace(model))
        except Exception:  # noqa: BLE001 - data-dependent control flow etc.: evaluated whole
            return None
        finally:
            model.train(was)
        if traced[0].code != traced[1].code:
            return None
        gm = traced[1]
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or nodes[-1].op != "output":
        return None
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    pos = {n: i for i, n in enumerate(body)}
    last_use = {}
    for n in body + [nodes[-1]]:
        for a in n.all_input_nodes:
            last_use[a] = pos.get(n, len(body))
    # a cut after body[i]: every value computed so far (parameters aside) that is used later is body[i]
    cuts, live = [], {placeholders[0]}
    for i, n in enumerate(body):
        if n.op != "get_attr":  # a parameter read is no activation: each segment reads its own
            live.add(n)
        live = {v for v in live if last_use.get(v, -1) > i}
        if live == {n} and i < len(body) - 1:
            cuts.append(i)
    if not cuts:
        return None
    segments, source, begin = [], placeholders[0], 0
    for i in cuts + [len(body) - 1]:
        part = [n for n in body[begin:i + 1] if n.op != "get_attr"]
        result = body[i] if i != len(body) - 1 else nodes[-1].args[0]
        mod = _segment_module(gm, part, source, result)
        segments.append((mod, {n.target for n in part if n.op == "call_module"}))
        source, begin = body[i], i + 1
    x = example_inputs[0]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref, out = model(x), x
            for mod, _ in segments:
                out = mod(out)
    finally:
        model.train(was)
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor) and ref.shape == out.shape
            and torch.equal(ref, out)):
        return None
    return segments


class _Entry:
    __slots__ = ("bn_acts", "bn_stats", "eval_acts", "versions", "nbytes")

    def __init__(self, bn_acts: list, bn_stats: list, eval_acts: list):
        """``bn_acts`` / ``eval_acts``: ``(tensor, its version when it was produced)`` pairs."""
        self.bn_acts, self.eval_acts = [t for t, _ in bn_acts], [t for t, _ in eval_acts]
        self.bn_stats = bn_stats
        self.versions = [v for _, v in bn_acts + eval_acts]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.bn_acts + self.eval_acts)

    def intact(self) -> bool:
        """No activation was written in place since it was kept (an in-place op of a later layer)."""
        return [t._version for t in self.bn_acts + self.eval_acts] == self.versions


class PrefixCache:
    """Evaluates sub-networks of a supernet from the deepest prefix already computed.

    ``example_inputs``: one input tuple of the generator (traced and checked, see
    :func:`chain_segments`). ``max_bytes``: memory for the kept activations (least recently used
    dropped first). :attr:`enabled` is False when the generator gives no chain (then the caller runs
    whole forwards). Counters: ``hits`` (sub-networks started from a kept prefix), ``misses``."""

    def __init__(self, supernet: Supernet, example_inputs: tuple, max_bytes: int = 512 << 20):
        self.supernet = supernet
        self.max_bytes = int(max_bytes)
        self.segments = chain_segments(supernet.model, example_inputs) if self.max_bytes > 0 else None
        self.entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._stamp: Optional[tuple] = None
        self._weights: Optional[list] = None  # parameters and fixed buffers, read once
        if self.segments is None:
            return
        owner = {name: i for i, (_, names) in enumerate(self.segments) for name in names}
        first_touch: dict[int, int] = {}  # group index -> the first segment that runs a layer it touches
        for gi, g in enumerate(supernet.groups):
            idx = [owner.get(m.name) for m in g.members]
            if any(i is None for i in idx):  # a layer the segments do not call as a module: no reuse
                self.segments = None
                return
            first_touch[gi] = min(idx)
        # a boundary: the output of segment j when segment j + 1 brings in a new group (the deepest
        # point with that set of groups); its key is the widths of the groups touching segments 0..j
        self.boundaries: list[tuple[int, list[int]]] = []
        for j in range(len(self.segments) - 1):
            upto = sorted(gi for gi, f in first_touch.items() if f <= j)
            if upto and any(f == j + 1 for f in first_touch.values()):
                self.boundaries.append((j, upto))
        names = {id(m): n for n, m in supernet.model.named_modules()}
        self.bns = tracked_batchnorms(supernet.model)
        self.bn_owner = [owner.get(names[id(m)], -1) for m in self.bns]
        if any(o < 0 for o in self.bn_owner):
            self.segments = None  # a BatchNorm the segments do not call: its statistics could not be kept
            return
        self.last_bn_child = max(self.bn_owner) if self.bns else -1

    @property
    def enabled(self) -> bool:
        return self.segments is not None

    def clear(self) -> None:
        """Drop every kept prefix."""
        self.entries.clear()
        self.bytes = 0

    def _state_stamp(self, bn_batches: Sequence[tuple], eval_inputs: Sequence[tuple]) -> tuple:
        # the kept activations hold for these very inputs and weights (versions bump on in-place writes)
        if self._weights is None:
            self._weights = [t for n, t in self.supernet.model.state_dict(keep_vars=True).items()
                             if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]  # re-estimated
        tensors = [t for b in list(bn_batches) + list(eval_inputs) for t in b if isinstance(t, torch.Tensor)]
        return (tuple((t.data_ptr(), t._version, t.shape, t.dtype) for t in tensors),
                tuple((t.data_ptr(), t._version) for t in self._weights))

    def _keys(self, widths: dict) -> list[tuple]:
        roots = [g.root for g in self.supernet.groups]
        return [(j, tuple(int(widths[roots[gi]]) for gi in upto)) for j, upto in self.boundaries]

    def _run(self, x: torch.Tensor, start: int, stop: int, keep: set, kept: dict) -> torch.Tensor:
        for j in range(start, stop + 1):
            x = self.segments[j][0](x)
            if j in keep:  # with its version: a later in-place op on it must not be kept
                kept.setdefault(j, []).append((x, x._version))
        return x

    @torch.no_grad()
    def forwards(self, bn_batches: Sequence[tuple], eval_inputs: Sequence[tuple]) -> list[torch.Tensor]:
        """BatchNorm statistics re-estimated on ``bn_batches`` (as :func:`~ganslim.pruning.slicing.recalibrate_bn`
        does), then the outputs on ``eval_inputs`` in eval mode, for the supernet's current sub-network
        (:meth:`~ganslim.pruning.slicing.Supernet.set_widths`), starting from the deepest kept prefix.
        Bit-identical to whole forwards."""
        sn = self.supernet
        widths = sn.widths
        stamp = self._state_stamp(bn_batches, eval_inputs)
        if stamp != self._stamp:  # other inputs, or weights written since (an optimizer step): start afresh
            self.clear()
            self._stamp = stamp
        keys = self._keys(widths)
        start, entry = -1, None
        for key in reversed(keys):
            e = self.entries.get(key)
            if e is not None and not e.intact():
                self.bytes -= self.entries.pop(key).nbytes
            elif e is not None:
                start, entry = key[0], e
                self.entries.move_to_end(key)
                break
        self.hits += entry is not None
        self.misses += entry is None
        keep = {j for j, _ in keys if j > start}
        bn_kept: dict[int, list] = {}
        if self.bns:
            with statistics_forwards(sn, list(bn_batches)) as runs:
                if entry is not None:
                    for (m, stats) in zip(self.bns, entry.bn_stats):
                        if stats is not None:
                            m.running_mean.copy_(stats[0])
                            m.running_var.copy_(stats[1])
                            m.num_batches_tracked.copy_(stats[2])
                for r, inputs in enumerate(runs if start < self.last_bn_child else ()):
                    x = entry.bn_acts[r] if entry is not None else inputs[0]
                    # the statistics are all that is wanted: stop after the last BatchNorm's child
                    self._run(x, start + 1, self.last_bn_child, keep, bn_kept)
        set_training(sn.model, False)
        eval_kept: dict[int, list] = {}
        outs = []
        for e, inputs in enumerate(eval_inputs):
            x = entry.eval_acts[e] if entry is not None else inputs[0]
            outs.append(self._run(x, start + 1, len(self.segments) - 1, keep, eval_kept))
        self._store(keys, start, bn_kept, eval_kept)
        return outs

    def _store(self, keys: list, start: int, bn_kept: dict, eval_kept: dict) -> None:
        final = None  # the re-estimated statistics, copied once and shared by this sub-network's entries
        for key in keys:
            j = key[0]
            if j <= start or key in self.entries:
                continue
            if self.bns and len(bn_kept.get(j, ())) == 0 and j <= self.last_bn_child:
                continue
            if final is None:
                final = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in self.bns]
            stats = [st if owner <= j else None for st, owner in zip(final, self.bn_owner)]
            entry = _Entry(list(bn_kept.get(j, [])), stats, list(eval_kept.get(j, [])))
            if not entry.intact() or entry.nbytes > self.max_bytes:
                continue
            self.entries[key] = entry
            self.bytes += entry.nbytes
        while self.bytes > self.max_bytes and self.entries:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
