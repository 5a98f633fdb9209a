"""What every compression strategy shares: the registry, the context a strategy runs in, and its
typed result.

A strategy turns the user's student into a plain, physically smaller network at the budget (its
*stage*); :func:`ganslim.compress` then fine-tunes, quantizes and reports, whatever the strategy.
Adding one is a file with a :class:`Strategy` subclass and the :func:`register_strategy` decorator
(modelled on peft's ``register_peft_method``): ``compress(strategy=name)``, ``strategy="auto"``, the
CLI's ``--strategy`` choices and :func:`strategy_table` pick it up from the registry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch.nn as nn

from ..core.train import LossWeights

AUTO = "auto"  # not a strategy: resolved to a registered one from measurements (ganslim.strategies.auto)


@dataclass
class SearchSummary:
    """Figures of a strategy's search, for the report (``CompressReport.search``)."""

    evaluations: int
    seconds: float
    best_fitness: float
    metric: str
    generations: list = field(default_factory=list)  # best fitness per generation
    best_macs_fraction: Optional[float] = None
    best_latency_ms: Optional[float] = None  # measured on the sliced candidate (latency budgets)
    supernet_steps: Optional[int] = None
    supernet_seconds: Optional[float] = None
    resumed_from: Optional[int] = None
    pareto: list = field(default_factory=list)  # [(MACs fraction, fitness)]
    precision: Optional[str] = None  # the arithmetic the candidates were measured in: "fp32" | "bf16"

    @property
    def per_minute(self) -> float:
        return 60.0 * self.evaluations / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["per_minute"] = self.per_minute
        return d


@dataclass
class StageResult:
    """What a strategy hands to the shared fine-tune / QAT / report steps."""

    plain: nn.Module  # the physically smaller student, plain modules
    kept: dict  # group root -> kept channels
    targets: Any  # ganslim.targeting.Targets: the channel groups the widths refer to
    weights: LossWeights  # the fine-tune's loss weights
    rel_diff: float = 0.0  # export check: max |exported - reference| / max |reference| (float64)
    mapping: dict = field(default_factory=dict)  # feature distillation pairs for the fine-tune
    target_abs: Optional[float] = None  # MACs budget (absolute, at the example input)
    calibration: Any = None  # device_aware.LatencyCalibration when a latency target was turned into MACs
    search: Optional[SearchSummary] = None
    supernet: Optional[nn.Module] = None  # ofa: the trained supernet (searchable for other budgets)
    stage_steps: Optional[int] = None  # training steps before the fine-tune (None: config.steps)
    notes: list = field(default_factory=list)  # lines for the report's notes


@dataclass
class StrategyContext:
    """Everything a strategy may use. ``student`` is compress's own copy (train it in place);
    ``teacher`` is the user's network (eval mode, never modified: hooks on it go through ``hooks``,
    an ``ExitStack`` that compress closes on every exit path)."""

    config: Any  # ganslim.config.CompressConfig
    student: nn.Module
    teacher: nn.Module
    loader: Iterable
    example: tuple  # one sample per input, on the device
    inputs: tuple  # the first batch's inputs
    teacher_macs: float  # papers' convention, at ``example``
    eval_pairs: list  # [(inputs tuple, target or None)] of the report
    stat_input: tuple  # where MACs and latency are reported (a whole image when there is one)
    same_arch: bool  # the student started as a copy of the teacher
    discriminator: Optional[nn.Module] = None
    callbacks: Iterable[Callable] = ()
    hooks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    options: Any = None  # the strategy's own options (Strategy.options): a config section or its dataclass
    # config.channel_multiple is the strategy's default (the user left it None): a strategy may then
    # round less finely where its default would cost the budget
    default_channel_multiple: bool = False

    def checkpoint(self, name: str) -> Optional[str]:
        """Path of a resumable state file in ``config.checkpoint_dir`` (None without one)."""
        d = self.config.checkpoint_dir
        if not d:
            return None
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, name)


class Strategy:
    """A way to choose (and train) the student's channels. Subclasses set ``name``, ``paper`` and
    ``summary``, say whether they need a MACs or latency target and accept a discriminator (compress
    checks both before :meth:`run`), and implement :meth:`run`. Shared options (budget, steps,
    losses) are in ``ctx.config`` (:class:`~ganslim.config.CompressConfig`), the strategy's own in
    ``ctx.options``: a built-in names its section of the configuration (``options_section``), a
    plug-in declares a dataclass (``options_class``) that compress fills from
    ``CompressConfig.strategy_options``. Resumable state: write it to ``ctx.checkpoint(<file>)``
    (compress also saves the finished stage and skips it on a rerun)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_target: ClassVar[bool] = True  # needs target_macs or target_latency_ms
    accepts_discriminator: ClassVar[bool] = True
    accepts_latency_target: ClassVar[bool] = True  # False: target_latency_ms is refused (a MACs target only)
    options_section: ClassVar[Optional[str]] = None  # a CompressConfig section ("slim", "ofa", "evolve")
    options_class: ClassVar[Optional[type]] = None  # a plug-in's own options dataclass
    # widths rounded up to this multiple when CompressConfig.channel_multiple is None
    default_channel_multiple: ClassVar[int] = 1

    def options(self, config) -> Any:
        """This strategy's options from ``config``: its section, its ``options_class`` filled from
        ``config.strategy_options``, or None; a ValueError names options it does not have."""
        given = dict(config.strategy_options or {})
        if self.options_section is not None or self.options_class is None:
            if given:
                raise ValueError(f"strategy {self.name!r} takes no strategy_options (got {', '.join(given)})"
                                 + (f"; its options are CompressConfig.{self.options_section}" if self.options_section else ""))
            return getattr(config, self.options_section) if self.options_section else None
        known = {f.name for f in dataclasses.fields(self.options_class)}
        bad = sorted(set(given) - known)
        if bad:
            raise ValueError(f"unknown strategy_options for {self.name!r}: {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return self.options_class(**given)

    def run(self, ctx: StrategyContext) -> StageResult:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``compress(strategy=cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or not cls.name:
        raise TypeError("register_strategy takes a Strategy subclass with a name")
    if cls.name == AUTO or (cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls):
        raise ValueError(f"a strategy named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (for tests and plug-ins that replace one)."""
    _REGISTRY.pop(name, None)


def strategy_names(with_auto: bool = True) -> tuple[str, ...]:
    """Registered strategy names in registration order (built-ins first), then ``"auto"``."""
    return tuple(_REGISTRY) + ((AUTO,) if with_auto else ())


def get_strategy(name: str) -> Strategy:
    """A new instance of the strategy registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(map(repr, strategy_names()))}")
    return _REGISTRY[name]()


def strategy_table() -> str:
    """One line per strategy (name, paper, what it does): CLI help and docs."""
    rows = [f"{c.name}: {c.summary} ({c.paper})" for c in _REGISTRY.values()]
    rows.append(f"{AUTO}: the strategy that won the measured head-to-head nearest the target")
    return "; ".join(rows)
