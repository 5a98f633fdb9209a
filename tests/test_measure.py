"""Tests of ganslim.measure: exact MAC counts against hand counts, real reference figures,
PSNR against closed forms, SSIM against scikit-image, latency/memory sanity."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from ganslim.measure import (
    LatencyStats,
    compare_outputs,
    count_macs,
    count_params,
    fidelity_to_target,
    macs_by_module,
    measure_latency,
    model_size_mb,
    peak_memory_mb,
    psnr,
    ssim,
    throughput,
)


# --------------------------------------------------------------------------- hand counting
def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def convT_out(size: int, k: int, s: int, p: int, d: int, op: int) -> int:
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


def resnet9_hand(ngf: int = 64, size: int = 256, n: int = 1) -> dict:
    """Pure-python count of the pix2pix ResNet-9 generator (3 -> 3 channels, instance norm)."""
    s2, s4 = size // 2, size // 4
    convs_common = (
        n * size * size * ngf * 3 * 7 * 7            # 7x7 stem
        + n * s2 * s2 * (2 * ngf) * ngf * 9          # down 1
        + n * s4 * s4 * (4 * ngf) * (2 * ngf) * 9    # down 2
        + 18 * n * s4 * s4 * (4 * ngf) * (4 * ngf) * 9  # 9 blocks x 2 convs
        + n * size * size * 3 * ngf * 7 * 7          # 7x7 head
    )
    # ConvTranspose 4ngf -> 2ngf (s4 -> s2) and 2ngf -> ngf (s2 -> size)
    up_by_output = n * s2 * s2 * (2 * ngf) * (4 * ngf) * 9 + n * size * size * ngf * (2 * ngf) * 9
    up_by_input = n * s4 * s4 * (4 * ngf) * (2 * ngf) * 9 + n * s2 * s2 * (2 * ngf) * ngf * 9
    # instance-norm outputs (fvcore "true": 4 per element without affine; papers: 0)
    norm_elems = n * (ngf * size**2 + 2 * ngf * s2**2 + 4 * ngf * s4**2 + 18 * 4 * ngf * s4**2
                      + 2 * ngf * s2**2 + ngf * size**2)
    return {"papers": convs_common + up_by_output, "true": convs_common + up_by_input + 4 * norm_elems}


@pytest.fixture(scope="module")
def resnet9():
    from ganslim.zoo import create_model

    torch.manual_seed(0)
    return create_model("resnet_9blocks")


def test_resnet9_params(resnet9):
    assert count_params(resnet9) == 11_378_179


def test_resnet9_macs_papers_and_true(resnet9):
    x = torch.randn(1, 3, 256, 256)
    resnet9.train()
    papers = count_macs(resnet9, x)
    true = count_macs(resnet9, x, convention="true")
    assert resnet9.training and all(m.training for m in resnet9.modules())  # flag restored
    hand = resnet9_hand()
    # Exact figures: 56,799,264,768 (papers: all convolutions, transposed by output size; the
    # non-affine instance norms count 0 as in torchprofile) and 49,681,530,880 (fvcore).
    assert papers == hand["papers"] == 56_799_264_768
    assert true == hand["true"] == 49_681_530_880
    assert abs(papers - 56_799_264_768) / 56_799_264_768 < 0.005
    assert 56.8e9 <= round(papers / 1e9, 2) * 1e9 <= 56.9e9  # "56.8 G" of GAN Compression
    assert 49.5e9 < true < 49.7e9


def test_resnet9_by_module_small(resnet9):
    x = torch.randn(1, 3, 32, 32)
    per = macs_by_module(resnet9, x)
    assert sum(per.values()) == resnet9_hand(size=32)["papers"]
    # first ConvTranspose2d of the official layout sits at model.19: 256 -> 128, 8x8 -> 16x16
    assert isinstance(resnet9.model[19], nn.ConvTranspose2d)
    assert per["model.19"] == 16 * 16 * 128 * 256 * 9
    assert per["model.19"] == 4 * macs_by_module(resnet9, x, convention="true")["model.19"]
    assert per["model.10.conv_block.1"] == 8 * 8 * 256 * 256 * 9
    assert per["model.3"] == 0  # ReLU
    assert "" not in per  # the root runs no op of its own


def _random_conv_net(rng: random.Random, size: int):
    """Random conv stack plus its hand-counted MACs (both conventions agree: no transposed conv,
    no norm) and input."""
    layers, macs = [], 0
    c, h, w, n = rng.randint(1, 4), size, size + rng.randint(0, 5), rng.randint(1, 3)
    x = torch.randn(n, c, h, w)
    for _ in range(rng.randint(1, 4)):
        g = rng.choice([1, 1, 2])
        cin = c
        if cin % g:
            g = 1
        cout = g * rng.randint(1, 4)
        k, s, d = rng.choice([1, 3, 5]), rng.choice([1, 2]), rng.choice([1, 1, 2])
        p = rng.randint(0, k // 2 + 1)
        ho, wo = conv_out(h, k, s, p, d), conv_out(w, k, s, p, d)
        if ho < 1 or wo < 1:
            break
        layers += [nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=rng.random() < 0.5),
                   nn.ReLU()]
        macs += n * ho * wo * cout * (cin // g) * k * k
        c, h, w = cout, ho, wo
    out = rng.randint(1, 5)
    layers += [nn.Flatten(), nn.Linear(c * h * w, out)]
    macs += n * c * h * w * out
    return nn.Sequential(*layers), x, macs


@pytest.mark.parametrize("seed", range(8))
def test_random_conv_nets_exact(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, x, expected = _random_conv_net(rng, rng.randint(12, 24))
    assert count_macs(model, x) == expected
    assert count_macs(model, x, convention="true") == expected
    per = macs_by_module(model, x)
    assert sum(per.values()) == expected
    assert set(per) == {name for name, m in model.named_modules() if not list(m.children())}


@pytest.mark.parametrize("cfg", [
    # cin, cout, k, stride, padding, output_padding, groups, dilation, H, W, N
    (8, 4, 3, 2, 1, 1, 1, 1, 5, 7, 1),
    (6, 9, 4, 2, 1, 0, 3, 1, 4, 4, 2),
    (4, 4, 3, 1, 1, 0, 1, 1, 6, 6, 1),   # C_in == C_out (ambiguous weight layout)
    (4, 6, 5, 3, 2, 2, 2, 2, 3, 5, 3),
])
def test_conv_transpose_both_conventions(cfg):
    cin, cout, k, s, p, op, g, d, h, w, n = cfg
    model = nn.Sequential(nn.ConvTranspose2d(cin, cout, k, stride=s, padding=p, output_padding=op,
                                             groups=g, dilation=d))
    x = torch.randn(n, cin, h, w)
    ho, wo = convT_out(h, k, s, p, d, op), convT_out(w, k, s, p, d, op)
    assert model(x).shape == (n, cout, ho, wo)
    assert count_macs(model, x, convention="papers") == n * ho * wo * cout * (cin // g) * k * k
    assert count_macs(model, x, convention="true") == n * h * w * cin * (cout // g) * k * k


class TwoInputs(nn.Module):
    """Two inputs, functional op in the root, dict + tuple output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 1)
        self.head = nn.Sequential(nn.Conv2d(8, 2, 3), nn.BatchNorm2d(2))

    def forward(self, x, m):
        f = self.a(x) * self.b(m)  # aten::mul: torchprofile counts one per output element
        return {"img": self.head(f), "aux": (f, m)}


def test_two_inputs_and_dict_output():
    torch.manual_seed(0)
    model = TwoInputs()
    model.train()
    model.head[1].eval()  # mixed flags must come back exactly
    x, m = torch.randn(2, 3, 10, 12), torch.randn(2, 1, 10, 12)
    convs = 2 * 10 * 12 * 8 * 3 * 9 + 2 * 10 * 12 * 8 * 1 + 2 * 8 * 10 * 2 * 8 * 9
    mul = 2 * 8 * 10 * 12
    bn = 2 * 2 * 8 * 10  # eval batch norm with affine: papers 1/element, fvcore 2/element
    assert count_macs(model, (x, m)) == convs + mul + bn
    assert count_macs(model, (x, m), convention="true") == convs + 2 * bn  # fvcore ignores mul
    per = macs_by_module(model, [x, m])
    assert per[""] == mul and per["head.1"] == bn and per["b"] == 2 * 10 * 12 * 8
    assert sum(per.values()) == convs + mul + bn
    assert model.training and model.a.training and not model.head[1].training


def test_untraceable_model_and_bad_convention():
    class Result:  # a custom output object: torch.jit.trace cannot handle it
        def __init__(self, y):
            self.y = y

    class Bad(nn.Module):
        def forward(self, x):
            return Result(x * 2)

    with pytest.raises(ValueError, match="Bad"):
        count_macs(Bad(), torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="convention"):
        count_macs(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 2, 2), convention="flops")


# --------------------------------------------------------------------------- params / size
def test_params_and_size(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Linear(4, 2, bias=False))
    params = 5 * 3 * 9 + 5 + 5 + 5 + 2 * 4
    assert count_params(model) == params
    # state_dict: params (float32) + running mean/var (float32) + num_batches_tracked (int64)
    assert model_size_mb(model) == ((params + 10) * 4 + 8) / 1e6
    assert model_size_mb(model.half()) == ((params + 10) * 2 + 8) / 1e6
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    assert model_size_mb(path) == os.path.getsize(path) / 1e6
    assert model_size_mb(str(path)) == os.path.getsize(path) / 1e6
    tied = nn.Module()
    tied.a = nn.Linear(3, 3, bias=False)
    tied.b = tied.a
    assert model_size_mb(tied) == 9 * 4 / 1e6 and count_params(tied) == 9


# --------------------------------------------------------------------------- fidelity
def test_psnr_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    deltas = torch.tensor([0.1, 0.02, 0.3])
    signs = torch.randint(0, 2, x.shape, generator=g) * 2 - 1
    y = x + deltas.view(3, 1, 1, 1) * signs  # per-image MSE is exactly delta**2
    expected = [10 * math.log10(4.0 / d**2) for d in deltas.double().tolist()]
    assert psnr(x, y) == pytest.approx(sum(expected) / 3, abs=1e-4)
    assert psnr(x[1], y[1]) == pytest.approx(expected[1], abs=1e-4)
    assert psnr(x[0], y[0], data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.01), abs=1e-4)
    assert psnr(x, x.clone()) == float("inf")
    with pytest.raises(ValueError):
        psnr(x, y[:, :2])


def _astronaut_pair(noise: float, seed: int, size: int = 256):
    from skimage import data

    img = data.astronaut()[:size, 100:100 + size].astype(np.float64) / 127.5 - 1.0  # [-1, 1], HWC
    rng = np.random.default_rng(seed)
    noisy = np.clip(img + rng.normal(0, noise, img.shape), -1, 1)
    return img, noisy


@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_ssim_matches_skimage(noise):
    from skimage.metrics import structural_similarity

    img, noisy = _astronaut_pair(noise, seed=int(noise * 100))
    ref = structural_similarity(img, noisy, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                channel_axis=2, data_range=2.0)
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1).float()  # noqa: E731
    ours = ssim(t(img), t(noisy))
    assert abs(ours - ref) < 1e-3
    assert 0 < ours < 1
    assert ssim(t(img), t(img)) == pytest.approx(1.0, abs=1e-6)
    # batch = mean of images; grayscale (H, W) and another data range
    img2, noisy2 = _astronaut_pair(0.1, seed=7)
    ref2 = structural_similarity(img2, noisy2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 channel_axis=2, data_range=2.0)
    batch = ssim(torch.stack([t(img), t(img2)]), torch.stack([t(noisy), t(noisy2)]))
    assert abs(batch - (ref + ref2) / 2) < 1e-3
    gray, gray_noisy = (img[..., 0] + 1) / 2, (noisy[..., 0] + 1) / 2
    ref_gray = structural_similarity(gray, gray_noisy, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)
    assert abs(ssim(torch.from_numpy(gray), torch.from_numpy(gray_noisy), data_range=1.0) - ref_gray) < 1e-3


def _small_gen(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.5), nn.ReLU(),
                         nn.Conv2d(8, 3, 3, padding=1), nn.Tanh())


def test_compare_outputs_and_fidelity_to_target():
    a, b = _small_gen(0), _small_gen(1)
    a.train()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 3, 16, 16, generator=g), "label") for n in (1, 3)]
    res = compare_outputs(a, b, batches, batch_fn=lambda batch: batch[0])
    assert a.training and b.training  # restored
    with torch.no_grad():
        a.eval(), b.eval()
        oa = torch.cat([a(x) for x, _ in batches])
        ob = torch.cat([b(x) for x, _ in batches])
    assert res["n_images"] == 4
    assert res["psnr"] == pytest.approx(psnr(oa, ob), rel=1e-9)  # mean over images, not batches
    assert res["ssim"] == pytest.approx(ssim(oa, ob), rel=1e-9)
    same = compare_outputs(a, a, [x for x, _ in batches])
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)

    # targets = output + exact +-delta noise -> closed-form PSNR
    delta = 0.05
    pairs = []
    for x, _ in batches:
        with torch.no_grad():
            out = a(x)
        pairs.append((x, out + delta * (torch.randint(0, 2, out.shape, generator=g) * 2 - 1)))
    fid = fidelity_to_target(a, pairs)
    assert fid["n_images"] == 4
    assert fid["psnr"] == pytest.approx(10 * math.log10(4 / delta**2), abs=1e-3)
    assert 0 < fid["ssim"] < 1


# --------------------------------------------------------------------------- latency / memory
def test_latency_stats():
    model = _small_gen(0)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    before = torch.get_num_threads()
    stats = measure_latency(model, x, warmup=1, repeats=7, threads=1)
    assert isinstance(stats, LatencyStats)
    assert torch.get_num_threads() == before and model.training
    assert stats.repeats == 7 and stats.threads == 1 and stats.device == "cpu"
    assert stats.batch_size == 2 and stats.input_shape == (2, 3, 32, 32)
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert stats.min_ms <= stats.mean_ms
    assert throughput(stats) == pytest.approx(2 / (stats.median_ms / 1000))
    assert "ms" in str(stats) and "cpu" in str(stats)
    with pytest.raises(Exception):
        stats.median_ms = 0.0  # frozen
    capped = measure_latency(model, (x,), warmup=2, repeats=500, max_seconds=1e-9, device="cpu")
    assert capped.repeats == 3 and capped.threads == before


class _Sleeper(nn.Module):
    """A model whose forward takes a known time (sleeps) and records the order of the calls."""

    def __init__(self, ms: float, log: list, name: str):
        super().__init__()
        self.ms, self.log, self.name = ms, log, name

    def forward(self, x):
        import time
        self.log.append(self.name)
        time.sleep(self.ms / 1000)
        return x


def test_paired_latency_alternates_the_models_and_takes_ratios_within_rounds():
    from ganslim.measure import PairedLatency, paired_latency

    log: list = []
    a, b = _Sleeper(20.0, log, "a"), _Sleeper(60.0, log, "b")
    a.train()
    before = torch.get_num_threads()
    res = paired_latency([a, b], torch.zeros(1, 3, 8, 8), rounds=4, passes=2, warmup=1, threads=1)
    assert isinstance(res, PairedLatency) and res.rounds == 4 and res.input_shape == (1, 3, 8, 8)
    assert a.training and torch.get_num_threads() == before and res.threads == 1
    # every round gives each model a turn of 1 untimed + 2 timed passes, the order rotated
    assert len(log) == 2 * 3 * 5 and log[:12] == ["b"] * 3 + ["a"] * 6 + ["b"] * 3
    assert res.ratio[0] == 1.0 and 2.0 < res.ratio[1] < 3.5  # 60 ms / 20 ms of sleep, plus oversleeping
    assert res.ratio_iqr[1][0] <= res.ratio[1] <= res.ratio_iqr[1][1]
    assert res.median_ms[0] >= 20.0 and res.median_ms[1] >= 60.0 and "model 1" in str(res)
    with pytest.raises(ValueError, match="at least two"):
        paired_latency([a], torch.zeros(1))
    with pytest.raises(ValueError, match="rounds must be >= 3"):
        paired_latency([a, b], torch.zeros(1), rounds=2)
    with pytest.raises(ValueError, match="passes must be >= 1"):
        paired_latency([a, b], torch.zeros(1), passes=0)
    with pytest.raises(ValueError, match="settle_ms must be >= 0"):
        paired_latency([a, b], torch.zeros(1), settle_ms=-1)


def test_paired_latency_pauses_before_every_turn_outside_the_timing(monkeypatch):
    """The pause that lets the previous model's worker threads wind down comes before each turn's
    untimed pass and is not in the times: with a 500 ms pause the 20 ms model still times ~20 ms."""
    import time as time_module

    from ganslim.measure import paired_latency

    log: list = []
    real_sleep = time_module.sleep
    pauses: list = []

    def sleep(seconds):
        if seconds >= 0.5:  # the pause (the models' own sleeps are shorter): recorded, then slept
            pauses.append(len(log))
        real_sleep(seconds)

    monkeypatch.setattr(time_module, "sleep", sleep)
    a, b = _Sleeper(20.0, log, "a"), _Sleeper(40.0, log, "b")
    res = paired_latency([a, b], torch.zeros(1, 1), rounds=3, passes=1, warmup=0, threads=1, settle_ms=500.0)
    assert pauses == [0, 2, 4, 6, 8, 10]  # before every turn (2 passes each), 2 turns x 3 rounds
    assert 20.0 <= res.median_ms[0] < 200.0 and 40.0 <= res.median_ms[1] < 220.0
    pauses.clear()
    paired_latency([a, b], torch.zeros(1, 1), rounds=3, passes=1, warmup=0, threads=1, settle_ms=0)
    assert pauses == []


def test_peak_memory_scales_with_width():
    def net(c):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(c, 3, 3, padding=1))

    x = torch.randn(2, 3, 64, 64)
    peaks = {}
    for c in (16, 64):
        model = net(c)
        sizes = []
        hooks = [m.register_forward_hook(lambda mod, i, o: sizes.append(o.numel() * o.element_size()))
                 for m in model]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        peak = peak_memory_mb(model, x)
        peaks[c] = peak
        # a measured figure: at least the largest activation, at most all activations at once
        # (plus slack for workspaces)
        assert max(sizes) / 1e6 <= peak <= 2 * sum(sizes) / 1e6, (c, peak, sizes)
        assert peak >= 0.2 * sum(sizes) / 1e6
    assert peaks[64] > 3 * peaks[16]
