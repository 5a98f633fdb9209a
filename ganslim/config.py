"""Typed configuration for :func:`ganslim.compress` (the CLI is generated from the same dataclasses).

:class:`CompressConfig` holds the options every run uses (budget, schedule, data, run) and one
section per concern: ``loss`` (:class:`LossOptions`), one per strategy (``slim``, ``ofa``, ``evolve``,
``uniform``, ``separable``, ``halp``: :class:`SlimOptions`, :class:`OfaOptions`, :class:`EvolveOptions`,
:class:`UniformOptions`, :class:`SeparableOptions`, :class:`HalpOptions`) and ``quantization``
(:class:`QuantOptions`). Every section field also has a *flat name*, unique across the whole
configuration (``gate_lr`` is ``slim.gate_lr``, ``search_population`` is ``ofa.population``,
``quant`` is ``quantization.mode``): ``compress(..., gate_lr=1e-2)``, ``CompressConfig(gate_lr=1e-2)``,
``cfg.gate_lr``, JSON files and the CLI's ``--gate-lr`` use it, so code written against the earlier
flat configuration keeps working.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence


def strategy_names() -> tuple[str, ...]:
    """The registered strategies and "auto" (:mod:`ganslim.strategies`)."""
    from .strategies import strategy_names as names

    return names()


def __getattr__(name: str):  # ``STRATEGIES``: read from the registry, so a plug-in strategy is included
    if name == "STRATEGIES":
        return strategy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _opt(default: Any = dataclasses.MISSING, *, flat: Optional[str] = None, factory: Any = dataclasses.MISSING,
         serializable: bool = True):
    """A section field; ``flat``: its configuration-wide name when that differs from the field's;
    ``serializable=False``: an object (callable, network) that JSON files and the CLI cannot carry."""
    meta = {"flat": flat, "serializable": serializable}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LossOptions:
    """Training losses, used by every stage (gated training, supernet, fine-tune, QAT).

    Measured on the default task (3000 fine-tune steps at 10x): L1 to teacher and ground truth at 10/10
    gave 28.06 dB, ground truth alone 28.33, 2/10 + MSE 28.68: the teacher's own errors should not
    outweigh the ground truth when there is one; without one these terms all fall on the teacher."""

    recon_weight: float = 2.0  # L1(student(x), teacher(x)): pseudo pairs, works unpaired
    gt_weight: float = 10.0  # L1(student(x), ground truth) when the batch has one
    mse_weight: float = 50.0  # MSE to ground truth (teacher without one); +0.2 dB PSNR at 10x on the default task
    distill_weight: float = 1.0  # feature distillation weight
    distill_loss: str = "mse"  # "mse": variance-normalised MSE through 1x1 mappings; "gka": CAT's kernel alignment
    distill_layers: Optional[Mapping[str, str] | Sequence[str]] = None  # None: auto
    n_distill_layers: int = 4
    # Feature distillation in the fine-tune too. Off: on the default task it changed PSNR by < 0.01 dB
    # at 10x, and without it batches that carry "teacher_output" skip the teacher's forward entirely.
    finetune_distill: bool = False
    adv_weight: float = 0.0  # used only when a discriminator is given (default 1.0 then)
    gan_mode: str = "lsgan"
    d_lr: float = 2e-4  # the discriminator's Adam rate (betas 0.5, 0.999), in every stage: GAN practice


@dataclass
class SlimOptions:
    """``strategy="slim"`` (GAN Slimming): gates, L1 proximal step, progressive pruning to the target."""

    gate_lr: float = 2e-3
    rho: float = 1.0  # L1 strength, in units of a group's mean gate per unit gate_lr
    prune_start: float = 0.1  # fraction of ``steps`` before the first channel is switched off (gates separate)
    prune_every: int = 10  # steps between progressive pruning decisions
    target_reach: float = 0.6  # fraction of ``steps`` by which the MACs schedule reaches the target


SEARCH_PRECISIONS = ("auto", "fp32", "bf16")  # the search's arithmetic (ganslim.pruning.search.SearchConfig)
SEARCH_PREFIX_CACHE_MB = 2048  # memory for the search's prefix reuse, per evaluation process (SearchConfig)


@dataclass
class OfaOptions:
    """``strategy="ofa"`` (once-for-all): ``steps`` are supernet steps, each over the largest, the
    smallest and ``random_subnets`` random sub-networks; then an evolutionary search at the budget."""

    width_ratios: Sequence[float] = (0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5, 0.625, 0.75, 1.0)
    lr: float = _opt(1e-3, flat="supernet_lr")
    random_subnets: int = 2
    population: int = _opt(24, flat="search_population")
    generations: int = _opt(8, flat="search_generations")
    bn_batches: int = _opt(4, flat="search_bn_batches")  # batches that re-estimate each candidate's BatchNorm statistics
    metric: Any = _opt("psnr_gt", flat="search_metric")  # "psnr_gt" | "psnr_teacher" | "ssim_gt" | callable(model) -> float
    workers: int = _opt(1, flat="search_workers")  # evaluation processes (CPU; forked, the threads shared out)
    # the search's arithmetic: "fp32", "bf16", or "auto" = bf16 on a CPU with native bf16 (AMX / AVX512-BF16)
    precision: str = _opt("fp32", flat="search_precision")
    # memory (MB per evaluation process) for the activations of layer prefixes sub-networks share: the
    # same numbers, less work (ganslim.pruning.prefix), at most a quarter of the memory free when the
    # search starts (split between the processes); 0 turns the reuse off
    prefix_cache_mb: int = _opt(SEARCH_PREFIX_CACHE_MB, flat="search_prefix_cache_mb")
    checkpoint: Optional[str] = _opt(None, flat="supernet_checkpoint")  # resumable supernet state (every 200 steps)


@dataclass
class EvolveOptions:
    """``strategy="evolve"`` (Co-Evolutionary Compression): fitness on ``batches`` held batches; with
    ``discriminator=`` given to compress, the discriminator's judgement of the pruned output vs the
    teacher's counts too, and with ``reverse_generator`` (the other CycleGAN direction) cycle consistency."""

    population: int = _opt(16, flat="evolve_population")
    generations: int = _opt(10, flat="evolve_generations")
    batches: int = _opt(2, flat="evolve_batches")
    reverse_generator: Optional[Any] = _opt(None, serializable=False)


@dataclass
class QuantOptions:
    """QAT stage after the fine-tune (:mod:`ganslim.deployment.quantization`, :func:`ganslim.export`)."""

    mode: Optional[str] = _opt(None, flat="quant")  # "int8": QAT with 8-bit weights (per channel) and activations
    steps: int = _opt(300, flat="quant_steps")
    lr: float = _opt(1e-4, flat="quant_lr")
    # Adam learning rate of the activation ranges (their logarithm) during QAT; 0 keeps them as calibrated
    range_lr: float = _opt(1e-2, flat="quant_range_lr")
    calib_batches: int = _opt(8, flat="quant_calib_batches")
    skip_first: bool = _opt(True, flat="quant_skip_first")  # keep the first / last weighted layer in float
    skip_last: bool = _opt(True, flat="quant_skip_last")
    # what QAT imitates: "teacher" or "float" (the student before quantization; QuantConfig.reference)
    reference: str = _opt("teacher", flat="quant_reference")
    deploy_check: bool = True  # export fp32 + int8 ONNX and measure both in onnxruntime


@dataclass
class UniformOptions:
    """``strategy="uniform"``: the teacher's family uniformly narrower (the trivial peer)."""

    init: str = _opt("teacher", flat="uniform_init")  # "teacher": its leading channels' weights; "scratch": fresh
    # "proportional": every group the same fraction; "latency": then each set of like groups moved to
    # nearby widths the device runs faster per MAC, timed whole in halp's latency_runtime
    # (ganslim.pruning.latency_widths), MACs kept within [0.85, 1] of the budget
    widths: str = _opt("proportional", flat="uniform_widths")


@dataclass
class SeparableOptions:
    """``strategy="separable"``: depthwise + pointwise factorisation, then the uniform cut."""

    init: str = _opt("teacher", flat="separable_init")  # "teacher": rank-1 SVD of its kernels; "scratch": fresh
    exclude: Sequence[Any] = _opt((), flat="separable_exclude")  # conv name globs or types never factorised
    # which channels the uniform cut keeps (with teacher init): "leading" (the first of each group, as
    # the peer keeps them) or "important" (the same number, those of the largest norm scale, as onestep ranks)
    keep: str = _opt("leading", flat="separable_keep")


@dataclass
class HalpOptions:
    """``strategy="halp"``: channels chosen under a latency budget with a per-layer latency table of the device
    (the table's runtime, step and cache are also those of ``uniform_widths="latency"``)."""

    runtime: str = _opt("onnxruntime", flat="latency_runtime")  # what the table times: "onnxruntime" | "eager"
    step: int = _opt(8, flat="latency_step")  # channels removed per greedy move
    table: Optional[str] = _opt(None, flat="latency_table")  # cache file (default ~/.cache/ganslim/latency/<device>.json)


# CompressConfig's sections: attribute name -> options class
SECTIONS: dict[str, type] = {"loss": LossOptions, "slim": SlimOptions, "ofa": OfaOptions, "evolve": EvolveOptions,
                             "uniform": UniformOptions, "separable": SeparableOptions, "halp": HalpOptions,
                             "quantization": QuantOptions}
_NOT_SERIALIZABLE = ("batch_fn", "eval_inputs")  # top-level objects a JSON file or the CLI cannot carry


@dataclass
class CompressConfig:
    """All knobs of one compression run; every field has a working default.

    Units: ``target_macs`` is a fraction of the teacher's MACs (0.1 = 10x fewer) or, when > 1, an
    absolute MACs count; learning rates per optimizer step; steps count optimizer steps. Section
    fields are reachable by their flat names too (module docstring): ``cfg.gate_lr is cfg.slim.gate_lr``.
    """

    # --- budget
    target_macs: Optional[float] = 0.1
    # Device-aware budget (ms per forward of the report's evaluation input on ``device``): when set it
    # replaces target_macs; the MACs target is found by measuring slimmed copies (ganslim.pruning.device_aware).
    target_latency_ms: Optional[float] = None
    # a registered strategy (ganslim.strategies: uniform, slim, onestep, ofa, evolve, plug-ins) or "auto":
    # the strategy that won the measured comparison (benchmarks/bench_peer.py) nearest this target, after
    # the measured number of steps nearest steps + finetune_steps (1000, 3000 or 12800).
    # The default is "uniform" (the teacher's leading channels, every group cut alike, then the
    # distillation fine-tune) because it won at this default target on the default task: +0.42 dB over
    # the teacher at 1/10 after 12800 steps where slim reached -0.26 dB and onestep -0.39 dB
    # (benchmarks/bench_peer.py); onestep wins at 1/20, separable at 1/40 ("auto" takes them there).
    strategy: str = "uniform"
    # options of a plug-in strategy's own dataclass (its ``options_class``), by field name
    strategy_options: Optional[Mapping[str, Any]] = None
    # --- schedule
    # The defaults are the recipe tuned on the default task (`make demo` runs exactly them): 12000
    # fine-tune steps (and 800 first-stage steps for the strategies that train before pruning), 16
    # minutes for the ResNet-9 ngf 32 at batch 8 of 64x64 crops on 2 CPU cores of the demo's machine.
    # Cost is linear in steps x batch x crop pixels x the generator's MACs; a shorter budget costs
    # fidelity (uniform at 1/10: -2.6 dB to the teacher after 1000 steps, bench_peer.py).
    steps: int = 800  # first stage: gated training (slim), supernet steps (ofa); uniform/onestep/evolve do not train
    finetune_steps: int = 12000  # after physical removal, plain smaller student
    lr: float = 1e-4  # student weights and mapping layers while gated
    finetune_lr: float = 2e-3  # after removal (cosine decay); 2e-3 beat 1e-3 and 2e-4 on the default task
    # How the fine-tune ends (ganslim.core.averaging): the student's state averaged exponentially with a
    # horizon of this fraction of the fine-tune steps (0: the last step's weights). Default teacher,
    # onestep 1/20, 3000 steps, 3 seeds (bench_seeds.py --final-variants): 0.05 and 0.1 gained +0.31 dB
    # over the last weights and cut the seeds' spread from 0.22 to 0.10 dB; 0.2 lost 0.25 dB, 0.3 4 dB.
    finetune_average: float = 0.05
    # ... then its BatchNorm statistics re-estimated from this many training batches (0: the running
    # ones). Off: on the same runs, on top of the average, it lost 0 to 0.48 dB.
    finetune_bn_batches: int = 0
    # Wall-clock minutes for the whole compress call (ganslim.core.budget): a few fine-tune steps are
    # timed, then the fine-tune runs finetune_steps steps or as many as fit, whichever is fewer, with its
    # schedule built for that many (None: no budget; steps alone decide). QAT (quant) comes on top.
    time_budget_min: Optional[float] = None
    # Round kept widths up to a multiple (8 helps CPU/GPU kernels). None: the strategy's own
    # (Strategy.default_channel_multiple): 8 for separable, whose depthwise convs and channels-last
    # BatchNorms run far slower at widths like 13 or 51 (1/40 on the default teacher: 50 vs ~80 ms per
    # fine-tune step; in onnxruntime 15.7 vs 41.9 ms at batch 1, `ganslim bench`), 1 for the others.
    channel_multiple: Optional[int] = None
    # onestep and separable: refit each conv of the cut student by least squares to the teacher's same
    # layer on the first batch before the fine-tune (ganslim.pruning.reconstruct; seconds of CPU). Opt-in:
    # on the default task after 1000 steps it gained for onestep at 1/10 and lost at 1/20
    # (benchmarks/README.md, bench_peer.py's "+reconstruct" variants); strategy="auto" turns it on where
    # its table's winner is such a variant (none is now).
    reconstruct: bool = False
    # --- targeting
    include: Optional[Sequence[Any]] = None
    exclude: Sequence[Any] = ()
    # --- data
    batch_fn: Optional[Callable] = None  # batch -> (inputs tuple, target or None)
    eval_inputs: Optional[Any] = None  # (inputs, target) pairs for the fidelity report; default: from loader
    # --- run
    # Resumable runs: training state written atomically every ``checkpoint_every`` steps to
    # checkpoint_dir (gating.pt / supernet.pt, stage.pt after the first stage, finetune.pt); a run with
    # the same directory and configuration continues where the last one stopped.
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 200
    device: str = "cpu"
    # Layout of the training tensors (ganslim.core.memory_format): "auto" trains a student with depthwise convs
    # in channels-last on CPU (oneDNN's native layout: 1.33x faster steps for the separable 1/40 student;
    # plain-conv generators 0.84-1.10x, so NCHW there; benchmarks/bench_layout.py), "channels_last", "contiguous"
    memory_format: str = "auto"
    # Arithmetic of the training convolutions (ganslim.core.precision): "fp32", or "bf16" (weights, optimizer
    # state, norms, residual sums and losses stay float32). Opt-in: with AMX it trained the default
    # teacher's students 0.71-0.98x the wall time at -0.14 to -1.43 dB (benchmarks/bench_precision.py)
    train_precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    measure_latency: bool = True
    export_tol: float = 1e-4  # export check: max |pruned - gated| / max |gated|, both run in float64
    # --- sections
    loss: LossOptions = field(default_factory=LossOptions)
    slim: SlimOptions = field(default_factory=SlimOptions)
    ofa: OfaOptions = field(default_factory=OfaOptions)
    evolve: EvolveOptions = field(default_factory=EvolveOptions)
    uniform: UniformOptions = field(default_factory=UniformOptions)
    separable: SeparableOptions = field(default_factory=SeparableOptions)
    halp: HalpOptions = field(default_factory=HalpOptions)
    quantization: QuantOptions = field(default_factory=QuantOptions)

    def __post_init__(self):
        for name, cls in SECTIONS.items():  # a section given as a mapping (JSON files)
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _section_from_mapping(cls, value, name))
            elif not isinstance(value, cls):
                raise TypeError(f"CompressConfig.{name} must be a {cls.__name__} or a mapping, got {type(value).__name__}")

    # flat names: read and written through to their section
    def __getattr__(self, name: str):
        where = _flat_index().get(name) if not name.startswith("_") and name not in SECTIONS else None
        if where is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, where[0]), where[1])

    def __setattr__(self, name: str, value) -> None:
        where = _flat_index().get(name)
        if where is not None:
            setattr(getattr(self, where[0]), where[1], value)
        else:
            object.__setattr__(self, name, value)

    def copy(self) -> "CompressConfig":
        """A copy whose sections are copies too (the objects they hold, e.g. ``reverse_generator``, are shared)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in SECTIONS:
            d[name] = dataclasses.replace(d[name])
        return CompressConfig(**d)

    def replace(self, **overrides) -> "CompressConfig":
        """A copy with ``overrides`` set: top-level fields, flat names (``gate_lr=...``) or whole
        sections (``slim=SlimOptions(...)`` or a mapping of its fields)."""
        known = set(option_names()) | set(SECTIONS)
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown compress option(s): {', '.join(bad)}; known: {', '.join(sorted(option_names()))}")
        out = self.copy()
        for k, v in overrides.items():
            if k in SECTIONS and isinstance(v, Mapping):
                v = _section_from_mapping(SECTIONS[k], v, k)
            setattr(out, k, v)
        if any(k in SECTIONS for k in overrides):
            out.__post_init__()
        return out

    def validate(self) -> "CompressConfig":
        if self.target_macs is not None and not self.target_macs > 0:
            raise ValueError(f"target_macs must be > 0 (a fraction of the teacher's MACs or an absolute count), got {self.target_macs}")
        if self.steps < 0 or self.finetune_steps < 0:
            raise ValueError("steps and finetune_steps must be >= 0")
        if not 0 <= self.finetune_average <= 1:
            raise ValueError(f"finetune_average is a fraction of the fine-tune steps in [0, 1], got {self.finetune_average}")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ValueError(f"time_budget_min must be > 0 minutes, got {self.time_budget_min}")
        if self.channel_multiple is not None and not int(self.channel_multiple) >= 1:
            raise ValueError(f"channel_multiple must be >= 1 (or None: the strategy's own), got {self.channel_multiple}")
        if self.finetune_bn_batches < 0:
            raise ValueError(f"finetune_bn_batches must be >= 0, got {self.finetune_bn_batches}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 step, got {self.checkpoint_every}")
        if self.strategy not in strategy_names():
            raise ValueError(f"unknown strategy {self.strategy!r}; available: {', '.join(map(repr, strategy_names()))}")
        from .core.memory_format import MEMORY_FORMATS

        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}")
        from .core.precision import check_train_precision

        check_train_precision(self.train_precision)
        if self.target_latency_ms is not None and not self.target_latency_ms > 0:
            raise ValueError(f"target_latency_ms must be > 0 ms, got {self.target_latency_ms}")
        loss, q = self.loss, self.quantization
        if loss.distill_loss not in ("mse", "gka"):
            raise ValueError(f"distill_loss must be 'mse' or 'gka', got {loss.distill_loss!r}")
        if not loss.d_lr > 0:
            raise ValueError(f"d_lr (the discriminator's learning rate) must be > 0, got {loss.d_lr}")
        if loss.gan_mode not in ("lsgan", "vanilla", "hinge"):
            raise ValueError(f"gan_mode must be lsgan, vanilla or hinge, got {loss.gan_mode!r}")
        if q.mode not in (None, "int8"):
            raise ValueError(f"quant must be None or 'int8', got {q.mode!r}")
        if self.uniform.init not in ("teacher", "scratch"):
            raise ValueError(f"uniform_init must be 'teacher' or 'scratch', got {self.uniform.init!r}")
        if self.uniform.widths not in ("proportional", "latency"):
            raise ValueError(f"uniform_widths must be 'proportional' or 'latency', got {self.uniform.widths!r}")
        if self.separable.init not in ("teacher", "scratch"):
            raise ValueError(f"separable_init must be 'teacher' or 'scratch', got {self.separable.init!r}")
        if self.separable.keep not in ("leading", "important"):
            raise ValueError(f"separable_keep must be 'leading' or 'important', got {self.separable.keep!r}")
        if self.halp.runtime not in ("onnxruntime", "eager"):
            raise ValueError(f"latency_runtime must be 'onnxruntime' or 'eager', got {self.halp.runtime!r}")
        if self.halp.step < 1:
            raise ValueError(f"latency_step must be >= 1, got {self.halp.step}")
        if self.ofa.prefix_cache_mb < 0:
            raise ValueError(f"search_prefix_cache_mb must be >= 0, got {self.ofa.prefix_cache_mb}")
        if self.ofa.precision not in SEARCH_PRECISIONS:
            raise ValueError(f"search_precision must be one of {SEARCH_PRECISIONS}, got {self.ofa.precision!r}")
        if self.ofa.bn_batches < 1:
            raise ValueError(f"search_bn_batches must be >= 1, got {self.ofa.bn_batches}")
        if self.strategy_options is not None and not isinstance(self.strategy_options, Mapping):
            raise ValueError(f"strategy_options must be a mapping of option names, got {type(self.strategy_options).__name__}")
        return self

    @classmethod
    def from_file(cls, path: str) -> "CompressConfig":
        """Read options from a JSON file: flat names ``{"target_macs": 0.1, "gate_lr": 0.01}``, sections
        ``{"slim": {"gate_lr": 0.01}}`` or both; unknown names, wrong types and malformed JSON are
        errors that name the file and the fix."""
        import json

        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path}: expected a JSON object of option names, got {type(raw).__name__}")
        defaults = cls()
        flat: dict = {}
        for k, v in raw.items():
            if k in SECTIONS and isinstance(v, dict):
                for sk, sv in v.items():
                    name = _section_flat_names(k).get(sk)
                    if name is None or not _serializable(name):
                        raise ValueError(f"config file {path}: unknown option {k}.{sk!r}; known: "
                                         f"{', '.join(f.name for f in fields(SECTIONS[k]) if _serializable(_flat_name(f)))}")
                    flat[name] = sv
            elif k in option_names() and _serializable(k):
                flat[k] = v
            else:
                raise ValueError(f"config file {path}: unknown option {k!r}; known: "
                                 f"{', '.join(n for n in option_names() if _serializable(n))} and the sections "
                                 f"{', '.join(SECTIONS)}")
        for k, v in flat.items():
            if not _json_type_ok(getattr(defaults, k), v):
                raise ValueError(f"config file {path}: option {k!r} must be {type(getattr(defaults, k)).__name__}, "
                                 f"got {json.dumps(v)}")
            if isinstance(getattr(defaults, k), tuple) and isinstance(v, list):
                flat[k] = tuple(v)  # JSON has no tuples: keep the field's type, so equal configs compare equal
        try:
            return cls().replace(**flat).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"config file {path}: {e}") from None

    def to_dict(self) -> dict:
        """JSON-ready: top-level fields and one dict per section, without the objects a file cannot
        carry (``batch_fn``, ``eval_inputs``, ``reverse_generator``); other non-JSON values (a callable
        ``search_metric``) as their ``repr``. :meth:`from_file` reads it back."""

        def plain(v):
            if isinstance(v, tuple):
                return list(v)
            return v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)

        out = {f.name: plain(getattr(self, f.name)) for f in fields(self)
               if f.name not in SECTIONS and _serializable(f.name)}
        for name in SECTIONS:
            out[name] = {f.name: plain(getattr(getattr(self, name), f.name)) for f in fields(SECTIONS[name])
                         if _serializable(_flat_name(f))}
        return out

    def flat_dict(self) -> dict:
        """Every option by its flat name (sections flattened), values as they are."""
        return {name: getattr(self, name) for name in option_names()}


# ----------------------------------------------------------------------- flat names
def _flat_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flat") or f.name


def _serializable(flat_name: str) -> bool:
    where = _flat_index().get(flat_name)
    if where is None:
        return flat_name not in _NOT_SERIALIZABLE
    f = next(f for f in fields(SECTIONS[where[0]]) if f.name == where[1])
    return f.metadata.get("serializable", True)


def _section_flat_names(section: str) -> dict:
    return {f.name: _flat_name(f) for f in fields(SECTIONS[section])}


@functools.lru_cache(maxsize=None)
def _flat_index() -> dict:
    """flat name -> (section, field); checked unique against each other and the top-level fields."""
    top = {f.name for f in fields(CompressConfig)}
    index: dict = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            name = _flat_name(f)
            if name in index or name in top:
                raise RuntimeError(f"flat option name {name!r} ({section}.{f.name}) is not unique")  # a developer error
            index[name] = (section, f.name)
    return index


def option_names() -> tuple[str, ...]:
    """Every option's flat name: the top-level fields (sections excluded), then each section's fields."""
    return tuple(f.name for f in fields(CompressConfig) if f.name not in SECTIONS) + tuple(_flat_index())


def option_fields() -> Iterator[tuple[str, Optional[str], dataclasses.Field]]:
    """``(flat name, section or None, dataclass field)`` for every option: what the CLI is generated
    from (its flags are ``--flat-name``, its defaults the fields' defaults)."""
    for f in fields(CompressConfig):
        if f.name not in SECTIONS:
            yield f.name, None, f
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield _flat_name(f), section, f


def _section_from_mapping(cls: type, values: Mapping, section: str):
    names = {f.name for f in fields(cls)}
    bad = sorted(set(values) - names)
    if bad:
        raise TypeError(f"unknown {section} option(s): {', '.join(bad)}; known: {', '.join(sorted(names))}")
    return cls(**values)


def _json_type_ok(default, v) -> bool:
    return (v is None or default is None or (isinstance(default, bool) and isinstance(v, bool))
            or (isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(v, (int, float))
                and not isinstance(v, bool))
            or (isinstance(default, str) and isinstance(v, str))
            or (isinstance(default, (list, tuple)) and isinstance(v, list))
            or (isinstance(default, Mapping) and isinstance(v, dict)))


_dataclass_init = CompressConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_flat_names(self, *args, **kwargs):
    """``CompressConfig(gate_lr=1e-2, quant="int8")``: flat names set their section's field."""
    index = _flat_index()
    flat = {k: kwargs.pop(k) for k in list(kwargs) if k in index}
    _dataclass_init(self, *args, **kwargs)
    for k, v in flat.items():
        setattr(self, k, v)


CompressConfig.__init__ = _init_with_flat_names
