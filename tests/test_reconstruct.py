"""Least-squares reconstruction of a student cut from the teacher (ganslim.pruning.reconstruct): the
linear form of each layer, the fit, the channel correspondence after a prune, and the strategies that
use it on each of the field's generators."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ganslim
from ganslim.core.targeting import find_channel_groups
from ganslim.pruning.onestep import onestep_prune
from ganslim.pruning.reconstruct import (_design, _depthwise, _flat_weight, _reconstruct_one, _reconstructible,
                                         conv_targets, kept_channels, reconstruct_convs)
from ganslim.zoo import create_model

from test_targets_per_generator import GENERATORS, _teacher_and_loader


def _layer(kind: str, cin: int, cout: int, k: int, stride: int, pad: int, bias: bool, reflect: bool) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(cin, cout, k, stride, pad, bias=bias, padding_mode="reflect" if reflect and pad else "zeros")
    if kind == "depthwise":
        return nn.Conv2d(cin, cin, k, stride, pad, groups=cin, bias=bias)
    op = stride - 1 if stride > 1 else 0  # output padding must be below the stride
    if kind == "transposed":
        return nn.ConvTranspose2d(cin, cout, k, stride, pad, output_padding=op, bias=bias)
    return nn.ConvTranspose2d(cin, cin, k, stride, pad, output_padding=op, groups=cin, bias=bias)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["conv", "depthwise", "transposed", "depthwise-transposed"]), cin=st.integers(1, 5),
       cout=st.integers(1, 5), k=st.sampled_from([1, 3, 4, 7]), stride=st.integers(1, 2), pad=st.integers(0, 3),
       bias=st.booleans(), reflect=st.booleans(), h=st.integers(7, 12), w=st.integers(7, 12), seed=st.integers(0, 999))
def test_the_design_matrix_times_the_flat_weight_is_the_layer(kind, cin, cout, k, stride, pad, bias, reflect, h, w, seed):
    torch.manual_seed(seed)
    pad = min(pad, k - 1) if kind.endswith("transposed") else min(pad, h // 2 - 1)
    mod = _layer(kind, cin, cout, k, stride, pad, bias, reflect).double()
    assert _reconstructible(mod)
    x = torch.randn(2, cin, h, w, dtype=torch.float64)
    with torch.no_grad():
        y = mod(x)
        out = _design(mod, x) @ _flat_weight(mod)
        ref = y.permute(0, 2, 3, 1).reshape(-1, mod.out_channels)
        if bias:
            ref = ref - mod.bias
    if _depthwise(mod):  # (C, N*L, 1): channel by channel
        out = out.squeeze(-1).t()
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 1e-12 * max(float(ref.abs().max()), 1e-30)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "transposed", "depthwise-transposed"])
def test_the_fit_recovers_weights_that_produce_the_target(kind):
    # a target the layer can produce exactly: the fit finds those weights from a perturbed start
    torch.manual_seed(0)
    mod = _layer(kind, 4, 6, 3, 2, 1, True, False).double()
    truth = [p.detach().clone() for p in mod.parameters()]
    x = torch.randn(3, 4, 10, 11, dtype=torch.float64)
    y = mod(x).detach()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p))
    before, after, _ = _reconstruct_one(mod, x, y, ridge=1e-10, max_rows=1 << 16)
    assert before > 0.1 and after < 1e-6
    for p, t in zip(mod.parameters(), truth):
        assert float((p.detach() - t).abs().max()) <= 1e-6 * float(t.abs().max())


def test_a_fit_from_a_subset_of_rows_still_recovers_the_layer():
    # max_rows: a fixed random subset of each image's output positions, enough for 4*9+1 unknowns
    torch.manual_seed(1)
    mod = nn.Conv2d(4, 3, 3, padding=1).double()
    truth = mod.weight.detach().clone()
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    y = mod(x).detach()
    with torch.no_grad():
        mod.weight.mul_(-1)
    _, after, _ = _reconstruct_one(mod, x, y, ridge=1e-10, max_rows=200)
    assert after < 1e-6 and float((mod.weight.detach() - truth).abs().max()) <= 1e-6 * float(truth.abs().max())


def test_a_fit_no_better_than_the_start_keeps_the_weights():
    torch.manual_seed(2)
    mod = nn.Conv2d(3, 2, 3, padding=1).double()
    before_w = mod.weight.detach().clone()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    before, after, _ = _reconstruct_one(mod, x, mod(x).detach(), ridge=1e-3, max_rows=1 << 16)
    # the start is exact; the error read from the normal equations (W'GW - 2W'C + Y'Y, terms of ||Y||^2)
    # keeps about sqrt(float64 eps) ~ 1e-8 of cancellation noise, exactly 0 on some CPUs and not on others
    # (1.8e-8 on an Intel Xeon with AMX)
    assert before < 1e-6 and after == before and torch.equal(mod.weight, before_w)


def _dead_consumers(model: nn.Module, groups, alive) -> None:
    # zero every weight that reads a removed channel: the pruned network then computes the teacher's
    # kept channels exactly, and any error the fit sees comes from a wrong channel correspondence
    mods = dict(model.named_modules())
    with torch.no_grad():
        for g, a in zip(groups, alive):
            for m in g.members:
                mod = mods[m.name]
                if m.role != "consumer" or not isinstance(mod, nn.modules.conv._ConvNd) or _depthwise(mod):
                    continue
                dead = [c for c, p in zip(m.channels, m.positions) if not bool(a[p])]
                if dead:
                    mod.weight.index_fill_(0 if isinstance(mod, nn.ConvTranspose2d) else 1, torch.tensor(dead), 0.0)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_kept_channels_follow_the_prune(norm):
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm=norm).eval()
    x = torch.rand(4, 3, 24, 24) * 2 - 1
    targets = find_channel_groups(teacher, (x[:1],))
    gen = torch.Generator().manual_seed(3)
    alive = []
    for g in targets.groups:  # a scattered half of each group (not a leading run)
        a = torch.zeros(g.size, dtype=torch.bool)
        a[torch.randperm(g.size, generator=gen)[: max(1, g.size // 2)]] = True
        alive.append(a)
    _dead_consumers(teacher, targets.groups, alive)
    student = onestep_prune(teacher, targets, alive, x[:1])
    convs = conv_targets(teacher, teacher, targets.groups, alive)
    names = {n for n, m in teacher.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
    assert {c.student for c in convs} == names  # every conv of the ResNet generator has its teacher layer
    for c in convs:
        assert len(c.channels) == dict(student.named_modules())[c.student].out_channels
    errors = reconstruct_convs(student, teacher, [(x,)], convs)
    assert set(errors) == names
    assert max(b for b, _ in errors.values()) < 1e-5  # the student already computes the kept channels
    stem = [g.root for g in targets.groups].index("model.1")  # the stem conv's 8 channels are its group's
    assert kept_channels(targets.groups, alive, "model.1", 8).tolist() == alive[stem].nonzero().flatten().tolist()


def test_shared_layers_and_normalised_weights_are_left_alone():
    sn = torch.nn.utils.spectral_norm(nn.Conv2d(3, 3, 3))
    assert not _reconstructible(sn)  # its weight is recomputed from weight_orig on every forward
    assert not _reconstructible(nn.Conv2d(4, 4, 3, groups=2))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    torch.manual_seed(0)
    teacher, student = Twice(), Twice()
    before = student.conv.weight.detach().clone()
    convs = conv_targets(student, teacher, [], [])
    assert reconstruct_convs(student, teacher, [torch.randn(2, 3, 8, 8)], convs) == {}
    assert torch.equal(student.conv.weight, before)


@pytest.mark.slow
@pytest.mark.parametrize("generator", list(GENERATORS))
@pytest.mark.parametrize("strategy", ["onestep", "separable"])
def test_reconstruction_brings_the_cut_student_closer_to_the_teacher(strategy, generator):
    # without a fine-tune step: the student as the strategy hands it over, on the batch the fit saw
    # (on a held-out batch too where the batches hold more than a few hundred positions per unknown)
    teacher, train = _teacher_and_loader(generator)
    errors, notes = {}, {}
    for rec in (False, True):
        res = ganslim.compress(teacher, teacher, train, strategy=strategy, target_macs=0.2, finetune_steps=0, seed=0,
                               progress=False, measure_latency=False, reconstruct=rec)
        errs = []
        for batch in (train[0], train[-1]):
            with torch.no_grad():
                ref = teacher.eval()(batch[0])
                out = res.model.eval()(batch[0])
            errs.append(float((out - ref).norm() / ref.norm()))
        errors[rec] = errs
        notes[rec] = [n for n in res.report.notes if n.startswith("reconstruct:")]
    assert not notes[False] and len(notes[True]) == 1, notes
    assert errors[True][0] < errors[False][0], errors
    if generator.startswith("resnet9"):
        assert errors[True][1] < errors[False][1], errors


def test_a_student_of_another_design_is_not_reconstructed():
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="batch").eval()
    student = create_model("resnet_6blocks", ngf=12, norm="batch")
    loader = [(torch.rand(4, 3, 24, 24) * 2 - 1, torch.rand(4, 3, 24, 24) * 2 - 1) for _ in range(2)]
    res = ganslim.compress(copy.deepcopy(student), teacher, loader, strategy="onestep", target_macs=0.4,
                           finetune_steps=0, progress=False, measure_latency=False, reconstruct=True)
    assert not [n for n in res.report.notes if n.startswith("reconstruct:")]


def test_the_offset_of_a_layer_without_bias_moves_into_the_batchnorm_behind_it():
    # the teacher's conv has a bias, the student's (same name, same channels) has none: the fit needs an
    # offset, which goes into the BatchNorm's running mean, so the student then computes the teacher
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        teacher[0].bias.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        teacher[1].running_mean.copy_(torch.tensor([0.9, -1.8, 0.4, 3.2]))
        teacher[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 0.1]))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    student[1].load_state_dict(teacher[1].state_dict())
    x = torch.randn(4, 3, 16, 16)
    convs = conv_targets(student, teacher, [], [])
    assert [c.student for c in convs] == ["0"]
    errors = reconstruct_convs(student, teacher, [x], convs, ridge=1e-9)
    assert errors["0"][1] < 1e-5
    with torch.no_grad():
        ref, out = teacher(x), student(x)
    assert float((out - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert torch.allclose(student[1].running_mean, teacher[1].running_mean - teacher[0].bias, atol=1e-4)


def test_auto_can_choose_the_reconstructed_variants(tmp_path):
    import json

    from ganslim.strategies import choose_strategy, winners_from_rows

    rows = [{"target": 0.1, "strategy": "onestep+reconstruct", "psnr_gt": 28.5, "minutes": 1.0},
            {"target": 0.1, "strategy": "onestep", "psnr_gt": 27.5, "minutes": 1.0}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(dict(winners_from_rows(rows), source="test")))
    assert choose_strategy(0.1, path)[0] == {"strategy": "onestep", "reconstruct": True}
