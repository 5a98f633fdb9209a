"""CartoonGAN generators: keys, sizes and forward against the public PyTorch code.

Reference figures were measured by instantiating the official classes in a scratch directory:
``Transformer`` of Yijunmaverick/CartoonGAN-Test-Pytorch-Torch (network/Transformer.py) and
``networks.generator`` of znxlwm/pytorch-CartoonGAN.  Key lists are stored as digests of
``"key:shape"`` lines in ``state_dict`` order.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from ganslim.zoo import create_model, list_models
from ganslim.zoo.cartoongan import CartoonGANGenerator, InstanceNormalization, Transformer


from zoo_helpers import _one_thread, key_digest, n_params  # noqa: E402,F401 - autouse fixture


def test_registered():
    assert {"cartoongan", "cartoongan_znxlwm"} <= set(list_models())


def test_transformer_sizes_and_keys_match_official():
    with torch.device("meta"):
        m = create_model("cartoongan")
    sd = m.state_dict()
    assert n_params(m) == 11_129_667
    assert len(sd) == 94
    assert key_digest(sd) == "fae78f1c5fbb8b0c"
    keys = list(sd)
    assert keys[:4] == ["conv01_1.weight", "conv01_1.bias", "in01_1.scale", "in01_1.shift"]
    assert keys[-2:] == ["deconv03_1.weight", "deconv03_1.bias"]
    assert tuple(sd["deconv01_1.weight"].shape) == (256, 128, 3, 3)  # ConvTranspose2d
    assert tuple(sd["in11_2.scale"].shape) == (256,)
    assert tuple(sd["deconv03_1.weight"].shape) == (3, 64, 7, 7)
    names = [n for n, _ in Transformer().named_children()]
    assert names[:3] == ["refpad01_1", "conv01_1", "in01_1"]
    assert names[-2:] == ["refpad12_1", "deconv03_1"]
    assert len(names) == 9 + 8 * 6 + 8


@pytest.mark.parametrize("nf,nb,params,nkeys,digest", [
    (64, 8, 11_120_195, 52, "9b18b97d1245c91e"),  # training script defaults
    (32, 6, 2_195_747, 44, "07454a9be4ad9bba"),  # class defaults upstream
])
def test_znxlwm_sizes_and_keys_match_official(nf, nb, params, nkeys, digest):
    with torch.device("meta"):
        m = create_model("cartoongan_znxlwm", nf=nf, nb=nb)
    sd = m.state_dict()
    assert (n_params(m), len(sd), key_digest(sd)) == (params, nkeys, digest)
    assert "resnet_blocks.0.conv1.weight" in sd and "up_convs.8.bias" in sd


def reference_instance_norm(x, scale, shift, eps=1e-9):
    # Upstream formula: unbiased variance rescaled to the biased one.
    n = x.shape[2] * x.shape[3]
    t = x.reshape(x.shape[0], x.shape[1], n)
    mean = t.mean(2)[:, :, None, None]
    var = t.var(2)[:, :, None, None] * ((n - 1) / n)
    return (x - mean) / torch.sqrt(var + eps) * scale[None, :, None, None] + shift[None, :, None, None]


def test_instance_normalization():
    torch.manual_seed(0)
    norm = InstanceNormalization(5)
    assert norm.eps == 1e-9
    assert [n for n, _ in norm.named_parameters()] == ["scale", "shift"]
    assert (norm.shift == 0).all() and (norm.scale >= 0).all() and (norm.scale <= 1).all()
    with torch.no_grad():
        norm.shift.uniform_(-1, 1)
    x = torch.randn(2, 5, 7, 6) * 3 + 1
    y = norm(x)
    torch.testing.assert_close(y, reference_instance_norm(x, norm.scale, norm.shift), rtol=1e-5, atol=1e-5)
    builtin = nn.functional.instance_norm(x, weight=norm.scale, bias=norm.shift, eps=1e-9)
    torch.testing.assert_close(y, builtin, rtol=1e-4, atol=1e-4)
    # forward (not __call__) is overridden, so hooks see it like any module
    seen = []
    norm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    norm(x)
    assert seen == [x.shape]


def test_transformer_forward_matches_manual_graph():
    torch.manual_seed(0)
    m = Transformer().eval()
    x = torch.rand(1, 3, 36, 44) * 2 - 1
    with torch.no_grad():
        y = m(x)
        # Independent re-statement of the upstream forward.
        relu = torch.relu
        h = relu(m.in01_1(m.conv01_1(m.refpad01_1(x))))
        h = relu(m.in02_1(m.conv02_2(m.conv02_1(h))))
        h = relu(m.in03_1(m.conv03_2(m.conv03_1(h))))
        for k in range(4, 12):
            get = lambda s: getattr(m, s % k)  # noqa: E731
            r = relu(get("in%02d_1")(get("conv%02d_1")(get("refpad%02d_1")(h))))
            h = get("in%02d_2")(get("conv%02d_2")(get("refpad%02d_2")(r))) + h
        h = relu(m.in12_1(m.deconv01_2(m.deconv01_1(h))))
        h = relu(m.in13_1(m.deconv02_2(m.deconv02_1(h))))
        ref = torch.tanh(m.deconv03_1(m.refpad12_1(h)))
    assert y.shape == (1, 3, 36, 44)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_znxlwm_forward_shape():
    torch.manual_seed(0)
    m = create_model("cartoongan_znxlwm", nf=16, nb=2).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 32, 40))
    assert y.shape == (2, 3, 32, 40) and y.abs().max() <= 1


def _via_bytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_round_trip_strict():
    torch.manual_seed(0)
    src = Transformer()
    dst = Transformer()
    assert dst.load_state_dict(_via_bytes(src.state_dict()), strict=True)
    x = torch.rand(1, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    src2 = CartoonGANGenerator(nf=8, nb=2)
    dst2 = CartoonGANGenerator(**src2._ganslim_init)
    assert dst2.load_state_dict(_via_bytes(src2.state_dict()), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(dst2(x), src2(x), rtol=0, atol=0)
