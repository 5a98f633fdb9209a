"""Which operators of an int8 generator stay in float, and what they cost: onnxruntime's own profile
of the fp32 and int8 exports, side by side in one run (issue 17, item 4); for the default student
also both files without ganslim's exact ONNX rewrites (``rewrites=False``), which they are measured against,
and the int8 file with its RGB input and output convs kept in float (``keep_first_float=True,
keep_last_float=True``; by default they run as integer convs in their space-to-depth form).

    make demo                                      # writes runs/demo/student.safetensors
    python benchmarks/bench_int8_ops.py            # default student + a GroupNorm / depthwise generator
    python benchmarks/bench_int8_ops.py --student PATH --no-mobile

Networks (batch 1, the held-out photo 1x3x256x384, onnxruntime CPU):

- the default student (``--student``, the float output of ``make demo``): ResNet with batch norm
  (folded into the convs by the exporter), transposed convs (sub-pixel rewrite in the int8 file);
- GAN Compression's mobile ResNet (``ganslim.zoo.mobile_resnet``, ``--mobile-ngf``, default 32) with
  GroupNorm everywhere (``norm="group"``, ``separable_norm="group"``) and depthwise-separable blocks,
  and the same network with batch norm, for contrast. They are not trained (no trained GroupNorm
  generator ships with ganslim): their rows give latency and the operator profile, and PSNR of the
  int8 file to its own fp32 file only as a check that the export works.

Every file is exported by ``ganslim.export`` (``onnx`` and ``onnx-int8``, calibrated on 8 batches of
the embedded training crops) and timed in ``--rounds`` interleaved rounds of fresh sessions: the latency
without the profiler (median of ``--runs`` passes, fastest round) and, in its own session, onnxruntime's
profile (node times from the fastest profiled round); then ``measure.paired_latency`` times the fp32
and int8 files of one network in alternating short turns (``--paired-rounds``), and takes the int8 /
fp32 ratio within each round: the figure the machine's drift does not move. For the default student the
five files (fp32, int8, both without the rewrites, int8 with float ends) then run in one rotation of the
same kind, each against the fp32 file; in that rotation the int8 file's ratio comes out higher than in
its pair (both are printed); and the int8 file runs in a pair with the same export whose depth-to-space and
space-to-depth shuffles are written in NCHW order (``deploy.INT8_CHANNELS_LAST_SHUFFLES`` off, the form
before): what the channels-last form saves. Printed: the int8 / fp32 latency ratio and, per int8 file, time per operator type classed ``int8`` (integer kernels),
``convert`` (QuantizeLinear / DequantizeLinear), ``float`` (operators left in float) and ``layout``
(transposes / reorders). Results: ``benchmarks/results/int8_ops.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim import data, measure  # noqa: E402
from ganslim.deployment import deploy  # noqa: E402
from ganslim.deployment.deploy import OnnxModule, export  # noqa: E402
from ganslim.deployment.profile import profile_ops  # noqa: E402
from ganslim.zoo.mobile_resnet import MobileResnetGenerator  # noqa: E402


def _transposes(prof) -> list:
    """``[Transpose nodes, their ms per run]`` in an onnxruntime profile."""
    rows = [r for r in prof.by_op_type() if r[0] == "Transpose"]
    return [sum(r[2] for r in rows), sum(r[3] for r in rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="runs/demo/student.safetensors")
    ap.add_argument("--no-mobile", action="store_true", help="skip the mobile ResNet rows")
    ap.add_argument("--mobile-ngf", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10, help="profiled runs per session")
    ap.add_argument("--paired-rounds", type=int, default=20,
                    help="rounds of measure.paired_latency (fp32 and int8 in alternating turns of 1 untimed + 2 timed passes)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/int8_ops.json")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer logs a line per weight axis
    torch.manual_seed(0)
    pairs = data.test_pairs()
    x, gt = pairs[0]
    calib = data.default_loader(batch_size=4, crop=64, length=32, seed=3)
    nets: list[tuple[str, torch.nn.Module, bool]] = []  # (name, model, trained)
    if os.path.exists(args.student):
        from ganslim.deployment.checkpoint import load

        nets.append(("default student", load(args.student).eval(), True))
    else:
        print(f"{args.student} not found (run `make demo`): default student skipped")
    if not args.no_mobile:
        for norm in ("group", "batch"):
            m = MobileResnetGenerator(ngf=args.mobile_ngf, norm=norm, separable_norm=norm).eval()
            if norm == "batch":  # non-trivial statistics, so the folded affine is not the identity
                with torch.no_grad():
                    for mod in m.modules():
                        if isinstance(mod, torch.nn.BatchNorm2d):
                            mod.running_var.uniform_(0.5, 2.0)
                            mod.running_mean.uniform_(-0.1, 0.1)
            nets.append((f"mobile ResNet ngf {args.mobile_ngf}, {norm} norm", m, False))
    if not nets:
        sys.exit("nothing to measure")

    results = []
    with tempfile.TemporaryDirectory(prefix="ganslim-int8ops-") as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = []
        for i, (name, model, trained) in enumerate(nets):
            fp32 = export(model, os.path.join(d, f"{i}.onnx"), "onnx", example_inputs=x)
            int8 = export(model, os.path.join(d, f"{i}.int8.onnx"), "onnx-int8", example_inputs=x, calib_loader=calib)
            plain, nchw = (), None
            if trained:  # the same two files without ganslim's exact ONNX rewrites: what they are worth
                plain = (export(model, os.path.join(d, f"{i}.plain.onnx"), "onnx", example_inputs=x, rewrites=False),
                         export(model, os.path.join(d, f"{i}.plain.int8.onnx"), "onnx-int8", example_inputs=x,
                                calib_loader=calib, rewrites=False),
                         # and the int8 file with its RGB input and output convs kept float (the default
                         # until the ends ran as integer space-to-depth convs): what the int8 ends are worth
                         export(model, os.path.join(d, f"{i}.ends.int8.onnx"), "onnx-int8", example_inputs=x,
                                calib_loader=calib, keep_first_float=True, keep_last_float=True))
                # and the int8 file with its depth-to-space / space-to-depth shuffles in NCHW order (the
                # form before deploy.INT8_CHANNELS_LAST_SHUFFLES): what the channels-last form is worth
                deploy.INT8_CHANNELS_LAST_SHUFFLES = False
                try:
                    nchw = export(model, os.path.join(d, f"{i}.nchw.int8.onnx"), "onnx-int8",
                                  example_inputs=x, calib_loader=calib)
                finally:
                    deploy.INT8_CHANNELS_LAST_SHUFFLES = True
            files.append((name, model, trained, fp32, int8, plain, nchw))
        best: dict[str, object] = {}
        wall: dict[str, float] = {}  # without the profiler: the latency figure
        for _ in range(args.rounds):  # interleaved: a session's speed differs from the next one's here
            for name, _, _, fp32, int8, plain, nchw in files:
                for p in (fp32, int8, *plain, *([nchw] if nchw else [])):
                    prof = profile_ops(p, x, threads=args.threads, runs=args.runs)
                    if str(p) not in best or prof.run_ms < best[str(p)].run_ms:
                        best[str(p)] = prof
                    lat = measure.measure_latency(OnnxModule(p, threads=args.threads), (x,), warmup=2,
                                                  repeats=args.runs)
                    wall[str(p)] = min(wall.get(str(p), float("inf")), lat.median_ms)
        for name, model, trained, fp32, int8, plain, nchw in files:
            pf, pq = best[str(fp32)], best[str(int8)]
            om32, om8 = OnnxModule(fp32, threads=args.threads), OnnxModule(int8, threads=args.threads)
            f_ms, q_ms = wall[str(fp32)], wall[str(int8)]
            row = {"network": name, "trained": trained, "fp32_ms": f_ms, "int8_ms": q_ms,
                   "int8_over_fp32": q_ms / f_ms, "profiled_fp32_ms": pf.run_ms, "profiled_int8_ms": pq.run_ms,
                   "int8_slowest_nodes": [(n.op_type, n.precision, list(n.output_shape), n.ms)
                                          for n in sorted(pq.nodes, key=lambda n: -n.ms)[:6]],
                   "macs": measure.count_macs(model, (x,), "papers"),
                   "psnr_int8_to_fp32": measure.compare_outputs(om32, om8, [(x,)])["psnr"],
                   "int8_by_class_ms": pq.by_precision(), "fp32_by_class_ms": pf.by_precision(),
                   "int8_by_op": pq.by_op_type(), "fp32_by_op": pf.by_op_type(),
                   "int8_float_ops": pq.float_ops()}
            # fp32 and int8 in alternating short turns, the two alone: the ratio within each round, then
            # the median; the machine's drift cancels from it
            paired = measure.paired_latency([om32, om8], (x,), rounds=args.paired_rounds)
            row["paired_ms"], row["paired_ratio"], row["paired_ratio_iqr"] = (
                list(paired.median_ms), list(paired.ratio), [list(v) for v in paired.ratio_iqr])
            row["paired_int8_over_fp32"] = paired.ratio[1]
            if plain:
                # then with the files without the rewrites and with float ends in the same rotation (what
                # the rewrites are worth, each file against the fp32 one); with more files in the rotation
                # the int8 file's own ratio comes out higher than in the pair above, reported beside it
                rot = measure.paired_latency([om32, om8, *(OnnxModule(p, threads=args.threads) for p in plain)],
                                             (x,), rounds=args.paired_rounds)
                row["rotation_ms"], row["rotation_ratio"], row["rotation_ratio_iqr"] = (
                    list(rot.median_ms), list(rot.ratio), [list(v) for v in rot.ratio_iqr])
                row["no_rewrites_fp32_ms"], row["no_rewrites_int8_ms"], row["float_ends_int8_ms"] = (
                    wall[str(p)] for p in plain)
                # the int8 file beside its NCHW-shuffle form, the two alone in alternating turns; two files
                # of nearly one speed: 20 rounds of 2 passes put their ratio anywhere in 0.8-1.2, 60 of 5
                # within a few percent
                shuffles = measure.paired_latency([om8, OnnxModule(nchw, threads=args.threads)], (x,),
                                                  rounds=3 * args.paired_rounds, passes=5)
                row["nchw_shuffles_paired_ms"] = list(shuffles.median_ms)
                row["channels_last_over_nchw_shuffles"] = 1.0 / shuffles.ratio[1]
                row["nchw_shuffles_ratio_iqr"] = list(shuffles.ratio_iqr[1])
                row["nchw_shuffles_transposes"] = _transposes(best[str(nchw)])
                row["int8_transposes"] = _transposes(pq)
            if trained:
                row["psnr_gt_fp32"] = measure.fidelity_to_target(om32, [((x,), gt)])["psnr"]
                row["psnr_gt_int8"] = measure.fidelity_to_target(om8, [((x,), gt)])["psnr"]
                row["psnr_gt_int8_float_ends"] = measure.fidelity_to_target(
                    OnnxModule(plain[2], threads=args.threads), [((x,), gt)])["psnr"]
            results.append(row)
            gtxt = (f"; PSNR to ground truth fp32 {row['psnr_gt_fp32']:.2f} dB, int8 {row['psnr_gt_int8']:.2f} dB"
                    if trained else "")
            print(f"\n== {name}: {row['macs'] / 1e9:.2f} GMACs; fp32 {f_ms:.1f} ms, int8 {q_ms:.1f} ms "
                  f"-> int8 / fp32 {row['int8_over_fp32']:.2f}x; int8 vs fp32 output {row['psnr_int8_to_fp32']:.1f} dB{gtxt}")
            lo, hi = row["paired_ratio_iqr"][1]
            print(f"paired ({args.paired_rounds} rounds of alternating turns): int8 / fp32 "
                  f"{row['paired_int8_over_fp32']:.2f}x (IQR {lo:.2f}-{hi:.2f}; fp32 {row['paired_ms'][0]:.1f} ms, "
                  f"int8 {row['paired_ms'][1]:.1f} ms)")
            if plain:
                r = row["rotation_ratio"]
                print(f"in one rotation of the five files below ({args.paired_rounds} rounds): int8 / fp32 {r[1]:.2f}x "
                      f"(IQR {row['rotation_ratio_iqr'][1][0]:.2f}-{row['rotation_ratio_iqr'][1][1]:.2f})")
                print(f"the same rotation, without the rewrites (rewrites=False): fp32 {r[2]:.2f}x of the fp32 file, int8 "
                      f"{r[3]:.2f}x of it (rewrites: fp32 {1 / r[2]:.2f}x, int8 {r[1] / r[3]:.2f}x of the plain files)")
                print(f"the same rotation, int8 with the RGB input and output convs in float (keep_first_float / keep_last_float):"
                      f" {r[4]:.2f}x of the fp32 file (integer ends: {r[1] / r[4]:.2f}x of it); PSNR to ground truth "
                      f"{row['psnr_gt_int8_float_ends']:.2f} dB (integer ends {row['psnr_gt_int8']:.2f} dB)")
                lo, hi = (1.0 / v for v in reversed(row["nchw_shuffles_ratio_iqr"]))
                print(f"paired with the int8 file whose depth-to-space / space-to-depth shuffles are in NCHW order "
                      f"(INT8_CHANNELS_LAST_SHUFFLES off): channels-last {row['channels_last_over_nchw_shuffles']:.2f}x "
                      f"of its time (IQR {lo:.2f}-{hi:.2f}; {row['nchw_shuffles_paired_ms'][0]:.1f} vs "
                      f"{row['nchw_shuffles_paired_ms'][1]:.1f} ms); Transpose nodes {row['int8_transposes'][0]} taking "
                      f"{row['int8_transposes'][1]:.2f} ms vs {row['nchw_shuffles_transposes'][0]} taking "
                      f"{row['nchw_shuffles_transposes'][1]:.2f} ms (profiled)")
            print("int8 file (profiled: times per operator under onnxruntime's profiler, which adds its own cost):")
            print(pq.table(top=14))
            print("slowest int8-file nodes: " + ", ".join(f"{op} {tuple(sh)} {ms:.2f} ms"
                                                          for op, _, sh, ms in row["int8_slowest_nodes"]))
            print("fp32 file:")
            print(pf.table(top=8))
            print(f"left in float in the int8 file: {row['int8_float_ops'] or 'nothing'}")
            if plain:
                print(f"without ganslim's ONNX rewrites (rewrites=False): fp32 {row['no_rewrites_fp32_ms']:.1f} ms "
                      f"(rewrites: {f_ms / row['no_rewrites_fp32_ms']:.2f}x of it), int8 "
                      f"{row['no_rewrites_int8_ms']:.1f} ms (rewrites: {q_ms / row['no_rewrites_int8_ms']:.2f}x)")
    machine = describe_machine(args.threads, onnxruntime=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "input": list(x.shape), "rounds": args.rounds, "runs": args.runs,
                   "rows": results}, f, indent=2)
    print(f"\n{machine}; wrote {args.out}")


if __name__ == "__main__":
    main()
