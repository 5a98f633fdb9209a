"""Multiply-accumulate (MAC) counts of one forward pass, traced with fvcore.

Two conventions are offered; they differ in how transposed convolutions are counted and in
which cheap element-wise operators contribute.

``convention="papers"`` (default)
    The rules of ``torchprofile.profile_macs`` (v0.0.4), the counter used by GAN Compression,
    CAT and OMGD, re-implemented as fvcore op handles so that the published figures are
    reproduced:

    * convolution, normal **and transposed**: ``N * H_out * W_out * C_out * (C_in / groups) *
      k_h * k_w`` -- a transposed convolution is counted by its OUTPUT size, i.e. as if every
      output pixel were a dense conv of the whole kernel (this over-counts the real work of a
      stride-``s`` transposed conv by ``s**2``);
    * ``linear`` / ``matmul`` / ``mm`` / ``bmm`` / ``addmm`` / ``addmv`` / ``einsum``: their MACs;
    * ``mul`` / ``mul_``: one per output element;
    * batch/instance/layer/group norm: one per output element if the norm has an affine weight,
      **zero otherwise** (the pix2pix/CycleGAN ``InstanceNorm2d(affine=False)`` costs nothing);
    * average pooling and ``mean``: one per output element; out-of-place ``leaky_relu``: one
      per output element (the in-place ``leaky_relu_`` is not counted, as in torchprofile);
      bilinear up-sampling: four per output element;
    * everything else (ReLU, Tanh, padding, add, cat, nearest up-sampling, ...): zero.

    ResNet-9 (``resnet_9blocks``, ngf 64, instance norm) at 1x3x256x256:
    **56,799,264,768 MACs = 56.80 G** -- exactly the sum of its convolutions, the figure quoted
    by GAN Compression (56.8 G).

``convention="true"``
    fvcore's standard count, unchanged: convolutions count real MACs (a transposed conv by its
    INPUT size: ``N * H_in * W_in * C_in * (C_out / groups) * k_h * k_w``), matrix products
    their MACs, and fvcore's rough estimates for normalisation (4 per element, 5 with affine;
    eval batch norm 1 or 2), up-sampling (nearest 1, bilinear 4 per output element) and
    adaptive average pooling (1 per input element).  ResNet-9 at 256²:
    **49,681,530,880 = 49.68 G** (49.55 G of convolutions + 0.13 G of instance norms).

Counts are for the whole batch given (they scale linearly with ``N``).  fvcore counts one fused
multiply-add as one "flop"; every number here is a MAC count (multiply by two for FLOPs).
"""
from __future__ import annotations

import functools
import warnings
from math import prod
from types import SimpleNamespace
from typing import Any, Callable, Dict, Sequence, Union

import torch
import torch.nn as nn

from .._utils import as_input_tuple as _as_tuple

__all__ = ["count_macs", "macs_by_module", "CONVENTIONS"]

CONVENTIONS = ("papers", "true")

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]
Handle = Callable[[list, list], Any]


# --------------------------------------------------------------------------- op handles
@functools.lru_cache(maxsize=None)
def _fvcore():
    """Import ``fvcore.nn`` lazily, silencing the ``torch.jit.script`` DeprecationWarnings its
    ``__init__`` (focal-loss helpers) raises on recent torch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis, jit_handles
        from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
    # (``fvcore.nn.flop_count`` is shadowed by the function of that name, hence the namespace)
    return SimpleNamespace(FlopCountAnalysis=FlopCountAnalysis, jit_handles=jit_handles,
                           default_ops=_DEFAULT_SUPPORTED_OPS)


def _shape(val) -> list[int] | None:
    return _fvcore().jit_handles.get_shape(val)


def _ivalue(val):
    return val.toIValue()


def _numel(val) -> int:
    shape = _shape(val)
    return int(prod(shape)) if shape is not None else 0


def _conv_papers(inputs: list, outputs: list) -> int:
    """``N*prod(out_spatial)*C_out*(C_in/groups)*prod(kernel)`` for normal and transposed convs.

    Works for ``aten::_convolution`` (12/13 inputs) and ``aten::convolution`` (9 inputs): in both
    ``inputs[6]`` is ``transposed`` and ``inputs[8]`` is ``groups``.
    """
    w_shape = _shape(inputs[1])
    out_shape = _shape(outputs[0])
    transposed = bool(_ivalue(inputs[6]))
    groups = int(_ivalue(inputs[8]))
    # weight: (C_out, C_in/g, *k) normally; (C_in, C_out/g, *k) when transposed.
    cin_per_group = w_shape[0] // groups if transposed else w_shape[1]
    return int(prod(out_shape)) * cin_per_group * int(prod(w_shape[2:]))


def _conv_true(inputs: list, outputs: list) -> int:
    """fvcore's conv formula (transposed convs by input size), for both conv op names."""
    conv_flop_count = _fvcore().jit_handles.conv_flop_count
    x_shape, w_shape, out_shape = _shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0])
    return int(conv_flop_count(x_shape, w_shape, out_shape, transposed=bool(_ivalue(inputs[6]))))


def _addmv(inputs: list, outputs: list) -> int:
    n, m = _shape(inputs[1])
    return n * m


def _out_numel(scale: int = 1) -> Handle:
    def handle(inputs: list, outputs: list) -> int:
        return scale * _numel(outputs[0])

    return handle


def _norm_if_affine(affine_index: int) -> Handle:
    def handle(inputs: list, outputs: list) -> int:
        return _numel(outputs[0]) if _shape(inputs[affine_index]) is not None else 0

    return handle


def _handles(convention: str) -> Dict[str, Handle]:
    fv = _fvcore()
    jh = fv.jit_handles
    _DEFAULT_SUPPORTED_OPS = fv.default_ops

    if convention == "true":
        ops: Dict[str, Handle] = dict(_DEFAULT_SUPPORTED_OPS)
        ops["aten::_convolution"] = _conv_true
        ops["aten::convolution"] = _conv_true
        return ops
    if convention != "papers":
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    # Start from "nothing counted" so that fvcore's defaults (e.g. 4/element for instance norm,
    # nearest up-sampling) do not leak into the torchprofile rules.
    ops = {name: None for name in _DEFAULT_SUPPORTED_OPS}
    ops.update({
        "aten::_convolution": _conv_papers,
        "aten::convolution": _conv_papers,
        "aten::addmm": jh.addmm_flop_jit,
        "aten::addmv": _addmv,
        "aten::bmm": jh.bmm_flop_jit,
        "aten::matmul": jh.matmul_flop_jit,
        "aten::mm": jh.matmul_flop_jit,
        "aten::linear": jh.linear_flop_jit,
        "aten::einsum": jh.einsum_flop_jit,
        "aten::mul": _out_numel(1),
        "aten::mul_": _out_numel(1),
        "aten::batch_norm": _norm_if_affine(1),
        "aten::instance_norm": _norm_if_affine(1),
        "aten::layer_norm": _norm_if_affine(2),
        "aten::group_norm": _norm_if_affine(2),
        "aten::leaky_relu": _out_numel(1),
        "aten::upsample_bilinear2d": _out_numel(4),
    })
    for name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                 "avg_pool1d", "avg_pool2d", "avg_pool3d", "mean"):
        ops[f"aten::{name}"] = _out_numel(1)
    return ops


# --------------------------------------------------------------------------- analysis
class _TrainFlags:
    """Context manager: model in eval mode, every module's own ``training`` flag restored after."""

    def __init__(self, model: nn.Module, training: bool = False):
        self.model, self.training = model, training

    def __enter__(self) -> nn.Module:
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)
        return self.model

    def __exit__(self, *exc) -> None:
        for m, flag in self.saved:
            m.training = flag


def _analysis(model: nn.Module, example_inputs: Inputs, convention: str):
    """Run fvcore on ``model`` and return the (already computed) FlopCountAnalysis."""
    FlopCountAnalysis = _fvcore().FlopCountAnalysis
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    handles = _handles(convention)  # validates the convention before any tracing
    inputs = _as_tuple(example_inputs)
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with _TrainFlags(model, False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            analysis.total()  # triggers the trace
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(
                f"cannot trace {type(model).__name__} for MAC counting with inputs of shapes "
                f"{[tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]}: "
                f"{type(e).__name__}: {e}. The model must be traceable by torch.jit.trace "
                "(tensor inputs; tensors, tuples, lists or dicts of tensors as outputs)."
            ) from e
    return analysis


def count_macs(model: nn.Module, example_inputs: Inputs, convention: str = "papers") -> int:
    """Multiply-accumulates of one forward pass ``model(*example_inputs)``.

    Args:
        model: any traceable ``nn.Module``; it is run once in ``eval()`` mode under
            ``torch.no_grad()`` and every module's ``training`` flag is restored afterwards.
        example_inputs: a tensor, e.g. ``(N, C, H, W)``, or a tuple of tensors for a model with
            several inputs (passed positionally). Outputs may be tensors or tuples/lists/dicts
            of tensors.
        convention: ``"papers"`` (transposed convs by output size, torchprofile rules; ResNet-9
            at 1x3x256x256 = 56.80 G) or ``"true"`` (fvcore's standard count; 49.68 G). See the
            module docstring for exactly what each counts.

    Returns:
        MACs (int, not G) for the whole batch of ``example_inputs``.

    Raises:
        ValueError: unknown convention, or the model cannot be traced (the message names the
            model class).
    """
    return int(_analysis(model, example_inputs, convention).total())


def macs_by_module(model: nn.Module, example_inputs: Inputs, convention: str = "papers") -> Dict[str, int]:
    """Per-module MACs of one forward pass (same rules and arguments as :func:`count_macs`).

    Returns:
        ``{qualified_module_name: MACs}`` for every leaf module of ``model`` (modules without
        children, including those that count zero, e.g. ReLU), plus -- only when non-zero -- an
        entry for each non-leaf module whose own ``forward`` runs counted ops directly (functional
        calls such as ``x * gamma``); the root module's own ops appear under ``""``. The values
        therefore sum to ``count_macs(model, example_inputs, convention)``. A module shared under
        several names appears once, under its first name.
    """
    analysis = _analysis(model, example_inputs, convention)
    totals = analysis.by_module()
    # Canonical names (first name of every distinct module), as fvcore uses them.
    names: Dict[nn.Module, str] = {}
    for name, mod in model.named_modules():
        names.setdefault(mod, name)
    result: Dict[str, int] = {}
    for mod, name in names.items():
        # Only children owned under this name (fvcore attributes a shared module's ops to the
        # ancestors of its canonical name).
        child_names = {names[c] for c in mod.children()
                       if names[c].rpartition(".")[0] == name}
        own = int(totals.get(name, 0)) - sum(int(totals.get(c, 0)) for c in child_names)
        if not any(True for _ in mod.children()) or own != 0:
            result[name] = own
    return result
