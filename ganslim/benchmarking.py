"""``ganslim.bench`` (module ``ganslim.benchmarking``): measure generators side by side (the first one is the reference).

Per model: MACs (papers' convention, G), params (M), size (MB: file size for a path, fp32 weights
otherwise), CPU latency median and p90 (ms, whole batch), PSNR to the reference's output and PSNR/SSIM
to ground truth when given. A model that fails to load or run is reported in its row with the
reason; the other rows are still measured.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from . import measure

COLUMNS = ["model", "MACs(G)", "params(M)", "size(MB)", "latency(ms)", "p90(ms)", "PSNR-ref(dB)", "PSNR-gt(dB)",
           "SSIM-gt", "error"]


def resolve_model(m: Any) -> nn.Module:
    """An ``nn.Module`` as given (eval mode), ``"default"`` -> the default teacher, otherwise a ganslim
    checkpoint path loaded without its original class."""
    if isinstance(m, nn.Module):
        return m.eval()
    from . import data
    from .checkpoint import load

    if m in (None, "default"):
        return data.default_teacher()
    return load(m)


def bench(models_or_paths: Sequence[Any], inputs: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None,
          repeats: int = 10, threads: Optional[int] = None) -> list[dict]:
    """Measure each model (an ``nn.Module``, a ganslim checkpoint path, or ``"default"``) on ``inputs``
    ``(N, C, H, W)`` (default: the held-out photo, with its cartoon as ``target``). Returns one dict
    per model with the keys of :data:`COLUMNS` that apply."""
    if inputs is None:
        from . import data

        (inputs, target), = data.test_pairs()
    rows, ref = [], None
    for m in models_or_paths:
        row: dict = {"model": m if isinstance(m, str) else type(m).__name__}
        try:
            model = resolve_model(m)
            with torch.no_grad():
                out = model(inputs)
            row.update({"MACs(G)": measure.count_macs(model, inputs) / 1e9,
                        "params(M)": measure.count_params(model) / 1e6,
                        "size(MB)": measure.model_size_mb(m) if isinstance(m, str) and os.path.exists(m)
                        else measure.model_size_mb(model)})
            lat = measure.measure_latency(model, inputs, warmup=2, repeats=repeats, threads=threads)
            row["latency(ms)"], row["p90(ms)"] = lat.median_ms, lat.p90_ms
            if ref is None:
                ref = out
            elif ref.shape == out.shape:
                row["PSNR-ref(dB)"] = measure.psnr(out, ref)
            else:
                row["error"] = f"output {tuple(out.shape)} != reference {tuple(ref.shape)}"
            if target is not None and target.shape == out.shape:
                row["PSNR-gt(dB)"] = measure.psnr(out, target)
                row["SSIM-gt"] = measure.ssim(out, target)
        except Exception as e:  # noqa: BLE001 - reported per row, other rows still measured
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Aligned text table of :func:`bench` rows."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
