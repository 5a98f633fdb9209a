"""Training in bf16 (``train_precision``) beside float32, side by side in one run: the speed of a
training step on the field's generators, and what bf16 training does to a compressed student's
fidelity and to the wall time of ``ganslim compress``.

Why it exists: ``CompressConfig.train_precision`` (``ganslim.core.precision``) runs the training
convolutions in bf16 (weights, optimizer state, norms, residual sums and losses stay float32, and
so do the image-facing convs); on a CPU with AMX that is much less arithmetic time per convolution,
but the student learns from bf16 convolutions. This says where it pays and whether the student is
as good.

    python benchmarks/bench_precision.py                 # both parts; benchmarks/results/precision.json
    python benchmarks/bench_precision.py --no-compress   # the step timings only (~3 min)
    python benchmarks/bench_precision.py --resume        # keep the compress commands already run

1. A training step (forward + backward + Adam; loss: mean output) of each network in float32 and in
   bf16, in alternating rounds (the machine's drift falls on both alike), median step each: the
   default teacher and its students (built by ``compress`` without training), CycleGAN's
   instance-norm ResNet-9, pix2pix's U-Net 256, SPADE, CartoonGAN (as ``bench_layout.py``).
2. For each target (strategy, fraction of the teacher's MACs) and seed, the command a user types,
   each in its own process, once per setting (fp32, bf16):

       ganslim compress --teacher default --strategy S --target-macs F --finetune-steps N --seed K
           --train-precision P --out DIR --no-progress

   PSNR to ground truth on the held-out photo and wall time, per seed and averaged, each setting
   beside fp32 with the same seed. A seed fixes the data order and the initial weights, but not the
   trajectory: any change of arithmetic (bf16, or float32 summed in another order) sends a run
   elsewhere, and runs of 3000 fine-tune steps land tenths of a dB apart; read the means.

On a CPU without native bf16 (no AMX / AVX512-BF16) bf16 is emulated and slow: the script says so
and runs anyway when asked with ``--force``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_frontier import run_compress  # noqa: E402
from bench_layout import _students, training_cases  # noqa: E402
from ganslim import data  # noqa: E402
from ganslim.core.precision import autocast, native_bf16_cpu  # noqa: E402


PRECISIONS = ("fp32", "bf16")


def _train_step_ms(model: torch.nn.Module, inputs: tuple, precision: str, steps: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step of a round warms the caches up
        t0 = time.perf_counter()
        with autocast(precision, "cpu", (model,)):
            out = model(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - t0) * 1e3)
    return times[1:]


def step_rows(rounds: int, steps: int) -> list[dict]:
    torch.manual_seed(0)
    teacher = data.default_teacher()
    cases = training_cases(teacher, _students(teacher))
    rows = []
    print(f"\ntraining step (forward + backward + Adam), median of {rounds} x {steps} steps per precision")
    print(f"{'model':44s} {'batch':>10s} {'fp32 ms':>9s} {'bf16 ms':>9s} {'speed-up':>8s}")
    for name, model, inputs, shape in cases:
        a_model, b_model = copy.deepcopy(model), copy.deepcopy(model)
        a, b = [], []
        for _ in range(rounds):
            a += _train_step_ms(a_model, inputs, "fp32", steps)
            b += _train_step_ms(b_model, inputs, "bf16", steps)
        fa, fb = statistics.median(a), statistics.median(b)
        rows.append({"model": name.strip(), "input": shape, "fp32_ms": fa, "bf16_ms": fb, "speedup": fa / fb})
        print(f"{name:44s} {shape:>10s} {fa:9.1f} {fb:9.1f} {fa / fb:7.2f}x", flush=True)
    return rows


def run_cell(strategy: str, target: float, steps: int, seed: int, precision: str, out: str, resume: bool) -> dict:
    """One ``ganslim compress`` command in its own process -> its figures and wall time (s)."""
    report, wall = run_compress(["--teacher", "default", "--strategy", strategy, "--target-macs", f"{target:g}",
                                 "--finetune-steps", str(steps), "--seed", str(seed), "--train-precision", precision],
                                out, resume)
    return {"strategy": strategy, "target": target, "seed": seed, "precision": precision,
            "psnr_gt": report["student"]["psnr_to_gt"],
            "teacher_psnr_gt": report["teacher"]["psnr_to_gt"], "macs_reduction": report["macs_reduction"],
            "finetune_steps": report["finetune_steps"], "wall_s": wall}


def compress_rows(targets: list, steps: int, seeds: list, out_dir: str, resume: bool) -> tuple[list, list]:
    cells, summary = [], []
    for strategy, target in targets:
        by = {}
        for seed in seeds:
            for precision in PRECISIONS:
                out = os.path.join(out_dir, f"{target:g}_{strategy}_s{seed}_{precision}")
                c = run_cell(strategy, target, steps, seed, precision, out, resume)
                cells.append(c)
                by[(seed, precision)] = c
                print(f"    {precision}: PSNR-GT {c['psnr_gt']:.2f} dB, {c['macs_reduction']:.2f}x, "
                      f"{c['wall_s'] / 60:.1f} min", flush=True)
        f = [by[(s, "fp32")] for s in seeds]
        for precision in PRECISIONS:
            b = [by[(s, precision)] for s in seeds]
            diffs = [y["psnr_gt"] - x["psnr_gt"] for x, y in zip(f, b)]
            summary.append({
                "strategy": strategy, "target": target, "precision": precision,
                "steps": steps, "seeds": seeds, "psnr_gt": statistics.mean(x["psnr_gt"] for x in b),
                "per_seed": [x["psnr_gt"] for x in b], "diffs_vs_fp32": diffs, "mean_diff": statistics.mean(diffs),
                "wall_s": statistics.mean(x["wall_s"] for x in b),
                "wall_vs_fp32": statistics.mean(x["wall_s"] for x in b) / statistics.mean(x["wall_s"] for x in f),
                "macs_reduction": b[0]["macs_reduction"], "teacher_psnr_gt": b[0]["teacher_psnr_gt"]})
    return cells, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per round and precision")
    ap.add_argument("--targets", default="uniform:0.1,onestep:0.05,slim:0.1", help="strategy:fraction, comma separated")
    ap.add_argument("--finetune-steps", type=int, default=3000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out-dir", default="runs/precision")
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    ap.add_argument("--no-compress", action="store_true", help="the step timings only")
    ap.add_argument("--resume", action="store_true", help="keep the compress commands already run (their report.json)")
    ap.add_argument("--force", action="store_true", help="run on a CPU without native bf16 too")
    args = ap.parse_args()
    native = native_bf16_cpu()
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16 (AMX / AVX512-BF16): {native}")
    if not native and not args.force:
        print("this CPU has no native bf16: bf16 is emulated and slower here, nothing to measure (--force runs anyway)")
        return
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "native_bf16": native, "steps": step_rows(args.rounds, args.steps)}
    if not args.no_compress:
        targets = [(t.split(":")[0], float(t.split(":")[1])) for t in args.targets.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        print(f"\nganslim compress, {args.finetune_steps} fine-tune steps, seeds {seeds}, fp32 then bf16")
        result["cells"], result["compress"] = compress_rows(targets, args.finetune_steps, seeds, args.out_dir, args.resume)
        print(f"\n{'target':>14s} {'setting':>8s} {'MACs red.':>9s} {'PSNR-GT (per seed)':>28s} {'- fp32 (per seed)':>28s} "
              f"{'wall min':>8s} {'/ fp32':>6s}")
        for r in result["compress"]:
            per = ", ".join(f"{d:.2f}" for d in r["per_seed"])
            dper = ", ".join(f"{d:+.2f}" for d in r["diffs_vs_fp32"])
            print(f"{r['strategy'] + ' ' + format(r['target'], 'g'):>14s} {r['precision']:>8s} {r['macs_reduction']:8.2f}x "
                  f"{r['psnr_gt']:6.2f} dB ({per}) {r['mean_diff']:+6.2f} dB ({dper}) "
                  f"{r['wall_s'] / 60:8.1f} {r['wall_vs_fp32']:5.2f}x")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
