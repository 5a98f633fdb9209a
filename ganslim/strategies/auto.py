"""``strategy="auto"``: pick the compression strategy that won the measured head-to-head.

``benchmarks/bench_peer.py --winners ganslim/assets/strategy_results.json`` writes the winners of
its strategies-against-the-trivial-peer grid on the default teacher: per MACs target, the best PSNR
to ground truth at the largest training budget measured there (ties within 0.05 dB broken by CPU
time); ``bench_strategies.py --winners`` can write a table of the same form from its rows. ``auto`` takes the winner at the measured
target nearest (in log scale) to the one asked for. The winners change with the training budget (at
1/10 of the default teacher the uniform peer wins after 12800 steps, the separable student after 3000,
and with kernel-alignment distillation after 1000): a table may hold winners measured at shorter
budgets too (``short_budgets``, written by ``bench_peer.py --short-winners``, since the tenth session
from the AMD EPYC's cells), and ``auto`` then reads the budget nearest (in log
scale) to the total optimizer steps it is given (compress: ``steps + finetune_steps``; a time budget
that cuts the fine-tune short is not known up front and does not count). A teacher with instance norm and no BatchNorm
gets the table ``bench_frontier.py --winners-from`` wrote from the instance-norm teacher's seeds
(``RESULTS_INSTANCE``): there the separable student beat the uniform peer at 1/10 and 1/20 in both
seeds and at 1/40, while one-step pruning had lost to the peer at 1/20 in every seed on an earlier teacher. Measured
on one task and machine: a default, not a law; pass ``strategy=`` explicitly to override.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Optional

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "assets" / "strategy_results.json"
# the same kind of table measured on a teacher with instance norm (CycleGAN's default) and no BatchNorm:
# ``bench_frontier.py --winners-from`` (seeds of ``--teacher runs/teacher_instance.safetensors``)
RESULTS_INSTANCE = RESULTS.with_name("strategy_results_instance.json")
FALLBACK = "uniform"  # the default strategy (CompressConfig.strategy)

# The variants the head-to-head measures: name -> CompressConfig settings.
VARIANTS = {
    "slim": {"strategy": "slim"},
    "onestep": {"strategy": "onestep"},
    "onestep+gka": {"strategy": "onestep", "distill_loss": "gka", "finetune_distill": True},
    "ofa": {"strategy": "ofa"},
    "evolve": {"strategy": "evolve"},
    "uniform": {"strategy": "uniform"},
    "uniform-scratch": {"strategy": "uniform", "uniform_init": "scratch"},
    "uniform-latency": {"strategy": "uniform", "uniform_widths": "latency"},
    "separable": {"strategy": "separable"},
    "onestep+reconstruct": {"strategy": "onestep", "reconstruct": True},
    "separable+reconstruct": {"strategy": "separable", "reconstruct": True},
    "separable+important": {"strategy": "separable", "separable_keep": "important"},
    "separable+gka": {"strategy": "separable", "distill_loss": "gka", "finetune_distill": True},
    "uniform+gka": {"strategy": "uniform", "distill_loss": "gka", "finetune_distill": True},
}


def takes_latency_target(variant: str) -> bool:
    """Whether the strategy of ``variant`` (a :data:`VARIANTS` name, or a strategy name) accepts
    ``target_latency_ms`` (``separable`` does not)."""
    from .base import get_strategy

    name = VARIANTS.get(variant, {"strategy": variant})["strategy"]
    try:
        return get_strategy(name).accepts_latency_target
    except ValueError:
        return True  # not a registered strategy: nothing known against it


def winners_from_rows(rows: list, tie_db: float = 0.05) -> dict:
    """From head-to-head rows (``target``, ``strategy`` = variant name, ``psnr_gt``, ``minutes``): per
    target the best PSNR (ties within ``tie_db`` go to the faster), and ``overall``: the variant with
    the best mean PSNR over the targets among those that accept a latency target (it is used when the
    target fraction is not known up front: a latency budget)."""
    winners = {}
    for target in sorted({r["target"] for r in rows}, reverse=True):
        cands = [r for r in rows if r["target"] == target]
        top = max(r["psnr_gt"] for r in cands)
        best = min((r for r in cands if r["psnr_gt"] >= top - tie_db), key=lambda r: r["minutes"])
        winners[str(target)] = {"variant": best["strategy"], "psnr_gt": best["psnr_gt"], "minutes": best["minutes"]}
    means = {}
    for r in rows:
        means.setdefault(r["strategy"], []).append(r["psnr_gt"])
    complete = {k: sum(v) / len(v) for k, v in means.items() if len(v) == len(winners) and takes_latency_target(k)}
    return {"winners": winners, "overall": max(complete, key=complete.get) if complete else None}


def write_table(table: dict, path) -> list[str]:
    """Write a table of the form ``choose_strategy`` reads (:func:`winners_from_rows`' ``winners`` and
    ``overall``, plus ``source`` and optionally ``task``) to ``path`` as JSON; returns one line per
    choice, for the writing script to print."""
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
    lines = [f"auto at {t}: {w['variant']} ({w['psnr_gt']:.2f} dB, {w['minutes']:.1f} min)"
             for t, w in table["winners"].items()]
    for b, v in sorted((table.get("short_budgets") or {}).items(), key=lambda kv: int(kv[0])):
        lines += [f"auto at {t} after about {b} steps: {w['variant']} ({w['psnr_gt']:.2f} dB, {w['minutes']:.1f} min)"
                  for t, w in v["winners"].items()]
    return lines + [f"auto without a MACs fraction (latency budget): {table['overall']}; wrote {path}"]


def instance_norm_only(model) -> bool:
    """Whether ``model`` normalises with instance norm and has no BatchNorm (CycleGAN's generators)."""
    import torch.nn as nn

    mods = list(model.modules())
    return (any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in mods)
            and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods))


def default_steps() -> int:
    """Total optimizer steps of a compress call with the default configuration (``steps + finetune_steps``,
    the demo's 12800): the budget ``auto`` is asked about when nothing is changed."""
    from ..config import CompressConfig

    d = CompressConfig()
    return d.steps + d.finetune_steps


def table_budget(table: dict) -> int:
    """Total optimizer steps of a table's main ``winners``: its ``budget``, else the demo's 12800 (the
    budget every table before ``budget`` was recorded was measured at: their ``source`` says so)."""
    return int(table["budget"]) if "budget" in table else default_steps()


def budget_winners(table: dict, steps: Optional[int]) -> tuple[dict, str, Optional[int]]:
    """``(winners, source, budget)`` of ``table`` at the measured budget nearest (log scale) to ``steps``
    (None: the main, longest one). ``short_budgets`` maps a budget (steps) to ``{"winners", "source"}``."""
    main = (table["winners"], table.get("source", "bench_strategies.py"), None)
    short = table.get("short_budgets") or {}
    if steps is None or steps <= 0 or not short:
        return main
    budgets = {table_budget(table): main}
    budgets.update({int(b): (v["winners"], v.get("source", "bench_peer.py"), int(b)) for b, v in short.items()})
    near = min(budgets, key=lambda b: (abs(math.log(b) - math.log(steps)), -b))
    return budgets[near]


def choose_strategy(target_macs: Optional[float], results: Optional[pathlib.Path] = None,
                    teacher=None, steps: Optional[int] = None) -> tuple[dict, str]:
    """``(CompressConfig settings, reason)`` of :func:`choose_variant`'s pick: ``VARIANTS[name]``."""
    name, why = choose_variant(target_macs, results, teacher, steps)
    return dict(VARIANTS[name]), why


def choose_variant(target_macs: Optional[float], results: Optional[pathlib.Path] = None,
                   teacher=None, steps: Optional[int] = None) -> tuple[str, str]:
    """``(variant, reason)``: the :data:`VARIANTS` name of the measured winner for a MACs target given as a
    fraction of the teacher (None: latency target or absolute MACs, where the fraction is not known
    up front -> the variant with the best mean fidelity over the measured targets). ``results``: the
    table (default: ``RESULTS_INSTANCE`` for a ``teacher`` with instance norm and no BatchNorm, where
    the separable student wins at 1/10, 1/20 and 1/40 and the default task's winner at 1/20, one-step
    pruning, lost to the uniform peer in every seed;
    ``RESULTS`` otherwise). ``steps``: the total optimizer steps the compression will run: the winners
    of the table's measured budget nearest to it (:func:`budget_winners`; None: the longest)."""
    if results is None:
        results = RESULTS_INSTANCE if (teacher is not None and instance_norm_only(teacher)
                                       and RESULTS_INSTANCE.exists()) else RESULTS
    try:
        table = json.loads(pathlib.Path(results).read_text())
        main = {float(k): v for k, v in table["winners"].items()}
        winners, src, budget = budget_winners(table, steps)
        winners = {float(k): v for k, v in winners.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return FALLBACK, f"no measured head-to-head at {results}; {FALLBACK} is the default"
    if not main:
        return FALLBACK, f"the head-to-head at {results} has no winners; {FALLBACK} is the default"
    if target_macs is None or not 0 < target_macs <= 1:
        best = table.get("overall") or main[min(main)]["variant"]
        if best not in VARIANTS or not takes_latency_target(best):  # a table written before the check
            return FALLBACK, (f"the head-to-head at {results} names no strategy for a latency "
                              f"budget; {FALLBACK} is the default")
        return best, (f"{best}: best mean fidelity over the measured targets "
                      f"({table.get('source', 'bench_strategies.py')})")
    near = min(main, key=lambda t: abs(math.log(t) - math.log(target_macs)))
    if near not in winners:  # that budget was not measured near this target: the main table decides
        winners, src, budget = main, table.get("source", "bench_strategies.py"), None
    w = winners[near]
    task = table.get("task", "the default task")
    at = f" after {budget} steps (the measured budget nearest to {steps})" if budget is not None else ""
    return w["variant"], (f"{w['variant']} won at target {near:g}{at} on {task} "
                          f"({w['psnr_gt']:.2f} dB to ground truth, {w['minutes']:.1f} min; {src})")
