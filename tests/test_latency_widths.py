"""Widths shaped for the device (``ganslim.pruning.latency_widths``, ``uniform_widths="latency"``).

The search's logic is tested on a device whose time is known exactly (convolutions in blocks of 16
channels, the staircase of onnxruntime's blocked kernels), so the assertions do not depend on this
machine's timing noise; the real timers run through ``compress`` on every reference generator."""
from __future__ import annotations

import math

import pytest
import torch

import ganslim
from ganslim import measure
from ganslim.core.gating import MacsModel
from ganslim.core.targeting import find_channel_groups
from ganslim.measure.latency_table import LatencyModel
from ganslim.pruning.latency_widths import _options, candidate_widths, latency_widths, leading_masks, like_groups
from ganslim.pruning.onestep import onestep_prune
from ganslim.pruning.uniform import uniform_masks
from ganslim.zoo import create_model

from test_latency_table import StaircaseTable
from test_targets_per_generator import GENERATORS, TARGET, _teacher_and_loader


def _resnet(tmp_path, ngf=32, size=32):
    torch.manual_seed(0)
    net = create_model("resnet_9blocks", ngf=ngf, norm="batch").eval()
    x = (torch.randn(1, 3, size, size),)
    targets = find_channel_groups(net, x)
    mm = MacsModel(net, targets, measure.macs_by_module(net, x, "papers"))
    model = LatencyModel(net, targets, x, StaircaseTable(runtime="eager", path=tmp_path / "t.json"), macs_model=mm)
    return net, x, targets, mm, model


def _counts(masks) -> list[int]:
    return [int(m.sum()) for m in masks]


def test_like_groups_give_the_nine_residual_blocks_one_width(tmp_path):
    _, _, targets, mm, _ = _resnet(tmp_path)
    assert like_groups(targets.groups, mm) == [[0], [1], [2], list(range(3, 12)), [12], [13]]
    assert candidate_widths(38, 128, 8) == [24, 32, 38, 40, 48, 56]
    assert candidate_widths(10, 32, 8) == [8, 10, 16]
    assert candidate_widths(30, 32, 8) == [24, 30, 32]  # the group's whole size is a candidate


def test_on_a_blocked_device_the_widths_move_to_whole_blocks_within_the_budget(tmp_path):
    """The default teacher's family at 1/10: the proportional cut (38-channel blocks, 10-channel ends)
    wastes most of each 16-channel block; the search keeps 85-100% of the MACs budget and does more MACs
    per millisecond, the inner block widths a whole number of blocks."""
    net, x, targets, mm, model = _resnet(tmp_path)
    target = 0.1 * mm.total
    start = _counts(uniform_masks(targets, mm, target)[0])
    assert start[3] % 16 != 0
    timed = []

    def time_ms(masks):
        timed.append(_counts(masks))
        return model.predict(masks)

    found = latency_widths(targets.groups, mm, start, target, time_ms, model.predict, top=6)
    assert found.start == start and found.counts != start
    assert 0.85 * target <= found.macs <= target
    rate = found.macs / found.ms
    assert rate > 1.3 * found.start_macs / found.start_ms
    assert found.ms == pytest.approx(model.predict(leading_masks(targets.groups, found.counts)))
    assert len(set(found.counts[3:12])) == 1 and found.counts[3] % 16 == 0, found.counts
    assert timed[0] == start and found.timed == len(found.trace) <= 7
    top_rate = max(m / ms for _, m, ms in found.trace)
    near = [m for _, m, ms in found.trace if m / ms >= 0.97 * top_rate]
    assert rate >= 0.97 * top_rate and found.macs == max(near)  # within 3% of the best rate: the most MACs
    plain = onestep_prune(net, targets, leading_masks(targets.groups, found.counts), x)
    assert sum(measure.macs_by_module(plain, x, "papers").values()) == pytest.approx(found.macs, rel=1e-6)


def test_the_start_is_kept_when_no_other_widths_are_faster_per_mac(tmp_path):
    _, _, targets, mm, model = _resnet(tmp_path)
    target = 0.1 * mm.total
    start = _counts(uniform_masks(targets, mm, target)[0])

    def time_ms(masks):  # a device where every change costs a fixed extra millisecond
        return mm.macs(masks) / 1e6 + (0.0 if _counts(masks) == start else 1.0)

    found = latency_widths(targets.groups, mm, start, target, time_ms, model.predict, top=4)
    assert found.counts == start and found.ms == found.start_ms and found.speedup == 1.0


def test_rates_within_the_tie_go_to_the_network_with_more_macs(tmp_path):
    """A device that runs every network in the window at the same MACs per ms except for a 1% jitter:
    the timings cannot tell them apart, so the search keeps the most capacity among the near-best."""
    _, _, targets, mm, model = _resnet(tmp_path)
    target = 0.1 * mm.total
    start = _counts(uniform_masks(targets, mm, target)[0])

    def time_ms(masks):
        c = _counts(masks)
        jitter = 1 - 0.01 * (sum(c) % 2)  # the odd-width networks look 1% faster per MAC
        return (mm.macs(masks) / 1e6) * jitter * (1.5 if c == start else 1.0)

    found = latency_widths(targets.groups, mm, start, target, time_ms, model.predict, top=8)
    others = [(c, m) for c, m, _ in found.trace if c != start]
    assert found.counts != start and found.macs == max(m for _, m in others)
    strict = latency_widths(targets.groups, mm, start, target, time_ms, model.predict, top=8, tie=0.0)
    assert sum(strict.counts) % 2 == 1 or all(sum(c) % 2 == 0 for c, _ in others)


def test_bad_starts_and_windows_are_refused(tmp_path):
    _, _, targets, mm, model = _resnet(tmp_path, ngf=8)
    full = [g.size for g in targets.groups]
    with pytest.raises(ValueError, match="exceed the MACs budget"):
        latency_widths(targets.groups, mm, full, 0.5 * mm.total, model.predict)
    with pytest.raises(ValueError, match="min_fraction"):
        latency_widths(targets.groups, mm, full, mm.total, model.predict, min_fraction=0)
    with pytest.raises(ValueError, match="counts for"):
        latency_widths(targets.groups, mm, full[:-1], mm.total, model.predict)


def test_networks_with_many_unlike_groups_rank_a_bounded_number_of_combinations(tmp_path):
    """U-Net 256 has a dozen unlike groups: the candidates shrink to the neighbouring multiples, then
    the cheapest groups keep their width, until the combinations fit the bound."""
    torch.manual_seed(0)
    net = create_model("unet_256", ngf=8, norm="batch").eval()
    x = (torch.randn(1, 3, 256, 256),)
    targets = find_channel_groups(net, x)
    mm = MacsModel(net, targets, measure.macs_by_module(net, x, "papers"))
    model = LatencyModel(net, targets, x, StaircaseTable(runtime="eager", path=tmp_path / "t.json"), macs_model=mm)
    target = 0.2 * mm.total
    start = _counts(uniform_masks(targets, mm, target)[0])
    classes = like_groups(targets.groups, mm)
    assert len(classes) >= 10
    options = _options(targets.groups, mm, classes, start, 8, 1.6, 500)
    assert math.prod(len(o) for o in options) <= 500
    assert all(start[c[0]] in o for c, o in zip(classes, options))
    found = latency_widths(targets.groups, mm, start, target, model.predict, model.predict, max_combinations=500)
    assert found.macs <= target and (found.counts == start or found.macs >= 0.85 * target)
    plain = onestep_prune(net, targets, leading_masks(targets.groups, found.counts), x)
    assert plain(*x).shape == net(*x).shape


@pytest.mark.parametrize("generator", list(GENERATORS))
def test_uniform_widths_latency_runs_through_compress_on_generator(generator, tmp_path):
    """On every reference generator: the search runs with eager timings (the tiny networks' times are
    noise, so only the contract is asserted), the student stays within the MACs budget and runs."""
    teacher, train = _teacher_and_loader(generator)
    x = (train[0][0][:1],)
    res = ganslim.compress(teacher, teacher, train, strategy="uniform", uniform_widths="latency", target_macs=TARGET,
                           finetune_steps=0, progress=False, measure_latency=False, seed=0, latency_runtime="eager",
                           latency_table=str(tmp_path / "t.json"), latency_step=4)
    note = " ".join(n for n in res.report.notes if n.startswith("uniform_widths='latency' (eager)"))
    assert "networks timed" in note and (tmp_path / "t.json").exists()
    teacher_macs = sum(measure.macs_by_module(teacher, x, "papers").values())
    student_macs = sum(measure.macs_by_module(res.model, x, "papers").values())
    assert student_macs <= TARGET * teacher_macs * (1 + 1e-6)
    with torch.no_grad():
        out, ref = res.model.eval()(*x), teacher(*x)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_uniform_widths_latency_in_onnxruntime_and_its_option_checked(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("resnet_9blocks", ngf=16, norm="batch").eval()
    g = torch.Generator().manual_seed(0)
    loader = [(xb, torch.tanh(xb.flip(1))) for xb in (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))]
    res = ganslim.compress(teacher, teacher, loader, strategy="uniform", uniform_widths="latency", target_macs=0.1,
                           finetune_steps=0, progress=False, measure_latency=False, seed=0,
                           latency_table=str(tmp_path / "t.json"))
    note = " ".join(n for n in res.report.notes if n.startswith("uniform_widths='latency' (onnxruntime)"))
    assert "timed side by side" in note
    assert res.report.macs_reduction >= 10 * (1 - 0.03)
    with pytest.raises(ValueError, match="uniform_widths must be 'proportional' or 'latency'"):
        ganslim.compress(teacher, teacher, loader, strategy="uniform", uniform_widths="fast", target_macs=0.1)
