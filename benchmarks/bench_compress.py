"""Headline numbers of ``ganslim.compress`` on the default teacher, measured side by side in one run.

    python benchmarks/bench_compress.py                 # the targets below (1/10 and 1/20 of the teacher's MACs)
    python benchmarks/bench_compress.py --targets 0.1 --overhead-only

Prints, per MACs target: MACs reduction, PSNR to ground truth of teacher and student on the held-out
photo, CPU wall time of the whole compression, measured CPU latency speed-up of the exported model
and its ratio to the MACs reduction, in eager PyTorch and in onnxruntime (the same network exported
to ONNX); and the training-step overhead of gates + distillation hooks
over a plain student step (same network, same batch, interleaved timing). Results also go to
``benchmarks/results/compress.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim import data  # noqa: E402
from ganslim.compression import compress  # noqa: E402
from ganslim.demo import DEMO_CONFIG, demo_loader  # noqa: E402
from ganslim.deployment.deploy import measure_deployment  # noqa: E402
from ganslim.core.distill import FeatureDistiller, auto_distill_points  # noqa: E402
from ganslim.core.gating import GateSet  # noqa: E402
from ganslim.core.targeting import find_channel_groups  # noqa: E402


def step_overhead(teacher, batch, repeats: int = 12) -> dict:
    """Median seconds of one training step: plain student (L1 to teacher) vs gated + distilled."""
    x, y = batch
    plain = copy.deepcopy(teacher).train()
    gated = copy.deepcopy(teacher).train()
    ex = x[:1]
    gates = GateSet(find_channel_groups(gated, ex)).attach(gated)
    pts = auto_distill_points(gated, ex)
    dist = FeatureDistiller(gated, teacher, {p: p for p in pts}, ex)
    opt_p = torch.optim.Adam(plain.parameters(), 1e-4)
    opt_g = torch.optim.Adam(list(gated.parameters()) + list(gates.parameters()) + list(dist.parameters()), 1e-4)

    def plain_step():
        with torch.no_grad():
            t = teacher(x)
        s = plain(x)
        loss = F.l1_loss(s, t) + F.l1_loss(s, y)
        opt_p.zero_grad()
        loss.backward()
        opt_p.step()

    def gated_step():
        with torch.no_grad():
            t = teacher(x)
        s = gated(x)
        loss = F.l1_loss(s, t) + F.l1_loss(s, y) + dist.loss()
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        gates.prox_step(1e-2, 1e-3)

    tp, tg = [], []
    for i in range(repeats + 2):
        for fn, acc in ((plain_step, tp), (gated_step, tg)):
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                acc.append(time.perf_counter() - t0)
    dist.remove()
    gates.detach()
    mp, mg = statistics.median(tp), statistics.median(tg)
    return {"plain_step_s": mp, "gated_step_s": mg, "overhead": mg / mp}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="0.1,0.1:8,0.25",
                    help="comma-separated fractions of the teacher's MACs, each optionally ':M' to round widths to multiples of M")
    ap.add_argument("--strategy", default="slim", help="its tables were measured with slim (the default until "
                    "bench_peer.py); the gates' training-step overhead is slim's")
    ap.add_argument("--steps", type=int, default=DEMO_CONFIG.steps)
    ap.add_argument("--finetune-steps", type=int, default=DEMO_CONFIG.finetune_steps)
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compress.json"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    teacher = data.default_teacher()
    (x, y), = data.test_pairs()
    batch = next(iter(data.default_loader(batch_size=4, crop=64, length=4)))
    machine = describe_machine()
    print(f"machine: {machine}")
    ov = step_overhead(teacher, batch)
    print(f"training step, batch 4x3x64x64: plain student {ov['plain_step_s'] * 1e3:.0f} ms, "
          f"with gates + distillation hooks {ov['gated_step_s'] * 1e3:.0f} ms -> overhead {ov['overhead']:.2f}x")
    results = {"machine": machine, "step_overhead": ov, "runs": []}
    if not args.overhead_only:
        for spec in args.targets.split(","):
            frac, _, mult = spec.partition(":")
            frac, mult = float(frac), int(mult or 1)
            cfg = DEMO_CONFIG.replace(strategy=args.strategy, target_macs=frac, channel_multiple=mult, steps=args.steps,
                                      finetune_steps=args.finetune_steps, eval_inputs=[(x, y)], progress=False)
            t0 = time.time()  # the clock includes precomputing the teacher's outputs
            res = compress(teacher, teacher, demo_loader(teacher, cfg), config=cfg)
            wall = time.time() - t0
            r = res.report
            # the same two networks exported to ONNX and run by onnxruntime (the deployment runtime)
            ort_t, ort_s = measure_deployment([("teacher", teacher, "onnx"), ("student", res.model, "onnx")], teacher,
                                              [((x,), y)])
            row = {"target": frac, "channel_multiple": mult, "macs_reduction": r.macs_reduction, "teacher_macs_G": r.teacher.macs / 1e9,
                   "student_macs_G": r.student.macs / 1e9, "teacher_psnr_gt": r.teacher.psnr_to_gt,
                   "student_psnr_gt": r.student.psnr_to_gt, "psnr_drop_db": r.teacher.psnr_to_gt - r.student.psnr_to_gt,
                   "student_psnr_teacher": r.student.psnr_to_teacher, "latency_speedup": r.speedup,
                   "speedup_over_macs_reduction": (r.speedup or 0) / r.macs_reduction, "cpu_minutes": wall / 60,
                   "teacher_latency_ms": r.teacher.latency_ms, "student_latency_ms": r.student.latency_ms,
                   "ort_teacher_latency_ms": ort_t.latency_ms, "ort_student_latency_ms": ort_s.latency_ms,
                   "ort_speedup": ort_t.latency_ms / ort_s.latency_ms,
                   "ort_speedup_over_macs_reduction": ort_t.latency_ms / ort_s.latency_ms / r.macs_reduction}
            results["runs"].append(row)
            print(f"\n=== target {frac} of the teacher's MACs, widths multiple of {mult} ===\n{r}", flush=True)
        print("\n| target (width multiple) | MACs reduction | PSNR-GT teacher | PSNR-GT student | drop | speed-up PyTorch (/ MACs red.) | speed-up onnxruntime (/ MACs red.) | CPU min |")
        print("|---|---|---|---|---|---|---|---|")
        for w in results["runs"]:
            print(f"| {w['target']} ({w['channel_multiple']}) | {w['macs_reduction']:.1f}x | {w['teacher_psnr_gt']:.2f} dB | {w['student_psnr_gt']:.2f} dB | "
                  f"{w['psnr_drop_db']:.2f} dB | {w['latency_speedup']:.2f}x ({w['speedup_over_macs_reduction']:.2f}) | "
                  f"{w['ort_speedup']:.2f}x ({w['ort_speedup_over_macs_reduction']:.2f}) | {w['cpu_minutes']:.1f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
