"""The strategy registry, the CLI generated from the configuration, and who owns the hooks."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import ganslim
from ganslim import measure
from ganslim.cli import build_parser, main
from ganslim.config import CompressConfig, OfaOptions, SlimOptions, option_fields, option_names
from ganslim.strategies import get_strategy, strategy_names, unregister_strategy
from ganslim.core.train import NonFiniteLossError
from ganslim.zoo import create_model


@pytest.fixture
def toy():
    import toy_strategy  # noqa: F401  (registers "fraction" on import)

    from ganslim.strategies.base import _REGISTRY

    _REGISTRY.setdefault("fraction", toy_strategy.FractionStrategy)
    yield "fraction"
    unregister_strategy("fraction")


def _teacher(norm="batch"):
    torch.manual_seed(0)
    return create_model("resnet_6blocks", ngf=8, norm=norm).eval()


def _loader(n=3, size=24):
    g = torch.Generator().manual_seed(0)
    return [(x, torch.tanh(x.flip(1))) for x in (torch.rand(2, 3, size, size, generator=g) * 2 - 1 for _ in range(n))]


def test_a_strategy_in_one_file_is_usable_from_compress_the_config_and_the_cli(toy, tmp_path):
    assert toy in strategy_names() and strategy_names()[-1] == "auto"
    assert CompressConfig(strategy=toy).validate().strategy == toy
    teacher = _teacher()
    x = torch.rand(1, 3, 24, 24)
    for fraction in (0.5, 0.25):  # its own options dataclass, filled from strategy_options
        res = ganslim.compress(teacher, teacher, _loader(), strategy=toy, strategy_options={"fraction": fraction},
                               target_macs=None, finetune_steps=2, progress=False, measure_latency=False)
        assert res.report.strategy == toy
        assert all(a == max(1, round(b * fraction)) for a, b in res.report.widths.values())
        ratio = measure.count_macs(res.model, x) / measure.count_macs(teacher, x)
        assert ratio < 1.5 * fraction ** 2 + 0.05  # the inner convs shrink in both channel dimensions
    with pytest.raises(ValueError, match="unknown strategy_options for 'fraction': width; known: fraction"):
        ganslim.compress(teacher, teacher, _loader(), strategy=toy, strategy_options={"width": 3}, progress=False)
    with pytest.raises(ValueError, match="strategy 'slim' takes no strategy_options.*CompressConfig.slim"):
        ganslim.compress(teacher, teacher, _loader(), strategy="slim", strategy_options={"width": 3}, progress=False)
    ckpt = tmp_path / "t.safetensors"
    ganslim.save(teacher, ckpt)
    out = tmp_path / "cli"
    assert main(["compress", "--teacher", str(ckpt), "--strategy", toy, "--finetune-steps", "1",
                 "--strategy-option", "fraction=0.25", "--crop", "24", "--batch-size", "2", "--out", str(out),
                 "--no-progress", "--no-measure-latency"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == toy and all(a == max(1, round(b / 4)) for a, b in report["widths"].values())
    with pytest.raises(ValueError, match="already registered"):
        from ganslim.strategies import Strategy, register_strategy

        register_strategy(type("Other", (Strategy,), {"name": toy}))


def test_the_uniform_peer_is_the_teachers_family_made_narrower():
    # the trivial peer: every group the same fraction of its leading channels, at the MACs budget;
    # "teacher" keeps those channels' weights, "scratch" the same widths freshly initialised
    teacher = _teacher()
    with torch.no_grad():  # not the default init of seed 0, which the fresh weights would repeat
        for p in teacher.parameters():
            p.add_(0.05)
    x = torch.rand(1, 3, 24, 24)
    kw = dict(strategy="uniform", target_macs=0.25, finetune_steps=0, progress=False, measure_latency=False)
    warm = ganslim.compress(teacher, teacher, _loader(), **kw)
    cold = ganslim.compress(teacher, teacher, _loader(), uniform_init="scratch", **kw)
    ratio = measure.count_macs(warm.model, x) / measure.count_macs(teacher, x)
    assert 0.2 < ratio <= 0.25
    fractions = [a / b for a, b in warm.report.widths.values()]
    assert max(fractions) - min(fractions) < 1 / 8 + 1e-9  # equal up to rounding to whole channels
    assert warm.report.widths == cold.report.widths
    first_t = teacher.model[1].weight
    first_w, first_c = warm.model.model[1].weight, cold.model.model[1].weight
    assert torch.equal(first_w, first_t[:first_w.shape[0]])  # the teacher's leading filters
    assert not torch.allclose(first_c, first_t[:first_c.shape[0]])
    with pytest.raises(ValueError, match="uniform_init must be 'teacher' or 'scratch'"):
        ganslim.compress(teacher, teacher, _loader(), uniform_init="zeros", **kw)


def test_unknown_strategy_names_the_registered_ones():
    with pytest.raises(ValueError, match="'slim', 'onestep', 'ofa', 'evolve', 'uniform', 'separable', 'halp', 'auto'"):
        get_strategy("magic")


def test_the_cli_and_the_api_share_their_defaults():
    args = build_parser().parse_args(["compress"])
    given = {name for name in option_names() if hasattr(args, name)}
    assert not given  # no flag given: no field set by the CLI, every value is CompressConfig's own
    parser = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "compress")[1]
    flags = {a.dest: a for a in parser._actions if a.dest in option_names()}
    defaults = CompressConfig()
    for name, _, f in option_fields():
        if name in flags:  # the help states the API's default
            assert repr(getattr(defaults, name)) in flags[name].help, name
    for must in ("target_macs", "strategy", "steps", "finetune_steps", "lr", "finetune_lr", "gate_lr", "d_lr",
                 "recon_weight", "mse_weight", "quant", "channel_multiple", "device", "seed"):
        assert must in flags, must
    assert flags["strategy"].choices == list(strategy_names())
    ns = build_parser().parse_args(["compress", "--lr", "3e-4", "--population", "5", "--no-finetune-distill"])
    assert (ns.lr, ns.search_population, ns.finetune_distill) == (3e-4, 5, False)
    search = build_parser().parse_args(["search", "s.safetensors"])  # the search command's defaults are the API's too
    assert (search.population, search.generations, search.finetune_lr, search.seed) == (
        defaults.ofa.population, defaults.ofa.generations, defaults.finetune_lr, defaults.seed)


def test_sections_and_flat_names_are_one_configuration(tmp_path):
    cfg = CompressConfig(gate_lr=0.5, quant="int8", search_population=5, steps=3)
    assert (cfg.slim.gate_lr, cfg.quantization.mode, cfg.ofa.population, cfg.steps) == (0.5, "int8", 5, 3)
    assert cfg.gate_lr == 0.5 and cfg.quant == "int8"  # flat reads
    cfg.supernet_lr = 0.25  # flat writes land in the section
    assert cfg.ofa.lr == 0.25
    nested = CompressConfig(slim=SlimOptions(gate_lr=0.5), quantization={"mode": "int8"}, ofa=OfaOptions(population=5, lr=0.25),
                            steps=3)
    assert nested == cfg
    other = cfg.replace(rho=2.0, loss={"recon_weight": 1.0})
    assert (other.slim.rho, other.loss.recon_weight, other.loss.gt_weight) == (2.0, 1.0, 10.0)
    assert (cfg.slim.rho, cfg.loss.recon_weight) == (1.0, 2.0)  # replace copied the sections: the original is unchanged
    with pytest.raises(TypeError, match="unknown compress option.*gate_lrr"):
        cfg.replace(gate_lrr=1.0)
    with pytest.raises(TypeError, match="unknown slim option.*population"):
        cfg.replace(slim={"population": 3})
    # a file: flat names, sections or both; to_dict reads back as the same configuration
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 3, "slim": {"gate_lr": 0.5}, "quant": "int8", "search_population": 5,
                                "ofa": {"lr": 0.25}}))
    assert CompressConfig.from_file(str(path)) == cfg
    path.write_text(json.dumps(cfg.to_dict()))
    assert CompressConfig.from_file(str(path)) == cfg
    for bad, msg in [({"slim": {"population": 3}}, "unknown option slim.'population'"),
                     ({"evolve": {"reverse_generator": None}}, "unknown option evolve.'reverse_generator'"),
                     ({"slim": {"gate_lr": "fast"}}, "option 'gate_lr' must be float")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            CompressConfig.from_file(str(path))


def test_slim_session_schedules_like_compress():
    import inspect

    from ganslim.adapters import SlimSession

    sig = inspect.signature(SlimSession.__init__).parameters
    cfg = CompressConfig()
    for name in ("gate_lr", "rho", "prune_start", "target_reach", "prune_every", "channel_multiple"):
        want = getattr(cfg, name)
        if name == "channel_multiple" and want is None:  # None: the strategy's own, slim's here
            want = get_strategy("slim").default_channel_multiple
        assert sig[name].default == want, name


# --------------------------------------------------------------------------- hooks have one owner
def _attachments(net: nn.Module) -> list:
    """Every forward hook, per-instance forward patch and class of ``net``'s modules."""
    out = []
    for name, m in net.named_modules():
        out.append((name, type(m), len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__,
                    len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks)))
    return out


@pytest.mark.parametrize("strategy", ["slim", "onestep", "ofa", "evolve", "slim+int8"])
def test_nothing_stays_attached_to_the_users_networks_when_compress_returns_or_raises(strategy):
    # gates and distillation recorders (hooks), sliced layers (patched forwards), ModelOpt's quantized
    # layers (swapped classes): all on compress's own copies, or taken off however compress ends
    teacher = _teacher("instance")
    model = copy.deepcopy(teacher)  # the user's student: another object than the teacher
    before = {id(n): (_attachments(n), copy.deepcopy(n.state_dict())) for n in (teacher, model)}
    strategy, _, quant = strategy.partition("+")
    kw = dict(strategy=strategy, target_macs=0.3, steps=3, finetune_steps=2, progress=False, measure_latency=False,
              finetune_distill=True, evolve_population=4, evolve_generations=1, search_population=4,
              search_generations=1, quant=quant or None, quant_steps=2, quant_calib_batches=2, deploy_check=False)
    ganslim.compress(model, teacher, _loader(), **kw)
    bad = _loader(6)
    bad[1] = (torch.full_like(bad[1][0], float("nan")), bad[1][1])  # the second batch: NaN in the first training stage
    with pytest.raises((NonFiniteLossError, ValueError)):
        ganslim.compress(model, teacher, bad, **kw)
    for n in (teacher, model):
        att, sd = before[id(n)]
        assert _attachments(n) == att
        assert all(torch.equal(v, n.state_dict()[k]) for k, v in sd.items())


def test_the_defaults_are_the_demos_tuned_recipe():
    from ganslim.demo import DEMO_CONFIG

    assert DEMO_CONFIG == CompressConfig()  # `make demo` runs compress() with its defaults
    cfg = CompressConfig()
    assert (cfg.target_macs, cfg.strategy, cfg.steps, cfg.finetune_steps) == (0.1, "uniform", 800, 12000)


def test_compress_checks_what_a_strategy_declares_before_running_it(monkeypatch):
    from ganslim.strategies import evolve, ofa, onestep

    ran = []
    for cls in (onestep.OneStepStrategy, evolve.EvolveStrategy, ofa.OfaStrategy):
        monkeypatch.setattr(cls, "run", lambda self, ctx: ran.append(self.name))
    teacher = _teacher()
    kw = dict(steps=2, finetune_steps=0, progress=False, measure_latency=False)
    for name in ("onestep", "evolve"):  # they prune to a budget: one must be given
        with pytest.raises(ValueError, match=f"strategy='{name}' needs target_macs or target_latency_ms"):
            ganslim.compress(teacher, teacher, _loader(), strategy=name, target_macs=None, **kw)
    with pytest.raises(ValueError, match="strategy='ofa' trains with distillation losses only"):
        ganslim.compress(teacher, teacher, _loader(), strategy="ofa", discriminator=nn.Conv2d(3, 1, 3), **kw)
    assert ran == []  # refused before any strategy ran
