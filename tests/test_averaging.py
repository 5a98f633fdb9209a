"""How a fine-tune ends: the weight average and the BatchNorm re-estimation (ganslim.core.averaging)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ganslim.core.averaging import WeightAverage, recalibrate_batchnorm
from ganslim.zoo import create_model


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 3, 1))


def test_the_average_follows_the_exponential_rule_and_copies_integer_buffers():
    m = _conv_bn()
    with torch.no_grad():
        m[0].weight.zero_()
    avg = WeightAverage(m, horizon_steps=4)  # decay 0.75
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[1].num_batches_tracked.fill_(7)
    for _ in range(3):
        avg.update()
    w = avg.average["0.weight"]
    torch.testing.assert_close(w, torch.full_like(w, 1 - 0.75 ** 3), rtol=1e-6, atol=0)
    assert int(avg.average["1.num_batches_tracked"]) == 7
    fresh = _conv_bn()
    avg.copy_to(fresh)
    torch.testing.assert_close(fresh[0].weight, w, rtol=0, atol=0)
    # the model itself still holds its own weights until copy_to()
    assert float(m[0].weight.detach().min()) == 1.0
    with pytest.raises(ValueError, match="horizon_steps"):
        WeightAverage(m, horizon_steps=0.5)


def test_the_average_resumes_from_its_state_dict():
    a, b = _conv_bn(), _conv_bn()
    avg_a, avg_b = WeightAverage(a, 10), WeightAverage(b, 10)
    for step in range(6):
        with torch.no_grad():
            for m in (a, b):
                m[0].weight.add_(0.1 * step)
        avg_a.update()
        if step == 2:  # b is "restarted" from a checkpoint of its average
            saved = avg_b.state_dict()
            avg_b = WeightAverage(b, 10)
            avg_b.load_state_dict(saved)
        avg_b.update()
    for k in avg_a.average:
        assert torch.equal(avg_a.average[k], avg_b.average[k]), k
    with pytest.raises(ValueError, match="another model"):
        WeightAverage(nn.Linear(2, 2), 10).load_state_dict(saved)


def test_recalibration_gives_the_mean_over_all_batches_and_restores_the_flags():
    m = _conv_bn()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 8, 8, generator=g) * (1 + i),) for i in range(6)]
    m.eval()
    momentum = m[1].momentum
    assert recalibrate_batchnorm(m, batches) == 1
    assert not m.training and m[1].momentum == momentum
    with torch.no_grad():
        pre = [m[0](x) for (x,) in batches]  # what the BatchNorm saw
    means = torch.stack([p.mean((0, 2, 3)) for p in pre])
    variances = torch.stack([p.var((0, 2, 3), unbiased=True) for p in pre])  # the running variance is unbiased
    scale = float(variances.mean())
    torch.testing.assert_close(m[1].running_mean, means.mean(0), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(m[1].running_var, variances.mean(0), rtol=0, atol=1e-5 * scale)
    # the last batch alone (the running average's bias at momentum 0.1 is towards the latest) differs
    assert float((m[1].running_var - variances[-1]).abs().max()) > 0.1 * scale


def test_recalibration_leaves_instance_norm_and_empty_input_alone():
    net = create_model("resnet_6blocks", ngf=4, norm="instance")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_batchnorm(net, [(torch.randn(1, 3, 16, 16),)]) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    m = _conv_bn()
    stats = m[1].running_var.clone()
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(m, [])
    assert torch.equal(m[1].running_var, stats)  # nothing was reset


def test_finetune_ends_with_the_average_of_its_trajectory_then_recalibrated_statistics():
    """The fine-tune's result is the exponential average of the states it passed through (computed
    here from the trajectory, step by step), with BatchNorm statistics re-estimated from the first
    ``bn_batches`` batches through the averaged weights."""
    from ganslim.core.train import LossWeights, finetune

    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=4, norm="batch").eval()
    student = create_model("resnet_6blocks", ngf=4, norm="batch")
    g = torch.Generator().manual_seed(1)
    loader = [(x, torch.tanh(x.flip(1))) for x in (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1 for _ in range(5))]
    steps, average, bn_batches = 12, 0.25, 3  # horizon 3 steps: decay 2/3
    states = [{k: v.clone() for k, v in student.state_dict().items()}]
    finetune(student, teacher, loader, steps, 1e-2, LossWeights(), progress=False, average=average,
             bn_batches=bn_batches, callbacks=[lambda tr, _: states.append(
                 {k: v.clone() for k, v in tr.student.state_dict().items()})])
    assert len(states) == steps + 1
    expected = {k: v.clone() for k, v in states[0].items()}
    for s in states[1:]:
        for k, v in s.items():
            expected[k] = expected[k] + (v - expected[k]) / 3 if v.is_floating_point() else v.clone()
    got = student.state_dict()
    assert not student.training
    for k, v in got.items():
        if "running_" in k or "num_batches" in k:
            continue
        scale = float(expected[k].abs().max()) or 1.0
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-5 * scale)
    last = states[-1]["model.1.weight"]
    assert float((got["model.1.weight"] - last).abs().max()) > 1e-3 * float(last.abs().max())  # not the last step
    # statistics: the first BatchNorm's input is the first conv's output; cumulative over 3 batches
    conv = student.model[1]
    with torch.no_grad():
        pre = [conv(student.model[0](x)) for x, _ in loader[:bn_batches]]
    mean = torch.stack([p.mean((0, 2, 3)) for p in pre]).mean(0)
    var = torch.stack([p.var((0, 2, 3)) for p in pre]).mean(0)
    bn = student.model[2]
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-5 * float(var.mean()))
    torch.testing.assert_close(bn.running_var, var, rtol=0, atol=1e-5 * float(var.mean()))


def test_resuming_a_checkpoint_without_the_average_is_a_clear_error(tmp_path):
    from ganslim.core.train import LossWeights, finetune

    teacher = create_model("resnet_6blocks", ngf=4, norm="batch").eval()
    student = create_model("resnet_6blocks", ngf=4, norm="batch")
    loader = [(torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1) for _ in range(2)]
    ckpt = str(tmp_path / "finetune.pt")
    finetune(student, teacher, loader, 2, 1e-3, LossWeights(), progress=False, checkpoint=ckpt, average=0.0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match="no saved average"):
        finetune(student, teacher, loader, 4, 1e-3, LossWeights(), progress=False, checkpoint=ckpt, average=0.5)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # nothing was loaded
