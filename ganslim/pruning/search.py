"""Evolutionary architecture search over a supernet's widths, under a MACs and/or a measured latency budget.

One trained :class:`~ganslim.pruning.slicing.Supernet` answers any budget without retraining: a population
of width configurations that satisfy the budget is evolved (the best ``parents`` fraction survives;
children by uniform crossover of two parents and by mutation, i.e. each group's width redrawn with
probability ``mutation_prob``); a child over budget is shrunk (a random group one width step down)
until it fits, which keeps the search near the budget's edge where the best networks are.

Fitness is measured, not predicted: each candidate's BatchNorm statistics are re-estimated on a
few training batches (:func:`~ganslim.pruning.slicing.recalibrate_bn`) and its outputs are compared on a
held-out set (PSNR to the ground truth when there is one, else to the teacher; or any
``metric(model) -> float``, higher is better, e.g. a negative FID). The latency budget is checked
by timing the sliced sub-network on this device. Every evaluation is cached, so several budgets
share work, and all of them feed the Pareto front (MACs vs fidelity) of :class:`SearchResult`.
"""
from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from .. import measure
from ..config import SEARCH_PRECISIONS, SEARCH_PREFIX_CACHE_MB
from .._utils import as_input_tuple, first_output, set_training
from ..core.genetic import evolve_population
from ..core.precision import native_bf16_cpu
from ..measure.memory import available_memory_bytes
from .prefix import PrefixCache
from .slicing import Supernet, recalibrate_bn

# prefix keys remembered per evaluation worker when choosing where a sub-network goes (a worker's own
# cache may have dropped some: then it just computes more)
_WORKER_KEYS_KEPT = 4096
# the kept prefixes take at most this share of the memory free when the evaluator is made, split
# between its processes: a machine short of memory gets a smaller cache rather than swapping
_PREFIX_MEMORY_SHARE = 0.25

__all__ = ["SearchConfig", "Candidate", "SearchResult", "Evaluator", "evolve", "search", "BudgetError", "pareto_front",
           "budget_range", "resolve_budget", "native_bf16_cpu", "resolve_precision", "prefix_cache_bytes"]


def _check_precision(precision: str) -> None:
    if precision not in SEARCH_PRECISIONS:
        raise ValueError(f"precision must be one of {SEARCH_PRECISIONS}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` on a CPU with native bf16, else ``"fp32"``; others as given."""
    _check_precision(precision)
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16_cpu() else "fp32"
    return precision


class BudgetError(ValueError):
    """A budget no sub-network of the supernet can meet (or one above the teacher)."""


@dataclass
class SearchConfig:
    """Evolution: ``population`` candidates per generation, ``generations`` rounds, the best
    ``parents`` fraction survives, ``crossover`` fraction of the children come from crossover
    (the rest from mutation), each width redrawn with ``mutation_prob``. ``bn_batches`` training
    batches re-estimate BatchNorm statistics per candidate. ``metric``: ``"psnr_gt"``,
    ``"psnr_teacher"``, ``"ssim_gt"`` or a callable ``model -> float`` (higher is better).
    ``prefix_cache_mb``: memory (MB, per evaluation process) for the activations of prefixes that
    sub-networks share (:class:`~ganslim.pruning.prefix.PrefixCache`: the same numbers, less work, on a
    chain-shaped generator such as the ResNet ones), at most a quarter of the memory free on the
    device when the search starts, split between the processes (:func:`prefix_cache_bytes`); 0 turns
    it off. The default holds a few generations of the default teacher's sub-networks: with a
    quarter of it the oldest were dropped before their children came (``bench_search.py``).
    ``precision``: the arithmetic of the candidates' forwards: ``"fp32"`` (default: the same winner
    on every machine up to float rounding), ``"bf16"`` (the convolutions' weights and the inputs in
    bf16, normalisation and its statistics in float32: :meth:`Evaluator._forwards_bf16`) or ``"auto"``: bf16 on a CPU that computes it natively (AMX or AVX512-BF16), fp32
    elsewhere. bf16 evaluates faster and moves a fitness by hundredths of a dB, enough to send the
    evolution down another path to another (not a worse) winner: bench_search.py measures both. The
    exported sub-network and everything measured after the search are float32 either way."""

    population: int = 24
    generations: int = 8
    parents: float = 0.25
    crossover: float = 0.5
    mutation_prob: float = 0.2
    bn_batches: int = 4
    metric: Any = "psnr_gt"
    latency_repeats: int = 5
    seed: int = 0
    workers: int = 1  # evaluation processes (forked, threads shared out); 2 on 2 cores: bench_search.py
    precision: str = "fp32"  # "fp32" | "bf16" | "auto" (bf16 where the CPU has native bf16)
    prefix_cache_mb: int = SEARCH_PREFIX_CACHE_MB  # activations kept to start sub-networks from a shared prefix (0: off); per process

    def validate(self) -> "SearchConfig":
        if self.population < 2 or self.generations < 1:
            raise ValueError("population must be >= 2 and generations >= 1")
        if not 0 < self.parents <= 1 or not 0 <= self.crossover <= 1 or not 0 <= self.mutation_prob <= 1:
            raise ValueError("parents must lie in (0, 1], crossover and mutation_prob in [0, 1]")
        if not callable(self.metric) and self.metric not in ("psnr_gt", "psnr_teacher", "ssim_gt"):
            raise ValueError(f"metric must be 'psnr_gt', 'psnr_teacher', 'ssim_gt' or a callable, got {self.metric!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        _check_precision(self.precision)
        return self


@dataclass
class Candidate:
    """One evaluated sub-network: ``widths`` ({group root: channels}), ``macs`` (papers' convention,
    at the supernet's example input), ``fitness`` (higher is better), measured ``latency_ms`` when a
    latency budget is in play, and the fidelity ``metrics`` (PSNR dB / SSIM)."""

    widths: dict
    macs: float
    fitness: float
    latency_ms: Optional[float] = None
    metrics: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return _key(self.widths)


def _key(widths: dict) -> tuple:
    return tuple(sorted(widths.items()))


def _channels_last(inputs: tuple) -> tuple:
    return tuple(t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t
                 for t in inputs)


def prefix_cache_bytes(prefix_cache_mb: int, device=None, processes: int = 1) -> int:
    """Bytes of kept prefixes per evaluation process: ``prefix_cache_mb`` MiB, or less where a quarter
    of the memory free on ``device`` now (:func:`~ganslim.measure.memory.available_memory_bytes`),
    split between ``processes``, is less; ``prefix_cache_mb`` MiB when the free memory is not known."""
    wanted = max(0, int(prefix_cache_mb)) << 20
    free = available_memory_bytes(device)
    if free is None:
        return wanted
    return min(wanted, int(free * _PREFIX_MEMORY_SHARE) // max(1, int(processes)))


def _evaluation_worker(evaluator: "Evaluator", conn, threads: int) -> None:
    """A forked evaluation process: widths in, ``(metrics, fitness)`` (or the exception) out."""
    evaluator._pool = None  # the parent's pipes are not this process's to close
    torch.set_num_threads(threads)
    while True:
        try:
            widths = conn.recv()
        except EOFError:
            return
        if widths is None:
            return
        try:
            conn.send(evaluator._measure(widths))
        except Exception as e:  # noqa: BLE001 - sent back and raised in the search
            conn.send(e)


class Evaluator:
    """Measures candidates on ``eval_pairs`` ([(inputs tuple, target or None)]), caching by widths.

    ``bn_inputs``: input tuples for BatchNorm re-estimation; ``latency_input``: input tuple timed for
    a latency budget (default: the first evaluation input). ``precision``: see :class:`SearchConfig`
    (the resolved one is ``self.precision``; latency is always timed in float32, as deployed).
    ``prefix_cache_mb``: see :class:`SearchConfig` (``self.prefix``: the cache, None when off)."""

    def __init__(self, supernet: Supernet, teacher: Optional[nn.Module], eval_pairs: Sequence[tuple],
                 bn_inputs: Sequence[tuple] = (), metric: Any = "psnr_gt", latency_input: Optional[tuple] = None,
                 latency_repeats: int = 5, threads: Optional[int] = None, workers: int = 1, precision: str = "fp32",
                 prefix_cache_mb: int = SearchConfig.prefix_cache_mb):
        if not eval_pairs:
            raise ValueError("search needs at least one evaluation input")
        self.supernet, self.metric = supernet, metric
        self.device = next(supernet.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        pairs = [(as_input_tuple(i), t) for i, t in eval_pairs]
        self.latency_input = latency_input or pairs[0][0]  # timed as the user deploys it
        # Images in channels-last order: oneDNN's convolutions then skip the reordering of every
        # activation (the 3-channel output conv runs 2x faster); the same numbers up to rounding.
        self.eval_pairs = [(_channels_last(i), t) for i, t in pairs]
        self.bn_inputs = [_channels_last(as_input_tuple(i)) for i in bn_inputs]
        self.latency_repeats, self.threads = latency_repeats, threads
        has_gt = all(t is not None for _, t in self.eval_pairs)
        if metric in ("psnr_gt", "ssim_gt") and not has_gt:
            if teacher is None:
                raise ValueError("the evaluation pairs have no ground truth and no teacher was given")
            self.metric = "psnr_teacher"  # unpaired data: fidelity to the teacher is all there is
        self.teacher_out = None
        if teacher is not None:
            was = teacher.training
            teacher.eval()
            with torch.no_grad():
                self.teacher_out = [first_output(teacher(*i)) for i, _ in self.eval_pairs]
            teacher.train(was)
        self.cache: dict[tuple, Candidate] = {}
        self.latency_cache: dict[tuple, float] = {}
        self.macs_cache: dict[tuple, float] = {}
        self.workers = max(1, int(workers))
        self._bf16_inputs, self._bf16_copies, self._bf16_stamp, self._bf16_autocast = None, [], None, False
        self._pool = None
        self._worker_keys: Optional[list] = None  # per worker: the prefix keys it was sent (see _dispatch)
        self.prefix: Optional[PrefixCache] = None
        cache_bytes = prefix_cache_bytes(prefix_cache_mb, self.device, self.workers)
        if cache_bytes > 0:
            self.prefix = PrefixCache(supernet, supernet.example_inputs, cache_bytes)
            if not self.prefix.enabled:
                self.prefix = None  # not a chain: whole forwards
        self.evaluations = 0
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, widths: dict) -> Candidate:
        k = _key(widths)
        if k in self.cache:
            return self.cache[k]
        t0 = time.time()
        metrics, fitness = self._measure(widths)
        return self._store(widths, metrics, fitness, time.time() - t0)

    @torch.no_grad()
    def _measure(self, widths: dict) -> tuple[dict, float]:
        """BatchNorm re-estimated, then the held-out metrics of one sub-network: ``(metrics, fitness)``."""
        sn = self.supernet
        sn.set_widths(widths)
        if self.precision == "bf16":
            outs = self._forwards_bf16()
        else:
            outs = self._forwards(self.bn_inputs, [i for i, _ in self.eval_pairs])
        metrics = {}
        gts = [t for _, t in self.eval_pairs]
        if all(t is not None for t in gts):
            metrics["psnr_gt"] = sum(measure.psnr(o, t) for o, t in zip(outs, gts)) / len(outs)
            if self.metric == "ssim_gt":  # SSIM costs more than the PSNRs together: only when it decides
                metrics["ssim_gt"] = sum(measure.ssim(o, t) for o, t in zip(outs, gts)) / len(outs)
        if self.teacher_out is not None:
            metrics["psnr_teacher"] = sum(measure.psnr(o, t) for o, t in zip(outs, self.teacher_out)) / len(outs)
        fitness = float(self.metric(sn.model)) if callable(self.metric) else float(metrics[self.metric])
        return metrics, fitness

    def _forwards(self, bn_inputs: Sequence[tuple], eval_inputs: Sequence[tuple]) -> list[torch.Tensor]:
        if self.prefix is not None:  # from the deepest prefix already computed: the same numbers
            outs = self.prefix.forwards(bn_inputs, eval_inputs)
            return [first_output(o).float() for o in outs]
        recalibrate_bn(self.supernet, bn_inputs)
        set_training(self.supernet.model, False)
        return [first_output(self.supernet.model(*i)).float() for i in eval_inputs]

    def _forwards_bf16(self) -> list[torch.Tensor]:
        """:meth:`_forwards` in bf16: the convolutions' and linear layers' weights swapped for bf16
        copies for the duration (made once and kept: like the fitness cache, the evaluator takes the
        supernet's weights as fixed while it lives; an optimizer step on them is noticed and the copies
        made again), inputs in bf16, normalisation parameters and statistics in float32. This runs
        faster than autocast, which casts every weight on every forward; a model whose own arithmetic
        mixes float32 tensors back in (an error on the first try) runs under autocast instead."""
        if self._bf16_inputs is None:
            low = lambda t: t.to(torch.bfloat16) if torch.is_floating_point(t) else t  # noqa: E731
            self._bf16_inputs = ([tuple(low(t) for t in b) for b in self.bn_inputs],
                                 [tuple(low(t) for t in i) for i, _ in self.eval_pairs])
        swapped = []
        try:
            for p, low_weight in self._bf16_weights():
                swapped.append((p, p.data))
                p.data = low_weight
            if not self._bf16_autocast:
                try:
                    return self._forwards(*self._bf16_inputs)
                except RuntimeError:  # e.g. "Input type (float) and bias type (BFloat16) should be the same"
                    self._bf16_autocast = True
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self._forwards(*self._bf16_inputs)
        finally:
            for p, d in swapped:
                p.data = d

    def _bf16_weights(self) -> list[tuple]:
        params = [p for m in self.supernet.model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                  for p in m.parameters(recurse=False) if p.is_floating_point()]
        stamp = [(p.data_ptr(), p._version) for p in params]
        if self._bf16_stamp != stamp:
            self._bf16_copies = [(p, p.detach().to(torch.bfloat16)) for p in params]
            self._bf16_stamp = stamp
        return self._bf16_copies

    def _store(self, widths: dict, metrics: dict, fitness: float, seconds: float) -> Candidate:
        k = _key(widths)
        cand = Candidate(dict(widths), self.macs(widths), fitness, self.latency_cache.get(k), metrics)
        self.cache[k] = cand
        self.evaluations += 1
        self.seconds += seconds
        return cand

    def evaluate_many(self, many: Sequence[dict]) -> list[Candidate]:
        """Evaluate several sub-networks; with ``workers`` > 1 the uncached ones are split over that
        many forked processes of ``threads // workers`` threads each (small sub-networks keep two
        processes busier than two threads of one). Same numbers as one at a time."""
        todo, seen = [], set()
        for w in many:
            k = _key(w)
            if k not in self.cache and k not in seen:
                seen.add(k)
                todo.append(dict(w))
        if self.workers > 1 and len(todo) > 1:
            t0 = time.time()
            results = self._dispatch(todo)
            share = (time.time() - t0) / len(todo)  # wall time of the batch, shared out
            for w, res in zip(todo, results):
                if isinstance(res, BaseException):
                    raise res
                self._store(w, *res, share)
        return [self(w) for w in many]

    def _dispatch(self, todo: Sequence[dict]) -> list:
        """``todo`` measured by the worker processes, one sub-network at a time per worker: a worker that
        finishes gets the pending sub-network its kept prefixes reach deepest into (as far as this
        process knows: the prefix keys of what it was sent before; the first pending one when none
        reaches or without prefix reuse). Busy workers stay busy whatever the candidates' sizes, and a
        child mostly goes where its parent's activations are kept. Which worker measures a sub-network
        changes only the time: each computes the same numbers from its own prefixes as from none.
        Returns each sub-network's ``(metrics, fitness)`` or exception, in ``todo``'s order."""
        from multiprocessing.connection import wait

        pool = self._worker_pool()
        if self._worker_keys is None:
            self._worker_keys = [OrderedDict() for _ in pool]
        keys = [self.prefix._keys(w) if self.prefix is not None else [] for w in todo]
        pending, results, busy = list(range(len(todo))), [None] * len(todo), {}

        def send(i: int) -> None:
            seen = self._worker_keys[i]

            def depth(j: int) -> int:
                return max((d + 1 for d, k in enumerate(keys[j]) if k in seen), default=0)

            j = max(pending, key=lambda j: (depth(j), -j))
            pending.remove(j)
            pool[i][0].send(todo[j])
            busy[i] = j
            for k in keys[j]:  # most recent last; a bounded memory of what the worker may still keep
                seen[k] = None
                seen.move_to_end(k)
            while len(seen) > _WORKER_KEYS_KEPT:
                seen.popitem(last=False)

        for i in range(len(pool)):
            if pending:
                send(i)
        conns = {pool[i][0]: i for i in range(len(pool))}
        while busy:
            for conn in wait([pool[i][0] for i in busy]):
                i = conns[conn]
                results[busy.pop(i)] = conn.recv()
                if pending:
                    send(i)
        return results

    def _worker_pool(self) -> list:
        if self._pool is None:
            import multiprocessing as mp

            ctx = mp.get_context("fork")  # the children share the supernet's memory until they write it
            threads = max(1, (self.threads or torch.get_num_threads()) // self.workers)
            self._pool = []
            for _ in range(self.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_evaluation_worker, args=(self, child, threads), daemon=True)
                proc.start()
                child.close()
                self._pool.append((parent, proc))
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (started again when needed)."""
        for conn, proc in self._pool or ():
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self._pool = None
        self._worker_keys = None  # new workers keep nothing

    def __del__(self):
        if getattr(self, "_pool", None):
            self.close()

    def macs(self, widths: dict) -> float:
        """MACs of a sub-network (cached: the search asks for the same widths many times)."""
        k = _key(widths)
        if k not in self.macs_cache:
            self.macs_cache[k] = self.supernet.macs(widths)
        return self.macs_cache[k]

    def estimate_latency(self, macs: float) -> Optional[float]:
        """Least-squares line ``ms = a + b * MACs`` through the timings so far (None below 3 timings)."""
        pts = [(self.macs(dict(k)), ms) for k, ms in self.latency_cache.items()]
        if len(pts) < 3:
            return None
        n = len(pts)
        mx = sum(p[0] for p in pts) / n
        my = sum(p[1] for p in pts) / n
        var = sum((p[0] - mx) ** 2 for p in pts)
        if var <= 0:
            return None
        b = sum((p[0] - mx) * (p[1] - my) for p in pts) / var
        return my + b * (macs - mx)

    def latency(self, widths: dict) -> float:
        """Median latency (ms) of the sliced sub-network on ``latency_input`` (cached)."""
        k = _key(widths)
        if k not in self.latency_cache:
            sn = self.supernet
            sn.set_widths(widths)
            with sn.direct_thin_convs():  # timed as the exported sub-network will run
                st = measure.measure_latency(sn.model, self.latency_input, warmup=2, repeats=self.latency_repeats,
                                             threads=self.threads, max_seconds=20)
            self.latency_cache[k] = st.median_ms
            if k in self.cache:
                self.cache[k].latency_ms = st.median_ms
        return self.latency_cache[k]


@dataclass
class SearchResult:
    """The best sub-network for one budget, and every candidate evaluated on the way."""

    best: Candidate
    budget_macs: Optional[float]
    budget_latency_ms: Optional[float]
    reference_macs: float
    evaluated: list
    evaluations: int
    seconds: float
    generations: list = field(default_factory=list)  # best fitness per generation

    @property
    def per_minute(self) -> float:
        """Sub-networks evaluated per minute (fresh evaluations, not cache hits)."""
        return 60.0 * self.evaluations / max(self.seconds, 1e-9)

    def pareto(self) -> list[Candidate]:
        """Candidates no other beats on both MACs (lower) and fitness (higher), cheapest first."""
        return pareto_front(self.evaluated)

    def table(self, limit: int = 12) -> str:
        lines = [f"{'MACs G':>9} {'x fewer':>8} {'fitness':>8} {'PSNR-GT':>8} {'PSNR-T':>8} {'ms':>7}"]
        for c in self.pareto()[-limit:]:
            lines.append(f"{c.macs / 1e9:9.4f} {self.reference_macs / max(c.macs, 1):8.2f} {c.fitness:8.3f} "
                         f"{c.metrics.get('psnr_gt', float('nan')):8.2f} {c.metrics.get('psnr_teacher', float('nan')):8.2f} "
                         f"{c.latency_ms if c.latency_ms is not None else float('nan'):7.1f}")
        return "\n".join(lines)


def pareto_front(cands: Sequence[Candidate]) -> list[Candidate]:
    out, best = [], -float("inf")
    for c in sorted(cands, key=lambda c: (c.macs, -c.fitness)):
        if c.fitness > best:
            out.append(c)
            best = c.fitness
    return out


def budget_range(supernet: Supernet) -> tuple[float, float]:
    """(MACs of the smallest, of the largest sub-network) at the supernet's example input."""
    return supernet.macs(supernet.smallest()), supernet.macs(supernet.largest())


def resolve_budget(supernet: Supernet, target_macs: Optional[float], reference_macs: Optional[float] = None) -> Optional[float]:
    """``target_macs`` as a fraction (<= 1) of ``reference_macs`` (default: the full supernet) or an
    absolute count -> absolute MACs, checked against what the supernet can reach."""
    if target_macs is None:
        return None
    ref = float(reference_macs or supernet.total_macs)
    budget = float(target_macs) * ref if target_macs <= 1 else float(target_macs)
    lo, hi = budget_range(supernet)
    if not target_macs > 0 or budget < lo or budget > ref * 1.000001:
        raise BudgetError(f"MACs budget {budget / 1e9:.4g} G ({budget / ref:.4g} of the teacher) is outside the "
                          f"achievable range {lo / 1e9:.4g}-{min(hi, ref) / 1e9:.4g} G, i.e. target_macs between "
                          f"{lo / ref:.4f} and {min(hi, ref) / ref:.4f}")
    return budget


class _Sampler:
    def __init__(self, supernet: Supernet, rng: random.Random, fits: Callable[[dict], bool], grow: bool = False):
        self.sn, self.rng, self.fits, self.grow = supernet, rng, fits, grow

    def shrink_to_fit(self, widths: dict, tries: int = 400) -> Optional[dict]:
        """Step random groups one width down until ``widths`` fits the budget (None if it cannot)."""
        w = dict(widths)
        for _ in range(tries):
            if self.fits(w):
                return w
            roots = [r for r, c in self.sn.choices.items() if c.index(w[r]) > 0]
            if not roots:
                return None
            r = self.rng.choice(roots)
            c = self.sn.choices[r]
            w[r] = c[c.index(w[r]) - 1]
        return None

    def fit(self, widths: dict) -> Optional[dict]:
        """Shrink ``widths`` into the budget, then (with ``grow``) step random groups one width up while
        it still fits, so every candidate sits at the budget's edge: without that, an undertrained
        supernet whose fitness hardly rewards width chose networks far below the budget asked for."""
        w = self.shrink_to_fit(widths)
        if w is None or not self.grow:
            return w
        roots = [r for r, c in self.sn.choices.items() if c.index(w[r]) < len(c) - 1]
        self.rng.shuffle(roots)
        while roots:
            r = roots.pop()
            c = self.sn.choices[r]
            up = dict(w, **{r: c[c.index(w[r]) + 1]})
            if self.fits(up):
                w = up
                if c.index(w[r]) < len(c) - 1:
                    roots.insert(self.rng.randrange(len(roots) + 1), r)
        return w

    def random(self) -> Optional[dict]:
        return self.fit(self.sn.sample(self.rng))

    def mutate(self, widths: dict, prob: float) -> Optional[dict]:
        w = {r: (self.rng.choice(c) if self.rng.random() < prob else widths[r]) for r, c in self.sn.choices.items()}
        return self.fit(w)

    def crossover(self, a: dict, b: dict) -> Optional[dict]:
        return self.fit({r: (a[r] if self.rng.random() < 0.5 else b[r]) for r in a})


def evolve(supernet: Supernet, evaluator: Evaluator, budget_macs: Optional[float] = None,
           budget_latency_ms: Optional[float] = None, config: Optional[SearchConfig] = None,
           reference_macs: Optional[float] = None, progress: bool = True) -> SearchResult:
    """Evolutionary search for the fittest sub-network within ``budget_macs`` (absolute MACs at the
    supernet's example input) and/or ``budget_latency_ms`` (measured on this device)."""
    cfg = (config or SearchConfig()).validate()
    rng = random.Random(cfg.seed)
    t0, n0, s0 = time.time(), evaluator.evaluations, evaluator.seconds
    if budget_latency_ms is not None:
        smallest = supernet.smallest()
        lat = evaluator.latency(smallest)
        if lat > budget_latency_ms:
            raise BudgetError(f"latency budget {budget_latency_ms:g} ms is below the smallest sub-network's measured "
                              f"{lat:.2f} ms on this device; achievable: >= {lat:.2f} ms")

    def fits(w: dict) -> bool:
        if budget_macs is not None and evaluator.macs(w) > budget_macs:
            return False
        if budget_latency_ms is not None:
            # timing every trial is slow: a linear MACs -> ms fit of the timings so far decides the
            # clear cases; candidates within 20% of the budget are timed (and every one finally kept)
            est = evaluator.estimate_latency(evaluator.macs(w))
            if est is not None and est > 1.2 * budget_latency_ms:
                return False
            if est is None or est > 0.8 * budget_latency_ms:
                return evaluator.latency(w) <= budget_latency_ms
        return True

    sampler = _Sampler(supernet, rng, fits, grow=budget_macs is not None and budget_latency_ms is None)
    pop: list[dict] = []
    if fits(supernet.largest()):
        pop.append(supernet.largest())
    tries = 0
    while len(pop) < cfg.population and tries < cfg.population * 20:
        tries += 1
        w = sampler.random()
        if w is not None and _key(w) not in {_key(p) for p in pop}:
            pop.append(w)
    if not pop:
        pop = [supernet.smallest()]
    seen: dict[tuple, Candidate] = {}

    def fitness(w: dict) -> float:
        c = evaluator(w)  # cached: a width seen before is not evaluated again
        seen[c.key] = c
        return c.fitness

    pop, history = evolve_population(
        pop, fitness, lambda w: sampler.mutate(w, cfg.mutation_prob), sampler.crossover, size=cfg.population,
        generations=cfg.generations, n_parents=max(1, int(round(cfg.parents * cfg.population))),
        crossover=cfg.crossover, rng=rng, key=_key, max_attempts=cfg.population * 20, progress=progress,
        desc="ganslim search", postfix=lambda w, f: {"best": f"{f:.3f}", "MACs": f"{evaluator.macs(w) / 1e9:.3f}G"},
        score_many=evaluator.evaluate_many)
    for c in evaluator.evaluate_many(pop):
        seen[c.key] = c
    if budget_latency_ms is not None:  # measured within the budget above: a valid answer whatever the timing noise
        c = evaluator(supernet.smallest())
        seen[c.key] = c
    ok = [c for c in seen.values() if budget_macs is None or c.macs <= budget_macs]
    ok.sort(key=lambda c: -c.fitness)
    best = None
    for c in ok:  # the fittest whose *measured* latency meets the budget
        if budget_latency_ms is None or evaluator.latency(c.widths) <= budget_latency_ms:
            best = c
            break
    if best is None:
        raise BudgetError(f"no sub-network found within the budget (latency {budget_latency_ms} ms, MACs {budget_macs})")
    return SearchResult(best, budget_macs, budget_latency_ms, float(reference_macs or supernet.total_macs),
                        sorted(evaluator.cache.values(), key=lambda c: c.macs), evaluator.evaluations - n0,
                        evaluator.seconds - s0 if evaluator.seconds > s0 else time.time() - t0, history)


def search(supernet: Supernet, teacher: Optional[nn.Module], eval_pairs: Sequence[tuple], bn_inputs: Sequence[tuple] = (),
           target_macs: Optional[float] = None, target_latency_ms: Optional[float] = None,
           config: Optional[SearchConfig] = None, reference_macs: Optional[float] = None,
           evaluator: Optional[Evaluator] = None, progress: bool = True, threads: Optional[int] = None) -> SearchResult:
    """Find the best sub-network of ``supernet`` for one budget.

    Args:
        eval_pairs: held-out ``[(inputs tuple, target or None)]`` for fitness.
        bn_inputs: training input tuples for BatchNorm re-estimation per candidate.
        target_macs: fraction (<= 1) of ``reference_macs`` (the teacher's MACs at the supernet's
            example input; default the full supernet) or an absolute MACs count.
        target_latency_ms: measured latency budget (ms per forward of the first eval input).
        evaluator: reuse one across budgets (cached evaluations are shared).
    Raises:
        BudgetError: the budget is outside what the supernet can reach (message gives the range).
    """
    cfg = (config or SearchConfig()).validate()
    if target_macs is None and target_latency_ms is None:
        raise BudgetError("give target_macs and/or target_latency_ms")
    budget = resolve_budget(supernet, target_macs, reference_macs)
    if target_latency_ms is not None and not target_latency_ms > 0:
        raise BudgetError(f"target_latency_ms must be > 0, got {target_latency_ms}")
    ev = evaluator or Evaluator(supernet, teacher, eval_pairs, bn_inputs, cfg.metric, latency_repeats=cfg.latency_repeats,
                                threads=threads, workers=cfg.workers, precision=cfg.precision,
                                prefix_cache_mb=cfg.prefix_cache_mb)
    prev = supernet.widths
    try:
        return evolve(supernet, ev, budget, target_latency_ms, cfg, reference_macs, progress)
    finally:
        if evaluator is None:
            ev.close()
        supernet.set_widths(prev)



# ------------------------------------------------------------------------------ many budgets, one supernet
@dataclass
class BudgetRow:
    """One budget's outcome: the chosen sub-network measured after export (and fine-tune)."""

    budget: str  # "macs 0.1" or "latency 25 ms"
    macs_fraction: float  # exported model's MACs / teacher's, at the evaluation input
    psnr_gt_search: Optional[float]  # at selection time (supernet weights, BN re-estimated)
    psnr_gt: Optional[float]  # exported (and fine-tuned) model
    psnr_teacher: Optional[float]
    latency_ms: Optional[float]  # exported plain model, this CPU
    evaluations: int
    search_seconds: float
    finetune_seconds: float
    path: Optional[str] = None
    widths: dict = field(default_factory=dict)


@dataclass
class BudgetRows:
    rows: list
    results: list  # SearchResult per budget
    teacher_psnr_gt: Optional[float] = None
    teacher_latency_ms: Optional[float] = None

    def table(self) -> str:
        head = (f"{'budget':<16} {'MACs':>7} {'x fewer':>8} {'PSNR-GT search':>15} {'PSNR-GT':>8} {'vs teacher':>10} "
                f"{'PSNR-T':>7} {'ms':>7} {'evals':>6} {'search s':>8} {'tune s':>7}")
        lines = [head, "-" * len(head)]

        def f(v, nd=2):
            return "n/a" if v is None else f"{v:.{nd}f}"

        for r in self.rows:
            gap = None if r.psnr_gt is None or self.teacher_psnr_gt is None else r.psnr_gt - self.teacher_psnr_gt
            lines.append(f"{r.budget:<16} {r.macs_fraction:7.4f} {1 / r.macs_fraction:8.2f} {f(r.psnr_gt_search):>15} "
                         f"{f(r.psnr_gt):>8} {('n/a' if gap is None else f'{gap:+.2f} dB'):>10} {f(r.psnr_teacher):>7} "
                         f"{f(r.latency_ms, 1):>7} {r.evaluations:6d} {r.search_seconds:8.1f} {r.finetune_seconds:7.1f}")
        if self.teacher_psnr_gt is not None:
            lines.append(f"teacher: PSNR-GT {self.teacher_psnr_gt:.2f} dB, {f(self.teacher_latency_ms, 1)} ms")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"rows": [asdict(r) for r in self.rows], "teacher_psnr_gt": self.teacher_psnr_gt,
                "teacher_latency_ms": self.teacher_latency_ms,
                "pareto": [[[c.macs / r.reference_macs, c.fitness] for c in r.pareto()] for r in self.results]}


def search_budgets(supernet: Supernet, teacher: nn.Module, loader, eval_pairs: Sequence[tuple],
                   budgets: Sequence[tuple], out_dir: Optional[str] = None, finetune_steps: int = 0,
                   finetune_lr: float = 2e-3, population: int = 24, generations: int = 8, seed: int = 0,
                   bn_batches: int = 4, progress: bool = True, plot: Optional[str] = None,
                   batch_fn=None, threads: Optional[int] = None, workers: int = 1,
                   finetune_average: Optional[float] = None, precision: str = "fp32",
                   prefix_cache_mb: int = SearchConfig.prefix_cache_mb) -> BudgetRows:
    """One supernet, several budgets, no retraining: for each ``("macs", fraction)`` or
    ``("latency", ms)`` in ``budgets``: search, re-estimate BatchNorm, export a plain module,
    optionally fine-tune it (``finetune_steps`` distillation steps, ending with the weight average of
    ``finetune_average``, default compress's), measure it, and save it to
    ``out_dir/subnet_<budget>.safetensors``. Evaluations are shared between budgets. ``precision``:
    the search's arithmetic (:class:`SearchConfig`); the rows are measured in float32.
    ``prefix_cache_mb``: see :class:`SearchConfig`.
    ``plot``: PNG of every evaluated sub-network (MACs vs fitness) with each budget's choice."""
    from ..deployment.checkpoint import save
    from ..config import CompressConfig, LossOptions
    from ..core.train import LossWeights, finetune, input_batches

    d = LossOptions()  # compress's output losses for the fine-tune
    weights = LossWeights(d.recon_weight, d.gt_weight, 0.0, 0.0, d.mse_weight)
    if finetune_average is None:
        finetune_average = CompressConfig().finetune_average

    cfg = SearchConfig(population=population, generations=generations, seed=seed, bn_batches=bn_batches, workers=workers,
                       precision=precision, prefix_cache_mb=prefix_cache_mb).validate()
    bn_inputs = input_batches(loader, bn_batches, batch_fn)
    pairs = [(as_input_tuple(i), t) for i, t in eval_pairs]
    ev = Evaluator(supernet, teacher, pairs, bn_inputs, cfg.metric, latency_repeats=cfg.latency_repeats, threads=threads,
                   workers=workers, precision=cfg.precision, prefix_cache_mb=cfg.prefix_cache_mb)
    stat_input = pairs[0][0]
    teacher_macs_eval = measure.count_macs(teacher, stat_input, "papers")
    gt_pairs = [(i, t) for i, t in pairs if t is not None]
    t_psnr = measure.fidelity_to_target(teacher, gt_pairs)["psnr"] if gt_pairs else None
    t_lat = measure.measure_latency(teacher, stat_input, warmup=2, repeats=5, threads=threads, max_seconds=30).median_ms
    rows, results = [], []
    for kind, value in budgets:
        t0 = time.time()
        res = search(supernet, teacher, pairs, bn_inputs, target_macs=value if kind == "macs" else None,
                     target_latency_ms=value if kind == "latency" else None, config=cfg, evaluator=ev,
                     progress=progress, threads=threads)
        ev.close()  # the worker processes, if any: the fine-tune below wants the cores
        recalibrate_bn(supernet, bn_inputs, res.best.widths)
        plain = supernet.export(res.best.widths)
        supernet.set_widths(supernet.largest())
        search_s = time.time() - t0
        t1 = time.time()
        if finetune_steps > 0:
            finetune(plain, teacher, loader, finetune_steps, finetune_lr, weights,
                     batch_fn=batch_fn, progress=progress, desc=f"fine-tune {kind} {value:g}", average=finetune_average)
        ft_s = time.time() - t1
        plain.eval()
        fid_gt = measure.fidelity_to_target(plain, gt_pairs)["psnr"] if gt_pairs else None
        fid_t = measure.compare_outputs(teacher, plain, [i for i, _ in pairs])["psnr"]
        lat = measure.measure_latency(plain, stat_input, warmup=2, repeats=5, threads=threads, max_seconds=30).median_ms
        label = f"macs {value:g}" if kind == "macs" else f"latency {value:g} ms"
        path = None
        if out_dir is not None:
            name = f"subnet_{kind}_{value:g}".replace(".", "p")
            path = str(save(plain, f"{out_dir}/{name}.safetensors",
                            metadata={"budget": label, "widths": res.best.widths, "finetune_steps": finetune_steps}))
        rows.append(BudgetRow(label, measure.count_macs(plain, stat_input, "papers") / teacher_macs_eval,
                              res.best.metrics.get("psnr_gt"), fid_gt, fid_t, lat, res.evaluations, search_s, ft_s, path,
                              dict(res.best.widths)))
        results.append(res)
    out = BudgetRows(rows, results, t_psnr, t_lat)
    if plot:
        pareto_plot(results, [r.budget for r in rows], plot)
    return out


def pareto_plot(results: Sequence[SearchResult], labels: Sequence[str], path: str) -> str:
    """PNG: every evaluated sub-network (MACs fraction of the teacher vs fitness), the Pareto front,
    and the sub-network chosen for each budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    allc = {c.key: c for r in results for c in r.evaluated}
    ref = results[0].reference_macs
    xs = [c.macs / ref for c in allc.values()]
    ys = [c.fitness for c in allc.values()]
    ax.scatter(xs, ys, s=8, c="#bbbbbb", label=f"evaluated ({len(allc)})")
    front = pareto_front(list(allc.values()))
    ax.plot([c.macs / ref for c in front], [c.fitness for c in front], "-o", ms=3, c="#1f77b4", label="Pareto front")
    for r, lab in zip(results, labels):
        ax.scatter([r.best.macs / ref], [r.best.fitness], s=60, marker="*", zorder=3)
        ax.annotate(lab, (r.best.macs / ref, r.best.fitness), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("MACs / teacher MACs")
    ax.set_ylabel("fitness (PSNR dB, supernet weights)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
