"""A wall-clock budget for one ``compress`` call (``CompressConfig.time_budget_min``).

Steps are the unit of every schedule (the cosine decay, the weight average's horizon), but a user
with a machine for 15 minutes wants the best student those 15 minutes buy. So, just before the
fine-tune, compress times a few fine-tune steps of the real student on the real data (then puts back
everything those steps changed: weights, buffers, random states), and runs ``finetune_steps`` steps
or as many as fit in what is left of the budget, whichever is fewer. The schedule is built for that
number of steps; while it runs, :class:`Deadline` re-fits the number from the fine-tune's own pace a
few times (a short burst misjudged a long run's pace by 10-20% here), and the cosine decay and the weight
average's horizon follow. A resumed run reads the number its first part ended with (it is saved
beside the other checkpoints) and keeps it.

What the budget covers: everything compress does up to and including the fine-tune and its report
(the teacher's report is timed before the fine-tune; the student's, on a smaller network, is
assumed to cost no more). Not covered: quantization-aware training (``quant="int8"``) and its
deployment check, which come after.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..measure.report import write_json
from . import distributed as dist

__all__ = ["BudgetFit", "Deadline", "fit_steps", "time_steps", "preserved_state", "agree_on_steps",
           "process_age_s", "load_fit", "save_fit"]


@dataclass
class BudgetFit:
    """The fine-tune fitted into a budget: ``steps`` (<= ``requested``) at ``step_ms`` milliseconds per
    step, measured with ``left_s`` seconds of ``budget_s`` left and ``tail_s`` kept for the report."""

    steps: int
    requested: int
    step_ms: float
    budget_s: float
    left_s: float
    tail_s: float
    run_step_ms: Optional[float] = None  # the fine-tune's own pace at its last re-fit (Deadline)

    @property
    def binding(self) -> bool:
        """Whether the budget cut the fine-tune short."""
        return self.steps < self.requested

    def note(self) -> str:
        pace = f"{self.step_ms:.1f} ms per step timed"
        if self.run_step_ms is not None:
            pace += f", {self.run_step_ms:.1f} while running"
        head = f"time budget {self.budget_s / 60:g} min: "
        if not self.binding:
            return head + f"all {self.requested} fine-tune steps fit ({pace}; {self.left_s / 60:.1f} min left for them)"
        return (head + f"{self.steps} of {self.requested} fine-tune steps ({pace}; {self.left_s / 60:.1f} min left "
                f"after the first stage, {self.tail_s:.0f} s kept for the report)")


def fit_steps(budget_s: float, elapsed_s: float, step_s: float, tail_s: float, requested: int) -> int:
    """Steps of ``step_s`` seconds that fit in ``budget_s - elapsed_s - tail_s`` seconds, at most
    ``requested``, at least 0."""
    if not step_s > 0:
        raise ValueError(f"a step must take a positive time, got {step_s} s")
    left = budget_s - elapsed_s - tail_s
    return max(0, min(int(requested), int(math.floor(left / step_s)))) if left > 0 else 0


def time_steps(run: Callable[[int, Callable], None], steps: int = 20, skip: int = 5) -> tuple[float, float]:
    """``(seconds per step, seconds of overhead)`` of ``run(steps, callback)``, which must call
    ``callback()`` once after each step: the median step after the first ``skip`` (allocations,
    first-call kernel choices), and what the whole run took beyond ``steps`` such steps (set-up,
    layout conversion, the slower first steps), which a longer run pays once too."""
    if steps <= skip:
        raise ValueError(f"time more steps ({steps}) than are skipped ({skip})")
    stamps: list[float] = []
    start = time.perf_counter()
    run(steps, lambda *_: stamps.append(time.perf_counter()))
    if len(stamps) != steps:
        raise RuntimeError(f"the timed run reported {len(stamps)} of {steps} steps")
    total = time.perf_counter() - start
    gaps = [b - a for a, b in zip([start] + stamps[:-1], stamps)][skip:]
    step = float(sum(gaps) / len(gaps))
    return step, max(0.0, total - steps * step)


class preserved_state:
    """Context manager: on exit, ``modules``' states (parameters and buffers, by value) and the
    torch, Python and NumPy random states are what they were on entry, so steps taken inside leave
    no trace. Parameter objects are kept (an optimizer built on them stays valid)."""

    def __init__(self, modules: Iterable[Optional[nn.Module]]):
        self.modules = [m for m in modules if isinstance(m, nn.Module)]

    def __enter__(self):
        self.saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]
        self.rng = (torch.get_rng_state(), random.getstate())
        try:
            import numpy as np

            self.np_rng = np.random.get_state()
        except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
            self.np_rng = None
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, sd in zip(self.modules, self.saved):
                m.load_state_dict(sd)
        torch.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        if self.np_rng is not None:
            import numpy as np

            np.random.set_state(self.np_rng)
        return False


class Deadline:
    """Keeps a running fine-tune inside its budget: a short burst of timed steps misjudges a long
    run's pace by 10-20% on a shared CPU (seen: 66 ms per step timed, 75 ms run), so at the
    ``refit_at`` fractions of its planned steps the fine-tune's own mean step time so far re-fits the
    total (seen: 84 ms per step over the first 30% of a 3-minute run timed at 70 ms). Mostly early, so
    the schedule bends little: at 10% of a cosine decay the learning rate is within 1% of the same
    step's in a schedule 10% shorter or longer. A pace that slows late is caught by the later re-fits,
    which take the slower of the mean pace since the first step and the pace since the previous re-fit
    (seen: a 15-minute run re-fitted at 60% on its mean pace ended 7 s over its budget).

    Call it after each step with ``(step, planned total)``; it returns the total to run, between the
    current step and ``fit.requested``. ``fit`` is updated (and saved to ``record``) on each re-fit."""

    def __init__(self, end_time: float, tail_s: float, fit: BudgetFit, record: Optional[str] = None,
                 refit_at: tuple = (0.1, 0.3, 0.6, 0.85)):
        self.end_time, self.tail_s, self.fit, self.record = end_time, tail_s, fit, record
        self.refit_at = sorted(refit_at)
        self.first: Optional[tuple[int, float]] = None  # (step, time) after the first step: set-up excluded
        self.last: Optional[tuple[int, float]] = None  # (step, time) of the previous re-fit (at first: self.first)
        self.refits: list[tuple[int, int, float]] = []  # (at step, new total, ms per step)

    def __call__(self, step: int, total: int) -> int:
        now = time.perf_counter()
        if self.first is None:
            self.first = self.last = (step, now)
            return total
        if not self.refit_at or step < self.refit_at[0] * total or step <= self.first[0]:
            return total
        self.refit_at.pop(0)
        # the mean pace since the first step, or the pace since the previous re-fit where that is slower
        # (a re-fit pops its fraction, so each comes at least one step after the last)
        step_s = max((now - self.first[1]) / (step - self.first[0]), (now - self.last[1]) / (step - self.last[0]))
        self.last = (step, now)
        left = self.end_time - time.time() - self.tail_s
        new = agree_on_steps(step + max(0, min(self.fit.requested - step, int(math.floor(left / step_s)))))
        self.refits.append((step, new, step_s * 1e3))
        self.fit.steps, self.fit.run_step_ms = new, step_s * 1e3
        save_fit(self.record, self.fit)
        return new


def process_age_s() -> float:
    """Seconds since this process started (Linux: ``/proc``; 0.0 where that cannot be read), so a
    command's budget counts its start-up (imports, loading the teacher, preparing the data) too."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def agree_on_steps(steps: int) -> int:
    """Under torchrun: the fewest steps any rank fitted (every rank must run the same number)."""
    if not dist.is_distributed():
        return steps
    t = torch.tensor([float(steps)], device=dist.collective_device("cpu"))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def save_fit(path: Optional[str], fit: BudgetFit) -> None:
    """Record ``fit`` beside the checkpoints (rank 0), so a resumed run keeps its schedule."""
    if path and dist.is_main():
        write_json(asdict(fit), path)


def load_fit(path: Optional[str], requested: int) -> Optional[BudgetFit]:
    """The fit an interrupted run recorded at ``path`` (None without one); an error when it was made
    for another number of requested steps."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            fit = BudgetFit(**json.load(f))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable time-budget record ({e}); delete it to fit the budget afresh") from None
    if fit.requested != requested:
        raise ValueError(f"{path} fitted {fit.requested} fine-tune steps into the budget, this run asks for "
                         f"{requested}; use another checkpoint_dir or delete it")
    return fit
