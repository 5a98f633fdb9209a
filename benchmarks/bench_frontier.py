"""The headline in one run: what ``ganslim compress --strategy auto`` gives in a fixed CPU budget at 1/10,
1/20 and 1/40 of the teacher's MACs, beside the trivial peer under the same budget, then every student
and the teacher in one onnxruntime run (issue 17's numbers 1 and 2, measured side by side).

    python benchmarks/bench_frontier.py                       # default teacher, 15 min per command
    python benchmarks/bench_frontier.py --resume              # keep the commands already run (their report.json)
    python benchmarks/bench_frontier.py --teacher runs/teacher_instance.safetensors --out-dir runs/frontier_in \\
        --out benchmarks/results/frontier_instance.json

Each cell is the command a user types, run as its own process with its wall clock (start-up, the
teacher's outputs and saving included; ``--time-budget-min`` covers all of it):

    ganslim compress --teacher T --strategy S --target-macs F --time-budget-min B --out DIR --no-progress

with S = ``auto`` (the measured winner for the target, ``ganslim/assets/strategy_results.json``) and
S = ``uniform`` (the peer: the teacher's own channels cut uniformly to the same MACs and fine-tuned with
the same losses, data and time). Where ``auto`` picks ``uniform`` the two are the same command, run
once. ``--variants`` adds head-to-head variants (``ganslim.strategies.VARIANTS``) at every target.
Then ``ganslim bench T <students> --runtimes onnxruntime --paired-rounds R`` times the teacher and all
students at batch 1 on the held-out 256x384 photo, in alternating turns, in one process of its own
(onnxruntime rows only: mixed with eager rows their paired times came out inflated, benchmarks/README).

Writes ``--out`` (JSON), a markdown table beside it, the onnxruntime table, a Pareto plot and an
image grid. One seed per cell: on the default task runs of the same command have moved by up to
0.3 dB, on the weaker instance-norm teacher by 3 dB.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim.measure.benchmarking import resolve_model  # noqa: E402
from ganslim.strategies.auto import choose_variant, default_steps  # noqa: E402


def _cell_dir(out_dir: str, target: float, strategy: str) -> str:
    return os.path.join(out_dir, f"{target:g}_{strategy}")


def run_compress(options: list, out: str, resume: bool) -> tuple[dict, float]:
    """``ganslim compress OPTIONS --out OUT --no-progress`` in its own process (its output in
    ``OUT/log.txt``) -> ``(report, wall seconds)``; with ``resume``, a command that already wrote its
    report and wall time is not run again."""
    report_path = os.path.join(out, "report.json")
    timing_path = os.path.join(out, "wall_s.txt")
    if resume and os.path.exists(report_path) and os.path.exists(timing_path):
        print(f"  kept {out} (--resume)", flush=True)
    else:
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, "-m", "ganslim", "compress", *options, "--out", out, "--no-progress"]
        print("  $ " + " ".join(["ganslim"] + cmd[3:]), flush=True)
        t0 = time.time()
        with open(os.path.join(out, "log.txt"), "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - t0
        if rc != 0:
            raise RuntimeError(f"the command failed (exit {rc}); its output: {os.path.join(out, 'log.txt')}")
        with open(timing_path, "w") as f:
            f.write(f"{wall}\n")
    with open(report_path) as f:
        report = json.load(f)
    with open(timing_path) as f:
        return report, float(f.read())


def variant_flags(name: str) -> list:
    """The ``ganslim compress`` flags of a head-to-head variant (``ganslim.strategies.VARIANTS``), e.g.
    ``uniform-latency`` -> ``--strategy uniform --uniform-widths latency``."""
    from ganslim.strategies import VARIANTS

    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    flags = []
    for key, value in VARIANTS[name].items():
        flags += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return flags


def run_cell(teacher: str, strategy: str, target: float, budget_min: float, out: str, resume: bool,
             seed: Optional[int] = None, flags: Optional[list] = None) -> dict:
    """One ``ganslim compress`` command in its own process -> its report plus the wall time (s).
    ``flags``: instead of ``--strategy STRATEGY`` (a variant's, :func:`variant_flags`)."""
    report, wall = run_compress(["--teacher", teacher, *(flags or ["--strategy", strategy]), "--target-macs",
                                 f"{target:g}", "--time-budget-min", f"{budget_min:g}"]
                                + (["--seed", str(seed)] if seed is not None else []), out, resume)
    return {"report": report, "wall_s": wall, "student": os.path.join(out, "student.safetensors")}


def write_winners(paths: list, out: str) -> dict:
    """strategy="auto"'s table (:func:`ganslim.strategies.winners_from_rows`) from this script's result
    JSONs: per target and strategy the mean PSNR to ground truth and wall minutes over the files (seeds)."""
    sys.path.insert(0, ROOT)
    from ganslim.strategies import winners_from_rows, write_table

    cells: dict = {}
    teachers, seen = set(), set()
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        for r in saved["rows"]:
            # the teacher file and its fidelity: a file of that name trained on another machine is another teacher
            t_psnr = r.get("teacher_psnr_gt")
            teachers.add((saved["teacher"], None if t_psnr is None else round(t_psnr, 3)))
            run = (r["target"], r["strategy"], r["psnr_gt"], r["wall_min"])
            if run in seen:
                continue  # a cell kept by --resume and written again: one run, counted once
            seen.add(run)
            cells.setdefault((r["target"], r["strategy"]), []).append(r)
    if len(teachers) != 1:
        raise SystemExit(f"--winners-from takes the runs of one teacher, got {sorted(map(str, teachers))}")
    rows = [{"target": t, "strategy": strat, "psnr_gt": sum(r["psnr_gt"] for r in rs) / len(rs),
             "minutes": sum(r["wall_min"] for r in rs) / len(rs), "seeds": len(rs)}
            for (t, strat), rs in sorted(cells.items())]
    table = winners_from_rows(rows)
    seeds = ", ".join(f"1/{round(1 / r['target'])} {r['strategy']}: {r['seeds']}" for r in rows)
    table["source"] = f"benchmarks/bench_frontier.py, mean over seeds ({seeds}): {', '.join(paths)}"
    path, teacher_psnr = teachers.pop()
    table["task"] = f"the teacher {path}" + (f" ({teacher_psnr:.2f} dB to ground truth)" if teacher_psnr is not None else "")
    print("\n".join(write_table(table, out)))
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default", help="'default' or a ganslim .safetensors teacher")
    ap.add_argument("--targets", default="0.1,0.05,0.025", help="comma-separated fractions of the teacher's MACs")
    ap.add_argument("--budget-min", type=float, default=15.0, help="--time-budget-min of every command")
    ap.add_argument("--paired-rounds", type=int, default=10)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "frontier"), help="the commands' --out folders")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "frontier.json"))
    ap.add_argument("--resume", action="store_true", help="keep cells whose report.json is already in --out-dir")
    ap.add_argument("--no-deploy", action="store_true", help="skip the onnxruntime run")
    ap.add_argument("--seed", type=int, default=None, help="--seed of every command (default: compress's, 0)")
    ap.add_argument("--variants", default="", help="comma-separated head-to-head variants run beside auto and the "
                                                   "peer at every target (ganslim.strategies.VARIANTS, e.g. "
                                                   "uniform-latency)")
    ap.add_argument("--winners-from", help="no measurement: comma-separated result JSONs of this script (seeds of one "
                                           "teacher), their mean PSNR per target and strategy -> strategy='auto''s "
                                           "table at --winners")
    ap.add_argument("--winners", help="with --winners-from: the table to write (e.g. "
                                      "ganslim/assets/strategy_results_instance.json)")
    args = ap.parse_args(argv)
    if args.winners_from:
        if not args.winners:
            raise SystemExit("--winners-from needs --winners PATH")
        write_winners([p for p in args.winners_from.split(",") if p], args.winners)
        return 0

    machine = describe_machine()
    print(f"machine: {machine}", flush=True)
    targets = [float(t) for t in args.targets.split(",")]
    # the table compress reads for this teacher (an instance-norm teacher has its own): where auto picks
    # the peer, the peer's command is not run a second time
    teacher_model = resolve_model(args.teacher)
    cells = []
    for target in targets:
        picked, reason = choose_variant(target, teacher=teacher_model, steps=default_steps())  # the commands' steps
        print(f"target {target:g}: auto -> {picked} ({reason})", flush=True)
        auto = run_cell(args.teacher, "auto", target, args.budget_min, _cell_dir(args.out_dir, target, "auto"),
                        args.resume, args.seed)
        cells.append({"target": target, "variant": "auto", "strategy": auto["report"]["strategy"], **auto})
        if picked != "uniform":  # a variant other than the plain peer (uniform-latency, uniform+gka too)
            peer = run_cell(args.teacher, "uniform", target, args.budget_min,
                            _cell_dir(args.out_dir, target, "uniform"), args.resume, args.seed)
            cells.append({"target": target, "variant": "uniform", "strategy": "uniform", **peer})
        for name in [v for v in args.variants.split(",") if v]:
            extra = run_cell(args.teacher, "", target, args.budget_min, _cell_dir(args.out_dir, target, name),
                             args.resume, args.seed, flags=variant_flags(name))
            cells.append({"target": target, "variant": name, "strategy": name, **extra})

    ort = []
    if not args.no_deploy:
        stem = os.path.splitext(args.out)[0]
        ort_json = stem + "_onnxruntime.json"
        cmd = [sys.executable, "-m", "ganslim", "bench", args.teacher, *[c["student"] for c in cells],
               "--runtimes", "onnxruntime", "--paired-rounds", str(args.paired_rounds), "--json", ort_json,
               "--markdown", stem + "_onnxruntime.md", "--plot", stem + ".png", "--grid", stem + "_grid.png"]
        print("  $ " + " ".join(["ganslim"] + cmd[3:]), flush=True)
        subprocess.check_call(cmd, cwd=ROOT)
        with open(ort_json) as f:
            ort = json.load(f)
        if len(ort) != len(cells) + 1:
            raise RuntimeError(f"expected {len(cells) + 1} onnxruntime rows in {ort_json}, got {len(ort)}")

    teacher_psnr = cells[0]["report"]["teacher"]["psnr_to_gt"]
    rows = []
    for i, c in enumerate(cells):
        rep = c["report"]
        row = {"target": c["target"], "variant": c["variant"], "strategy": c["strategy"],
               "macs_reduction": rep["macs_reduction"], "psnr_gt": rep["student"]["psnr_to_gt"],
               "teacher_psnr_gt": rep["teacher"]["psnr_to_gt"],
               "delta_db": rep["student"]["psnr_to_gt"] - rep["teacher"]["psnr_to_gt"],
               "finetune_steps": rep["finetune_steps"], "gated_steps": rep["steps"], "wall_min": c["wall_s"] / 60,
               "command_dir": os.path.relpath(os.path.dirname(c["student"]), ROOT)}
        if ort:
            t, s = ort[0], ort[i + 1]
            row.update(ort_ms=s["latency_ms"], ort_teacher_ms=t["latency_ms"], ort_speedup=t["latency_ms"] / s["latency_ms"],
                       ort_speedup_paired=s["speedup_paired"],
                       ort_speedup_over_macs=t["latency_ms"] / s["latency_ms"] / rep["macs_reduction"])
        rows.append(row)

    head = ("| target | ganslim `auto` (strategy) | MACs reduction | PSNR-GT (teacher "
            f"{teacher_psnr:.2f} dB) | vs teacher | vs peer | steps (gated + fine-tune) | wall min |")
    lines = [head + (" onnxruntime ms | speed-up (paired) | / MACs red. |" if ort else ""),
             "|---" * (8 + (3 if ort else 0)) + "|"]
    for r in rows:
        peer = next((p for p in rows if p["target"] == r["target"] and p["variant"] == "uniform"), None)
        name = {"auto": f"auto ({r['strategy']})", "uniform": "peer (uniform)"}.get(r["variant"], r["variant"])
        if r["variant"] == "auto" and peer is None:
            name += " = peer"
        vs = f"{r['psnr_gt'] - peer['psnr_gt']:+.2f} dB" if peer is not None and peer is not r else ""
        line = (f"| 1/{1 / r['target']:.0f} | {name} | {r['macs_reduction']:.2f}x | {r['psnr_gt']:.2f} dB | "
                f"{r['delta_db']:+.2f} dB | {vs} | {r['gated_steps']} + {r['finetune_steps']} | {r['wall_min']:.1f} |")
        if ort:
            line += (f" {r['ort_ms']:.1f} | {r['ort_speedup']:.1f}x ({r['ort_speedup_paired']:.1f}x) | "
                     f"{r['ort_speedup_over_macs']:.2f} |")
        lines.append(line)
    if ort:
        lines.append(f"\nteacher in onnxruntime: {ort[0]['latency_ms']:.1f} ms one after another, "
                     f"{ort[0]['latency_paired_ms']:.1f} ms in alternating turns")
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "teacher": args.teacher, "budget_min": args.budget_min, "seed": args.seed,
                   "rows": rows}, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
