"""pix2pix/CycleGAN U-Net: sizes, keys and layer order against the official ``networks.UnetGenerator``.

Reference figures were measured by instantiating the official class
(junyanz/pytorch-CycleGAN-and-pix2pix, models/networks.py) in a scratch directory; the key list
is stored as a digest of ``"key:shape"`` lines in ``state_dict`` order (so it pins the order too).
"""
from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ganslim.zoo import create_model, list_models
from ganslim.zoo.unet import UnetGenerator, UnetSkipConnectionBlock


from zoo_helpers import _one_thread, key_digest, n_params  # noqa: E402,F401 - autouse fixture


# (factory, norm, ngf) -> (parameters, number of state_dict entries, key digest), official code.
OFFICIAL = {
    ("unet_256", "batch", 64): (54_413_955, 82, "5886f09f2337bdc4"),
    ("unet_256", "instance", 64): (54_409_603, 32, "de773564613fe688"),
    ("unet_256", "batch", 8): (852_307, 82, "aa28fa7e1fc58834"),
    ("unet_256", "instance", 8): (851_763, 32, "0ca641e9aa01cbd0"),
    ("unet_128", "batch", 64): (41_828_995, 70, "e1b5ed1f8e68cde4"),
    ("unet_128", "instance", 64): (41_825_667, 28, "bc386e54426b1ac2"),
    ("unet_128", "batch", 8): (655_443, 70, "9ea7e558d66eb38d"),
    ("unet_128", "instance", 8): (655_027, 28, "975d5ed594c05866"),
}


def test_registered():
    assert {"unet_128", "unet_256"} <= set(list_models())


@pytest.mark.parametrize("use_dropout", [False, True])
@pytest.mark.parametrize("name,norm,ngf", sorted(OFFICIAL))
def test_sizes_and_keys_match_official(name, norm, ngf, use_dropout):
    with torch.device("meta"):
        m = create_model(name, ngf=ngf, norm=norm, use_dropout=use_dropout)
    params, nkeys, digest = OFFICIAL[(name, norm, ngf)]
    sd = m.state_dict()
    assert n_params(m) == params
    assert len(sd) == nkeys
    assert key_digest(sd) == digest  # dropout sits at the end of a block: keys are unchanged


def test_explicit_keys_unet_256_batch():
    with torch.device("meta"):
        sd = create_model("unet_256", norm="batch").state_dict()
    keys = list(sd)
    assert keys[:2] == ["model.model.0.weight", "model.model.1.model.1.weight"]  # batch norm: no conv bias
    assert keys[-2:] == ["model.model.3.weight", "model.model.3.bias"]
    innermost = "model.model.1" + ".model.3" * 6 + ".model"  # the 8th (innermost) level's Sequential
    assert tuple(sd[f"{innermost}.1.weight"].shape) == (512, 512, 4, 4)  # innermost down-conv
    assert tuple(sd[f"{innermost}.3.weight"].shape) == (512, 512, 4, 4)  # innermost up-convT
    assert f"{innermost}.4.running_var" in sd  # innermost up-norm
    assert "model.model.1.model.1.bias" not in sd  # batch norm: convs without bias
    assert tuple(sd["model.model.1.model.5.weight"].shape) == (256, 64, 4, 4)
    assert tuple(sd["model.model.3.weight"].shape) == (128, 3, 4, 4)


def test_explicit_keys_unet_128_instance():
    with torch.device("meta"):
        sd = create_model("unet_128", norm="instance").state_dict()
    assert "model.model.1.model.1.bias" in sd  # instance norm: convs carry a bias
    assert not any("running" in k for k in sd)
    assert tuple(sd["model.model.0.weight"].shape) == (64, 3, 4, 4)


def test_module_types_match_official():
    m = create_model("unet_256", ngf=8, norm="batch", use_dropout=True)
    outer = m.model.model
    assert [type(x) for x in outer] == [nn.Conv2d, UnetSkipConnectionBlock, nn.ReLU, nn.ConvTranspose2d, nn.Tanh]
    mid = outer[1].model[3].model[3].model[3].model  # first ngf*8 level with dropout
    assert [type(x) for x in mid] == [nn.LeakyReLU, nn.Conv2d, nn.BatchNorm2d, UnetSkipConnectionBlock,
                                      nn.ReLU, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Dropout]
    assert mid[0].inplace and mid[0].negative_slope == 0.2 and mid[4].inplace and mid[7].p == 0.5
    assert not any(isinstance(x, nn.Dropout) for x in outer[1].model)  # ngf*4 levels: no dropout


@pytest.mark.parametrize("name,size", [("unet_128", 128), ("unet_256", 256)])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_forward_shape(name, size, norm):
    torch.manual_seed(0)
    m = create_model(name, ngf=8, norm=norm, input_nc=2, output_nc=5).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 2, size, size))
    assert y.shape == (2, 5, size, size)
    assert torch.isfinite(y).all() and y.abs().max() <= 1


def test_skip_connection_carries_leaky_relu_of_input():
    # Upstream quirk kept on purpose: the in-place LeakyReLU rewrites the tensor that is concatenated.
    torch.manual_seed(0)
    inner = UnetSkipConnectionBlock(4, 4, innermost=True, norm_layer=nn.BatchNorm2d).eval()
    x = torch.randn(1, 4, 8, 8)
    expected_skip = F.leaky_relu(x, 0.2)
    with torch.no_grad():
        y = inner(x.clone())
    assert y.shape == (1, 8, 8, 8)
    torch.testing.assert_close(y[:, :4], expected_skip)


def test_round_trip_strict():
    torch.manual_seed(0)
    src = create_model("unet_256", ngf=8, norm="batch")
    for mod in src.modules():  # non-trivial running stats
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    dst = UnetGenerator(3, 3, 8, 8, norm="batch")
    assert dst.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_rebuild_from_ganslim_init():
    m = create_model("unet_128", ngf=8, norm="batch", use_dropout=True)
    init = json.loads(json.dumps(m._ganslim_init))
    assert init == dict(input_nc=3, output_nc=3, num_downs=7, ngf=8, use_dropout=True, norm="batch")
    again = UnetGenerator(**init)
    assert again.load_state_dict(m.state_dict(), strict=True)
    assert create_model("unet_256")._ganslim_init["norm"] == "instance"


def test_rejects_too_few_downsamplings():
    with pytest.raises(ValueError):
        UnetGenerator(num_downs=4)
