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
