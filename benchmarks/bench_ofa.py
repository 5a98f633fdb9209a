"""Once-for-all on the default teacher: one supernet, three budgets, and the gating path beside it, in one run.

    python benchmarks/bench_ofa.py                      # supernet 2400 steps, budgets 0.2/0.1/0.05, fine-tune 6000
    python benchmarks/bench_ofa.py --supernet-steps 300 --finetune-steps 500 --skip-slim   # quick look

1. Supernet: the default teacher's channel groups sliceable at 1/8 ... 1 of their width (multiples of
   8), trained by distillation with the sandwich rule (largest + smallest + 2 random sub-networks per
   step); resumable state in ``runs/ofa/supernet.state.pt``, the supernet in ``runs/ofa/supernet.safetensors``
   (``ganslim search runs/ofa/supernet.safetensors --target-macs ...`` answers other budgets).
2. Search + export + fine-tune for each budget (``ganslim.pruning.search.search_budgets``, the function behind
   ``ganslim search``): PSNR to ground truth on the held-out photo at selection time and after the
   fine-tune, measured CPU latency of the exported plain model, search throughput.
3. The gating path (``compress(strategy="slim")``) at 1/10 with the same fine-tune steps and width
   multiple: fidelity and total CPU time side by side.

Results go to ``benchmarks/results/ofa.json`` and the Pareto plot to ``benchmarks/results/ofa_pareto.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim import data, measure  # noqa: E402
from ganslim.compression import compress  # noqa: E402
from ganslim.pruning.search import search_budgets  # noqa: E402
from ganslim.pruning.slicing import SliceConfig, make_supernet  # noqa: E402
from ganslim.pruning.supernet import SupernetConfig, save_supernet, train_supernet  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: kilobytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--supernet-steps", type=int, default=2400)
    ap.add_argument("--supernet-lr", type=float, default=1e-3)
    ap.add_argument("--budgets", default="0.2,0.1,0.05")
    ap.add_argument("--finetune-steps", type=int, default=6000)
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--population", type=int, default=24)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--skip-slim", action="store_true")
    ap.add_argument("--run-dir", default="runs/ofa")
    ap.add_argument("--out", default="benchmarks/results/ofa.json")
    args = ap.parse_args()
    os.makedirs(args.run_dir, exist_ok=True)
    torch.manual_seed(0)
    teacher = data.default_teacher()
    budgets = [float(b) for b in args.budgets.split(",")]
    n_batches = args.supernet_steps + args.finetune_steps * (len(budgets) + 1) + 16
    loader = data.default_loader(batch_size=8, crop=64, length=n_batches * 8, seed=1, teacher=teacher)
    pairs = data.test_pairs()
    x_eval = pairs[0][0]

    # 1. supernet -----------------------------------------------------------------------------
    rss0 = rss_mb()
    example = next(iter(loader))["A"][:1]
    sn = make_supernet(teacher, example, SliceConfig(multiple=args.multiple))
    t0 = time.time()
    info = train_supernet(sn, teacher, loader, SupernetConfig(steps=args.supernet_steps, lr=args.supernet_lr),
                          checkpoint=os.path.join(args.run_dir, "supernet.state.pt"))
    sn_seconds = time.time() - t0
    sn_path = save_supernet(sn, os.path.join(args.run_dir, "supernet.safetensors"))
    rss1 = rss_mb()
    sn_params = measure.count_params(sn.model)
    smallest = sn.macs(sn.smallest()) / sn.total_macs
    print(f"supernet: {len(sn.groups)} channel groups, {sum(len(c) for c in sn.choices.values())} width choices, "
          f"sub-networks from {smallest:.4f} to 1 of the teacher's MACs; {info['steps']} steps in {sn_seconds / 60:.1f} min "
          f"(resumed from {info['resumed_from']}); {sn_params / 1e6:.3f} M shared parameters "
          f"({measure.model_size_mb(sn.model):.2f} MB); peak process memory {rss1:.0f} MB (before the supernet {rss0:.0f} MB)")

    # 2. one supernet, several budgets -----------------------------------------------------------
    rows = search_budgets(sn, teacher, loader, [((x,), y) for x, y in pairs], [("macs", b) for b in budgets],
                          out_dir=args.run_dir, finetune_steps=args.finetune_steps, population=args.population,
                          generations=args.generations, plot="benchmarks/results/ofa_pareto.png")
    print(rows.table())
    evals = sum(r.evaluations for r in rows.rows)
    search_s = sum(r.search_seconds for r in rows.rows)
    print(f"search throughput: {evals} sub-networks in {search_s:.0f} s = {60 * evals / search_s:.0f} per minute "
          f"(BatchNorm re-estimated on 4 batches + the held-out photo {tuple(x_eval.shape)} per candidate)")

    # 3. the gating path at 1/10, same fine-tune ----------------------------------------------------
    slim = None
    if not args.skip_slim:
        t0 = time.time()
        res = compress(teacher, teacher, loader, strategy="slim", target_macs=0.1, steps=800, finetune_steps=args.finetune_steps,
                       channel_multiple=args.multiple, eval_inputs=pairs, measure_latency=True)
        slim = {"seconds": time.time() - t0, "macs_fraction": res.report.student.macs / res.report.teacher.macs,
                "psnr_gt": res.report.student.psnr_to_gt, "psnr_teacher": res.report.student.psnr_to_teacher,
                "latency_ms": measure.measure_latency(res.model, x_eval, warmup=2, repeats=5).median_ms}
    t_psnr = rows.teacher_psnr_gt
    ofa10 = next((r for r in rows.rows if r.budget == "macs 0.1"), None)
    lines = ["strategy @ 1/10        MACs  x fewer  PSNR-GT  vs teacher  latency ms  CPU min (what)",
             "-" * 98]
    if ofa10 is not None:
        lines.append(f"ofa (this supernet) {ofa10.macs_fraction:7.4f} {1 / ofa10.macs_fraction:8.2f} {ofa10.psnr_gt:8.2f} "
                     f"{ofa10.psnr_gt - t_psnr:+9.2f} dB {ofa10.latency_ms:10.1f}  "
                     f"{(sn_seconds + ofa10.search_seconds + ofa10.finetune_seconds) / 60:.1f} (supernet "
                     f"{sn_seconds / 60:.1f}, shared by all budgets + search {ofa10.search_seconds / 60:.1f} + "
                     f"fine-tune {ofa10.finetune_seconds / 60:.1f})")
    if slim is not None:
        lines.append(f"slim (gates + L1)   {slim['macs_fraction']:7.4f} {1 / slim['macs_fraction']:8.2f} "
                     f"{slim['psnr_gt']:8.2f} {slim['psnr_gt'] - t_psnr:+9.2f} dB {slim['latency_ms']:10.1f}  "
                     f"{slim['seconds'] / 60:.1f} (800 gated steps + {args.finetune_steps} fine-tune)")
    print("\n".join(lines))
    out = {"machine": describe_machine(),
           "supernet": {"steps": info["steps"], "seconds": sn_seconds, "lr": args.supernet_lr, "groups": len(sn.groups),
                        "params": sn_params, "size_mb": measure.model_size_mb(sn.model), "peak_rss_mb": rss1,
                        "rss_before_mb": rss0, "smallest_macs_fraction": smallest, "path": str(sn_path)},
           "budgets": rows.to_dict(), "search_per_minute": 60 * evals / search_s, "slim_at_0.1": slim,
           "finetune_steps": args.finetune_steps, "multiple": args.multiple}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {args.out} and benchmarks/results/ofa_pareto.png")


if __name__ == "__main__":
    main()
