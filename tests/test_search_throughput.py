"""The search evaluation's speed-ups compute what they replace: a thin conv in its strided form, the
MACs of a sub-network from memoised kept fractions, the flat train/eval switch, and the dispatch of
candidates to the evaluation workers."""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ganslim._utils import set_training
from ganslim.pruning.search import Evaluator
from ganslim.pruning.slicing import SliceConfig, make_supernet
from ganslim.pruning.thin_conv import is_thin, strided_weight, thin_conv2d
from ganslim.zoo import create_model

from test_targets_per_generator import GENERATORS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 2), cin=st.integers(1, 6), cout=st.integers(1, 4), kh=st.integers(3, 7), kw=st.integers(3, 7),
       h=st.integers(0, 13), w=st.integers(0, 13), ph=st.integers(0, 3), pw=st.integers(0, 3),
       channels_last=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_thin_conv_computes_the_direct_conv(n, cin, cout, kh, kw, h, w, ph, pw, channels_last, bias, seed):
    # odd and even sizes, padding, no bias: the strided form and its crop give the direct conv's output
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, kh + h, kw + w, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    ref = F.conv2d(x, weight, b, padding=(ph, pw))
    out = thin_conv2d(x, weight, b, (ph, pw))
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_the_strided_weight_holds_each_phase_shifted_and_zeros_elsewhere():
    w = torch.arange(1, 1 + 2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    sw = strided_weight(w, 2)
    assert sw.shape == (8, 1, 4, 4)
    for o in range(2):
        for rh in range(2):
            for rw in range(2):
                phase = sw[o * 4 + rh * 2 + rw, 0]
                assert torch.equal(phase[rh:rh + 3, rw:rw + 3], w[o, 0])
                assert float(phase.abs().sum()) == float(w[o].abs().sum())  # nothing else


def test_only_thin_stride_1_convs_are_rewritten():
    w = torch.zeros(3, 8, 7, 7)
    assert is_thin(w, (1, 1), (1, 1), 1)
    assert not is_thin(torch.zeros(5, 8, 7, 7), (1, 1), (1, 1), 1)  # enough outputs to fill a register
    assert not is_thin(w, (2, 2), (1, 1), 1)
    assert not is_thin(w, (1, 1), (2, 2), 1)
    assert not is_thin(torch.zeros(4, 4, 3, 3), (1, 1), (1, 1), 2)
    assert not is_thin(torch.zeros(3, 8, 1, 1), (1, 1), (1, 1), 1)  # a 1x1 conv gains nothing


def _pixel_shuffles(fn) -> int:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::pixel_shuffle")


@pytest.mark.parametrize("name", ["resnet9-batch", "resnet9-instance", "spade", "cartoongan", "unet256"])
def test_supernet_evaluates_its_thin_output_conv_in_the_strided_form_and_trains_with_the_direct_one(name):
    make, batches = GENERATORS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = batches()[0][0][:1]
    sn = make_supernet(model, x, SliceConfig(ratios=(0.5, 1.0), multiple=1)).eval()
    thin = [n for n, st in sn._states.items() if st["thin"]]
    if name == "unet256":  # its output layer is a transposed conv: nothing to rewrite
        assert thin == []
        return
    outs = [sn.model.get_submodule(n).out_channels for n in thin]  # SPADE at ngf 4: its last stage's convs too
    assert 3 in outs and max(outs) <= 4
    rng = random.Random(0)
    for widths in (sn.largest(), sn.sample(rng), sn.smallest()):
        sn.set_widths(widths)
        with torch.enable_grad():  # training: the direct conv, the plain sub-network's numbers
            direct = sn(x).detach()
            assert _pixel_shuffles(lambda: sn(x)) == 0
        with torch.no_grad():
            strided = sn(x)
            assert _pixel_shuffles(lambda: sn(x)) == len(thin)
        scale = float(direct.abs().max())
        assert float((strided - direct).abs().max()) <= 1e-5 * scale, widths


@pytest.mark.parametrize("name", ["resnet_6blocks", "unet_128", "mobile_resnet_9blocks", "spade", "cartoongan"])
def test_prefix_macs_are_the_masks_macs_bit_for_bit_on_repeated_and_new_widths(name):
    kwargs = {"spade": dict(label_nc=3, ngf=4, crop_size=32, no_instance=True), "cartoongan": {}}.get(name, dict(ngf=8))
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x = torch.randn(1, 3, 128 if name.startswith("unet") else 32, 128 if name.startswith("unet") else 32)
    sn = make_supernet(model, x, SliceConfig(ratios=(0.25, 0.5, 0.75, 1.0), multiple=1))
    rng = random.Random(0)
    draws = [sn.sample(rng) for _ in range(25)]
    for widths in draws + draws[:5]:  # the second time from the memoised fractions
        assert sn.macs(widths) == sn._macs.macs(sn.alive(widths))


class _FrozenNorm(nn.Module):
    """A module whose train() keeps its BatchNorm in eval mode (a common user pattern)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        return self


def test_set_training_sets_what_train_sets_and_respects_an_overridden_train():
    a = create_model("resnet_6blocks", ngf=4, norm="batch")
    for mode in (True, False, True):
        set_training(a, mode)
        assert all(m.training is mode for m in a.modules())
    b = nn.Sequential(nn.Conv2d(3, 4, 3), _FrozenNorm())
    set_training(b, True)
    assert b.training and b[0].training and not b[1].bn.training


def test_dispatch_sends_a_child_to_the_worker_that_keeps_its_parent_prefix():
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="batch").eval()
    x = torch.randn(2, 3, 32, 32)
    sn = make_supernet(teacher, x[:1], SliceConfig(ratios=(0.25, 0.5, 0.75, 1.0), multiple=1))
    pairs, bn = [((x,), None)], [(torch.randn(2, 3, 32, 32),)]
    ev = Evaluator(sn, teacher, pairs, bn, "psnr_teacher", workers=2)
    assert ev.prefix is not None
    # the group a chain brings in last: a child that differs from its parent only there shares all
    # the parent's kept prefixes but the output's
    boundaries = [set(upto) for _, upto in ev.prefix.boundaries]
    deepest = sn.groups[sorted(boundaries[-1] - boundaries[-2])[0]].root
    try:
        big, small = sn.largest(), sn.smallest()
        ev.evaluate_many([big, small])  # one each: worker 0 the largest, worker 1 the smallest
        sent = []
        for i, (conn, _) in enumerate(ev._pool):  # record which pipe each sub-network goes down
            def record(w, _i=i, _send=conn.send):
                if w is not None:
                    sent.append((_i, dict(w)))
                _send(w)
            conn.send = record
        child_of_small = {**small, deepest: big[deepest]}
        child_of_big = {**big, deepest: small[deepest]}
        got = ev.evaluate_many([child_of_small, child_of_big])  # in the order that round robin would swap
        assert sorted((i, w == child_of_big) for i, w in sent) == [(0, True), (1, False)]
        one = Evaluator(sn, teacher, pairs, bn, "psnr_teacher")
        for c in got:  # which worker measured it does not change the numbers
            assert c.fitness == pytest.approx(one(c.widths).fitness, rel=1e-6)
    finally:
        ev.close()


def test_latency_is_timed_with_the_direct_conv_an_exported_subnetwork_has():
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="batch").eval()
    x = torch.randn(1, 3, 32, 32)
    sn = make_supernet(teacher, x, SliceConfig(ratios=(0.5, 1.0), multiple=1))
    ev = Evaluator(sn, teacher, [((x,), None)], [(torch.randn(2, 3, 32, 32),)], "psnr_teacher", latency_repeats=1)
    w = sn.smallest()
    assert _pixel_shuffles(lambda: ev(w)) == 1  # the fitness forward: strided form
    assert _pixel_shuffles(lambda: ev.latency(w)) == 0  # timing: as deployed
    assert [st["thin"] for st in sn._states.values()].count(True) == 1  # switched back on after timing
    with pytest.raises(RuntimeError):
        with sn.direct_thin_convs():
            raise RuntimeError("an error inside")
    assert [st["thin"] for st in sn._states.values()].count(True) == 1
