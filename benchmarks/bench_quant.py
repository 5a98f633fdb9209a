"""int8 deployment of the compressed demo student, measured side by side in onnxruntime in one run.

    make demo                                   # writes runs/demo/student.safetensors (the float student)
    python benchmarks/bench_quant.py            # QAT on that student, then fp32 / PTQ int8 / QAT int8 ONNX
    python benchmarks/bench_quant.py --student PATH --qat-steps 300

Rows (onnxruntime, CPU, the held-out photo at full size): the float student as fp32 ONNX; the same
student quantized after training (PTQ: onnxruntime ``quantize_static``, the baseline); the QAT student
(ModelOpt fake quantization + distillation fine-tune, then the same int8 export). The teacher's own
fp32 and PTQ int8 rows are given for scale. Printed ratios: int8 latency / fp32 latency, int8 file /
fp32 file, PSNR-to-ground-truth change vs the fp32 student, and QAT's gain over PTQ; then the fp32
student beside each int8 file (QAT, PTQ), and the fp32 teacher beside each, two files at a time in
alternating short turns (``measure.paired_latency``): the int8 / fp32 and teacher / int8 ratios the
machine's drift does not move. ``--calib-seeds N`` adds PTQ files calibrated on N other draws of the
training crops (their PSNR spread: how much one PTQ figure owes to its calibration draw). Results also go
to ``benchmarks/results/quant.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim import data, measure  # noqa: E402
from ganslim.deployment.checkpoint import load  # noqa: E402
from ganslim.deployment.deploy import measure_deployment  # noqa: E402
from ganslim.deployment.quantization import QuantConfig, quantize, train_qat  # noqa: E402
from ganslim.measure.report import format_deploy_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="runs/demo/student.safetensors", help="float student (ganslim checkpoint)")
    ap.add_argument("--qat-steps", type=int, default=300)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--range-lr", type=float, default=QuantConfig.range_lr,
                    help="Adam learning rate of QAT's activation ranges (log); 0: the calibrated ranges stay fixed")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/quant.json")
    ap.add_argument("--paired-rounds", type=int, default=20, help="rounds of the paired timing (alternating turns)")
    ap.add_argument("--int8-ends", action="store_true",
                    help="QAT quantizes the first and last conv too (default: they stay in float, QuantConfig's skip_first/skip_last)")
    ap.add_argument("--qat-reference", choices=["teacher", "float"], default="teacher",
                    help="what QAT imitates: the teacher (default) or the float student (QuantConfig.reference)")
    ap.add_argument("--keep-dir", default="runs/quant", help="where the QAT checkpoint and its int8 ONNX are saved")
    ap.add_argument("--calib-seeds", type=int, default=0,
                    help="also export PTQ int8 files calibrated on this many other draws of the training crops "
                         "(loader seeds 0..N-1, the same batches and crop): how much PTQ's fidelity depends on them")
    args = ap.parse_args()
    if not os.path.exists(args.student):
        sys.exit(f"{args.student} not found: run `make demo` first (it writes the compressed float student), "
                 "or pass --student PATH")
    torch.set_num_threads(args.threads)
    teacher = data.default_teacher()
    student = load(args.student)
    pairs = data.test_pairs()
    loader = data.default_loader(batch_size=args.batch_size, crop=64, length=max(args.qat_steps, 8) * args.batch_size,
                                 seed=1, teacher=teacher)  # batches carry the teacher's outputs (offline distillation)
    t0 = time.time()
    qcfg = QuantConfig(steps=args.qat_steps, lr=args.qat_lr, range_lr=args.range_lr, skip_first=not args.int8_ends, skip_last=not args.int8_ends,
                       reference=args.qat_reference)
    qat = quantize(student, loader, qcfg)
    with torch.no_grad():
        fq_before = measure.fidelity_to_target(qat, pairs)["psnr"]
    train_qat(qat, teacher, loader, qcfg)
    qat_seconds = time.time() - t0
    with torch.no_grad():
        fq_after = measure.fidelity_to_target(qat, pairs)["psnr"]
        float_gt = measure.fidelity_to_target(student, pairs)["psnr"]

    rows = measure_deployment([("student fp32", student, "onnx"), ("student int8 PTQ", student, "onnx-int8"),
                               ("student int8 QAT", qat, "onnx-int8")], student, pairs, teacher=teacher,
                              calib_loader=loader, threads=args.threads)
    t_rows = measure_deployment([("teacher fp32", teacher, "onnx"), ("teacher int8 PTQ", teacher, "onnx-int8")], teacher,
                                pairs, teacher=teacher, calib_loader=loader, threads=args.threads)
    fp32, ptq, q = rows
    machine = describe_machine(args.threads, onnxruntime=True)
    x = pairs[0][0]
    print(f"{machine}; input {tuple(x.shape)} (held-out photo); student {args.student}; "
          f"QAT {args.qat_steps} steps in {qat_seconds / 60:.1f} min"
          f"{'; QAT quantizes the first and last conv too' if args.int8_ends else ''}; QAT imitates the "
          f"{'float student' if args.qat_reference == 'float' else 'teacher'}")
    print(format_deploy_table(rows + t_rows, args.threads))
    summary = {
        "int8_qat_latency_over_fp32": q.latency_ms / fp32.latency_ms,
        "int8_qat_size_over_fp32": q.size_mb / fp32.size_mb,
        "psnr_gt_float_student_torch": float_gt,
        "psnr_gt_change_qat_vs_fp32": q.psnr_to_gt - fp32.psnr_to_gt,
        "psnr_gt_change_ptq_vs_fp32": ptq.psnr_to_gt - fp32.psnr_to_gt,
        "qat_gain_over_ptq_db_gt": q.psnr_to_gt - ptq.psnr_to_gt,
        "qat_gain_over_ptq_db_to_float": q.psnr_to_float - ptq.psnr_to_float,
        "fake_quant_psnr_gt_before_after_qat": [fq_before, fq_after],
        "teacher_int8_latency_over_fp32": t_rows[1].latency_ms / t_rows[0].latency_ms,
        "qat_seconds": qat_seconds,
        "qat_int8_first_last_conv": args.int8_ends,
        "qat_reference": args.qat_reference,
        "qat_weight_bits": qcfg.resolved().weight_bits,  # 7 on x86 without VNNI, where the int8 file holds 7-bit weights
    }
    print(f"int8 QAT / fp32: latency {summary['int8_qat_latency_over_fp32']:.2f}x, file "
          f"{summary['int8_qat_size_over_fp32']:.2f}x; PSNR to ground truth {summary['psnr_gt_change_qat_vs_fp32']:+.2f} dB "
          f"(PTQ {summary['psnr_gt_change_ptq_vs_fp32']:+.2f} dB); QAT over PTQ: {summary['qat_gain_over_ptq_db_gt']:+.2f} dB "
          f"to ground truth, {summary['qat_gain_over_ptq_db_to_float']:+.2f} dB to the float student; teacher int8/fp32 "
          f"latency {summary['teacher_int8_latency_over_fp32']:.2f}x")
    # keep the QAT student (checkpoint + int8 ONNX) for benchmarks/bench_models.py
    os.makedirs(args.keep_dir, exist_ok=True)
    from ganslim import save
    from ganslim.deployment.deploy import OnnxModule, export

    qat_ckpt = save(qat, os.path.join(args.keep_dir, "student_qat.safetensors"))
    qat_onnx = export(qat, os.path.join(args.keep_dir, "student_qat.int8.onnx"), "onnx-int8", example_inputs=x,
                      calib_loader=loader)
    print(f"saved {qat_ckpt} and {qat_onnx}")
    # The ratios again, each from two files in alternating short turns (measure.paired_latency): the
    # rows above time each file on its own, and this machine's speed drifts between them. Two files per
    # rotation, not all four: with other files in the rotation the int8 file's turns came out slower
    # than it runs alone or beside its fp32 student alone (bench_int8_ops.py reports both kinds).
    student_onnx = export(student, os.path.join(args.keep_dir, "student.onnx"), "onnx", example_inputs=x)
    teacher_onnx = export(teacher, os.path.join(args.keep_dir, "teacher.onnx"), "onnx", example_inputs=x)
    ptq_onnx = export(student, os.path.join(args.keep_dir, "student_ptq.int8.onnx"), "onnx-int8", example_inputs=x,
                      calib_loader=loader)
    sessions = {name: OnnxModule(p, threads=args.threads) for name, p in
                (("student fp32", student_onnx), ("student int8 QAT", qat_onnx), ("teacher fp32", teacher_onnx),
                 ("student int8 PTQ", ptq_onnx))}
    summary["paired_ms"] = {}

    def pair(ref: str, int8: str):
        r = measure.paired_latency([sessions[ref], sessions[int8]], (x,), rounds=args.paired_rounds)
        summary["paired_ms"][f"{ref} | {int8}"] = list(r.median_ms)
        return r

    for route in ("QAT", "PTQ"):
        own, e2e = pair("student fp32", f"student int8 {route}"), pair("teacher fp32", f"student int8 {route}")
        key = route.lower()
        summary[f"paired_int8_{key}_latency_over_fp32"] = own.ratio[1]
        summary[f"paired_int8_{key}_latency_over_fp32_iqr"] = list(own.ratio_iqr[1])
        summary[f"paired_teacher_fp32_over_int8_{key}"] = 1.0 / e2e.ratio[1]
        print(f"paired ({args.paired_rounds} rounds of alternating turns, two files each): int8 {route} / fp32 student "
              f"{own.ratio[1]:.2f}x (IQR {own.ratio_iqr[1][0]:.2f}-{own.ratio_iqr[1][1]:.2f}; {own.median_ms[1]:.1f} vs "
              f"{own.median_ms[0]:.1f} ms); fp32 teacher / int8 {route} student {1.0 / e2e.ratio[1]:.1f}x "
              f"({e2e.median_ms[0]:.1f} ms vs {e2e.median_ms[1]:.1f} ms)")
    if args.calib_seeds:
        summary["ptq_calibration_seeds"] = ptq_calibration_spread(student, teacher, pairs, x, args, float_gt=fp32.psnr_to_gt)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "student": args.student, "qat_steps": args.qat_steps,
                   "qat_config": qcfg.resolved().to_dict(), "rows": [r.__dict__ for r in rows + t_rows], "summary": summary}, f, indent=2)
    print(f"wrote {args.out}")


def ptq_calibration_spread(student, teacher, pairs, x, args, float_gt: float) -> list:
    """PTQ int8 files of ``student`` calibrated on ``args.calib_seeds`` draws of the training crops (the
    PTQ row's calibration: ``export``'s first 8 batches of ``--batch-size`` 64x64 crops): each file's
    PSNR to ground truth minus the fp32 file's (dB). Printed with their mean and range."""
    import tempfile

    from ganslim.deployment.deploy import OnnxModule, export

    rows = []
    with tempfile.TemporaryDirectory(prefix="ganslim-calib-") as d:
        for seed in range(args.calib_seeds):
            calib = data.default_loader(batch_size=args.batch_size, crop=64, length=8 * args.batch_size, seed=seed,
                                        teacher=teacher)
            path = export(student, os.path.join(d, f"ptq{seed}.int8.onnx"), "onnx-int8", example_inputs=x,
                          calib_loader=calib)
            with torch.no_grad():
                psnr = measure.fidelity_to_target(OnnxModule(path, threads=args.threads), pairs)["psnr"]
            rows.append({"seed": seed, "psnr_gt": psnr, "psnr_gt_change_vs_fp32": psnr - float_gt})
    changes = [r["psnr_gt_change_vs_fp32"] for r in rows]
    print(f"PTQ over {len(rows)} calibration draws (loader seeds 0-{len(rows) - 1}): PSNR to ground truth "
          f"{sum(changes) / len(changes):+.2f} dB on average vs the fp32 file, from {min(changes):+.2f} to "
          f"{max(changes):+.2f} (" + ", ".join(f"{c:+.2f}" for c in changes) + ")")
    return rows


if __name__ == "__main__":
    main()
