"""Head-to-head: every compression strategy on the default teacher at the same MACs targets, in one run.

    python benchmarks/bench_ofa.py          # first: trains and saves the supernet the 'ofa' rows search
    python benchmarks/bench_strategies.py   # targets 1/10 and 1/20, 3000 fine-tune steps each
    # CycleGAN's default norm: an instance-norm teacher (no supernet for it: without ofa rows)
    python benchmarks/train_teacher.py --norm instance --steps 2400 --out runs/teacher_instance.safetensors
    python benchmarks/bench_strategies.py --teacher runs/teacher_instance.safetensors \
        --strategies slim,onestep,onestep+gka,evolve --out benchmarks/results/strategies_instance.json

Rows per target (same loader, same fine-tune: steps, lr, losses; widths in multiples of 8):
``slim`` (GAN Slimming: 800 gated steps with L1 proximal step), ``onestep`` (CAT: one global
threshold on the norm scales, no training before the fine-tune), ``onestep+gka`` (the same with
CAT's kernel-alignment feature distillation in the fine-tune), ``ofa`` (search of the supernet saved
by bench_ofa.py; its training time is counted in full), ``evolve`` (genetic search over channel masks;
the default teacher has no discriminator, so the fitness is fidelity to the teacher).
Columns: MACs reduction, PSNR to ground truth on the held-out photo (and vs the teacher), CPU wall
time to compress on this machine, eager CPU latency of the result. With ``--winners PATH`` the winner
per target (best PSNR, ties within 0.05 dB to the faster) is written for ``strategy="auto"``, which
now takes its table from bench_peer.py's longer budgets instead; the table to ``benchmarks/results/strategies.json``, the plot to
``benchmarks/results/strategies.png``.
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
from ganslim.compression import compress  # noqa: E402
from ganslim.pruning.search import search_budgets  # noqa: E402
from ganslim.strategies import VARIANTS, winners_from_rows, write_table  # noqa: E402
from ganslim.pruning.supernet import load_supernet  # noqa: E402

# the variants of ganslim.strategies.VARIANTS, with this benchmark's schedules
STRATEGIES = {name: dict(VARIANTS[name], **extra) for name, extra in (
    ("slim", {"steps": 800}), ("onestep", {}), ("onestep+gka", {}),
    ("evolve", {"evolve_population": 16, "evolve_generations": 10}))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="0.1,0.05")
    ap.add_argument("--finetune-steps", type=int, default=3000)
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--supernet", default="runs/ofa/supernet.safetensors")
    ap.add_argument("--ofa-json", default="benchmarks/results/ofa.json", help="for the supernet's training time")
    ap.add_argument("--strategies", default="slim,onestep,onestep+gka,ofa,evolve")
    ap.add_argument("--out", default="benchmarks/results/strategies.json")
    ap.add_argument("--winners", help="also write strategy='auto''s table from these rows (it comes from bench_peer.py's "
                                      "long budgets now: python benchmarks/bench_peer.py --report --winners ...)")
    ap.add_argument("--teacher", default=None,
                    help="a ganslim checkpoint to compress instead of the default teacher, e.g. the instance-norm "
                         "ResNet of `train_teacher.py --norm instance`; its rows do not touch --winners")
    ap.add_argument("--rewrite-winners", action="store_true",
                    help="only recompute the winners file from the rows already in --out (no measurement)")
    args = ap.parse_args()
    if args.rewrite_winners and not args.winners:
        raise SystemExit("--rewrite-winners needs --winners PATH")
    if args.rewrite_winners:
        saved = json.load(open(args.out))
        table = winners_from_rows(saved["rows"])
        write_table(dict(table, source=f"benchmarks/bench_strategies.py, {saved['finetune_steps']} fine-tune steps"),
                    args.winners)
        print(json.dumps(table, indent=2))
        return
    torch.manual_seed(0)
    if args.teacher:
        from ganslim.deployment.checkpoint import load

        teacher = load(args.teacher).eval()
    else:
        teacher = data.default_teacher()
    pairs = data.test_pairs()
    x_eval = pairs[0][0]
    targets = [float(t) for t in args.targets.split(",")]
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    n = (args.finetune_steps + 800 + 16) * 8
    loader = data.default_loader(batch_size=8, crop=64, length=n, seed=1, teacher=teacher)
    t_psnr = measure.fidelity_to_target(teacher, pairs)["psnr"]
    rows = []
    for target in targets:
        for name in names:
            t0 = time.time()
            if name == "ofa":
                if not os.path.exists(args.supernet):
                    print(f"skip ofa: {args.supernet} not found (run benchmarks/bench_ofa.py first)")
                    continue
                sn_seconds = json.load(open(args.ofa_json))["supernet"]["seconds"] if os.path.exists(args.ofa_json) else 0.0
                sn = load_supernet(args.supernet)
                res = search_budgets(sn, teacher, loader, [((x,), y) for x, y in pairs], [("macs", target)],
                                     finetune_steps=args.finetune_steps, progress=True)
                r = res.rows[0]
                model_psnr, frac = r.psnr_gt, r.macs_fraction
                seconds = time.time() - t0 + sn_seconds
                note = f"supernet {sn_seconds / 60:.1f} min (trained once for every budget) + search + fine-tune"
                model = None
                lat = r.latency_ms
            else:
                kw = dict(STRATEGIES[name])
                res = compress(teacher, teacher, loader, target_macs=target, finetune_steps=args.finetune_steps,
                               channel_multiple=args.multiple, eval_inputs=pairs, measure_latency=False, **kw)
                seconds = time.time() - t0
                model = res.model
                model_psnr = res.report.student.psnr_to_gt
                frac = res.report.student.macs / res.report.teacher.macs
                lat = measure.measure_latency(model, x_eval, warmup=2, repeats=7).median_ms
                note = {"slim": "800 gated steps + fine-tune", "onestep": "threshold + fine-tune",
                        "onestep+gka": "threshold + fine-tune with GKA feature distillation",
                        "evolve": f"{res.report.search.get('evaluations', 0)} masks evaluated + fine-tune"}[name]
            rows.append({"target": target, "strategy": name, "macs_fraction": frac, "psnr_gt": model_psnr,
                         "vs_teacher_db": model_psnr - t_psnr, "minutes": seconds / 60, "latency_ms": lat, "what": note})
            print(f"[{name} @ {target:g}] {1 / frac:.2f}x fewer MACs, PSNR-GT {model_psnr:.2f} dB "
                  f"({model_psnr - t_psnr:+.2f}), {seconds / 60:.1f} min", flush=True)
    t_lat = measure.measure_latency(teacher, x_eval, warmup=2, repeats=5).median_ms
    head = (f"{'target':>6} {'strategy':<12} {'x fewer':>8} {'PSNR-GT':>8} {'vs teacher':>10} {'CPU min':>8} "
            f"{'latency ms':>10}  what")
    print(f"\nteacher: PSNR-GT {t_psnr:.2f} dB, latency {t_lat:.1f} ms; held-out photo {tuple(x_eval.shape)}; "
          f"{args.finetune_steps} fine-tune steps for every row; {describe_machine()}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['target']:6g} {r['strategy']:<12} {1 / r['macs_fraction']:8.2f} {r['psnr_gt']:8.2f} "
              f"{r['vs_teacher_db']:+7.2f} dB {r['minutes']:8.1f} {r['latency_ms']:10.1f}  {r['what']}")
    table = winners_from_rows(rows)
    winners, overall = table["winners"], table["overall"]
    for target, w in winners.items():
        print(f"winner at {target}: {w['variant']} ({w['psnr_gt']:.2f} dB in {w['minutes']:.1f} min)")
    print(f"best mean fidelity over the targets: {overall}")
    out = {"machine": describe_machine(),
           "teacher": args.teacher or "default (ResNet-9, batch norm)",
           "teacher_psnr_gt": t_psnr, "teacher_latency_ms": t_lat, "finetune_steps": args.finetune_steps,
           "rows": rows, "winners": winners}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(rows, t_psnr, png)
    if args.teacher or not args.winners:  # strategy="auto" is tuned on the default teacher only
        print(f"wrote {args.out}, {png}")
        return
    write_table({"winners": winners, "overall": overall,
                 "source": f"benchmarks/bench_strategies.py, {args.finetune_steps} fine-tune steps"}, args.winners)
    print(f"wrote {args.out}, {args.winners}, {png}")


def plot(rows: list, t_psnr: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((r["macs_fraction"], r["psnr_gt"]) for r in rows if r["strategy"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, label=name)
    ax.axhline(t_psnr, color="k", lw=0.8, ls="--", label=f"teacher {t_psnr:.2f} dB")
    ax.set_xscale("log")
    ax.set_xlabel("MACs / teacher MACs")
    ax.set_ylabel("PSNR to ground truth (dB), held-out photo")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
