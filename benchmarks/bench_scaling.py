"""How compress's cost grows with the crop size and the batch size: wall time per optimizer step
(gated stage and fine-tune separately) and peak memory, each cell in a fresh process, on the
embedded data (crops up to 256x256, the size of its smallest photo).

    python benchmarks/bench_scaling.py           # ~5 minutes on 2 cores

The default teacher (ResNet-9 ngf 32) is compressed with strategy="slim" (the gated stage is measured; target 1/10)
for a few steps per stage at each (crop, batch) cell; the first two steps of each stage are warm-up
and not timed. Peak memory is the process's peak resident set size during compress (Linux VmHWM,
reset just before) minus its size then (teacher, data and the Python runtime excluded), in MB (10^6 bytes). Fits: time per step against pixels
per batch (a power law, exponent 1 = linear), memory against batch size (slope: memory per sample,
mostly activations kept for the backward pass; intercept: weights, gradients and Adam states of the
gated student, the teacher's copy and the framework). Results: benchmarks/results/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def cell(crop: int, batch: int, steps: int) -> dict:
    """One measurement (run in its own process, so the peak RSS belongs to this cell alone)."""
    sys.path.insert(0, ROOT)
    import torch

    from ganslim import data
    from ganslim.compression import compress

    teacher = data.default_teacher()
    loader = data.default_loader(batch_size=batch, crop=crop, length=(2 * steps + 4) * batch, seed=0, teacher=teacher)
    stamps = []
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    rss_before = _status_kb("VmRSS")
    t0 = time.time()
    compress(teacher, teacher, loader, strategy="slim", target_macs=0.1, steps=steps, finetune_steps=steps, progress=False,
             measure_latency=False, callbacks=[lambda tr, losses: stamps.append(time.perf_counter())])
    total = time.time() - t0
    peak_kb = _status_kb("VmHWM")
    gated = [b - a for a, b in zip(stamps[1:steps], stamps[2:steps])]  # steps 3.. of the gated stage
    fine = [b - a for a, b in zip(stamps[steps + 1:], stamps[steps + 2:])]
    return {"crop": crop, "batch": batch, "pixels": crop * crop * batch, "steps_per_stage": steps,
            "gated_s_per_step": sorted(gated)[len(gated) // 2], "finetune_s_per_step": sorted(fine)[len(fine) // 2],
            "peak_mb": (peak_kb - rss_before) * 1024 / 1e6, "wall_s": total,
            "threads": torch.get_num_threads()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def fit_power(xs, ys) -> tuple[float, float]:
    """``(exponent, factor)`` of ``y = factor * x**exponent`` by least squares in log-log."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return k, math.exp(my - k * mx)


def fit_line(xs, ys) -> tuple[float, float]:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return k, my - k * mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crops", default="64,128,256", help="crop sizes at --crop-batch (the embedded photos allow up to 256)")
    ap.add_argument("--crop-batch", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes at --batch-crop")
    ap.add_argument("--batch-crop", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="steps per stage (the first two are warm-up)")
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # "crop,batch,steps": measure one cell, print JSON
    args = ap.parse_args()
    if args.cell:
        crop, batch, steps = (int(v) for v in args.cell.split(","))
        print(json.dumps(cell(crop, batch, steps)))
        return
    plan = [(c, args.crop_batch) for c in map(int, args.crops.split(","))]
    plan += [(args.batch_crop, b) for b in map(int, args.batches.split(",")) if (args.batch_crop, b) not in plan]
    rows = []
    for crop, batch in plan:
        out = subprocess.run([sys.executable, __file__, "--cell", f"{crop},{batch},{args.steps}"], capture_output=True,
                             text=True)
        if out.returncode != 0:
            print(f"crop {crop} batch {batch}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"crop {crop:4d} batch {batch:3d}: gated {r['gated_s_per_step'] * 1e3:8.1f} ms/step, fine-tune "
              f"{r['finetune_s_per_step'] * 1e3:7.1f} ms/step, peak +{r['peak_mb']:7.0f} MB", flush=True)
    by_crop = [r for r in rows if r["batch"] == args.crop_batch]
    by_batch = [r for r in rows if r["crop"] == args.batch_crop]
    fits = {}
    if len(by_crop) > 1:
        px = [r["pixels"] for r in by_crop]
        fits["gated_time_vs_pixels_exponent"] = fit_power(px, [r["gated_s_per_step"] for r in by_crop])[0]
        fits["finetune_time_vs_pixels_exponent"] = fit_power(px, [r["finetune_s_per_step"] for r in by_crop])[0]
        fits["peak_mb_vs_pixels_exponent"] = fit_power(px, [r["peak_mb"] for r in by_crop])[0]
    if len(by_batch) > 1:
        fits["gated_time_vs_batch_exponent"] = fit_power([r["batch"] for r in by_batch],
                                                         [r["gated_s_per_step"] for r in by_batch])[0]
        slope, icpt = fit_line([r["batch"] for r in by_batch], [r["peak_mb"] for r in by_batch])
        fits[f"peak_mb_per_sample_at_{args.batch_crop}px"], fits["peak_mb_fixed"] = slope, icpt
    head = "| crop | batch | gated ms/step | fine-tune ms/step | peak MB |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['crop']} | {r['batch']} | {r['gated_s_per_step'] * 1e3:.0f} | {r['finetune_s_per_step'] * 1e3:.0f} "
                     f"| {r['peak_mb']:.0f} |")
    print("\n".join(lines))
    print(json.dumps(fits, indent=2))
    sys.path.insert(0, ROOT)
    from ganslim.measure.machine import describe_machine
    from ganslim.measure.report import write_json

    write_json({"machine": describe_machine(),
                "steps_per_stage": args.steps, "rows": rows, "fits": fits}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
