"""Targeting: find the prunable channel groups of any generator with torch-pruning's dependency graph.

A *channel group* is a set of channels that must be removed together: the output channels of a
conv and everything coupled to them (norms, residual adds, the input channels of consumers,
slices of concatenations). torch-pruning's ``DependencyGraph`` answers which channels are coupled;
we never hand-code per-architecture rules.

For each group we also decide where a gate (per-channel scale) goes so that a zero gate makes the
channel *exactly* zero everywhere downstream: after every norm in the group (a norm would otherwise
re-normalise or re-bias a zeroed channel) and after every producer (conv / transposed conv /
linear) whose output is not fed straight into one of those norms (gating before a norm would be
undone by it).
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .._utils import as_input_tuple  # noqa: F401 - re-exported for the stages

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
PRODUCER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
# Element-wise layers that keep a zero channel at zero; anything else between a gate and a consumer
# (e.g. Sigmoid: sigmoid(0) = 0.5) would leak a removed channel and is refused at export time.
ZERO_PRESERVING = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Tanh, nn.Hardswish,
                   nn.Dropout, nn.Dropout2d, nn.Identity)


@dataclass
class GroupMember:
    """One module touched by a channel group: ``channels[k]`` of this module correspond to
    position ``positions[k]`` of the group's gate vector."""

    name: str
    role: str  # "producer" (out channels), "consumer" (in channels), "norm"
    channels: list[int]
    positions: list[int]


@dataclass
class ChannelGroup:
    """A set of coupled channels rooted at the output channels of module ``root``.

    ``size`` channels; ``gate_points`` are the module names whose outputs get multiplied by the gate.
    """

    root: str
    size: int
    members: list[GroupMember] = field(default_factory=list)
    gate_points: list[str] = field(default_factory=list)

    @property
    def producers(self) -> list[GroupMember]:
        return [m for m in self.members if m.role == "producer"]

    @property
    def consumers(self) -> list[GroupMember]:
        return [m for m in self.members if m.role == "consumer"]

    def member(self, name: str, role: str | None = None) -> list[GroupMember]:
        return [m for m in self.members if m.name == name and (role is None or m.role == role)]


@dataclass
class Targets:
    """Result of :func:`find_channel_groups`: prunable groups and skipped layers with reasons."""

    groups: list[ChannelGroup]
    skipped: dict[str, str]  # module name -> reason

    def __len__(self) -> int:
        return len(self.groups)


def set_inplace_false(model: nn.Module) -> int:
    """Turn every in-place activation off. Returns how many modules were changed.

    Not always numerically identical: the official U-Net concatenates a tensor that an in-place
    LeakyReLU has already rewritten. ganslim therefore only switches in-place off while tracing
    (:func:`inplace_disabled`) and leaves the user's semantics alone otherwise."""
    n = 0
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            n += 1
    return n


@contextlib.contextmanager
def inplace_disabled(model: nn.Module):
    """Make ``model`` traceable by torch-pruning for the duration, and restore it afterwards:
    in-place activations off (the tracer loses the norm before an in-place ReLU), every parameter
    requiring grad and autograd on (the tracer follows ``grad_fn``: a frozen teacher, or a call under
    ``torch.no_grad()``, would leave every layer "not reached"). Channel coupling depends on neither."""
    flagged = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for m in flagged:
        m.inplace = False
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield model
    finally:
        for m in flagged:
            m.inplace = True
        for p in frozen:
            p.requires_grad_(False)


def module_matches(name: str, module: nn.Module, patterns: Iterable) -> bool:
    """Whether ``name`` matches a glob of ``patterns`` or ``module`` is an instance of a type in it."""
    for p in patterns:
        if isinstance(p, str) and fnmatch.fnmatchcase(name, p):
            return True
        if isinstance(p, type) and isinstance(module, p):
            return True
    return False


def record_module_io(model: nn.Module, inputs: tuple) -> dict[str, tuple[list[int], list[int]]]:
    """Run one forward pass and record, per leaf module name, the ids of its input and output tensors.
    Used to see which norm directly consumes which conv output."""
    io: dict[str, tuple[list[int], list[int]]] = {}
    handles = []

    def ids(x) -> list[int]:
        if isinstance(x, torch.Tensor):
            return [id(x)]
        if isinstance(x, (tuple, list)):
            return [i for t in x for i in ids(t)]
        return []

    keep = []  # keep tensors alive so ids are not reused within the pass

    for name, m in model.named_modules():
        if len(list(m.children())) == 0:
            def hook(mod, inp, out, name=name):
                io[name] = (ids(inp), ids(out))
                keep.append((inp, out))

            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return io


def _unknown_channel_layer(model: nn.Module, members: list[GroupMember], io: dict) -> str | None:
    """A reason to skip the group when its channels flow (through parameter-free layers) into a layer
    that holds tensors of its own but is unknown to torch-pruning (e.g. a hand-written instance norm
    with per-channel ``scale``/``shift``): such a layer would neither shrink with the group nor keep
    a zeroed channel at zero. None when there is none."""
    names = {mm.name for mm in members}
    frontier = {i for mm in members if mm.role in ("producer", "norm") for i in io.get(mm.name, ([], []))[1]}
    for name, (ins, outs) in io.items():  # forward order: a chain of param-free layers is followed
        if name in names or not frontier.intersection(ins):
            continue
        mod = model.get_submodule(name)
        if next(iter(mod.parameters(recurse=False)), None) is not None or any(
                b.dim() > 0 for b in mod.buffers(recurse=False)):
            return (f"channels pass through {type(mod).__name__} ({name}), a layer with per-channel tensors that "
                    "torch-pruning does not know; replace it by a standard layer (for CartoonGAN: "
                    "ganslim.adapters.cartoongan.convert_instance_norms)")
        frontier.update(outs)
    return None


def find_channel_groups(
    model: nn.Module,
    example_inputs,
    include: Sequence | None = None,
    exclude: Sequence = (),
) -> Targets:
    """Find the prunable channel groups of ``model``.

    ``example_inputs``: a tensor ``(N, C, H, W)`` or a tuple of the model's inputs.
    ``include``/``exclude``: module-name globs (``"model.1*"``) or module types; a group is kept when
    its root matches ``include`` (default: all) and none of its producers match ``exclude``.
    In-place activations are switched off only while tracing.
    """
    import torch_pruning as tp

    inputs = as_input_tuple(example_inputs)
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    try:
        with inplace_disabled(model):
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=list(inputs) if len(inputs) > 1 else inputs[0], verbose=False)
            io = record_module_io(model, inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"could not trace {type(model).__name__} to find prunable channels: {e}") from e
    finally:
        model.train(was_training)

    producers = [m for m in model.modules() if isinstance(m, PRODUCER_TYPES)]
    if not producers:
        raise ValueError(f"{type(model).__name__} has no conv or linear layer: nothing to prune")

    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = {}
    seen_roots = set()
    for m in producers:
        name = names[m]
        if m in seen_roots or m not in dg.module2node:
            if m not in dg.module2node:
                skipped[name] = "not reached by the forward pass"
            continue
        pruner = dg.get_pruner_of_module(m)
        n_out = pruner.get_out_channels(m)
        if n_out is None or n_out < 2:
            skipped[name] = "fewer than 2 output channels"
            continue
        group = dg.get_pruning_group(m, pruner.prune_out_channels, idxs=list(range(n_out)))
        members: list[GroupMember] = []
        reason = None
        for item in group.items:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Module) or mod not in names:
                continue  # functional ops (add, cat, reshape views) carry no weights
            idxs, root_idxs = list(item.idxs), list(item.root_idxs)
            if len(idxs) != len(root_idxs):
                reason = f"channel mapping through {names[mod]} is not one-to-one (reshape-coupled)"
                break
            out_fn = dg.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(mod, NORM_TYPES):
                role = "norm"
            elif isinstance(mod, PRODUCER_TYPES):
                role = "producer" if out_fn else "consumer"
            else:
                reason = f"channels pass through {type(mod).__name__} ({names[mod]}), which ganslim cannot gate"
                break
            if isinstance(mod, nn.GroupNorm) or isinstance(mod, nn.LayerNorm):
                reason = f"{type(mod).__name__} at {names[mod]} mixes channels"
                break
            members.append(GroupMember(names[mod], role, idxs, root_idxs))
        prod_mods = [mm for mm in members if mm.role == "producer"]
        for pm in prod_mods:
            seen_roots.add(model.get_submodule(pm.name))
        if reason is None and not any(mm.role == "consumer" for mm in members):
            reason = "its channels reach the network output (output layer)"
        if reason is None:
            # depthwise/grouped producers couple in and out channels; torch-pruning handles them, but every
            # producer in the group must be a plain (groups == 1) layer or a depthwise one
            # a consumer too: the input channels of a grouped conv can only go in whole blocks
            for mm in members:
                if mm.role == "norm":
                    continue
                pmod = model.get_submodule(mm.name)
                g = getattr(pmod, "groups", 1)
                depthwise = g == getattr(pmod, "in_channels", 0) == getattr(pmod, "out_channels", -1)
                if g != 1 and not depthwise:
                    reason = f"grouped conv {mm.name} (groups={g}) couples channels in blocks"
                    break
        if reason is None and prod_mods and all(getattr(model.get_submodule(pm.name), "groups", 1) > 1
                                                for pm in prod_mods):
            # a depthwise conv's channels are its input's: with no plain layer producing them in the
            # group they are the network input's channels (a depthwise conv on the image), fixed
            reason = f"depthwise conv {prod_mods[0].name} runs on channels no prunable layer produces (the input's)"
        if reason is None:
            reason = _unknown_channel_layer(model, members, io)
        if reason is None and include is not None and not module_matches(name, m, include):
            reason = "not matched by include"
        if reason is None and exclude and any(module_matches(p.name, model.get_submodule(p.name), exclude) for p in prod_mods):
            reason = "excluded by the user"
        if reason is not None:
            for pm in prod_mods or [GroupMember(name, "producer", [], [])]:
                skipped[pm.name] = reason
            continue
        norm_inputs = {i for mm in members if mm.role == "norm" for i in io.get(mm.name, ([], []))[0]}
        gate_points = [mm.name for mm in members if mm.role == "norm"]
        for pm in prod_mods:
            outs = io.get(pm.name, ([], []))[1]
            if not (outs and all(o in norm_inputs for o in outs)):
                gate_points.append(pm.name)
        groups.append(ChannelGroup(root=name, size=n_out, members=members, gate_points=sorted(set(gate_points))))
    if not groups:
        raise ValueError(f"{type(model).__name__} has no prunable channel group"
                         + (f" (skipped: {'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:4])})" if skipped else ""))
    return Targets(groups, skipped)
