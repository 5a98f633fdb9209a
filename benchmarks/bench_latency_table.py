"""A measured latency model of this device against whole-network timings, and channels chosen with it
(``strategy="halp"``, ``uniform_widths="latency"``) against the uniform peer at equal latency and at equal MACs.

    python benchmarks/bench_latency_table.py                          # onnxruntime, 2 threads, 256x384
    python benchmarks/bench_latency_table.py --runtime eager --finetune-steps 0

1. The per-layer table (:mod:`ganslim.measure.latency_table`) is timed for the default teacher's
   convolutions on the held-out photo (1x3x256x384), cached per device; its build time is printed.
2. The table's scale and the remainder are fitted on four whole networks (uniform cuts at 1, 1/2, 1/4
   of the widths and the uniform cut at the MACs target, the peer); the model's error is then given on networks it was not
   fitted on: other uniform cuts, CAT's one-step masks, random widths and halp's own choices.
3. halp at the peer's latency (more MACs for the same time) and halp at the peer's MACs (found by
   bisection on the latency budget: less time for the same MACs), each exported and timed in the
   runtime beside the teacher. The speed-up / MACs reduction ratio is the issue's measure (>= 0.6).
4. The peer's widths moved by ``uniform_widths="latency"`` (:mod:`ganslim.pruning.latency_widths`:
   nearby widths ranked by the table, the best few timed whole, MACs within 85-100% of the peer's).
5. With ``--finetune-steps N`` both halp students, the latency-shaped widths and the peer are
   fine-tuned by ``compress`` (the default recipe, N steps) and their PSNR to ground truth is given:
   does the latency-shaped student keep the fidelity?

Latencies are the fastest pass (the table's convention) over 4 interleaved rounds of fresh sessions
(3 passes each), the whole run in one process. The fine-tuned students' latencies are timed after
their training, one after the other: on a shared machine read them beside the interleaved rows.
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
from ganslim.core.gating import MacsModel  # noqa: E402
from ganslim.core.targeting import find_channel_groups  # noqa: E402
from ganslim.measure.latency_table import LatencyModel, LatencyTable, runtime_ms  # noqa: E402
from ganslim.pruning.latency_select import latency_masks  # noqa: E402
from ganslim.pruning.latency_widths import latency_widths, leading_masks  # noqa: E402
from ganslim.pruning.onestep import onestep_masks  # noqa: E402
from ganslim.pruning.uniform import uniform_alive, uniform_masks  # noqa: E402
from ganslim.strategies.halp import FIT_RATIOS, measured_ms  # noqa: E402

ROUNDS = 4  # interleaved timing rounds (fresh sessions each)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "eager"))
    ap.add_argument("--target", type=float, default=0.1, help="MACs fraction of the peer")
    ap.add_argument("--step", type=int, default=8, help="channels per greedy move")
    ap.add_argument("--table", help="latency table cache (default: ~/.cache/ganslim/latency/<device>.json)")
    ap.add_argument("--finetune-steps", type=int, default=3000)
    ap.add_argument("--out", default="benchmarks/results/latency_table.json")
    args = ap.parse_args()

    threads = torch.get_num_threads()
    teacher = data.default_teacher().eval()
    pairs = data.test_pairs()
    (x_eval, _), = pairs
    stat = (x_eval,)
    example = (torch.zeros(1, 3, 64, 64),)
    targets = find_channel_groups(teacher, example)
    macs_model = MacsModel(teacher, targets, measure.macs_by_module(teacher, example, "papers"))
    total = macs_model.total
    t0 = time.time()
    table = LatencyTable(runtime=args.runtime, threads=threads, path=args.table)
    cached = len(table)
    model = LatencyModel(teacher, targets, stat, table, macs_model=macs_model)

    def timed_all(nets: list) -> list[float]:
        """Fastest pass of each pruned network over ROUNDS interleaved rounds, each round a fresh
        session per network: on this shared machine a session's speed can differ by 30% from the next
        one's, so networks timed one after the other are not comparable."""
        best = [float("inf")] * len(nets)
        for _ in range(ROUNDS):
            for i, alive in enumerate(nets):
                best[i] = min(best[i], measured_ms(teacher, targets, alive, example, stat, args.runtime, threads,
                                                   repeats=3))
        return best

    full = [torch.ones(g.size, dtype=torch.bool) for g in targets.groups]
    peer, _ = uniform_masks(targets, macs_model, args.target * total)
    fit_nets = [(f"uniform {r:g} of the widths", uniform_alive(targets.groups, r)) for r in FIT_RATIOS]
    fit_nets.append((f"uniform at 1/{1 / args.target:g} MACs (the peer)", peer))
    fit = list(zip([a for _, a in fit_nets], timed_all([a for _, a in fit_nets])))
    model.conv_ms(full)
    scale, c0, c1 = model.fit(fit)
    build_s = time.time() - t0
    print(f"table: {len(table)} entries ({cached} cached, {table.timed} timed), fit {scale:.2f} x table + {c0:.2f} + {c1:.2f} x f ms; "
          f"{build_s:.0f} s", flush=True)
    teacher_ms = fit[0][1]

    gen = torch.Generator().manual_seed(0)
    held = [(f"uniform at 1/{1 / t:g} MACs", uniform_masks(targets, macs_model, t * total)[0]) for t in (0.2, 0.05, 0.025)]
    held += [(f"onestep at 1/{1 / t:g} MACs", onestep_masks(teacher, targets, macs_model, t * total)) for t in (0.1, 0.05)]
    for i in range(3):
        ratios = torch.rand(len(targets.groups), generator=gen) * 0.8 + 0.15
        held.append((f"random widths #{i + 1}",
                     [torch.arange(g.size) < max(2, round(g.size * float(r))) for g, r in zip(targets.groups, ratios)]))

    peer_pred = model.predict(peer)
    t1 = time.time()
    halp_lat = latency_masks(teacher, targets, model, peer_pred, step=args.step)
    select_s = time.time() - t1
    # halp at the peer's MACs: the latency budget whose selection has the peer's MACs (bisection)
    lo, hi = model.predict([torch.arange(g.size) < max(2, -(-g.size // 8)) for g in targets.groups]), peer_pred
    halp_macs = None
    for _ in range(12):
        mid = (lo + hi) / 2
        sel = latency_masks(teacher, targets, model, mid, step=args.step)
        if macs_model.macs(sel) <= args.target * total:
            halp_macs, lo = sel, mid
        else:
            hi = mid
    held += [("halp at the peer's latency", halp_lat), ("halp at the peer's MACs", halp_macs)]
    # the peer's widths moved to where this device is fast, within 85-100% of its MACs budget
    t3 = time.time()
    shaped = latency_widths(targets.groups, macs_model, [int(a.sum()) for a in peer], args.target * total,
                            lambda a: measured_ms(teacher, targets, a, example, stat, args.runtime, threads, repeats=3),
                            model.predict)
    shape_s = time.time() - t3
    held.append(("uniform_widths='latency'", leading_masks(targets.groups, shaped.counts)))
    rows = []
    # every network timed again, interleaved with the teacher (the speed-ups' reference) in one set of rounds
    measured = timed_all([a for _, a in fit_nets + held])
    teacher_ms = measured[0]
    for (name, alive), ms in zip(fit_nets + held, measured):
        pred = model.predict(alive)
        rows.append({"network": name, "fitted": any(a is alive for _, a in fit_nets),
                     "macs_reduction": total / macs_model.macs(alive), "measured_ms": ms, "predicted_ms": pred,
                     "error": pred / ms - 1, "speedup": teacher_ms / ms,
                     "widths": [int(a.sum()) for a in alive]})
        r = rows[-1]
        print(f"{name:34s} {r['macs_reduction']:6.2f}x MACs  measured {ms:7.2f} ms  predicted {pred:7.2f} ms "
              f"({r['error']:+.1%})  speed-up {r['speedup']:.2f}x (/ MACs {r['speedup'] / r['macs_reduction']:.2f})",
              flush=True)
    table.save()
    held_err = [abs(r["error"]) for r in rows if not r["fitted"]]

    trained = []
    if args.finetune_steps > 0:
        loader = data.default_loader(batch_size=8, crop=64, length=(args.finetune_steps + 16) * 8, seed=0, teacher=teacher)
        t_psnr = measure.fidelity_to_target(teacher, pairs)["psnr"]
        for name, kw in (("uniform (the peer)", dict(strategy="uniform", target_macs=args.target)),
                         ("halp at the peer's latency", dict(strategy="halp", target_macs=args.target)),
                         ("halp at the peer's MACs", dict(strategy="halp", target_latency_ms=None)),
                         ("uniform_widths='latency'", dict(strategy="uniform", uniform_widths="latency",
                                                           target_macs=args.target))):
            if name == "halp at the peer's MACs":
                # the budget found above, in the model's units (compress re-fits the same model)
                kw = dict(strategy="halp", target_latency_ms=model.predict(halp_macs))
            t2 = time.time()
            res = compress(teacher, teacher, loader, finetune_steps=args.finetune_steps, eval_inputs=pairs,
                           measure_latency=False, progress=False, latency_runtime=args.runtime, latency_step=args.step,
                           latency_table=str(table.path), **kw)
            minutes = (time.time() - t2) / 60
            ms = runtime_ms(res.model, stat, args.runtime, threads)  # one after the other: see the docstring
            st = res.report.student
            trained.append({"student": name, "macs_reduction": res.report.teacher.macs / st.macs, "psnr_gt": st.psnr_to_gt,
                            "vs_teacher_db": st.psnr_to_gt - t_psnr, "measured_ms": ms, "speedup": teacher_ms / ms,
                            "minutes": minutes, "widths": {k: v[0] for k, v in res.report.widths.items()}})
            r = trained[-1]
            print(f"[{name}] {r['macs_reduction']:.2f}x MACs, {ms:.1f} ms ({r['speedup']:.2f}x, / MACs "
                  f"{r['speedup'] / r['macs_reduction']:.2f}), PSNR-GT {r['psnr_gt']:.2f} dB ({r['vs_teacher_db']:+.2f}), "
                  f"{minutes:.1f} min", flush=True)

    out = {"machine": describe_machine(threads, onnxruntime=args.runtime == "onnxruntime"),
           "runtime": args.runtime, "fingerprint": table.fingerprint, "input": list(x_eval.shape), "target": args.target,
           "table_entries": len(table), "table_timed": table.timed, "build_seconds": build_s, "select_seconds": select_s,
           "shape_seconds": shape_s, "shape_timed": shaped.timed,
           "table_scale": scale, "remainder_ms": [c0, c1], "teacher_ms": teacher_ms, "rows": rows, "trained": trained,
           "held_out_mean_abs_error": sum(held_err) / len(held_err), "held_out_max_abs_error": max(held_err)}
    from ganslim.measure.report import write_json

    write_json(out, args.out)
    print(f"held-out error of the latency model: mean {out['held_out_mean_abs_error']:.1%}, max "
          f"{out['held_out_max_abs_error']:.1%} over {len(held_err)} networks; wrote {args.out}")
    print(json.dumps({"table": str(table.path)}))


if __name__ == "__main__":
    main()
