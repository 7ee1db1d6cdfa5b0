"""Finding a few-step schedule for a pipeline: gamma-curve search against the full-step outputs.

The objective (Kim and Cho, 2024): mean PSNR of the ``N``-step outputs against the full-step
outputs on calibration inputs. Everything is sampled through the shared harness with the same seeds,
so a score difference is the schedule's alone.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from diffslim.measure.quality import psnr
from diffslim.methods.timesteps import (SearchResult, gamma_search_bounded, gamma_search_greedy, gamma_timesteps,
                                         validate_timesteps)
from diffslim.sample import SampleSpec, sample


@contextlib.contextmanager
def explicit_timesteps(pipe):
    """Let ``pipe`` sample explicit timestep lists: DDIM is swapped for non-uniform DDIM meanwhile."""
    from diffusers import DDIMScheduler

    from diffslim.methods.timesteps import NonUniformDDIMScheduler

    old = pipe.scheduler
    if type(old) is DDIMScheduler:
        pipe.scheduler = NonUniformDDIMScheduler.from_config(old.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = old


def schedule_psnr(pipe, spec: SampleSpec, reference: torch.Tensor, timesteps: Sequence[int]) -> float:
    """Mean PSNR (dB) of ``spec``'s inputs sampled on ``timesteps`` against ``reference`` ``(N, C, H, W)``."""
    ts = validate_timesteps(list(timesteps))
    with explicit_timesteps(pipe):
        out = sample(pipe, spec.replace(timesteps=ts, num_inference_steps=None))
    return float(psnr(out, reference).mean())


@dataclass
class GammaSearch:
    """Result of :func:`search_gamma`: each method's :class:`SearchResult` and the chosen schedule."""

    steps: int
    coef: float
    results: dict[str, SearchResult] = field(default_factory=dict)
    best_method: Optional[str] = None

    @property
    def best(self) -> SearchResult:
        return self.results[self.best_method]

    @property
    def timesteps(self) -> list[int]:
        return gamma_timesteps(self.steps, self.best.best_gamma, self.coef)

    def to_json(self) -> dict:
        return {
            "steps": self.steps, "coef": self.coef, "best_method": self.best_method,
            "gamma": self.best.best_gamma, "psnr": self.best.best_score, "timesteps": self.timesteps,
            "methods": {k: {"gamma": r.best_gamma, "psnr": r.best_score, "evaluations": r.n_evals,
                            "seconds": r.seconds, "trace": [list(e) for e in r.evaluations]}
                        for k, r in self.results.items()},
        }


def search_gamma(pipe, spec: SampleSpec, reference: torch.Tensor, steps: int, methods=("greedy",),
                 coef: float = 30.0, bounds=(0.3, 3.0), max_evals: int = 60) -> GammaSearch:
    """Find gamma maximising :func:`schedule_psnr` of the ``steps``-step gamma schedule.

    ``methods``: "greedy" (the paper's line search) and/or "bounded" (scipy's bounded Brent on
    log gamma). A gamma whose schedule has duplicate timesteps scores -inf (it is not a valid
    ``steps``-step schedule).
    """
    def evaluate(g: float) -> float:
        try:
            ts = gamma_timesteps(steps, g, coef)
        except ValueError:
            return float("-inf")
        return schedule_psnr(pipe, spec, reference, ts)

    out = GammaSearch(steps=steps, coef=coef)
    for m in methods:
        if m == "greedy":
            out.results[m] = gamma_search_greedy(evaluate, max_evals=max_evals)
        elif m == "bounded":
            out.results[m] = gamma_search_bounded(evaluate, bounds=bounds, maxiter=max_evals)
        else:
            from diffslim.errors import UserError

            raise UserError(f"unknown gamma search method {m!r}; accepted: greedy, bounded")
    out.best_method = max(out.results, key=lambda k: out.results[k].best_score)
    return out


@dataclass
class EvolutionResult:
    """Result of :func:`evolutionary_timesteps`: the best schedule, its score and every evaluation."""

    best_timesteps: list[int]
    best_score: float
    evaluations: list[tuple[tuple[int, ...], float]]
    n_evals: int
    seconds: float


def evolutionary_timesteps(evaluate, steps: int, budget: int = 24, population: int = 8, parents: int = 4,
                           sigma: float = 40.0, seed: int = 0, T: int = 999) -> EvolutionResult:
    """Evolutionary search over ``steps``-step timestep sets (the AutoDiffusion-style baseline).

    A schedule starts at ``T`` (pure noise) and holds ``steps - 1`` further distinct timesteps in
    ``[0, T)``. The first generation is the uniform linspace schedule plus random ones; each next
    generation keeps the ``parents`` best and fills up with children made by crossover (``steps - 1``
    timesteps drawn from the union of two parents) and Gaussian mutation (``sigma`` timesteps).
    ``evaluate(timesteps) -> score`` (higher is better) is called at most ``budget`` times on
    distinct schedules; the same ``seed`` gives the same search.
    """
    import numpy as np

    if steps < 2:
        raise ValueError("an evolutionary schedule search needs steps >= 2")
    rng = np.random.default_rng(seed)
    scores: dict[tuple[int, ...], float] = {}
    order: list[tuple[tuple[int, ...], float]] = []
    t0 = time.perf_counter()

    def make(rest) -> tuple[int, ...]:
        rest = sorted({int(min(T - 1, max(0, round(x)))) for x in rest}, reverse=True)
        while len(rest) < steps - 1:  # refill after duplicates collapsed
            rest = sorted(set(rest) | {int(rng.integers(0, T))}, reverse=True)
        return (T, *rest[: steps - 1])

    def score(ts) -> float:
        if ts not in scores and len(scores) < budget:
            scores[ts] = float(evaluate(list(ts)))
            order.append((ts, scores[ts]))
        return scores.get(ts, float("-inf"))

    pop = [make(np.linspace(T, 0, steps)[1:])] + [make(rng.uniform(0, T, steps - 1)) for _ in range(population - 1)]
    while len(scores) < budget:
        for ts in pop:
            score(ts)
        if len(scores) >= budget:
            break
        best = sorted(set(pop), key=lambda t: -scores.get(t, float("-inf")))[:parents]
        children = list(best)
        stall = 0
        while len(children) < population and stall < 100:
            a, b = rng.choice(len(best), 2, replace=len(best) < 2)
            pool = sorted(set(best[a][1:]) | set(best[b][1:]))
            child = rng.choice(pool, steps - 1, replace=False) if len(pool) >= steps - 1 else np.array(pool)
            child = make(child + rng.normal(0, sigma, len(child)) * (rng.random(len(child)) < 0.5))
            if child in scores or child in children:
                stall += 1
                continue
            children.append(child)
        if stall >= 100:
            break
        pop = children
    best_ts, best_score = max(scores.items(), key=lambda kv: kv[1])
    return EvolutionResult(list(best_ts), best_score, order, len(scores), time.perf_counter() - t0)
