"""``ganslim.bench`` (module ``ganslim.measure.benchmarking``): a teacher and any number of compressed
generators, measured side by side on the same inputs; the first model is the teacher (reference).

Per row (one model on one runtime, a :class:`~ganslim.measure.stats.ModelStats`, the compress
report's row type): MACs (papers' convention; the table shows G; counted from the graph for ONNX
files too), parameters (the table shows M), file size (MB; fp32 weights for an in-memory module), latency median and
p90 (ms for the whole batch; CPU threads stated; CUDA when the model is there), throughput (img/s),
peak activation memory (MB, PyTorch runtimes), PSNR/SSIM to the teacher's output and to the ground
truth when given, FID / LPIPS only with user-supplied feature networks (``"not computed"``
otherwise). Every cost column has its ratio to the teacher (``10.2x`` = ten times cheaper).

Models: ``nn.Module``; ``"default"`` (the default teacher); a ganslim ``.safetensors`` checkpoint
(also QAT ones); a plain ``torch.save`` state dict or plain safetensors with ``factory=``; an
``.onnx`` file (run by onnxruntime). Runtimes per PyTorch model: ``eager``, ``eager-channels-last``
(the same module in NHWC tensors, :class:`ganslim.core.memory_format.ChannelsLast`), ``compile``
(``torch.compile``), ``onnxruntime`` (fp32 export), ``onnxruntime-int8`` (int8 QDQ export; QAT
models keep their trained weights). A model or runtime that fails is reported in its row with the
reason; the other rows are still measured.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import os
import tempfile
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from .. import measure
from .._utils import as_input_tuple

from .stats import NOT_COMPUTED, ModelStats

RUNTIMES = ("eager", "eager-channels-last", "compile", "onnxruntime", "onnxruntime-int8")


# one row type for bench and the compress report (BenchRow: its earlier name)
BenchRow = ModelStats


def _factory(spec: str) -> Callable[[], nn.Module]:
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise ValueError(f"factory must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(mod_name), fn_name)


def load_state_file(model: nn.Module, path: str) -> nn.Module:
    """Load a ``torch.save`` state dict (optionally under ``"state_dict"``, as training scripts save
    it) into ``model``; a file that does not match the model is a one-line ``ValueError``."""
    from ..deployment.checkpoint import CheckpointError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable torch file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ValueError(f"{path}: does not match the factory's model ({detail})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the factory's model (missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")
    return model


def resolve_model(m: Any, factory: Optional[str | Callable] = None) -> nn.Module:
    """Any accepted model description -> module in eval mode (see the module docstring)."""
    if isinstance(m, nn.Module):
        return m.eval()
    from .. import data
    from ..deployment.checkpoint import load, read_metadata

    if m in (None, "default"):
        return data.default_teacher()
    path = str(m)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    make = _factory(factory) if isinstance(factory, str) else factory
    low = path.lower()
    if low.endswith(".onnx"):
        from ..deployment.deploy import OnnxModule

        return OnnxModule(path)
    if low.endswith(".safetensors"):
        # a ganslim checkpoint rebuilds itself; a plain safetensors state dict needs the factory
        if read_metadata(path).get("format_version") is not None or make is None:
            return load(path)
        return load(path, model=make())
    if low.endswith((".pth", ".pt", ".ckpt", ".bin")):
        if make is None:
            raise ValueError(f"{path}: a plain state dict needs a model factory (factory='pkg.module:function', "
                             "CLI --factory) to know the architecture")
        return load_state_file(make(), path).eval()
    raise ValueError(f"{path}: unknown format (expected .safetensors, .onnx, or .pth/.pt with a factory)")


def _label(m: Any, i: int) -> str:
    if isinstance(m, str):
        return "default teacher" if m == "default" else os.path.basename(m)
    return f"{type(m).__name__}#{i}"


def _labels(models_or_paths: Sequence[Any]) -> list[str]:
    """A name per model: the file name, or ``folder/file`` where file names repeat (every
    ``ganslim compress --out DIR`` writes ``DIR/student.safetensors``)."""
    base = [_label(m, i) for i, m in enumerate(models_or_paths)]
    names = list(base)
    for i, m in enumerate(models_or_paths):
        if isinstance(m, str) and m != "default" and base.count(base[i]) > 1:
            folder = os.path.basename(os.path.dirname(os.path.abspath(m)))
            names[i] = f"{folder}/{base[i]}"
    return names


def _fid(feature_net: nn.Module, a: list[torch.Tensor], b: list[torch.Tensor]) -> Any:
    """Fréchet distance between feature statistics of two image sets (``feature_net``: images ->
    (N, D) features, e.g. a TorchScript Inception pool3)."""
    import numpy as np
    from scipy import linalg

    if len(a) < 2:
        return f"{NOT_COMPUTED} (needs at least 2 images, got {len(a)})"
    with torch.no_grad():
        fa = torch.cat([feature_net(x).flatten(1) for x in a]).double().numpy()
        fb = torch.cat([feature_net(x).flatten(1) for x in b]).double().numpy()
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _load_feature_net(path: Optional[str], what: str):
    """A user's local network: ``.pt2`` (``torch.export.save``) or TorchScript (``torch.jit.save``)."""
    if path is None:
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} weights {path!r} not found (a .pt2 file from torch.export.save, or "
                                "TorchScript from torch.jit.save); nothing is downloaded")
    if str(path).endswith(".pt2"):
        return torch.export.load(path).module()
    return torch.jit.load(path, map_location="cpu").eval()


def bench(models_or_paths: Sequence[Any], inputs: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None,
          repeats: int = 10, threads: Optional[int] = None, *, eval_pairs: Optional[list] = None,
          runtimes: Sequence[str] = ("eager",), factory: Optional[str | Callable] = None,
          calib_loader: Optional[Any] = None, fid_features: Optional[str] = None, lpips_net: Optional[str] = None,
          warmup: int = 2, max_seconds: float = 20.0, device: Optional[str] = None,
          paired_rounds: int = 0, progress: bool = False) -> list[ModelStats]:
    """Measure each model on the same inputs; the first one is the teacher (reference).

    Args:
        models_or_paths: modules, ``"default"``, or checkpoint/ONNX paths (see module docstring).
        inputs, target: one input ``(N, C, H, W)`` (or tuple) and its ground truth; or
            ``eval_pairs=[(inputs, target_or_None), ...]`` for several images (latency at the first).
            Default: the embedded held-out photo with its ground truth.
        runtimes: any of :data:`RUNTIMES` (ONNX files always run on onnxruntime).
        factory: ``"pkg.module:function"`` (or callable) building the architecture for plain state dicts.
        calib_loader: batches for the int8 runtime's activation ranges (default: the eval inputs).
        fid_features: a saved network mapping images to features (FID of each model's outputs vs
            the ground truth, or vs the teacher's outputs without one); ``lpips_net``: a file
            ``(x, y) -> distance per image``. Both ``.pt2`` (torch.export) or TorchScript. Without them the columns say "not computed".
        device: ``"cuda"`` to measure PyTorch runtimes there (inputs and model moved).
        paired_rounds: when > 0, every measured row is timed again with the others in alternating
            turns (:func:`ganslim.measure.paired_latency`, this many rounds): ``latency_paired_ms`` and
            ``speedup_paired`` (the teacher's time / this row's, taken within each round), the speed-ups
            that the machine's drift between one row's timing and the next does not move.

    Returns:
        list of :class:`~ganslim.measure.stats.ModelStats`, teacher first; ``rows[i].error`` says why a row failed.
    """
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise ValueError(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
    if paired_rounds and paired_rounds < 3:  # checked before minutes of timing, not after
        raise ValueError(f"paired_rounds must be 0 (no paired timing) or >= 3, got {paired_rounds}")
    if eval_pairs is None:
        if inputs is None:
            from .. import data

            eval_pairs = [((x,), y) for x, y in data.test_pairs()]
        else:
            eval_pairs = [(as_input_tuple(inputs), target)]
    else:
        eval_pairs = [(as_input_tuple(i), t) for i, t in eval_pairs]
    if not eval_pairs:
        raise ValueError("no evaluation inputs")
    first = eval_pairs[0][0]
    fid_net = _load_feature_net(fid_features, "FID feature network")
    lpips = _load_feature_net(lpips_net, "LPIPS network")
    dev = torch.device(device) if device else torch.device("cpu")
    n_threads = threads or torch.get_num_threads()
    rows: list[ModelStats] = []
    teacher_outs: Optional[list[torch.Tensor]] = None
    teacher_row: Optional[ModelStats] = None
    timed: list[tuple[ModelStats, nn.Module]] = []  # measured rows and their runners, for the paired timing
    with tempfile.TemporaryDirectory(prefix="ganslim-bench-") as tmpdir:
        names = _labels(models_or_paths)
        for i, spec in enumerate(models_or_paths):
            name = names[i]
            try:
                model = resolve_model(spec, factory)
            except Exception as e:  # noqa: BLE001 - reported in the row
                rows.append(ModelStats(name=name, runtime="-", error=f"{type(e).__name__}: {e}"))
                if i == 0:
                    break  # no teacher: nothing to compare against
                continue
            from ..deployment.deploy import OnnxModule

            is_onnx = isinstance(model, OnnxModule)
            model_runtimes = ["onnxruntime"] if is_onnx else list(runtimes)
            for rt in model_runtimes:
                row = ModelStats(name=name, runtime=rt, threads=n_threads)
                try:
                    runner, file_for_size = _prepare(model, rt, spec, first, calib_loader, eval_pairs, tmpdir, n_threads,
                                                     is_onnx)
                    _measure_row(row, model, runner, rt, file_for_size, eval_pairs, dev, repeats, warmup, max_seconds,
                                 n_threads, is_onnx)
                    outs = [runner_out(runner, inp, dev) for inp, _ in eval_pairs]
                    if teacher_outs is None:
                        teacher_outs = outs
                    else:
                        for o, t in zip(outs, teacher_outs):
                            if o.shape != t.shape:
                                raise ValueError(f"output {tuple(o.shape)} does not match the teacher's {tuple(t.shape)}")
                        row.psnr_to_teacher = _mean([measure.psnr(o, t) for o, t in zip(outs, teacher_outs)])
                        row.ssim_to_teacher = _mean([measure.ssim(o, t) for o, t in zip(outs, teacher_outs)])
                    gts = [(o, g) for o, (_, g) in zip(outs, eval_pairs) if g is not None and g.shape == o.shape]
                    if gts:
                        row.psnr_to_gt = _mean([measure.psnr(o, g) for o, g in gts])
                        row.ssim_to_gt = _mean([measure.ssim(o, g) for o, g in gts])
                    refs = [g for _, g in gts] if gts else teacher_outs
                    if fid_net is not None:
                        row.fid = _fid(fid_net, outs, refs)
                    if lpips is not None:
                        with torch.no_grad():
                            row.lpips = _mean([float(lpips(o, r).mean()) for o, r in zip(outs, refs)])
                except Exception as e:  # noqa: BLE001 - reported per row, other rows still measured
                    row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if teacher_row is None and row.error is None:
                    teacher_row = row
                if teacher_row is not None:
                    row.set_ratios(teacher_row)
                rows.append(row)
                if row.error is None and row.latency_ms is not None:
                    timed.append((row, runner))
                if progress:
                    print(f"  measured {row.name} [{row.runtime}]" + (f": {row.error}" if row.error else ""), flush=True)
        if paired_rounds > 0 and len(timed) >= 2 and timed[0][0] is teacher_row:
            paired = measure.paired_latency([r for _, r in timed], first, rounds=paired_rounds, threads=n_threads,
                                            device=dev)
            for (row, _), ms, ratio in zip(timed, paired.median_ms, paired.ratio):
                row.latency_paired_ms, row.speedup_paired = ms, 1.0 / ratio
    return rows


def _mean(v: list[float]) -> Optional[float]:
    v = [x for x in v if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else None


def runner_out(runner: nn.Module, inputs: tuple, dev: torch.device) -> torch.Tensor:
    from ..core.train import first_output

    with torch.no_grad():
        on_dev = not getattr(runner, "_ganslim_cpu_only", False)
        out = runner(*(t.to(dev) if on_dev else t for t in inputs))
    return first_output(out).detach().float().cpu()


def _prepare(model: nn.Module, rt: str, spec: Any, first: tuple, calib_loader, eval_pairs, tmpdir: str, threads: int,
             is_onnx: bool):
    """The callable that runs ``model`` on runtime ``rt``, and the file whose size is reported."""
    from ..deployment.deploy import OnnxModule, export

    src_file = spec if isinstance(spec, str) and os.path.exists(spec) else None
    if is_onnx:
        model._ganslim_cpu_only = True
        return model, src_file
    if rt == "eager":
        return model, src_file
    if rt == "eager-channels-last":
        from ..core.memory_format import ChannelsLast

        return ChannelsLast(model).eval(), src_file
    if rt == "compile":
        compiled = torch.compile(copy.deepcopy(model))
        with torch.no_grad():
            compiled(*first)  # compile now, so latency measures the compiled code
        return compiled, src_file
    fmt = "onnx" if rt == "onnxruntime" else "onnx-int8"
    path = os.path.join(tmpdir, f"m{len(os.listdir(tmpdir))}.onnx")
    calib = calib_loader if calib_loader is not None else [inp for inp, _ in eval_pairs]
    export(model, path, fmt, example_inputs=first, calib_loader=calib if fmt == "onnx-int8" else None)
    runner = OnnxModule(path, threads=threads)
    runner._ganslim_cpu_only = True
    return runner, path


def _measure_row(row: ModelStats, model: nn.Module, runner: nn.Module, rt: str, size_file: Optional[str], eval_pairs,
                 dev: torch.device, repeats: int, warmup: int, max_seconds: float, threads: int, is_onnx: bool) -> None:
    from ..deployment.deploy import OnnxModule, onnx_macs

    first = eval_pairs[0][0]
    cpu_only = getattr(runner, "_ganslim_cpu_only", False)
    run_dev = torch.device("cpu") if cpu_only else dev
    if isinstance(runner, OnnxModule):
        row.macs = float(onnx_macs(runner.path, first))
        row.params = int(runner.num_weights())
    else:
        from ..deployment import quantization as Q

        counted = Q.to_float(model) if Q.is_quantized(model) else model
        row.macs = float(measure.count_macs(counted, first))
        row.macs_true = float(measure.count_macs(counted, first, "true"))
        row.params = measure.count_params(counted)
    row.size_mb = os.path.getsize(size_file) / 1e6 if size_file else measure.model_size_mb(model)
    if run_dev.type != "cpu":
        runner = runner.to(run_dev)
    lat = measure.measure_latency(runner, first, warmup=warmup, repeats=repeats,
                                  threads=None if cpu_only and isinstance(runner, OnnxModule) else threads,
                                  device=run_dev if not isinstance(runner, OnnxModule) else None, max_seconds=max_seconds)
    row.latency_ms, row.latency_p90_ms = lat.median_ms, lat.p90_ms
    row.throughput = measure.throughput(lat)
    row.device = lat.device
    if rt == "eager" and not isinstance(runner, OnnxModule):
        try:
            row.peak_mb = measure.peak_memory_mb(runner, first, device=run_dev)
        except Exception as e:  # noqa: BLE001 - memory is a bonus column
            row.notes.append(f"peak memory not measured: {e}")


# ---------------------------------------------------------------------------------------------- output
# (title, ModelStats field, its ratio field, display scale)
_COLS = [("model", "name", None, 1), ("runtime", "runtime", None, 1), ("MACs G", "macs", "macs_x", 1e9),
         ("params M", "params", "params_x", 1e6), ("size MB", "size_mb", "size_x", 1),
         ("latency ms", "latency_ms", "latency_x", 1), ("p90 ms", "latency_p90_ms", None, 1),
         ("paired ms", "latency_paired_ms", "speedup_paired", 1), ("img/s", "throughput", None, 1),
         ("peak MB", "peak_mb", "peak_x", 1), ("PSNR-teacher", "psnr_to_teacher", None, 1), ("PSNR-GT", "psnr_to_gt", None, 1),
         ("SSIM-GT", "ssim_to_gt", None, 1), ("FID", "fid", None, 1), ("LPIPS", "lpips", None, 1)]


def _cell(row: ModelStats, key: str, ratio_key: Optional[str], scale: float = 1) -> str:
    v = getattr(row, key)
    if v is None:
        return "-"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and key not in ("threads",):
        v = v / scale
        nd = 3 if key in ("macs", "params", "ssim_to_gt") else (2 if key.startswith(("psnr", "size", "fid", "lpips")) else 1)
        s = f"{v:.{nd}f}"
    else:
        s = str(v)
    r = getattr(row, ratio_key) if ratio_key else None
    return f"{s} ({r:.2f}x)" if r is not None else s


def _visible_cols(rows: list[ModelStats]) -> list[tuple]:
    keep = []
    for title, key, rk, scale in _COLS:
        vals = [getattr(r, key) for r in rows]
        if key in ("fid", "lpips") and all(v == NOT_COMPUTED for v in vals):
            continue
        if all(v is None for v in vals) and key not in ("name", "runtime"):
            continue
        keep.append((title, key, rk, scale))
    return keep


def format_table(rows: list[ModelStats]) -> str:
    """Aligned text table; ratios to the teacher in parentheses; errors listed below."""
    cols = _visible_cols(rows)
    table = [[c[0] for c in cols]] + [[_cell(r, k, rk, sc) if not r.error else (_cell(r, k, None) if k in ("name", "runtime") else "")
                                       for _, k, rk, sc in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    out = ["  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(line)) for line in table]
    out.insert(1, "-" * len(out[0]))
    for r in rows:
        if r.error:
            out.append(f"{r.name} [{r.runtime}]: {r.error}")
    if all(r.fid == NOT_COMPUTED for r in rows):
        out.append("FID / LPIPS: not computed (pass --fid-features / --lpips with local .pt2 or TorchScript networks)")
    return "\n".join(out)


def format_markdown(rows: list[ModelStats]) -> str:
    cols = _visible_cols(rows) + [("error", "error", None, 1)]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k, rk, sc) for _, k, rk, sc in cols) + " |")
    return "\n".join(lines)


def rows_to_json(rows: list[ModelStats]) -> list[dict]:
    return [asdict(r) for r in rows]


def write_outputs(rows: list[ModelStats], json_path: Optional[str] = None, markdown_path: Optional[str] = None,
                  plot_path: Optional[str] = None, x_axis: str = "macs") -> list[str]:
    """Write the chosen outputs (atomic JSON, Markdown, Pareto PNG); returns the paths written."""
    from .report import write_json

    written = []
    if json_path:
        written.append(write_json(rows_to_json(rows), json_path))
    if markdown_path:
        tmp = f"{markdown_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(format_markdown(rows) + "\n")
        os.replace(tmp, markdown_path)
        written.append(markdown_path)
    if plot_path:
        written.append(pareto_plot(rows, plot_path, x_axis))
    return written


def pareto_plot(rows: list[ModelStats], path: str, x_axis: str = "macs") -> str:
    """PNG: cost (MACs G or latency ms, log scale) against fidelity (PSNR to ground truth, or to the
    teacher without one), one labelled point per row; the Pareto front is drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "macs" if x_axis == "macs" else "latency_ms"
    scale = 1e9 if key == "macs" else 1.0
    use_gt = any(r.psnr_to_gt is not None for r in rows)
    yk = "psnr_to_gt" if use_gt else "psnr_to_teacher"
    pts = [(getattr(r, key) / scale, getattr(r, yk), f"{r.name} [{r.runtime}]") for r in rows
           if not r.error and getattr(r, key) and getattr(r, yk) is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    merged: dict = {}  # identical points (e.g. one network on two runtimes at equal MACs) share a label
    for x, y, lab in pts:
        merged.setdefault((round(x, 6), round(y, 4)), []).append(lab)
    for i, ((x, y), labs) in enumerate(sorted(merged.items())):
        ax.scatter([x], [y], s=36)
        # alternate above / below so neighbours at similar cost do not print over each other
        ax.annotate(" + ".join(labs), (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -11),
                    fontsize=7)
    front, best = [], -float("inf")
    for x, y in sorted(merged, key=lambda p: (p[0], -p[1])):  # cheapest first; at equal cost the best only
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="gray", linewidth=1, label="Pareto front")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    ax.set_xlabel("MACs (G, papers' convention)" if key == "macs" else "latency (ms)")
    ax.set_ylabel("PSNR to ground truth (dB)" if use_gt else "PSNR to teacher (dB)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def image_grid(models_or_paths: Sequence[Any], path: str, eval_pairs: Optional[list] = None,
               factory: Optional[str | Callable] = None, labels: Optional[Sequence[str]] = None) -> str:
    """PNG grid, one row per evaluation image: input | teacher | each model | ground truth."""
    from .. import data
    from ..visualize import save_image_grid

    if eval_pairs is None:
        eval_pairs = [((x,), y) for x, y in data.test_pairs()]
    models = []
    names = list(labels) if labels else _labels(models_or_paths)
    for i, m in enumerate(models_or_paths):
        try:
            models.append((names[i], resolve_model(m, factory)))
        except Exception:  # noqa: BLE001 - the table reports why; the grid shows what loads
            continue
    grid_rows = []
    for inputs, target in eval_pairs:
        inputs = as_input_tuple(inputs)
        row = [inputs[0]] + [runner_out(m, inputs, torch.device("cpu")) for _, m in models]
        if target is not None:
            row.append(target)
        grid_rows.append(row)
    names = ["input"] + [n for n, _ in models] + (["ground truth"] if eval_pairs[0][1] is not None else [])
    return save_image_grid(grid_rows, path, labels=names)


def dump(rows: list[ModelStats]) -> str:
    return json.dumps(rows_to_json(rows), indent=2, default=str)
