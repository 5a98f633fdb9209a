"""The measured latency model (per-layer table of the device + fitted remainder) and the selection of
channels under a latency budget (strategy "halp"), on the field's reference generators.

Timings vary between machines and runs, so the tests assert what does not: the table's shapes, its
cache, the algebra of the fit, and that the selection meets its own prediction with the floors kept."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import ganslim
from ganslim import measure
from ganslim.core.gating import MacsModel
from ganslim.core.targeting import find_channel_groups
from ganslim.measure.latency_table import ConvSignature, LatencyModel, LatencyTable, conv_signatures
from ganslim.pruning.latency_select import latency_masks
from ganslim.pruning.onestep import onestep_prune
from ganslim.pruning.uniform import uniform_alive
from ganslim.zoo import create_model

from test_targets_per_generator import GENERATORS, _teacher_and_loader


def _model_and_table(tmp_path, net=None, size=32):
    torch.manual_seed(0)
    net = net or create_model("resnet_9blocks", ngf=8, norm="batch").eval()
    x = (torch.randn(1, 3, size, size),)
    targets = find_channel_groups(net, x)
    mm = MacsModel(net, targets, measure.macs_by_module(net, x, "papers"))
    table = LatencyTable(runtime="eager", path=tmp_path / "table.json", repeats=3)
    return net, x, targets, LatencyModel(net, targets, x, table, macs_model=mm)


def test_conv_signatures_record_the_input_each_conv_sees():
    net = create_model("resnet_9blocks", ngf=8, norm="batch").eval()
    sigs = conv_signatures(net, torch.randn(1, 3, 32, 48))
    first = sigs["model.1"]  # after a 3-pixel reflection pad
    assert (first.in_channels, first.out_channels, first.kernel, first.height, first.width) == (3, 8, (7, 7), 38, 54)
    down = sigs["model.4"]
    assert (down.stride, down.height, down.width) == ((2, 2), 32, 48)
    up = sigs["model.19"]
    assert up.transposed and up.output_padding == (1, 1) and (up.height, up.width) == (8, 12)
    assert len(sigs) == 3 + 2 * 9 + 2 + 1
    narrow = first.with_channels(3, 5)
    layer = narrow.build()
    assert isinstance(layer, nn.Conv2d) and layer.out_channels == 5 and layer.kernel_size == (7, 7)
    dw = ConvSignature(False, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), (0, 0), True, False, 1, 8, 8)
    assert dw.with_channels(6, 99).out_channels == 6 and dw.with_channels(6, 6).build().groups == 6


def test_the_table_is_cached_per_device_and_refuses_another_devices_file(tmp_path):
    net, x, targets, model = _model_and_table(tmp_path)
    full = [torch.ones(g.size, dtype=torch.bool) for g in targets.groups]
    half = uniform_alive(targets.groups, 0.5)
    a, b = model.conv_ms(full), model.conv_ms(half)
    assert a > 0 and b > 0 and model.table.timed == len(model.table) > 0
    path = model.table.save()
    again = LatencyTable(runtime="eager", path=path)
    assert again.entries == model.table.entries
    model2 = LatencyModel(net, targets, x, again)
    assert model2.conv_ms(full) == a and model2.conv_ms(half) == b and again.timed == 0  # read, not re-timed
    saved = json.loads(path.read_text())
    saved["fingerprint"] = "another cpu"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="was timed on 'another cpu'"):
        LatencyTable(runtime="eager", path=path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a latency table"):
        LatencyTable(runtime="eager", path=path)
    with pytest.raises(ValueError, match="runtime must be one of"):
        LatencyTable(runtime="tvm", path=path)


def test_the_remainder_fit_recovers_a_known_remainder(tmp_path):
    _, _, targets, model = _model_and_table(tmp_path)
    nets = [uniform_alive(targets.groups, r) for r in (1.0, 0.6, 0.3, 0.15)]
    measured = [(a, 0.9 * model.conv_ms(a) + 2.0 + 3.0 * model.elementwise_fraction(a)) for a in nets]
    scale, c0, c1 = model.fit(measured)
    assert (scale, c0, c1) == pytest.approx((0.9, 2.0, 3.0), rel=1e-6)
    assert max(abs(e) for e in model.errors(measured)) < 1e-6
    assert model.elementwise_fraction(nets[0]) == 1.0 and 0.25 < model.elementwise_fraction(nets[2]) < 0.35


def test_the_fit_never_predicts_a_negative_latency(tmp_path):
    """The third bench_latency_table run fitted an unbounded constant of -14 ms and predicted the 1/40
    cut at -3 ms: timings where the thin networks cost *less* than the table's convolutions (a table
    timed on a busier machine) must give non-negative coefficients and positive predictions."""
    _, _, targets, model = _model_and_table(tmp_path)
    nets = [uniform_alive(targets.groups, r) for r in (1.0, 0.5, 0.25)]
    full_ms = model.conv_ms(nets[0])
    measured = [(a, model.conv_ms(a) - 0.3 * full_ms * (1 - r)) for a, r in zip(nets, (1.0, 0.5, 0.25))]
    scale, c0, c1 = model.fit(measured)
    assert min(scale, c0, c1) >= 0
    thinnest = uniform_alive(targets.groups, 0.02)
    assert model.predict(thinnest) > 0
    # one network: the table is rescaled to it, not shifted by a constant
    scale, c0, c1 = model.fit([(nets[0], 0.5 * full_ms)])
    assert (scale, c0, c1) == pytest.approx((0.5, 0.0, 0.0)) and model.predict(thinnest) > 0
    with pytest.raises(ValueError, match="at least one"):
        model.fit([])


class StaircaseTable(LatencyTable):
    """A device whose kernels compute channels in blocks of 16 (as onnxruntime's blocked CPU convolutions
    do), input and output: the time of a shape is known exactly, so the selection's logic is tested apart from timing noise
    (the real timer is tested above)."""

    def _time(self, sig: ConvSignature) -> float:
        def blocked(c):
            return -(-c // 16) * 16

        return 1e-6 * blocked(sig.out_channels) * blocked(sig.in_channels) * sig.kernel[0] * sig.kernel[1] \
            * sig.height * sig.width + 0.01


def test_the_selection_meets_its_prediction_keeps_the_floors_and_climbs_down_the_staircase(tmp_path):
    torch.manual_seed(0)
    net = create_model("resnet_9blocks", ngf=16, norm="batch").eval()
    x = (torch.randn(1, 3, 32, 32),)
    targets = find_channel_groups(net, x)
    table = StaircaseTable(runtime="eager", path=tmp_path / "t.json")
    model = LatencyModel(net, targets, x, table)
    full = [torch.ones(g.size, dtype=torch.bool) for g in targets.groups]
    model.fit([(full, model.conv_ms(full) * 1.2)])
    floors = [max(2, -(-g.size // 8)) for g in targets.groups]
    lowest = model.predict([torch.arange(g.size) < f for g, f in zip(targets.groups, floors)])
    budgets = [lowest + (model.predict(full) - lowest) * t for t in (0.6, 0.3)]
    kept = []
    for budget in budgets:
        alive = latency_masks(net, targets, model, budget, step=8)
        assert alive.predicted_ms <= budget and alive.moves > 0
        assert alive.predicted_ms == pytest.approx(model.predict(alive))
        widths = [int(a.sum()) for a in alive]
        assert all(w >= f for w, f in zip(widths, floors))
        # a cut of 8 inside a block of 16 saves nothing on this device: no group is left mid-block
        # unless it sits at its floor (or is whole)
        assert all(w % 16 == 0 or w == f or w == g.size for w, f, g in zip(widths, floors, targets.groups)), widths
        kept.append(sum(widths))
        plain = onestep_prune(net, targets, list(alive), x)
        assert plain(*x).shape == net(*x).shape
    assert kept[1] < kept[0] < sum(g.size for g in targets.groups)
    with pytest.raises(ValueError, match="impossible latency target"):
        latency_masks(net, targets, model, lowest * 0.5)


@pytest.mark.parametrize("generator", list(GENERATORS))
def test_the_model_predicts_the_shapes_the_pruned_network_runs_on_generator(generator, tmp_path):
    """On every reference generator the selection's pruned network runs exactly the convolution shapes
    the latency model priced: the table's bookkeeping of kept channels is the pruning's."""
    teacher, train = _teacher_and_loader(generator)
    x = (train[0][0][:1],)
    targets = find_channel_groups(teacher, x)
    model = LatencyModel(teacher, targets, x, StaircaseTable(runtime="eager", path=tmp_path / "t.json"))
    full = [torch.ones(g.size, dtype=torch.bool) for g in targets.groups]
    floors = [max(2, -(-g.size // 8)) for g in targets.groups]
    lowest = model.predict([torch.arange(g.size) < f for g, f in zip(targets.groups, floors)])
    alive = latency_masks(teacher, targets, model, (lowest + model.predict(full)) / 2, step=4)
    assert alive.moves > 0 and alive.predicted_ms <= (lowest + model.predict(full)) / 2
    kept = model.macs_model.kept_channels(alive)
    priced = {n: s.with_channels(*kept.get(n, (s.in_channels, s.out_channels))) for n, s in model.signatures.items()}
    plain = onestep_prune(teacher, targets, list(alive), x)
    ran = conv_signatures(plain, x)
    assert ran == priced, {n: (ran[n].key(), priced[n].key()) for n in ran if ran[n] != priced[n]}
    single = [g.root for g, a in zip(targets.groups, alive) if int(a.sum()) < 2 <= g.size]
    assert not single, f"{generator}: layers cut to one channel {single}"


def test_halp_runs_through_compress_and_caches_its_table(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("resnet_9blocks", ngf=8, norm="batch").eval()
    g = torch.Generator().manual_seed(0)
    loader = [(xb, torch.tanh(xb.flip(1))) for xb in (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))]
    table = tmp_path / "t.json"
    res = ganslim.compress(teacher, teacher, loader, strategy="halp", target_macs=0.2, finetune_steps=1, progress=False,
                           measure_latency=False, seed=0, latency_runtime="eager", latency_table=str(table),
                           latency_step=4)
    note = " ".join(n for n in res.report.notes if n.startswith("halp:"))
    assert "the uniform cut at 0.2 of the MACs" in note and "timed" in note
    assert res.report.strategy == "halp" and table.exists() and len(json.loads(table.read_text())["entries"]) > 0
    with torch.no_grad():
        out = res.model.eval()(loader[0][0])
    assert out.shape == loader[0][1].shape and torch.isfinite(out).all()
    again = ganslim.compress(teacher, teacher, loader, strategy="halp", target_latency_ms=1e6, finetune_steps=0,
                             progress=False, measure_latency=False, latency_runtime="eager", latency_table=str(table))
    note = " ".join(n for n in again.report.notes if n.startswith("halp:"))
    assert "latency target 1e+06 ms" in note and "0 moves" in note  # a budget above the teacher keeps it whole


def test_halp_options_are_checked_before_any_work():
    teacher = create_model("resnet_9blocks", ngf=4, norm="batch").eval()
    loader = [torch.rand(1, 3, 16, 16)]
    with pytest.raises(ValueError, match="latency_runtime must be 'onnxruntime' or 'eager'"):
        ganslim.compress(teacher, teacher, loader, strategy="halp", target_macs=0.2, latency_runtime="tensorrt")
    with pytest.raises(ValueError, match="latency_step must be >= 1"):
        ganslim.compress(teacher, teacher, loader, strategy="halp", target_macs=0.2, latency_step=0)
