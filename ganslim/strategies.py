"""``strategy="auto"``: pick the compression strategy that won the measured head-to-head.

``benchmarks/bench_strategies.py`` runs every strategy on the default teacher at several MACs
targets and writes the winners (best PSNR to ground truth after the same fine-tune, ties broken by
CPU time) to ``ganslim/assets/strategy_results.json``. ``auto`` takes the winner at the measured
target nearest (in log scale) to the one asked for. Measured on one task and machine: a default,
not a law; pass ``strategy=`` explicitly to override.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Optional

RESULTS = pathlib.Path(__file__).parent / "assets" / "strategy_results.json"
FALLBACK = "slim"


def choose_strategy(target_macs: Optional[float], results: pathlib.Path = RESULTS) -> tuple[str, str]:
    """``(strategy, reason)`` for a MACs target given as a fraction of the teacher (None: latency
    target or absolute MACs, where the fraction is not known up front -> the overall winner)."""
    try:
        table = json.loads(pathlib.Path(results).read_text())
        winners = {float(k): v for k, v in table["winners"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return FALLBACK, f"no measured head-to-head at {results}; {FALLBACK} is the default"
    if not winners:
        return FALLBACK, f"the head-to-head at {results} has no winners; {FALLBACK} is the default"
    if target_macs is None or not 0 < target_macs <= 1:
        best = table.get("overall") or winners[min(winners)]["strategy"]
        return best, f"overall winner of the measured head-to-head ({table.get('source', 'bench_strategies.py')})"
    near = min(winners, key=lambda t: abs(math.log(t) - math.log(target_macs)))
    w = winners[near]
    return w["strategy"], (f"won at target {near:g} on the default task ({w['psnr_gt']:.2f} dB to ground truth, "
                           f"{w['minutes']:.1f} min; {table.get('source', 'bench_strategies.py')})")
