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
from diffslim.sample import SampleSpec, first_denoiser_call, sample

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
    # depths are whole numbers and only these were sampled: markers, no line through the depths in between
    ax.scatter(ds, [res.evaluations[d] for d in ds], zorder=3, label=f"{res.metric} vs the full model (evaluated)")
    ax.axhline(res.threshold, color="r", ls="--", lw=1, label=f"threshold {res.threshold:g}")
    if res.reached:
        ax.axvline(res.depth, color="g", ls=":", lw=1, label=f"chosen depth {res.depth}")
    ax.set_xticks(range(1, res.full_depth + 1))
    ax.set_xlim(0.5, res.full_depth + 0.5)
    ax.set_xlabel(f"depth (full = {res.full_depth})")
    ax.set_ylabel("PSNR (dB)" if res.metric == "psnr" else res.metric.upper())
    ax.set_title(title or f"depth search ({res.mode}, {res.sampling_runs} sampling runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------
# Multi-depth search (the paper's ablation): one depth for the noisy steps, another for the rest


@dataclass
class MultiDepthResult:
    """A depth per timestep range (``t >= split`` -> ``depth_high``, ``t < split`` -> ``depth_low``).

    ``evaluations`` maps ``(depth_high, depth_low)`` to quality; ``frontier`` lists, per evaluated
    ``depth_high``, the shallowest passing ``depth_low`` with its run MACs relative to the full model
    (``macs_ratio``); the chosen pair has the lowest ``macs_ratio``. ``steps_high``/``steps_low``
    count the sampling steps in each range.
    """

    metric: str
    threshold: float
    split: int
    full_depth: int
    steps_high: int
    steps_low: int
    depth_high: int
    depth_low: int
    reached: bool
    macs_ratio: float
    evaluations: dict = field(default_factory=dict)
    frontier: list = field(default_factory=list)
    depth_macs: dict = field(default_factory=dict)
    sampling_runs: int = 0
    seconds: float = 0.0

    def schedule(self) -> list[tuple[int, int]]:
        """``[(t_min, depth), ...]`` for ``multi_depth`` and the recipe's ``depth.schedule``."""
        return [(self.split, self.depth_high), (0, self.depth_low)]

    def to_json(self) -> dict:
        return {"metric": self.metric, "threshold": self.threshold, "split": self.split,
                "full_depth": self.full_depth, "steps_high": self.steps_high, "steps_low": self.steps_low,
                "depth_high": self.depth_high, "depth_low": self.depth_low, "reached": self.reached,
                "macs_ratio": self.macs_ratio, "frontier": self.frontier,
                "evaluations": [{"depth_high": h, "depth_low": lo, self.metric: q}
                                for (h, lo), q in sorted(self.evaluations.items())],
                "depth_macs_ratio": {d: m / self.depth_macs[self.full_depth] for d, m in sorted(self.depth_macs.items())},
                "sampling_runs": self.sampling_runs, "seconds": self.seconds}


def depth_macs(unet: torch.nn.Module, inputs: Optional[tuple[tuple, dict]] = None) -> dict[int, int]:
    """MACs of one denoiser call at every depth ``1..full``, on ``inputs`` ``(args, kwargs)`` (a call the
    pipeline really makes: ``diffslim.sample.first_denoiser_call``) or else the model's default inputs."""
    from diffslim.models.macs import count_macs, default_inputs

    args, kwargs = inputs if inputs is not None else default_inputs(unet)
    return {d: count_macs(depth_skip(unet, d), *args, **kwargs)[0] for d in range(1, max_depth(unet) + 1)}


def spec_timesteps(pipe, spec: SampleSpec) -> list[int]:
    """The timesteps ``spec`` samples with ``pipe``'s scheduler (its explicit list, else ``set_timesteps``)."""
    import copy

    if spec.timesteps is not None:
        return [int(t) for t in spec.timesteps]
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(spec.num_inference_steps)
    return [int(t) for t in sched.timesteps]


def multi_depth_quality(pipe, attr: str, spec: SampleSpec, reference: torch.Tensor, split: int, depth_high: int,
                        depth_low: int, metric: str = "psnr") -> float:
    """Quality against ``reference`` of ``pipe`` running ``depth_high`` for ``t >= split``, else ``depth_low``."""
    import copy

    from diffslim.methods.depth_skip import multi_depth

    unet = getattr(pipe, attr)
    variant = copy.copy(pipe)
    routed = multi_depth(depth_skip(unet, max_depth(unet)), [(split, depth_high), (0, depth_low)])
    setattr(variant, attr, routed)
    return METRICS[metric](sample(variant, spec), reference)


def check_split(split: int) -> int:
    """A ``--split`` between the two timestep ranges of a multi-depth search: a timestep in 1..999."""
    if not 0 < split <= 999:
        raise UserError(f"--split {split} must be a timestep in 1..999")
    return split


def search_multi_depth(pipe, attr: str, spec: SampleSpec, reference: torch.Tensor, threshold: float,
                       split: Optional[int] = None, metric: str = "psnr",
                       progress: Optional[Callable[[int, int, float], None]] = None) -> MultiDepthResult:
    """The two-range depth schedule of least run MACs whose quality stays >= ``threshold``.

    Quality rises with either depth, so the passing region's boundary is a staircase: walking
    ``depth_high`` up from 1, the shallowest passing ``depth_low`` only moves down, and the walk costs
    at most ``2 * full + 1`` sampling runs (the chosen pair is always measured). ``split`` (default: the timestep in the middle of the sampled
    list) separates the ranges. Every staircase point is priced in MACs; the cheapest wins.
    """
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    unet = getattr(pipe, attr)
    full = max_depth(unet)
    ts = spec_timesteps(pipe, spec)
    if split is None:
        split = ts[len(ts) // 2 - 1] if len(ts) > 1 else 0
    check_split(split)
    n_high = sum(t >= split for t in ts)
    n_low = len(ts) - n_high
    # priced on the call the pipeline makes for these inputs (SR works at its input's size, not sample_size)
    macs = depth_macs(unet, first_denoiser_call(pipe, spec))
    res = MultiDepthResult(metric, threshold, int(split), full, n_high, n_low, full, full, False, 1.0,
                           depth_macs=macs)
    t0 = time.perf_counter()

    def run_ratio(h: int, lo: int) -> float:
        return (n_high * macs[h] + n_low * macs[lo]) / (len(ts) * macs[full])

    def q(h: int, lo: int) -> float:
        if (h, lo) == (full, full):
            return float("inf")  # the full model reproduces the reference
        if (h, lo) not in res.evaluations:
            res.evaluations[(h, lo)] = multi_depth_quality(pipe, attr, spec, reference, split, h, lo, metric)
            res.sampling_runs += 1
            if progress is not None:
                progress(h, lo, res.evaluations[(h, lo)])
        return res.evaluations[(h, lo)]

    lo, passed = full, False
    for h in range(1, full + 1):
        # once (h-1, lo) passed, (h, lo) passes too (quality rises with depth): no run needed
        if not passed:
            if q(h, lo) < threshold:
                continue
            passed = True
        while lo > 1 and q(h, lo - 1) >= threshold:
            lo -= 1
        res.frontier.append({"depth_high": h, "depth_low": lo, "macs_ratio": run_ratio(h, lo)})
    while True:
        best = min(res.frontier, key=lambda r: (r["macs_ratio"], -r["depth_high"]))
        # the chosen pair is always measured; if the rising-quality assumption failed there, drop it
        if q(best["depth_high"], best["depth_low"]) >= threshold:
            break
        res.frontier.remove(best)
    for r in res.frontier:
        r[metric] = res.evaluations.get((r["depth_high"], r["depth_low"]))
    res.depth_high, res.depth_low, res.macs_ratio = best["depth_high"], best["depth_low"], best["macs_ratio"]
    res.reached = res.macs_ratio < 1.0
    res.seconds = time.perf_counter() - t0
    return res
