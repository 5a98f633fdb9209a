"""Depthwise-separable factorisation (ganslim.pruning.separable) and strategy="separable"."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ganslim
from archs import OPS, RandomGenerator
from ganslim import data, measure
from ganslim.core.gating import GateSet, export_pruned
from ganslim.core.targeting import find_channel_groups
from ganslim.pruning.separable import convertible_convs, factorize_conv, make_separable, separable_cost
from ganslim.zoo import create_model

CONVS = {  # name: (conv, input size): every order the factorisation takes
    "strided, depthwise first": (lambda: nn.Conv2d(8, 16, 3, 2, 1), 12),
    "wider input, depthwise first, reflect": (lambda: nn.Conv2d(16, 8, 3, 1, 1, padding_mode="reflect"), 12),
    "wider output, pointwise first": (lambda: nn.Conv2d(3, 16, 7, padding=3), 12),
    "transposed, pointwise first": (lambda: nn.ConvTranspose2d(16, 8, 3, 2, 1, output_padding=1), 6),
    "dilated, no bias": (lambda: nn.Conv2d(8, 8, 5, dilation=2, padding=4, bias=False), 12),
}


def _rank1_kernel(conv: nn.Module, depthwise_first: bool) -> None:
    """Give ``conv`` a kernel that is exactly rank-1 per depthwise channel."""
    cin, cout, ks = conv.in_channels, conv.out_channels, conv.kernel_size
    P = torch.randn(cout, cin)
    with torch.no_grad():
        if isinstance(conv, nn.ConvTranspose2d):
            conv.weight.copy_(torch.einsum("oi,okl->iokl", P, torch.randn(cout, *ks)))
        elif depthwise_first:
            conv.weight.copy_(torch.einsum("oi,ikl->oikl", P, torch.randn(cin, *ks)))
        else:
            conv.weight.copy_(torch.einsum("oi,okl->oikl", P, torch.randn(cout, *ks)))


@pytest.mark.parametrize("case", list(CONVS))
def test_factorisation_is_exact_on_rank1_kernels_and_cheaper(case):
    make, size = CONVS[case]
    torch.manual_seed(0)
    conv = make()
    plan = separable_cost(conv)
    _rank1_kernel(conv, plan.depthwise_first)
    pair = factorize_conv(conv)
    assert [m.groups > 1 for m in pair] == ([True, False] if plan.depthwise_first else [False, True])
    x = torch.randn(2, conv.in_channels, size, size)
    with torch.no_grad():
        ref, out = conv(x), pair(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    # the MACs per output pixel the plan states are the ones fvcore counts (papers' convention)
    measured = measure.count_macs(pair, x) / measure.count_macs(conv, x)
    assert measured == pytest.approx(plan.ratio, rel=1e-6)
    assert plan.ratio < 1


def test_teacher_init_is_the_best_rank1_per_channel():
    torch.manual_seed(1)
    conv = nn.Conv2d(10, 6, 3, padding=1)  # a general kernel: the SVD keeps the largest singular value
    dw, pw = factorize_conv(conv)
    rebuilt = torch.einsum("oi,ikl->oikl", pw.weight[:, :, 0, 0], dw.weight[:, 0]).detach()
    W = conv.weight.detach()
    for i in range(10):
        s = torch.linalg.svdvals(W[:, i].reshape(6, 9).double())
        err = float((rebuilt[:, i] - W[:, i]).double().norm())
        assert err == pytest.approx(float(s[1:].norm()), rel=1e-4)  # Eckart-Young: the rest of the spectrum
    assert torch.equal(pw.bias, conv.bias)
    scratch = factorize_conv(conv, init="scratch")
    assert not torch.equal(scratch[0].weight, dw.weight)
    with pytest.raises(ValueError, match="init must be"):
        factorize_conv(conv, init="svd")


def test_what_is_left_alone():
    assert separable_cost(nn.Conv2d(8, 8, 1)) is None  # already pointwise
    assert separable_cost(nn.Conv2d(8, 8, 3, groups=8)) is None  # already depthwise
    assert separable_cost(nn.Conv2d(8, 8, 3, groups=2)) is None  # grouped
    assert separable_cost(nn.Linear(4, 4)) is None

    class MyConv(nn.Conv2d):  # a subclass may change forward
        pass

    assert separable_cost(MyConv(8, 8, 3)) is None
    # one input channel: 1x1 to 16 then a 7x7 on 16 is dearer than the 7x7 itself
    net = nn.Sequential(nn.Conv2d(1, 16, 7, padding=3), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    assert [p.name for p in convertible_convs(net)] == ["2"]
    assert convertible_convs(net, exclude=["2"]) == []
    assert convertible_convs(net, exclude=[nn.Conv2d]) == []  # module types too, as CompressConfig.exclude
    with pytest.raises(ValueError, match="cannot factorise"):
        factorize_conv(nn.Conv2d(8, 8, 1))


def test_make_separable_on_the_resnet_generator_keeps_every_other_name():
    m = create_model("resnet_9blocks", ngf=8, norm="instance")
    x = torch.randn(1, 3, 32, 32)
    before_names = {n for n, _ in m.named_modules()}
    before = measure.count_macs(m, x)
    replaced = make_separable(m)
    # stem and output 7x7 convs, 2 down, 18 residual, 2 transposed up
    assert len(replaced) == 24 and "model.10.conv_block.1" in replaced
    assert before_names <= {n for n, _ in m.named_modules()}
    assert isinstance(m.get_submodule("model.10.conv_block.1"), nn.Sequential)
    assert measure.count_macs(m, x) < before / 4
    assert m(x).shape == (1, 3, 32, 32)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(st.sampled_from(OPS), min_size=1, max_size=5),
       widths=st.lists(st.integers(2, 10), min_size=6, max_size=6),
       norm=st.sampled_from(["instance", "batch", "none"]), seed=st.integers(0, 1000))
def test_fuzz_factorised_networks_prune_and_export(spec, widths, norm, seed):
    """Random architectures: the factorised network keeps its output shape, costs no more, and the
    dependency graph prunes it (depthwise convs coupled with their producers) with an exact export."""
    torch.manual_seed(seed)
    m = RandomGenerator(spec, widths, norm).eval()
    x = torch.randn(1, 3, 16, 16)
    before = measure.count_macs(m, x)
    replaced = make_separable(m)
    m.eval()
    assert m(x).shape == (1, 3, 16, 16)
    after = measure.count_macs(m, x)
    assert after < before if replaced else after == before
    gates = GateSet(find_channel_groups(m, x))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in gates.gates:
            v.copy_(torch.rand(v.shape, generator=g) + 0.1)
            v[torch.rand(v.shape, generator=g) < 0.4] = 0.0
            v[0] = 1.0  # one live channel per group
    plain, info = export_pruned(m, gates, x)  # raises if the pruned output differs from the gated one
    assert info["rel_diff"] <= 1e-4


def _loader(teacher, steps):
    return data.default_loader(batch_size=4, crop=32, length=steps * 4, seed=0, teacher=teacher)


def test_strategy_meets_the_budget_factorising_no_more_than_needed(tmp_path):
    teacher = create_model("resnet_9blocks", ngf=8, norm="batch").eval()
    pairs = [(x[:, :, :64, :64], y[:, :, :64, :64]) for x, y in data.test_pairs()]
    for target, all_factorised in ((0.03, True), (0.3, False)):
        res = ganslim.compress(teacher, teacher, _loader(teacher, 6), strategy="separable", target_macs=target,
                               finetune_steps=4, progress=False, measure_latency=False, eval_inputs=pairs)
        frac = res.report.student.macs / res.report.teacher.macs
        assert abs(frac / target - 1) < 0.05, (target, frac)
        depthwise = [m for m in res.model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.groups > 1]
        assert (len(depthwise) == 24) == all_factorised and depthwise
        assert any(n.startswith("separable: ") for n in res.report.notes)
    # the exported student is plain torch.nn: it saves and reloads bit-exactly
    path = tmp_path / "student.safetensors"
    ganslim.save(res.model, path)
    again = ganslim.load(path).eval()
    x = pairs[0][0]
    with torch.no_grad():
        assert torch.equal(again(x), res.model.eval()(x))


def test_widths_are_multiples_of_8_unless_the_budget_needs_finer_ones():
    """separable's own channel_multiple is 8 (channel_multiple=None): depthwise convs and channels-last
    BatchNorms run far faster at 16 / 24 / 48 than at 13 / 26 / 51. Where 8 would miss the budget by more
    than 5% (a narrow teacher) the multiple halves, with a note; a multiple the user gives is kept."""
    pairs = [(x[:, :, :64, :64], y[:, :, :64, :64]) for x, y in data.test_pairs()]

    def run(teacher, target, **kw):
        res = ganslim.compress(teacher, teacher, _loader(teacher, 4), strategy="separable", target_macs=target,
                               finetune_steps=2, progress=False, measure_latency=False, eval_inputs=pairs, **kw)
        widths = [kept for kept, _size in res.report.widths.values()]
        return res, widths, res.report.student.macs / res.report.teacher.macs

    wide = create_model("resnet_9blocks", ngf=32, norm="batch").eval()
    res, widths, frac = run(wide, 0.025)
    assert res.config.channel_multiple == 8 and all(w % 8 == 0 for w in widths) and sorted(set(widths)) == [16, 24, 48]
    assert 0.95 * 0.025 <= frac <= 0.025 and not any("would miss" in n for n in res.report.notes)
    res, widths, frac = run(wide, 0.025, channel_multiple=1)
    assert res.config.channel_multiple == 1 and any(w % 8 for w in widths) and frac <= 0.025
    narrow = create_model("resnet_9blocks", ngf=8, norm="batch").eval()
    res, widths, frac = run(narrow, 0.03)
    assert 0.95 * 0.03 <= frac <= 0.03 and any("multiples of 8 would miss the MACs budget" in n for n in res.report.notes)
    assert any(w % 8 for w in widths) and res.config.channel_multiple == 8  # the config as given, resolved
    res, widths, frac = run(narrow, 0.03, channel_multiple=8)  # asked for: kept, whatever the budget says
    assert all(w % 8 == 0 for w in widths) and not any("would miss" in n for n in res.report.notes)


def test_strategy_refuses_a_latency_target():
    teacher = create_model("resnet_6blocks", ngf=4, norm="instance").eval()
    with pytest.raises(ValueError, match="takes a MACs target"):
        ganslim.compress(teacher, teacher, _loader(teacher, 2), strategy="separable", target_latency_ms=1.0,
                         finetune_steps=1, progress=False, measure_latency=False)


def test_a_depthwise_conv_on_the_image_is_not_a_channel_group():
    """Its channels are the input's: pruning them would leave the image's channels unconsumed."""
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 8, 1), nn.ReLU(),
                        nn.Conv2d(8, 3, 3, padding=1))
    t = find_channel_groups(net, torch.randn(1, 3, 8, 8))
    assert [g.root for g in t.groups] == ["1"]
    assert "the input's" in t.skipped["0"]


def test_keep_important_cuts_the_same_counts_at_the_largest_norm_scales():
    """separable_keep="important": the uniform cut's channel counts (the same widths and MACs), the
    channels those with the largest norm scales instead of the leading ones. Here the leading half of
    every layer's channels is nearly switched off in the teacher: the leading cut keeps those, the
    ranked cut keeps the live ones first."""
    torch.manual_seed(0)
    teacher = create_model("resnet_9blocks", ngf=16, norm="batch")
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.weight[: m.num_features // 2] = 1e-3
    teacher.eval()
    pairs = [(x[:, :, :64, :64], y[:, :, :64, :64]) for x, y in data.test_pairs()]
    runs = {}
    for keep in ("leading", "important"):
        res = ganslim.compress(teacher, teacher, _loader(teacher, 2), strategy="separable", target_macs=0.03,
                               separable_keep=keep, finetune_steps=0, progress=False, measure_latency=False,
                               eval_inputs=pairs)
        kept = [(m.weight.abs() > 0.5).sum().item() for m in res.model.modules() if isinstance(m, nn.BatchNorm2d)]
        sizes = [m.num_features for m in res.model.modules() if isinstance(m, nn.BatchNorm2d)]
        runs[keep] = (res, kept, sizes)
    (lead, lead_live, sizes), (ranked, ranked_live, _) = runs["leading"], runs["important"]
    assert ranked.report.widths == lead.report.widths and ranked.report.student.macs == lead.report.student.macs
    live = [(m.weight.abs() > 0.5).sum().item() for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    cut = [n for n, full in zip(sizes, [m.num_features for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)])
           if n < full]
    assert cut, "the budget cuts channels"
    # every layer keeps as many live channels as it can: min(its width, the teacher's live ones)
    assert ranked_live == [min(n, l) for n, l in zip(sizes, live)]
    assert sum(lead_live) < sum(ranked_live)
    with pytest.raises(ValueError, match="separable_keep"):
        ganslim.CompressConfig().replace(separable_keep="random").validate()


def test_kernel_alignment_distillation_reaches_the_factorised_student():
    """separable+gka (auto's pick at 1/10 after ~1000 steps): the fine-tune's feature distillation pairs
    the teacher's layers with the factorised student's (a replaced conv's name holds its depthwise +
    pointwise pair) and changes what the student learns; the student is still a plain, reloadable module."""
    from ganslim.strategies import VARIANTS

    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="batch").eval()
    pairs = [(x[:, :, :32, :32], y[:, :, :32, :32]) for x, y in data.test_pairs()]
    common = dict(target_macs=0.1, finetune_steps=3, progress=False, measure_latency=False, eval_inputs=pairs)
    plain = ganslim.compress(teacher, teacher, _loader(teacher, 3), strategy="separable", **common)
    settings = dict(VARIANTS["separable+gka"])
    assert settings.pop("strategy") == "separable" and settings["distill_loss"] == "gka"
    gka = ganslim.compress(teacher, teacher, _loader(teacher, 3), strategy="separable", **settings, **common)
    assert gka.report.widths == plain.report.widths
    assert gka.config.loss.finetune_distill and gka.config.loss.distill_loss == "gka"
    factorised = {n for n, m in gka.model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert gka.report.distill_layers and not plain.report.distill_layers
    students = dict(gka.model.named_modules())
    assert all(s in students for s in gka.report.distill_layers.values())  # every pair names a student module
    assert factorised  # the student was factorised
    diff = [not torch.equal(a, b) for a, b in zip(gka.model.state_dict().values(), plain.model.state_dict().values())]
    assert any(diff)  # the distillation term changed the updates
    x = pairs[0][0]
    with torch.no_grad():
        out = gka.model.eval()(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
