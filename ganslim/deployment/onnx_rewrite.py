"""Exact ONNX graph rewrites applied by :func:`ganslim.export` (module ``ganslim.deployment.onnx_rewrite``) so
that onnxruntime's CPU provider runs an int8 generator with integer kernels where it otherwise
falls back to float. Every rewrite computes the same function; :func:`ganslim.export` also checks
the rewritten float graph against the original in onnxruntime and keeps the original if they
differ. They work on the exported ``onnx.ModelProto``, so layers written as modules or as functional
calls are treated alike, and batch norm already folded by the exporter stays folded.

``subpixel_conv_transpose`` (float graph, before quantization): onnxruntime has no integer
ConvTranspose kernel, so in a QDQ int8 file every ``ConvTranspose`` stays a float op between
DequantizeLinear/QuantizeLinear, and the upsampling layers of a generator, at its largest feature
maps, become the slowest part of its int8 model. A stride-``s`` transposed convolution is exactly a
stride-1 convolution with ``s*s*C_out`` output channels (one per output phase) followed by
``DepthToSpace(s)`` in CRD mode (= ``torch.nn.PixelShuffle``): output pixel ``o = q*s + r`` only
ever sees the kernel taps ``k = j*s + ((r + p) mod s)``, applied to input ``q + (r + p) div s - j``.
The stride-1 form quantizes to ``QLinearConv``. It does ``ceil(k/s)^2 * s^2 / k^2`` times the
multiply-adds of the transposed conv (16/9 for k3 s2: the phases' kernels are zero-padded to a
common size), which int8 more than pays for.

``space_to_depth_thin_conv`` (float graph, fp32 and int8 alike): a generator's output layer is a
large-kernel conv (7x7) to 3 channels at full resolution. onnxruntime's CPU convolution computes
output channels in blocks of 8/16 (NCHWc), so 3 channels waste most of the work, and in an int8
model this float layer becomes its largest single cost. The same conv is exactly a stride-2 conv
with ``4*C_out`` output channels and a kernel one tap larger (each output phase ``(r_h, r_w)`` gets
the original kernel shifted by ``(r_h, r_w)``) followed by depth-to-space and a crop to the original
size: about 1.3x the multiply-adds in a shape the kernels fill. That strided conv in turn runs as a
stride-1 conv on the space-to-depth of its (zero-padded) input, ``4*C_in`` channels and a kernel half
the size, the same multiply-adds: its 10 or 20 input channels no longer leave the kernels' input
blocks of 8 or 16 partly empty.

The same rewrite widens a thin *input* conv (the RGB input layer, 3 channels in): ``4*C_in`` inputs
and ``4*C_out`` outputs at half the resolution. ``export`` uses both for the int8 ends: in their
space-to-depth form the image-facing convs run as integer ``QLinearConv`` faster than in float,
where with 3 channels they ran slower.

For int8 files both rewrites write their depth-to-space and space-to-depth in channels-last order
between two transposes (``channels_last=True``; the sub-pixel conv's output channels phase-major):
onnxruntime runs integer convs in NHWC with a transpose on each side, and the transposes here cancel
against those, so a shuffle between two integer convs costs one block-copy transpose instead of four
transposes (the 1/20 student's int8 file: 8 Transpose nodes instead of 16, 0.9x of its time).

``integer_pads`` (QDQ graph, after quantization): onnxruntime keeps ``DequantizeLinear -> Pad ->
QuantizeLinear`` (the reflection pads in front of every residual-block conv) as three float passes
over the feature map; a pad only copies values, so the same Pad on the uint8 tensor (constant pads
filled with the zero point, i.e. the quantized 0) gives bit-identical results in one integer pass.
``SpaceToDepth`` and ``DepthToSpace`` between quantized layers likewise (``export`` has the quantizer
give their outputs their input's scale, so the pair around them matches).

``shape_of_quantized`` (QDQ graph, after quantization): a ``Shape`` of a dequantized tensor (the
exporter's GroupNorm reads its input's shape to reshape back) keeps a whole ``DequantizeLinear`` pass
over the feature map alive only for its shape; ``Shape`` of the integer tensor is the same.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import numpy as np

__all__ = ["subpixel_conv_transpose", "integer_pads", "axis_plan", "subpixel_weight", "space_to_depth_thin_conv",
           "shape_of_quantized", "inline_constant_identities", "is_depthwise", "subpixel_weight_name", "ELEMENTWISE"]


def axis_plan(k: int, s: int, p: int, op: int) -> tuple[int, int, int, int, list[list[tuple[int, int]]]]:
    """One spatial axis of a ConvTranspose (kernel ``k``, stride ``s``, padding ``p``, output padding
    ``op``, dilation 1) as a stride-1 conv followed by depth-to-space.

    Returns ``(kernel, pad_before, pad_after, crop_after, taps)``: the stride-1 kernel size, the
    zero padding of its input before/after (negative: the input would have to be cropped), how
    many trailing outputs of the depth-to-space result to drop, and for each output phase ``r`` its
    ``(new tap, original tap)`` pairs. None of these depends on the input length ``L`` (so the
    rewrite holds for dynamic shapes): the transposed conv gives ``L*s + c`` outputs
    (``c = k + op - 2p - s``), the stride-1 conv ``L + ceil(c/s)`` per phase."""
    pairs = []  # (phase r, input offset d relative to q, original tap)
    for r in range(s):
        a, b = divmod(r + p, s)
        for j in range((k - b + s - 1) // s if b < k else 0):
            pairs.append((r, a - j, j * s + b))
    lo, hi = min(d for _, d, _ in pairs), max(d for _, d, _ in pairs)
    kernel = hi - lo + 1
    c = k + op - 2 * p - s
    extra = -(-c // s)  # ceil(c / s)
    pad_before = -lo
    pad_after = extra - 1 + kernel - pad_before
    crop_after = extra * s - c
    taps = [[(d - lo, t) for rr, d, t in pairs if rr == r] for r in range(s)]
    return kernel, pad_before, pad_after, crop_after, taps


def subpixel_weight(w: np.ndarray, s: int, plans, phase_major: bool = False) -> np.ndarray:
    """ConvTranspose weight ``(C_in, C_out, k_h, k_w)`` -> stride-1 conv weight
    ``(C_out*s*s, C_in, K_h, K_w)``, output channel ``(c, r_h, r_w)`` in DepthToSpace CRD order, or
    with ``phase_major`` ``(r_h, r_w, c)`` (DCR order, what :func:`_depth_to_space` takes with
    ``channels_last``)."""
    (kh, _, _, _, taps_h), (kw, _, _, _, taps_w) = plans
    c_in, c_out = w.shape[:2]
    new = np.zeros((c_out, s, s, c_in, kh, kw), dtype=w.dtype)
    wt = w.transpose(1, 0, 2, 3)
    for rh in range(s):
        for th, oh in taps_h[rh]:
            for rw in range(s):
                for tw, ow in taps_w[rw]:
                    new[:, rh, rw, :, th, tw] = wt[:, :, oh, ow]
    if phase_major:
        new = new.transpose(1, 2, 0, 3, 4, 5)
    return np.ascontiguousarray(new).reshape(c_out * s * s, c_in, kh, kw)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unique(model, base: str) -> str:
    taken = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output} \
        | {i.name for i in model.graph.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def subpixel_conv_transpose(model, only: Optional[set] = None, channels_last: bool = False,
                            depthwise: bool = False, dense: bool = True) -> list[str]:
    """Rewrite (in place) every eligible float ``ConvTranspose`` of ``model`` (an
    ``onnx.ModelProto``) as ``Conv -> DepthToSpace [-> Slice]``; returns the rewritten node names.

    Eligible: 2-D, constant float weight (and bias), group 1, dilation 1, equal strides, explicit
    pads (no ``auto_pad``/``output_shape``) whose stride-1 form needs no input cropping. Others
    are left as they are. ``only``: restrict to these node names. ``channels_last``: the
    depth-to-space in its channels-last form (see :func:`_depth_to_space`; for int8 graphs).

    ``depthwise``: a depthwise ConvTranspose (group = channels, one output per group) too, as one
    depthwise conv per output phase, their outputs concatenated phase-major and shuffled by a DCR
    depth-to-space (for int8 graphs: one grouped conv with ``s*s`` outputs per group would be a
    single node, but onnxruntime's int8 kernels run grouped convs other than depthwise ones far
    slower; each phase's depthwise conv runs as an integer depthwise QLinearConv). ``dense=False``:
    only the depthwise ones (a float graph: onnxruntime's float dense ConvTranspose is as fast as its
    sub-pixel form, its depthwise one slower)."""
    inline_constant_identities(model)  # so a norm's parameters are initializers the fold can read

    def rewrite(node, inits, consumers, outputs):
        if node.op_type != "ConvTranspose" or (only is not None and node.name not in only):
            return None
        if not dense and _attrs(node).get("group", 1) == 1:
            return None
        users = consumers.get(node.output[0], [])
        bn = users[0] if (len(users) == 1 and node.output[0] not in outputs
                          and _foldable_batchnorm(users[0], inits)) else None
        act = _sole_elementwise_user(bn.output[0] if bn is not None else node.output[0], consumers, outputs)
        new = _subpixel_nodes(model, node, inits, bn, act, channels_last, depthwise)
        return None if new is None else (new, [n for n in (bn, act) if n is not None])

    return _rewrite_each(model, rewrite)


def inline_constant_identities(model) -> int:
    """Point every reader of ``Identity(initializer)`` at the initializer and drop the Identity (in
    place); returns how many. Exact. torch's exporter writes equal initializers once and the others as
    Identity nodes of it (a fresh BatchNorm's weight and running variance are both ones), which hides
    constants from rewrites that fold them."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    alias = {n.output[0]: n.input[0] for n in g.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return 0
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.output and n.output[0] in alias:
            continue
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return len(alias)


def _rewrite_each(model, rewrite) -> list[str]:
    """Walk the graph once; ``rewrite(node, inits, consumers, outputs)`` returns None (keep the node) or
    ``(new nodes, absorbed nodes)``, the absorbed ones (a folded norm, a moved activation) being dropped
    where they stood. Unused initializers go. Returns the names of the rewritten nodes."""
    g = model.graph
    index = _graph_index(g)
    done, nodes, absorbed = [], [], set()
    for node in g.node:
        if node.output and node.output[0] in absorbed:
            continue
        out = rewrite(node, *index)
        if out is None:
            nodes.append(node)
            continue
        new, eaten = out
        nodes.extend(new)
        done.append(node.name)
        absorbed.update(n.output[0] for n in eaten)
    if done:
        _replace_nodes(g, nodes)
    return done


def _sole_elementwise_user(name: str, consumers: dict, outputs: set, types: Optional[Sequence[str]] = None):
    """The elementwise activation (of ``types``, default ``ELEMENTWISE``) that alone reads tensor
    ``name`` (not a graph output), else None."""
    users = consumers.get(name, [])
    types = ELEMENTWISE if types is None else types
    return users[0] if (len(users) == 1 and name not in outputs and users[0].op_type in types
                        and users[0].input[0] == name) else None


def _int_const(model, base: str, values) -> str:
    """Add an int64 initializer holding ``values`` under a fresh name derived from ``base``; returns it."""
    from onnx import numpy_helper

    name = _unique(model, base)
    model.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def _graph_index(g) -> tuple[dict, dict, set]:
    """(initializers by name, consumer nodes by tensor name, graph output names) of graph ``g``."""
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return {i.name: i for i in g.initializer}, consumers, {o.name for o in g.output}


def _replace_nodes(g, nodes: list) -> None:
    """Give graph ``g`` the node list ``nodes`` and drop the initializers no node reads any more."""
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(g)


def drop_unused_initializers(g) -> None:
    """Remove from graph ``g`` (in place) the initializers that no node reads and that are not graph inputs."""
    used = {i for n in g.node for i in n.input} | {x.name for x in g.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def is_depthwise(node, inits) -> bool:
    """Whether ``node`` is a depthwise ``Conv`` or ``ConvTranspose`` (group > 1, one input channel per
    group; a transposed one also one output per group) with a constant 4-D weight in ``inits``
    (initializers by name)."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2 or node.input[1] not in inits:
        return False
    group, dims = _attrs(node).get("group", 1), list(inits[node.input[1]].dims)
    if group <= 1 or len(dims) != 4 or dims[1] != 1:
        return False
    return node.op_type == "Conv" or dims[0] == group  # ConvTranspose weight: (C_in, C_out / group, k, k)


def _foldable_batchnorm(node, inits) -> bool:
    a = _attrs(node)
    return (node.op_type == "BatchNormalization" and len(node.output) == 1 and not a.get("training_mode", 0)
            and len(node.input) == 5 and all(i in inits for i in node.input[1:]))


# elementwise activations that commute with DepthToSpace (moved in front of it, next to the conv)
ELEMENTWISE = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "Elu", "Selu", "Softplus", "HardSwish")


def subpixel_weight_name(node, phase: Optional[tuple[int, int]] = None) -> str:
    """The name :func:`subpixel_conv_transpose` gives the weight of ConvTranspose ``node``'s sub-pixel
    conv, or (``phase=(r_h, r_w)``) of a depthwise one's conv for that output phase (unless taken)."""
    base = f"{node.name or node.output[0]}_subpixel_w"
    return base if phase is None else f"{base}{phase[0]}{phase[1]}"


def _subpixel_nodes(model, node, inits, bn=None, act=None, channels_last: bool = False, depthwise: bool = False):
    """The nodes replacing ConvTranspose ``node`` (None: not eligible). ``bn``: an inference
    BatchNormalization reading only its output, folded into the new weights (it would otherwise
    sit after the DepthToSpace, where onnxruntime cannot fuse it into the conv). ``act``: an
    elementwise activation after that, moved in front of the DepthToSpace, so that the int8
    quantizer sees Conv -> Relu and quantizes the conv's output over the activation's range (a
    range calibrated on the pre-ReLU values is far wider and costs >10 dB of PSNR)."""
    from onnx import helper, numpy_helper

    a = _attrs(node)
    if len(node.input) < 2 or node.input[1] not in inits or (len(node.input) > 2 and node.input[2]
                                                             and node.input[2] not in inits):
        return None
    w = numpy_helper.to_array(inits[node.input[1]])
    if w.ndim != 4 or w.dtype != np.float32:
        return None
    k = list(a.get("kernel_shape", w.shape[2:]))
    s = list(a.get("strides", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    op = list(a.get("output_padding", [0, 0]))
    group = a.get("group", 1)
    per_phase = depthwise and is_depthwise(node, inits)
    if ((group != 1 and not per_phase) or any(d != 1 for d in a.get("dilations", [1, 1])) or "output_shape" in a
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(k) != 2 or list(w.shape[2:]) != k
            or s[0] != s[1] or pads[0] != pads[2] or pads[1] != pads[3] or any(o >= st for o, st in zip(op, s))):
        return None  # asymmetric ConvTranspose pads, output_shape etc.: not handled, left as is
    stride = s[0]
    plans = [axis_plan(k[i], stride, pads[i], op[i]) for i in range(2)]
    if any(pl[1] < 0 or pl[2] < 0 for pl in plans):
        return None
    b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    if bn is not None:  # y = (x - mean) / sqrt(var + eps) * gamma + beta, per output channel
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:])
        scale = gamma / np.sqrt(var + _attrs(bn).get("epsilon", 1e-5))
        # output channel c: weight axis 1 (C_in, C_out, k, k), or axis 0 for a depthwise one (C, 1, k, k)
        w = (w.astype(np.float64) * (scale[:, None, None, None] if per_phase else scale[None, :, None, None]))
        w = w.astype(np.float32)
        b = ((b if b is not None else 0.0) - mean) * scale + beta
        out = bn.output[0]
    if per_phase:
        return _depthwise_subpixel_nodes(model, node, w, b, plans, stride, out, act, channels_last)
    wn = subpixel_weight(w, stride, plans, phase_major=channels_last)
    base = node.name or node.output[0]
    w_name = _unique(model, subpixel_weight_name(node))
    model.graph.initializer.append(numpy_helper.from_array(wn, w_name))
    inputs = [node.input[0], w_name]
    if b is not None:
        b_name = _unique(model, f"{base}_subpixel_b")
        b = np.tile(b, stride * stride) if channels_last else np.repeat(b, stride * stride)
        model.graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), b_name))
        inputs.append(b_name)
    crop = [plans[0][3], plans[1][3]]
    conv_out = _unique(model, f"{base}_subpixel") if (stride > 1 or any(crop)) else out
    if act is not None:
        out = act.output[0]
        conv_out = _unique(model, f"{base}_subpixel")
    new = [helper.make_node("Conv", inputs, [conv_out], name=f"{base}_subpixel_conv",
                            kernel_shape=[plans[0][0], plans[1][0]], strides=[1, 1],
                            pads=[plans[0][1], plans[1][1], plans[0][2], plans[1][2]])]
    if act is not None:
        act_out = _unique(model, f"{base}_act") if (stride > 1 or any(crop)) else out
        moved = copy.deepcopy(act)
        moved.input[0] = conv_out
        moved.output[0] = act_out
        new.append(moved)
        conv_out = act_out
    if stride > 1:
        d2s_out = _unique(model, f"{base}_d2s") if any(crop) else out
        new += _depth_to_space(model, conv_out, d2s_out, stride, wn.shape[0] // (stride * stride), f"{base}_d2s",
                               channels_last)
        conv_out = d2s_out
    if any(crop):
        new.append(_crop_node(model, conv_out, out, crop, base))
    return new


def _depthwise_subpixel_nodes(model, node, w: np.ndarray, b, plans, s: int, out: str, act, channels_last: bool):
    """Depthwise ConvTranspose ``node`` (weight ``w`` ``(C, 1, k, k)``, BatchNorm already folded, bias
    ``b`` or None, writing ``out``) as one depthwise stride-1 conv per output phase ``(r_h, r_w)``
    (the phase's taps of the kernel), each followed by a copy of the activation ``act``, concatenated
    phase-major (channel ``(r_h*s + r_w)*C + c``) and shuffled by a DCR depth-to-space, then cropped."""
    from onnx import helper, numpy_helper

    (kh, ph0, ph1, crop_h, taps_h), (kw, pw0, pw1, crop_w, taps_w) = plans
    c = w.shape[0]
    base = node.name or node.output[0]
    b_name = None
    if b is not None:
        b_name = _unique(model, f"{base}_subpixel_b")
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(b, np.float32), b_name))
    new, phases = [], []
    for rh in range(s):
        for rw in range(s):
            wp = np.zeros((c, 1, kh, kw), np.float32)
            for th, oh in taps_h[rh]:
                for tw, ow in taps_w[rw]:
                    wp[:, 0, th, tw] = w[:, 0, oh, ow]
            w_name = _unique(model, subpixel_weight_name(node, (rh, rw)))
            model.graph.initializer.append(numpy_helper.from_array(wp, w_name))
            y = _unique(model, f"{base}_subpixel{rh}{rw}")
            new.append(helper.make_node("Conv", [node.input[0], w_name] + ([b_name] if b_name else []), [y],
                                        name=f"{base}_subpixel_conv{rh}{rw}", group=c, kernel_shape=[kh, kw],
                                        strides=[1, 1], pads=[ph0, pw0, ph1, pw1]))
            if act is not None:
                moved = copy.deepcopy(act)
                moved.input[0], moved.output[0] = y, _unique(model, f"{base}_act{rh}{rw}")
                moved.name = f"{act.name or base}_phase{rh}{rw}"
                new.append(moved)
                y = moved.output[0]
            phases.append(y)
    final = act.output[0] if act is not None else out
    d2s = _unique(model, f"{base}_d2s") if (crop_h or crop_w) else final
    if s == 1:  # one phase: its conv (and activation) is the whole of it
        new[-1].output[0] = d2s
    else:
        stacked = _unique(model, f"{base}_subpixel_phases")
        new.append(helper.make_node("Concat", phases, [stacked], axis=1))
        if channels_last:
            new += _depth_to_space(model, stacked, d2s, s, c, f"{base}_d2s", channels_last=True)
        else:
            new.append(helper.make_node("DepthToSpace", [stacked], [d2s], blocksize=s, mode="DCR"))
    if crop_h or crop_w:
        new.append(_crop_node(model, d2s, final, [crop_h, crop_w], base))
    return new


def _crop_node(model, x: str, y: str, crop: list, base: str):
    """Slice dropping the last ``crop[0]`` rows and ``crop[1]`` columns of ``x`` (NCHW) into ``y``."""
    from onnx import helper

    big = np.iinfo(np.int64).max
    names = [_int_const(model, f"{base}_crop_{suffix}", v)
             for suffix, v in (("starts", [0, 0]), ("ends", [-c if c else big for c in crop]), ("axes", [2, 3]))]
    return helper.make_node("Slice", [x] + names, [y], name=f"{base}_subpixel_crop")


def space_to_depth_thin_conv(model, max_out_channels: int = 4, stride: int = 2, max_in_channels: int = 0,
                             only: Optional[set] = None, moved: Sequence[str] = ELEMENTWISE,
                             channels_last: bool = False) -> list[str]:
    """Rewrite (in place) every float 2-D ``Conv`` with at most ``max_out_channels`` outputs, or at most
    ``max_in_channels`` inputs (group 1, stride 1, dilation 1, explicit pads, constant weights, kernel
    >= 2) as ``Conv(stride) -> [activation] -> DepthToSpace -> Slice``; returns the rewritten node
    names. An elementwise activation reading only the conv's output (the generator's Tanh) moves in
    front of the depth-to-space (``moved``: the activation types that may move; others stay after
    the crop). The crop is computed from the input's shape, so dynamic sizes (odd ones too) work.
    ``only``: restrict to these node names.

    A thin *input* conv (the generator's RGB input layer, 3 channels in) becomes a conv with ``4*C_in``
    inputs and ``4*C_out`` outputs at half the resolution: that is what lets an int8 file run it as an
    integer ``QLinearConv`` (with 3 input channels int8 is slower than float). In float the same form is
    not faster (the depth-to-space of its wide output costs what the conv saves), so ``export`` uses it
    for int8 only.

    ``channels_last``: the space-to-depth and depth-to-space in their channels-last forms (see
    :func:`_depth_to_space`; for int8 graphs)."""
    def rewrite(node, inits, consumers, outputs):
        if only is not None and node.name not in only:
            return None
        return _thin_conv_nodes(model, node, inits, consumers, outputs, max_out_channels, int(stride), max_in_channels,
                                moved, channels_last)

    return _rewrite_each(model, rewrite)


def _thin_conv_nodes(model, node, inits, consumers, outputs, max_out_channels: int, s: int, max_in_channels: int = 0,
                     moved: Sequence[str] = ELEMENTWISE, channels_last: bool = False):
    """``(new nodes, [moved activation])`` replacing thin Conv ``node``, or None when it is not eligible."""
    from onnx import helper, numpy_helper

    if not (node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in inits
            and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)):
        return None
    a = _attrs(node)
    w = numpy_helper.to_array(inits[node.input[1]])
    k = list(a.get("kernel_shape", w.shape[2:]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if not (w.ndim == 4 and w.dtype == np.float32 and (w.shape[0] <= max_out_channels or w.shape[1] <= max_in_channels)
            and a.get("group", 1) == 1
            and all(v == 1 for v in a.get("strides", [1, 1])) and all(v == 1 for v in a.get("dilations", [1, 1]))
            and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and len(k) == 2 and min(k) >= 2):
        return None
    act = _sole_elementwise_user(node.output[0], consumers, outputs, moved)
    c_out, c_in = w.shape[:2]
    kn = [k[0] + s - 1, k[1] + s - 1]
    base = node.name or node.output[0]

    def const(name, v):
        return _int_const(model, f"{base}_{name}", v)

    # The strided kernel of phase (r_h, r_w) is the original kernel shifted by (r_h, r_w): built in the
    # graph from the original weight (Pad, Concat, Reshape on constants), so the file keeps the compact
    # weight and onnxruntime folds the expanded one once when it loads the model. Output channels in
    # depth-to-space CRD order (c, r_h, r_w), or channels-last DCR order (r_h, r_w, c).
    phase_axis = 0 if channels_last else 1
    new, phases = [], []
    for rh in range(s):
        for rw in range(s):
            padded, phase = (_unique(model, f"{base}_s2d_w{rh}{rw}{t}") for t in ("p", "u"))
            new += [helper.make_node("Pad", [node.input[1], const(f"s2d_pads{rh}{rw}",
                                     [0, 0, rh, rw, 0, 0, s - 1 - rh, s - 1 - rw])], [padded]),
                    helper.make_node("Unsqueeze", [padded, const(f"s2d_ax{rh}{rw}", [phase_axis])], [phase])]
            phases.append(phase)
    stacked, w_name = _unique(model, f"{base}_s2d_wstack"), _unique(model, f"{base}_s2d_w")
    new += [helper.make_node("Concat", phases, [stacked], axis=phase_axis),  # (C_out, s*s, C_in, K, K) or (s*s, C_out, ...)
            helper.make_node("Reshape", [stacked, const("s2d_wshape", [c_out * s * s, c_in, kn[0], kn[1]])], [w_name])]
    ins = [node.input[0], w_name]
    if len(node.input) > 2 and node.input[2]:
        b_col, b_rep, b_name = (_unique(model, f"{base}_s2d_b{t}") for t in ("col", "rep", ""))
        new += [helper.make_node("Unsqueeze", [node.input[2], const("s2d_bax", [phase_axis])], [b_col]),
                helper.make_node("Expand", [b_col, const("s2d_bexp", [s * s, c_out] if channels_last else [c_out, s * s])],
                                 [b_rep]),
                helper.make_node("Reshape", [b_rep, const("s2d_bshape", [c_out * s * s])], [b_name])]
        ins.append(b_name)
    final = act.output[0] if act is not None else node.output[0]
    conv_out = _unique(model, f"{base}_s2d")
    if kn[0] % s or kn[1] % s:
        # trailing zero pad of s-1 so every phase has ceil(H_out / s) rows; the crop removes the extra
        new.append(helper.make_node("Conv", ins, [conv_out], name=f"{base}_s2d_conv", kernel_shape=kn,
                                    strides=[s, s], pads=[pads[0], pads[1], pads[2] + s - 1, pads[3] + s - 1]))
    else:
        new += _input_space_to_depth_conv(model, node.input[0], ins[1:], conv_out, c_out * s * s, c_in, kn, pads, s,
                                          f"{base}_s2d", channels_last)
    if act is not None:
        moved_act = copy.deepcopy(act)
        moved_act.input[0] = conv_out
        moved_act.output[0] = conv_out = _unique(model, f"{base}_s2d_act")
        new.append(moved_act)
    d2s = _unique(model, f"{base}_s2d_d2s")
    new += _depth_to_space(model, conv_out, d2s, s, c_out, f"{base}_s2d_d2s", channels_last)
    shp, hw, ends = (_unique(model, f"{base}_s2d_{t}") for t in ("shape", "hw", "ends"))
    new += [helper.make_node("Shape", [node.input[0]], [shp]),
            helper.make_node("Slice", [shp, const("s2d_st", [2]), const("s2d_en", [4])], [hw]),
            helper.make_node("Add", [hw, const("s2d_off", [pads[0] + pads[2] - k[0] + 1,
                                                           pads[1] + pads[3] - k[1] + 1])], [ends]),
            helper.make_node("Slice", [d2s, const("s2d_zero", [0, 0]), ends, const("s2d_axes", [2, 3])],
                             [final], name=f"{base}_s2d_crop")]
    return new, [act] if act is not None else []


def _input_space_to_depth_conv(model, x: str, params: list, y: str, c_out: int, c_in: int, kn: list, pads: list,
                               s: int, base: str, channels_last: bool = False) -> list:
    """The stride-``s`` conv ``y = Conv(x, params, kernel kn, pads + (s-1) at the end)`` as a stride-1
    conv on ``SpaceToDepth(s)`` of the zero-padded input (``kn`` divisible by ``s``).

    Tap ``(s*a + p, s*b + q)`` of the strided kernel reads input pixel ``(s*(i + a) + p, s*(j + b) + q)``,
    which is pixel ``(i + a, j + b)`` of channel ``(p*s + q)*C_in + c`` of the space-to-depth input
    (ONNX's order): the same sums, with ``s*s`` times the input channels and a kernel ``s`` times smaller.
    onnxruntime's blocked CPU convolution computes input channels 8 or 16 at a time, so the 10 or 20
    channels of a thin generator's last layer leave blocks partly empty; stride 1 on 4x the channels
    fills them.
    The input is padded at the end to a multiple of ``s`` (computed from its shape, so dynamic sizes
    work); the extra rows only add outputs past the ones the crop after it keeps. ``channels_last``:
    the pad and space-to-depth in channels-last order between two transposes (see :func:`_depth_to_space`)."""
    from onnx import helper

    def const(name, v):
        return _int_const(model, f"{base}_{name}", v)

    t = [_unique(model, f"{base}_i2d_{i}") for i in range(10)]
    k2 = [kn[0] // s, kn[1] // s]
    w, rest = params[0], params[1:]
    nodes = [
        # weight (C_out, C_in, kn, kn) -> (C_out, s*s*C_in, kn/s, kn/s) in SpaceToDepth's channel order
        helper.make_node("Reshape", [w, const("w6", [c_out, c_in, k2[0], s, k2[1], s])], [t[0]]),
        helper.make_node("Transpose", [t[0]], [t[1]], perm=[0, 3, 5, 1, 2, 4]),
        helper.make_node("Reshape", [t[1], const("w4", [c_out, s * s * c_in, k2[0], k2[1]])], [t[2]]),
        # end pads: the strided form's (pads + s - 1), rounded up so the padded size divides by s
        helper.make_node("Shape", [x], [t[3]]),
        helper.make_node("Slice", [t[3], const("st", [2]), const("en", [4])], [t[4]]),
        helper.make_node("Add", [t[4], const("tot", [pads[0] + pads[2] + s - 1, pads[1] + pads[3] + s - 1])], [t[5]]),
        helper.make_node("Neg", [t[5]], [t[6]]),
        helper.make_node("Mod", [t[6], const("s", [s, s])], [t[7]]),
        helper.make_node("Add", [t[7], const("end", [pads[2] + s - 1, pads[3] + s - 1])], [t[8]]),
        helper.make_node("Concat", [const("begin", [0, 0, pads[0], pads[1], 0, 0]), t[8]], [t[9]], axis=0),
    ]
    padded, s2d = _unique(model, f"{base}_i2d_pad"), _unique(model, f"{base}_i2d_s2d")
    if channels_last:
        nodes += _space_to_depth_channels_last(model, x, t[9], s2d, s, c_in, base)
    else:
        nodes += [helper.make_node("Pad", [x, t[9]], [padded], mode="constant"),
                  helper.make_node("SpaceToDepth", [padded], [s2d], blocksize=s)]
    nodes.append(helper.make_node("Conv", [s2d, t[2], *rest], [y], name=f"{base}_conv", kernel_shape=k2,
                                  strides=[1, 1], pads=[0, 0, 0, 0]))
    return nodes


def _space_to_depth_channels_last(model, x: str, nchw_pads: str, y: str, s: int, c: int, base: str) -> list:
    """``SpaceToDepth(s)(Pad(x, nchw_pads))`` (zero pad; ``x`` ``(N, c, H, W)``) computed in channels-last
    order between two transposes: NCHW -> NHWC, pad, Reshape ``(N, H/s, s, W/s, s*c)``, a transpose
    of two middle axes (copies of ``s*c``-element runs), Reshape, NHWC -> NCHW. Same values, same
    channel order ``(p*s + q)*c + ch`` as ONNX's SpaceToDepth. See :func:`_depth_to_space` for why."""
    from onnx import helper

    def const(name, v):
        return _int_const(model, f"{base}_{name}", v)

    t = [_unique(model, f"{base}_nhwc_s2d_{i}") for i in range(10)]
    return [
        helper.make_node("Transpose", [x], [t[0]], perm=[0, 2, 3, 1]),  # (N, H, W, c)
        # pads [N, C, H, W begins, N, C, H, W ends] -> the same per axis in NHWC order
        helper.make_node("Gather", [nchw_pads, const("pad_order", [0, 2, 3, 1, 4, 6, 7, 5])], [t[1]], axis=0),
        helper.make_node("Pad", [t[0], t[1]], [t[2]], mode="constant"),
        helper.make_node("Shape", [t[2]], [t[3]]),
        helper.make_node("Slice", [t[3], const("wst", [2]), const("wen", [3])], [t[4]]),
        helper.make_node("Div", [t[4], const("s", [s])], [t[5]]),
        helper.make_node("Concat", [const("lead", [0, -1, s]), t[5], const("tail", [s * c])], [t[6]], axis=0),
        helper.make_node("Reshape", [t[2], t[6]], [t[7]]),  # (N, H/s, s_h, W/s, s_w*c)
        helper.make_node("Transpose", [t[7]], [t[8]], perm=[0, 1, 3, 2, 4]),  # (N, H/s, W/s, s_h, s_w*c)
        helper.make_node("Reshape", [t[8], const("merge", [0, 0, 0, -1])], [t[9]]),  # (N, H/s, W/s, s*s*c)
        helper.make_node("Transpose", [t[9]], [y], perm=[0, 3, 1, 2]),
    ]


def _depth_to_space(model, x: str, y: str, s: int, c: int, base: str, channels_last: bool = False) -> list:
    """``DepthToSpace(s, CRD)`` of ``x`` (``(N, c*s*s, H, W)``) as Reshape/Transpose nodes whose
    transposes each move a single axis: onnxruntime's DepthToSpace is a generic 6-D shuffle, several
    times slower (0.7 vs 0.3 ms for a 40x128x192 uint8 tensor, 2 threads).

    ``channels_last``: ``x``'s channels in DCR order ``(r_h, r_w, c)`` (the producing conv's weights
    ordered so), shuffled in channels-last order between two transposes: NCHW -> NHWC, Reshape
    ``(N, H, W, s_h, s_w*c)``, a transpose of two middle axes (copies of ``s*c``-element runs),
    Reshape ``(N, H*s, W*s, c)``, NHWC -> NCHW. onnxruntime runs an int8 file's integer convs in NHWC
    and puts a transpose on each side of them; the two here cancel against those, so the whole
    shuffle between two integer convs is one block-copy transpose instead of four transposes, two of
    them element by element."""
    from onnx import helper

    def const(name, v):
        return _int_const(model, f"{base}_{name}", v)

    if channels_last:
        t = [_unique(model, f"{base}_nhwc_{i}") for i in range(8)]
        return [
            helper.make_node("Transpose", [x], [t[0]], perm=[0, 2, 3, 1]),  # (N, H, W, s*s*c)
            helper.make_node("Reshape", [t[0], const("split", [0, 0, 0, s, s * c])], [t[1]]),  # (N, H, W, s_h, s_w*c)
            helper.make_node("Transpose", [t[1]], [t[2]], perm=[0, 1, 3, 2, 4]),  # (N, H, s_h, W, s_w*c)
            helper.make_node("Shape", [x], [t[3]]),
            helper.make_node("Slice", [t[3], const("wst", [3]), const("wen", [4])], [t[4]]),
            helper.make_node("Mul", [t[4], const("s", [s])], [t[5]]),
            helper.make_node("Concat", [const("lead", [0, -1]), t[5], const("c", [c])], [t[6]], axis=0),
            helper.make_node("Reshape", [t[2], t[6]], [t[7]]),  # (N, H*s, W*s, c)
            helper.make_node("Transpose", [t[7]], [y], perm=[0, 3, 1, 2]),
        ]

    t = [_unique(model, f"{base}_{i}") for i in range(9)]
    return [
        helper.make_node("Unsqueeze", [x, const("ax", [1])], [t[0]]),  # (N, 1, c*s*s, H, W)
        helper.make_node("Reshape", [t[0], const("s1", [-1, s, s, 0, 0])], [t[1]]),  # (N*c, s_h, s_w, H, W)
        helper.make_node("Transpose", [t[1]], [t[2]], perm=[0, 1, 3, 4, 2]),  # (N*c, s_h, H, W, s_w)
        helper.make_node("Reshape", [t[2], const("s2", [0, 0, 0, -1])], [t[3]]),  # (N*c, s_h, H, W*s)
        helper.make_node("Transpose", [t[3]], [t[4]], perm=[0, 2, 1, 3]),  # (N*c, H, s_h, W*s)
        helper.make_node("Shape", [x], [t[5]]),
        helper.make_node("Slice", [t[5], const("st", [2]), const("en", [4])], [t[6]]),
        helper.make_node("Mul", [t[6], const("sc", [s, s])], [t[7]]),
        helper.make_node("Concat", [const("nc", [-1, c]), t[7]], [t[8]], axis=0),  # (-1, c, H*s, W*s)
        helper.make_node("Reshape", [t[4], t[8]], [y]),
    ]


# operators that only move values: the same operator on the integer tensor gives the same result
_DATA_MOVEMENT = ("Pad", "SpaceToDepth", "DepthToSpace")


def integer_pads(model) -> int:
    """Run every ``DequantizeLinear -> op -> QuantizeLinear`` with one scale and zero point (per
    tensor), ``op`` a ``Pad``, ``SpaceToDepth`` or ``DepthToSpace``, as that op on the integer tensor
    (in place); returns how many. Bit-exact: these ops copy values, and the constant 0 of a zero pad
    quantizes to the zero point."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    drop: set = set()  # (op type, output name) of the Q/DQ nodes made redundant
    count = 0
    for pad in g.node:
        if pad.op_type not in _DATA_MOVEMENT or pad.op_type == "Pad" and len(pad.input) > 3 and pad.input[3]:
            continue
        dq = producer.get(pad.input[0])
        users = consumers.get(pad.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        if pad.output[0] in graph_outputs:
            continue
        if len(dq.input) < 3 or len(q.input) < 3:
            continue
        ds, dz, qs, qz = (const(dq.input[1]), const(dq.input[2]), const(q.input[1]), const(q.input[2]))
        if any(v is None for v in (ds, dz, qs, qz)) or ds.size != 1 or dz.size != 1 or qs.size != 1 or qz.size != 1:
            continue
        if float(ds) != float(qs) or int(dz) != int(qz) or dz.dtype != qz.dtype:
            continue
        mode = _attrs(pad).get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if pad.op_type != "Pad":
            new_inputs = [dq.input[0]]
        elif mode == "constant":
            value = const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros((), np.float32)
            if value is None or float(value) != 0.0:
                continue
            zp_name = _unique(model, f"{pad.name or pad.output[0]}_zero_point")
            g.initializer.append(numpy_helper.from_array(np.asarray(dz).reshape(()).astype(dz.dtype), zp_name))
            inits[zp_name] = g.initializer[-1]
            new_inputs = [dq.input[0], pad.input[1], zp_name]
        elif mode in ("reflect", "edge"):
            new_inputs = [dq.input[0], pad.input[1]]
        else:
            continue
        drop.add(("QuantizeLinear", q.output[0]))
        if len(consumers.get(dq.output[0], [])) == 1 and dq.output[0] not in graph_outputs:
            drop.add(("DequantizeLinear", dq.output[0]))  # else it still feeds its other consumers
        del pad.input[:]
        pad.input.extend(new_inputs)
        pad.output[0] = q.output[0]
        count += 1
    if count:
        keep = [n for n in g.node if (n.op_type, n.output[0]) not in drop]
        del g.node[:]
        g.node.extend(keep)
    return count


def shape_of_quantized(model) -> int:
    """Point every ``Shape`` whose input comes from a ``DequantizeLinear`` at the integer tensor (in
    place) and drop the ``DequantizeLinear`` when nothing else reads it; returns how many. Exact: the
    shape of a tensor does not change when it is dequantized."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    count = 0
    for n in g.node:
        if n.op_type != "Shape":
            continue
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        n.input[0] = dq.input[0]
        count += 1
    if count:
        used = {i for n in g.node for i in n.input} | graph_outputs
        keep = [n for n in g.node if not (n.op_type == "DequantizeLinear" and n.output[0] not in used)]
        del g.node[:]
        g.node.extend(keep)
    return count

