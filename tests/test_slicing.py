"""Once-for-all: width slicing on any generator, supernet training (resumable), search under budgets, export."""
import copy
import json
import random

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ganslim
from ganslim import measure
from ganslim.deployment.checkpoint import CheckpointError
from ganslim.cli import main
from ganslim.pruning import search as search_module
from ganslim.pruning.search import BudgetError, Evaluator, SearchConfig, pareto_front, resolve_precision, search
from ganslim.pruning.slicing import SliceConfig, SliceError, make_supernet, recalibrate_bn, width_choices
from ganslim.pruning.supernet import SupernetConfig, load_supernet, save_supernet, train_supernet
from ganslim.zoo import create_model

from equivalence import assert_same_function, rel_diff64

from archs import OPS, RandomGenerator


def _bn_stats(m: nn.Module, x: torch.Tensor) -> nn.Module:
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval()


def test_width_choices_round_to_the_multiple_and_keep_the_full_width():
    cfg = SliceConfig(ratios=(0.1, 0.25, 0.5, 1.0), multiple=8)
    assert width_choices(128, cfg) == [16, 32, 64, 128]
    assert width_choices(20, cfg) == [8, 16, 20]  # 0.5 * 20 = 10 -> 16; full width always offered
    assert width_choices(4, cfg) == [4]  # smaller than the multiple: only its own width
    with pytest.raises(SliceError, match="ratios"):
        SliceConfig(ratios=(0.0, 1.0)).validate()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(st.sampled_from(OPS), min_size=1, max_size=6),
       widths=st.lists(st.integers(2, 12), min_size=7, max_size=7),
       norm=st.sampled_from(["instance", "instance_affine", "batch", "none"]), seed=st.integers(0, 1000))
def test_fuzz_slicing_equals_the_exported_subnetwork(spec, widths, norm, seed):
    """Random architectures (residual adds, concatenations, depthwise and transposed convs): reordering
    keeps the function; any sampled widths run without a shape error (coupled channels share one
    width by construction); the sliced supernet equals its physically exported sub-network; the MACs
    the supernet predicts are the exported model's measured MACs, and the same float as the masks' count."""
    torch.manual_seed(seed)
    m = RandomGenerator(spec, widths, norm)
    x = torch.randn(1, 3, 16, 16)
    if norm == "batch":
        _bn_stats(m, torch.randn(4, 3, 16, 16))
    m.eval()
    original = copy.deepcopy(m)
    sn = make_supernet(m, x, SliceConfig(ratios=(0.25, 0.5, 0.75, 1.0), multiple=1)).eval()
    assert rel_diff64(sn, original, x) <= 1e-5, "reordering channels changed the function"
    rng = random.Random(seed)
    for widths_cfg in (sn.smallest(), sn.sample(rng), sn.sample(rng)):
        plain = sn.export(widths_cfg)  # raises when the export differs from the sliced supernet
        sn.set_widths(widths_cfg)
        assert_same_function(plain, sn, x)
        measured = measure.count_macs(plain, x, "papers")
        # exact for weighted layers; parameter-free ones (LeakyReLU costs MACs in this convention) are
        # counted at full width by the prediction
        free = sum(v for k, v in sn._macs.base.items() if not any(True for _ in m.get_submodule(k).parameters()))
        assert measured * (1 - 1e-6) <= sn.macs(widths_cfg) <= measured * (1 + 1e-6) + free
        # the search's mask-free count is the masks' count to the last bit (the choices must not move)
        assert sn.macs(widths_cfg) == sn._macs.macs(sn.alive(widths_cfg))
        if widths_cfg != sn.largest():
            assert measure.count_params(plain) < measure.count_params(m)
    assert torch.equal(sn.set_widths(sn.largest())(x), sn(x))


def test_sliced_layers_really_compute_on_fewer_channels():
    m = create_model("resnet_6blocks", ngf=8).eval()
    x = torch.randn(1, 3, 32, 32)
    sn = make_supernet(m, x, SliceConfig(ratios=(0.25, 1.0), multiple=1))
    sn.set_widths(sn.smallest())
    shapes = {}
    handles = [mod.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, o.shape[1]))
               for n, mod in sn.model.named_modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        sn(x)
    for h in handles:
        h.remove()
    assert shapes["model.1"] == 2 and shapes["model.4"] == 4  # 8 -> 2, 16 -> 4 channels: real smaller tensors
    sn.detach()
    assert "forward" not in sn.model.get_submodule("model.1").__dict__  # the user's layers are restored
    with pytest.raises(RuntimeError, match="inside"):  # the context manager undoes the patch on an error too
        with sn.attached():
            assert "forward" in sn.model.get_submodule("model.1").__dict__
            raise RuntimeError("inside")
    assert not any("forward" in mod.__dict__ for mod in sn.model.modules())


def test_importance_order_puts_the_largest_norm_scales_first():
    m = create_model("resnet_6blocks", ngf=8, norm="batch").eval()
    bn = m.model[2]  # the first conv's norm
    with torch.no_grad():
        bn.weight.copy_(torch.arange(8, dtype=torch.float))  # channel 7 most important
    sn = make_supernet(m, torch.randn(1, 3, 32, 32))
    assert torch.equal(sn.model.model[2].weight, torch.arange(7, -1, -1, dtype=torch.float))


def test_batchnorm_recalibration_matches_the_subnetwork_statistics():
    torch.manual_seed(0)
    m = create_model("resnet_6blocks", ngf=8, norm="batch")
    x = torch.randn(4, 3, 32, 32)
    sn = make_supernet(m, x[:1], SliceConfig(ratios=(0.5, 1.0), multiple=1))
    w = sn.smallest()
    assert recalibrate_bn(sn, [(x,)], w) > 0
    k = w["model.1"]
    with torch.no_grad():  # the first norm's running mean is exactly the batch mean of the sliced conv output
        feat = sn.model.model[1](sn.model.model[0](x))
    assert feat.shape[1] == k
    assert torch.allclose(sn.model.model[2].running_mean[:k], feat.mean((0, 2, 3)), atol=1e-6)
    sn.train()
    with torch.no_grad():
        batch_stats = sn(x)  # BatchNorm on the batch's own statistics
    sn.eval()
    with torch.no_grad():
        running = sn(x)  # on the re-estimated running statistics (unbiased variance: tiny differences)
    assert (batch_stats - running).abs().max() < 0.02


def _full_forward_statistics(sn, batches) -> dict:
    """BatchNorm statistics as the plain recipe computes them: reset, cumulative average, whole forwards."""
    bns = [m for m in sn.model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    sn.model.train()
    with torch.no_grad():
        for inputs in batches:
            sn.model(*inputs)
    for m in bns:
        m.momentum = 0.1
    return {k: v.clone() for k, v in sn.model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("name", ["resnet_6blocks", "unet_128"])
def test_recalibration_skips_the_layers_after_the_last_batchnorm_with_identical_statistics(name):
    torch.manual_seed(0)
    m = create_model(name, ngf=8, norm="batch")
    size = 128 if name == "unet_128" else 32
    batches = [(torch.randn(2, 3, size, size),) for _ in range(3)]
    sn = make_supernet(m, batches[0][0][:1], SliceConfig(ratios=(0.5, 1.0), multiple=1))
    last = [mod for mod in sn.model.modules() if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d)][-1]
    # the count of norm calls is kept from one sub-network to the next; a wrong count kept (a model
    # whose forward calls other norms) is noticed and taken again from whole forwards
    for widths, wrong_count, output_layer_runs in ((sn.smallest(), False, 1), (sn.largest(), False, 0),
                                                   (sn.smallest(), True, 1)):
        sn.set_widths(widths)
        expected = _full_forward_statistics(sn, batches)
        if wrong_count:
            right = sn._bn_calls
            sn._bn_calls = (right[0] - 1, right[1])  # would stop before the last norm's call
        ran = []
        h = last.register_forward_hook(lambda *a: ran.append(1))
        try:
            recalibrate_bn(sn, batches)
        finally:
            h.remove()
        # the output layer ran only where the norm calls were counted (one whole forward)
        assert len(ran) == output_layer_runs, widths
        got = {k: v for k, v in sn.model.state_dict().items() if k in expected}
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert all(mod.momentum == 0.1 and not mod._forward_hooks for mod in sn.model.modules()
                   if isinstance(mod, nn.BatchNorm2d))
    assert sn._bn_calls == right  # counted again


def test_search_fitness_does_not_depend_on_the_metrics_it_skips():
    # SSIM is computed only when it is the metric; the PSNR fitness is the same number either way
    teacher, sn, pairs, bn = _searchable()
    fast = Evaluator(sn, teacher, pairs, bn, "psnr_gt")
    full = Evaluator(sn, teacher, pairs, bn, "ssim_gt")
    rng = random.Random(0)
    for _ in range(3):
        w = {k: rng.choice(v) for k, v in sn.choices.items()}
        a, b = fast(w), full(w)
        assert a.fitness == b.metrics["psnr_gt"] and "ssim_gt" not in a.metrics
        assert b.fitness == b.metrics["ssim_gt"] and a.macs == b.macs == sn.macs(w)


def test_parallel_evaluation_gives_the_numbers_of_one_process_and_the_same_winner():
    teacher, sn, pairs, bn = _searchable()
    rng = random.Random(1)
    many = [{k: rng.choice(v) for k, v in sn.choices.items()} for _ in range(5)]
    one = Evaluator(sn, teacher, pairs, bn, "psnr_teacher")
    two = Evaluator(sn, teacher, pairs, bn, "psnr_teacher", workers=2)
    try:
        a, b = one.evaluate_many(many), two.evaluate_many(many + many[:2])  # repeats come from the cache
        assert len(b) == 7 and two.evaluations == len({tuple(sorted(w.items())) for w in many})
        for x, y in zip(a, b):
            assert x.widths == y.widths and x.macs == y.macs
            assert y.fitness == pytest.approx(x.fitness, rel=1e-6)  # other thread counts round differently
        assert len(two._pool) == 2 and all(p.is_alive() for _, p in two._pool)
        cfg = SearchConfig(population=6, generations=2, metric="psnr_teacher")
        r1 = search(sn, teacher, pairs, bn, target_macs=0.3, config=cfg, progress=False)
        r2 = search(sn, teacher, pairs, bn, target_macs=0.3, config=SearchConfig(**{**cfg.__dict__, "workers": 2}),
                    progress=False)
        assert r1.best.widths == r2.best.widths and r1.evaluations == r2.evaluations
    finally:
        procs = [p for _, p in two._pool or ()]
        two.close()
    assert two._pool is None and not any(p.is_alive() for p in procs)
    with pytest.raises(ValueError, match="workers"):
        SearchConfig(workers=0).validate()


def test_bf16_evaluation_is_close_to_float32_and_gives_the_supernet_back_as_it_was():
    teacher, sn, pairs, bn = _searchable()
    before = {k: v.clone() for k, v in sn.model.state_dict().items() if "running" not in k and "num_batches" not in k}
    params = {k: p for k, p in sn.model.named_parameters()}
    exact = Evaluator(sn, teacher, pairs, bn, "psnr_gt", precision="fp32")
    low = Evaluator(sn, teacher, pairs, bn, "psnr_gt", precision="bf16")
    assert (exact.precision, low.precision) == ("fp32", "bf16")
    rng = random.Random(2)
    for _ in range(4):
        w = {k: rng.choice(v) for k, v in sn.choices.items()}
        a, b = exact(w), low(w)
        # measured: within 0.01 dB of ~12 dB; 0.05 dB is far below the fitness gaps a search decides on
        assert b.fitness == pytest.approx(a.fitness, abs=0.05) and b.fitness != a.fitness
        assert b.metrics["psnr_teacher"] == pytest.approx(a.metrics["psnr_teacher"], abs=0.05)
    assert not low._bf16_autocast  # the plain bf16 path ran: a ResNet's arithmetic is all in its layers
    after = dict(sn.model.named_parameters())
    assert all(after[k] is params[k] and after[k].dtype == torch.float32 for k in params)
    assert all(torch.equal(sn.model.state_dict()[k], v) for k, v in before.items())  # bit for bit


def _fitness_across_a_weight_step(evaluator_kw: dict, fresh_kw: dict) -> tuple[float, float, float]:
    """The smallest sub-network's fitness by one ``Evaluator(**evaluator_kw)`` before and after an
    optimizer-like step on the supernet's weights (its fitness cache cleared in between, whatever else
    it keeps left as is), and by a new ``Evaluator(**fresh_kw)`` after it: ``(before, after, fresh)``."""
    teacher, sn, pairs, bn = _searchable()
    ev = Evaluator(sn, teacher, pairs, bn, "psnr_teacher", **evaluator_kw)
    w = sn.smallest()
    before = ev(w).fitness
    with torch.no_grad():  # an optimizer step between two searches
        for p in sn.model.parameters():
            p.mul_(0.9)
    ev.cache.clear()
    return before, ev(w).fitness, Evaluator(sn, teacher, pairs, bn, "psnr_teacher", **fresh_kw)(w).fitness


def test_bf16_evaluation_notices_changed_weights_and_falls_back_to_autocast_for_mixed_arithmetic():
    first, after, fresh = _fitness_across_a_weight_step({"precision": "bf16"}, {"precision": "bf16"})
    assert after == fresh != first  # the kept bf16 copies were made again

    class Gained(nn.Module):  # a float32 buffer multiplies the activations: bf16 in, float32 out
        def __init__(self):
            super().__init__()
            self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 3, 3, padding=1)
            self.register_buffer("gain", torch.full((1, 1, 1, 1), 0.5))

        def forward(self, x):
            return torch.tanh(self.conv2(torch.relu(self.bn(self.conv1(x))) * self.gain))

    torch.manual_seed(0)
    net = _bn_stats(Gained(), torch.randn(4, 3, 16, 16))
    gsn = make_supernet(net, torch.randn(1, 3, 16, 16), SliceConfig(ratios=(0.5, 1.0), multiple=1))
    gpairs = [((torch.rand(2, 3, 16, 16) * 2 - 1,), None)]
    gbn = [(torch.randn(4, 3, 16, 16),)]
    exact = Evaluator(gsn, net, gpairs, gbn, "psnr_teacher", precision="fp32")
    mixed = Evaluator(gsn, net, gpairs, gbn, "psnr_teacher", precision="bf16")
    half = {k: min(v) for k, v in gsn.choices.items()}
    assert mixed(half).fitness == pytest.approx(exact(half).fitness, abs=0.05)
    assert mixed._bf16_autocast  # the conv met a float32 input: autocast took over
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(search_module, "native_bf16_cpu", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(search_module, "native_bf16_cpu", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert SearchConfig().precision == "fp32" and ganslim.CompressConfig().ofa.precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        SearchConfig(precision="fp16").validate()
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("half", cpu)
    with pytest.raises(ValueError, match="search_precision"):
        ganslim.CompressConfig().replace(search_precision="int8").validate()


def _tiny_task(n_batches: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(4, 3, 24, 24, generator=g) * 2 - 1 for _ in range(n_batches)]
    return [(x, torch.tanh(x.flip(1) * 1.5)) for x in xs]


def test_sandwich_training_improves_the_smallest_and_the_largest_subnetwork():
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="instance").eval()
    loader = _tiny_task()
    torch.manual_seed(1)  # a freshly initialised student learns the paired task
    sn = make_supernet(create_model("resnet_6blocks", ngf=8, norm="instance"), loader[0][0][:1],
                       SliceConfig(ratios=(0.25, 0.5, 1.0), multiple=1))

    def l1_to_gt(widths):
        sn.set_widths(widths).eval()
        with torch.no_grad():
            return sum(float((sn(x) - y).abs().mean()) for x, y in loader)

    before = (l1_to_gt(sn.smallest()), l1_to_gt(sn.largest()))
    info = train_supernet(sn, teacher, loader, SupernetConfig(steps=30, lr=2e-3, recon_weight=0, gt_weight=10,
                                                              mse_weight=0), progress=False)
    after = (l1_to_gt(sn.smallest()), l1_to_gt(sn.largest()))
    assert info["steps"] == 30
    # measured: 3.48 -> 3.36 (smallest, a quarter of the widths) and 3.65 -> 3.05 (largest)
    assert after[0] < 0.98 * before[0] and after[1] < 0.9 * before[1]


def test_interrupted_supernet_training_resumes_to_the_same_weights(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=4, norm="instance").eval()
    loader = _tiny_task(5)
    cfg = SupernetConfig(steps=8, lr=1e-3, save_every=3, seed=3)

    def fresh():
        torch.manual_seed(1)
        return make_supernet(teacher, loader[0][0][:1], SliceConfig(ratios=(0.5, 1.0), multiple=1))

    whole = fresh()
    train_supernet(whole, teacher, loader, cfg, progress=False)

    ckpt = tmp_path / "sn.state.pt"
    broken = fresh()

    def crash(step, losses):
        if step == 5:
            raise KeyboardInterrupt  # killed after step 5; the last checkpoint is step 3

    with pytest.raises(KeyboardInterrupt):
        train_supernet(broken, teacher, loader, cfg, progress=False, checkpoint=ckpt, callbacks=[crash])
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    resumed = fresh()
    info = train_supernet(resumed, teacher, loader, cfg, progress=False, checkpoint=ckpt)
    assert info["resumed_from"] == 3
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k

    ckpt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot resume"):
        train_supernet(fresh(), teacher, loader, cfg, progress=False, checkpoint=ckpt)


def _searchable():
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="batch").eval()
    _bn_stats(teacher, torch.randn(4, 3, 32, 32))
    loader = _tiny_task(4)
    sn = make_supernet(teacher, loader[0][0][:1], SliceConfig(ratios=(0.25, 0.5, 0.75, 1.0), multiple=1))
    pairs = [((x[:2],), y[:2]) for x, y in loader[:2]]
    bn = [(x,) for x, _ in loader[2:]]
    return teacher, sn, pairs, bn


def test_search_meets_the_macs_budget_and_keeps_the_fittest():
    teacher, sn, pairs, bn = _searchable()
    cfg = SearchConfig(population=8, generations=3, metric="psnr_teacher")
    res = search(sn, teacher, pairs, bn, target_macs=0.3, config=cfg, progress=False)
    assert res.best.macs <= 0.3 * sn.total_macs
    within = [c for c in res.evaluated if c.macs <= 0.3 * sn.total_macs]
    assert res.best.fitness == max(c.fitness for c in within)
    assert res.evaluations >= 8 and res.per_minute > 0
    front = res.pareto()
    assert [c.macs for c in front] == sorted(c.macs for c in front)
    assert all(a.fitness < b.fitness for a, b in zip(front, front[1:]))
    assert pareto_front(front) == front
    # the exported choice is a plain module at those MACs
    recalibrate_bn(sn, bn, res.best.widths)
    plain = sn.export(res.best.widths)
    x = pairs[0][0][0][:1]
    assert measure.count_macs(plain, x) <= 0.3 * measure.count_macs(teacher, x) * 1.01


def test_budgets_outside_the_achievable_range_name_the_range():
    teacher, sn, pairs, bn = _searchable()
    with pytest.raises(BudgetError, match="achievable range"):
        search(sn, teacher, pairs, bn, target_macs=0.001, progress=False)
    with pytest.raises(BudgetError, match="achievable range"):
        search(sn, teacher, pairs, bn, target_macs=2 * sn.total_macs, progress=False)
    with pytest.raises(BudgetError, match="below the smallest"):
        search(sn, teacher, pairs, bn, target_latency_ms=1e-6, progress=False)
    with pytest.raises(SliceError, match="every channel group"):
        sn.set_widths({"model.1": 2})


def test_latency_budget_is_measured_on_the_device(macs_clock):
    # on a clock whose time follows the MACs of what really runs (the sliced layers): the real timer's
    # noise on a shared machine must not decide this test
    teacher, sn, pairs, bn = _searchable()
    big = (torch.rand(1, 3, 128, 128) * 2 - 1,)
    ev = Evaluator(sn, teacher, pairs, bn, "psnr_teacher", latency_input=big)
    full, small = ev.latency(sn.largest()), ev.latency(sn.smallest())
    assert small < 0.5 * full  # the slices really are smaller networks
    budget = (full + small) / 2
    res = search(sn, teacher, pairs, bn, target_latency_ms=budget, config=SearchConfig(population=6, generations=2),
                 evaluator=ev, progress=False)
    assert res.best.latency_ms is not None and res.best.latency_ms <= budget  # measured, not predicted
    sn.set_widths(res.best.widths)
    with sn.direct_thin_convs():  # timed as the exported sub-network runs (its output conv direct)
        assert res.best.latency_ms == macs_clock(sn.model, big).median_ms
    assert any(ms > budget for ms in ev.latency_cache.values())  # candidates over it were timed and rejected


def test_supernet_saves_and_reloads_without_its_class(tmp_path):
    teacher, sn, pairs, bn = _searchable()
    path = save_supernet(sn, tmp_path / "sn.safetensors")
    again = load_supernet(path)
    assert again.choices == sn.choices
    w = sn.sample(random.Random(1))
    x = pairs[0][0][0]
    sn.set_widths(w).eval()
    again.set_widths(w).eval()
    with torch.no_grad():
        assert torch.equal(sn(x), again(x))
    ganslim.save(teacher, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a ganslim supernet"):
        load_supernet(tmp_path / "plain.safetensors")


def test_compress_with_the_ofa_strategy_returns_a_plain_smaller_model():
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="instance").eval()
    loader = _tiny_task(4)
    res = ganslim.compress(teacher, teacher, loader, strategy="ofa", target_macs=0.3, steps=6, finetune_steps=4,
                           search_population=6, search_generations=2, search_precision="bf16", progress=False,
                           measure_latency=False)
    assert res.report.strategy == "ofa" and res.supernet is not None and res.report.search["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    assert res.report.student.macs <= 0.3 * res.report.teacher.macs * 1.01
    assert res.report.search["evaluations"] >= 6
    assert not any(isinstance(m, type(res.supernet)) for m in res.model.modules())
    assert all("forward" not in m.__dict__ for m in res.model.modules())  # no slicing left in the result
    with pytest.raises(BudgetError, match="achievable range"):
        ganslim.compress(teacher, teacher, loader, strategy="ofa", target_macs=1e-4, steps=1, progress=False)


def test_cli_compress_ofa_then_search_several_budgets(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    ganslim.save(create_model("resnet_6blocks", ngf=4), teacher)
    out = tmp_path / "ofa"
    assert main(["compress", "--teacher", str(teacher), "--strategy", "ofa", "--target-macs", "0.5", "--steps", "3",
                 "--finetune-steps", "1", "--crop", "32", "--batch-size", "2", "--population", "4", "--generations",
                 "1", "--out", str(out), "--no-progress"]) == 0
    assert (out / "supernet.safetensors").exists() and (out / "supernet.state.pt").exists()
    rc = main(["search", str(out / "supernet.safetensors"), "--teacher", str(teacher), "--target-macs", "0.6", "0.4",
               "--population", "4", "--generations", "1", "--crop", "32", "--batch-size", "2", "--precision", "auto",
               "--out", str(tmp_path / "s"), "--no-progress"])
    assert rc == 0
    rows = json.loads((tmp_path / "s" / "search.json").read_text())["rows"]
    assert [r["budget"] for r in rows] == ["macs 0.6", "macs 0.4"]
    assert all(r["macs_fraction"] <= float(r["budget"].split()[1]) * 1.01 for r in rows)
    assert (tmp_path / "s" / "pareto.png").stat().st_size > 1000
    for r in rows:
        assert ganslim.load(r["path"]) is not None
    assert main(["search", str(out / "supernet.safetensors"), "--teacher", str(teacher), "--target-macs", "0.0001",
                 "--out", str(tmp_path / "s2"), "--no-progress"]) == 2
    assert "achievable range" in capsys.readouterr().err


def test_forwards_follow_weight_updates_and_width_changes():
    # set_widths keeps each layer's channel indices per combination of widths: other widths, an
    # in-place weight update or a new Parameter must all be seen by the next forward, with or without
    # gradients
    torch.manual_seed(0)
    sn = make_supernet(create_model("resnet_6blocks", ngf=8, norm="batch"), torch.randn(1, 3, 32, 32),
                       SliceConfig(ratios=(0.5, 1.0), multiple=1))
    sn.eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def rel(a, b) -> float:
        return float((a - b).abs().max() / b.abs().max())

    def both():  # (without gradients, with gradients)
        with torch.no_grad():
            plain = sn(x)
        with torch.enable_grad():
            graded = sn(x).detach()
        return plain, graded

    sn.set_widths(sn.smallest())
    first, views = both()
    assert rel(first, views) < 1e-5
    conv = next(sn.model.get_submodule(n) for n, st in sn._states.items()
                if isinstance(sn.model.get_submodule(n), nn.Conv2d) and st["out"] is not None and st["in"] is not None)
    with torch.no_grad():
        conv.weight.mul_(0.5)
    halved, views = both()
    assert rel(halved, views) < 1e-5 and rel(halved, first) > 1e-3
    conv.weight = nn.Parameter(conv.weight.detach() * 4)
    replaced, views = both()
    assert rel(replaced, views) < 1e-5 and rel(replaced, halved) > 1e-3
    sn.set_widths(sn.largest())
    wide, views = both()
    assert rel(wide, views) < 1e-5 and wide.shape == first.shape and rel(wide, replaced) > 1e-3
    # with gradients the sliced weight is a view of the shared one: the gradient reaches it
    sn.set_widths(sn.smallest())
    sn(x).square().mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def _count(idx, n: int) -> int:
    return n if idx is None else (len(range(n)[idx]) if isinstance(idx, slice) else int(idx.numel()))


def test_set_widths_reuses_the_indices_it_computed_and_matches_the_masks():
    # the indices set_widths keeps per combination of widths are those the group masks give
    teacher, sn, _, _ = _searchable()
    rng = random.Random(0)
    for _ in range(20):
        w = sn.sample(rng)
        sn.set_widths(w)
        kept = sn._macs.kept_channels(sn.alive(w))
        for name, state in sn._states.items():
            mod = sn.model.get_submodule(name)
            if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d):
                assert (_count(state["in"], mod.in_channels), _count(state["out"], mod.out_channels)) == kept[name], (name, w)
    hits = len(sn._index_cache)
    sn.set_widths(w)
    assert len(sn._index_cache) == hits  # nothing computed again


def _merge_cases():
    """(supernet, bn batches) of the field's generators that have BatchNorm: ResNet (NCHW and
    channels-last inputs), U-Net, SPADE (parameter-free BatchNorm inside its SPADE blocks), mobile ResNet."""
    from test_targets_per_generator import _label_batches, _spectral_norm_baked

    torch.manual_seed(0)
    cases = {}
    photos = [(torch.randn(2, 3, 32, 32),) for _ in range(3)]
    cfg = SliceConfig(ratios=(0.5, 1.0), multiple=1)
    cases["resnet-batch"] = (make_supernet(create_model("resnet_6blocks", ngf=8, norm="batch"), photos[0][0][:1], cfg),
                             photos)
    cases["resnet-batch-channels-last"] = (copy.deepcopy(cases["resnet-batch"][0]),
                                           [(x.contiguous(memory_format=torch.channels_last),) for x, in photos])
    big = [(torch.randn(2, 3, 128, 128),) for _ in range(3)]
    cases["unet-batch"] = (make_supernet(create_model("unet_128", ngf=8, norm="batch"), big[0][0][:1], cfg), big)
    spade = _spectral_norm_baked(create_model("spade", label_nc=3, ngf=4, crop_size=32, no_instance=True))
    labels = [(seg[:2],) for seg, _ in _label_batches(3, 2, 32, 3)]
    cases["spade"] = (make_supernet(spade, labels[0][0][:1], cfg), labels)
    mobile = create_model("mobile_resnet_9blocks", ngf=8, norm="batch")
    cases["mobile-resnet-batch"] = (make_supernet(mobile, photos[0][0][:1], cfg), photos)
    return cases


@pytest.mark.parametrize("name", ["resnet-batch", "resnet-batch-channels-last", "unet-batch", "spade",
                                  "mobile-resnet-batch"])
def test_merged_recalibration_gives_the_statistics_of_one_forward_per_batch_bit_for_bit(name, monkeypatch):
    from ganslim.pruning import slicing

    sn, batches = _merge_cases()[name]
    merged_forwards = []
    real = slicing._merged_inputs
    monkeypatch.setattr(slicing, "_merged_inputs", lambda *a: merged_forwards.append(real(*a)) or merged_forwards[-1])
    rng = random.Random(0)
    for widths in (sn.smallest(), sn.largest(), {k: rng.choice(v) for k, v in sn.choices.items()}):
        stats = {}
        for merge in (False, True):
            recalibrate_bn(sn, batches, widths, merge=merge)
            stats[merge] = {k: v.clone() for k, v in sn.model.state_dict().items() if "running" in k or "num_batches" in k}
        assert stats[True].keys() == stats[False].keys() and stats[True]
        for k in stats[False]:
            assert torch.equal(stats[True][k], stats[False][k]), (name, k)
        # every BatchNorm counted 3 batches (not one of 6), as the separate forwards count them
        assert {int(v) for k, v in stats[True].items() if k.endswith("num_batches_tracked")} <= {0, 3}
    merged = [m for m in merged_forwards if m is not None]
    assert merged and merged[0][0].shape[0] == 3 * batches[0][0].shape[0], name  # the merged path really ran
    if name.endswith("channels-last"):  # the layout the caller chose is kept
        assert merged[0][0].is_contiguous(memory_format=torch.channels_last) and not merged[0][0].is_contiguous()


def test_recalibration_runs_one_forward_per_batch_where_merging_would_not_be_exact():
    from ganslim.pruning.slicing import _merged_inputs

    torch.manual_seed(0)
    x = [(torch.randn(2, 3, 32, 32),) for _ in range(3)]
    sn = make_supernet(create_model("resnet_6blocks", ngf=8, norm="batch"), x[0][0][:1],
                       SliceConfig(ratios=(0.5, 1.0), multiple=1))
    assert _merged_inputs(sn, x) is not None
    assert _merged_inputs(sn, x[:1]) is None  # one batch: nothing to merge
    assert _merged_inputs(sn, x + [(torch.randn(1, 3, 32, 32),)]) is None  # unequal batch sizes
    assert _merged_inputs(sn, [(t, 1.0) for t, in x]) is not None  # the same non-tensor argument
    assert _merged_inputs(sn, [(t, float(i)) for i, (t,) in enumerate(x)]) is None  # different ones
    big = [(torch.randn(64, 3, 256, 256),) for _ in range(2)]  # beyond MERGE_MAX_ELEMENTS
    assert _merged_inputs(sn, big) is None
    # a U-Net with dropout (pix2pix's option): its random draws would differ from separate forwards
    unet = make_supernet(create_model("unet_128", ngf=8, norm="batch", use_dropout=True),
                         torch.randn(1, 3, 128, 128), SliceConfig(ratios=(0.5, 1.0), multiple=1))
    assert _merged_inputs(unet, [(torch.randn(2, 3, 128, 128),) for _ in range(2)]) is None
    # a BatchNorm outside the supernet's channel groups would normalise the merged batch as one
    sn.model.extra = nn.BatchNorm2d(3)
    assert _merged_inputs(sn, x) is None
