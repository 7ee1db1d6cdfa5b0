"""Depth search (Kim and Cho, 2024): the shallowest depth whose outputs stay close enough to the full model's.

Quality falls as depth falls, so a binary search over depth needs ``log2(n)`` sampling runs; a
linear scan evaluates every depth and checks that assumption. Quality is a metric of the pruned
model's outputs against the full model's (reference) outputs on calibration inputs, same seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from diffslim.errors import UserError
from diffslim.measure import quality
from diffslim.methods.depth_skip import depth_skip, max_depth
from diffslim.sample import SampleSpec, sample

METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "psnr": lambda out, ref: float(quality.psnr(out, ref).mean()),
    "ssim": lambda out, ref: float(quality.ssim(out, ref).mean()),
}


@dataclass
class DepthSearchResult:
    """Every evaluated depth with its quality, the chosen depth and what the search cost.

    ``depth`` is the shallowest evaluated depth meeting ``threshold`` (the full depth when none
    does: then ``reached`` is False and ``best_pruned`` names the best pruned depth seen).
    ``sampling_runs`` counts runs over the calibration set, the reference run excluded.
    """

    metric: str
    threshold: float
    mode: str
    full_depth: int
    depth: int
    reached: bool
    evaluations: dict[int, float] = field(default_factory=dict)
    sampling_runs: int = 0
    seconds: float = 0.0
    monotone: Optional[bool] = None  # checked by the linear scan

    @property
    def best_pruned(self) -> Optional[int]:
        pruned = {d: q for d, q in self.evaluations.items() if d < self.full_depth}
        return max(pruned, key=pruned.get) if pruned else None

    def to_json(self) -> dict:
        return {"metric": self.metric, "threshold": self.threshold, "mode": self.mode, "depth": self.depth,
                "reached": self.reached, "full_depth": self.full_depth, "best_pruned": self.best_pruned,
                "evaluations": [{"depth": d, self.metric: q} for d, q in sorted(self.evaluations.items())],
                "sampling_runs": self.sampling_runs, "seconds": self.seconds, "monotone": self.monotone}


def depth_quality(pipe, attr: str, spec: SampleSpec, reference: torch.Tensor, depth: int, metric: str = "psnr") -> float:
    """Quality of ``pipe`` with its denoiser (``pipe.<attr>``) pruned to ``depth``, against ``reference``."""
    import copy

    variant = copy.copy(pipe)
    setattr(variant, attr, depth_skip(getattr(pipe, attr), depth))
    return METRICS[metric](sample(variant, spec), reference)


def search_depth(pipe, attr: str, spec: SampleSpec, reference: torch.Tensor, threshold: float,
                 metric: str = "psnr", mode: str = "binary", progress: Optional[Callable[[int, float], None]] = None
                 ) -> DepthSearchResult:
    """Binary search (or linear scan, ``mode="linear"``) for the shallowest depth with quality >= ``threshold``."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    if mode not in ("binary", "linear"):
        raise UserError(f"unknown search mode {mode!r}; accepted: binary, linear")
    full = max_depth(getattr(pipe, attr))
    res = DepthSearchResult(metric, threshold, mode, full, full, False)
    t0 = time.perf_counter()

    def q(d: int) -> float:
        if d not in res.evaluations:
            res.evaluations[d] = depth_quality(pipe, attr, spec, reference, d, metric)
            res.sampling_runs += 1
            if progress is not None:
                progress(d, res.evaluations[d])
        return res.evaluations[d]

    if mode == "binary":
        lo, hi = 1, full  # the full depth reproduces the reference, so it always passes
        while lo < hi:
            mid = (lo + hi) // 2
            if q(mid) >= threshold:
                hi = mid
            else:
                lo = mid + 1
        res.depth = hi
    else:
        for d in range(1, full):
            q(d)
        passing = [d for d in range(1, full) if res.evaluations[d] >= threshold]
        res.depth = min(passing) if passing else full
        seq = [res.evaluations[d] for d in range(1, full)]
        res.monotone = all(a <= b for a, b in zip(seq, seq[1:]))
    res.reached = res.depth < full
    res.seconds = time.perf_counter() - t0
    return res


def depth_search_figure(res: DepthSearchResult, title: str = ""):
    """Quality against depth: every evaluated depth, the threshold and the chosen depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ds = sorted(res.evaluations)
    ax.plot(ds, [res.evaluations[d] for d in ds], "o-", label=f"{res.metric} vs full model")
    ax.axhline(res.threshold, color="r", ls="--", lw=1, label=f"threshold {res.threshold:g}")
    if res.reached:
        ax.axvline(res.depth, color="g", ls=":", lw=1, label=f"chosen depth {res.depth}")
    ax.set_xlabel(f"depth (full = {res.full_depth})")
    ax.set_ylabel(res.metric)
    ax.set_title(title or f"depth search ({res.mode}, {res.sampling_runs} sampling runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
