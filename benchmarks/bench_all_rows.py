"""Issue 17's rows in one session: every benchmark the performance frontier is judged by, run one after
another on one machine, then one table of the issue's numbers beside their targets.

    python benchmarks/bench_all_rows.py                 # run the missing steps, then the table (~110 min)
    python benchmarks/bench_all_rows.py --instance runs/teacher_instance.safetensors   # + its 1/20, 1/40 (~40 min)
    python benchmarks/bench_all_rows.py --report        # the table only, from the JSONs already written

Steps (each a command of its own, its JSON under ``--results``; a step whose JSON exists is kept, so a
broken run resumes where it stopped; delete the folder to measure everything again):

1. ``bench_latency_table.py --finetune-steps 0``: the device's latency model and its held-out error;
2. ``bench_scaling.py``: compress's time per step and peak memory against crop and batch size;
3. ``bench_search.py``: sub-networks evaluated per minute and whether the winners stay the same;
4. ``bench_frontier.py``: ``compress --strategy auto`` at 1/10, 1/20, 1/40 in 15 minutes each, beside
   the uniform peer, timed in onnxruntime;
5. ``bench_frontier.py --targets 0.1 --variants uniform-latency --resume``: the widths shaped for the
   device beside the same 1/10 cells;
6. ``bench_quant.py`` on the 1/10 and the 1/20 ``auto`` students of step 4: int8 / fp32 latency and
   PSNR, the end-to-end figure against the fp32 teacher; again with ``--int8-ends`` (QAT quantizes the
   image-facing convs too), each route (PTQ, QAT, QAT with integer ends) judged on its own;
7. ``bench_int8_ops.py`` on the 1/10 student: which operators stay in float, with the GroupNorm and
   depthwise mobile ResNet beside it;
8. ``bench_peer.py --budgets 1000,3000 --variants uniform,onestep,separable,...``: the strategies beside
   the peer with short budgets (the frontier is the long one), each budget's verdict on what auto runs
   after that many steps (``strategy_results.json``'s ``short_budgets``, written by ``bench_peer.py
   --report --short-winners``); the variants are the peer, onestep, separable and every variant that
   table picks (since the tenth session ``separable+gka`` and ``separable+important``: :func:`peer_variants`);
   1000 steps ~24 min, 3000 ~70 on the AMD EPYC (``--peer-budgets 1000``: the short one only);
9. with ``--instance T``: ``bench_frontier.py --teacher T --targets 0.05,0.025``.

Nothing else should run on the machine meanwhile: the latency rows are ratios timed side by side, but
the compress commands have a wall-clock budget.
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
sys.path.insert(0, ROOT)  # --report reads auto's table from the checkout (ganslim.strategies.auto)
PEER_BUDGETS = "1000,3000"  # step 8's optimizer-step budgets by default


def peer_variants() -> str:
    """Step 8's variants: the peer, onestep and separable, and every variant ``strategy="auto"``'s table
    (ganslim/assets/strategy_results.json) runs after a short budget, so each verdict has its cell."""
    import json

    from ganslim.strategies.auto import RESULTS

    names = ["uniform", "onestep", "separable"]
    try:
        short = json.loads(RESULTS.read_text()).get("short_budgets") or {}
    except (OSError, ValueError):
        short = {}
    for budget in short.values():
        for w in budget["winners"].values():
            if w["variant"] not in names:
                names.append(w["variant"])
    return ",".join(names)


def steps(results: str, runs: str, instance: Optional[str],
          peer_budgets: str = PEER_BUDGETS) -> list[tuple[str, list[str]]]:
    """``[(JSON written, argv after the interpreter)]`` in the order they run."""
    b = lambda name: os.path.join("benchmarks", name)  # noqa: E731
    out = lambda name: os.path.join(results, name)  # noqa: E731
    student = lambda target: os.path.join(runs, f"{target}_auto", "student.safetensors")  # noqa: E731
    rows = [
        (out("latency_table.json"), [b("bench_latency_table.py"), "--finetune-steps", "0"]),
        (out("scaling.json"), [b("bench_scaling.py")]),
        # no --supernet: bench_search.py trains its 300-step supernet once and caches it in runs/search/
        # (naming the cached file broke a fresh checkout, where it does not exist yet)
        (out("search.json"), [b("bench_search.py")]),
        (out("frontier.json"), [b("bench_frontier.py"), "--out-dir", runs]),
        (out("frontier_latency_widths.json"),
         [b("bench_frontier.py"), "--targets", "0.1", "--variants", "uniform-latency", "--resume", "--out-dir", runs]),
        (out("quant_10x.json"), [b("bench_quant.py"), "--student", student("0.1"), "--keep-dir", runs + "_quant10"]),
        (out("quant_20x.json"), [b("bench_quant.py"), "--student", student("0.05"), "--keep-dir", runs + "_quant20"]),
        # QAT with the image-facing convs integer too (their space-to-depth form): the route that reached
        # <= 0.5x within 0.3 dB on the AMD EPYC; the PTQ file is the same as above (its ends always integer)
        (out("quant_10x_int8_ends.json"),
         [b("bench_quant.py"), "--student", student("0.1"), "--int8-ends", "--keep-dir", runs + "_quant10e"]),
        (out("quant_20x_int8_ends.json"),
         [b("bench_quant.py"), "--student", student("0.05"), "--int8-ends", "--keep-dir", runs + "_quant20e"]),
        (out("int8_ops.json"), [b("bench_int8_ops.py"), "--student", student("0.1")]),
        (out("peer_budgets.json"),
         [b("bench_peer.py"), "--budgets", peer_budgets, "--variants", peer_variants()]),
    ]
    if instance:
        rows.append((out("frontier_instance.json"),
                     [b("bench_frontier.py"), "--teacher", instance, "--targets", "0.05,0.025",
                      "--out-dir", runs + "_instance"]))
    return [(path, argv + ["--out", path]) for path, argv in rows]


def _run(argv: list[str]) -> float:
    """One step in its own process from the repository root -> wall minutes; raises on failure."""
    print(f"=== {time.strftime('%H:%M:%S')} $ python " + " ".join(argv), flush=True)
    start = time.time()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT)
    minutes = (time.time() - start) / 60
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}) after {minutes:.1f} min: python {' '.join(argv)}")
    print(f"=== {time.strftime('%H:%M:%S')} done in {minutes:.1f} min", flush=True)
    return minutes


def _load(path: str) -> Optional[dict]:
    full = os.path.join(ROOT, path)
    if not os.path.exists(full):
        return None
    with open(full) as f:
        return json.load(f)


def _row(rows: list, target: float, variant: str) -> Optional[dict]:
    return next((r for r in rows if abs(r["target"] - target) < 1e-9 and r["variant"] == variant), None)


def _verdict(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("met" if ok else "not met")


def report(results: str, instance: bool) -> list[dict]:
    """The issue's numbers from the step JSONs -> rows ``{item, figure, target, status, source}``
    (printed as a markdown table). Missing JSONs are listed as not measured."""
    table: list[dict] = []

    def add(item, figure, target, ok, source):
        table.append({"item": item, "figure": figure, "target": target, "status": _verdict(ok), "source": source})

    def load(name, item, what):
        data = _load(os.path.join(results, name))
        if data is None:
            add(item, f"{what}: not measured", "", None, name)
        return data

    def frontier_rows(name, label):
        data = load(name, "1", label)
        if data is None:
            return None
        rows = data["rows"]
        for target, goal_db in ((0.05, -0.5), (0.025, -1.5)):
            auto = _row(rows, target, "auto")
            if auto is None:
                continue
            ok = (auto["macs_reduction"] >= 1 / target * 0.99 and auto["delta_db"] >= goal_db
                  and auto["wall_min"] <= data["budget_min"])
            add("1", f"{label} 1/{round(1 / target)}: auto ({auto['strategy']}) {auto['macs_reduction']:.2f}x, "
                f"{auto['delta_db']:+.2f} dB to the teacher, {auto['wall_min']:.1f} min",
                f">= {1 / target:.0f}x within {-goal_db} dB, <= {data['budget_min']:g} min", ok, name)
        for target in sorted({r["target"] for r in rows}, reverse=True):
            auto, peer = _row(rows, target, "auto"), _row(rows, target, "uniform")
            if auto is None:
                continue
            if auto["strategy"] == "uniform":
                add("2", f"{label} 1/{round(1 / target)}: auto is the peer ({auto['delta_db']:+.2f} dB to the teacher)",
                    ">= 0.5 dB over the peer where ganslim's default is not the peer", None, name)
            elif peer is None:
                add("2", f"{label} 1/{round(1 / target)}: auto ({auto['strategy']}), the peer not measured",
                    ">= 0.5 dB over the peer", None, name)
            else:
                gain = auto["delta_db"] - peer["delta_db"]
                add("2", f"{label} 1/{round(1 / target)}: auto ({auto['strategy']}) {gain:+.2f} dB over the peer "
                    f"({auto['macs_reduction']:.2f}x vs {peer['macs_reduction']:.2f}x)",
                    ">= 0.5 dB over the peer", gain >= 0.5, name)
        return rows

    frontier_rows("frontier.json", "default teacher")
    if instance or os.path.exists(os.path.join(ROOT, results, "frontier_instance.json")):
        frontier_rows("frontier_instance.json", "instance-norm teacher")

    peer = load("peer_budgets.json", "2", "the strategies beside the peer with a short budget")
    if peer is not None:
        from ganslim.strategies.auto import choose_variant  # the default task's table: what auto runs there

        for budget, target in sorted({(r["budget"], r["target"]) for r in peer["rows"]}, key=lambda bt: (bt[0], -bt[1])):
            cell = {r["variant"]: r for r in peer["rows"] if r["budget"] == budget and r["target"] == target}
            # the variant (separable+gka, not just its strategy): the cell judged is the one auto would train
            pick = choose_variant(target, steps=budget)[0]
            each = ", ".join(f"{v} {r['vs_teacher_db']:+.2f}" for v, r in cell.items())
            if pick == "uniform" or pick not in cell or "uniform" not in cell:
                add("2", f"{budget} steps, 1/{round(1 / target)}: {each} dB to the teacher; auto runs {pick}",
                    ">= 0.5 dB over the peer where ganslim's default is not the peer", None, "peer_budgets.json")
            else:
                gain = cell[pick]["psnr_gt"] - cell["uniform"]["psnr_gt"]
                add("2", f"{budget} steps, 1/{round(1 / target)}: {each} dB to the teacher; auto's {pick} "
                    f"{gain:+.2f} dB over the peer", ">= 0.5 dB over the peer", gain >= 0.5, "peer_budgets.json")

    widths = load("frontier_latency_widths.json", "3", "1/10 widths shaped for the device")
    if widths is not None:
        for variant in ("auto", "uniform-latency"):
            r = _row(widths["rows"], 0.1, variant)
            if r is not None:
                add("3", f"1/10 {variant} ({r['strategy']}): {r['macs_reduction']:.2f}x, {r['delta_db']:+.2f} dB, "
                    f"onnxruntime speed-up / MACs reduction {r['ort_speedup_over_macs']:.2f} "
                    f"(paired {r['ort_speedup_paired'] / r['macs_reduction']:.2f})",
                    ">= 0.6 at 10x", r["ort_speedup_over_macs"] >= 0.6, "frontier_latency_widths.json")
    table_data = load("latency_table.json", "3", "latency model's error")
    if table_data is not None:
        add("3", f"latency model's error against whole networks (held out): mean "
            f"{table_data['held_out_mean_abs_error']:.1%}, max {table_data['held_out_max_abs_error']:.1%}",
            "stated", None, "latency_table.json")

    # each int8 route judged on its own: PTQ and QAT (image-facing convs in float) from quant_*x.json, QAT
    # with integer ends from quant_*x_int8_ends.json (its PTQ file is the one above: not repeated)
    for name, label, routes in (("quant_10x.json", "1/10", ("PTQ", "QAT")), ("quant_20x.json", "1/20", ("PTQ", "QAT")),
                                ("quant_10x_int8_ends.json", "1/10", ("QAT",)),
                                ("quant_20x_int8_ends.json", "1/20", ("QAT",))):
        q = load(name, "4", f"{label} int8" + (" (QAT with integer ends)" if "ends" in name else ""))
        if q is None:
            continue
        s = q["summary"]
        psnr = {r["name"]: r["psnr_to_gt"] for r in q["rows"]}
        ends = " with integer ends" if s.get("qat_int8_first_last_conv") else ""
        tags = {r: r + (ends if r == "QAT" else "") for r in routes}  # how each route is named in a row
        for route in routes:
            key = route.lower()
            if f"paired_int8_{key}_latency_over_fp32" not in s:
                continue
            ratio = s[f"paired_int8_{key}_latency_over_fp32"]
            db = psnr[f"student int8 {route}"] - psnr["student fp32"]
            add("4", f"{label} student, {tags[route]} int8 / fp32 latency {ratio:.2f}x paired, {db:+.2f} dB to ground truth",
                "<= 0.5x within 0.3 dB", ratio <= 0.5 and db >= -0.3, name)
        # the end-to-end figure of each route (older JSONs lack the QAT file's)
        for route in [r for r in routes if f"paired_teacher_fp32_over_int8_{r.lower()}" in s]:
            speedup = s[f"paired_teacher_fp32_over_int8_{route.lower()}"]
            e2e_db = psnr[f"student int8 {route}"] - psnr["teacher fp32"]
            add("4", f"{label} end to end: fp32 teacher / {tags[route]} int8 student {speedup:.1f}x paired, "
                f"{e2e_db:+.2f} dB to the teacher", ">= 15x within 0.5 dB", speedup >= 15 and e2e_db >= -0.5, name)
    ops = load("int8_ops.json", "4", "operators left in float")
    if ops is not None:
        for r in ops["rows"]:
            add("4", f"{r['network']}: int8 / fp32 {r['paired_int8_over_fp32']:.2f}x paired; float ops "
                + ", ".join(f"{k} x{v}" for k, v in sorted(r["int8_float_ops"].items())), "stated", None, "int8_ops.json")

    search = load("search.json", "5", "search throughput")
    if search is not None:
        for key, label in (("now", "1 process"), ("parallel", "2 processes")):
            r = search["rows"].get(key)
            if r is not None:
                same = search["same_choice"].get(key)
                add("5", f"search, {label}: {r['per_minute']:.0f} sub-networks / min, same winners as before: {same}",
                    ">= 1000 / min, winners unchanged", r["per_minute"] >= 1000 and bool(same), "search.json")

    scaling = load("scaling.json", "6", "scaling")
    if scaling is not None:
        fits = scaling["fits"]
        add("6", f"time per gated step ~ pixels^{fits['gated_time_vs_pixels_exponent']:.2f}, fine-tune step ~ "
            f"pixels^{fits['finetune_time_vs_pixels_exponent']:.2f}, peak memory ~ pixels^"
            f"{fits['peak_mb_vs_pixels_exponent']:.2f} ({fits['peak_mb_fixed']:.0f} MB fixed + "
            f"{fits['peak_mb_per_sample_at_128px']:.0f} MB per 128 px sample)", "stated", None, "scaling.json")

    table.sort(key=lambda r: r["item"])  # stable: within an item, the order measured
    print("| item | figure | target | status | source |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['item']} | {r['figure']} | {r['target']} | {r['status']} | {r['source']} |")
    return table


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join("benchmarks", "results", "all_rows"),
                    help="folder of the steps' JSONs (relative to the repository root)")
    ap.add_argument("--runs", default=os.path.join("runs", "all_rows"), help="the compress commands' folders")
    ap.add_argument("--instance", help="also the instance-norm teacher's 1/20 and 1/40 frontier (its .safetensors)")
    ap.add_argument("--peer-budgets", default=PEER_BUDGETS,
                    help="step 8's budgets (optimizer steps, comma-separated; 3000 adds ~30 min on 2 cores)")
    ap.add_argument("--report", action="store_true", help="no measurement: the table from the JSONs written")
    args = ap.parse_args(argv)
    os.makedirs(os.path.join(ROOT, args.results), exist_ok=True)
    if not args.report:
        for path, step in steps(args.results, args.runs, args.instance, args.peer_budgets):
            if os.path.exists(os.path.join(ROOT, path)):
                print(f"=== kept {path}", flush=True)
                continue
            _run(step)
    table = report(args.results, bool(args.instance))
    with open(os.path.join(ROOT, args.results, "summary.json"), "w") as f:
        json.dump({"rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
