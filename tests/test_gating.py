"""Targeting, gates, proximal step, MACs accounting and physical removal on random architectures."""

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archs import OPS, RandomGenerator, TwoInputGenerator
from ganslim import measure
from ganslim.core.gating import GateSet, MacsModel, export_pruned, gated_macs_by_module, threshold_for_target
from ganslim.core.targeting import find_channel_groups
from ganslim.zoo import create_model

from equivalence import assert_same_function


def random_gates(gates: GateSet, p_zero: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in gates.gates:
            v.copy_(torch.rand(v.shape, generator=g) * 1.5 + 0.1)
            v[torch.rand(v.shape, generator=g) < p_zero] = 0.0
            if not bool((v != 0).any()):
                # keep one live channel, as compress always does: a wholly dead group makes the rest of the
                # network a constant map, and instance norm of a constant only amplifies float rounding
                # (1e-6 -> 1e-2 over three norms), so gated and pruned nets would differ by noise alone
                v[int(torch.randint(v.numel(), (1,), generator=g))] = 1.0


def resnet_with_macs_model(ngf: int):
    """A small ResNet generator, an input, its channel groups and its MACs model."""
    m = create_model("resnet_6blocks", ngf=ngf)
    x = torch.randn(1, 3, 32, 32)
    t = find_channel_groups(m, x)
    return m, x, t, MacsModel(m, t, measure.macs_by_module(m, x))


def test_resnet_groups_follow_the_dependency_graph():
    m = create_model("resnet_9blocks", ngf=8)
    t = find_channel_groups(m, torch.randn(1, 3, 32, 32))
    roots = [g.root for g in t.groups]
    # stem, 2 downsamplings, the residual trunk (one group across 9 blocks), 9 block-inner groups, 2 upsamplings
    assert len(roots) == 1 + 2 + 9 + 2
    trunk = next(g for g in t.groups if g.root == "model.7")
    assert trunk.size == 32
    assert len(trunk.gate_points) == 1 + 9  # model.8 and the second norm of every block
    assert {c.name for c in trunk.consumers} >= {f"model.{i}.conv_block.1" for i in range(10, 19)} | {"model.19"}
    assert "model.26" in t.skipped and "output" in t.skipped["model.26"]


def test_include_exclude_by_glob_and_type():
    m = create_model("resnet_6blocks", ngf=8)
    x = torch.randn(1, 3, 32, 32)
    t = find_channel_groups(m, x, exclude=["model.1*.conv_block.*"])
    assert all("conv_block" not in g.root for g in t.groups)
    assert any("excluded" in r for r in t.skipped.values())
    t2 = find_channel_groups(m, x, include=[nn.ConvTranspose2d])
    assert sorted(g.root for g in t2.groups) == ["model.16", "model.19"]


def test_prox_step_reaches_exact_zero_and_keeps_sign():
    m = create_model("resnet_6blocks", ngf=8)
    gates = GateSet(find_channel_groups(m, torch.randn(1, 3, 32, 32)))
    with torch.no_grad():
        gates.gates[0].copy_(torch.tensor([0.05, -0.05, 0.5, -0.5, 0.0, 1.0, 0.09, 0.11]))
    gates.prox_step(lr=0.1, rho=1.0)  # threshold 0.1, then the group is rescaled to mean magnitude 1
    shrunk = torch.tensor([0, 0, 0.4, -0.4, 0, 0.9, 0, 0.01])
    assert gates.gates[0].tolist() == pytest.approx((shrunk / shrunk.abs().mean()).tolist(), abs=1e-5)
    assert (gates.gates[0] == 0).sum() == 4
    assert float(gates.gates[0].detach().abs().mean()) == pytest.approx(1.0)


def test_gated_output_ignores_a_uniform_scale_of_a_group():
    # norms after a gate undo a uniform scale; the normalised gate makes that explicit
    m = create_model("resnet_6blocks", ngf=8).eval()
    x = torch.randn(1, 3, 32, 32)
    gates = GateSet(find_channel_groups(m, x))
    random_gates(gates, 0.3, seed=1)
    gates.attach(m)
    with torch.no_grad():
        a = m(x)
        for g in gates.gates:
            g.mul_(7.0)
        b = m(x)
    gates.detach()
    assert torch.allclose(a, b, atol=1e-5)


def test_zero_gate_channels_are_physically_gone_and_output_unchanged():
    torch.manual_seed(1)
    m = create_model("resnet_6blocks", ngf=8)
    x = torch.randn(2, 3, 32, 32)
    t = find_channel_groups(m, x[:1])
    gates = GateSet(t)
    random_gates(gates, 0.5, seed=3)
    alive = [int(a.sum()) for a in gates.alive()]
    plain, info = export_pruned(m, gates, x[:1])
    assert info["rel_diff"] <= 1e-4
    assert plain.model[1].out_channels == alive[0]
    assert plain.model[7].out_channels == alive[2]  # the trunk
    assert plain.model[10].conv_block[1].in_channels == alive[2]
    assert measure.count_params(plain) < measure.count_params(m)
    # the original model is untouched and has no hooks left
    assert m.model[1].out_channels == 8
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())
    # gated vs plain on another batch too
    with gates.attached(m.eval()):
        assert_same_function(plain, m, x, tol=1e-4, b_with=(gates,))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_macs_model_predicts_the_measured_macs_of_the_pruned_network(norm):
    m = create_model("resnet_6blocks", ngf=8, norm=norm)  # instance: InstanceNorm2d(affine=False), CycleGAN's
    x = torch.randn(1, 3, 32, 32)
    t = find_channel_groups(m, x)
    plain_base = MacsModel(m, t, measure.macs_by_module(m, x))
    mm = MacsModel(m, t, gated_macs_by_module(m, t, x))
    assert plain_base.total == pytest.approx(measure.count_macs(m, x))
    gates = GateSet(t)
    random_gates(gates, 0.6, seed=0)
    predicted = mm.macs(gates.alive())
    plain, _ = export_pruned(m, gates, x)
    measured = measure.count_macs(plain, x)
    # exact: folding a gate into a non-affine norm makes it affine (1 MAC per element in the papers'
    # convention), and gated_macs_by_module counts that cost up front
    assert measured == pytest.approx(predicted, rel=1e-9)
    if norm == "instance":
        assert mm.total > plain_base.total and plain_base.macs(gates.alive()) < measured  # the cost is real
    else:
        assert mm.total == plain_base.total
    assert measured < 0.7 * mm.total


def test_threshold_meets_a_macs_target_within_one_channel():
    m, x, t, mm = resnet_with_macs_model(16)
    gates = GateSet(t)
    random_gates(gates, 0.0, seed=5)
    for frac in (0.5, 0.2, 0.1):
        _, alive = threshold_for_target(gates, mm, frac * mm.total)
        got = mm.macs(alive)
        assert got <= frac * mm.total
        assert got >= 0.93 * frac * mm.total


def test_several_inputs_model():
    m = TwoInputGenerator(8)
    inputs = (torch.randn(1, 3, 16, 16), torch.randn(1, 2, 16, 16))
    t = find_channel_groups(m, inputs)
    gates = GateSet(t)
    random_gates(gates, 0.4, seed=2)
    plain, info = export_pruned(m, gates, inputs)
    assert info["rel_diff"] <= 1e-4
    assert plain.body[0].in_channels < 16


def test_no_conv_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="no conv or linear layer"):
        find_channel_groups(nn.Sequential(nn.Tanh()), torch.randn(1, 3, 8, 8))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(st.sampled_from(OPS), min_size=1, max_size=6),
       widths=st.lists(st.integers(2, 12), min_size=7, max_size=7),
       norm=st.sampled_from(["instance", "instance_affine", "batch", "none"]),
       p_zero=st.floats(0.0, 0.8), seed=st.integers(0, 1000))
def test_fuzz_gate_prune_export_keeps_output(spec, widths, norm, p_zero, seed):
    torch.manual_seed(seed)
    m = RandomGenerator(spec, widths, norm)
    if norm == "batch":  # give BatchNorm non-trivial running statistics, then evaluate
        m.train()
        with torch.no_grad():
            m(torch.randn(4, 3, 16, 16))
    m.eval()
    x = torch.randn(1, 3, 16, 16)
    t = find_channel_groups(m, x)
    gates = GateSet(t)
    random_gates(gates, p_zero, seed)
    before = measure.count_macs(m, x)
    plain, info = export_pruned(m, gates, x)  # raises if the output differs by > 1e-4
    assert info["rel_diff"] <= 1e-4
    if any(not bool(a.all()) for a in gates.alive()):
        # conv/linear weights shrink; a gate folded into a non-affine norm makes it affine (2 values per
        # kept channel), which can outweigh a few removed channels, so norms are not counted here
        def weighted(net):
            return sum(p.numel() for mod in net.modules() if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
                       for p in mod.parameters(recurse=False))
        assert weighted(plain) < weighted(m)
        assert measure.count_macs(plain, x, "true") < measure.count_macs(m, x, "true") or before == 0


def test_channel_multiple_rounds_widths_and_survives_export():
    m, x, t, mm = resnet_with_macs_model(8)
    gates = GateSet(t)
    random_gates(gates, 0.3, seed=7)  # some gates exactly zero: rounding may keep them
    _, alive = threshold_for_target(gates, mm, 0.3 * mm.total, multiple=4)
    assert mm.macs(alive) <= 0.3 * mm.total
    assert all(int(a.sum()) % 4 == 0 or int(a.sum()) == a.numel() for a in alive)
    # block filling lands close to the target: no group can take one more block without exceeding it
    for gi, a in enumerate(alive):
        if int(a.sum()) + 4 <= a.numel():
            more = [x.clone() for x in alive]
            more[gi][torch.nonzero(~a)[:4, 0]] = True
            assert mm.macs(more) > 0.3 * mm.total
    gates.set_masks(alive)
    plain, info = export_pruned(m, gates, x)
    assert all(k % 4 == 0 for k in info["kept"].values())
    assert plain.model[7].out_channels == int(alive[2].sum())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=st.lists(st.sampled_from(OPS), min_size=1, max_size=5),
       widths=st.lists(st.integers(2, 10), min_size=6, max_size=6),
       norm=st.sampled_from(["instance", "instance_affine", "batch", "none"]),
       p_zero=st.floats(0.0, 0.7), seed=st.integers(0, 1000))
def test_fuzz_pruned_model_saves_and_reloads_bit_exactly_without_its_class(tmp_path_factory, spec, widths, norm,
                                                                          p_zero, seed):
    """Gate -> prune -> export -> ganslim.save -> ganslim.load (no class): the same outputs, bit for bit."""
    import ganslim

    torch.manual_seed(seed)
    m = RandomGenerator(spec, widths, norm)
    if norm == "batch":
        m.train()
        with torch.no_grad():
            m(torch.randn(4, 3, 16, 16))
    m.eval()
    x = torch.randn(1, 3, 16, 16)
    gates = GateSet(find_channel_groups(m, x))
    random_gates(gates, p_zero, seed)
    plain, _ = export_pruned(m, gates, x)
    path = ganslim.save(plain, tmp_path_factory.mktemp("fuzz") / "m.safetensors")
    back = ganslim.load(path)
    assert not isinstance(back, RandomGenerator)  # rebuilt from the stored architecture, not the class
    with torch.no_grad():
        assert torch.equal(back(x), plain.eval()(x))
