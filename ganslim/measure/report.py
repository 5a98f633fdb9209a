"""Before/after report of a compression run: a readable table via ``str()``, ``to_dict()`` for JSON."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .stats import ModelStats


# one row type for the report, its deployment table and ``ganslim bench`` (DeployStats: its earlier name)
DeployStats = ModelStats


def format_deploy_table(rows: list, threads: Optional[int] = None) -> str:
    """Fixed-width table of deployed-file rows (:class:`ModelStats`), ratios to the first (fp32) row."""
    if not rows:
        return ""
    base = rows[0]

    def f(v, nd=2):
        return "n/a" if v is None else f"{v:.{nd}f}"

    head = ("onnxruntime CPU" + (f" ({threads} threads)" if threads else ""), "size MB", "x fp32", "latency ms",
            "x fp32", "PSNR to float", "PSNR to teacher", "PSNR to GT", "int8 ops")
    table = [head]
    for r in rows:
        table.append((r.name, f(r.size_mb), f(r.size_mb / base.size_mb) if base.size_mb else "",
                      f(r.latency_ms, 1), f(r.latency_ms / base.latency_ms) if r.latency_ms and base.latency_ms else "",
                      f(r.psnr_to_float), f(r.psnr_to_teacher), f(r.psnr_to_gt), str(r.int8_ops)))
    w = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


@dataclass
class CompressReport:
    teacher: ModelStats
    student: ModelStats
    input_shape: tuple
    latency_threads: Optional[int] = None
    widths: dict = field(default_factory=dict)  # group root -> (kept, total)
    skipped: dict = field(default_factory=dict)  # layer -> reason
    distill_layers: dict = field(default_factory=dict)
    target_macs: Optional[float] = None  # fraction of the teacher's MACs asked for
    steps: int = 0
    finetune_steps: int = 0
    seconds: float = 0.0
    final_rho: Optional[float] = None
    export_rel_diff: Optional[float] = None
    notes: list = field(default_factory=list)
    quant: Optional[str] = None  # "int8" when a QAT stage ran
    quant_steps: int = 0
    deployment: list = field(default_factory=list)  # ModelStats rows (onnxruntime), fp32 first
    latency_target_ms: Optional[float] = None  # device-aware budget, when one was given
    latency_calibration: list = field(default_factory=list)  # [(width, MACs fraction, ms)] measured
    strategy: str = "uniform"
    search: dict = field(default_factory=dict)  # strategy "ofa": supernet training and search figures
    train_precision: str = "fp32"  # the training convolutions' arithmetic ("fp32" or "bf16")

    @property
    def macs_reduction(self) -> float:
        return self.teacher.macs / max(self.student.macs, 1.0)

    @property
    def speedup(self) -> Optional[float]:
        if self.teacher.latency_ms and self.student.latency_ms:
            return self.teacher.latency_ms / self.student.latency_ms
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs_reduction"] = self.macs_reduction
        d["speedup"] = self.speedup
        return json.loads(json.dumps(d, default=str))

    def __str__(self) -> str:
        t, s = self.teacher, self.student

        def fmt(v, unit="", nd=2):
            if v is None:
                return "n/a"
            if isinstance(v, float) and math.isinf(v):
                return "inf"
            return f"{v:.{nd}f}{unit}"

        def ratio(a, b):
            return "" if a is None or b is None or not b else f"{a / b:.2f}x"

        rows = [
            ("MACs (papers' convention)", fmt(t.macs / 1e9, " G"), fmt(s.macs / 1e9, " G", 3), ratio(t.macs, s.macs)),
            ("MACs (true multiply-adds)", fmt(t.macs_true / 1e9, " G"), fmt(s.macs_true / 1e9, " G", 3), ratio(t.macs_true, s.macs_true)),
            ("parameters", f"{t.params / 1e6:.3f} M", f"{s.params / 1e6:.3f} M", ratio(t.params, s.params)),
            ("size fp32", fmt(t.size_mb, " MB"), fmt(s.size_mb, " MB"), ratio(t.size_mb, s.size_mb)),
            (f"CPU latency median ({self.latency_threads} threads)", fmt(t.latency_ms, " ms", 1), fmt(s.latency_ms, " ms", 1), ratio(t.latency_ms, s.latency_ms)),
            ("PSNR to teacher", "-", fmt(s.psnr_to_teacher, " dB"), ""),
            ("SSIM to teacher", "-", fmt(s.ssim_to_teacher, "", 4), ""),
            ("PSNR to ground truth", fmt(t.psnr_to_gt, " dB"), fmt(s.psnr_to_gt, " dB"),
             "" if t.psnr_to_gt is None or s.psnr_to_gt is None else f"{s.psnr_to_gt - t.psnr_to_gt:+.2f} dB"),
            ("SSIM to ground truth", fmt(t.ssim_to_gt, "", 4), fmt(s.ssim_to_gt, "", 4), ""),
        ]
        w0 = max(len(r[0]) for r in rows)
        w = [max(len(r[i]) for r in rows + [("", "teacher", "student", "teacher/student")]) for i in range(4)]
        lines = [f"{'':<{w0}}  {'teacher':>{w[1]}}  {'student':>{w[2]}}  {'teacher/student':>{w[3]}}"]
        lines.append("-" * len(lines[0]))
        lines += [f"{a:<{w0}}  {b:>{w[1]}}  {c:>{w[2]}}  {d:>{w[3]}}" for a, b, c, d in rows]
        first_stage = {"ofa": "supernet steps", "slim": "gated steps"}.get(self.strategy, "training steps")
        stages = f"{self.steps} {first_stage} + " if self.steps else ""  # onestep, evolve, uniform: no first stage
        lines.append(f"input {tuple(self.input_shape)}; strategy {self.strategy}: {stages}"
                     f"{self.finetune_steps} fine-tune steps{' (convolutions in bf16)' if self.train_precision == 'bf16' else ''} in {self.seconds / 60:.1f} min; export |diff| / output scale (float64) "
                     f"{fmt(self.export_rel_diff, '', 7)}")
        if self.widths:
            lines.append("widths kept: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in list(self.widths.items())))
        if self.skipped:
            lines.append("not pruned: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items()))
        if self.search:
            sr = self.search
            line = (f"search: {sr['evaluations']} candidates evaluated in {sr['seconds']:.1f} s ({sr['per_minute']:.0f}/min); "
                    f"chosen: fitness {sr['best_fitness']:.3f} ({sr['metric']}) before fine-tune")
            if "supernet_steps" in sr:
                line += f"; supernet {sr['supernet_steps']} steps in {sr['supernet_seconds'] / 60:.1f} min"
            lines.append(line)
        if self.deployment:
            lines.append(f"deployment ({self.quant or 'fp32'}{f', {self.quant_steps} QAT steps' if self.quant else ''}):")
            lines.append(format_deploy_table(self.deployment, self.latency_threads))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def write_json(obj: Any, path: str) -> str:
    """Write JSON atomically (temporary file + rename): a crash never leaves half a report."""
    import os

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
