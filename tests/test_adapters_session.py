"""ganslim.adapters: the GAN Slimming session inside a host's own loop, checkpoint helpers, import isolation."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

import ganslim
from ganslim import measure
from ganslim.adapters import (AdapterError, SlimSession, guess_pix2pix_flags, isolated_imports, load_matching,
                              read_state_dict, strip_spectral_norm, student_from_teacher)
from ganslim.zoo import create_model

from equivalence import assert_same_function


def _host_loop(session, student, steps, x, disc=None):
    """What a host repository does: its optimizer, its GAN loss, plus the session's two calls."""
    opt = torch.optim.Adam(student.parameters(), lr=1e-3, betas=(0.5, 0.999))
    for _ in range(steps):
        fake = student(x)
        loss = sum(session.losses(fake, x).values())
        if disc is not None:
            loss = loss + ((disc(fake) - 1) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step()


def test_session_compresses_in_a_host_loop_and_reloads_without_class(tmp_path):
    teacher = create_model("resnet_6blocks", ngf=8, norm="instance").eval()
    student = student_from_teacher(teacher)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    s = SlimSession(student, teacher, x, target_macs=0.3, steps=20, prune_every=2)
    disc = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 4, 1, 1))
    _host_loop(s, student, 24, x, disc)  # 20 gating + 4 fine-tune iterations
    assert s.final and s.macs_fraction <= 0.3 + 1e-6
    path = tmp_path / "slim.safetensors"
    plain = s.save(path)
    t_macs = measure.count_macs(teacher, x[:1])
    p_macs = measure.count_macs(plain, x[:1])
    assert p_macs <= 0.31 * t_macs
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    # the exported network computes the gated student's function
    student.eval()
    assert_same_function(plain, student, x[:1], tol=1e-4, b_with=(s.gates,))
    loaded = ganslim.load(path)  # no class needed
    assert not isinstance(loaded, type(teacher))
    with torch.no_grad():
        assert torch.equal(loaded(x[:1]), plain(x[:1]))
    # the student still trains with its hooks after an export, and the hooks come off cleanly
    student.train()
    _host_loop(s, student, 1, x)
    s.close()
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())


def test_session_resume_state_roundtrip():
    teacher = create_model("unet_128", ngf=4, norm="batch").eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    st = student_from_teacher(teacher)
    s = SlimSession(st, teacher, x, target_macs=0.5, steps=6, prune_every=1, distill_weight=0.0)
    _host_loop(s, st, 4, x)
    st2 = copy.deepcopy(st)
    for h in list(st2.modules()):
        h._forward_hooks.clear()
    s2 = SlimSession(st2, teacher, x, target_macs=0.5, steps=6, prune_every=1, distill_weight=0.0)
    s2.load_state_dict(s.state_dict())
    assert s2.iteration == 4 and all([torch.equal(a, b) for a, b in zip(s.gates.masks(), s2.gates.masks())])
    assert abs(s2.macs_fraction - s.macs_fraction) < 1e-9


def test_session_bad_input_messages():
    t = create_model("resnet_6blocks", ngf=4)
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(AdapterError, match="deepcopy"):
        SlimSession(t, t, x)
    with pytest.raises(AdapterError, match="raise target_macs"):
        SlimSession(student_from_teacher(t), t, x, target_macs=1e-6)
    other = create_model("resnet_6blocks", ngf=4, output_nc=1)
    with pytest.raises(AdapterError, match="teacher's generator flags"):
        SlimSession(other, t, x)


def test_checkpoint_not_matching_netG_names_the_flags(tmp_path):
    ckpt = tmp_path / "latest_net_G.pth"
    torch.save(create_model("unet_128", ngf=8, norm="batch").state_dict(), ckpt)
    sd = read_state_dict(ckpt)
    assert guess_pix2pix_flags(sd) == {"netG": "unet_128", "ngf": 8, "norm": "batch", "input_nc": 3, "output_nc": 3}
    net = create_model("resnet_9blocks", ngf=64)
    with pytest.raises(AdapterError, match="--netG unet_128 --ngf 8 --norm batch"):
        load_matching(net, sd, str(ckpt), "--netG resnet_9blocks", hint="--netG unet_128 --ngf 8 --norm batch")
    rs = create_model("resnet_9blocks", ngf=16, norm="instance").state_dict()
    assert guess_pix2pix_flags(rs)["netG"] == "resnet_9blocks" and guess_pix2pix_flags(rs)["ngf"] == 16
    assert guess_pix2pix_flags(create_model("unet_256", ngf=4).state_dict())["netG"] == "unet_256"


def test_missing_or_bad_teacher_file(tmp_path):
    with pytest.raises(AdapterError, match="does not exist: pass --teacher_checkpoint"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(AdapterError, match="no teacher checkpoint given"):
        read_state_dict("")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(AdapterError, match="cannot read"):
        read_state_dict(bad)


def test_strip_spectral_norm_keeps_function():
    net = create_model("spade", label_nc=3, ngf=2, crop_size=32, no_instance=True).eval()
    seg = torch.zeros(1, 3, 32, 32)
    seg[:, 1] = 1
    with torch.no_grad():
        ref = net(seg)
    n = strip_spectral_norm(net)
    assert n > 0 and not any(k.endswith("weight_orig") for k in net.state_dict())
    with torch.no_grad():  # the same float32 weights, computed the same way: equal up to rounding at the scale
        assert float((net(seg) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def _fake_repo(root, tag):
    for pkg in ("models", "util"):
        os.makedirs(root / pkg)
        (root / pkg / "__init__.py").write_text(f"TAG = {tag!r}\n")
    (root / "models" / "networks.py").write_text(f"from util import TAG as U\nNAME = {tag!r}\n")


def test_isolated_imports_leave_sys_modules_clean(tmp_path):
    a, b = tmp_path / "pix2pix", tmp_path / "spade"
    _fake_repo(a, "pix2pix")
    _fake_repo(b, "spade")
    before = {k for k in sys.modules if k.split(".")[0] in ("models", "util")}
    with isolated_imports(a, marker="models/networks.py"):
        from models import networks as na  # noqa: PLC0415
    with isolated_imports(b):
        from models import networks as nb  # noqa: PLC0415
    assert (na.NAME, na.U, nb.NAME, nb.U) == ("pix2pix", "pix2pix", "spade", "spade")
    assert {k for k in sys.modules if k.split(".")[0] in ("models", "util")} == before
    assert str(a) not in sys.path and str(b) not in sys.path
    with pytest.raises(AdapterError, match="does not look like"):
        with isolated_imports(a, marker="models/networks/generator.py"):
            pass
    with pytest.raises(AdapterError, match="does not exist"):
        with isolated_imports(tmp_path / "missing"):
            pass
