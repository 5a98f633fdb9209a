"""Run-to-run spread: the same compression with several seeds, on the default teacher.

A run is deterministic on one machine (same seed, same CPU, same kernels: bit-identical), not across
CPUs: float32 rounding differs with the kernels a CPU picks, training amplifies it, and the kept
widths and the final PSNR move. Seeds stand in for that spread here (they change the data order and
every random choice), so a headline number can be read with its error bar.

    python benchmarks/bench_seeds.py --strategy onestep --target 0.1 --finetune-steps 3000 --seeds 0,1,2
    python benchmarks/bench_seeds.py --strategy slim --steps 800 --finetune-steps 3000 --seeds 0,1,2

Prints one row per seed and the mean / standard deviation / range; writes
``benchmarks/results/seeds_<strategy>.json``.

``--final-variants``: which weights to end the fine-tune with, compared within each run (so the
seeds' spread cancels): the last step's weights ("last"), an exponential moving average of the
weights and buffers over the fine-tune with a horizon of a fraction h of its steps ("ema:h", decay
1 - 1/(h * steps)), and either with the BatchNorm statistics re-estimated from 64 training batches
("+bn", a cumulative average instead of the running one's last ~10 batches):

    python benchmarks/bench_seeds.py --strategy onestep --target 0.05 --finetune-steps 3000 \
        --final-variants last,last+bn,ema:0.02,ema:0.05,ema:0.1,ema:0.05+bn --out benchmarks/results/seeds_final.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim import data, measure  # noqa: E402
from ganslim.compression import compress  # noqa: E402
from ganslim.core.averaging import WeightAverage, recalibrate_batchnorm  # noqa: E402


def _horizon(variant: str) -> float:
    return float(variant.split(":")[1].split("+")[0])


class _EmaTracker:
    """A compress callback: :class:`~ganslim.core.averaging.WeightAverage` of the trained student for
    several horizons at once; restarts whenever another trainer calls (the last one to call is the
    fine-tune)."""

    def __init__(self, horizons, steps):
        self.horizons, self.steps = horizons, steps
        self.trainer, self.avg = None, {}

    def __call__(self, trainer, _losses):
        if trainer is not self.trainer:
            self.trainer = trainer
            self.avg = {h: WeightAverage(trainer.student, max(1.0, h * self.steps)) for h in self.horizons}
            return
        for a in self.avg.values():
            a.update()


def _final_variant(model, variant, tracker, recal_loader, pairs) -> float:
    import copy

    m = copy.deepcopy(model)
    if variant.startswith("ema:"):
        tracker.avg[_horizon(variant)].copy_to(m)
    if variant.endswith("+bn"):
        recalibrate_batchnorm(m, [(x,) for x, _ in recal_loader])
    return measure.fidelity_to_target(m, pairs)["psnr"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="onestep")
    ap.add_argument("--target", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=800, help="gated / supernet steps (slim, ofa)")
    ap.add_argument("--finetune-steps", type=int, default=3000)
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--teacher", default=None, help="a ganslim checkpoint instead of the default teacher")
    ap.add_argument("--final-variants", default="",
                    help="comma list of last, last+bn, ema:H, ema:H+bn (H: horizon, fraction of the fine-tune steps)")
    ap.add_argument("--recal-batches", type=int, default=64, help="training batches for the +bn variants")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = [v for v in args.final_variants.split(",") if v]
    teacher = data.default_teacher() if args.teacher is None else __import__("ganslim").load(args.teacher).eval()
    pairs = data.test_pairs()
    t_psnr = measure.fidelity_to_target(teacher, pairs)["psnr"]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        torch.manual_seed(seed)
        loader = data.default_loader(batch_size=8, crop=64, length=(args.finetune_steps + args.steps + 16) * 8,
                                     seed=seed, teacher=teacher)
        tracker = _EmaTracker(sorted({_horizon(v) for v in variants if v.startswith("ema:")}), args.finetune_steps)
        t0 = time.time()
        res = compress(teacher, teacher, loader, strategy=args.strategy, target_macs=args.target, steps=args.steps,
                       finetune_steps=args.finetune_steps, channel_multiple=args.multiple, eval_inputs=pairs,
                       measure_latency=False, seed=seed, progress=False, callbacks=[tracker] if variants else (),
                       # the variants are made here from the trajectory: compress keeps the last weights
                       **({"finetune_average": 0.0} if variants else {}))
        rep = res.report
        row = {"seed": seed, "macs_reduction": rep.teacher.macs / rep.student.macs, "psnr_gt": rep.student.psnr_to_gt,
               "vs_teacher_db": rep.student.psnr_to_gt - t_psnr, "psnr_to_teacher": rep.student.psnr_to_teacher,
               "minutes": (time.time() - t0) / 60,
               "widths": {k: list(v) for k, v in rep.widths.items()}}
        if variants:
            recal = data.default_loader(batch_size=8, crop=64, length=args.recal_batches * 8, seed=10_000 + seed)
            row["finals"] = {v: _final_variant(res.model, v, tracker, recal, pairs) - t_psnr for v in variants}
            print("  " + ", ".join(f"{v} {d:+.2f}" for v, d in row["finals"].items()), flush=True)
        rows.append(row)
        print(f"seed {seed}: {row['macs_reduction']:.2f}x fewer MACs, PSNR-GT {row['psnr_gt']:.2f} dB "
              f"({row['vs_teacher_db']:+.2f}), to teacher {row['psnr_to_teacher']:.2f} dB, {row['minutes']:.1f} min",
              flush=True)
    vs = [r["vs_teacher_db"] for r in rows]
    red = [r["macs_reduction"] for r in rows]
    summary = {"vs_teacher_mean_db": statistics.mean(vs), "vs_teacher_std_db": statistics.pstdev(vs),
               "vs_teacher_range_db": [min(vs), max(vs)], "macs_reduction_range": [min(red), max(red)]}
    print(f"\n{args.strategy} at {args.target:g}, {args.finetune_steps} fine-tune steps, {len(rows)} seeds: "
          f"PSNR-GT vs teacher {summary['vs_teacher_mean_db']:+.2f} +/- {summary['vs_teacher_std_db']:.2f} dB "
          f"(range {min(vs):+.2f} .. {max(vs):+.2f}); MACs reduction {min(red):.2f}x .. {max(red):.2f}x")
    for v in variants:
        ds = [r["finals"][v] for r in rows]
        summary.setdefault("finals", {})[v] = {"mean_db": statistics.mean(ds), "std_db": statistics.pstdev(ds),
                                               "vs_last_mean_db": statistics.mean(
                                                   d - r["vs_teacher_db"] for d, r in zip(ds, rows))}
        print(f"  {v:>14}: {statistics.mean(ds):+.2f} +/- {statistics.pstdev(ds):.2f} dB vs teacher, "
              f"{summary['finals'][v]['vs_last_mean_db']:+.3f} dB vs the last weights (mean of per-seed differences)")
    out = args.out or f"benchmarks/results/seeds_{args.strategy}.json"
    with open(out, "w") as f:
        json.dump({"machine": describe_machine(),
                   "strategy": args.strategy, "target": args.target, "steps": args.steps,
                   "finetune_steps": args.finetune_steps, "teacher_psnr_gt": t_psnr, "rows": rows,
                   "summary": summary}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
