"""SPADE generator: sizes, keys and layer order against the official NVlabs/SPADE ``SPADEGenerator``.

Reference figures were measured by instantiating the official class (models/networks/generator.py,
architecture.py, normalization.py; ``SynchronizedBatchNorm2d`` stubbed with ``nn.BatchNorm2d``,
which has the same state_dict entries) in a scratch directory.  Key lists are stored as digests of
``"key:shape"`` lines in ``state_dict`` order.
"""
from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ganslim.zoo import create_model, list_models
from ganslim.zoo.spade import SPADE, SPADEGenerator, SPADEResnetBlock, from_opt, semantic_channels


from zoo_helpers import _one_thread, key_digest, n_params  # noqa: E402,F401 - autouse fixture


CITY = dict(label_nc=35)  # + instance-edge channel -> semantic_nc 36

# kwargs -> (parameters, number of state_dict entries, key digest), official code.
OFFICIAL = [
    (dict(CITY), (93_048_003, 234, "4a89c63afeebdc04")),
    (dict(CITY, norm_G="spadesyncbatch3x3"), (93_048_003, 198, "a00def48c3a042c4")),
    (dict(CITY, norm_G="spadeinstance3x3"), (93_048_003, 144, "1447a9c737430d31")),
    (dict(CITY, norm_G="spectralspadebatch5x5"), (139_201_731, 234, "b65e8986e6ee98e1")),
    (dict(CITY, crop_size=512, aspect_ratio=2.0, num_upsampling_layers="more"), (93_048_003, 234, "4a89c63afeebdc04")),
    (dict(CITY, num_upsampling_layers="most"), (93_570_659, 272, "0d00577e57681c5b")),
    (dict(label_nc=150, contain_dontcare_label=True, no_instance=True), (96_492_483, 234, "2fd4aa22a777e6cc")),
    (dict(label_nc=182, contain_dontcare_label=True), (97_480_899, 234, "5c9448a0e326ed9c")),
    (dict(CITY, use_vae=True), (109_557_955, 234, "3fbc834ed4fa61a3")),
    (dict(CITY, ngf=16), (11_313_651, 234, "0cb2bf231a8cee96")),
    (dict(CITY, ngf=16, norm_G="spadesyncbatch3x3"), (11_313_651, 198, "b096d2deab3756a6")),
    (dict(CITY, ngf=16, num_upsampling_layers="most"), (11_532_347, 272, "ff0651357db67add")),
]


def test_registered():
    assert "spade" in list_models()


@pytest.mark.parametrize("kwargs,expected", OFFICIAL, ids=[json.dumps(k) for k, _ in OFFICIAL])
def test_sizes_and_keys_match_official(kwargs, expected):
    with torch.device("meta"):
        m = create_model("spade", **kwargs)
    sd = m.state_dict()
    assert (n_params(m), len(sd), key_digest(sd)) == expected


def test_explicit_keys_spectral():
    with torch.device("meta"):
        sd = create_model("spade", label_nc=35).state_dict()
    keys = list(sd)
    assert keys[:2] == ["fc.weight", "fc.bias"]
    assert keys[-2:] == ["conv_img.weight", "conv_img.bias"]
    assert tuple(sd["fc.weight"].shape) == (1024, 36, 3, 3)
    assert keys[2:6] == ["head_0.conv_0.bias", "head_0.conv_0.weight_orig",
                         "head_0.conv_0.weight_u", "head_0.conv_0.weight_v"]
    assert tuple(sd["up_0.conv_s.weight_orig"].shape) == (512, 1024, 1, 1)
    assert "up_0.conv_s.bias" not in sd and "head_0.conv_s.weight_orig" not in sd
    assert tuple(sd["up_0.conv_0.weight_u"].shape) == (512,)
    assert tuple(sd["up_0.conv_0.weight_v"].shape) == (1024 * 9,)
    assert tuple(sd["up_3.norm_1.mlp_shared.0.weight"].shape) == (128, 36, 3, 3)
    assert tuple(sd["up_3.norm_1.mlp_gamma.weight"].shape) == (64, 128, 3, 3)
    assert tuple(sd["up_3.norm_s.mlp_beta.bias"].shape) == (128,)
    assert tuple(sd["G_middle_1.norm_0.param_free_norm.running_var"].shape) == (1024,)
    assert "G_middle_1.norm_0.param_free_norm.num_batches_tracked" in sd
    assert "up_4.conv_0.weight_orig" not in sd


def test_explicit_keys_plain():
    with torch.device("meta"):
        sd = create_model("spade", label_nc=35, norm_G="spadeinstance3x3").state_dict()
    assert "head_0.conv_0.weight" in sd and not any("weight_orig" in k for k in sd)
    assert not any("param_free_norm" in k for k in sd)  # affine-free instance norm: nothing stored


def _one_hot(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, c, (n, h, w), generator=g)
    return F.one_hot(lab, c).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("norm_G", ["spectralspadesyncbatch3x3", "spadesyncbatch3x3", "spadeinstance3x3"])
def test_forward_normal(norm_G):
    torch.manual_seed(0)
    m = create_model("spade", label_nc=35, ngf=8, crop_size=64, norm_G=norm_G).eval()
    seg = _one_hot(2, 36, 64, 64)
    with torch.no_grad():
        y = m(seg)
        y2 = m(seg)
    assert y.shape == (2, 3, 64, 64)
    assert torch.isfinite(y).all() and y.abs().max() <= 1
    torch.testing.assert_close(y, y2)  # eval: spectral norm's power iteration is frozen


@pytest.mark.parametrize("layers,crop,aspect,shape", [
    ("more", 128, 2.0, (64, 128)),
    ("most", 256, 1.0, (256, 256)),
    ("normal", 96, 1.5, (64, 96)),
])
def test_forward_upsampling_variants(layers, crop, aspect, shape):
    torch.manual_seed(0)
    m = create_model("spade", label_nc=3, no_instance=True, ngf=4, crop_size=crop, aspect_ratio=aspect,
                     num_upsampling_layers=layers).eval()
    seg = _one_hot(1, 3, *shape)
    with torch.no_grad():
        assert m(seg).shape == (1, 3, *shape)


def test_forward_vae_uses_z():
    torch.manual_seed(0)
    m = create_model("spade", label_nc=4, ngf=4, crop_size=64, use_vae=True, z_dim=8).eval()
    assert isinstance(m.fc, nn.Linear) and m.fc.out_features == 16 * 4 * 2 * 2
    seg = _one_hot(2, 5, 64, 64)
    z = torch.randn(2, 8)
    with torch.no_grad():
        a, b, c = m(seg, z), m(seg, z), m(seg)
    assert a.shape == c.shape == (2, 3, 64, 64)
    torch.testing.assert_close(a, b)


def test_train_mode_updates_spectral_vectors_and_batch_stats():
    torch.manual_seed(0)
    m = create_model("spade", label_nc=3, ngf=4, crop_size=32).train()
    u0 = m.head_0.conv_0.weight_u.clone()
    m(_one_hot(2, 4, 32, 32))
    assert not torch.equal(u0, m.head_0.conv_0.weight_u)
    assert m.head_0.norm_0.param_free_norm.num_batches_tracked.item() == 1


def test_spade_norm_module():
    torch.manual_seed(0)
    norm = SPADE("spadeinstance5x5", 6, 4)
    assert norm.mlp_shared[0].kernel_size == (5, 5) and isinstance(norm.mlp_shared[1], nn.ReLU)
    x = torch.randn(2, 6, 8, 8)
    seg = _one_hot(2, 4, 16, 16)
    out = norm(x, seg)
    s = F.interpolate(seg, size=(8, 8), mode="nearest")
    a = norm.mlp_shared(s)
    ref = F.instance_norm(x) * (1 + norm.mlp_gamma(a)) + norm.mlp_beta(a)
    torch.testing.assert_close(out, ref)
    assert isinstance(SPADE("spadesyncbatch3x3", 6, 4).param_free_norm, nn.BatchNorm2d)
    assert not SPADE("spadebatch3x3", 6, 4).param_free_norm.affine
    with pytest.raises(ValueError):
        SPADE("spadegroup3x3", 6, 4)


def test_resnet_block_shortcut():
    blk = SPADEResnetBlock(8, 4, norm_G="spectralspadeinstance3x3", semantic_nc=3)
    assert blk.learned_shortcut and blk.conv_s.bias is None
    assert blk.norm_1.mlp_gamma.out_channels == 4  # fmiddle = min(fin, fout)
    same = SPADEResnetBlock(4, 4, norm_G="spadeinstance3x3", semantic_nc=3)
    assert not same.learned_shortcut and not hasattr(same, "conv_s")
    x = torch.randn(1, 8, 8, 8)
    assert blk(x, _one_hot(1, 3, 8, 8)).shape == (1, 4, 8, 8)


def test_semantic_nc_and_from_opt():
    assert semantic_channels(35) == 36
    assert semantic_channels(150, no_instance=True, contain_dontcare_label=True) == 151
    assert semantic_channels(182, contain_dontcare_label=True) == 184
    opt = argparse.Namespace(label_nc=10, contain_dontcare_label=True, no_instance=False, ngf=4, crop_size=128,
                             aspect_ratio=2.0, num_upsampling_layers="more", norm_G="spadeinstance3x3",
                             use_vae=False, z_dim=256, init_type="xavier", init_variance=0.02,
                             semantic_nc=12, gpu_ids=[], batchSize=1)
    m = from_opt(opt)
    assert m.semantic_nc == 12 and (m.sw, m.sh) == (2, 1)  # 128 // 2**6 = 2, round(2 / 2.0) = 1
    direct = SPADEGenerator(label_nc=10, contain_dontcare_label=True, ngf=4, crop_size=128, aspect_ratio=2.0,
                            num_upsampling_layers="more", norm_G="spadeinstance3x3")
    assert key_digest(m.state_dict()) == key_digest(direct.state_dict())
    assert from_opt(dict(label_nc=3)).semantic_nc == 4  # missing attributes take defaults


def test_round_trip_strict():
    torch.manual_seed(0)
    src = create_model("spade", label_nc=35, ngf=8, crop_size=64)
    src.train()
    src(_one_hot(2, 36, 64, 64))  # move the spectral vectors and running stats off their initial values
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    init = json.loads(json.dumps(src._ganslim_init))
    dst = SPADEGenerator(**init)
    assert dst.load_state_dict(sd, strict=True)
    seg = _one_hot(1, 36, 64, 64, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(seg), src.eval()(seg), rtol=0, atol=0)


def test_spectral_and_plain_weights_interchange():
    # A spectral checkpoint does not load into a plain model (different keys), as upstream.
    spec = create_model("spade", label_nc=3, ngf=4, crop_size=32)
    plain = create_model("spade", label_nc=3, ngf=4, crop_size=32, norm_G="spadesyncbatch3x3")
    with pytest.raises(RuntimeError):
        plain.load_state_dict(spec.state_dict(), strict=True)


def test_bad_options():
    with pytest.raises(ValueError):
        SPADEGenerator(label_nc=3, num_upsampling_layers="many")
