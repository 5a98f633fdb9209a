"""A wall-clock budget for compress (``time_budget_min``, ganslim.core.budget): the fit, the timer,
the timed steps leaving no trace, the deadline that re-fits a running fine-tune, resume, and the
budget on every reference generator of the field.

Decisions taken from timings are tested on fake clocks (exact numbers); the real timer's part is
only that a budget that does not bind changes nothing."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn as nn

import ganslim
from ganslim import data
from ganslim.core import budget
from ganslim.core.budget import BudgetFit, Deadline, fit_steps, preserved_state, time_steps
from ganslim.core.train import DistillTrainer, LossWeights
from ganslim.zoo import create_model
from test_targets_per_generator import GENERATORS, _teacher_and_loader
from trained import briefly_trained

FAST = dict(strategy="uniform", target_macs=0.3, progress=False, measure_latency=False)


@pytest.fixture(scope="module")
def loader():
    return data.default_loader(batch_size=2, crop=32, length=64)


@pytest.fixture(scope="module")
def small_teacher(loader):
    return briefly_trained(lambda: create_model("resnet_6blocks", ngf=8, norm="batch"), loader)


class FakeClock:
    """``time.perf_counter`` / ``time.time`` of a machine where only ``advance`` moves time."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_fit_steps_is_what_fits_after_the_elapsed_time_and_the_tail_capped_at_the_request():
    assert fit_steps(900, elapsed_s=60, step_s=0.08, tail_s=10, requested=12000) == 10375  # 830 s / 80 ms
    assert fit_steps(900, elapsed_s=60, step_s=0.05, tail_s=10, requested=12000) == 12000  # 16600 fit: capped
    assert fit_steps(100, elapsed_s=95, step_s=0.5, tail_s=10, requested=50) == 0  # the first stage took it all
    with pytest.raises(ValueError, match="positive"):
        fit_steps(100, 0, 0.0, 0, 10)


def test_the_timer_leaves_out_the_first_steps_and_counts_the_rest_as_overhead(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    pace = [0.5, 0.2] + [0.1] * 8  # set-up and a slow first steps, then 100 ms steps

    def run(n, callback):
        for i in range(n):
            clock.advance(pace[i])
            callback()

    step_s, overhead_s = time_steps(run, steps=10, skip=2)
    assert step_s == pytest.approx(0.1)
    assert overhead_s == pytest.approx(1.5 - 10 * 0.1)  # what the whole run took beyond 10 such steps
    with pytest.raises(RuntimeError, match="3 of 10"):
        time_steps(lambda n, cb: [cb() for _ in range(3)], steps=10, skip=2)


def test_steps_taken_inside_preserved_state_leave_weights_buffers_and_random_states_as_they_were():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    params = list(net.parameters())
    before = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state(), random.getstate()
    with preserved_state([net, None]):
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(3):
            loss = net(torch.randn(2, 3, 8, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        random.random()
        assert not torch.equal(net[0].weight, before["0.weight"])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics and counter included
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert all(a is b for a, b in zip(params, net.parameters()))  # the same Parameter objects


def _fit(steps: int, requested: int) -> BudgetFit:
    return BudgetFit(steps=steps, requested=requested, step_ms=100.0, budget_s=100.0, left_s=90.0, tail_s=5.0)


def test_the_deadline_refits_the_total_from_the_runs_own_pace(monkeypatch, tmp_path):
    clock = FakeClock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    monkeypatch.setattr(budget.time, "time", clock)
    record = str(tmp_path / "time_budget.json")
    # planned 400 steps of 100 ms in 45 s left + 5 s of tail; the run goes at 200 ms per step
    fit = _fit(400, 1000)
    deadline = Deadline(end_time=clock() + 50.0, tail_s=5.0, fit=fit, record=record)
    total, step = 400, 0
    while step < total:
        clock.advance(0.2)
        step += 1
        total = deadline(step, total)
    # at 10% (step 40): 8 s gone, 37 s left at 200 ms -> 40 + 185 steps (184 by a rounding of the floats)
    at, new_total, ms = deadline.refits[0]
    assert at == 40 and new_total in (224, 225) and ms == pytest.approx(200.0)
    assert step == total and abs(total * 0.2 - 45.0) <= 0.4  # ends on the budget, within two steps
    assert fit.steps == total and fit.run_step_ms == pytest.approx(200.0)
    assert json.load(open(record))["steps"] == total  # a resumed run keeps the last plan
    # a run faster than planned may grow, never beyond what was asked for
    fast = Deadline(end_time=clock() + 50.0, tail_s=5.0, fit=_fit(100, 120))
    total, step = 100, 0
    while step < total:
        clock.advance(0.01)
        step += 1
        total = fast(step, total)
    assert total == 120


def test_a_pace_that_slows_late_still_ends_near_the_budget(monkeypatch):
    """The run keeps its planned 100 ms per step for 75% of its steps, then slows to 150 ms. The re-fits
    on the mean pace alone (10/30/60%, as before) let it run all 400 steps, 5 s over; the re-fit at 85%
    on the pace since the previous re-fit ends it within a second of the budget."""
    clock = FakeClock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    monkeypatch.setattr(budget.time, "time", clock)

    def run(**kw) -> tuple:
        start = clock()
        deadline = Deadline(end_time=start + 45.0, tail_s=5.0, fit=_fit(400, 400), **kw)
        total, step = 400, 0
        while step < total:
            clock.advance(0.1 if step < 300 else 0.15)
            step += 1
            total = deadline(step, total)
        return total, clock() - start, deadline

    total, elapsed, deadline = run()
    assert [at for at, _, _ in deadline.refits] == [40, 120, 240, 340] and total < 400
    # at 85%: 120 ms per step since the re-fit at 60% (the mean since the start: 106 ms)
    assert deadline.refits[-1][2] == pytest.approx(120.0)
    assert elapsed <= 40.0 + 1.0  # the 40 s before the tail, within a second
    old_total, old_elapsed, _ = run(refit_at=(0.1, 0.3, 0.6))
    assert old_total == 400 and old_elapsed >= 44.9


def test_the_trainer_stops_where_the_deadline_moves_the_end_and_checkpoints_there(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    tr = DistillTrainer(net, nn.Identity(), [{"params": list(net.parameters()), "lr": 1e-3}], LossWeights(gt=0))
    tr.after_step.append(lambda t: setattr(t, "total_steps", 7) if t.state.step == 3 else None)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    ckpt = str(tmp_path / "ft.pt")
    tr.run(batches, 20, progress=False, checkpoint=ckpt, checkpoint_every=100)
    assert tr.state.step == 7
    assert torch.load(ckpt, weights_only=False)["step"] == 7  # the end is checkpointed at the moved end


def test_a_budget_that_binds_cuts_the_finetune_and_the_report_says_what_ran(small_teacher, loader, monkeypatch):
    # the timed steps claim 10 s each: 60 s of budget fit a handful; the deadline then sees the real
    # pace (milliseconds here) and lets the run grow back towards the request, never past it
    monkeypatch.setattr(budget, "time_steps", lambda run, steps=20, skip=5: (10.0, 0.0))
    seen = []
    res = ganslim.compress(small_teacher, small_teacher, loader, finetune_steps=40, time_budget_min=1.0,
                           callbacks=[lambda tr, losses: seen.append(tr.state.step)], **FAST)
    rep = res.report
    assert 1 <= len(seen) <= 40 and seen == list(range(1, len(seen) + 1))
    assert rep.finetune_steps == len(seen) == res.config.finetune_steps
    note = next(n for n in rep.notes if n.startswith("time budget 1 min"))
    assert "10000.0 ms per step timed" in note
    # without the deadline's re-fit, the fake pace alone would have allowed at most 5 steps
    assert len(seen) > 5


def test_a_budget_that_does_not_bind_changes_nothing(small_teacher, loader):
    # the timed steps are undone (weights, BatchNorm statistics, random states): the same student
    plain = ganslim.compress(small_teacher, small_teacher, loader, finetune_steps=8, **FAST)
    budgeted = ganslim.compress(small_teacher, small_teacher, loader, finetune_steps=8, time_budget_min=30, **FAST)
    a, b = plain.model.state_dict(), budgeted.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert budgeted.report.finetune_steps == 8
    assert any(n.startswith("time budget 30 min: all 8 fine-tune steps fit") for n in budgeted.report.notes)


def test_a_resumed_budgeted_run_keeps_its_recorded_plan(small_teacher, loader, tmp_path, monkeypatch):
    ckpt = str(tmp_path / "run")
    first = ganslim.compress(small_teacher, small_teacher, loader, finetune_steps=6, time_budget_min=30,
                             checkpoint_dir=ckpt, **FAST)
    rec = json.load(open(tmp_path / "run" / "time_budget.json"))
    assert rec["steps"] == 6 and rec["requested"] == 6

    def no_timing(*a, **k):
        raise AssertionError("a resumed run must not time steps again")

    monkeypatch.setattr(budget, "time_steps", no_timing)
    again = ganslim.compress(small_teacher, small_teacher, loader, finetune_steps=6, time_budget_min=30,
                             checkpoint_dir=ckpt, **FAST)
    a, b = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="fitted 6 fine-tune steps"):
        ganslim.compress(small_teacher, small_teacher, loader, finetune_steps=9, time_budget_min=30,
                         checkpoint_dir=ckpt, **FAST)
    # a fine-tune checkpoint without a budget record: started without a budget
    (tmp_path / "run" / "time_budget.json").unlink()
    with pytest.raises(ValueError, match="started without a time budget"):
        ganslim.compress(small_teacher, small_teacher, loader, finetune_steps=6, time_budget_min=30,
                         checkpoint_dir=ckpt, **FAST)
    (tmp_path / "run" / "time_budget.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable time-budget record"):
        ganslim.compress(small_teacher, small_teacher, loader, finetune_steps=6, time_budget_min=30,
                         checkpoint_dir=ckpt, **FAST)


def test_a_non_positive_budget_is_refused():
    with pytest.raises(ValueError, match="time_budget_min must be > 0"):
        ganslim.CompressConfig(time_budget_min=0).validate()


@pytest.mark.slow
@pytest.mark.parametrize("generator", list(GENERATORS))
def test_a_budget_that_does_not_bind_changes_nothing_on_every_generator(generator):
    # batch norm and instance norm (affine or not), U-Net, SPADE, CartoonGAN; the separable student
    # (channels-last training) on the ResNets
    teacher, train = _teacher_and_loader(generator)
    strategy = "separable" if generator.startswith("resnet9") else "uniform"
    common = dict(strategy=strategy, target_macs=0.2, finetune_steps=4, progress=False, measure_latency=False)
    plain = ganslim.compress(teacher, teacher, train, **common)
    budgeted = ganslim.compress(teacher, teacher, train, time_budget_min=60, **common)
    a, b = plain.model.state_dict(), budgeted.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), generator
    assert budgeted.report.finetune_steps == 4
