"""Strategies beyond GAN Slimming: CAT one-step pruning, GKA distillation, evolutionary masks with a
discriminator-aware fitness, and strategy selection through one compress() call."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import ganslim
from ganslim import measure
from ganslim.config import STRATEGIES, CompressConfig
from ganslim.core.distill import FeatureDistiller, kernel_alignment
from ganslim.pruning.evolve import ChannelMasks, EvolveConfig, _Fitness, evolve_masks
from ganslim.core.gating import MacsModel
from ganslim.pruning.onestep import importance_scores, onestep_masks, onestep_prune
from ganslim.strategies import choose_strategy, winners_from_rows
from ganslim.core.targeting import find_channel_groups
from ganslim.zoo import create_model

from equivalence import assert_same_function


def _trained_bn(ngf=8, seed=0):
    torch.manual_seed(seed)
    m = create_model("resnet_6blocks", ngf=ngf, norm="batch")
    with torch.no_grad():  # non-trivial norm scales and running statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 2.0)
        m.train()
        m(torch.randn(4, 3, 32, 32))
    return m.eval()


def test_kernel_alignment_is_invariant_to_channel_permutation_scale_and_width():
    torch.manual_seed(0)
    f = torch.randn(2, 16, 8, 8)
    perm = f[:, torch.randperm(16)] * 7.5  # same features, shuffled channels, scaled
    assert kernel_alignment(f, perm).item() == pytest.approx(1.0, abs=1e-5)
    q, _ = torch.linalg.qr(torch.randn(16, 16))  # any orthogonal mix of channels
    rotated = torch.einsum("dc,nchw->ndhw", q, f)
    assert kernel_alignment(f, rotated).item() == pytest.approx(1.0, abs=1e-4)
    wider = torch.cat([f, torch.zeros(2, 8, 8, 8)], 1)  # 24 channels vs 16: width-independent
    assert kernel_alignment(f, wider).item() == pytest.approx(1.0, abs=1e-5)
    unrelated = kernel_alignment(f, torch.randn(2, 16, 8, 8)).item()
    assert 0 <= unrelated < 0.3


def test_gka_distiller_has_no_mapping_layers_and_its_loss_falls_when_features_align():
    teacher = _trained_bn()
    student = create_model("resnet_6blocks", ngf=8, norm="batch").eval()
    x = torch.randn(2, 3, 32, 32)
    d = FeatureDistiller(student, teacher, {"model.10": "model.10"}, x, kind="gka")
    assert sum(p.numel() for p in d.parameters()) == 0
    student(x)
    teacher(x)
    unrelated = float(d.loss())
    student.load_state_dict(teacher.state_dict())
    student(x)
    teacher(x)
    assert float(d.loss()) < 1e-5 < unrelated
    with pytest.raises(ValueError, match="'mse' or 'gka'"):
        FeatureDistiller(student, teacher, {"model.10": "model.10"}, x, kind="l2")


def test_onestep_meets_the_macs_target_and_keeps_the_largest_norm_scales():
    m = _trained_bn(ngf=16)
    x = torch.randn(1, 3, 32, 32)
    targets = find_channel_groups(m, x)
    mm = MacsModel(m, targets, measure.macs_by_module(m, x))
    bn = m.model[2]
    with torch.no_grad():
        bn.weight.fill_(0.5)
        bn.weight[5] = 50.0  # by far the most important channel of the first group
    target = 0.25 * mm.total
    alive = onestep_masks(m, targets, mm, target)
    assert bool(alive[0][5])
    plain = onestep_prune(m, targets, alive, x)
    got = measure.count_macs(plain, x)
    assert 0.9 * target <= got <= target  # one global threshold lands within a channel of the target
    assert mm.macs(alive) == pytest.approx(got, rel=1e-6)
    scores = importance_scores(m, targets)
    assert all(s.mean().item() == pytest.approx(1.0, rel=1e-2) for s in scores)  # groups compared fairly


def test_channel_masks_compute_exactly_the_pruned_network():
    m = _trained_bn()
    x = torch.randn(2, 3, 32, 32)
    targets = find_channel_groups(m, x[:1])
    mm = MacsModel(m, targets, measure.macs_by_module(m, x[:1]))
    res = evolve_masks(m, m, targets, mm, 0.3 * mm.total, importance_scores(m, targets), [(x,)],
                       config=EvolveConfig(population=6, generations=2), progress=False)
    assert res.macs <= 0.3 * mm.total and res.evaluations >= 6
    assert all("forward" not in mod.__dict__ for mod in m.modules()) and not m._forward_hooks  # hooks removed
    masks = ChannelMasks(targets)
    masks.set_masks(res.alive)
    plain = onestep_prune(m, targets, res.alive, x[:1])
    masks.attach(m)
    assert_same_function(plain, m, x, b_with=(masks,))
    masks.detach()


def test_discriminator_and_cycle_terms_enter_the_fitness():
    teacher = _trained_bn()
    m = copy.deepcopy(teacher)  # the student the masks go on
    x = torch.randn(2, 3, 32, 32)
    targets = find_channel_groups(m, x[:1])
    masks = ChannelMasks(targets).attach(m)
    half = [torch.arange(g.size) < max(1, g.size // 2) for g in targets.groups]
    full = [torch.ones(g.size, dtype=torch.bool) for g in targets.groups]
    disc = nn.Conv2d(3, 1, 4, 2, 1)
    reverse = create_model("resnet_6blocks", ngf=4).eval()
    cfg = EvolveConfig()
    plain_f = _Fitness(m, teacher, masks, [(x,)], None, None, cfg)
    with_d = _Fitness(m, teacher, masks, [(x,)], disc, None, cfg)
    with_both = _Fitness(m, teacher, masks, [(x,)], disc, reverse, cfg)
    assert with_both(half) < with_d(half) < plain_f(half) < 0  # each term is a non-negative distance subtracted
    assert with_d(full) == pytest.approx(0.0, abs=1e-6)  # all channels kept: the teacher itself
    masks.detach()


def test_every_strategy_runs_through_one_compress_call():
    teacher = _trained_bn()
    g = torch.Generator().manual_seed(0)
    loader = [(xb, torch.tanh(xb.flip(1))) for xb in (torch.rand(4, 3, 24, 24, generator=g) * 2 - 1 for _ in range(3))]
    disc = nn.Conv2d(3, 1, 4, 2, 1)
    for strategy in ("slim", "onestep", "evolve", "ofa", "uniform"):
        res = ganslim.compress(teacher, teacher, loader, strategy=strategy, target_macs=0.3, steps=4, finetune_steps=2,
                               progress=False, measure_latency=False, evolve_population=4, evolve_generations=1,
                               search_population=4, search_generations=1, distill_loss="gka", finetune_distill=True,
                               discriminator=disc if strategy == "evolve" else None)
        assert res.report.strategy == strategy
        assert res.report.student.macs <= 0.3 * res.report.teacher.macs * 1.02, strategy
        assert not any(h for mod in res.model.modules() for h in mod._forward_hooks.values()), strategy
    with pytest.raises(ValueError, match="'slim', 'onestep', 'ofa', 'evolve', 'uniform', 'separable', 'halp', 'auto'"):
        CompressConfig(strategy="magic").validate()
    for name in STRATEGIES:  # every advertised name is accepted
        assert CompressConfig(strategy=name).validate().strategy == name


@pytest.mark.parametrize("strategy", ["evolve", "onestep"])
def test_a_latency_target_with_a_pruning_search_reports_instead_of_failing(strategy):
    # a budget every variant meets (1000 s): the calibration turns it into the full MACs budget, deterministically
    teacher = _trained_bn()
    loader = [(torch.rand(2, 3, 24, 24) * 2 - 1,) for _ in range(2)]
    res = ganslim.compress(teacher, teacher, loader, strategy=strategy, target_latency_ms=1e6, steps=2, finetune_steps=1,
                           progress=False, evolve_population=4, evolve_generations=1)
    rep = res.report
    assert rep.latency_target_ms == 1e6 and any("latency target" in n for n in rep.notes)
    assert rep.student.macs <= rep.teacher.macs * 1.0001


def test_evolve_refuses_a_budget_its_repair_cannot_reach():
    m = _trained_bn()
    x = torch.randn(2, 3, 32, 32)
    targets = find_channel_groups(m, x[:1])
    mm = MacsModel(m, targets, measure.macs_by_module(m, x[:1]))
    # at least 8 channels per group (multiple=8) cannot fit 1% of the MACs: a clear error, before any evaluation
    with pytest.raises(ValueError, match="below the smallest masks"):
        evolve_masks(m, m, targets, mm, 0.01 * mm.total, importance_scores(m, targets), [(x,)],
                     config=EvolveConfig(population=4, generations=1), multiple=8, progress=False)
    assert not m._forward_hooks and all(not mod._forward_hooks for mod in m.modules())


def test_auto_picks_the_measured_winner_nearest_the_target(tmp_path):
    rows = [{"target": 0.1, "strategy": "slim", "psnr_gt": 29.70, "minutes": 7.0},
            {"target": 0.1, "strategy": "onestep+gka", "psnr_gt": 29.68, "minutes": 4.0},  # a tie: the faster wins
            {"target": 0.05, "strategy": "slim", "psnr_gt": 27.0, "minutes": 5.0},
            {"target": 0.05, "strategy": "ofa", "psnr_gt": 28.1, "minutes": 20.0},
            {"target": 0.05, "strategy": "onestep+gka", "psnr_gt": 27.5, "minutes": 3.0}]
    table = winners_from_rows(rows)
    assert table["winners"]["0.1"]["variant"] == "onestep+gka" and table["winners"]["0.05"]["variant"] == "ofa"
    assert table["overall"] == "onestep+gka"  # best mean over both targets (ofa ran at one only)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(dict(table, source="test")))
    settings, why = choose_strategy(0.12, path)
    assert settings == {"strategy": "onestep", "distill_loss": "gka", "finetune_distill": True} and "0.1" in why
    assert choose_strategy(0.04, path)[0] == {"strategy": "ofa"}
    assert choose_strategy(None, path)[0]["strategy"] == "onestep"
    settings, why = choose_strategy(0.1, tmp_path / "missing.json")
    assert settings == {"strategy": "uniform"} and "no measured head-to-head" in why  # the default strategy
    # the separable student takes no latency target: it wins targets, never the latency budget's choice
    sep = rows + [{"target": 0.1, "strategy": "separable", "psnr_gt": 31.0, "minutes": 9.0},
                  {"target": 0.05, "strategy": "separable", "psnr_gt": 30.0, "minutes": 9.0}]
    table = winners_from_rows(sep)
    assert table["winners"]["0.05"]["variant"] == "separable" and table["overall"] == "onestep+gka"
    path.write_text(json.dumps(dict(table, overall="separable", source="an older table")))
    settings, why = choose_strategy(None, path)
    assert settings == {"strategy": "uniform"} and "latency budget" in why
    assert choose_strategy(0.05, path)[0] == {"strategy": "separable"}


@pytest.fixture(scope="module")
def bench_peer():
    """benchmarks/bench_peer.py as a module (it writes strategy='auto''s tables)."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "bench_peer", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_takes_the_trivial_peer_comparison_at_its_longest_budget(tmp_path, bench_peer):
    row = lambda b, t, v, p: {"budget": b, "target": t, "variant": v, "psnr_gt": p, "minutes": 1.0}  # noqa: E731
    rows = [row(1000, 0.1, "onestep", 27.0), row(1000, 0.1, "uniform", 26.0),  # short budget: another ranking
            row(12800, 0.1, "onestep", 29.4), row(12800, 0.1, "uniform", 30.2),
            row(3000, 0.05, "onestep", 28.4), row(3000, 0.05, "uniform", 27.7)]
    path = tmp_path / "auto.json"
    table = bench_peer.write_winners(rows, str(path))
    assert table["winners"]["0.1"]["variant"] == "uniform" and table["winners"]["0.05"]["variant"] == "onestep"
    assert "12800 steps at 1/10" in table["source"] and "3000 steps at 1/20" in table["source"]
    assert choose_strategy(0.1, path)[0] == {"strategy": "uniform"}
    assert choose_strategy(0.05, path)[0] == {"strategy": "onestep"}
    assert table["budget"] == 3000  # the shortest of the targets' longest budgets


def test_auto_reads_the_winners_of_the_budget_it_is_given(tmp_path, bench_peer):
    """At 1/10 the peer wins after 12800 steps and separable after 1000 (bench_peer): with short_budgets
    (bench_peer --short-winners) auto takes the winner of the measured budget nearest (log scale) to the
    steps it will train; the table's own winners for the long budget, for no steps, and for the latency
    target (no fraction)."""
    row = lambda b, t, v, p: {"budget": b, "target": t, "variant": v, "psnr_gt": p, "minutes": 1.0}  # noqa: E731
    path = tmp_path / "auto.json"
    bench_peer.write_winners([row(12800, 0.1, "separable", 30.1), row(12800, 0.1, "uniform", 30.5),
                              row(12800, 0.05, "onestep", 30.2), row(12800, 0.05, "uniform", 29.3)], str(path))
    short = [row(1000, 0.1, "separable", 28.1), row(1000, 0.1, "uniform", 27.6),
             row(3000, 0.1, "onestep", 28.9), row(3000, 0.1, "uniform", 28.5),
             row(3000, 0.05, "onestep", 28.4), row(3000, 0.05, "uniform", 27.7),
             row(12800, 0.1, "separable", 20.0)]  # not shorter than the table's own: ignored
    table = bench_peer.write_short_winners(short, str(path), "rows.json")
    assert sorted(table["short_budgets"]) == ["1000", "3000"] and "rows.json" in table["short_budgets"]["1000"]["source"]
    assert table["winners"]["0.1"]["variant"] == "uniform"  # the main winners are kept
    settings, why = choose_strategy(0.1, path, steps=800)
    assert settings == {"strategy": "separable"} and "after 1000 steps" in why
    assert choose_strategy(0.1, path, steps=1700)[0] == {"strategy": "separable"}  # nearer 1000 than 3000
    assert choose_strategy(0.1, path, steps=1800)[0] == {"strategy": "onestep"}
    assert choose_strategy(0.1, path, steps=6000)[0] == {"strategy": "onestep"}
    for steps in (6500, 12800, 50000, None):
        settings, why = choose_strategy(0.1, path, steps=steps)
        assert settings == {"strategy": "uniform"} and "after" not in why
    settings, why = choose_strategy(0.05, path, steps=1000)  # 1000 steps were not measured at 1/20: the long budget
    assert settings == {"strategy": "onestep"} and "after" not in why
    assert choose_strategy(None, path, steps=1000)[0] == {"strategy": "uniform"}  # overall: the long budget's
    settings, why = choose_strategy(5e8, path, steps=1000)  # absolute MACs: the fraction is not known up front
    assert settings == {"strategy": "uniform"} and "rows.json" not in why
    # a table from before budgets were recorded is the demo's 12800 steps
    legacy = json.loads(path.read_text())
    del legacy["budget"]
    path.write_text(json.dumps(legacy))
    assert choose_strategy(0.1, path, steps=6500)[0] == {"strategy": "uniform"}
    assert choose_strategy(0.1, path, steps=1000)[0] == {"strategy": "separable"}


def test_short_budget_winners_from_several_seeds_take_each_cells_mean(tmp_path, bench_peer):
    row = lambda t, v, p, m=1.0: {"budget": 1000, "target": t, "variant": v, "psnr_gt": p, "minutes": m}  # noqa: E731
    seed0 = [row(0.1, "separable", 28.1, 2.0), row(0.1, "uniform", 27.6), row(0.05, "onestep", 27.7)]
    seed1 = [row(0.1, "separable", 27.0, 4.0), row(0.1, "uniform", 27.8)]  # 1/20 not measured in this seed
    rows = bench_peer.mean_over_seeds([seed0, seed1])
    by = {(r["target"], r["variant"]): r for r in rows}
    assert abs(by[0.1, "separable"]["psnr_gt"] - 27.55) < 1e-9 and by[0.1, "separable"]["minutes"] == 3.0
    assert by[0.1, "separable"]["seeds"] == 2 and by[0.05, "onestep"]["seeds"] == 1
    path = tmp_path / "auto.json"
    bench_peer.write_winners([dict(row(0.1, "uniform", 30.5), budget=12800)], str(path))
    table = bench_peer.write_short_winners(rows, str(path), "s0.json, s1.json")
    # seed 0 alone ranks separable first; over both seeds the peer leads (27.70 vs 27.55 dB)
    assert table["short_budgets"]["1000"]["winners"]["0.1"]["variant"] == "uniform"
    assert "mean of 1/2 seed(s)" in table["short_budgets"]["1000"]["source"]


def test_cells_of_other_runs_join_a_grid_only_from_the_same_seed_task_and_machine(tmp_path, bench_peer):
    """bench_peer --report --also: variants measured in later runs stand beside the grid's cells (this
    CPU type repeats these commands to the same PSNR); a cell in several files is the first file's,
    counted once (not a mean over seeds), and a file of another seed, task or machine is refused."""
    row = lambda b, t, v, p: {"budget": b, "target": t, "variant": v, "psnr_gt": p, "minutes": 1.0}  # noqa: E731
    meta = {"seed": 0, "teacher": "default (ResNet-9 ngf 32, batch norm)", "student_photos": ["a"],
            "ground_truth": True, "machine": "AMD EPYC, 2 cores"}
    grid = dict(meta, rows=[row(1000, 0.1, "uniform", 27.6), row(1000, 0.1, "separable", 28.1)])
    later = dict(meta, rows=[row(1000, 0.1, "separable", 99.0), row(1000, 0.1, "separable+gka", 28.3),
                             row(3000, 0.1, "uniform", 28.8)])
    path = tmp_path / "later.json"
    path.write_text(json.dumps(later))
    merged = bench_peer.merge_cells(grid, "grid.json", [str(path)])
    cells = {(r["budget"], r["variant"]): r["psnr_gt"] for r in merged["rows"]}
    assert cells == {(1000, "uniform"): 27.6, (1000, "separable"): 28.1, (1000, "separable+gka"): 28.3,
                     (3000, "uniform"): 28.8}
    assert len(grid["rows"]) == 2  # the grid itself is left as it was
    rows = bench_peer.mean_over_seeds([merged["rows"]])
    assert all(r["seeds"] == 1 for r in rows)
    for field, value in (("seed", 1), ("machine", "Intel Xeon, 2 cores"), ("ground_truth", False)):
        path.write_text(json.dumps(dict(later, **{field: value})))
        with pytest.raises(SystemExit, match=field):
            bench_peer.merge_cells(grid, "grid.json", [str(path)])


def test_short_budget_winners_go_only_into_the_table_of_the_teacher_they_measured(tmp_path, bench_peer):
    default_table, instance_table = tmp_path / "default.json", tmp_path / "instance.json"
    default_table.write_text(json.dumps({"winners": {}}))
    instance_table.write_text(json.dumps({"winners": {}, "task": "the teacher runs/t.safetensors"}))
    default_rows = {"teacher": "default (ResNet-9 ngf 32, batch norm)", "ground_truth": True}
    instance_rows = {"teacher": "runs/t.safetensors", "ground_truth": True}
    bench_peer.check_table_task(default_rows, "a.json", str(default_table))
    bench_peer.check_table_task(instance_rows, "b.json", str(instance_table))
    for rows, table in ((instance_rows, default_table), (default_rows, instance_table),
                        (dict(instance_rows, ground_truth=False), instance_table)):
        with pytest.raises(SystemExit):
            bench_peer.check_table_task(rows, "c.json", str(table))


def test_auto_reads_the_instance_norm_table_for_an_instance_norm_teacher(tmp_path):
    """On the instance-norm teacher the separable student beat the uniform peer at 1/10 and 1/20 in
    both seeds and at 1/40 (bench_frontier.py): auto picks it there (the peer for a latency budget, which the
    separable student does not take), and keeps the default task's winner for a BatchNorm teacher. The
    table is written from bench_frontier's result files (mean over seeds)."""
    import importlib.util
    import pathlib

    from ganslim.strategies.auto import RESULTS_INSTANCE, instance_norm_only

    instance = create_model("resnet_6blocks", ngf=8, norm="instance")
    batch = create_model("resnet_6blocks", ngf=8, norm="batch")
    assert instance_norm_only(instance) and not instance_norm_only(batch)
    assert RESULTS_INSTANCE.exists()  # shipped with the package (assets/*.json)
    settings, why = choose_strategy(0.05, teacher=instance)
    assert settings == {"strategy": "separable"} and "teacher_instance" in why
    assert choose_strategy(0.025, teacher=instance)[0] == {"strategy": "separable"}
    settings, why = choose_strategy(0.1, teacher=instance)  # measured at 1/10 itself, not the nearest 1/20
    assert settings == {"strategy": "separable"} and "target 0.1 " in why
    assert choose_strategy(None, teacher=instance)[0] == {"strategy": "uniform"}  # a latency budget
    assert choose_strategy(0.05, teacher=batch)[0] == {"strategy": "onestep"}  # the default task's table
    # bench_frontier --winners-from: per target and strategy the mean over the seeds' files
    spec = importlib.util.spec_from_file_location(
        "bench_frontier", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_frontier.py")
    bench_frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_frontier)
    paths = []
    for seed, (a, u) in enumerate([(17.6, 17.8), (19.1, 20.6), (18.3, 21.9)]):
        rows = [{"target": 0.05, "strategy": "onestep", "psnr_gt": a, "wall_min": 7.6, "teacher_psnr_gt": 18.17},
                {"target": 0.05, "strategy": "uniform", "psnr_gt": u, "wall_min": 7.2, "teacher_psnr_gt": 18.17}]
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps({"teacher": "t.safetensors", "rows": rows}))
    again = tmp_path / "resumed.json"  # a later run that kept seed 0's cells (--resume): counted once
    again.write_text(paths[0].read_text())
    table = bench_frontier.write_winners([str(p) for p in paths + [again]], str(tmp_path / "auto.json"))
    assert table["winners"]["0.05"]["variant"] == "uniform" and "18.17 dB" in table["task"]
    assert abs(table["winners"]["0.05"]["psnr_gt"] - (17.8 + 20.6 + 21.9) / 3) < 1e-9
    other = tmp_path / "other_machine.json"  # the same file name, trained elsewhere: another teacher
    other.write_text(json.dumps({"teacher": "t.safetensors", "rows": [dict(rows[0], teacher_psnr_gt=18.95)]}))
    with pytest.raises(SystemExit, match="one teacher"):
        bench_frontier.write_winners([str(paths[0]), str(other)], str(tmp_path / "mixed.json"))
    assert choose_strategy(0.05, tmp_path / "auto.json")[0] == {"strategy": "uniform"}
