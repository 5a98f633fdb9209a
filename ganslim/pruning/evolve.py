"""Evolutionary search over binary channel masks (Co-Evolutionary Compression, Shu et al. 2019),
with a discriminator-aware fitness.

A candidate is one keep-mask per channel group (coupled channels always share one bit, so every
candidate is a valid network). Masks are applied by zeroing channels after their norms/producers
(:class:`ChannelMasks`, the gate hooks of :mod:`ganslim.core.gating` with the mask as scale), which is
exactly the pruned network's function (the gating tests check this equality), so candidates are
scored without surgery.

Fitness (higher is better) on fixed held-out batches, each term a mean over them:

* ``- L1(G_p(x), G(x))``: the pruned generator imitates the teacher;
* ``- w_D * MSE(D(G_p(x)), D(G(x)))`` when the original discriminator ``D`` is given: the
  discriminator-aware term — the discriminator's judgement of the pruned output should be the
  teacher's;
* ``- w_cyc * L1(F(G_p(x)), x)`` when the reverse generator ``F`` of a CycleGAN pair is given:
  cycle consistency.

The population starts from importance-ranked masks at random widths, evolves by uniform crossover
(per group) and mutation (a kept channel swapped for a dropped one, or a group's width stepped),
and is repaired to the MACs budget by dropping the least important kept channel of a random group.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import first_output
from ..core.gating import GateSet, MacsModel, width_floors
from ..core.genetic import evolve_population
from ..core.targeting import Targets

__all__ = ["EvolveConfig", "ChannelMasks", "evolve_masks", "EvolveResult"]


@dataclass
class EvolveConfig:
    population: int = 16
    generations: int = 10
    parents: float = 0.25
    crossover: float = 0.5
    mutation_prob: float = 0.3  # per group
    disc_weight: float = 1.0
    cycle_weight: float = 1.0
    seed: int = 0


class ChannelMasks(GateSet):
    """Gate hooks whose scale is the keep-mask itself (1 kept, 0 dropped; no normalisation)."""

    def effective(self, i: int) -> torch.Tensor:
        return self.masks()[i]


@dataclass
class EvolveResult:
    alive: list  # bool mask per group
    fitness: float
    macs: float
    evaluations: int
    seconds: float
    history: list = field(default_factory=list)  # best fitness per generation


class _Fitness:
    def __init__(self, student: nn.Module, teacher: nn.Module, masks: ChannelMasks, batches: Sequence[tuple],
                 discriminator: Optional[nn.Module], reverse: Optional[nn.Module], cfg: EvolveConfig):
        self.student, self.masks, self.batches = student, masks, [tuple(b) for b in batches]
        self.discriminator, self.reverse, self.cfg = discriminator, reverse, cfg
        with torch.no_grad():
            self.t_out = [first_output(teacher(*b)) for b in self.batches]
            self.d_teacher = [discriminator(t) for t in self.t_out] if discriminator is not None else None
        self.cache: dict = {}
        self.evaluations = 0

    @torch.no_grad()
    def __call__(self, alive: list[torch.Tensor]) -> float:
        key = tuple(tuple(a.nonzero().flatten().tolist()) for a in alive)
        if key in self.cache:
            return self.cache[key]
        self.masks.set_masks(alive)
        total = 0.0
        for i, b in enumerate(self.batches):
            out = first_output(self.student(*b))
            f = -float(F.l1_loss(out, self.t_out[i]))
            if self.discriminator is not None and self.cfg.disc_weight:
                d = self.discriminator(out)
                f -= self.cfg.disc_weight * _d_distance(d, self.d_teacher[i])
            if self.reverse is not None and self.cfg.cycle_weight:
                f -= self.cfg.cycle_weight * float(F.l1_loss(first_output(self.reverse(out)), b[0]))
            total += f
        self.cache[key] = total / len(self.batches)
        self.evaluations += 1
        return self.cache[key]


def _d_distance(a, b) -> float:
    if isinstance(a, (list, tuple)):  # multi-scale discriminators: average over scales (last output of each)
        return sum(_d_distance(x[-1] if isinstance(x, (list, tuple)) else x,
                               y[-1] if isinstance(y, (list, tuple)) else y) for x, y in zip(a, b)) / len(a)
    return float(F.mse_loss(a, b))


def evolve_masks(student: nn.Module, teacher: nn.Module, targets: Targets, macs_model: MacsModel,
                 target_macs: float, importance: list[torch.Tensor], batches: Sequence[tuple],
                 discriminator: Optional[nn.Module] = None, reverse: Optional[nn.Module] = None,
                 config: Optional[EvolveConfig] = None, multiple: int = 1, progress: bool = True) -> EvolveResult:
    """Genetic search for keep-masks within ``target_macs`` (absolute MACs of ``macs_model``).

    ``importance``: a score per channel per group (ranks initial masks and repairs); ``batches``:
    input tuples for the fitness (held fixed). ``student`` is evaluated in eval mode with mask hooks
    attached; they are removed before returning."""
    cfg = config or EvolveConfig()
    rng = random.Random(cfg.seed)
    t0 = time.time()
    order = [torch.argsort(s, descending=True) for s in importance]
    sizes = [g.size for g in targets.groups]
    frac = max(1e-3, min(1.0, target_macs / macs_model.total)) ** 0.5  # uniform width meeting the budget
    floors = width_floors(sizes, macs_model, target_macs)  # no layer cut to one channel while avoidable

    def top(gi: int, k: int) -> torch.Tensor:
        a = torch.zeros(sizes[gi], dtype=torch.bool)
        a[order[gi][:max(floors[gi], min(sizes[gi], k))]] = True
        return a

    def round_k(gi: int, k: int) -> int:
        if multiple > 1:
            k = -(-k // multiple) * multiple
        return max(floors[gi], min(sizes[gi], k))

    def repair(alive: list[torch.Tensor]) -> list[torch.Tensor]:
        alive = [a.clone() for a in alive]
        for _ in range(sum(sizes)):
            if macs_model.macs(alive) <= target_macs:
                return alive
            cand = [gi for gi, a in enumerate(alive)
                    if int(a.sum()) - max(1, multiple if multiple <= sizes[gi] else 1) >= floors[gi]]
            if not cand:
                break
            gi = rng.choice(cand)
            kept = alive[gi].nonzero().flatten()
            drop = kept[torch.argsort(importance[gi][kept])[:max(1, multiple)]]
            alive[gi][drop] = False
            if not alive[gi].any():
                alive[gi][order[gi][0]] = True
        return alive

    def grow(alive: list[torch.Tensor]) -> list[torch.Tensor]:
        """Add the most important dropped channels (a block of ``multiple``) to random groups while the
        MACs stay within the target, so individuals sit at the budget's edge (a fitness that hardly
        rewards width otherwise leaves the answer far below the target)."""
        alive = [a.clone() for a in alive]
        if macs_model.macs(alive) > target_macs:
            return alive
        open_groups = [gi for gi, a in enumerate(alive) if not bool(a.all())]
        rng.shuffle(open_groups)
        while open_groups:
            gi = open_groups.pop()
            trial = alive[gi].clone()
            trial[[int(c) for c in order[gi] if not trial[c]][:max(1, multiple)]] = True
            if macs_model.macs([trial if j == gi else a for j, a in enumerate(alive)]) <= target_macs:
                alive[gi] = trial
                if not bool(trial.all()):
                    open_groups.insert(rng.randrange(len(open_groups) + 1), gi)
        return alive

    def random_individual() -> list[torch.Tensor]:
        return grow(repair([top(gi, round_k(gi, int(round(sizes[gi] * frac * rng.uniform(0.6, 1.6)))))
                            for gi in range(len(sizes))]))

    def mutate(alive: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for gi, a in enumerate(alive):
            a = a.clone()
            if rng.random() < cfg.mutation_prob:
                if rng.random() < 0.5 and 0 < int(a.sum()) < sizes[gi]:  # swap one kept channel for a dropped one
                    on, off = a.nonzero().flatten().tolist(), (~a).nonzero().flatten().tolist()
                    a[rng.choice(on)] = False
                    a[rng.choice(off)] = True
                else:  # change the width, keeping the most important channels
                    step = max(1, multiple, sizes[gi] // 8)
                    a = top(gi, round_k(gi, int(a.sum()) + rng.choice((-step, step))))
            out.append(a)
        return grow(repair(out))

    def cross(x: list[torch.Tensor], y: list[torch.Tensor]) -> list[torch.Tensor]:
        return grow(repair([(a if rng.random() < 0.5 else b).clone() for a, b in zip(x, y)]))

    state = rng.getstate()  # the check must not shift the search's random stream
    smallest = repair([top(gi, round_k(gi, 1)) for gi in range(len(sizes))])
    rng.setstate(state)
    if macs_model.macs(smallest) > target_macs:  # repair cannot get under the budget: say so before searching
        raise ValueError(
            f"evolve: MACs budget {target_macs / 1e9:.4g} G is below the smallest masks it may build "
            f"({macs_model.macs(smallest) / 1e9:.4g} G with at least max(floor, multiple={multiple}) channels per "
            f"group); raise the target or lower channel_multiple")
    masks = ChannelMasks(targets)
    was_training = student.training
    student.eval()
    masks.attach(student)
    fit = _Fitness(student, teacher, masks, batches, discriminator, reverse, cfg)
    history = []
    try:
        pop, history = evolve_population(
            [random_individual() for _ in range(cfg.population)], fit, mutate, cross, size=cfg.population,
            generations=cfg.generations, n_parents=max(2, int(round(cfg.parents * cfg.population))),
            crossover=cfg.crossover, rng=rng, progress=progress, desc="ganslim evolve")
        best_f, best = max(((fit(a), a) for a in pop), key=lambda t: t[0])
    finally:
        masks.detach()
        student.train(was_training)
    best_macs = macs_model.macs(best)
    if best_macs > target_macs * (1 + 1e-9):  # repair's guarantee, checked: never hand back an over-budget answer
        raise RuntimeError(f"evolve: the best masks cost {best_macs / 1e9:.4g} G MACs, over the budget of "
                           f"{target_macs / 1e9:.4g} G")
    return EvolveResult(best, best_f, best_macs, fit.evaluations, time.time() - t0, history)
