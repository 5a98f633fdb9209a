"""A measured latency model of the device (device-aware / HALP-style pruning): a per-layer lookup
table, timed once per device and cached on disk, plus a fitted remainder for what runs between the
convolutions, predicting a pruned network's batch latency from its channel widths.

MACs do not say what a width costs: onnxruntime's CPU kernels compute channels in blocks (a 38-channel
conv costs what a 48-channel one does), thin layers are overhead-bound, and the same MACs cost more at
a high resolution than at a low one. The table times each convolution *shape* the pruning can produce
(``ConvSignature``: in/out channels, kernel, stride, input size...) alone, in the runtime that will run
the network (``"eager"`` PyTorch or ``"onnxruntime"``), on first use, and keeps it in a JSON file per
device (CPU model or GPU name, threads, torch / onnxruntime version): a later selection on the same
device reads it instead of timing again.

A network's latency = ``scale`` x the sum of its convolutions' table entries + ``c0 + c1 * f``, where
``f`` is the kept fraction of the normalised (elementwise) activations: norms, activations, adds and
padding scale with the channels they touch, plus a fixed per-call cost. ``scale, c0, c1`` are fitted by
non-negative least squares on a few whole-network timings (:meth:`LatencyModel.fit`); :meth:`LatencyModel.errors` gives the model's
error against whole-network timings of other networks.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..core.gating import NORM_TYPES, MacsModel
from .._utils import as_input_tuple as _as_tuple
from .latency import measure_latency

__all__ = ["ConvSignature", "LatencyTable", "LatencyModel", "conv_signatures", "device_fingerprint",
           "default_table_path", "runtime_ms"]

RUNTIMES = ("eager", "onnxruntime")


@dataclass(frozen=True)
class ConvSignature:
    """What a convolution costs depends on: ``(batch, in_channels, height, width)`` of its input and
    its own configuration. ``depthwise``: ``groups == in_channels`` (groups follow the width)."""
    transposed: bool
    in_channels: int
    out_channels: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    output_padding: tuple
    depthwise: bool
    bias: bool
    batch: int
    height: int
    width: int

    def key(self) -> str:
        k = "x".join(map(str, self.kernel))
        s = "x".join(map(str, self.stride))
        p = "x".join(map(str, self.padding))
        d = "x".join(map(str, self.dilation))
        o = "x".join(map(str, self.output_padding))
        return (f"{'convT' if self.transposed else 'conv'}{'-dw' if self.depthwise else ''} {self.in_channels}->"
                f"{self.out_channels} k{k} s{s} p{p} d{d} op{o} b{int(self.bias)} in {self.batch}x{self.height}x{self.width}")

    def with_channels(self, in_channels: int, out_channels: int) -> "ConvSignature":
        # dataclasses.replace, not asdict: the width searches ask for thousands of these, and asdict
        # deep-copies every field
        return replace(self, in_channels=int(in_channels),
                       out_channels=int(in_channels if self.depthwise else out_channels))

    def build(self) -> nn.Module:
        """A fresh layer of this shape (random weights: the time does not depend on the values)."""
        cls = nn.ConvTranspose2d if self.transposed else nn.Conv2d
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, bias=self.bias,
                  groups=self.in_channels if self.depthwise else 1)
        if self.transposed:
            kw["output_padding"] = self.output_padding
        return cls(self.in_channels, self.out_channels, self.kernel, **kw).eval()


def conv_signatures(model: nn.Module, example_inputs: Any) -> dict[str, ConvSignature]:
    """The :class:`ConvSignature` of every 2-d convolution ``model`` runs on ``example_inputs``, by
    module name (one forward pass with hooks; a module called twice keeps its first call). Grouped
    convolutions that are not depthwise are left out (their cost is in the remainder)."""
    sigs: dict[str, ConvSignature] = {}
    handles = []

    def hook(name):
        def fn(mod, inputs, _output):
            if name in sigs or not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() != 4:
                return
            b, c, h, w = inputs[0].shape
            sigs[name] = ConvSignature(
                transposed=isinstance(mod, nn.ConvTranspose2d), in_channels=int(c), out_channels=mod.out_channels,
                kernel=tuple(mod.kernel_size), stride=tuple(mod.stride), padding=tuple(mod.padding),
                dilation=tuple(mod.dilation), output_padding=tuple(getattr(mod, "output_padding", (0, 0))),
                depthwise=mod.groups > 1, bias=mod.bias is not None, batch=int(b), height=int(h), width=int(w))
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and (mod.groups == 1 or mod.groups == mod.in_channels):
            if not isinstance(mod.padding, str):
                handles.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*_as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sigs


def device_fingerprint(runtime: str = "eager", threads: Optional[int] = None, device: str = "cpu") -> str:
    """A file-name-safe string naming what the timings depend on: the processor (CPU model or GPU
    name), threads, torch (and onnxruntime) version and the runtime."""
    if str(device).startswith("cuda"):
        proc = torch.cuda.get_device_name(torch.device(device))
    else:
        from .machine import cpu_model

        proc = cpu_model()
    parts = [proc, f"{threads or torch.get_num_threads()}t", f"torch{torch.__version__}", runtime]
    if runtime == "onnxruntime":
        import onnxruntime

        parts.append(f"ort{onnxruntime.__version__}")
    return "_".join("".join(ch if ch.isalnum() or ch in ".+-" else "-" for ch in p) for p in parts)


def default_table_path(fingerprint: str) -> pathlib.Path:
    """``$GANSLIM_CACHE`` (default ``~/.cache/ganslim``) ``/latency/<fingerprint>.json``."""
    root = os.environ.get("GANSLIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ganslim")
    return pathlib.Path(root) / "latency" / f"{fingerprint}.json"


def runtime_ms(model: nn.Module, inputs: tuple, runtime: str, threads: int, repeats: int = 9,
               device: str = "cpu") -> float:
    """Fastest of ``repeats`` passes (ms) of ``model`` on ``inputs`` in ``runtime``: ``"eager"``
    PyTorch on ``device``, or ``"onnxruntime"`` (exported with :func:`ganslim.export` to a temporary
    file first, the graph rewrites included, as a deployed network is).

    The fastest pass is a network's own cost, without the preemptions of a shared machine (which a
    median of a few sub-millisecond passes does not filter); the table and its fit both use it."""
    if runtime == "onnxruntime":
        from ..deployment.deploy import OnnxModule, export

        with tempfile.TemporaryDirectory(prefix="ganslim-latency-") as d:
            path = export(model.eval(), pathlib.Path(d) / "net.onnx", format="onnx", example_inputs=inputs, verify=False)
            return float(measure_latency(OnnxModule(path, threads=threads), inputs, warmup=2, repeats=repeats).min_ms)
    return float(measure_latency(model.to(device), inputs, warmup=2, repeats=repeats, threads=threads,
                                 device=device).min_ms)


class LatencyTable:
    """Milliseconds per convolution shape on this device, timed on first use and cached.

    Args:
        runtime: ``"eager"`` (PyTorch, ``torch.inference_mode``) or ``"onnxruntime"`` (each layer
            exported with :func:`ganslim.export`, the graph rewrites included, and run by
            onnxruntime's CPU provider, as a deployed network would be).
        threads: intra-op threads for the timings (default: ``torch.get_num_threads()``).
        path: the JSON cache; default :func:`default_table_path` of the device's fingerprint.
            ``None`` entries are timed and written back by :meth:`save` (atomically).
        repeats: timed passes per entry (the fastest is kept); ``device``: ``"cpu"`` or ``"cuda"``
            (eager only).
    """

    def __init__(self, runtime: str = "eager", threads: Optional[int] = None, path: Optional[str | os.PathLike] = None,
                 repeats: int = 9, device: str = "cpu"):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "onnxruntime" and str(device) != "cpu":
            raise ValueError("the onnxruntime table times the CPU provider; use runtime='eager' on CUDA")
        self.runtime, self.repeats, self.device = runtime, int(repeats), str(device)
        self.threads = int(threads or torch.get_num_threads())
        self.fingerprint = device_fingerprint(runtime, self.threads, self.device)
        self.path = pathlib.Path(path) if path is not None else default_table_path(self.fingerprint)
        self.entries: dict[str, float] = {}
        self.timed = 0  # entries timed by this object (not read from the cache)
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.path}: not a latency table ({type(e).__name__}: {e}); delete it to re-time") from None
            if saved.get("fingerprint") != self.fingerprint:
                raise ValueError(f"{self.path} was timed on {saved.get('fingerprint')!r}, this is {self.fingerprint!r}; "
                                 "give another path")
            self.entries = {k: float(v) for k, v in saved.get("entries", {}).items()}

    def __len__(self) -> int:
        return len(self.entries)

    def conv_ms(self, sig: ConvSignature) -> float:
        """Milliseconds of one call of a convolution of this shape (fastest of ``repeats``)."""
        key = sig.key()
        if key not in self.entries:
            self.entries[key] = self._time(sig)
            self.timed += 1
        return self.entries[key]

    def _time(self, sig: ConvSignature) -> float:
        x = torch.randn(sig.batch, sig.in_channels, sig.height, sig.width)
        return runtime_ms(sig.build(), (x,), self.runtime, self.threads, repeats=self.repeats, device=self.device)

    def save(self) -> pathlib.Path:
        """Write the table (atomically: a temporary file renamed into place)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.partial")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "runtime": self.runtime, "threads": self.threads,
                                   "entries": dict(sorted(self.entries.items()))}, indent=0))
        os.replace(tmp, self.path)
        return self.path


class LatencyModel:
    """Predicted latency (ms) of the network a set of channel keep-masks leaves.

    ``model``, ``targets`` (its channel groups, :func:`ganslim.core.targeting.find_channel_groups`),
    ``example_inputs`` (the deployment input, e.g. ``(1, 3, 256, 384)``) and a :class:`LatencyTable`.
    Until :meth:`fit` is called the scale is 1, the remainder zero and predictions are the table's
    convolutions alone.
    """

    def __init__(self, model: nn.Module, targets, example_inputs: Any, table: LatencyTable,
                 macs_model: Optional[MacsModel] = None):
        from . import macs_by_module

        self.table = table
        self.signatures = conv_signatures(model, example_inputs)
        self.macs_model = macs_model or MacsModel(model, targets, macs_by_module(model, example_inputs, "papers"))
        self.norms = {n: float(m.num_features) for n, m in model.named_modules()
                      if isinstance(m, NORM_TYPES) and hasattr(m, "num_features") and n in self.macs_model.sizes}
        self.scale, self.c0, self.c1 = 1.0, 0.0, 0.0

    def conv_ms(self, alive: Sequence[torch.Tensor]) -> float:
        """Sum of the table's entries for the convolutions at the widths ``alive`` leaves."""
        return self._conv_ms(self.macs_model.kept_channels(alive))

    def elementwise_fraction(self, alive: Sequence[torch.Tensor]) -> float:
        """Kept fraction of the normalised channels, weighted by their MACs (activation elements)."""
        return self._fraction(self.macs_model.kept_channels(alive))

    def predict(self, alive: Sequence[torch.Tensor]) -> float:
        """Predicted milliseconds of the pruned network."""
        kept = self.macs_model.kept_channels(alive)  # once: the selection calls this thousands of times
        return self.scale * self._conv_ms(kept) + self.c0 + self.c1 * self._fraction(kept)

    def _conv_ms(self, kept: dict) -> float:
        total = 0.0
        for name, sig in self.signatures.items():
            kin, kout = kept.get(name, (sig.in_channels, sig.out_channels))
            total += self.table.conv_ms(sig.with_channels(max(1, kin), max(1, kout)))
        return total

    def _fraction(self, kept: dict) -> float:
        base = {n: self.macs_model.base.get(n, 0.0) for n in self.norms}
        total = sum(base.values())
        if total <= 0:
            return 1.0
        return sum(b * kept[n][1] / self.norms[n] for n, b in base.items() if n in kept) / total

    def fit(self, measured: Sequence[tuple[Sequence[torch.Tensor], float]]) -> tuple[float, float, float]:
        """Fit ``measured_ms = scale * conv_ms + c0 + c1 * f`` on ``[(alive, measured_ms), ...]``:
        least squares with every coefficient ``>= 0`` (a latency cannot fall when channels are added,
        nor be negative), at most as many coefficients as networks. Returns ``(scale, c0, c1)``.

        ``scale`` absorbs the drift between when the table was timed and now (a shared machine's clock,
        caches warm in a whole network and cold for a conv alone): without it an unbounded ``c0`` took
        that drift and went negative, and thin networks were predicted at negative milliseconds."""
        if not measured:
            raise ValueError("fit needs at least one (alive, measured_ms) pair")
        rows = [(self.conv_ms(a), 1.0, self.elementwise_fraction(a)) for a, _ in measured]
        a = torch.tensor(rows, dtype=torch.float64)
        b = torch.tensor([float(ms) for _, ms in measured], dtype=torch.float64)
        best, best_sse = (0.0, 0.0, 0.0), float(b.pow(2).sum())
        # every subset of the three coefficients (the non-negative least-squares optimum is the
        # unconstrained optimum on its own support; three coefficients make enumeration exact and cheap)
        for support in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
            if len(support) > len(rows):
                continue
            sub = a[:, list(support)]
            if torch.linalg.matrix_rank(sub) < len(support):
                continue
            sol = torch.linalg.lstsq(sub, b.unsqueeze(1)).solution.flatten()
            if (sol < 0).any():
                continue
            sse = float((sub @ sol - b).pow(2).sum())
            if sse < best_sse - 1e-12 * max(1.0, best_sse):
                coef = [0.0, 0.0, 0.0]
                for i, v in zip(support, sol.tolist()):
                    coef[i] = v
                best, best_sse = tuple(coef), sse
        self.scale, self.c0, self.c1 = best
        return self.scale, self.c0, self.c1

    def errors(self, measured: Sequence[tuple[Sequence[torch.Tensor], float]]) -> list[float]:
        """Relative error ``predicted / measured - 1`` per network."""
        return [self.predict(a) / ms - 1.0 for a, ms in measured]
