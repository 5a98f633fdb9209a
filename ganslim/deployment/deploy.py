"""Deployment (module ``ganslim.deployment.deploy``): ``ganslim.export(model, path, format="onnx" | "onnx-int8")`` and an onnxruntime runner.

``onnx``: the float network as ONNX (opset 17, batch/height/width dynamic).

``onnx-int8``: a QDQ ONNX model that onnxruntime executes with integer kernels (QLinearConv,
QLinearAdd, ...): weights int8 per output channel, activations uint8 per tensor. For a QAT model
(:func:`ganslim.deployment.quantization.quantize` + :func:`~ganslim.deployment.quantization.train_qat`) the exported
weights are the fake-quantized ones it was trained with, and the tensors QAT quantized (each
quantized layer's input, and the outputs QAT quantizes as onnxruntime does: a residual branch's, the
output before Tanh) are quantized on the ranges and grid it trained with
(:func:`~ganslim.deployment.quantization.input_ranges`, ``output_ranges``); whatever else onnxruntime
quantizes is calibrated on ``calib_loader``. For a float model
the same call is plain post-training quantization (PTQ), every range calibrated: the baseline QAT
has to beat.

Every file is verified by running it in onnxruntime on the example input before it is moved into
place (written atomically: nothing half-written is left behind).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import pathlib
import tempfile
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .._extras import require
from .._utils import as_input_tuple
from ..core.train import first_output, input_batches, split_batch

__all__ = ["export", "OnnxModule", "FORMATS", "ExportError", "int8_saturates"]

FORMATS = ("onnx", "onnx-int8")


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message names the problem and the fix."""


def _onnx_libs():
    require("onnx", "deploy")  # presence check; ModuleNotFoundError naming pip install 'ganslim[deploy]'
    return require("onnxruntime", "deploy")


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime (CPU), callable like the PyTorch generator it came from.

    ``forward(*inputs) -> Tensor`` (the first output). Usable with every function of
    :mod:`ganslim.measure` (latency, fidelity). ``threads``: onnxruntime intra-op threads
    (default: ``torch.get_num_threads()``).
    """

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, profile_prefix: Optional[str] = None):
        super().__init__()
        ort = _onnx_libs()
        self.path = str(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if profile_prefix is not None:  # onnxruntime's profiler (ganslim.deployment.profile reads its trace)
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        try:
            self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"{self.path}: onnxruntime cannot load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.threads = so.intra_op_num_threads

    def feed(self, *inputs: torch.Tensor) -> dict:
        """The session's input dict for ``inputs`` (float32 numpy arrays by input name)."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path} takes {len(self.input_names)} input(s), got {len(inputs)}")
        return {n: t.detach().cpu().float().contiguous().numpy() for n, t in zip(self.input_names, inputs)}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self.feed(*inputs))[0])

    def op_types(self, optimized: bool = True) -> dict[str, int]:
        """Count of each operator type: in the graph onnxruntime actually runs after its fusions
        (``optimized=True``; ``QLinearConv`` etc. there are integer kernels) or in the file."""
        import onnx

        ort = _onnx_libs()
        path = self.path
        with tempfile.TemporaryDirectory(prefix="ganslim-ort-") as d:
            if optimized:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                so.intra_op_num_threads = 1
                so.optimized_model_filepath = path = os.path.join(d, "optimized.onnx")
                ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
            counts: dict[str, int] = {}
            for node in onnx.load(path, load_external_data=False).graph.node:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    def num_weights(self) -> int:
        """Number of weight values stored in the file (initializers of float or integer type)."""
        import onnx

        n = 0
        for init in onnx.load(self.path, load_external_data=False).graph.initializer:
            if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                                  onnx.TensorProto.UINT8, onnx.TensorProto.BFLOAT16) and len(init.dims) > 1:
                n += math.prod(init.dims)
        return n

    def int8_kernels(self) -> int:
        """Number of integer compute kernels onnxruntime runs (0 for a float model)."""
        return sum(v for k, v in self.op_types().items()
                   if k.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantize")))


def onnx_macs(path: str | os.PathLike, example_inputs: Any) -> int:
    """MACs (papers' convention: a conv, transposed or not, costs ``out_numel * C_in/groups * prod(k)``;
    MatMul/Gemm ``M*N*K``) of one run of an ONNX file on ``example_inputs``. Shapes are read from a
    real onnxruntime run with the compute nodes' outputs exposed, so dynamic graphs count right."""
    import onnx

    ort = _onnx_libs()
    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: list(i.dims) for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}

    def weight_dims(name: str):
        if name in inits:
            return inits[name]
        n = producers.get(name)  # DequantizeLinear(int8 weight) in QDQ graphs
        if n is not None and n.op_type in ("DequantizeLinear", "Cast", "Identity") and n.input[0] in inits:
            return inits[n.input[0]]
        return None

    compute = [n for n in g.node if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    existing = {o.name for o in g.output}
    for n in compute:
        # a weight computed in the graph (e.g. the thin-conv rewrite's strided kernel): read its shape too
        computed_w = [n.input[1]] if len(n.input) > 1 and weight_dims(n.input[1]) is None else []
        for t in [n.output[0], n.input[0]] + computed_w:
            if t not in existing:
                g.output.append(onnx.helper.make_empty_tensor_value_info(t))
                existing.add(t)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {i.name: t.detach().cpu().float().numpy() for i, t in zip(sess.get_inputs(), as_input_tuple(example_inputs))}
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: v.shape for n, v in zip(names, sess.run(names, feed))}
    total = 0
    for n in compute:
        out = shapes.get(n.output[0])
        if out is None:
            continue
        out_numel = math.prod(int(d) for d in out)
        if n.op_type in ("Conv", "ConvTranspose"):
            w = weight_dims(n.input[1]) or (list(shapes[n.input[1]]) if n.input[1] in shapes else None)
            if w is None:
                continue
            groups = next((a.i for a in n.attribute if a.name == "group"), 1)
            cin_per_group = w[0] // groups if n.op_type == "ConvTranspose" else w[1]
            total += out_numel * cin_per_group * math.prod(w[2:])
        else:
            a = shapes.get(n.input[0])
            if a is not None:
                total += out_numel * int(a[-1])
    return total


def _export_float(model: nn.Module, example: tuple, path: pathlib.Path, opset: int) -> list[str]:
    """Export ``model`` as float ONNX; returns the graph's input names."""
    n_in = len(example)
    names = [f"input{i}" for i in range(n_in)] if n_in > 1 else ["input"]
    dyn = {n: {0: "batch", 2: "height", 3: "width"} for n, t in zip(names, example) if t.dim() == 4}
    dyn["output"] = {0: "batch", 2: "height", 3: "width"}

    class _First(nn.Module):  # ONNX gets exactly one image output
        def __init__(self, m: nn.Module):
            super().__init__()
            self.m = m

        def forward(self, *xs):
            return first_output(self.m(*xs))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_First(model).eval(), example, str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["output"], dynamic_axes=dyn, do_constant_folding=True)
    return names


class _CalibReader:
    """onnxruntime ``CalibrationDataReader`` over the user's loader (first ``batches`` batches)."""

    def __init__(self, batches: list[tuple], names: Sequence[str]):
        self._it = iter([{n: t.detach().cpu().float().numpy() for n, t in zip(names, b)} for b in batches])

    def get_next(self):
        return next(self._it, None)


def _calibration_batches(calib_loader: Optional[Iterable], example: tuple, batches: int,
                         batch_fn: Optional[Callable]) -> list[tuple]:
    if calib_loader is not None:
        out = input_batches(calib_loader, batches, batch_fn)
        if not out:
            raise ExportError("calib_loader yielded no batches")
    else:
        warnings.warn("onnx-int8 export without calib_loader: activation ranges come from the example input "
                      "alone; pass calib_loader= (a few batches of real inputs) for a faithful int8 model",
                      stacklevel=3)
        out = [example]
    return out


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the layers "first" and "last" count


def _float_ends(path: pathlib.Path, keep_first: bool, keep_last: bool) -> list[str]:
    """Node names to leave in float: everything up to and including the first weighted node (the
    input's pads too, or onnxruntime would still run that conv on quantized input) and/or the last
    weighted node and what follows it. Graph order is topological in exported files.

    A depthwise conv next to a float end (a depthwise-separable image-facing layer: the thin 1x1 conv
    and its full-resolution depthwise conv) stays float with it: onnxruntime's int8 depthwise kernels
    run slower than its float ones, most at full resolution with a large kernel (``bench_int8_ops.py``
    on a 1/40 separable student: its two 7x7 depthwise convs took 3 ms each as QLinearConv, the int8
    file 1.20x of its fp32 one's time; with them float 0.79x, and 0.28 dB closer to ground truth)."""
    import onnx

    from .onnx_rewrite import is_depthwise

    g = onnx.load(str(path), load_external_data=False).graph
    nodes = g.node
    idx = [i for i, n in enumerate(nodes) if n.op_type in WEIGHTED_OPS]
    if not idx:
        return []
    weights = {i.name: i for i in g.initializer}
    out = []
    if keep_first:
        end = idx[1] if len(idx) > 1 and is_depthwise(nodes[idx[1]], weights) else idx[0]
        out += [n.name for n in nodes[:end + 1]]
    if keep_last:
        start = idx[-2] if len(idx) > 1 and is_depthwise(nodes[idx[-2]], weights) else idx[-1]
        out += [n.name for n in nodes[start:]]
    return out


THIN_CHANNELS = 4  # a conv with at most this many channels in or out: int8 kernels run it slower than float
# Activations the int8 end rewrite leaves after its depth-to-space and crop (the others move in front,
# next to the conv, where the quantizer calibrates the conv's output over the activation's range).
# onnxruntime has no integer Tanh, so it runs in float after a DequantizeLinear wherever it is; left
# after the crop, the depth-to-space and crop move the conv's integer output (a quarter of the bytes).
INT8_UNMOVED_ACTIVATIONS = ("Tanh",)
# The int8 file's depth-to-space and space-to-depth shuffles (sub-pixel transposed convs, integer ends)
# written in channels-last order between two transposes (onnx_rewrite._depth_to_space): onnxruntime
# runs integer convs in NHWC, and those transposes cancel against the ones it puts around them.
INT8_CHANNELS_LAST_SHUFFLES = True
# Float operators onnxruntime runs only in NCHW (an instance norm stays float in an int8 file): next to
# them the layout changes are needed anyway, and a graph holding any keeps the NCHW shuffles (the
# channels-last ones measured 1.03x of their time on an instance-norm student, 0.87-0.91x on batch-norm ones).
NCHW_ONLY_OPS = ("InstanceNormalization", "GroupNormalization", "LRN", "LpNormalization")


def _weighted_ends(path: pathlib.Path) -> list[tuple[str, str, int, int]]:
    """``(name, op type, C_in, C_out)`` of the first and the last weighted node of an exported float
    graph (graph order is topological in exported files); channels 0 where the weight is not a
    constant 4-D tensor."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in g.initializer}
    weighted = [n for n in g.node if n.op_type in WEIGHTED_OPS]
    out = []
    for n in weighted[:1] + weighted[-1:] if len(weighted) > 1 else weighted:
        c_in = c_out = 0
        if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            group = next((a.i for a in n.attribute if a.name == "group"), 1) or 1
            if w.ndim == 4:
                c_out, c_in = (w.shape[0], w.shape[1] * group) if n.op_type == "Conv" else (w.shape[1] * group, w.shape[0])
        out.append((n.name, n.op_type, int(c_in), int(c_out)))
    return out


def _rewrite_float(fp32: pathlib.Path, out: pathlib.Path, example: tuple, int8: bool,
                   int8_ends: Sequence[str] = ()) -> list[str]:
    """Write ``fp32`` with the exact rewrites of :mod:`ganslim.deployment.onnx_rewrite` applied to ``out``: the
    thin output conv as a space-to-depth conv and each depthwise ConvTranspose in its sub-pixel form
    (fp32), or, for ``int8``, each ConvTranspose in its sub-pixel form and the thin end convs named in
    ``int8_ends`` (those to be quantized) as space-to-depth convs. Returns what was rewritten (empty: nothing to do, ``out`` not written).
    The result is run in onnxruntime against the original on ``example``; if it differs (max |diff|
    above 1e-4 of the output's range) the rewrite is dropped with a warning."""
    import onnx

    from .onnx_rewrite import ELEMENTWISE, space_to_depth_thin_conv, subpixel_conv_transpose

    m = onnx.load(str(fp32))
    nchw_only = any(n.op_type in NCHW_ONLY_OPS for n in m.graph.node)
    if int8:
        # thin ends kept in float are rewritten after quantization instead (the quantizer's pre-processing
        # folds the compact weight construction into a 4x larger stored weight: for int8 ends that is the
        # weight it quantizes, for float ones 4x the float bytes)
        # channels_last: onnxruntime runs integer convs in NHWC; shuffles written in NHWC between
        # transposes that cancel against its own leave one block copy each instead of four transposes
        channels_last = INT8_CHANNELS_LAST_SHUFFLES and not nchw_only
        done = subpixel_conv_transpose(m, channels_last=channels_last, depthwise=True)
        if int8_ends:
            done += space_to_depth_thin_conv(m, max_out_channels=THIN_CHANNELS, max_in_channels=THIN_CHANNELS,
                                             only=set(int8_ends),
                                             moved=tuple(a for a in ELEMENTWISE if a not in INT8_UNMOVED_ACTIVATIONS),
                                             channels_last=channels_last)
    else:
        done = space_to_depth_thin_conv(m)
        if not nchw_only:
            # a depthwise ConvTranspose (a separable student's upsampling) runs slower in onnxruntime's float
            # kernels than its sub-pixel form with the channels-last shuffle (0.9x of the 1/40 separable
            # student's time); dense ones as fast as theirs, and next to an instance norm no faster
            done += subpixel_conv_transpose(m, channels_last=True, depthwise=True, dense=False)
    if not done:
        return []
    onnx.save(m, str(out))
    try:
        ref, new = OnnxModule(fp32, threads=1)(*example), OnnxModule(out, threads=1)(*example)
        ok = ref.shape == new.shape and float((ref - new).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    except Exception:
        ok = False
    if not ok:
        warnings.warn("an exact ONNX rewrite (ganslim.onnx_rewrite) changed the model's output; exporting without it",
                      stacklevel=3)
        out.unlink(missing_ok=True)
        return []
    return done


def _made_wide(end: tuple[str, str, int, int], rewritten: Sequence[str]) -> bool:
    """Whether the exact rewrites turned end layer ``end`` (see :func:`_weighted_ends`) into a conv
    that is not thin: a thin conv in its space-to-depth form (4x the channels in and out), a transposed
    conv (stride 2) in its sub-pixel form (4x the outputs), or a layer that was never thin."""
    name, op, c_in, c_out = end
    if op not in ("Conv", "ConvTranspose") or not c_in:
        return False  # Gemm / MatMul, or a weight computed in the graph: kept as the old default did
    if min(c_in, c_out) > THIN_CHANNELS:
        return False  # never thin: the image-facing default (float) stays
    if name not in rewritten:
        return False
    grow_in, grow_out = (4, 4) if op == "Conv" else (1, 4)
    return min(c_in * grow_in, c_out * grow_out) > THIN_CHANNELS


@contextlib.contextmanager
def _shared_quantization(op_types: Sequence[str]):
    """Inside: onnxruntime's QDQ quantizer gives these data-movement ops' outputs their input's scale
    and zero point (as it does for Reshape and Transpose) instead of calibrating them on their own, so
    that :func:`onnx_rewrite.integer_pads` can run them on the integer tensor. Calibrated apart, a
    space-to-depth's output (the same values, reordered) came out with a slightly different scale from
    its input's, which left the op in float between a dequantize and a quantize pass."""
    from onnxruntime.quantization import registry
    from onnxruntime.quantization.operators.direct_q8 import QDQDirect8BitOp

    added = [op for op in op_types if op not in registry.QDQRegistry]
    registry.QDQRegistry.update({op: QDQDirect8BitOp for op in added})
    try:
        yield
    finally:
        for op in added:
            registry.QDQRegistry.pop(op, None)


# where a saturating activation stops telling inputs apart: 1 - tanh(4) = 6.7e-4, 1 - sigmoid(8) = 3.4e-4
SATURATION = {"Tanh": 4.0, "Sigmoid": 8.0}
# operators that only move or select values (one data input): a range that fits their output fits their input
_VALUE_MOVES = ("Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Slice", "DepthToSpace", "SpaceToDepth")


def clip_saturated_ranges(model) -> int:
    """Clip the int8 range of every quantized tensor that only feeds a saturating activation (the
    generator's output Tanh) to where that activation still varies (``SATURATION``: |x| <= 4 for Tanh),
    in place; returns how many ranges changed. The quantize / dequantize pair around it gets the new
    scale and zero point (asymmetric, 0 exact), so onnxruntime's integer conv writes its output on the
    finer grid. A range the calibration found wider than that (a QAT fine-tune had pushed dark regions'
    pre-Tanh values far below -4, and the calibrated range spent its 8 bits on values the Tanh maps to
    -1: ``bench_quant.py --int8-ends`` on the 1/10 student, -1.98 dB to ground truth without the clip,
    -1.15 dB with it) loses nothing here but values the activation takes to its limits anyway."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}  # readers of each tensor's values (a Shape reads only its shape)
    for n in g.node:
        if n.op_type != "Shape":
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1

    def sole_pair(dq):
        """``(q, dq)`` when ``dq`` dequantizes, for one reader, what ``q`` alone quantized, with constant
        per-tensor parameters; else None."""
        q = producer.get(dq.input[0])
        if (dq.op_type != "DequantizeLinear" or readers.get(dq.output[0], 0) != 1 or q is None
                or q.op_type != "QuantizeLinear" or readers.get(q.output[0], 0) != 1 or len(q.input) < 3
                or len(dq.input) < 3 or any(t not in inits for t in (q.input[1], q.input[2], dq.input[1], dq.input[2]))):
            return None
        return q, dq

    def params(node):
        return tuple(numpy_helper.to_array(inits[t]).tobytes() for t in node.input[1:3])

    changed = 0
    for act in g.node:
        limit = SATURATION.get(act.op_type)
        dq = producer.get(act.input[0]) if act.input else None
        pair = sole_pair(dq) if limit is not None and dq is not None else None
        if pair is None:
            continue
        q, dq = pair
        # The pairs up the chain of value-moving ops in front (a depth-to-space and crop the thin output
        # conv's rewrite put there) carry the same parameters and run on the integer tensor: they get
        # the clipped range too, back to the layer that computes the values.
        chain = [pair]
        while True:
            mover = producer.get(chain[-1][0].input[0])
            up = producer.get(mover.input[0]) if mover is not None and mover.op_type in _VALUE_MOVES else None
            up = sole_pair(up) if up is not None else None
            if up is None or params(up[0]) != params(q) or params(up[1]) != params(dq):
                break
            chain.append(up)
        scale, zero = numpy_helper.to_array(inits[q.input[1]]), numpy_helper.to_array(inits[q.input[2]])
        if scale.size != 1 or zero.size != 1 or zero.dtype not in (np.uint8, np.int8):
            continue
        info = np.iinfo(zero.dtype)
        lo, hi = (info.min - float(zero)) * float(scale), (info.max - float(zero)) * float(scale)
        new_lo, new_hi = max(lo, -limit), min(hi, limit)
        # within a step of the limit already: a QAT range clipped there (signed, one level more below
        # zero than above) stays on the grid QAT trained with
        if lo >= -limit - 1.01 * float(scale) and hi <= limit + 1.01 * float(scale):
            continue
        new_scale = np.float32((new_hi - new_lo) / (info.max - info.min))
        new_zero = np.array(np.clip(round(info.min - new_lo / float(new_scale)), info.min, info.max), dtype=zero.dtype)
        names = []
        for kind, value in (("scale", new_scale.reshape(scale.shape)), ("zero_point", new_zero.reshape(zero.shape))):
            name = f"{q.output[0]}_clipped_{kind}"
            g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            names.append(name)
        for node in (n for p in chain for n in p):
            node.input[1], node.input[2] = names
        changed += 1
    if changed:
        from .onnx_rewrite import drop_unused_initializers

        drop_unused_initializers(g)  # the scales and zero points replaced
    return changed


def _layer_nodes(path: pathlib.Path) -> dict[str, list]:
    """``{layer name: the nodes that run it}`` of an exported float graph, for each weighted node whose
    weight is the layer's own parameter (initializer ``m.<layer>.weight``, as :func:`_export_float`
    names it), in graph order. Layers whose weight the graph computes (weight norm, folded constants)
    are absent."""
    import onnx

    out: dict[str, list] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1].endswith(".weight"):
            layer = n.input[1][:-len(".weight")]
            out.setdefault(layer[2:] if layer.startswith("m.") else layer, []).append(n)
    return out


def _layer_tensors(path: pathlib.Path) -> dict[str, tuple[str, str]]:
    """``{layer name: (input tensor, output tensor)}`` of an exported float graph: the first node that
    runs each layer (:func:`_layer_nodes`)."""
    return {layer: (nodes[0].input[0], nodes[0].output[0]) for layer, nodes in _layer_nodes(path).items()}


def _widen(ranges: dict[str, tuple[float, float]], tensor: str, r: tuple[float, float]) -> None:
    """``ranges[tensor]`` becomes the union of what it held and ``r``."""
    old = ranges.get(tensor)
    ranges[tensor] = (min(r[0], old[0]), max(r[1], old[1])) if old else r


def qat_range_overrides(model: nn.Module, fp32: pathlib.Path) -> dict[str, tuple[float, float]]:
    """``{tensor name: (rmin, rmax)}`` of the float export ``fp32`` of QAT model ``model``: the input
    of each quantized layer, and the outputs QAT quantized as the runtime does (a residual branch's),
    on the ranges QAT trained with. Recalibrated instead (onnxruntime's percentile on
    ``calib_loader``), those ranges are not the ones the weights learned to live with. A tensor read
    by several quantized layers gets the union of their ranges."""
    from .quantization import input_ranges, output_ranges

    tensors = _layer_tensors(fp32)
    out: dict[str, tuple[float, float]] = {}
    for side, ranges in ((0, input_ranges(model)), (1, output_ranges(model))):
        for layer, (lo, hi) in ranges.items():
            if layer in tensors:
                _widen(out, tensors[layer][side], (lo, hi))
    return out


def qat_weight_steps(model: nn.Module, fp32: pathlib.Path) -> dict[str, Any]:
    """``{weight initializer: per-output-channel steps}`` of the convolutions QAT model ``model``
    quantized per channel (:func:`ganslim.deployment.quantization.weight_scales`), named as in the
    float export ``fp32``; a transposed conv's entry names the weight of its sub-pixel form, with the
    steps in both channel orders the rewrite writes (a tuple: the one its weights lie on is used), a
    depthwise one's the weight of each phase's depthwise conv.
    onnxruntime quantizes those weights on the grids QAT trained them on, not on grids fitted to the
    weights' maxima after training."""
    from .onnx_rewrite import _attrs, subpixel_weight_name
    from .quantization import weight_scales

    scales = weight_scales(model)
    out = {}
    for layer, nodes in _layer_nodes(fp32).items():
        steps = scales[layer].cpu().numpy() if layer in scales else None
        for n in nodes if steps is not None else ():
            if n.op_type == "Conv":
                out[n.input[1]] = steps
            elif n.op_type == "ConvTranspose":  # its sub-pixel form (onnx_rewrite)
                a = _attrs(n)
                s = int(a.get("strides", [1])[0])
                if a.get("group", 1) > 1:
                    # depthwise: one depthwise conv per output phase, each per channel on the same steps
                    out.update({subpixel_weight_name(n, (rh, rw)): steps for rh in range(s) for rw in range(s)})
                else:  # one conv, its output channels phase- or channel-major
                    out[subpixel_weight_name(n)] = (np.tile(steps, s * s), np.repeat(steps, s * s))
    return out


# Operators onnxruntime's QDQ quantizer runs on its input's quantization (or removes, as a ReLU on an
# asymmetric range): a fixed range for their output is the range of their input.
_RANGE_SHARING = _VALUE_MOVES + ("Pad", "Relu")


def _spread_ranges(graph, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """``ranges`` extended up each chain of :data:`_RANGE_SHARING` operators to the tensor computed in
    front of it (a pad, a ReLU moved next to its conv by a rewrite, a depth-to-space), whose range
    the quantizer would otherwise calibrate and pass down the chain. Unions where chains meet."""
    producer = {o: n for n in graph.node for o in n.output}
    out = dict(ranges)
    for t, r in ranges.items():
        node = producer.get(t)
        while node is not None and node.op_type in _RANGE_SHARING and node.input:
            t = node.input[0]
            _widen(out, t, r)
            node = producer.get(t)
    return out


def _uint8_grid(lo: float, hi: float) -> dict:
    """onnxruntime's uint8 scale and zero point for a fake quantizer's range ``[lo, hi]`` on the same
    grid: unsigned ``[0, amax]`` has 255 steps of amax / 255 (zero point 0); signed ``[-amax, amax]``
    steps of amax / 127 around zero point 128, levels -128..127 (ModelOpt's signed grid; its narrow
    range stops at -127). A fitted [rmin, rmax] would put 255 steps on [-amax, amax] instead: a grid
    127 / 127.5 as fine, every value rounded afresh."""
    if lo >= 0:
        return {"scale": np.array(hi / 255.0, dtype=np.float32), "zero_point": np.array(0, dtype=np.uint8)}
    amax = max(-lo, hi)
    return {"scale": np.array(amax / 127.0, dtype=np.float32), "zero_point": np.array(128, dtype=np.uint8)}


def _quantize_static(fp32: pathlib.Path, out: pathlib.Path, batches: list[tuple], names: Sequence[str],
                     act_calib: str = "percentile", act_percentile: float = 99.9, keep_first: bool = False,
                     keep_last: bool = False, integer_pads: bool = True, reduce_range: bool = False,
                     ranges: Optional[dict[str, tuple[float, float]]] = None,
                     weight_steps: Optional[dict[str, Any]] = None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = fp32.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        src = pre
    except Exception:  # pre-processing is an optimisation; quantize the raw graph when it fails
        src = fp32
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    # thin image-facing layers (3 channels in or out) run slower as int8 than as float on CPU kernels
    exclude = _float_ends(src, keep_first, keep_last)
    if act_calib == "percentile":
        extra["CalibPercentile"] = float(act_percentile)
    if ranges or weight_steps:  # a QAT model's: read the graph as the quantizer will see it
        import onnx
        from onnx import numpy_helper

        g = onnx.load(str(src), load_external_data=False).graph
    if ranges:  # fixed ranges (a QAT model's) for the tensors the graph still has after the rewrites
        if src != fp32:  # the pre-processing's optimizer renames some outputs: follow their producer nodes
            made_by = {o: n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node for o in n.output}
            now = {n.name: n.output[0] for n in g.node if n.name and n.output}
            renamed: dict[str, tuple[float, float]] = {}
            for t, r in ranges.items():
                _widen(renamed, now.get(made_by.get(t), t), r)
            ranges = renamed
        present = {t for n in g.node for t in n.input} | {i.name for i in g.input}
        extra["TensorQuantOverrides"] = {t: [_uint8_grid(lo, hi)]
                                         for t, (lo, hi) in _spread_ranges(g, ranges).items() if t in present}
    if weight_steps:  # a QAT model's weight grids, per output channel, for the convs that keep their weight
        conv_weights = {n.input[1] for n in g.node if n.op_type == "Conv" and len(n.input) > 1}
        overrides = extra.setdefault("TensorQuantOverrides", {})
        values = {i.name: i for i in g.initializer}
        for w, options in weight_steps.items():
            if w not in conv_weights or w not in values:
                continue
            weight = numpy_helper.to_array(values[w]).astype(np.float64)
            for steps in (options if isinstance(options, tuple) else (options,)):
                if weight.shape[0] != len(steps):
                    continue
                # pinned only where the weights lie on the grid (a rewrite that moved them is left alone)
                k = weight / steps.reshape(-1, *[1] * (weight.ndim - 1))
                if np.abs(k - np.round(k)).max() < 1e-3:
                    overrides[w] = [{"axis": 0, "scale": np.array(st, dtype=np.float32),
                                     "zero_point": np.array(0, dtype=np.int8)} for st in steps]
                    break
    with contextlib.redirect_stdout(io.StringIO()), _shared_quantization(("SpaceToDepth", "DepthToSpace")):
        quantize_static(str(src), str(out), _CalibReader(batches, names), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile if act_calib == "percentile" else CalibrationMethod.MinMax,
                        extra_options=extra, nodes_to_exclude=exclude)
    import onnx

    m = onnx.load(str(out))
    if clip_saturated_ranges(m):
        onnx.save(m, str(out))
    if integer_pads:
        from . import onnx_rewrite

        done = onnx_rewrite.integer_pads(m)
        thin = onnx_rewrite.space_to_depth_thin_conv(m)  # the float RGB layer of the int8 graph
        done += onnx_rewrite.shape_of_quantized(m)  # last: the thin conv's crop reads a shape too
        if done or thin:  # `out` still holds the graph as quantized: the reference for the check
            before = OnnxModule(out, threads=1)(*batches[0]) if batches else None
            tmp = out.with_suffix(".rewritten.onnx")
            onnx.save(m, str(tmp))
            after = OnnxModule(tmp, threads=1)(*batches[0]) if before is not None else None
            if before is None or (after.shape == before.shape and float((after - before).abs().max()) <= 1e-4):
                os.replace(tmp, out)
            else:
                tmp.unlink(missing_ok=True)
                warnings.warn("an exact ONNX rewrite changed the int8 model's output; kept the graph as quantized",
                              stacklevel=3)


def int8_saturates() -> bool:
    """Whether this CPU's int8 convolutions (onnxruntime's u8 x s8 kernels) saturate with 8-bit
    weights: x86 without VNNI (``avx512_vnni`` / ``avx_vnni`` / AMX). Where the CPU flags cannot
    be read on x86, True (7-bit weights are safe everywhere); False on ARM (its dot products do
    not saturate) and other machines."""
    import platform

    from ..measure.machine import cpu_flags

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = cpu_flags()
    if flags is None:
        return True
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def _minify(path: pathlib.Path) -> None:
    """Rename internal tensors to short names and drop doc strings (the exporter's long scoped names
    are ~10% of a small int8 file); graph inputs/outputs keep their names, results are identical."""
    import onnx

    m = onnx.load(str(path))
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in m.graph.node for a in n.attribute):
        return  # subgraphs (If/Loop) refer to outer names: leave such a file as exported
    keep = {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    names: dict[str, str] = {}

    def short(n: str) -> str:
        if not n or n in keep:
            return n
        return names.setdefault(n, f"t{len(names)}")

    for init in m.graph.initializer:
        init.name, init.doc_string = short(init.name), ""
    for i, node in enumerate(m.graph.node):
        node.name, node.doc_string = f"n{i}", ""
        for k, v in enumerate(node.input):
            node.input[k] = short(v)
        for k, v in enumerate(node.output):
            node.output[k] = short(v)
    for vi in m.graph.value_info:
        vi.name = short(vi.name)
    m.doc_string = ""
    onnx.save(m, str(path))


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx", example_inputs: Any = None,
           calib_loader: Optional[Iterable] = None, batch_fn: Optional[Callable] = None, calib_batches: int = 8,
           opset: int = 17, verify: bool = True, act_calib: str = "percentile", act_percentile: float = 99.9,
           keep_first_float: Optional[bool] = None, keep_last_float: Optional[bool] = None, rewrites: bool = True,
           reduce_range: Optional[bool] = None) -> pathlib.Path:
    """Write ``model`` to ``path`` for deployment; returns the path.

    Args:
        model: a float generator, or a QAT model from :func:`ganslim.deployment.quantization.quantize`
            (which must have been calibrated).
        format: ``"onnx"`` (float32) or ``"onnx-int8"`` (QDQ, int8 kernels in onnxruntime).
        example_inputs: a tensor ``(N, C, H, W)`` or tuple of tensors fixing the input signature;
            default: one sample of the first ``calib_loader`` batch.
        calib_loader: batches of real inputs for the int8 activation ranges (``batch_fn`` maps a
            batch to inputs, as in :func:`ganslim.compress`); ``calib_batches`` of them are used.
        act_calib, act_percentile: activation ranges for int8 (``"percentile"`` of |x|, or
            ``"max"``). A QAT model's quantized tensors take their ranges from QAT itself
            (:func:`qat_range_overrides`); its other tensors use the settings it was calibrated with.
        keep_first_float, keep_last_float: leave the first / last weighted layer in float in the
            int8 file (a QAT model uses its ``skip_first`` / ``skip_last``). ``None`` (default): int8
            where ``rewrites`` turn a thin image-facing conv (<= 4 channels in or out, e.g. the RGB
            input and output layers) into a wide one (its space-to-depth form, or a transposed conv's
            sub-pixel form), which integer kernels run faster than float ones; float otherwise (a thin
            conv runs slower in int8, and the image-facing layers are the most sensitive).
        rewrites: exact graph rewrites for onnxruntime's CPU kernels (:mod:`ganslim.deployment.onnx_rewrite`):
            a thin output conv (<= 4 channels, e.g. the RGB layer) as a stride-2 conv with 4x the
            channels, itself run as a stride-1 conv on the space-to-depth of its input, +
            depth-to-space (fp32 and int8; for int8 the thin input conv too, when it is quantized); for
            int8 also each ConvTranspose as its sub-pixel form (stride-1 Conv + depth-to-space), which
            runs as an integer QLinearConv where a ConvTranspose stays float, and the pads,
            space-to-depth and depth-to-space between quantized layers on the uint8 tensors instead of
            DequantizeLinear -> op -> QuantizeLinear. Each is verified in onnxruntime against the plain
            export; ``False`` writes the graph as torch exports it (and keeps the ends float by default).
        verify: run the written file in onnxruntime and check its output is finite and close to
            the PyTorch model's (float: max |diff| <= 1e-3; int8: PSNR >= 20 dB).
        reduce_range: int8 weights on 7 bits. x86 CPUs without VNNI multiply uint8 activations by
            int8 weights in pairs summed into int16 (``vpmaddubsw``), which saturates with full-range
            weights: a QAT test student measured 18.1 dB to its float self on such a CPU (AMD EPYC,
            AVX2) and passed with 7-bit weights. ``None`` (default): 7 bits when the exporting CPU is x86
            without VNNI (:func:`int8_saturates`) or the QAT model trained 7-bit weights, 8 bits
            elsewhere. A file exported on a VNNI machine with 8 bits saturates when run on a CPU
            without it. A QAT model's convolution weights are written on the grids QAT trained
            (:func:`qat_weight_steps`) unless 8-bit ones would go into a 7-bit file (rounded again:
            a warning says so; :class:`~ganslim.deployment.quantization.QuantConfig`'s ``weight_bits``
            is 7 on such a CPU by default).
    """
    from . import quantization as Q

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected an nn.Module to export, got {type(model).__name__}")
    _onnx_libs()
    path = pathlib.Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a directory")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: directory {path.parent} does not exist")
    if example_inputs is None:
        if calib_loader is None:
            raise ExportError("pass example_inputs (a tensor like the generator's input) or calib_loader")
        inputs, _ = split_batch(next(iter(calib_loader)), batch_fn)
        example_inputs = tuple(t[:1] for t in inputs)
    example = tuple(t.detach().cpu().float() for t in as_input_tuple(example_inputs))

    if Q.is_quantized(model):
        if not Q.is_calibrated(model):
            raise ExportError("this quantized model was never calibrated: its int8 ranges are unknown. Run "
                              "ganslim.quantization.quantize(model, loader) with a loader of real inputs first")
        if format == "onnx":
            warnings.warn("exporting a QAT model as float ONNX: its weights are written on the int8 grid, "
                          "activations in float", stacklevel=2)
        float_model = Q.to_float(model, quantized_weights=True)
    else:
        float_model = model
    if any(t.device.type != "cpu" for t in float_model.state_dict().values()):
        float_model = copy.deepcopy(float_model).cpu()  # export on the CPU without moving the user's model
    was_training = float_model.training
    float_model.eval()
    try:
        # the scratch folder sits beside the target, so the final move is an atomic rename
        with tempfile.TemporaryDirectory(prefix=".ganslim-export-", dir=path.parent) as tmp_name:
            tmp = pathlib.Path(tmp_name)
            with torch.no_grad():
                reference = first_output(float_model(*example))
            fp32 = tmp / "model.fp32.onnx"
            try:
                names = _export_float(float_model, example, fp32, opset)
            except Exception as e:
                raise ExportError(f"torch.onnx.export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                  "the generator must be traceable (no data-dependent Python control flow)") from None
            result = fp32
            if rewrites and format == "onnx" and _rewrite_float(fp32, tmp / "model.fp32.rewritten.onnx", example, False):
                result = tmp / "model.fp32.rewritten.onnx"
            if format == "onnx-int8":
                batches = _calibration_batches(calib_loader, example, calib_batches, batch_fn)
                result = tmp / "model.int8.onnx"
                qcfg = Q.config_of(model) if Q.is_quantized(model) else None
                keep = [qcfg.skip_first, qcfg.skip_last] if qcfg else [keep_first_float, keep_last_float]
                src = fp32
                if rewrites:
                    ends = _weighted_ends(fp32)
                    ends = ends * 2 if len(ends) == 1 else ends  # one weighted layer: the first and the last
                    # ends to quantize, rewritten first where thin: asked for (False), or left to the
                    # rewrite (None): quantized if it makes them wide, else float as before
                    thin_int8 = [name for (name, op, c_in, c_out), k in zip(ends, keep)
                                 if k is not True and op == "Conv" and 0 < min(c_in, c_out) <= THIN_CHANNELS]
                    done = _rewrite_float(fp32, tmp / "model.fp32.rewritten.onnx", example, True, thin_int8)
                    if done:
                        src = tmp / "model.fp32.rewritten.onnx"
                    if ends:
                        keep = [k if k is not None else not _made_wide(end, done) for end, k in zip(ends, keep)]
                keep = [True if k is None else bool(k) for k in keep]
                ranges = qat_range_overrides(model, fp32) if qcfg else None
                bits = int(qcfg.weight_bits) if qcfg else 8  # quantize() decided it for its CPU
                if reduce_range is None:  # 7-bit weights where they saturate, and for QAT that trained them
                    reduce_range = int8_saturates() or bits <= 7
                # QAT's own weight grids, where the file can hold them without saturating
                steps = qat_weight_steps(model, fp32) if qcfg and (bits <= 7 or not reduce_range) else None
                if qcfg and not steps and reduce_range and bits > 7:
                    warnings.warn(f"this QAT model trained {bits}-bit weights, and the int8 file gets 7-bit ones "
                                  "(reduce_range: onnxruntime's kernels saturate with 8-bit weights on an x86 CPU "
                                  "without VNNI): its weights are rounded again. Quantize with weight_bits=7 for a "
                                  "file that holds the weights QAT trained", stacklevel=2)
                _quantize_static(src, result, batches, names, ranges=ranges,
                                 act_calib=qcfg.act_calib if qcfg else act_calib,
                                 act_percentile=qcfg.act_percentile if qcfg else act_percentile,
                                 keep_first=keep[0], keep_last=keep[-1],
                                 integer_pads=rewrites, reduce_range=bool(reduce_range), weight_steps=steps)
            _minify(result)
            if verify:
                om = OnnxModule(result, threads=1)
                if len(om.input_names) != len(example):
                    raise ExportError(f"the exported graph takes {len(om.input_names)} input(s) but the model takes "
                                      f"{len(example)}: parts of forward() ran outside torch (numpy, .item(), Python "
                                      "control flow) and were frozen as constants; use torch operations")
                out = om(*example)
                if out.shape != reference.shape or not torch.isfinite(out).all():
                    raise ExportError(f"the exported {format} model gives an output of shape {tuple(out.shape)} "
                                      f"(finite: {bool(torch.isfinite(out).all())}), PyTorch gives {tuple(reference.shape)}")
                if format == "onnx":
                    diff = float((out - reference).abs().max())
                    if diff > 1e-3:
                        raise ExportError(f"onnxruntime output differs from PyTorch by {diff:.3g} (> 1e-3)")
                else:
                    from ..measure import psnr

                    p = psnr(out, reference.clamp(-1, 1)) if reference.abs().max() <= 1.0 + 1e-6 else None
                    if p is not None and p < 20.0:
                        raise ExportError(f"the int8 model's output is only {p:.1f} dB PSNR from the float model's: "
                                          "calibrate on real inputs (calib_loader) or keep sensitive layers in float")
            os.replace(result, path)
    finally:
        float_model.train(was_training)
    return path


def measure_deployment(variants: Sequence[tuple[str, nn.Module, str]], reference: nn.Module, eval_pairs: list,
                       teacher: Optional[nn.Module] = None, calib_loader: Optional[Iterable] = None,
                       batch_fn: Optional[Callable] = None, threads: Optional[int] = None, out_dir: Optional[str] = None,
                       latency_seconds: float = 30.0) -> list:
    """Export each ``(name, model, format)`` and measure the file in onnxruntime, side by side.

    ``reference``: the float PyTorch model the PSNR-to-float column compares with;
    ``eval_pairs``: ``[(inputs tuple, target or None)]`` (latency at the first inputs).
    Files go to ``out_dir`` (kept) or a temporary folder (deleted). Returns
    :class:`ganslim.measure.stats.ModelStats` rows (runtime ``onnxruntime`` / ``onnxruntime-int8``) in the order given.
    """
    from .. import measure
    from ..measure.stats import ModelStats

    if not eval_pairs:
        raise ValueError("measure_deployment needs at least one evaluation input")
    eval_pairs = [(as_input_tuple(i), t) for i, t in eval_pairs]  # inputs: a tensor or a tuple of tensors
    first_inputs = eval_pairs[0][0]
    inputs_list = [p[0] for p in eval_pairs]
    with_gt = [(i, t) for i, t in eval_pairs if t is not None]
    rows = []
    with (tempfile.TemporaryDirectory(prefix="ganslim-deploy-") if out_dir is None else contextlib.nullcontext(out_dir)) as d:
        folder = pathlib.Path(d)
        folder.mkdir(parents=True, exist_ok=True)
        for name, model, fmt in variants:
            safe = "".join(c if c.isalnum() else "_" for c in name).strip("_")
            p = export(model, folder / f"{safe}.onnx", fmt, example_inputs=first_inputs, calib_loader=calib_loader,
                       batch_fn=batch_fn)
            om = OnnxModule(p, threads=threads)
            lat = measure.measure_latency(om, first_inputs, warmup=2, repeats=7, max_seconds=latency_seconds)
            row = ModelStats(name=name, runtime="onnxruntime-int8" if fmt == "onnx-int8" else "onnxruntime",
                             threads=threads or torch.get_num_threads(), size_mb=os.path.getsize(p) / 1e6,
                             latency_ms=lat.median_ms, latency_p90_ms=lat.p90_ms,
                             psnr_to_float=measure.compare_outputs(reference, om, inputs_list)["psnr"],
                             int8_ops=om.int8_kernels())
            if teacher is not None:
                row.psnr_to_teacher = measure.compare_outputs(teacher, om, inputs_list)["psnr"]
            if with_gt:
                f = measure.fidelity_to_target(om, with_gt)
                row.psnr_to_gt, row.ssim_to_gt = f["psnr"], f["ssim"]
            rows.append(row)
    return rows
