"""ganslim against the trivial peer, along the training budget: at each MACs target and total number
of optimizer steps, ganslim's strategies (``slim``, ``onestep``) beside the teacher's family made uniformly
narrower (``strategy="uniform"``, now the default: the teacher's leading channels; ``uniform-scratch``: the
same widths freshly initialised), all trained with the same losses, data, batch and learning rates on the default task.

On the default task the cartoon is a fixed filter that a small network learns from the ground truth
alone, so the teacher adds little. ``--photos ... --no-ground-truth`` makes a task where the teacher's
knowledge is all the student has: it learns from the teacher's outputs on fewer photos than the
teacher saw, without a single cartoon, and is judged on the held-out photo's ground truth.

    python benchmarks/bench_peer.py                                   # 1k and 3k steps at 10x, 20x, 40x
    python benchmarks/bench_peer.py --budgets 12800 --targets 0.05 --resume   # add cells to the same table
    python benchmarks/bench_peer.py --report --winners ganslim/assets/strategy_results.json   # strategy="auto"'s table
    # auto's winners after short budgets (1000 and 3000 steps), beside the table's own
    python benchmarks/bench_peer.py --report --out benchmarks/results/all_rows/peer_budgets.json \
        --short-winners ganslim/assets/strategy_results.json
    # the same, each cell the mean over seeds (a second seed's grid: --seed 1 --out ..._seed1.json)
    python benchmarks/bench_peer.py --report --out benchmarks/results/all_rows/peer_budgets.json \
        --other-seeds benchmarks/results/all_rows/peer_budgets_seed1.json --short-winners ganslim/assets/strategy_results.json
    # the instance-norm teacher (CycleGAN's default norm) of train_teacher.py --norm instance
    python benchmarks/bench_peer.py --teacher runs/teacher_instance.safetensors --budgets 3000 \
        --targets 0.05,0.025 --variants onestep,uniform --out benchmarks/results/peer_instance.json
    # distillation without labels from one photo: the student never sees a cartoon, only the
    # teacher's outputs on a photo, where the teacher learned from eight photos with their cartoons
    python benchmarks/bench_peer.py --photos astronaut --no-ground-truth --budgets 3000 --targets 0.1,0.05 \
        --variants onestep,uniform,uniform-scratch --out benchmarks/results/peer_distill.json

A budget is the total number of optimizer steps: ``slim`` spends the demo's share of it gated
(800 of 12800, 1/16) and the rest fine-tuning the pruned network; the peers fine-tune for all of it.
Each row is written to ``--out`` as soon as it is measured (``--resume`` keeps the rows already there),
so a long grid can be built over several runs. Columns: MACs reduction, PSNR to the ground truth of
the held-out photo and its difference to the teacher's, CPU minutes of the whole compress call on
this machine, eager batch-1 latency of the result on the held-out photo. The PNG plots PSNR against
the budget, one panel per target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim import data, measure  # noqa: E402
from ganslim.compression import compress  # noqa: E402
from ganslim.config import CompressConfig  # noqa: E402
from ganslim.strategies import VARIANTS, winners_from_rows, write_table  # noqa: E402

DEFAULT = CompressConfig()
GATED_SHARE = DEFAULT.steps / (DEFAULT.steps + DEFAULT.finetune_steps)  # the demo's 800 of 12800


def schedule(variant: str, budget: int) -> dict:
    """Steps of each stage for a total ``budget`` of optimizer steps."""
    if VARIANTS[variant]["strategy"] == "slim":
        gated = max(1, round(budget * GATED_SHARE))
        return {"steps": gated, "finetune_steps": budget - gated}
    return {"steps": 0, "finetune_steps": budget}


def key(row: dict) -> tuple:
    return row["budget"], row["target"], row["variant"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="0.1,0.05,0.025", help="MACs fractions of the teacher")
    ap.add_argument("--budgets", default="1000,3000", help="total optimizer steps per row")
    ap.add_argument("--variants", default="slim,uniform,uniform-scratch", help="names of ganslim.strategies.VARIANTS")
    ap.add_argument("--out", default="benchmarks/results/peer.json")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out, measure the others")
    ap.add_argument("--report", action="store_true", help="only print the table and redraw the plot from --out")
    ap.add_argument("--teacher", help="a ganslim checkpoint to compress instead of the default teacher "
                                      "(e.g. runs/teacher_instance.safetensors); its rows never feed --winners")
    ap.add_argument("--photos", default=",".join(data.TRAIN_PHOTOS),
                    help="the embedded photos the student trains on (comma list; default: the teacher's eight)")
    ap.add_argument("--no-ground-truth", action="store_true",
                    help="the student never sees a cartoon: the teacher's outputs are its only targets")
    ap.add_argument("--winners", help="write strategy='auto''s table here (ganslim/assets/strategy_results.json): per "
                                      "target, the best variant at the largest budget measured there")
    ap.add_argument("--seed", type=int, default=DEFAULT.seed, help="seed of the data order and of every compress "
                                                                  "call (a seed's rows belong in their own --out)")
    ap.add_argument("--other-seeds", help="with --report --short-winners: comma-separated --out files of the same grid "
                                          "at other --seed: each cell's PSNR and minutes are the mean over the "
                                          "files that measured it")
    ap.add_argument("--also", help="with --report: comma-separated --out files of other cells of the same grid "
                                   "(more variants or budgets, the same seed, task and machine, measured in other "
                                   "runs): their rows join --out's; a cell in several files is taken from the first")
    ap.add_argument("--short-winners", help="add the winners of every budget of --out shorter than the table's own "
                                            "to the table at this path (its short_budgets: auto reads the budget nearest "
                                            "to the steps it is given); the table's main winners are kept")
    args = ap.parse_args()
    if args.report:
        saved = json.load(open(args.out))
        also = [p for p in (args.also or "").split(",") if p]
        if also:
            saved = merge_cells(saved, args.out, also)
        print(table(saved, saved["rows"]))
        plot(saved, saved["rows"], os.path.splitext(args.out)[0] + (".merged" if also else "") + ".png")
        if args.winners:
            check_default_task(saved, args.out)
            write_winners(saved["rows"], args.winners)
        if args.short_winners:
            others = [p for p in (args.other_seeds or "").split(",") if p]
            seeds = [saved] + [json.load(open(p)) for p in others]
            for saved_seed, p in zip(seeds, [args.out] + others):
                check_table_task(saved_seed, p, args.short_winners)
            write_short_winners(mean_over_seeds([sd["rows"] for sd in seeds]), args.short_winners,
                                ", ".join([args.out] + also + others))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    targets = [float(t) for t in args.targets.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]

    if args.winners and (args.teacher or args.no_ground_truth or args.photos != ",".join(data.TRAIN_PHOTOS)):
        raise SystemExit("--winners is strategy='auto''s table for the default teacher and task only")
    photos = tuple(p.strip() for p in args.photos.split(",") if p.strip())
    if args.teacher:
        from ganslim import load

        teacher = load(args.teacher).eval()
    else:
        teacher = data.default_teacher()
    pairs = data.test_pairs()
    (x_eval, _), = pairs
    t_psnr = measure.fidelity_to_target(teacher, pairs)["psnr"]
    saved = json.load(open(args.out)) if args.resume and os.path.exists(args.out) else {}
    if saved and saved.get("seed", DEFAULT.seed) != args.seed:
        raise SystemExit(f"{args.out} holds seed {saved.get('seed', DEFAULT.seed)}'s rows, not seed {args.seed}'s")
    rows = {key(r): r for r in saved.get("rows", [])}
    meta = {"machine": describe_machine(),
            "teacher": args.teacher or "default (ResNet-9 ngf 32, batch norm)", "teacher_psnr_gt": t_psnr,
            "student_photos": list(photos), "ground_truth": not args.no_ground_truth,
            "teacher_latency_ms": measure.measure_latency(teacher, x_eval, warmup=2, repeats=5).median_ms,
            "batch": 8, "crop": 64, "gated_share": GATED_SHARE, "seed": args.seed}
    for budget in budgets:
        # the demo's loader (teacher outputs precomputed per whole photo), long enough for the budget
        loader = data.default_loader(batch_size=8, crop=64, length=(budget + 16) * 8, seed=args.seed, teacher=teacher,
                                     photos=photos, ground_truth=not args.no_ground_truth)
        for target in targets:
            for variant in variants:
                if (budget, target, variant) in rows:
                    continue
                sched = schedule(variant, budget)
                t0 = time.time()
                res = compress(teacher, teacher, loader, target_macs=target, eval_inputs=pairs, measure_latency=False,
                               progress=False, seed=args.seed, **sched, **VARIANTS[variant])
                minutes = (time.time() - t0) / 60
                st = res.report.student
                row = {"budget": budget, "target": target, "variant": variant, **sched,
                       "macs_reduction": res.report.teacher.macs / st.macs, "psnr_gt": st.psnr_to_gt,
                       "vs_teacher_db": st.psnr_to_gt - t_psnr, "minutes": minutes,
                       "latency_ms": measure.measure_latency(res.model, x_eval, warmup=2, repeats=7).median_ms,
                       "widths": {k: v[0] for k, v in res.report.widths.items()}}
                rows[key(row)] = row
                print(f"[{variant} @ {target:g}, {budget} steps] {row['macs_reduction']:.2f}x fewer MACs, PSNR-GT "
                      f"{row['psnr_gt']:.2f} dB ({row['vs_teacher_db']:+.2f}), {minutes:.1f} min", flush=True)
                _write(args.out, meta, rows)
    print(table(meta, list(rows.values())))
    png = os.path.splitext(args.out)[0] + ".png"
    plot(meta, list(rows.values()), png)
    print(f"wrote {args.out}, {png}")
    if args.winners:
        write_winners(list(rows.values()), args.winners)
    if args.short_winners:
        check_table_task(meta, args.out, args.short_winners)
        write_short_winners(list(rows.values()), args.short_winners, args.out)


def merge_cells(saved: dict, path: str, also: list) -> dict:
    """``saved`` (the rows of ``path``) with the cells of the files ``also`` that it lacks. They must
    hold the same seed, task and machine (``machine``: this CPU type runs these commands to the same
    PSNR, so cells of separate runs stand side by side); a cell in several files is the first's."""
    merged = dict(saved, rows=list(saved["rows"]))
    have = {key(r) for r in merged["rows"]}
    for p in also:
        other = json.load(open(p))
        for field in ("seed", "teacher", "student_photos", "ground_truth", "machine"):
            if other.get(field) != saved.get(field):
                raise SystemExit(f"{p} differs from {path} in {field}: {other.get(field)!r} vs {saved.get(field)!r}")
        for r in other["rows"]:
            if key(r) not in have:
                merged["rows"].append(r)
                have.add(key(r))
    merged["rows"].sort(key=key)
    return merged


def check_table_task(saved: dict, path: str, table_path: str) -> None:
    """The rows of ``path`` (``saved``) measure the task of auto's table at ``table_path``: the default
    teacher and task, or the teacher its ``task`` names (``"the teacher runs/teacher_instance.safetensors"``,
    bench_frontier --winners-from), trained on the default photos with their ground truth."""
    task = json.load(open(table_path)).get("task", "")
    check_default_task(saved, path, task[len("the teacher "):] if task.startswith("the teacher ") else None)


def check_default_task(saved: dict, path: str, teacher: Optional[str] = None) -> None:
    """``saved`` measured the default photos with their ground truth, on ``teacher`` (None: the default one)."""
    same_teacher = saved.get("teacher") == teacher if teacher else saved.get("teacher", "default").startswith("default")
    if not same_teacher or not saved.get("ground_truth", True) \
            or saved.get("student_photos", list(data.TRAIN_PHOTOS)) != list(data.TRAIN_PHOTOS):
        if teacher:
            raise SystemExit(f"the table is auto's table for {teacher} on the default photos; {path} measured "
                             f"{saved.get('teacher')}")
        raise SystemExit(f"--winners is strategy='auto''s table for the default teacher and task; {path} is another")


def head_to_head(rows: list) -> list:
    """This script's rows as the rows :func:`ganslim.strategies.winners_from_rows` ranks."""
    return [{"target": r["target"], "strategy": r["variant"], "psnr_gt": r["psnr_gt"], "minutes": r["minutes"]}
            for r in rows]


def mean_over_seeds(seed_rows: list) -> list:
    """Rows of several seeds' grids -> one row per (budget, target, variant): ``psnr_gt``,
    ``vs_teacher_db`` and ``minutes`` averaged over the seeds that measured the cell, ``seeds`` counted."""
    cells: dict = {}
    for rows in seed_rows:
        for r in rows:
            cells.setdefault(key(r), []).append(r)
    out = []
    for rs in cells.values():
        mean = dict(rs[0], seeds=len(rs))
        for k in ("psnr_gt", "vs_teacher_db", "minutes"):
            if all(k in r for r in rs):
                mean[k] = sum(r[k] for r in rs) / len(rs)
        out.append(mean)
    return sorted(out, key=key)


def write_short_winners(rows: list, path: str, rows_path: str) -> dict:
    """Add to the table at ``path`` (written by ``--winners``) the winners of each budget of ``rows``
    shorter than the table's own (:func:`ganslim.strategies.auto.table_budget`), by PSNR to ground
    truth per target as ``--winners`` picks; the table's main winners stay as they are."""
    from ganslim.strategies.auto import table_budget

    table = json.load(open(path))
    main = table_budget(table)
    short = {}
    for budget in sorted({r["budget"] for r in rows if r["budget"] < main}):
        chosen = head_to_head([r for r in rows if r["budget"] == budget])
        w = winners_from_rows(chosen)
        variants = sorted({r["strategy"] for r in chosen})
        seeds = sorted({r.get("seeds", 1) for r in rows if r["budget"] == budget})
        n = f"; mean of {'/'.join(map(str, seeds))} seed(s) per cell" if seeds != [1] else ""
        short[str(budget)] = {"winners": w["winners"],
                              "source": f"benchmarks/bench_peer.py ({budget} steps: {', '.join(variants)}{n}; {rows_path})"}
    if not short:
        raise SystemExit(f"{rows_path} has no budget shorter than the table's {main} steps")
    table["short_budgets"] = short
    print("\n".join(write_table(table, path)))
    return table


def write_winners(rows: list, path: str) -> dict:
    """strategy="auto"'s table from these rows: for each target, the rows of the largest budget measured
    there (the long budget decides; short budgets rank differently), winner by PSNR to ground truth."""
    longest = {t: max(r["budget"] for r in rows if r["target"] == t) for t in {r["target"] for r in rows}}
    chosen = head_to_head([r for r in rows if r["budget"] == longest[r["target"]]])
    out = winners_from_rows(chosen)
    steps = ", ".join(f"{longest[t]} steps at 1/{round(1 / t)}" for t in sorted(longest, reverse=True))
    out["source"] = f"benchmarks/bench_peer.py ({steps})"
    out["budget"] = min(longest.values())  # the steps of these winners (auto's budget_winners)
    print("\n".join(write_table(out, path)))
    return out


def _write(path: str, meta: dict, rows: dict) -> None:
    from ganslim.measure.report import write_json

    write_json(dict(meta, rows=sorted(rows.values(), key=key)), path)


def table(meta: dict, rows: list) -> str:
    """Markdown: one line per (budget, target), one column per variant (dB to the teacher), and the
    best ganslim strategy's margin over the better peer (``uniform*`` rows)."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {key(r): r for r in rows}
    head = "| steps | target | " + " | ".join(variants) + " | best ganslim - best peer |"
    task = ""
    if not meta.get("ground_truth", True) or meta.get("student_photos", list(data.TRAIN_PHOTOS)) != list(data.TRAIN_PHOTOS):
        task = (f"; student data: {', '.join(meta['student_photos'])}"
                + ("" if meta.get("ground_truth", True) else ", no ground truth (teacher outputs only)"))
    lines = [f"teacher {meta.get('teacher', 'default')}: PSNR-GT {meta['teacher_psnr_gt']:.2f} dB{task}; "
             "cells: dB to the teacher (MACs reduction, CPU min)",
             head, "|" + "---|" * (head.count("|") - 1)]
    for budget, target in sorted({(r["budget"], r["target"]) for r in rows}, key=lambda bt: (bt[0], -bt[1])):
        cells, peers, ours = [], [], []
        for v in variants:
            r = by.get((budget, target, v))
            cells.append("-" if r is None else f"{r['vs_teacher_db']:+.2f} ({r['macs_reduction']:.1f}x, {r['minutes']:.1f})")
            if r is not None:
                (peers if v.startswith("uniform") else ours).append(r["psnr_gt"])
        margin = f"{max(ours) - max(peers):+.2f} dB" if ours and peers else "-"
        lines.append(f"| {budget} | 1/{1 / target:g} | " + " | ".join(cells) + f" | {margin} |")
    return "\n".join(lines)


def plot(meta: dict, rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), dpi=110, squeeze=False, sharex=True)
    for ax, target in zip(axes[0], targets):
        for v in dict.fromkeys(r["variant"] for r in rows):
            pts = sorted((r["budget"], r["psnr_gt"]) for r in rows if r["target"] == target and r["variant"] == v)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, label=v)
        ax.axhline(meta["teacher_psnr_gt"], color="k", lw=0.8, ls="--", label="teacher")
        ax.set_xscale("log")
        ax.set_title(f"1/{1 / target:g} of the teacher's MACs", fontsize=9)
        ax.set_xlabel("optimizer steps (total)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("PSNR to ground truth (dB)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
