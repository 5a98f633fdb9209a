"""QAT with ModelOpt: BatchNorm folding, fake quantizers, calibration, training, float export, checkpoints."""
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ganslim
from archs import OPS, RandomGenerator
from ganslim import data, measure
from ganslim.deployment import quantization as Q
from ganslim.zoo import create_model
from trained import briefly_trained

pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def loader():
    return data.default_loader(batch_size=2, crop=32, length=32)


@pytest.fixture(scope="module")
def net(loader):
    # like the default teacher: batch norm, reflection pads, transposed convs
    return briefly_trained(lambda: create_model("resnet_6blocks", ngf=8, norm="batch"), loader)


@pytest.fixture(scope="module")
def qnet(net, loader):
    return Q.quantize(net, loader)


def _x(seed=0, size=32):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(st.sampled_from(OPS), min_size=1, max_size=5),
       widths=st.lists(st.integers(2, 12), min_size=6, max_size=6))
def test_fold_batchnorm_keeps_outputs_on_random_architectures(spec, widths):
    torch.manual_seed(0)
    m = RandomGenerator(spec, widths, norm="batch")
    with torch.no_grad():  # non-trivial running statistics
        m.train()(_x(1, 16) * 3)
        m.eval()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
    folded = Q.fold_batchnorm(m)
    x = _x(2, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), m(x), atol=1e-5)
    left = sum(isinstance(b, nn.BatchNorm2d) for b in folded.modules())
    # every BatchNorm directly after a conv is gone (CatBlock/ResBlock norms follow convs too)
    assert left == 0


def test_quantize_inserts_calibrated_int8_quantizers_close_to_float(net, qnet):
    assert Q.is_quantized(qnet) and Q.is_calibrated(qnet) and not Q.is_quantized(net)
    n_weighted = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in net.modules())
    # weights + inputs of every conv but first/last, + the outputs the int8 runtime quantizes too (the
    # residual branches' last convs)
    n_blocks = sum(n.endswith("conv_block") for n, _ in net.named_modules())
    outputs = Q.output_ranges(qnet)
    assert {f"model.{10 + b}.conv_block.5" for b in range(n_blocks)} <= set(outputs)
    assert Q.enabled_quantizers(qnet) == 2 * (n_weighted - 2) + len(outputs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qnet.modules())  # folded first
    inorm = Q.quantize(create_model("resnet_6blocks", ngf=4), None, calib_batches=1, skip_first=False, skip_last=False)
    n_in = sum(isinstance(m, nn.InstanceNorm2d) for m in inorm.modules())
    assert Q.enabled_quantizers(inorm) == 2 * n_weighted + n_in  # instance norm inputs too (int8 conv outputs)
    x = _x()
    with torch.no_grad():
        p = measure.psnr(qnet(x), net(x))
    assert 25.0 < p < 80.0  # really quantized (not identical), yet close


def test_to_float_gives_standard_layers_with_weights_on_the_int8_grid(qnet):
    f = Q.to_float(qnet)
    assert not Q.is_quantized(f)
    assert all(type(m).__module__.startswith("torch.nn") or type(m).__name__ in ("GraphModule", "Module")
               for m in f.modules())
    kept_float = set(qnet._ganslim_quant.float_modules)  # first and last layer by default
    assert len(kept_float) == 2
    convs = [m for n, m in f.named_modules() if isinstance(m, nn.Conv2d) and n not in kept_float]
    top = 64 if Q.config_of(qnet).weight_bits == 7 else 127  # 7 bits: onnxruntime's reduced range, -64..64
    for c in convs:
        w = c.weight.detach().flatten(1)
        scale = w.abs().amax(1, keepdim=True) / top
        levels = w / scale.clamp_min(1e-12)
        # per output channel, every weight is an integer multiple of one step: <= 2 * top + 1 levels
        assert torch.allclose(levels, levels.round(), atol=1e-3)


def test_skip_first_and_last_and_exclude_keep_layers_in_float(net, loader):
    q = Q.quantize(net, loader, skip_first=True, skip_last=True, exclude=["model.4"], calib_batches=2)
    state = q._ganslim_quant
    assert len(state.float_modules) == 3
    names = dict(q.named_modules())
    for name in state.float_modules:
        assert not names[name].weight_quantizer.is_enabled and not names[name].input_quantizer.is_enabled


def test_unsupported_layers_are_left_in_float_with_a_warning(loader):
    class Scale(nn.Module):  # a custom layer with its own parameter
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(1, 4, 1, 1))

        def forward(self, x):
            return x * self.s

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Scale(), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1),
                      nn.Tanh())
    with pytest.warns(UserWarning, match=r"left in float.*1 \(Scale\)"):
        Q.quantize(m, loader, calib_batches=1)
    with pytest.raises(Q.QuantizationError, match="nothing to quantize"):
        Q.quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 3)), loader)  # only first and last


def test_model_without_weighted_layers_is_refused(loader):
    with pytest.raises(Q.QuantizationError, match="no Conv"):
        Q.quantize(nn.Sequential(nn.Tanh()), loader)


def test_qat_recovers_fidelity_lost_to_coarse_quantization(net, loader):
    """3-bit weights / 4-bit activations hurt; a short QAT with the float net as teacher wins part back."""
    q = Q.quantize(net, loader, weight_bits=3, act_bits=4, calib_batches=4, skip_first=False, skip_last=False)
    xs = [x for x, _ in data.default_loader(batch_size=4, crop=32, length=8, seed=5)]
    with torch.no_grad():
        before = measure.compare_outputs(net, q, xs)["psnr"]
    Q.train_qat(q, net, data.default_loader(batch_size=4, crop=32, length=240), Q.QuantConfig(steps=60, lr=3e-4, gt_weight=0.0),
                progress=False)
    with torch.no_grad():
        after = measure.compare_outputs(net, q, xs)["psnr"]
    assert after > before + 1.0, (before, after)


def test_uncalibrated_model_cannot_be_trained(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = Q.quantize(net, None, example_inputs=_x())
    assert not Q.is_calibrated(q)
    with pytest.raises(Q.QuantizationError, match="never calibrated"):
        Q.train_qat(q, net, [])


def test_qat_checkpoint_reloads_bit_exactly_and_stays_quantized(qnet, tmp_path):
    p = ganslim.save(qnet, tmp_path / "qat.safetensors")
    meta = ganslim.deployment.checkpoint.read_metadata(p)
    assert meta["quant"]["backend"] == "modelopt" and meta["quant"]["config"]["weight_bits"] == Q.default_weight_bits()
    back = ganslim.load(p)
    assert Q.is_quantized(back) and Q.is_calibrated(back)
    x = _x(3)
    with torch.no_grad():
        assert torch.equal(back(x), qnet(x))
    # and it is still trainable (resume QAT)
    assert all(p.requires_grad for p in back.parameters())


def test_activation_ranges_are_unsigned_after_relu_and_robust_to_outliers(net, loader):
    q = Q.quantize(net, loader, calib_batches=2, skip_first=False)
    qs = dict(Q._quantizers(q))
    assert not qs["model.1.input_quantizer"].unsigned  # the image input in [-1, 1]
    assert qs["model.4.input_quantizer"].unsigned  # after a ReLU: all 8 bits on [0, amax]
    # one huge activation in the calibration data: max calibration follows it, the percentile does not
    spiky = [(x.clone().index_put_((torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0])),
                                   torch.tensor(50.0)), y) for x, y in loader]
    q_max = Q.quantize(net, spiky, act_calib="max", calib_batches=2, skip_first=False)
    q_pct = Q.quantize(net, spiky, calib_batches=2, skip_first=False)
    a_max = float(dict(Q._quantizers(q_max))["model.1.input_quantizer"].amax)
    a_pct = float(dict(Q._quantizers(q_pct))["model.1.input_quantizer"].amax)
    assert a_max == pytest.approx(50.0) and a_pct <= 1.0


@pytest.mark.parametrize("cin,cout,groups", [(6, 6, 6), (4, 6, 2), (6, 3, 3)])
def test_fold_batchnorm_after_a_grouped_transposed_conv(cin, cout, groups):
    """A transposed conv's weight is (in, out / groups, k, k): the fold scales each group's own output
    columns (torch's fuse_conv_bn_eval broadcasts a depthwise one to (C, C, k, k), as in the
    separable student's upsampling)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups,
                                         bias=cin != 4), nn.BatchNorm2d(cout), nn.ReLU())
    with torch.no_grad():
        m.train()(torch.randn(4, cin, 8, 8) * 3)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    m.eval()
    folded = Q.fold_batchnorm(m)
    assert not any(isinstance(b, nn.BatchNorm2d) for b in folded.modules())
    conv = next(c for c in folded.modules() if isinstance(c, nn.ConvTranspose2d))
    assert conv.weight.shape == m[0].weight.shape and conv.groups == groups
    x = torch.randn(2, cin, 8, 8)
    with torch.no_grad():
        ref = m(x)
        assert (folded(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_clipped_activations_get_no_gradient(qnet):
    """The straight-through estimator passes the gradient where the input lies inside the quantizer's
    range and zeroes it where the value was clipped (ModelOpt's own default passes it everywhere)."""
    quantizer = next(q for n, q in Q._quantizers(qnet) if n.endswith("input_quantizer") and q.is_enabled and q.unsigned)
    amax = float(quantizer.amax)
    x = torch.linspace(0, 2 * amax, 21).reshape(1, 1, 1, 21).requires_grad_(True)
    quantizer(x).sum().backward()
    inside = x.detach() <= amax * (1 - 1e-6)
    assert torch.equal(x.grad[inside], torch.ones_like(x.grad[inside]))
    assert torch.equal(x.grad[x.detach() > amax * (1 + 1e-6)], torch.zeros(int((x.detach() > amax * (1 + 1e-6)).sum())))


def test_qat_imitates_the_float_model_by_default_and_the_teacher_on_request(net, loader):
    """reference="float" trains towards the model as it was before quantization and ignores the
    teacher outputs the batches carry; reference="teacher" learns those outputs (here: a grey image)."""
    grey = [{"A": x, "teacher_output": torch.zeros_like(x)} for x, _ in data.default_loader(batch_size=4, crop=32, length=160)]
    xs = [x for x, _ in data.default_loader(batch_size=4, crop=32, length=8, seed=5)]

    def qat(reference):
        q = Q.quantize(net, loader, skip_first=False, skip_last=False)
        Q.train_qat(q, None if reference == "float" else net, grey,
                    Q.QuantConfig(steps=40, lr=3e-4, gt_weight=0.0, reference=reference), progress=False)
        with torch.no_grad():
            return (measure.compare_outputs(net, q, xs)["psnr"],
                    float(torch.stack([q(x).abs().mean() for x in xs]).mean()))

    with torch.no_grad():
        level = float(torch.stack([net(x).abs().mean() for x in xs]).mean())
    to_float, float_level = qat("float")
    to_teacher, teacher_level = qat("teacher")
    assert to_float > 30 and abs(float_level - level) < 0.1 * level, (to_float, float_level, level)
    assert teacher_level < 0.5 * level and to_teacher < to_float - 10, (to_teacher, teacher_level, level)
    with pytest.raises(Q.QuantizationError, match="needs a teacher"):
        Q.train_qat(Q.quantize(net, loader), None, grey, Q.QuantConfig(steps=1, reference="teacher"), progress=False)
    with pytest.raises(ValueError, match="reference"):
        Q.QuantConfig(reference="student").validate()


def test_a_checkpoint_from_before_the_runtime_simulation_restores_as_trained(qnet):
    """quant_state without ``shared_inputs`` (written before QAT simulated the runtime): the model
    comes back with per-layer input quantizers only, as it was trained."""
    meta, amax = Q.quant_state(qnet)
    assert meta["shared_inputs"]
    old_meta = {k: v for k, v in meta.items() if k != "shared_inputs"}
    old_meta["enabled"] = [n for n in meta["enabled"] if not n.endswith("output_quantizer")]
    old_amax = {n: t for n, t in amax.items() if not n.endswith("output_quantizer")}
    back = Q.restore(Q.to_float(qnet, quantized_weights=False), old_meta, old_amax)
    assert getattr(back, "_ganslim_quant").shared_inputs == [] and not Q.output_ranges(back)
    assert not any(str(n.target).endswith("_quantizer") for n in back.graph.nodes if n.op == "call_module")


def test_transposed_conv_weights_are_quantized_per_output_channel_and_old_checkpoints_restore(tmp_path):
    """A ConvTranspose weight (C_in, C_out, k, k) gets one range per output channel (axis 1), the
    channels the int8 file quantizes; a checkpoint written with ranges per input channel (before)
    restores with them, computing what it computed."""
    from ganslim.deployment import checkpoint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 3, 2, 1, 1), nn.ReLU(),
                        nn.Conv2d(6, 3, 3, padding=1)).eval()
    loader = [(torch.randn(2, 3, 16, 16), None) for _ in range(2)]
    q = Q.quantize(net, loader, batch_fn=lambda b: b, skip_first=False, skip_last=False)
    wq = q.get_submodule("2").weight_quantizer
    assert wq.axis in (1, (1,)) and wq.amax.flatten().numel() == 6
    assert "2" in Q.weight_scales(q)
    x = torch.randn(1, 3, 16, 16)
    # an older checkpoint: the same model with the transposed weight's ranges per input channel
    old = Q.quantize(net, loader, batch_fn=lambda b: b, skip_first=False, skip_last=False)
    owq = old.get_submodule("2").weight_quantizer
    owq.axis = 0
    owq.reset_amax()
    owq.amax = old.get_submodule("2").weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    with torch.no_grad():
        want = old(x)
    path = ganslim.save(old, tmp_path / "old.safetensors")
    back = checkpoint.load(path)
    with torch.no_grad():
        assert torch.equal(back(x), want)
    assert back.get_submodule("2").weight_quantizer.axis in (0, (0,)) and "2" not in Q.weight_scales(back)


def test_weight_steps_are_given_per_output_channel_only(tmp_path):
    """weight_scales names a depthwise transposed conv (its output channels on the weight's axis 0) and
    leaves a grouped one out (axis 0 holds its input channels: no per-output-channel steps to give)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, 2, 1, 1, groups=8),
                        nn.ReLU(), nn.ConvTranspose2d(8, 4, 3, 1, 1, groups=2), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=1)).eval()
    loader = [(torch.randn(2, 3, 16, 16), None) for _ in range(2)]
    q = Q.quantize(net, loader, batch_fn=lambda b: b, skip_first=False, skip_last=False)
    steps = Q.weight_scales(q)
    assert q.get_submodule("4").weight_quantizer.is_enabled and "4" not in steps
    assert steps["2"].numel() == 8 and steps["0"].numel() == 8 and steps["6"].numel() == 3


def _activation_quantizers(model):
    return {n: q for n, q in Q._quantizers(model)
            if n.endswith(("input_quantizer", "output_quantizer")) and q.is_enabled and q.amax.numel() == 1}


def test_learned_ranges_start_where_calibration_left_them_and_leave_nothing_behind(net, loader):
    """Inside learned_ranges the model computes exactly what the calibrated quantizers do (log range 0),
    one parameter per activation quantizer; on exit the parameters are gone and the changed log ranges
    are the quantizers' new ranges (a range before Tanh no wider than where Tanh saturates)."""
    q = Q.quantize(net, loader, skip_first=False, skip_last=False)
    x = _x(3)
    keys = set(q.state_dict())
    amax = {n: float(t.amax) for n, t in _activation_quantizers(q).items()}
    with torch.no_grad():
        before = q(x)
    with Q.learned_ranges(q) as ranges:
        assert len(ranges) == len(amax) > 5
        with torch.no_grad():
            assert torch.equal(q(x), before)
            for p in ranges:
                p.fill_(0.5)
            assert not torch.equal(q(x), before)
    assert set(q.state_dict()) == keys and all(t.backend is None for t in _activation_quantizers(q).values())
    limited = {n for n in amax if n.endswith("output_quantizer")} & {f"{n}.output_quantizer" for n, v in
                                                                     Q._runtime_outputs(q).items() if v is not None}
    assert limited  # the output conv before Tanh
    for n, t in _activation_quantizers(q).items():
        want = min(amax[n] * float(torch.exp(torch.tensor(0.5))), 4.0) if n in limited else amax[n] * float(torch.exp(torch.tensor(0.5)))
        assert float(t.amax) == pytest.approx(want, rel=1e-5), n


def test_learned_range_gradient_is_lsqs_step_size_gradient(net, loader):
    """d output / d log range, with v = x k (k = 127 / range, ModelOpt's signed grid [-128, 127]):
    (round(v) - v) / k inside the range, the bound over k beyond it; LSQ's step-size gradient."""
    q = Q.quantize(net, loader)
    name, quantizer = next((n, t) for n, t in _activation_quantizers(q).items() if not t.unsigned)
    lo = -127 if quantizer.narrow_range else -128
    amax = float(quantizer.amax)
    x = torch.linspace(-2 * amax, 2 * amax, 397).reshape(1, 1, 1, 397)
    with Q.learned_ranges(q) as ranges:
        log_range = dict(zip(_activation_quantizers(q), ranges))[name]
        quantizer(x).sum().backward()
    k = 127 / quantizer.amax.float()
    v = x * k
    expected = torch.where(v > 127, 127 / k, torch.where(v < lo, lo / k, (v.round() - v) / k)).sum()
    assert (v > 127).sum() > 50 and (v < lo).sum() > 50 and ((v < 127) & (v > lo)).sum() > 100
    assert float(log_range.grad) == pytest.approx(float(expected), rel=1e-4, abs=1e-4 * amax)


def test_qat_learns_a_range_calibrated_far_too_wide_and_keeps_it_fixed_at_range_lr_0(net, loader):
    """A quantizer whose range is 30x too wide wastes its 8 bits; QAT with learned ranges shrinks it
    (and the model's fidelity to the float net rises above the fixed-range run's), range_lr=0 leaves it."""
    xs = [x for x, _ in data.default_loader(batch_size=4, crop=32, length=8, seed=5)]

    def qat(range_lr):
        q = Q.quantize(net, loader, skip_first=False, skip_last=False)
        quantizers = _activation_quantizers(q)
        wide = next(n for n in quantizers if n.endswith(".input_quantizer") and not quantizers[n].unsigned)
        quantizers[wide].amax = quantizers[wide].amax * 30
        start = float(quantizers[wide].amax)
        Q.train_qat(q, net, data.default_loader(batch_size=4, crop=32, length=240),
                    Q.QuantConfig(steps=60, lr=1e-4, range_lr=range_lr, gt_weight=0.0), progress=False)
        with torch.no_grad():
            return float(quantizers[wide].amax) / start, measure.compare_outputs(net, q, xs)["psnr"]

    fixed_ratio, fixed_psnr = qat(0.0)
    learned_ratio, learned_psnr = qat(3e-2)
    assert fixed_ratio == 1.0
    assert learned_ratio < 0.8 and learned_psnr > fixed_psnr + 1.0, (learned_ratio, learned_psnr, fixed_psnr)
    with pytest.raises(ValueError, match="range_lr"):
        Q.QuantConfig(range_lr=-1).validate()
