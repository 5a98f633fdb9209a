"""Does the compressed student's speed-up track its MACs reduction? Measured at several workloads.

    make demo                                   # writes runs/demo/student.safetensors
    python benchmarks/bench_latency_scaling.py  # ~2 minutes on 2 cores

For the default teacher and the demo student (10x fewer MACs), CPU latency in eager PyTorch and in
onnxruntime (fp32, the same networks exported), at batch 1 / 4 and at 256x384 / 512x768, with the
ratio speed-up / MACs reduction (1.0 = latency falls exactly like MACs). A uniformly slimmed copy of
the teacher with the same MACs is measured beside it, to separate "which channels were removed"
from "how efficient thin layers are on this CPU". Results also go to benchmarks/results/latency_scaling.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim import data, load, measure  # noqa: E402
from ganslim.deployment.deploy import OnnxModule, export  # noqa: E402
from ganslim.pruning.uniform import uniform_alive  # noqa: E402
from ganslim.core.gating import GateSet, export_pruned  # noqa: E402
from ganslim.core.targeting import find_channel_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="runs/demo/student.safetensors")
    ap.add_argument("--uniform-width", type=float, default=0.3, help="width ratio of the uniform copy (0.3: ~10x MACs)")
    ap.add_argument("--out", default="benchmarks/results/latency_scaling.json")
    args = ap.parse_args()
    if not os.path.exists(args.student):
        sys.exit(f"{args.student} not found: run `make demo` first")
    teacher, student = data.default_teacher(), load(args.student)
    x = data.test_pairs()[0][0]
    groups = find_channel_groups(copy.deepcopy(teacher), x[:, :, :64, :64])
    gates = GateSet(groups)
    gates.set_masks(uniform_alive(groups.groups, args.uniform_width))
    uniform, _ = export_pruned(teacher, gates, x[:, :, :64, :64], tol=float("inf"))
    tmp = "runs/latency_scaling"
    os.makedirs(tmp, exist_ok=True)
    onnx = {n: OnnxModule(export(m, f"{tmp}/{n}.onnx", example_inputs=x)) for n, m in
            (("teacher", teacher), ("student", student), ("uniform", uniform))}
    eager = {"teacher": teacher, "student": student, "uniform": uniform}
    t_macs = measure.count_macs(teacher, x)
    red = {n: t_macs / measure.count_macs(m, x) for n, m in eager.items()}
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"MACs reduction: demo student {red['student']:.2f}x, uniform copy (width {args.uniform_width}) {red['uniform']:.2f}x")
    workloads = [x, x.repeat(4, 1, 1, 1), torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear")]
    rows = []
    print("| input | model | MACs reduction | eager speed-up (/ MACs red.) | onnxruntime speed-up (/ MACs red.) |")
    print("|---|---|---|---|---|")
    for xb in workloads:
        lat = {(n, rt): measure.measure_latency(m, xb, warmup=2, repeats=7).median_ms
               for rt, mods in (("eager", eager), ("onnxruntime", onnx)) for n, m in mods.items()}
        for n in ("student", "uniform"):
            e = lat[("teacher", "eager")] / lat[(n, "eager")]
            o = lat[("teacher", "onnxruntime")] / lat[(n, "onnxruntime")]
            rows.append({"input": list(xb.shape), "model": n, "macs_reduction": red[n], "eager_speedup": e,
                         "ort_speedup": o, "teacher_eager_ms": lat[("teacher", "eager")], f"{n}_eager_ms": lat[(n, "eager")]})
            print(f"| {'x'.join(map(str, xb.shape))} | {'demo student' if n == 'student' else 'uniform copy'} | "
                  f"{red[n]:.2f}x | {e:.2f}x ({e / red[n]:.2f}) | {o:.2f}x ({o / red[n]:.2f}) |")
    with open(args.out, "w") as f:
        json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
