"""Channels-last training (ganslim.core.memory_format): same function, layouts restored, fallback."""
import copy

import pytest
import torch
from torch import nn

from ganslim.core import memory_format as mf
from ganslim.core.train import LossWeights, finetune
from ganslim.zoo import create_model


def tiny_resnet(norm="batch"):
    return create_model("resnet_6blocks", ngf=4, norm=norm)


def _loader(n=4, batch=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, 3, size, size, generator=g) * 2 - 1)
            for _ in range(n)]


def _four_d_layouts(model):
    return {n: t.is_contiguous() for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.dim() == 4}


def test_resolve():
    plain = tiny_resnet()
    separable = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 3, 1))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    assert mf.has_depthwise_conv(separable) and not mf.has_depthwise_conv(plain)
    assert not mf.has_depthwise_conv(grouped)
    assert mf.resolve_memory_format("auto", "cpu", separable) is True
    assert mf.resolve_memory_format("auto", "cpu", plain) is False
    assert mf.resolve_memory_format("auto", "cpu") is False
    assert mf.resolve_memory_format("auto", "cuda", separable) is False
    assert mf.resolve_memory_format("channels_last", "cuda") is True
    assert mf.resolve_memory_format("contiguous", "cpu") is False
    with pytest.raises(ValueError, match="memory_format"):
        mf.resolve_memory_format("nhwc")


def test_the_context_converts_and_restores_exactly_what_it_converted():
    net = tiny_resnet()
    net.register_buffer("already_nhwc", torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    weight = net.get_submodule(next(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d))).weight
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with mf.channels_last(net, None):
        convs = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert weight is next(m.weight for m in net.modules() if isinstance(m, nn.Conv2d))  # same Parameter
    assert all(_four_d_layouts(net)[k] for k in _four_d_layouts(net) if k != "already_nhwc")
    assert net.already_nhwc.is_contiguous(memory_format=torch.channels_last)  # not ours to change
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_context_restores_on_an_exception():
    net = tiny_resnet()
    with pytest.raises(KeyError):
        with mf.channels_last(net):
            raise KeyError("boom")
    assert all(_four_d_layouts(net).values())


def test_a_channels_last_forward_computes_the_same_function():
    torch.manual_seed(0)
    net = tiny_resnet().eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        ref = net(x)
        with mf.channels_last(net):
            out = net(*mf.to_channels_last((x,)))
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


class _Flattens(nn.Module):
    """A model that calls .view on an activation: fails on channels-last inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        return y.view(b, c * h * w).view(b, c, h, w)[:, :3]


def test_a_model_that_needs_nchw_is_detected_and_trained_in_nchw():
    net = _Flattens()
    x = (torch.randn(2, 3, 8, 8),)
    assert mf.channels_last_failure(net, x) is not None
    assert mf.channels_last_failure(tiny_resnet(), x) is None
    assert net.training and all(_four_d_layouts(net).values())  # the probe changed nothing
    teacher = copy.deepcopy(net).eval()
    with pytest.warns(UserWarning, match="training in NCHW"):
        finetune(net, teacher, _loader(2, 2, 8), steps=2, lr=1e-3, weights=LossWeights(), progress=False,
                 memory_format="channels_last")
    assert all(_four_d_layouts(net).values())


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_finetune_in_channels_last_trains_the_same_network_and_returns_nchw(norm):
    torch.manual_seed(0)
    teacher = tiny_resnet(norm).eval()
    torch.manual_seed(1)
    start = tiny_resnet(norm)
    ref, net = copy.deepcopy(start), copy.deepcopy(start)
    loader, w = _loader(), LossWeights()
    finetune(ref, teacher, loader, steps=4, lr=1e-3, weights=w, progress=False, memory_format="contiguous")
    finetune(net, teacher, loader, steps=4, lr=1e-3, weights=w, progress=False, memory_format="channels_last")
    assert all(_four_d_layouts(net).values()) and all(_four_d_layouts(teacher).values())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b, s = ref(x), net(x), start.eval()(x)
    # Adam's first steps move each weight by about lr whatever the gradient's size, so weights whose
    # gradient is ~0 (a conv bias before a norm) take summation-order noise as their direction: compare
    # what the training did to the output, not the weights
    trained, apart = (a - s).abs().max(), (a - b).abs().max()
    print(norm, float(trained), float(apart))
    assert trained > 0 and apart <= 0.05 * trained


def test_a_resumed_channels_last_run_with_an_average_ends_as_an_uninterrupted_one(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_resnet().eval()
    torch.manual_seed(1)
    whole = tiny_resnet()
    parts = copy.deepcopy(whole)
    loader, w = _loader(6), LossWeights()
    kw = dict(lr=1e-3, weights=w, progress=False, memory_format="channels_last", average=0.5)
    finetune(whole, teacher, loader, steps=6, **kw)
    ckpt = str(tmp_path / "ft.pt")

    class Stop(Exception):
        pass

    def stop_at_4(tr, losses):  # after the checkpoint of step 3
        if tr.state.step == 4:
            raise Stop

    with pytest.raises(Stop):
        finetune(parts, teacher, loader, steps=6, checkpoint=ckpt, checkpoint_every=3, callbacks=[stop_at_4], **kw)
    assert all(_four_d_layouts(parts).values())  # restored on the way out of the failed run
    finetune(parts, teacher, loader, steps=6, checkpoint=ckpt, checkpoint_every=3, **kw)
    for (k, p), q in zip(whole.state_dict().items(), parts.state_dict().values()):
        assert torch.equal(p, q), k


def test_the_inference_wrapper_runs_a_copy_in_nhwc():
    torch.manual_seed(0)
    net = tiny_resnet().eval()
    wrapped = mf.ChannelsLast(net)
    x = torch.randn(1, 3, 20, 28)
    with torch.no_grad():
        ref, out = net(x), wrapped(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert all(_four_d_layouts(net).values())  # the original is untouched
