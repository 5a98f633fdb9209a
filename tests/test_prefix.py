"""Shared-prefix reuse in the search's evaluation (ganslim.pruning.prefix): the numbers of whole forwards
bit for bit on the field's generators, work really skipped, memory bounded, in-place layers handled."""
import random

import pytest
import torch
import torch.nn as nn

from ganslim.pruning.prefix import PrefixCache, chain_segments
from ganslim.pruning.search import Evaluator, SearchConfig, search
from ganslim.pruning.slicing import SliceConfig, make_supernet
from ganslim.zoo import create_model

from test_slicing import _bn_stats, _fitness_across_a_weight_step, _merge_cases, _searchable


def _family(sn, n: int, seed: int = 0) -> list[dict]:
    """Related sub-networks as an evolution makes them: an earlier one's widths, a few redrawn."""
    rng = random.Random(seed)
    pool = [sn.sample(rng)]
    while len(pool) < n:
        w = dict(rng.choice(pool))
        for root in w:
            if rng.random() < 0.25:
                w[root] = rng.choice(sn.choices[root])
        pool.append(w)
    return pool


def _cases():
    cases = _merge_cases()  # ResNet (NCHW, channels-last), U-Net, SPADE, mobile ResNet, all with BatchNorm
    torch.manual_seed(0)
    photos = [(torch.randn(2, 3, 32, 32),) for _ in range(3)]
    cfg = SliceConfig(ratios=(0.5, 1.0), multiple=1)
    inorm = create_model("resnet_6blocks", ngf=8, norm="instance")  # CycleGAN's default: nothing to re-estimate
    cases["resnet-instance"] = (make_supernet(inorm, photos[0][0][:1], cfg), photos)
    cartoon = create_model("cartoongan_znxlwm", nf=8, nb=2)
    cases["cartoongan"] = (make_supernet(cartoon, photos[0][0][:1], cfg), photos)
    return cases


CHAINS = {"resnet-batch", "resnet-batch-channels-last", "mobile-resnet-batch", "resnet-instance", "cartoongan"}


@pytest.mark.parametrize("name", ["resnet-batch", "resnet-batch-channels-last", "unet-batch", "spade",
                                  "mobile-resnet-batch", "resnet-instance", "cartoongan"])
def test_prefix_reuse_gives_the_fitness_and_statistics_of_whole_forwards_bit_for_bit(name):
    sn, batches = _cases()[name]
    with torch.no_grad():
        out = sn.model.eval()(*batches[0])
    g = torch.Generator().manual_seed(1)
    pairs = [(batches[0], torch.rand(out.shape, generator=g) * 2 - 1)]
    reuse = Evaluator(sn, None, pairs, batches[1:], "psnr_gt", prefix_cache_mb=64)
    whole = Evaluator(sn, None, pairs, batches[1:], "psnr_gt", prefix_cache_mb=0)
    assert whole.prefix is None
    if name in CHAINS:  # the ResNets and CartoonGAN trace into a chain of layers and blocks
        assert reuse.prefix is not None and len(reuse.prefix.boundaries) >= 3, name
    stats = lambda: {k: v.clone() for k, v in sn.model.state_dict().items()  # noqa: E731
                     if "running" in k or "num_batches" in k}
    for w in _family(sn, 10):
        a = reuse(w)
        sa = stats()
        b = whole(w)
        assert a.fitness == b.fitness and a.metrics == b.metrics, (name, w)
        sb = stats()
        assert all(torch.equal(sa[k], sb[k]) for k in sb), name
    if name in CHAINS:
        assert reuse.prefix.hits > 0 and reuse.prefix.bytes <= reuse.prefix.max_bytes
    elif name == "unet-batch":  # one cut, after the first conv, whose output the next LeakyReLU writes in place
        assert reuse.prefix.hits == 0 and not reuse.prefix.entries


def test_prefix_reuse_skips_the_shared_layers():
    teacher, sn, pairs, bn = _searchable()
    ev = Evaluator(sn, teacher, pairs, bn, "psnr_teacher", prefix_cache_mb=64)
    stem = sn.model.get_submodule("model.1")  # the first conv: set by the first group only
    calls = []
    h = stem.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        base = sn.smallest()
        ev(base)
        first = len(calls)
        last_root = list(base)[-1]  # a group of the last layers: the stem's output is shared
        other = dict(base, **{last_root: sn.choices[last_root][-1]})
        ev(other)
    finally:
        h.remove()
    assert first == 1 + len(pairs)  # one (merged) re-estimation forward and one per evaluation input
    assert len(calls) == first, "the stem ran again for a sub-network that shares it"
    fresh = Evaluator(sn, teacher, pairs, bn, "psnr_teacher", prefix_cache_mb=0)
    assert ev(other).fitness == fresh(other).fitness


def test_prefix_memory_stays_within_its_budget():
    teacher, sn, pairs, bn = _searchable()
    ev = Evaluator(sn, teacher, pairs, bn, "psnr_teacher", prefix_cache_mb=1)
    sizes = []
    for w in _family(sn, 12, seed=3):
        ev(w)
        sizes.append(ev.prefix.bytes)
    assert max(sizes) <= 1 << 20 and len(ev.prefix.entries) > 0
    assert sum(e.nbytes for e in ev.prefix.entries.values()) == ev.prefix.bytes


def test_a_layer_that_writes_its_input_in_place_is_not_started_from_a_kept_activation():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv3 = nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x):
            h = self.bn1(self.conv1(x))
            h.mul_(0.5)  # the next segment starts by writing the previous one's output
            return torch.tanh(self.conv3(torch.relu(self.bn2(self.conv2(h)))))

    torch.manual_seed(0)
    net = _bn_stats(InPlace(), torch.randn(4, 3, 16, 16))
    sn = make_supernet(net, torch.randn(1, 3, 16, 16), SliceConfig(ratios=(0.25, 0.5, 1.0), multiple=1))
    pairs = [((torch.rand(2, 3, 16, 16) * 2 - 1,), torch.rand(2, 3, 16, 16) * 2 - 1)]
    bn = [(torch.randn(4, 3, 16, 16),) for _ in range(2)]
    reuse = Evaluator(sn, None, pairs, bn, "psnr_gt", prefix_cache_mb=64)
    whole = Evaluator(sn, None, pairs, bn, "psnr_gt", prefix_cache_mb=0)
    assert reuse.prefix is not None
    for w in _family(sn, 8, seed=1):
        assert reuse(w).fitness == whole(w).fitness
    # the activation after bn1 is written by mul_ after it was produced: never kept, never reused
    assert reuse.prefix.hits == 0 and not any(k[0] == 0 for k in reuse.prefix.entries)


def test_search_chooses_the_same_subnetwork_with_and_without_prefix_reuse():
    teacher, sn, pairs, bn = _searchable()
    cfg = SearchConfig(population=8, generations=3, metric="psnr_teacher")
    with_reuse = search(sn, teacher, pairs, bn, target_macs=0.3, config=cfg, progress=False)
    without = search(sn, teacher, pairs, bn, target_macs=0.3,
                     config=SearchConfig(**{**cfg.__dict__, "prefix_cache_mb": 0}), progress=False)
    assert with_reuse.best.widths == without.best.widths and with_reuse.best.fitness == without.best.fitness
    assert [c.fitness for c in with_reuse.evaluated] == [c.fitness for c in without.evaluated]
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        SearchConfig(prefix_cache_mb=-1).validate()


def test_generators_without_a_chain_are_evaluated_whole():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, y):
            return self.conv(x) + y

    assert chain_segments(TwoInputs(), (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))) is None

    class Branchy(nn.Module):  # data-dependent control flow: does not trace
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) if x.mean() > 0 else -self.conv(x)

    assert chain_segments(Branchy(), (torch.randn(1, 3, 8, 8),)) is None
    sn = make_supernet(create_model("resnet_6blocks", ngf=8, norm="batch"), torch.randn(1, 3, 32, 32),
                       SliceConfig(ratios=(0.5, 1.0), multiple=1))
    assert not PrefixCache(sn, sn.example_inputs, max_bytes=0).enabled  # turned off


def test_kept_prefixes_are_dropped_when_the_weights_change():
    before, after, fresh = _fitness_across_a_weight_step({"prefix_cache_mb": 64}, {"prefix_cache_mb": 0})
    assert after == fresh != before


def test_the_cli_and_compress_config_pass_the_prefix_memory_through(tmp_path):
    import json

    import ganslim
    from ganslim.cli import main

    with pytest.raises(ValueError, match="search_prefix_cache_mb"):
        ganslim.CompressConfig().replace(search_prefix_cache_mb=-1).validate()
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    ganslim.save(_bn_stats(create_model("resnet_6blocks", ngf=4, norm="batch"), torch.randn(4, 3, 32, 32)), teacher)
    out = tmp_path / "ofa"
    assert main(["compress", "--teacher", str(teacher), "--strategy", "ofa", "--target-macs", "0.5", "--steps", "3",
                 "--finetune-steps", "1", "--crop", "32", "--batch-size", "2", "--population", "4", "--generations",
                 "1", "--out", str(out), "--no-progress"]) == 0
    rows = {}
    for mb in ("0", "64"):
        assert main(["search", str(out / "supernet.safetensors"), "--teacher", str(teacher), "--target-macs", "0.6",
                     "--population", "6", "--generations", "2", "--crop", "32", "--batch-size", "2",
                     "--prefix-cache-mb", mb, "--out", str(tmp_path / f"s{mb}"), "--no-progress"]) == 0
        rows[mb] = json.loads((tmp_path / f"s{mb}" / "search.json").read_text())["rows"]
    chosen = {mb: [(r["widths"], r["psnr_gt_search"], r["evaluations"]) for r in rows[mb]] for mb in rows}
    assert chosen["0"] == chosen["64"]


def test_a_forward_that_branches_on_training_is_evaluated_whole():
    class NoisyInTraining(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x):
            h = self.bn(self.conv1(x))
            if self.training:  # a trace would freeze one branch; the re-estimation runs the other mode
                h = h * 0.5
            return self.conv2(h)

    net = NoisyInTraining()
    assert chain_segments(net, (torch.randn(1, 3, 8, 8),)) is None
    assert net.training  # its mode given back


def test_the_kept_prefixes_take_at_most_a_quarter_of_the_free_memory(tmp_path, monkeypatch):
    import ganslim.pruning.search as search_mod
    from ganslim.measure.memory import available_memory_bytes
    from ganslim.pruning.search import prefix_cache_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25165824 kB\nMemFree:          1000 kB\nMemAvailable:    1048576 kB\n")
    assert available_memory_bytes("cpu", meminfo=str(meminfo)) == 1 << 30  # MemAvailable, in kiB
    free = available_memory_bytes("cpu")
    assert free is None or free > 0  # this machine's
    monkeypatch.setattr(search_mod, "available_memory_bytes", lambda device=None: 1 << 30)
    assert prefix_cache_bytes(2048, "cpu") == 256 << 20  # a quarter of 1 GiB
    assert prefix_cache_bytes(2048, "cpu", processes=2) == 128 << 20  # split between the processes
    assert prefix_cache_bytes(64, "cpu", processes=2) == 64 << 20  # the asked-for size where it fits
    assert prefix_cache_bytes(0, "cpu") == 0
    sn = make_supernet(create_model("resnet_6blocks", ngf=8, norm="batch"), torch.randn(1, 3, 32, 32),
                       SliceConfig(ratios=(0.5, 1.0), multiple=1))
    pairs = [((torch.randn(1, 3, 32, 32),), torch.rand(1, 3, 32, 32) * 2 - 1)]
    bn = [(torch.randn(2, 3, 32, 32),)]
    ev = Evaluator(sn, None, pairs, bn, "psnr_gt", prefix_cache_mb=2048)
    assert ev.prefix.max_bytes == 256 << 20
    monkeypatch.setattr(search_mod, "available_memory_bytes", lambda device=None: None)  # not known
    assert Evaluator(sn, None, pairs, bn, "psnr_gt", prefix_cache_mb=2048).prefix.max_bytes == 2048 << 20
    monkeypatch.setattr(search_mod, "available_memory_bytes", lambda device=None: 0)  # nothing free: reuse off
    assert Evaluator(sn, None, pairs, bn, "psnr_gt", prefix_cache_mb=2048).prefix is None
