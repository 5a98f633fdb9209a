"""Search throughput (issue 17): sub-networks evaluated per minute by ganslim's architecture search,
beside the evaluation it replaced, on the same supernet, budgets and seed, in one run; and a check
that both choose the same sub-network for every budget.

    python benchmarks/bench_search.py            # a supernet of the default teacher, 300 steps (cached in runs/search)
    python benchmarks/bench_search.py --supernet runs/ofa/supernet.safetensors   # bench_ofa.py's 2400-step supernet

"before" is the evaluation as it was: every BatchNorm re-estimation forward ran to the output layer,
SSIM was computed for every candidate whatever the metric, and a candidate's MACs were recounted
from boolean channel masks each time the search asked (thousands of times while sampling). "now" is
:class:`ganslim.pruning.search.Evaluator` as configured by default: the re-estimation forward stops
after the last BatchNorm call (the number of calls per forward counted once, not per candidate), the
re-estimation batches run as one forward of their concatenation, each BatchNorm keeping them apart
(``recalibrate_bn(merge=True)``: the same statistics bit for bit, a quarter of the convolution calls),
SSIM only when it is the metric, MACs counted from the widths without masks (the same float) and
cached, images in channels-last order (oneDNN skips reordering every activation), the output conv (3
channels) in :mod:`ganslim.pruning.thin_conv`'s strided form, the supernet's train/eval switch in one
flat pass, float32, and each
sub-network started from the deepest prefix of layers it shares with one evaluated before
(:class:`ganslim.pruning.prefix.PrefixCache`: the kept activations and BatchNorm statistics, the same
numbers bit for bit; ``SearchConfig.prefix_cache_mb`` of memory); "whole" is "now" without that
reuse. Every float32 row must choose the same sub-network as "before" for every budget (the run
fails otherwise). "parallel" adds ``workers`` evaluation processes (each with its own kept prefixes; a
worker that finishes gets the pending sub-network its prefixes reach deepest into). All run the same search (3 budgets sharing one evaluator, as
``ganslim search`` and bench_ofa do: BatchNorm re-estimated on 4 training batches of 8x3x64x64,
fitness on the held-out photo (1, 3, 256, 384)). Throughput counts fresh evaluations over the wall
time of the search calls (sampling included). Each row runs in a fresh process, so none reuses
another's warmed-up kernels. Rows in separate processes drift apart by 10% and more on a shared
machine, more than the prefix reuse saves: a last process therefore evaluates the "now" row's
sub-networks in its order both whole and from kept prefixes, in alternating turns, and reports the
time per sub-network of each (and checks the fitnesses equal bit for bit), a third time with the
output conv run directly: the thin conv's gain, paired the same way, and a fourth from prefixes kept
in the 512 MB per process that was the default before the tenth session (the cache's size, paired).

On a CPU with native bf16 (AMX or AVX512-BF16), "bf16" and "bf16_parallel" are "now" and
"parallel" with ``precision="bf16"``. A fitness then moves by hundredths of a dB, which is enough to
send the evolution elsewhere: their winners are reported, not required to match. To show whether
they are worse, each budget's winner of the float32 and the bf16 search is measured in float32, for
the seeds in ``--seeds`` (the evolution's seed; seed 0 is the rows above).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim import data, measure  # noqa: E402
from ganslim._utils import first_output  # noqa: E402
from ganslim.core.train import input_batches  # noqa: E402
from ganslim.pruning.search import Candidate, Evaluator, SearchConfig, _key, native_bf16_cpu, search  # noqa: E402
from ganslim.pruning.slicing import SliceConfig, make_supernet  # noqa: E402
from ganslim.pruning.supernet import SupernetConfig, load_supernet, save_supernet, train_supernet  # noqa: E402


class BeforeEvaluator(Evaluator):
    """The evaluation as it was before the throughput work (same numbers, more work)."""

    def __init__(self, supernet, teacher, eval_pairs, bn_inputs, metric):
        super().__init__(supernet, teacher, eval_pairs, bn_inputs, metric, precision="fp32", prefix_cache_mb=0)
        self.eval_pairs = [(tuple(i), t) for i, t in eval_pairs]  # the images as given (no channels-last copy)
        self.bn_inputs = list(bn_inputs)

    def macs(self, widths: dict) -> float:  # recounted every time, from boolean masks
        return self.supernet._macs.macs(self.supernet.alive(widths))

    @torch.no_grad()
    def __call__(self, widths: dict) -> Candidate:
        with self.supernet.direct_thin_convs():
            return self._before(widths)

    def _before(self, widths: dict) -> Candidate:
        k = _key(widths)
        if k in self.cache:
            return self.cache[k]
        t0 = time.time()
        sn = self.supernet
        sn.set_widths(widths)
        bns = [m for m in sn.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        sn.model.train()
        for inputs in self.bn_inputs:  # whole forwards, output layer included
            sn.model(*inputs)
        for m in bns:
            m.momentum = 0.1
        sn.model.eval()
        outs = [first_output(sn.model(*i)) for i, _ in self.eval_pairs]
        gts = [t for _, t in self.eval_pairs]
        metrics = {"psnr_gt": sum(measure.psnr(o, t) for o, t in zip(outs, gts)) / len(outs),
                   "ssim_gt": sum(measure.ssim(o, t) for o, t in zip(outs, gts)) / len(outs),
                   "psnr_teacher": sum(measure.psnr(o, t) for o, t in zip(outs, self.teacher_out)) / len(outs)}
        cand = Candidate(dict(widths), self.macs(widths), float(metrics[self.metric]), None, metrics)
        self.cache[k] = cand
        self.evaluations += 1
        self.seconds += time.time() - t0
        return cand


# the kept prefixes' memory before the tenth session (MB per process), paired against the default
SMALL_CACHE_MB = 512

# name: (evaluator, precision, processes, prefix reuse)
VARIANTS = {"before": ("before", "fp32", 1, False), "whole": ("now", "fp32", 1, False), "now": ("now", "fp32", 1, True),
            "parallel": ("now", "fp32", "workers", True), "bf16": ("now", "bf16", 1, True),
            "bf16_parallel": ("now", "bf16", "workers", True)}


def run(evaluator: Evaluator, teacher, pairs, bn_inputs, budgets, cfg) -> dict:
    sn = evaluator.supernet
    t0 = time.time()
    best = {}
    for b in budgets:
        res = search(sn, teacher, pairs, bn_inputs, target_macs=b, config=cfg, evaluator=evaluator, progress=False)
        best[str(b)] = {"widths": res.best.widths, "fitness": res.best.fitness, "macs": res.best.macs}
    wall = time.time() - t0
    return {"evaluations": evaluator.evaluations, "wall_s": wall, "per_minute": 60 * evaluator.evaluations / wall,
            "evaluator_s": evaluator.seconds, "best": best,
            "order": [dict(c.widths) for c in evaluator.cache.values()]}  # the evaluation order


def paired(sn, teacher, pairs, bn_inputs, cfg, order: list) -> dict:
    """The "now" row's sub-networks in its order, each evaluated whole, from kept prefixes, from kept
    prefixes with the output conv run directly (not in :mod:`ganslim.pruning.thin_conv`'s strided
    form), and from prefixes kept in ``SMALL_CACHE_MB``, in rotating turns in this one process: the
    time per sub-network of each, free of the drift between processes that the rows' separate runs
    carry. The fitnesses of whole and prefix-started evaluations (either cache) must be equal bit for
    bit; the direct output conv's may differ by float rounding."""
    whole = Evaluator(sn, teacher, pairs, bn_inputs, cfg.metric, prefix_cache_mb=0)
    reuse = Evaluator(sn, teacher, pairs, bn_inputs, cfg.metric, prefix_cache_mb=cfg.prefix_cache_mb)
    direct = Evaluator(sn, teacher, pairs, bn_inputs, cfg.metric, prefix_cache_mb=cfg.prefix_cache_mb)
    small = Evaluator(sn, teacher, pairs, bn_inputs, cfg.metric, prefix_cache_mb=SMALL_CACHE_MB)
    turns = [("whole", whole, contextlib.nullcontext), ("reuse", reuse, contextlib.nullcontext),
             ("direct", direct, sn.direct_thin_convs), ("small", small, contextlib.nullcontext)]
    spent = {name: 0.0 for name, _, _ in turns}
    fit = {}
    for i, w in enumerate(order):
        for name, ev, ctx in turns[i % len(turns):] + turns[:i % len(turns)]:
            with ctx():
                t0 = time.perf_counter()
                fit[name] = ev(w).fitness
                spent[name] += time.perf_counter() - t0
        if not fit["whole"] == fit["reuse"] == fit["small"]:
            raise SystemExit(f"prefix reuse changed a fitness: {fit} for {w}")
    n = len(order)
    return {"sub_networks": n, "whole_ms": 1000 * spent["whole"] / n, "reuse_ms": 1000 * spent["reuse"] / n,
            "time_ratio": spent["reuse"] / spent["whole"], "hits": reuse.prefix.hits if reuse.prefix else 0,
            "max_mb": reuse.prefix.max_bytes / 2 ** 20 if reuse.prefix else 0,
            "small_cache_ms": 1000 * spent["small"] / n, "small_cache_mb": small.prefix.max_bytes / 2 ** 20,
            "small_cache_hits": small.prefix.hits, "cache_time_ratio": spent["reuse"] / spent["small"],
            "direct_output_conv_ms": 1000 * spent["direct"] / n,
            "thin_time_ratio": spent["reuse"] / spent["direct"],
            "thin_max_fitness_diff_db": max(abs(reuse.cache[k].fitness - direct.cache[k].fitness) for k in reuse.cache)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--supernet", help="a supernet .safetensors (bench_ofa.py); default: --supernet-steps of training")
    ap.add_argument("--supernet-steps", type=int, default=300, help="train the default teacher's supernet this long")
    ap.add_argument("--budgets", default="0.2,0.1,0.05")
    ap.add_argument("--population", type=int, default=24)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/search.json")
    ap.add_argument("--workers", type=int, default=2, help="evaluation processes of the parallel rows")
    ap.add_argument("--seeds", default="0,1,2", help="evolution seeds of the float32 vs bf16 winners comparison")
    ap.add_argument("--only", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one row, in this process
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    ap.add_argument("--paired", help=argparse.SUPPRESS)  # a JSON of widths: the paired whole / reuse timing
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    teacher = data.default_teacher().eval()
    if args.supernet is None:
        args.supernet = f"runs/search/supernet_{args.supernet_steps}.safetensors"
        if not os.path.exists(args.supernet):  # the supernet is an input of the measurement, trained once
            os.makedirs(os.path.dirname(args.supernet), exist_ok=True)
            loader = data.default_loader(batch_size=8, crop=64, length=(args.supernet_steps + 4) * 8, seed=1,
                                         teacher=teacher)
            sn = make_supernet(teacher, next(iter(loader))["A"][:1], SliceConfig(multiple=8))
            info = train_supernet(sn, teacher, loader, SupernetConfig(steps=args.supernet_steps))
            save_supernet(sn, args.supernet)
            print(f"supernet: {args.supernet_steps} steps in {info['seconds'] / 60:.1f} min -> {args.supernet}")
    if args.only is None and not args.paired:
        native = native_bf16_cpu()
        names = [n for n, (_, prec, _, _) in VARIANTS.items() if prec == "fp32" or native]
        if not native:
            print("this CPU has no native bf16 (AMX / AVX512-BF16): the bf16 rows are left out")
        seeds = [int(s) for s in args.seeds.split(",")] if native else []
        runs = [(n, 0) for n in names] + [(n, s) for s in seeds if s != 0 for n in ("now", "bf16")]
        rows, seeded = {}, {}
        for name, seed in runs:
            row_out = os.path.splitext(args.out)[0] + f".{name}.{seed}.json"
            cmd = [sys.executable, __file__, "--only", name, "--seed", str(seed), "--row-out", row_out,
                   "--supernet", args.supernet, "--budgets", args.budgets, "--population", str(args.population),
                   "--generations", str(args.generations), "--workers", str(args.workers)]
            subprocess.run(cmd, check=True)
            with open(row_out) as f:
                row = json.load(f)
            os.remove(row_out)
            if seed == 0:
                rows[name] = row
            if name in ("now", "bf16"):
                seeded.setdefault(name, {})[str(seed)] = row["best"]
        orders = {name: row.pop("order") for name, row in rows.items()}
        order_file = os.path.splitext(args.out)[0] + ".order.json"
        with open(order_file, "w") as f:
            json.dump(orders["now"], f)
        row_out = os.path.splitext(args.out)[0] + ".paired.json"
        subprocess.run([sys.executable, __file__, "--paired", order_file, "--row-out", row_out, "--supernet", args.supernet],
                       check=True)
        with open(row_out) as f:
            reuse = json.load(f)
        os.remove(row_out)
        os.remove(order_file)
        report(args, budgets, rows, seeded, reuse)
        return
    bn_loader = data.default_loader(batch_size=8, crop=64, length=64, seed=0, teacher=teacher)
    bn_inputs = input_batches(bn_loader, 4, None)
    pairs = [((x,), y) for x, y in data.test_pairs()]
    sn = load_supernet(args.supernet)
    cfg = SearchConfig(population=args.population, generations=args.generations, seed=args.seed)
    if args.paired:
        with open(args.paired) as f:
            res = paired(sn, teacher, pairs, bn_inputs, cfg, json.load(f))
        with open(args.row_out, "w") as f:
            json.dump(res, f)
        return
    kind, precision, procs, reuse = VARIANTS[args.only]
    if kind == "before":
        ev = BeforeEvaluator(sn, teacher, pairs, bn_inputs, cfg.metric)
    else:
        ev = Evaluator(sn, teacher, pairs, bn_inputs, cfg.metric, workers=args.workers if procs == "workers" else 1,
                       precision=precision, prefix_cache_mb=cfg.prefix_cache_mb if reuse else 0)
    try:
        row = run(ev, teacher, pairs, bn_inputs, budgets, cfg)
    finally:
        ev.close()
    if ev.precision != "fp32":  # the winners measured as the float32 search measures them (not timed)
        ev32 = Evaluator(sn, teacher, pairs, bn_inputs, cfg.metric, precision="fp32")
        for b in row["best"].values():
            b["fitness_fp32"] = ev32(b["widths"]).fitness
    else:
        for b in row["best"].values():
            b["fitness_fp32"] = b["fitness"]
    row["workers"] = ev.workers
    row["precision"] = ev.precision
    if ev.prefix is not None:  # counted in this process (with workers, each has its own, uncounted here)
        row["prefix"] = {"hits": ev.prefix.hits, "misses": ev.prefix.misses, "mb": ev.prefix.bytes / 2 ** 20,
                         "max_mb": ev.prefix.max_bytes / 2 ** 20}
    row["total_macs"] = sn.total_macs
    print(f"{args.only:>6} (seed {args.seed}): {row['evaluations']} sub-networks in {row['wall_s']:.1f} s = {row['per_minute']:.0f} per "
          f"minute (evaluator {row['evaluator_s']:.1f} s)", flush=True)
    with open(args.row_out, "w") as f:
        json.dump(row, f)


def report(args, budgets, rows: dict, seeded: dict, reuse: dict) -> None:
    ref = rows["before"]["best"]
    # the choice is the widths; the fitness may differ in the last bits where the thread count differs
    same = {name: all(r["best"][k]["widths"] == ref[k]["widths"] for k in ref) for name, r in rows.items()}
    dfit = {name: max(abs(r["best"][k]["fitness"] - ref[k]["fitness"]) for k in ref) for name, r in rows.items()}
    speedup = {name: r["per_minute"] / rows["before"]["per_minute"] for name, r in rows.items()}
    for name, r in rows.items():
        print(f"{name:>13}: {r['per_minute']:6.0f} sub-networks per minute ({r['evaluations']} in {r['wall_s']:.1f} s, "
              f"{r['workers']} process(es), {r['precision']}), {speedup[name]:.2f}x; the same sub-network as before "
              f"for every budget: {same[name]} (fitness within {dfit[name]:.1e} dB)")
    print(f"prefix reuse, paired in one process over the 'now' row's {reuse['sub_networks']} sub-networks: "
          f"{reuse['whole_ms']:.1f} ms each whole, {reuse['reuse_ms']:.1f} ms from kept prefixes "
          f"({reuse['time_ratio']:.2f} of the time, {reuse['hits']} started from a prefix, {reuse['max_mb']} MB); "
          f"the same fitness bit for bit")
    print(f"the kept prefixes' memory, paired likewise: {reuse['reuse_ms']:.1f} ms each with {reuse['max_mb']:.0f} MB, "
          f"{reuse['small_cache_ms']:.1f} ms with {reuse['small_cache_mb']:.0f} MB ({reuse['cache_time_ratio']:.2f} of the time; "
          f"{reuse['hits']} vs {reuse['small_cache_hits']} started from a prefix)")
    print(f"thin output conv, paired likewise: {reuse['reuse_ms']:.1f} ms each in the strided form, "
          f"{reuse['direct_output_conv_ms']:.1f} ms with the direct conv ({reuse['thin_time_ratio']:.2f} of the time; "
          f"fitness within {reuse['thin_max_fitness_diff_db']:.1e} dB)")
    for k, b in rows["now"]["best"].items():
        print(f"  budget {k}: {b['macs'] / rows['now']['total_macs']:.4f} of the MACs, PSNR-GT {b['fitness']:.3f} dB")
    winners = {}
    if "bf16" in seeded:
        print("each budget's winner measured in float32 (PSNR-GT dB): float32 search vs bf16 search")
        for k in ref:
            a = [seeded["now"][s][k]["fitness_fp32"] for s in sorted(seeded["now"])]
            b = [seeded["bf16"][s][k]["fitness_fp32"] for s in sorted(seeded["bf16"])]
            winners[k] = {"seeds": sorted(seeded["now"]), "fp32": a, "bf16": b}
            print(f"  budget {k}: float32 {' '.join(f'{v:.3f}' for v in a)} (mean {sum(a) / len(a):.3f}); "
                  f"bf16 {' '.join(f'{v:.3f}' for v in b)} (mean {sum(b) / len(b):.3f}); "
                  f"bf16 - float32 {sum(b) / len(b) - sum(a) / len(a):+.3f} dB")
    meta = {"machine": f"{describe_machine()}, native bf16: {native_bf16_cpu()}", "supernet": args.supernet,
            "budgets": budgets, "population": args.population, "generations": args.generations}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**meta, "rows": rows, "speedup": speedup, "same_choice": same, "max_fitness_diff_db": dfit,
                   "winners_fp32": winners, "prefix_reuse_paired": reuse}, f, indent=1)
    print(f"wrote {args.out}")
    exact = [n for n, (_, prec, _, _) in VARIANTS.items() if prec == "fp32"]
    if not all(same[n] for n in exact):
        raise SystemExit("the float32 evaluations chose different sub-networks")


if __name__ == "__main__":
    main()
