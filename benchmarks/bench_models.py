"""The full side-by-side table of the checkpoints this repository produces, with `ganslim bench`'s API.

    make demo                                 # runs/demo/student.safetensors (gating student, 10x fewer MACs)
    python benchmarks/bench_quant.py          # runs/quant/student_qat.safetensors + student_qat.int8.onnx
    python benchmarks/bench_models.py         # this table, a Pareto plot and an image grid

Rows: the default teacher, the gating student, the QAT student (PyTorch fake-quant, eager), the QAT
int8 ONNX file (onnxruntime), and the teacher and gating student on onnxruntime fp32 / int8 PTQ for
context. Prints the wall time of the whole benchmark of the 4 checkpoints (target: under 3 minutes
on 2 cores). Writes benchmarks/results/models.{json,md,png} and models_grid.png.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim.measure.benchmarking import bench, format_table, image_grid, write_outputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="runs/demo/student.safetensors")
    ap.add_argument("--qat", default="runs/quant/student_qat.safetensors")
    ap.add_argument("--qat-onnx", default="runs/quant/student_qat.int8.onnx")
    ap.add_argument("--out", default="benchmarks/results/models")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    for p in (args.student, args.qat, args.qat_onnx):
        if not os.path.exists(p):
            sys.exit(f"{p} not found: run `make demo` and `python benchmarks/bench_quant.py` first")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "input: the held-out photo 1x3x256x384 (batch 1)")

    t0 = time.time()
    four = bench(["default", args.student, args.qat, args.qat_onnx], repeats=args.repeats)
    four_s = time.time() - t0
    print(f"\n4 checkpoints, eager PyTorch (ONNX on onnxruntime): {four_s:.0f} s wall")
    print(format_table(four))

    t0 = time.time()
    runtimes = bench(["default", args.student], repeats=args.repeats, runtimes=("eager", "onnxruntime", "onnxruntime-int8"))
    print(f"\nteacher and gating student on three runtimes ({time.time() - t0:.0f} s; int8 here is post-training "
          "quantization of the float model)")
    print(format_table(runtimes))
    rows = four + [r for r in runtimes if r.runtime != "eager"]  # eager rows are already in `four`
    for p in write_outputs(rows, args.out + ".json", args.out + ".md", args.out + ".png", x_axis="latency"):
        print(f"wrote {p}")
    print(f"wrote {image_grid(['default', args.student, args.qat, args.qat_onnx], args.out + '_grid.png', labels=['teacher', 'gating student', 'QAT student', 'QAT int8 ONNX'])}")


if __name__ == "__main__":
    main()
