"""Where an ONNX generator spends its time in onnxruntime, per operator, and which operators stay in
float (module ``ganslim.deployment.profile``).

An int8 file is only as fast as the part of it that is *not* int8: onnxruntime fuses
``DequantizeLinear -> op -> QuantizeLinear`` into an integer kernel (``QLinearConv``, ``QLinearAdd``...)
only for the operators it has integer kernels for; every other operator runs in float between a
``DequantizeLinear`` and a ``QuantizeLinear`` (three passes over the feature map instead of one).
:func:`profile_ops` runs the file with onnxruntime's own profiler and returns the time of every node
of the graph it actually executes (after its fusions), classed as

- ``int8``: an integer kernel (any uint8/int8 input but a pure conversion or data movement),
- ``convert``: ``QuantizeLinear`` / ``DequantizeLinear`` (float <-> int8 passes),
- ``float``: everything else that computes in float (for an int8 file: the operators left behind),
- ``layout``: data movement and bookkeeping: onnxruntime's NCHWc reorders around its blocked float
  convolutions, the NCHW <-> NHWC transposes around its integer ones, reshapes and shape arithmetic.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


from .._utils import as_input_tuple

__all__ = ["NodeTime", "OpProfile", "profile_ops"]

_CONVERT = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
_LAYOUT = ("ReorderInput", "ReorderOutput", "Transpose", "Reshape", "Identity")
_INTEGER_TYPES = ("uint8", "int8")
_SHAPE_TYPES = ("int64", "int32")  # shape arithmetic (Shape -> Gather -> Concat ...), not feature maps


@dataclass
class NodeTime:
    """One executed node: ``ms`` is its mean kernel time per run (milliseconds)."""
    name: str
    op_type: str
    precision: str  # int8 | convert | float | layout
    ms: float
    output_shape: tuple = ()


@dataclass
class OpProfile:
    """Per-node times of one ONNX file (see :func:`profile_ops`). ``total_ms``: the sum of the node
    times per run (the session's wall time per run, ``run_ms``, also holds onnxruntime's overhead)."""
    path: str
    threads: int
    runs: int
    run_ms: float
    nodes: list[NodeTime] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(n.ms for n in self.nodes)

    def by_precision(self) -> dict[str, float]:
        """Milliseconds per run in each class (``int8``, ``convert``, ``float``, ``layout``)."""
        out = {k: 0.0 for k in ("int8", "convert", "float", "layout")}
        for n in self.nodes:
            out[n.precision] += n.ms
        return out

    def by_op_type(self) -> list[tuple[str, str, int, float]]:
        """``[(op_type, precision, count, ms per run)]``, slowest first."""
        acc: dict[tuple[str, str], list] = {}
        for n in self.nodes:
            a = acc.setdefault((n.op_type, n.precision), [0, 0.0])
            a[0] += 1
            a[1] += n.ms
        return sorted(((k[0], k[1], v[0], v[1]) for k, v in acc.items()), key=lambda r: -r[3])

    def float_ops(self) -> dict[str, int]:
        """Operator types that compute in float, with their node counts (what stayed out of int8)."""
        out: dict[str, int] = {}
        for n in self.nodes:
            if n.precision == "float":
                out[n.op_type] = out.get(n.op_type, 0) + 1
        return out

    def table(self, top: Optional[int] = None) -> str:
        """A text table of :meth:`by_op_type` with each row's share of the node time."""
        total = self.total_ms or 1.0
        rows = self.by_op_type()[:top] if top else self.by_op_type()
        lines = [f"{'op type':<24}{'class':<9}{'nodes':>6}{'ms/run':>9}{'share':>8}", "-" * 56]
        lines += [f"{op:<24}{prec:<9}{cnt:>6}{ms:>9.2f}{ms / total:>8.1%}" for op, prec, cnt, ms in rows]
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in self.by_precision().items())
        lines.append(f"node time {self.total_ms:.2f} ms/run ({shares}); session run {self.run_ms:.2f} ms")
        return "\n".join(lines)


def _precision(op_type: str, input_types: Sequence[str]) -> str:
    if op_type in _CONVERT:
        return "convert"
    if op_type in _LAYOUT:
        return "layout"
    if op_type.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger")):
        return "int8"
    if any(t in _INTEGER_TYPES for t in input_types[:1]):  # data input integer: an integer kernel (Pad, MaxPool...)
        return "int8"
    if op_type == "Shape" or any(t in _SHAPE_TYPES for t in input_types[:1]):
        return "layout"
    return "float"


def profile_ops(path: str | os.PathLike, example_inputs: Any, threads: Optional[int] = None, runs: int = 10,
                warmup: int = 2) -> OpProfile:
    """Profile ``path`` in onnxruntime (CPU, all graph optimisations, as :class:`OnnxModule` runs it).

    ``example_inputs``: a tensor or tuple of tensors, e.g. the held-out photo ``(1, 3, 256, 384)``.
    ``runs`` profiled runs after ``warmup`` unprofiled ones (onnxruntime's profiler cannot be paused,
    so the warm-up runs are dropped from its trace by their order). Node times are means over the
    runs, in milliseconds.
    """
    import time

    from .deploy import OnnxModule

    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such ONNX file")
    inputs = as_input_tuple(example_inputs)
    with tempfile.TemporaryDirectory(prefix="ganslim-profile-") as d:
        om = OnnxModule(path, threads=threads, profile_prefix=os.path.join(d, "ort"))
        sess, feed, threads = om.session, om.feed(*inputs), om.threads
        for _ in range(warmup):
            sess.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feed)
        run_ms = (time.perf_counter() - t0) * 1e3 / runs
        trace = sess.end_profiling()
        if not os.path.exists(trace):  # older onnxruntime returns the bare file name
            trace = (glob.glob(os.path.join(d, "ort*.json")) or [trace])[0]
        with open(trace) as f:
            events = json.load(f)
    # kernel-time events, one per node per run, in execution order; the first `warmup` runs are dropped
    per_node: dict[str, dict] = {}
    order: list[str] = []
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        args = e.get("args", {})
        rec = per_node.get(name)
        if rec is None:
            types = [next(iter(t)) for t in args.get("input_type_shape", []) if t]
            out = next(iter(args["output_type_shape"][0].values())) if args.get("output_type_shape") else ()
            rec = per_node[name] = {"op": args.get("op_name", "?"), "types": types, "durs": [],
                                    "shape": tuple(out)}
            order.append(name)
        rec["durs"].append(float(e.get("dur", 0)) / 1e3)
    nodes = []
    for name in order:
        rec = per_node[name]
        durs = rec["durs"][warmup:] if len(rec["durs"]) > runs else rec["durs"]
        nodes.append(NodeTime(name, rec["op"], _precision(rec["op"], rec["types"]),
                              sum(durs) / max(1, len(durs)), rec["shape"]))
    return OpProfile(str(path), threads, runs, run_ms, nodes)
