"""Quantization-aware training (QAT) on any generator, with NVIDIA ModelOpt as the backend.

GAN Slimming's third lever: weights (per output channel) and activations are fake-quantized to
8 bits during training, with a straight-through estimator, so the network learns to live on the
int8 grid. Pieces, each usable alone:

* :func:`fold_batchnorm` - fold eval-mode BatchNorm into the preceding (transposed) conv, so the
  int8 network has no float BatchNorm left between its integer convolutions;
* :func:`quantize` - insert fake quantizers (ModelOpt) and calibrate them on the user's loader;
* :func:`train_qat` - distillation fine-tune of the fake-quantized student (the loop of
  :mod:`ganslim.core.train`: L1 to the teacher's output and to the ground truth), the activation
  ranges learned with the weights (LSQ);
* :func:`to_float` - the ``merge_and_unload`` of quantization: a plain float module of standard
  layers whose weights are the fake-quantized (on-grid) weights, ready for ONNX export;
* :func:`quant_state` / :func:`restore` - what a checkpoint stores (our own JSON config and the
  quantizers' ``amax`` tensors), so a QAT model is saved and reloaded without ModelOpt's pickles.

The deployment itself (QDQ ONNX run by onnxruntime's int8 kernels) lives in :mod:`ganslim.deployment.deploy`.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .._extras import require
from ..core.train import input_batches, split_batch

__all__ = ["QuantConfig", "fold_batchnorm", "quantize", "train_qat", "learned_ranges", "is_quantized", "is_calibrated", "to_float",
           "input_ranges", "output_ranges", "weight_scales", "default_weight_bits", "quant_state", "restore",
           "QuantizationError"]

_STATE_ATTR = "_ganslim_quant"  # plain attribute on the quantized root module (deep-copies with it)


class QuantizationError(RuntimeError):
    """A model cannot be quantized, calibrated or restored as asked; the message names the fix."""


@dataclass
class QuantConfig:
    """Fake-quantization settings (units: bits; ``steps`` counts optimizer steps).

    ``skip_first`` / ``skip_last`` keep the first / last weighted layer in float (the image-facing
    layers are the most sensitive in generators); ``exclude`` lists module-name globs kept in float.
    """

    # None: 7 on an x86 CPU without VNNI, 8 elsewhere. onnxruntime's int8 kernels on such a CPU
    # saturate with 8-bit weights, so the export writes 7-bit ones there (deploy.int8_saturates):
    # QAT then trains on the grid the file has, instead of rounding its 8-bit weights a second time.
    # 7 bits is onnxruntime's reduced range: levels -64..64 in steps of amax / 64 (_reduced_range_weights).
    weight_bits: Optional[int] = None
    act_bits: int = 8
    per_channel: bool = True  # one weight scale per output channel
    # The image-facing layers stay float by default: they are the most sensitive, and with 3 channels
    # in or out int8 kernels are slower than float ones (demo student: 4.1 vs 1.6 ms and 7.8 vs 5.2 ms).
    skip_first: bool = True
    skip_last: bool = True
    exclude: Sequence[str] = ()
    calib_batches: int = 8
    # Activation ranges: "max" over the calibration batches, or this percentile of |x| (robust: a
    # generator may use huge activations where its output saturates, which would waste the 8 bits).
    act_calib: str = "percentile"
    act_percentile: float = 99.9
    fold_batchnorm: bool = True
    backend: str = "modelopt"
    # QAT fine-tune (used by train_qat / compress(quant="int8"))
    # What the fake-quantized model learns to imitate: "teacher", the model passed to train_qat (or its
    # outputs carried by the batches), or "float", the model as it was before quantization (no teacher
    # needed). Neither wins clearly: bench_quant.py --int8-ends on the Intel Xeon (thirteenth session,
    # benchmarks/results/xeon_session13/before_simulation), the int8 file to ground truth -0.14 dB (teacher) vs -0.23
    # (float) at 1/10, -0.42 vs -0.36 at 1/20; the teacher stays the default.
    reference: str = "teacher"
    steps: int = 300
    lr: float = 1e-4  # 300 steps at 1e-4 recovered the demo student fully (2e-5 too little)
    # QAT learns each activation quantizer's range with the weights (LSQ's step-size gradient, on
    # the log of the range, Adam at this learning rate); 0 keeps the calibrated ranges fixed. The
    # fixed percentile ranges cost the 1/20 student half its int8 loss: bench_quant.py --int8-ends,
    # its int8 file -0.17 dB to ground truth from its float self, -0.38 with --range-lr 0 (Intel
    # Xeon without AMX, fourteenth session, benchmarks/results/xeon_session14; at 1/10 no change).
    range_lr: float = 1e-2
    recon_weight: float = 10.0
    gt_weight: float = 10.0
    mse_weight: float = 0.0  # MSE to ground truth (teacher without one); compress passes its own (50)

    def validate(self) -> "QuantConfig":
        if self.backend != "modelopt":
            raise ValueError(f"unknown quantization backend {self.backend!r}; available: 'modelopt' "
                             "(pytorch-quantization is deprecated upstream and calls .cuda() on CPU paths)")
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits is None and name == "weight_bits":
                continue
            if not 2 <= int(bits) <= 8:
                raise ValueError(f"{name} must be between 2 and 8, got {bits}")
        if self.calib_batches < 1:
            raise ValueError("calib_batches must be >= 1")
        if self.act_calib not in ("max", "percentile"):
            raise ValueError(f"act_calib must be 'max' or 'percentile', got {self.act_calib!r}")
        if self.reference not in ("float", "teacher"):
            raise ValueError(f"reference must be 'float' or 'teacher', got {self.reference!r}")
        if self.range_lr < 0:
            raise ValueError(f"range_lr must be >= 0, got {self.range_lr}")
        if not 50.0 < self.act_percentile <= 100.0:
            raise ValueError(f"act_percentile must be in (50, 100], got {self.act_percentile}")
        return self

    def resolved(self) -> "QuantConfig":
        """This config with ``weight_bits`` decided for this machine (:func:`default_weight_bits`)."""
        from dataclasses import replace

        return self if self.weight_bits is not None else replace(self, weight_bits=default_weight_bits())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(d["exclude"])
        return d


def default_weight_bits() -> int:
    """The weight bits QAT trains when :class:`QuantConfig` leaves them open: 7 where this CPU's int8
    kernels saturate with 8-bit weights (x86 without VNNI: :func:`ganslim.deployment.deploy.int8_saturates`;
    the int8 export writes 7-bit weights there), 8 elsewhere."""
    from .deploy import int8_saturates

    return 7 if int8_saturates() else 8


@dataclass
class _QuantState:
    config: QuantConfig
    float_keys: dict = field(default_factory=dict)  # module name -> (original class, its __dict__ keys)
    float_modules: list = field(default_factory=list)  # weighted layers kept in float (names)
    # input quantizers also called on their tensor for all its readers (see _share_inputs)
    shared_inputs: list = field(default_factory=list)


def _mtq():
    return require("modelopt.torch.quantization", "quant")  # ModuleNotFoundError naming pip install 'ganslim[quant]'


# --------------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------------

def _fuse_grouped_transposed_conv_bn(conv: nn.modules.conv._ConvTransposeNd,
                                     bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """``conv`` followed by ``bn`` (eval mode) as one transposed conv, for ``groups > 1``.

    A transposed conv's weight is ``(in, out / groups, *k)``: output channel ``j`` of group ``g`` is
    column ``j`` of the rows of group ``g``. torch's ``fuse_conv_bn_eval`` scales dimension 1 as if it
    held every output channel, which for a depthwise transposed conv (``(C, 1, *k)``) broadcasts the
    weight to ``(C, C, *k)`` and breaks the layer."""
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        g, w = conv.groups, conv.weight
        per_group = w.reshape(g, w.shape[0] // g, *w.shape[1:])  # (groups, in / groups, out / groups, *k)
        per_group = per_group * scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        fused.weight = nn.Parameter(per_group.reshape(w.shape).to(w.dtype), w.requires_grad)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        fused.bias = nn.Parameter((bias * scale + shift).to(w.dtype), w.requires_grad)
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` (eval mode) with every ``Conv -> BatchNorm`` pair folded into one conv.

    Only pairs where the conv's output feeds nothing but the BatchNorm are folded (a conv whose
    raw output is also used elsewhere keeps its norm). Needs an fx-traceable model; a model the
    tracer cannot follow is returned as an unchanged copy with a warning. Output equal to the
    original's within float rounding (about 1e-6).
    """
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # dynamic control flow etc.
        warnings.warn(f"BatchNorm not folded: the model cannot be traced by torch.fx ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})", stacklevel=2)
        return model
    mods = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = mods[node.target]
        prev = node.args[0] if node.args else None
        conv = mods.get(prev.target) if isinstance(prev, fx.Node) and prev.op == "call_module" else None
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                 nn.ConvTranspose3d)) or len(prev.users) != 1 or not bn.track_running_stats:
            continue
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == prev.target) != 1:
            continue  # a conv module called twice cannot absorb one call's norm
        if isinstance(conv, nn.modules.conv._ConvTransposeNd) and conv.groups > 1:
            fused = _fuse_grouped_transposed_conv_bn(conv, bn)
        else:
            fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd))
        parent, _, name = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    if not folded:
        return model
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


# --------------------------------------------------------------------------------------------------
# inserting and calibrating quantizers
# --------------------------------------------------------------------------------------------------

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
# layers with parameters that need no quantizer of their own (their inputs come from quantized layers)
_FLOAT_OK = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU)


def _execution_order(model: nn.Module, example: tuple) -> list[str]:
    """Names of weighted layers in the order a forward pass calls them."""
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, args: order.append(names[mod]))
             for m in model.modules() if isinstance(m, _WEIGHTED)]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))  # first call of each layer, in order


def _ste_attributes() -> dict:
    """The quantizer attribute that zeroes the gradient of clipped values, where ModelOpt has it."""
    attrs = getattr(getattr(_mtq(), "config", None), "QuantizerAttributeConfig", None)
    return {"pass_through_bwd": False} if "pass_through_bwd" in (getattr(attrs, "model_fields", None) or {}) else {}


def _modelopt_config(cfg: QuantConfig, float_names: Sequence[str], transposed: Sequence[str] = ()) -> dict:
    mtq = _mtq()
    base = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    entries = []
    # The straight-through estimator with the gradient of clipped values zeroed. ModelOpt's default
    # (pass_through_bwd=True) passes every gradient through, so values beyond a percentile range are
    # pushed as if the clip were not there: with activations quantized, QAT's L1 to the model it
    # imitates rose over the steps instead of falling (weights alone trained fine).
    ste = _ste_attributes()
    for e in base["quant_cfg"]:
        e = dict(e)
        if e.get("quantizer_name") == "*weight_quantizer":
            e["cfg"] = {"num_bits": int(cfg.weight_bits), "axis": 0 if cfg.per_channel else None, **ste}
        elif e.get("quantizer_name") == "*input_quantizer":
            e["cfg"] = {"num_bits": int(cfg.act_bits), "axis": None, **ste}
        entries.append(e)
    # a transposed conv's weight is (C_in, C_out / groups, k, k): one scale per output channel is axis 1,
    # as the int8 export quantizes its sub-pixel form (ModelOpt's default axis 0 is the input channels)
    for name in transposed if cfg.per_channel else ():
        entries.append({"quantizer_name": f"{name}{_WEIGHT_SUFFIX}",
                        "cfg": {"num_bits": int(cfg.weight_bits), "axis": 1, **ste}})
    for name in float_names:
        entries.append({"quantizer_name": f"{name}.*", "enable": False})
    base["quant_cfg"] = entries
    base["algorithm"] = "max"
    return base


def _unsupported(model: nn.Module) -> list[str]:
    """Layers with their own parameters that ModelOpt cannot quantize (left in float)."""
    registry = _mtq().QuantModuleRegistry
    out = []
    for name, m in model.named_modules():
        own = [p for p in m._parameters.values() if p is not None]
        if own and not isinstance(m, _FLOAT_OK) and type(m) not in registry:
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out


def _calibration_loop(loader: Iterable, batches: int, batch_fn: Optional[Callable], device) -> Callable:
    def loop(model: nn.Module) -> None:
        calibration = input_batches(loader, batches, batch_fn)
        if not calibration:
            raise QuantizationError("the calibration loader yielded no batches")
        with torch.no_grad():
            for inputs in calibration:
                model(*(t.to(device) for t in inputs))
    return loop


def quantize(model: nn.Module, loader: Optional[Iterable], config: Optional[QuantConfig] = None,
             batch_fn: Optional[Callable] = None, example_inputs: Any = None, **overrides) -> nn.Module:
    """Insert 8-bit fake quantizers into a copy of ``model`` and calibrate them on ``loader``.

    Weights: symmetric, per output channel (``config.per_channel``); activations: per tensor, at
    the input of every conv/linear/instance-norm layer (ModelOpt's placement), and where
    onnxruntime's int8 graph quantizes more (an fx-traceable model, as BatchNorm folding traces it):
    a tensor a quantized layer reads and something else reads too (a residual block's input, read by
    its skip) is quantized once for all its readers, and the outputs no quantized input covers (a
    residual branch's last conv, the output conv before Tanh) are quantized, so the fake-quantized
    model computes what the int8 file will. Ranges: the ``act_percentile`` of |x| over
    ``config.calib_batches`` batches, unsigned after ReLUs. BatchNorm is folded first
    (``config.fold_batchnorm``). Layers ModelOpt cannot quantize stay in float; a warning lists
    them. ``loader=None`` inserts quantizers without calibrating (only :func:`restore` does that).

    Returns the quantized copy (train it with :func:`train_qat`, export it with
    :func:`ganslim.export`); ``model`` itself is not modified.
    """
    from dataclasses import replace

    cfg = replace(config or QuantConfig(), **overrides).validate().resolved()
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if is_quantized(model):
        raise QuantizationError("the model is already quantized; quantize its float original instead "
                                "(ganslim.quantization.to_float gives it back)")
    mtq = _mtq()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    work = fold_batchnorm(model) if cfg.fold_batchnorm else copy.deepcopy(model).eval()
    weighted = [n for n, m in work.named_modules() if isinstance(m, _WEIGHTED)]
    if not weighted:
        raise QuantizationError("the model has no Conv/ConvTranspose/Linear layer to quantize")

    float_names = [n for n in weighted if any(fnmatch.fnmatchcase(n, g) for g in cfg.exclude)]
    if cfg.skip_first or cfg.skip_last:
        if example_inputs is None and loader is not None:
            inputs, _ = split_batch(next(iter(loader)), batch_fn)
            example_inputs = tuple(t[:1].to(device) for t in inputs)
        if example_inputs is None:
            raise QuantizationError("skip_first/skip_last need example_inputs or a loader to find the layer order")
        from .._utils import as_input_tuple

        order = _execution_order(work, as_input_tuple(example_inputs))
        if cfg.skip_first and order:
            float_names.append(order[0])
        if cfg.skip_last and order:
            float_names.append(order[-1])
    if not set(weighted) - set(float_names):
        raise QuantizationError(f"every weighted layer ({', '.join(weighted)}) is kept in float by skip_first / "
                                "skip_last / exclude: nothing to quantize; set skip_first=False or skip_last=False")
    unsupported = _unsupported(work)
    if unsupported:
        warnings.warn("left in float (no int8 version of these layers): " + ", ".join(unsupported), stacklevel=2)

    float_keys = {n: (type(m), set(vars(m))) for n, m in work.named_modules() if type(m) in mtq.QuantModuleRegistry}
    loop = _calibration_loop(loader, cfg.calib_batches, batch_fn, device) if loader is not None else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="modelopt")
        transposed = [n for n, m in work.named_modules()
                      if isinstance(m, nn.modules.conv._ConvTransposeNd) and _output_channel_axis(m) == 1]
        mtq.quantize(work, _modelopt_config(cfg, float_names, transposed), loop)
    shared: list[str] = []
    if loader is not None:
        shared, limits = _simulate_runtime(work, cfg)
        _activation_ranges(work, loader, cfg, batch_fn, device)
        qs = dict(_quantizers(work))
        for layer, limit in limits.items():  # before a Tanh: no wider than where it saturates
            q = qs[f"{layer}{_OUTPUT_SUFFIX}"]
            if limit is not None and q.amax is not None:
                q.amax = q.amax.clamp_max(limit)
        _use_weight_grid(work, cfg)
    setattr(work, _STATE_ATTR, _QuantState(cfg, float_keys, sorted(set(float_names)), shared))
    return work


def _register_backend(name: str, fake_quant: Callable) -> None:
    """Make ``fake_quant(inputs, quantizer)`` ModelOpt's quantization backend ``name`` (once)."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend, register_quant_backend)

    if not is_registered_quant_backend(name):
        register_quant_backend(name, fake_quant)


_REDUCED_WEIGHT_BACKEND = "ganslim_reduced_range_weight"  # a ModelOpt quantization backend (registered on first use)
_REDUCED_LEVELS = 64  # onnxruntime's reduce_range int8 weights: symmetric, -64..64


def _reduced_range_weights(inputs: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
    """7-bit weights on onnxruntime's reduced-range grid, the one its int8 export writes on a CPU
    without VNNI: ``round(clamp(w / step, -64, 64)) * step`` with ``step = amax / 64`` per channel.
    ModelOpt's own 7-bit grid (steps of amax / 63, -64..63) differs, and the export's thin RGB convs,
    whose rewritten weights onnxruntime quantizes on steps of their own maximum / 64, would be
    rounded a second time. Straight-through inside the range, no gradient beyond it."""
    step = quantizer.amax.float().clamp_min(torch.finfo(torch.float32).tiny) / _REDUCED_LEVELS
    scaled = torch.clamp(inputs.float() / step, -_REDUCED_LEVELS, _REDUCED_LEVELS)
    return ((scaled + (torch.round(scaled) - scaled).detach()) * step).to(inputs.dtype)


def _use_weight_grid(model: nn.Module, cfg: QuantConfig) -> None:
    """7-bit weights: each calibrated weight quantizer fake-quantizes on onnxruntime's reduced range."""
    if int(cfg.weight_bits) != 7:
        return
    _register_backend(_REDUCED_WEIGHT_BACKEND, _reduced_range_weights)
    for name, q in _quantizers(model):
        if name.endswith(_WEIGHT_SUFFIX) and q.amax is not None:
            q.backend = _REDUCED_WEIGHT_BACKEND


# --------------------------------------------------------------------------------------------------
# what the int8 runtime quantizes beyond each layer's input
# --------------------------------------------------------------------------------------------------

# Leaf modules an int8 runtime runs on the quantized tensor itself, keeping its range: onnxruntime drops a
# ReLU into the range of the tensor before it, and pads move values. A layer's output that reaches
# quantized layers' inputs through these alone is quantized there, by their input quantizers.
_PADS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ZeroPad2d,
         nn.ConstantPad1d, nn.ConstantPad2d)
_RANGE_KEEPING = _PADS + (nn.ReLU, nn.Identity, nn.Dropout)
# Saturating activations and where they stop telling inputs apart (1 - tanh(4) = 6.7e-4): the int8
# export clips the range of the tensor before them there (deploy.clip_saturated_ranges), and so does QAT
_SATURATING = {nn.Tanh: 4.0, nn.Sigmoid: 8.0}
_INPUT_SUFFIX, _OUTPUT_SUFFIX, _WEIGHT_SUFFIX = ".input_quantizer", ".output_quantizer", ".weight_quantizer"


def _quantized_owners(model: nn.Module) -> set[str]:
    """Names of the modules whose input quantizer is on."""
    return {n[:-len(_INPUT_SUFFIX)] for n, q in _quantizers(model) if n.endswith(_INPUT_SUFFIX) and q.is_enabled}


def _share_inputs(gm: "torch.fx.GraphModule") -> list[str]:
    """Quantize, for all its readers, each tensor that a quantized layer reads (up through pads) and
    something else reads too: the int8 runtime quantizes a tensor once, so a residual block's skip
    reads the same quantized stream its conv does. A call of that layer's input quantizer is put
    into ``gm``'s graph after the tensor (the layer quantizes it again, on the same grid: no change).
    Returns the quantizers so called, in graph order."""
    quantized = _quantized_owners(gm)
    g = gm.graph
    shared = []
    for node in list(g.nodes):
        if node.op != "call_module" or node.target not in quantized:
            continue
        chain, t = [node], node.args[0] if node.args else None
        while isinstance(t, torch.fx.Node) and t.op == "call_module" and isinstance(gm.get_submodule(t.target), _PADS):
            chain.append(t)
            t = t.args[0] if t.args else None
        if not isinstance(t, torch.fx.Node) or (t.op == "call_module" and str(t.target).endswith(_INPUT_SUFFIX)):
            continue
        if not [u for u in t.users if u not in chain]:
            continue
        with g.inserting_after(t):
            q = g.call_module(f"{node.target}{_INPUT_SUFFIX}", (t,))
        t.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        shared.append(f"{node.target}{_INPUT_SUFFIX}")
    if shared:
        g.lint()
        gm.recompile()
    return shared


def _unshare_inputs(gm: "torch.fx.GraphModule") -> None:
    """Undo :func:`_share_inputs` (a graph of plain float modules again)."""
    g = gm.graph
    calls = [n for n in g.nodes if n.op == "call_module" and str(n.target).endswith("_quantizer")]
    for n in calls:
        n.replace_all_uses_with(n.args[0])
        g.erase_node(n)
    if calls:
        g.lint()
        gm.recompile()


def _runtime_outputs(gm: "torch.fx.GraphModule") -> dict[str, Optional[float]]:
    """Quantized layers whose output the int8 runtime quantizes (it quantizes every integer conv's
    output) and no quantized layer's input covers: read by an operation outside any module (a
    residual sum), by a module the runtime runs in float (a LeakyReLU, a norm without quantizer), or
    by a saturating activation (the output conv before Tanh). ``{layer: range limit}``, the limit
    where a saturating activation alone reads the output (its range is clipped there), else None.
    Not the graph's own output."""
    quantized = _quantized_owners(gm)
    modules = dict(gm.named_modules())

    def covered(node: torch.fx.Node, depth: int = 0) -> bool:
        if not node.users or depth > 32:
            return False
        for u in node.users:
            if u.op != "call_module":
                return False
            m = modules.get(str(u.target))
            if str(u.target) in quantized or str(u.target).endswith(_INPUT_SUFFIX):
                continue
            if isinstance(m, _RANGE_KEEPING) and covered(u, depth + 1):
                continue
            return False
        return True

    out: dict[str, Optional[float]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in quantized and isinstance(modules.get(node.target), _WEIGHTED):
            if any(u.op == "output" for u in node.users) or covered(node):
                continue
            limits = [_SATURATING[type(modules[str(u.target)])] for u in node.users
                      if u.op == "call_module" and type(modules.get(str(u.target))) in _SATURATING]
            out[str(node.target)] = max(limits) if limits and len(limits) == len(node.users) else None
    return out


def _simulate_runtime(model: nn.Module, cfg: QuantConfig, outputs: Optional[Sequence[str]] = None) -> tuple[list[str], dict]:
    """Make the fake-quantized ``model`` quantize what onnxruntime's int8 graph will (an fx-traced
    model: BatchNorm folding traces it; others are left as they are): shared inputs
    (:func:`_share_inputs`) and, enabled, the output quantizers of ``outputs`` (default:
    :func:`_runtime_outputs`; 8 bits per tensor, their ranges from calibration). Returns the shared
    input quantizers and ``{layer: range limit or None}`` of the outputs quantized."""
    if not isinstance(model, torch.fx.GraphModule):
        return [], {}
    shared = _share_inputs(model)  # first: a ReLU's output quantized for the skip as well is covered
    limits = _runtime_outputs(model) if outputs is None else dict.fromkeys(outputs)
    qs = dict(_quantizers(model))
    outputs = list(limits)
    for name in outputs:
        q = qs.get(f"{name}{_OUTPUT_SUFFIX}")
        if q is None:
            raise QuantizationError(f"layer {name!r} has no output quantizer")
        q.set_from_attribute_config({"num_bits": int(cfg.act_bits), "axis": None, "enable": True,
                                     **_ste_attributes()})
    return shared, limits


@torch.no_grad()
def _activation_ranges(model: nn.Module, loader: Iterable, cfg: QuantConfig, batch_fn, device,
                       samples_per_batch: int = 200_000) -> None:
    """Set each activation quantizer's range from the float activations it quantizes (its layer's
    input, or output for an output quantizer): the ``act_percentile`` of |x| (or the max), and
    ``unsigned`` (all 8 bits on [0, amax]) where they are never negative (after a ReLU), as int8
    runtimes do with their uint8 activations."""
    owners = {n: q for n, q in _quantizers(model) if n.endswith((_INPUT_SUFFIX, _OUTPUT_SUFFIX)) and q.is_enabled}
    if not owners:
        return
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in owners}
    lowest = {k: float("inf") for k in owners}
    highest = {k: 0.0 for k in owners}
    gen = torch.Generator().manual_seed(0)

    def hook(name):
        def fn(mod, args, out=None):
            raw = (args[0] if out is None else out).detach()
            lowest[name] = min(lowest[name], float(raw.min()))
            v = raw.abs().flatten().float().cpu()
            highest[name] = max(highest[name], float(v.max()))
            if v.numel() > samples_per_batch:
                v = v[torch.randint(v.numel(), (samples_per_batch,), generator=gen)]
            seen[name].append(v)
        return fn

    handles = [model.get_submodule(k.rsplit(".", 1)[0]).register_forward_pre_hook(hook(k)) if k.endswith(_INPUT_SUFFIX)
               else model.get_submodule(k.rsplit(".", 1)[0]).register_forward_hook(hook(k)) for k in owners]
    was_enabled = [(q, q.is_enabled) for _, q in _quantizers(model)]
    for q, _ in was_enabled:
        q.disable()
    try:
        _calibration_loop(loader, cfg.calib_batches, batch_fn, device)(model)
    finally:
        for h in handles:
            h.remove()
        for q, on in was_enabled:
            if on:
                q.enable()
    for k, q in owners.items():
        if not seen[k]:
            continue
        if cfg.act_calib == "percentile":
            amax = torch.quantile(torch.cat(seen[k])[:16_000_000], cfg.act_percentile / 100.0)
        else:
            amax = torch.tensor(highest[k])
        q.amax = amax.clamp_min(1e-6).to(q.amax.device if q.amax is not None else amax.device)
        q.unsigned = lowest[k] >= 0.0


def _quantizers(model: nn.Module):
    TensorQuantizer = require("modelopt.torch.quantization.nn", "quant").TensorQuantizer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def is_quantized(model: nn.Module) -> bool:
    """True for a model returned by :func:`quantize` (or restored from a QAT checkpoint)."""
    return isinstance(getattr(model, _STATE_ATTR, None), _QuantState)


def config_of(model: nn.Module) -> QuantConfig:
    """The :class:`QuantConfig` a quantized model was made with."""
    if not is_quantized(model):
        raise QuantizationError("not a quantized model")
    return getattr(model, _STATE_ATTR).config


def is_calibrated(model: nn.Module) -> bool:
    """True when every enabled quantizer of a quantized model has its range (``amax``)."""
    if not is_quantized(model):
        return False
    return all(q.amax is not None for _, q in _quantizers(model) if q.is_enabled)


def enabled_quantizers(model: nn.Module) -> int:
    """Number of active fake quantizers (weights and activations) in a quantized model."""
    return sum(1 for _, q in _quantizers(model) if q.is_enabled) if is_quantized(model) else 0


# --------------------------------------------------------------------------------------------------
# learned activation ranges
# --------------------------------------------------------------------------------------------------

_LEARNED_RANGE_BACKEND = "ganslim_learned_range"  # a ModelOpt quantization backend (registered on first use)
_LOG_RANGE = "log_range"  # a quantizer's parameter while its range is learned: log(range / calibrated range)
_RANGE_LIMIT = "_ganslim_range_limit"  # where a saturating activation alone reads the tensor (see _runtime_outputs)


def _learned_range_fake_quant(inputs: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
    """Fake quantization on a learned range (LSQ, Esser et al. 2020, the range in log space):
    ``x -> round(clamp(x * k, lo, hi)) / k`` with ``k = hi / (amax * exp(log_range))``, on ModelOpt's
    own integer grid and arithmetic (signed: [-128, 127], [-127, 127] with its narrow range; unsigned,
    after a ReLU: [0, 255]), so at
    ``log_range == 0`` the output is ModelOpt's. The rounding passes gradients straight through inside
    the range and none beyond it; the range gets LSQ's step-size gradient (the rounded value minus
    x * k inside the range, the bound outside): QAT weighs clipping against rounding on its own loss."""
    bits = int(quantizer.num_bits)
    hi = 2.0 ** (bits - 1 + int(quantizer.unsigned)) - 1
    lo = 0.0 if quantizer.unsigned else (-hi if quantizer.narrow_range else -hi - 1)
    amax = quantizer.amax.float() * torch.exp(getattr(quantizer, _LOG_RANGE).float())
    limit = getattr(quantizer, _RANGE_LIMIT, None)
    if limit is not None:
        amax = amax.clamp_max(limit)
    scale = hi / amax
    scaled = torch.clamp(inputs.float() * scale, lo, hi)
    return ((scaled + (torch.round(scaled) - scaled).detach()) / scale).to(inputs.dtype)


@contextlib.contextmanager
def learned_ranges(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """While open, every enabled per-tensor activation quantizer of a conv / linear layer of the
    quantized ``model`` (its input, and the outputs :func:`quantize` simulates; norm layers' inputs keep
    their calibrated ranges, as the int8 export does) takes its range from a new parameter, the log of
    its range over the calibrated one (0 at first: outputs unchanged), trained by whatever optimizes
    the yielded parameters. On exit each learned range becomes the quantizer's ``amax`` (no wider
    than where a saturating activation alone reads the tensor, as the int8 export clips it) and the
    parameters are removed: the model is a quantized model as :func:`quantize` returns them, with
    other ranges. Weight quantizers keep their per-channel maxima."""
    if not is_quantized(model):
        raise QuantizationError("learned_ranges expects a model returned by ganslim.quantization.quantize")
    _register_backend(_LEARNED_RANGE_BACKEND, _learned_range_fake_quant)
    limits = _runtime_outputs(model) if isinstance(model, torch.fx.GraphModule) else {}
    learned = []
    for name, q in _quantizers(model):
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        # conv / linear layers only: the int8 export pins their ranges (deploy.qat_range_overrides); a
        # norm layer's input (instance norm) is calibrated afresh by onnxruntime, so a range learned
        # there would be trained for and not deployed (CartoonGAN's file fell 2.3 dB behind its
        # fake-quantized model)
        if (name.endswith((_INPUT_SUFFIX, _OUTPUT_SUFFIX)) and isinstance(owner, _WEIGHTED) and q.is_enabled
                and q.amax is not None and q.amax.numel() == 1 and q.backend is None):
            q.register_parameter(_LOG_RANGE, nn.Parameter(torch.zeros((), device=q.amax.device)))
            if name.endswith(_OUTPUT_SUFFIX) and limits.get(name[:-len(_OUTPUT_SUFFIX)]) is not None:
                setattr(q, _RANGE_LIMIT, float(limits[name[:-len(_OUTPUT_SUFFIX)]]))
            q.backend = _LEARNED_RANGE_BACKEND
            learned.append(q)
    try:
        yield [getattr(q, _LOG_RANGE) for q in learned]
    finally:
        with torch.no_grad():
            for q in learned:
                amax = q.amax * torch.exp(getattr(q, _LOG_RANGE).detach().float())
                limit = getattr(q, _RANGE_LIMIT, None)
                q.amax = amax.clamp_max(limit) if limit is not None else amax
                del q._parameters[_LOG_RANGE]
                if limit is not None:
                    delattr(q, _RANGE_LIMIT)
                q.backend = None


# --------------------------------------------------------------------------------------------------
# QAT
# --------------------------------------------------------------------------------------------------

def train_qat(model: nn.Module, teacher: Optional[nn.Module], loader: Iterable, config: Optional[QuantConfig] = None,
              batch_fn: Optional[Callable] = None, device: str = "cpu", progress: bool = True,
              callbacks: Iterable[Callable] = ()) -> nn.Module:
    """Fine-tune a quantized ``model`` in place (straight-through estimator) to imitate its reference:
    ``config.reference == "teacher"`` (default) the ``teacher`` given (or its outputs precomputed in the
    batches), ``"float"`` the model before quantization (the latent float weights as they are when
    this is called, frozen; ``teacher`` is not used and may be None).

    Losses as in :class:`ganslim.core.train.DistillTrainer`: L1 to the reference's output (pseudo
    pairs) and to the ground truth when the batch has one; Adam, cosine decay over ``config.steps``.
    The activation ranges are learned with the weights (:func:`learned_ranges`, Adam at
    ``config.range_lr`` on their logarithm) and stay fixed at their calibrated values where
    ``range_lr`` is 0; weight ranges stay at the per-channel maxima calibrated before QAT.
    """
    from ..core.train import DistillTrainer, LossWeights, lr_cosine

    if not is_quantized(model):
        raise QuantizationError("train_qat needs a model returned by ganslim.quantization.quantize")
    if not is_calibrated(model):
        raise QuantizationError("the model was never calibrated; call quantize(model, loader) with a loader")
    cfg = config or getattr(model, _STATE_ATTR).config
    if cfg.steps <= 0:
        return model
    if cfg.reference == "float":
        reference = to_float(model, quantized_weights=False).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    elif teacher is None:
        raise QuantizationError("QuantConfig(reference='teacher') needs a teacher to imitate")
    else:
        reference = teacher
    weights = LossWeights(cfg.recon_weight, cfg.gt_weight, 0.0, 0.0, cfg.mse_weight)
    with learned_ranges(model) if cfg.range_lr > 0 else contextlib.nullcontext([]) as ranges:
        range_ids = {id(p) for p in ranges}
        groups = [{"params": [p for p in model.parameters() if id(p) not in range_ids], "lr": cfg.lr}]
        if ranges:
            groups.append({"params": ranges, "lr": cfg.range_lr})
        trainer = DistillTrainer(model, reference, groups, weights, device=device, batch_fn=batch_fn,
                                 memory_format="contiguous",  # the fake-quant layers' speed in channels-last: unmeasured
                                 cached_teacher_outputs=cfg.reference == "teacher",
                                 # BatchNorm that folding left (SPADE's parameter-free norms) keeps the
                                 # statistics the ranges were calibrated on: QAT's batches moved SPADE's
                                 # fake-quantized model from 37 to 12 dB to its float self in 24 steps
                                 frozen_batchnorm=True)
        sched = torch.optim.lr_scheduler.LambdaLR(trainer.opt, lambda s: lr_cosine(s, cfg.steps))
        trainer.after_step.append(lambda tr: sched.step())
        trainer.run(loader, cfg.steps, desc="ganslim QAT int8", progress=progress, callbacks=callbacks)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# back to plain float modules; checkpoint state
# --------------------------------------------------------------------------------------------------

def to_float(model: nn.Module, quantized_weights: bool = True) -> nn.Module:
    """A plain float copy of a quantized model: standard ``torch.nn`` layers, no quantizers.

    ``quantized_weights=True`` stores each weight as its fake-quantized value (exactly on the
    int8 grid the network was trained for), which is what an int8 runtime will see;
    ``False`` keeps the latent float weights (for resuming QAT elsewhere).
    """
    if not is_quantized(model):
        raise QuantizationError("to_float expects a model returned by ganslim.quantization.quantize")
    state: _QuantState = getattr(model, _STATE_ATTR)
    out = copy.deepcopy(model)
    if isinstance(out, torch.fx.GraphModule):
        _unshare_inputs(out)  # the shared-input quantizer calls go with the quantizers
    for name, (cls, keys) in state.float_keys.items():
        m = out.get_submodule(name)
        plain = cls.__new__(cls)
        plain.__dict__.update({k: v for k, v in vars(m).items() if k in keys})
        plain._modules = {k: v for k, v in m._modules.items() if not k.endswith("_quantizer")}
        wq = getattr(m, "weight_quantizer", None)
        if quantized_weights and wq is not None and wq.is_enabled and getattr(m, "weight", None) is not None:
            with torch.no_grad():
                plain._parameters = dict(plain._parameters)
                plain._parameters["weight"] = nn.Parameter(wq(m.weight.detach()).clone(),
                                                           requires_grad=m.weight.requires_grad)
        parent, _, attr = name.rpartition(".")
        if name:
            setattr(out.get_submodule(parent) if parent else out, attr, plain)
        else:
            out = plain
    if hasattr(out, _STATE_ATTR):
        delattr(out, _STATE_ATTR)
    return out


def _trained_ranges(model: nn.Module, suffix: str, caller: str) -> dict[str, tuple[float, float]]:
    """``{layer: (rmin, rmax)}`` of the enabled per-tensor quantizers named ``<layer><suffix>``."""
    if not is_quantized(model):
        raise QuantizationError(f"{caller} expects a quantized model")
    out = {}
    for name, q in _quantizers(model):
        if name.endswith(suffix) and q.is_enabled and q.amax is not None and q.amax.numel() == 1:
            amax = float(q.amax)
            out[name[:-len(suffix)]] = (0.0 if q.unsigned else -amax, amax)
    return out


def input_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The activation range each quantized layer was trained with: ``{layer name: (rmin, rmax)}``,
    ``(0, amax)`` where its input quantizer is unsigned (after a ReLU), ``(-amax, amax)`` otherwise
    (units of the activations). Layers kept in float, or whose input quantizer is off, are absent.
    An int8 runtime that quantizes each layer's input on these ranges runs what QAT trained for."""
    return _trained_ranges(model, _INPUT_SUFFIX, "input_ranges")


def _output_channel_axis(conv: nn.modules.conv._ConvNd) -> Optional[int]:
    """The axis of ``conv``'s weight that holds its output channels: 0 for a conv ``(C_out, C_in / g,
    k, k)`` and a depthwise transposed conv ``(C, 1, k, k)``, 1 for a transposed conv ``(C_in, C_out,
    k, k)``; None for a grouped, not depthwise, transposed conv (its weight has no such axis)."""
    if not isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return 0
    if conv.groups == 1:
        return 1
    return 0 if conv.groups == conv.in_channels == conv.out_channels else None


def weight_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: scales (C_out,)}``: the step of each output channel's weight grid QAT trained
    (``amax / 127`` with 8 bits, ``amax / 64`` with 7 (onnxruntime's reduced range), ``amax / (2 **
    (bits - 1) - 1)`` below, units of the weights) for the convolutions whose weights are
    quantized per output channel. An int8 file that quantizes each such weight on these steps holds
    exactly the weights QAT trained; left to compute them from the weights' maxima, it rounds a second
    time wherever a channel's largest weight moved in QAT. Transposed convolutions (their output
    channels are the weight's axis 1; a depthwise one's, axis 0) are included where QAT quantized them
    per output channel."""
    if not is_quantized(model):
        raise QuantizationError("weight_scales expects a quantized model")
    out = {}
    for name, q in _quantizers(model):
        if not name.endswith(_WEIGHT_SUFFIX) or not q.is_enabled or q.amax is None:
            continue
        layer = model.get_submodule(name[:-len(_WEIGHT_SUFFIX)])
        out_axis = _output_channel_axis(layer) if isinstance(layer, nn.modules.conv._ConvNd) else None
        if out_axis is None or q.axis not in (out_axis, (out_axis,)):
            continue
        amax = q.amax.detach().float().flatten()
        if amax.numel() != layer.weight.shape[out_axis] or not bool((amax > 0).all()):
            continue
        levels = _REDUCED_LEVELS if q.backend == _REDUCED_WEIGHT_BACKEND else 2.0 ** (int(q.num_bits) - 1) - 1
        out[name[:-len(_WEIGHT_SUFFIX)]] = amax / levels
    return out


def output_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Like :func:`input_ranges`, for the layers whose output QAT quantizes as the int8 runtime will
    (a residual branch's last conv: see :func:`quantize`)."""
    return _trained_ranges(model, _OUTPUT_SUFFIX, "output_ranges")


def quant_state(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(json_config, amax_tensors)`` that :func:`restore` needs; keys of the tensors are the
    quantizer module names (``"model.1.input_quantizer"``)."""
    if not is_quantized(model):
        raise QuantizationError("quant_state expects a quantized model")
    state: _QuantState = getattr(model, _STATE_ATTR)
    amax = {n: q.amax.detach().float().contiguous() for n, q in _quantizers(model) if q.amax is not None}
    meta = {"backend": state.config.backend, "config": state.config.to_dict(),
            "float_modules": list(state.float_modules), "enabled": [n for n, q in _quantizers(model) if q.is_enabled],
            "shared_inputs": list(state.shared_inputs),
            "unsigned": [n for n, q in _quantizers(model) if q.unsigned]}
    return meta, amax


def restore(float_model: nn.Module, meta: dict, amax: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a quantized model from its float twin (BatchNorm already folded, as saved) and the
    stored :func:`quant_state`; outputs match the saved model's exactly."""
    cfg_dict = dict(meta.get("config") or {})
    try:
        cfg = QuantConfig(**{**cfg_dict, "exclude": tuple(cfg_dict.get("exclude", ())), "fold_batchnorm": False})
    except TypeError as e:
        raise QuantizationError(f"unreadable quantization state: {e}") from None
    # the stored float_modules say which layers stay float; no forward pass is needed to find them again
    model = quantize(float_model, None, cfg, skip_first=False, skip_last=False)
    getattr(model, _STATE_ATTR).config = cfg
    qs = dict(_quantizers(model))
    for name in meta.get("float_modules", []):
        for qn, q in qs.items():
            if qn.startswith(name + "."):
                q.disable()
    enabled = set(meta.get("enabled", []))
    for qn, q in qs.items():
        if q.is_enabled and qn not in enabled:
            q.disable()
    missing = [n for n in enabled if n not in qs]
    if missing:
        raise QuantizationError(f"stored quantizers {missing[:3]} do not exist in the rebuilt model")
    # what the runtime quantizes beyond the layers' inputs, as the model was trained (absent from
    # checkpoints written before ganslim simulated it: those are restored as they were trained)
    outputs = [qn[:-len(_OUTPUT_SUFFIX)] for qn in enabled if qn.endswith(_OUTPUT_SUFFIX) and not qs[qn].is_enabled]
    shared = _simulate_runtime(model, cfg, outputs)[0] if "shared_inputs" in meta else []
    if shared != list(meta.get("shared_inputs") or []):
        raise QuantizationError(f"the rebuilt model shares other quantized inputs ({shared[:3]}) than the saved one "
                                f"({list(meta.get('shared_inputs') or [])[:3]})")
    getattr(model, _STATE_ATTR).shared_inputs = shared
    for qn in meta.get("unsigned", []):
        if qn in qs:
            qs[qn].unsigned = True
    for qn, t in amax.items():
        if qn not in qs:
            raise QuantizationError(f"stored range for unknown quantizer {qn!r}")
        if qn.endswith(_WEIGHT_SUFFIX) and t.dim() > 1 and t.shape[0] > 1 and qs[qn].axis in (1, (1,)):
            qs[qn].axis = 0  # written before transposed convs' weights were quantized per output channel
            qs[qn].reset_amax()
        qs[qn].amax = t.to(next((p.device for p in model.parameters()), torch.device("cpu")))
    _use_weight_grid(model, cfg)
    getattr(model, _STATE_ATTR).float_modules = list(meta.get("float_modules", []))
    return model.eval()
