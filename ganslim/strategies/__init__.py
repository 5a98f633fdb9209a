"""Compression strategies, one file each, in a registry (:mod:`ganslim.strategies.base`):

* ``slim`` (:mod:`.slim`): GAN Slimming, gates + L1 proximal step + progressive pruning;
* ``onestep`` (:mod:`.onestep`): CAT's one global threshold on the channel importance;
* ``ofa`` (:mod:`.ofa`): once-for-all supernet + evolutionary search (GAN Compression);
* ``evolve`` (:mod:`.evolve`): genetic search over channel masks (Co-Evolutionary Compression);
* ``uniform`` (:mod:`.uniform`): the trivial peer, the teacher's family uniformly narrower;
* ``separable`` (:mod:`.separable`): the teacher's convs factorised into depthwise + pointwise pairs
  (the mobile ResNet of GAN Compression / CAT), then the uniform cut;
* ``halp`` (:mod:`.halp`): the most importance per millisecond under a latency budget (HALP), from a
  per-layer latency table of the device;
* ``auto`` (:mod:`.auto`): the measured winner of the head-to-head nearest the target.

A new strategy: a file with a :class:`Strategy` subclass decorated with :func:`register_strategy`.
"""
from .base import (AUTO, SearchSummary, StageResult, Strategy, StrategyContext, get_strategy, register_strategy,
                   strategy_names, strategy_table, unregister_strategy)
from . import slim, onestep, ofa, evolve, uniform, separable, halp  # noqa: E402,F401  (registration, in this order)
from .auto import FALLBACK, RESULTS, VARIANTS, choose_strategy, choose_variant, winners_from_rows, write_table  # noqa: E402

__all__ = ["AUTO", "SearchSummary", "StageResult", "Strategy", "StrategyContext", "get_strategy", "register_strategy",
           "strategy_names", "strategy_table", "unregister_strategy", "choose_strategy", "choose_variant", "winners_from_rows", "write_table",
           "VARIANTS", "RESULTS", "FALLBACK"]
