"""The genetic loop both searches share: channel masks (:mod:`ganslim.pruning.evolve`, Co-Evolutionary
Compression) and sub-network widths of a supernet (:mod:`ganslim.pruning.search`, once-for-all).

Per generation: score every individual, keep the fittest ``n_parents``, and fill the population with
children, each from crossover of two parents (probability ``crossover``) or from mutating one. What
an individual is, how it is scored, bred and kept within the budget is the caller's.
"""
from __future__ import annotations

import random
from typing import Callable, Hashable, Optional, Sequence, TypeVar

T = TypeVar("T")


def evolve_population(population: Sequence[T], fitness: Callable[[T], float], mutate: Callable[[T], Optional[T]],
                      cross: Callable[[T, T], Optional[T]], *, size: int, generations: int, n_parents: int,
                      crossover: float, rng: random.Random, key: Optional[Callable[[T], Hashable]] = None,
                      max_attempts: Optional[int] = None, progress: bool = False, desc: str = "ganslim evolve",
                      postfix: Optional[Callable[[T, float], dict]] = None,
                      score_many: Optional[Callable[[list[T]], object]] = None) -> tuple[list[T], list[float]]:
    """Run ``generations`` rounds from ``population``; returns ``(last population, best fitness per
    generation)``. The last population holds the final parents first, then their children (not scored
    yet). ``mutate`` / ``cross`` may return None (no valid child: another attempt); with ``key``,
    children equal to a parent or to an earlier child are discarded; at most ``max_attempts`` breeding
    attempts per generation (None: until the population is full). Higher fitness is better.
    ``score_many(population)``, when given, is called before each generation is scored (a caller
    that caches fitness can evaluate the new individuals together, e.g. in parallel)."""
    from tqdm.auto import tqdm

    pop, history = list(population), []
    bar = tqdm(range(generations), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        if score_many is not None:
            score_many(pop)
        scored = sorted(((fitness(x), x) for x in pop), key=lambda t: -t[0])
        history.append(scored[0][0])
        if progress and postfix is not None:
            bar.set_postfix(postfix(scored[0][1], scored[0][0]), refresh=False)
        parents = [x for _, x in scored[:n_parents]]
        children: list[T] = []
        seen = {key(p) for p in parents} if key is not None else None
        attempts = 0
        while len(parents) + len(children) < size and (max_attempts is None or attempts < max_attempts):
            attempts += 1
            if len(parents) > 1 and rng.random() < crossover:
                a, b = rng.sample(parents, 2)
                child = cross(a, b)
            else:
                child = mutate(rng.choice(parents))
            if child is None:
                continue
            if seen is not None:
                k = key(child)
                if k in seen:
                    continue
                seen.add(k)
            children.append(child)
        pop = parents + children
    bar.close()
    return pop, history
