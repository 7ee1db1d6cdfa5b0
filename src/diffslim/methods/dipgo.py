"""DiP-GO (Zhu et al., NeurIPS 2024): a few-step gradient-optimized pruner that learns a skip plan.

The pruner holds one learnable query of width ``D`` per (step, unit); a self-attention layer mixes
the queries of the units of each step, an MLP and a 2-way head give keep/skip logits per (step,
unit). Hard gates with a straight-through estimator switch the units of the skip-plan runtime
(``diffslim.methods.skip_plan``): a gated unit outputs ``g * fresh + (1 - g) * cache`` and refreshes
its cache with that value, which equals the hard plan's value for 0/1 gates while carrying gradients
to ``g``. The pruner starts by keeping everything.

Losses: consistency between the full and the gated model's final outputs (``1 - SSIM`` by default;
``l1``, ``l2``, ``ssim+l1``) plus ``alpha`` times the kept MACs share (dependencies included: a
unit's share counts the units it forces to run, via ``effective_plan_soft``); once the kept share is
below the target budget ``1 - R``, only the consistency loss acts.

Objectives: ``unrolled`` (the paper's: the whole sampling trajectory with gradients through every
gate, each step under gradient checkpointing) or ``local`` (Learning-to-Cache's cheaper objective:
each step starts from the full model's state and caches at the previous step, and its noise
prediction is compared with the full model's at the same step).

Post-processing: the keep probabilities are turned into a plan meeting a MACs reduction ``R``
(the plan's MACs ``<= (1 - R)`` x the full model's, our reading of the paper's pruning ratio) by
a binary search over the threshold, then topped up towards the budget pair by pair in score order
(:func:`plan_from_scores`); step 0 stays full. MACs shares are measured on the denoiser call the
pipeline makes for the training inputs (``plan_units_at``), not at the config's sample size.

Three training refinements, not in the paper, off in ``DipgoConfig``'s defaults and on in the bench's
(``diffslim.bench.DEFAULT_DIPGO``), because on the zoo the paper's schedule is at the mercy of its
seed: ``anneal`` lowers the sparsity floor from 1 to the target over N steps, so units are pruned in
the order the consistency loss ranks them rather than all at once; ``select`` post-processes the
scores of every step to a plan, scores it on a fixed validation batch (training inputs, unseen noise)
and keeps the best; ``restarts`` trains several pruners from successive seeds and keeps the one that
validates best.

Baselines at the same evaluation budget: random search and a genetic algorithm over plans at the
same MACs ratio (:func:`search_plan`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffslim.errors import Interrupted, UserError
from diffslim.methods.skip_plan import (
    PlanState, PlanUnits, apply_skip_plan, check_scheduler, deepcache_plan, effective_plan, effective_plan_soft, full_plan, pad_plan,
    plan_macs_ratio, plan_units, plan_units_at, remove_skip_plan,
)
from diffslim.train.data import pipeline_inputs
from diffslim.train.stop import StopOnSignal, say

__all__ = ["Pruner", "DipgoConfig", "DipgoResult", "train_dipgo", "plan_from_scores", "search_plan",
           "plan_psnr_fn", "LOSSES", "OBJECTIVES", "check_ratio"]

LOSSES = ("ssim", "l1", "l2", "ssim+l1")
OBJECTIVES = ("unrolled", "local")


def check_ratio(ratio: float) -> float:
    """``ratio`` if it lies in (0, 1), else a :class:`UserError`."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"ratio must be a number in (0, 1), got {ratio!r}") from None
    if not 0 < r < 1:
        raise UserError(f"ratio must lie in (0, 1) (the share of MACs removed, e.g. 0.8), got {r:g}")
    return r


INITS = ("keep", "steps", "deepcache")


def prior_plan(init: str, units: PlanUnits, num_steps: int, ratio: float) -> Optional[np.ndarray]:
    """The plan a pruner starts from: None for ``keep`` (every gate open, as in the paper); ``steps``:
    whole steps evenly spread (step 0 included) and nothing in between, as many as the MACs budget
    ``1 - ratio`` allows (on a U-Net an idle step reuses the last output: fewer steps on the same grid);
    ``deepcache``: the DeepCache plan (branch 0) with the smallest interval within the budget."""
    if init == "keep":
        return None
    budget = 1.0 - check_ratio(ratio)
    best = None
    if init == "steps":
        for n in range(1, num_steps + 1):
            plan = np.zeros((num_steps, len(units)), dtype=bool)
            plan[np.unique(np.floor(np.arange(n) * num_steps / n).astype(int))] = True
            if plan_macs_ratio(plan, units) <= budget + 1e-12:
                best = plan
    elif init == "deepcache":
        if units.family == "transformer":
            raise UserError("init deepcache needs a U-Net; use keep or steps")
        for k in range(1, num_steps + 1):  # the MACs fall as the interval grows: the first that fits
            plan = deepcache_plan(units, num_steps, k, 0)
            if plan_macs_ratio(plan, units) <= budget + 1e-12:
                best = plan
                break
    else:
        raise UserError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
    if best is None:
        raise UserError(f"init {init}: no such plan within {budget:.3f} of the MACs at {num_steps} steps")
    return best


class Pruner(nn.Module):
    """Queries ``(T, U, D)`` -> [self-attention across units of each step] -> MLP -> logits ``(T, U, 2)``.

    ``self_attention=False`` drops the attention layer (the ablation). Logit 1 is "keep"; the head's
    bias starts at ``keep_bias`` for keep, so every gate starts open. ``prior`` ``(T, U)`` bools (a warm
    start, not in the paper): a fixed offset of ``-2 * keep_bias`` on the keep logit where the prior
    plan skips, so the gates start as that plan and training moves them from there.
    """

    def __init__(self, num_steps: int, num_units: int, width: int = 64, heads: int = 4,
                 self_attention: bool = True, keep_bias: float = 2.0, prior: Optional[np.ndarray] = None):
        super().__init__()
        offset = torch.zeros(num_steps, num_units)
        if prior is not None:
            offset = torch.where(torch.as_tensor(np.asarray(prior, dtype=bool)), 0.0, -2.0 * keep_bias)
        self.register_buffer("prior_offset", offset, persistent=False)
        self.queries = nn.Parameter(torch.randn(num_steps, num_units, width) * 0.02)
        self.unit_embed = nn.Parameter(torch.randn(1, num_units, width) * 0.02)
        self.self_attention = self_attention
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True) if self_attention else None
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 2)
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.copy_(torch.tensor([0.0, keep_bias]))

    def forward(self) -> torch.Tensor:
        """Logits ``(T, U, 2)``: index 1 keeps the unit."""
        h = self.queries + self.unit_embed
        if self.attn is not None:
            a = self.norm1(h)
            h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        logits = self.head(h)
        return torch.stack([logits[..., 0], logits[..., 1] + self.prior_offset], dim=-1)

    def keep_prob(self) -> torch.Tensor:
        """``(T, U)`` probabilities of keeping each unit (the importance scores)."""
        return self().softmax(-1)[..., 1]


class _HardGate(torch.autograd.Function):
    """Forward: exactly 0/1 (``p > 0.5``); backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx, p):
        return (p > 0.5).to(p.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def straight_through_gates(logits: torch.Tensor, generator: Optional[torch.Generator] = None,
                           tau: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """Hard 0/1 gates ``(T, U)`` from logits ``(T, U, 2)``, with the keep probability's gradient; step 0 is 1.

    The forward values are exactly 0 or 1 (not ``hard + p - p.detach()``, which rounds), so the gated
    model computes exactly what the hard plan does. With a ``generator``, Gumbel noise is added to the
    logits first (straight-through Gumbel-softmax at temperature ``tau``): while every gate is still
    open, the consistency loss is exactly 0 with a zero gradient (the full model is its own optimum);
    sampled gates close a few units at random, so each unit's effect on the output is measured from
    the first step. ``scale`` multiplies the noise: 1 samples each gate with its keep probability, less
    explores less (the hard values do not depend on ``tau``, only the gradient's slope does).
    """
    if generator is not None:
        u = torch.rand(logits.shape, generator=generator).clamp_(1e-9, 1 - 1e-9).to(logits.device)
        logits = (logits - scale * torch.log(-torch.log(u)).to(logits.dtype)) / tau
    g = _HardGate.apply(logits.softmax(-1)[..., 1])
    return torch.cat([torch.ones_like(g[:1]), g[1:]], dim=0)


def plan_from_scores(scores, units: PlanUnits, ratio: float, fill: bool = True) -> np.ndarray:
    """The plan ``scores >= threshold`` (step 0 full) with the lowest threshold whose MACs are within
    ``1 - ratio``, then (``fill``) topped up towards the budget.

    ``scores``: ``(T, U)`` importance (higher = keep). Binary search over the sorted distinct scores;
    raises :class:`UserError` when even the plan that runs only step 0 in full exceeds the budget.
    A threshold moves in jumps: the next lower one may switch on a unit together with the units it
    forces to run and overshoot the budget by far. ``fill`` then walks the remaining (step, unit)
    pairs from the highest score down and keeps each one whose plan still fits, so the plan meets the
    budget as closely as the scores' order allows.
    """
    s = np.asarray(scores, dtype=np.float64)
    budget = 1.0 - check_ratio(ratio)
    cand = np.unique(s[1:])
    top = np.zeros_like(s, dtype=bool)
    top[0] = True

    def plan_at(i: int) -> np.ndarray:  # i == len(cand): nothing beyond step 0
        p = s >= cand[i] if i < len(cand) else np.zeros_like(s, dtype=bool)
        p[0] = True
        return p

    if plan_macs_ratio(plan_at(len(cand)), units) > budget + 1e-12:
        raise UserError(f"ratio {ratio:g} is out of reach: step 0 in full plus the parts outside the units already "
                        f"cost {plan_macs_ratio(top, units):.3f} of the full MACs")
    lo, hi = 0, len(cand)  # find the smallest i with macs(plan_at(i)) <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if plan_macs_ratio(plan_at(mid), units) <= budget + 1e-12:
            hi = mid
        else:
            lo = mid + 1
    plan = plan_at(lo)
    if not fill:
        return plan
    macs = plan_macs_ratio(plan, units)
    while True:  # passes: a pair that would not run (its consumers skipped) may run once a consumer does
        added = False
        rest = np.flatnonzero(~plan[1:].ravel())
        for flat in rest[np.argsort(-s[1:].ravel()[rest], kind="stable")]:
            k, u = divmod(int(flat), s.shape[1])
            plan[1 + k, u] = True
            new = plan_macs_ratio(plan, units)
            if macs < new <= budget + 1e-12:  # runs, and fits
                macs, added = new, True
            else:  # over the budget, or would not run at all: left out
                plan[1 + k, u] = False
        if not added:
            return plan


# ------------------------------------------------------------------------------------------------
# Differentiable sampling of the zoo pipelines


class _Trajectory:
    """The sampling loop of a zoo pipeline for a fixed batch of inputs, with the denoiser under a plan runtime.

    Reproduces ``ZooClassPipeline``/``ZooSRPipeline.__call__`` exactly (same noise per seed, same CFG,
    same scheduler), but differentiably and with per-step control of the runtime's state.
    """

    def __init__(self, pipe, inputs: list[dict], seeds: list[int], num_steps: int, scheduler: Optional[str],
                 call_kwargs: Optional[dict] = None):
        from diffusers.utils.torch_utils import randn_tensor

        from diffslim.sample import make_scheduler
        from diffslim.zoo.pipelines import ZooClassPipeline, ZooSRPipeline

        self.pipe = pipe
        kw = dict(call_kwargs or {})
        self.sched = make_scheduler(scheduler, pipe.scheduler.config) if scheduler else \
            type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.num_steps = num_steps
        den = pipe.denoiser
        dtype = den.dtype
        self.device = device = den.device
        # the noise is drawn on the CPU and moved, as the pipelines draw it: the same samples on every device
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            if isinstance(pipe, ZooClassPipeline):
                self.kind = "class"
                labels = torch.tensor([int(i["class_label"]) for i in inputs], device=device)
                size, ch = den.config.sample_size, den.config.in_channels
                lat = randn_tensor((len(labels), ch, size, size), generator=gens, device=device, dtype=dtype)
                self.guidance = float(kw.get("guidance_scale", 3.0))
                null = torch.full_like(labels, pipe.null_label)
                self.labels = torch.cat([null, labels]) if self.guidance > 1.0 else labels
                self.ctx = pipe.cond_encoder(self.labels).to(dtype) if pipe.cond_encoder is not None else None
            elif isinstance(pipe, ZooSRPipeline):
                self.kind = "sr"
                lr = torch.stack([i["image"] for i in inputs]).to(device=device, dtype=torch.float32)
                self.up = pipe.upsample(lr, int(pipe.config.upscale))
                self.cond = (self.up * 2 - 1).to(dtype)
                lat = randn_tensor(tuple(self.cond.shape), generator=gens, device=device, dtype=dtype)
                self.ctx = pipe.cond_encoder(torch.zeros(len(inputs), dtype=torch.long, device=device)).to(dtype)
            else:
                raise UserError(f"DiP-GO training drives the zoo pipelines' sampling loop; {type(pipe).__name__} "
                                "is not one (use a zoo:NAME model or a zoo pipeline folder)")
        self.latents = lat * self.sched.init_noise_sigma

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """One denoising step's noise prediction ``(B, C, H, W)`` (CFG combined)."""
        den = self.pipe.denoiser
        xin = self.sched.scale_model_input(x, t)
        if self.kind == "sr":
            tt = torch.as_tensor(t, device=x.device).expand(x.shape[0])
            return den(torch.cat([xin, self.cond], 1), tt, encoder_hidden_states=self.ctx).sample
        cfg = self.guidance > 1.0
        xx = torch.cat([xin, xin]) if cfg else xin
        tt = torch.as_tensor(t, device=x.device).expand(xx.shape[0])
        if self.ctx is not None:
            e = den(xx, tt, encoder_hidden_states=self.ctx).sample
        else:
            e = den(xx, tt, class_labels=self.labels).sample
        if cfg:
            eu, ec = e.chunk(2)
            e = eu + self.guidance * (ec - eu)
        return e

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Final images ``(B, C, H, W)`` in [0, 1], as the pipeline returns them."""
        if self.kind == "sr":
            hr = self.up + x.float() / float(self.pipe.config.residual_scale) / 2
            return hr.clamp(0, 1)
        return ((x + 1) / 2).clamp(0, 1)

    def timesteps(self):
        self.sched.set_timesteps(self.num_steps, device=self.device)
        return list(self.sched.timesteps)

    def run(self, state, gates: Optional[torch.Tensor] = None, checkpoint: bool = True,
            record: bool = False):
        """Sample the batch; returns images (and, with ``record``, per-step ``(x, eps, caches)``)."""
        from torch.utils.checkpoint import checkpoint as ckpt

        state.manual = True
        state.gates = gates
        caches: dict = {}
        x = self.latents
        rec = []
        ts = self.timesteps()
        if len(ts) != self.num_steps:
            raise UserError(f"the scheduler runs {len(ts)} denoiser calls for {self.num_steps} steps; "
                            "DiP-GO training needs one call per step (ddim, dpm++, euler, unipc)")
        try:
            for k, t in enumerate(ts):
                def step_fn(x_, caches_, k=k, t=t):
                    # everything the step reads is set here: checkpointing recomputes it during backward
                    state.manual, state.gates, state.step = True, gates, k
                    state.caches = dict(caches_)
                    e = self.eps(x_, t)
                    return e, state.caches

                if checkpoint and gates is not None and torch.is_grad_enabled():
                    e, caches = ckpt(step_fn, x, caches, use_reentrant=False)
                else:
                    e, caches = step_fn(x, caches)
                if record:
                    rec.append((x, e, caches))
                x = self.sched.step(e, t, x).prev_sample
        finally:
            state.manual = False
            state.gates = None
            state.reset()
        out = self.finish(x)
        return (out, rec) if record else out


class _PipelineTrajectory:
    """Any diffusers pipeline's own sampling loop for a fixed batch of inputs, differentiably.

    The pipeline runs as it always does (its prompt encoding, guidance, scheduler and VAE decoding), with
    autograd on and ``output_type="pt"`` (``run_pipeline(..., differentiable=True)``); the plan runtime's
    head hook tracks the step by timestep and, with ``checkpoint``, checkpoints each denoiser call.
    """

    def __init__(self, pipe, inputs: list[dict], seeds: list[int], num_steps: int, scheduler: Optional[str],
                 call_kwargs: Optional[dict] = None):
        from diffslim.sample import SampleSpec

        self.pipe = pipe
        self.spec = SampleSpec(list(inputs), list(seeds), num_inference_steps=num_steps, scheduler=scheduler,
                               call_kwargs=dict(call_kwargs or {}), batch_size=len(inputs))

    def run(self, state, gates: Optional[torch.Tensor] = None, checkpoint: bool = True) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] of the batch under ``gates`` (None: the installed plan)."""
        from diffslim.sample import run_pipeline

        state.reset()
        state.gates, state.checkpoint = gates, bool(checkpoint)
        try:
            return run_pipeline(self.pipe, self.spec, list(range(len(self.spec.inputs))),
                                differentiable=gates is not None and torch.is_grad_enabled())
        finally:
            state.gates, state.checkpoint = None, False
            state.reset()


def _trajectory(pipe, inputs, seeds, cfg) -> Any:
    from diffslim.zoo.pipelines import ZooClassPipeline, ZooSRPipeline

    if isinstance(pipe, (ZooClassPipeline, ZooSRPipeline)):
        return _Trajectory(pipe, inputs, seeds, cfg.num_inference_steps, cfg.scheduler)
    if cfg.objective != "unrolled":
        raise UserError("the local (Learning-to-Cache) objective drives the zoo pipelines' loop step by step; "
                        f"for {type(pipe).__name__} use the unrolled objective")
    return _PipelineTrajectory(pipe, inputs, seeds, cfg.num_inference_steps, cfg.scheduler, cfg.call_kwargs)


def consistency_loss(pred: torch.Tensor, ref: torch.Tensor, kind: str = "ssim") -> torch.Tensor:
    """Loss between the gated and the full model's images ``(B, C, H, W)`` in [0, 1]: a scalar."""
    from diffslim.measure.quality import ssim

    if kind == "ssim":
        return 1 - ssim(pred, ref).mean()
    if kind == "l1":
        return (pred - ref).abs().mean()
    if kind == "l2":
        return ((pred - ref) ** 2).mean()
    if kind == "ssim+l1":
        return 1 - ssim(pred, ref).mean() + (pred - ref).abs().mean()
    raise UserError(f"unknown loss {kind!r}; accepted: {', '.join(LOSSES)}")


def sparsity_floor(step: int, ratio: float, anneal: int = 0) -> float:
    """The kept MACs share below which the sparsity loss stops acting, at optimizer step ``step`` (0-based).

    ``anneal`` 0: the target ``1 - ratio`` from the start (the paper). ``anneal`` N > 0 (not in the paper):
    the floor falls linearly from 1 to the target over the first N steps, so units are pruned gradually,
    in the order the consistency loss ranks them, rather than all at once when the shared sparsity push
    carries every gate across the threshold together.
    """
    target = 1.0 - ratio
    if anneal <= 0:
        return target
    return max(target, 1.0 - ratio * min(1.0, (step + 1) / anneal))


def kept_macs(eff: torch.Tensor, units: PlanUnits) -> torch.Tensor:
    """The MACs share ``(scalar)`` of the denoiser calls under effective gates ``eff`` ``(T, U)``
    (``effective_plan_soft`` of the gates: dependencies included)."""
    macs = torch.tensor(units.macs, dtype=eff.dtype, device=eff.device)
    outside = torch.full_like(eff[:, 0], float(units.outside_macs))
    if units.reuse_output:  # a step with no unit running is not called at all (``plan_macs_ratio``)
        outside = outside * (1 - torch.prod(1 - eff, dim=1))
    if units.stem:  # the patch embedding runs only where the first block does (``plan_macs_ratio``)
        skip0 = torch.cat([torch.zeros_like(eff[:1, 0]), 1 - eff[1:, 0]])
        outside = outside - float(units.stem_macs) * skip0
    per_step = (outside + (eff * macs).sum(1)) / units.total_macs
    return per_step.mean()


# ------------------------------------------------------------------------------------------------
# Training


@dataclass
class DipgoConfig:
    """Settings of one DiP-GO run (``iters`` optimizer steps on batches of ``batch_size`` inputs)."""

    ratio: float = 0.8
    num_inference_steps: int = 50
    scheduler: Optional[str] = None
    loss: str = "ssim"
    alpha: float = 1.0
    iters: int = 60
    batch_size: int = 4
    lr: float = 1e-2
    width: int = 64
    heads: int = 4
    self_attention: bool = True
    gumbel: bool = True
    gumbel_scale: float = 1.0  # scale of the Gumbel noise on the gates (1: sampled with their keep probability)
    keep_bias: float = 3.0
    init: str = "keep"  # "keep" (the paper: every gate open), "steps" or "deepcache" (warm starts)
    objective: str = "unrolled"
    granularity: str = "fine"
    gradient_checkpointing: bool = True
    seed: int = 0
    data: str = "zoo"
    call_kwargs: dict = field(default_factory=dict)  # extra pipeline arguments (e.g. guidance_scale)
    checkpoint_every: int = 20
    anneal: int = 0  # optimizer steps over which the sparsity floor falls from 1 to 1 - ratio (0: at once)
    average_scores: bool = False  # importance = keep probability averaged over the steps (else: the last step's)
    select: int = 0  # > 0: validation inputs; the scores kept are those whose plan scored best on them
    restarts: int = 1  # pruners trained from seeds seed, seed + 1, ...; the best on validation is kept
    val_seed: Optional[int] = None  # the validation batch's seed (default: seed), shared by the restarts
    out: Optional[str] = None
    progress: bool = True

    def check(self) -> "DipgoConfig":
        check_ratio(self.ratio)
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss {self.loss!r}; accepted: {', '.join(LOSSES)}")
        if self.init not in INITS:
            raise UserError(f"unknown init {self.init!r}; accepted: {', '.join(INITS)}")
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; accepted: {', '.join(OBJECTIVES)}")
        for key, option, low in (("iters", "--iters", 1), ("batch_size", "--batch-size", 1),
                                 ("num_inference_steps", "--steps", 2)):
            if getattr(self, key) < low:
                raise UserError(f"{key} ({option}) must be at least {low}, not {getattr(self, key)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UserError(f"lr (--lr) must be a number > 0, not {self.lr}")
        if not self.alpha >= 0 or not math.isfinite(self.alpha):
            raise UserError(f"alpha (--alpha, the sparsity loss's weight) must be a number >= 0, not {self.alpha}")
        if self.gumbel_scale < 0:
            raise UserError(f"gumbel_scale must be >= 0 (the gates' Gumbel noise scale), got {self.gumbel_scale}")
        if self.checkpoint_every < 1:
            raise UserError(f"checkpoint_every must be >= 1 optimizer steps, got {self.checkpoint_every}")
        if self.select < 0:
            raise UserError(f"select must be >= 0 validation inputs (0: keep the last scores), got {self.select}")
        if self.restarts < 1 or (self.restarts > 1 and self.select < 1):
            raise UserError(f"restarts must be >= 1, and more than 1 needs select >= 1 validation inputs to choose "
                            f"between them (got restarts={self.restarts}, select={self.select})")
        if self.anneal < 0:
            raise UserError(f"anneal must be >= 0 optimizer steps (0: the target floor at once), got {self.anneal}")
        return self


@dataclass
class DipgoResult:
    """A trained pruner's scores ``(T, U)``, the plan for the ratio, its MACs ratio, the log and the time."""

    scores: np.ndarray
    plan: np.ndarray
    macs_ratio: float
    units: PlanUnits
    seconds: float
    log: list = field(default_factory=list)
    config: Optional[DipgoConfig] = None
    restart: Optional[int] = None  # with restarts: which one was kept

    def provenance(self) -> dict:
        cfg = asdict(self.config) if self.config is not None else {}
        cfg.pop("progress", None)
        cfg.pop("out", None)
        extra = {} if self.restart is None else {"kept_restart": self.restart}
        return {"method": "dipgo", "macs_ratio": round(self.macs_ratio, 6), "train_seconds": round(self.seconds, 1),
                "final": self.log[-1] if self.log else None, **extra, **{k: v for k, v in cfg.items()}}


def _batch(pool: list, step: int, size: int, seed: int, rank: int = 0, world: int = 1):
    """The inputs and noise seeds of optimizer step ``step`` (a function of the step: exact resume)."""
    rng = np.random.default_rng([seed, step])
    idx = rng.integers(0, len(pool), size=size * world)[rank * size:(rank + 1) * size]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=size * world)[rank * size:(rank + 1) * size]]
    return [pool[i] for i in idx], seeds


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


# settings a resumed run may change: how long it trains, how often it checkpoints, whether it shows a bar
_RESUMABLE = ("iters", "checkpoint_every", "out", "progress", "gradient_checkpointing")


def _resume_settings(cfg: DipgoConfig, n_units: int, rows: Optional[int] = None) -> str:
    """What a checkpoint must have been trained with to be resumed by ``cfg`` (JSON, compared as text); ``rows``:
    the plan's rows where the run makes fewer calls than steps (img2img below strength 1)."""
    d = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE}
    extra = {"rows": rows} if rows is not None and rows < cfg.num_inference_steps else {}
    return json.dumps({**d, "units": n_units, **extra}, sort_keys=True, default=str)


def _check_resume(out: Path, saved: Optional[str], now: str) -> None:
    """Refuse to resume the pruner in ``out`` with other settings (a ratio, steps, seed, loss ... of another run):
    its checkpoint would continue another run's training, or not load."""
    if saved is None or saved == now:  # checkpoints from before settings were recorded: nothing to compare
        return
    a, b = json.loads(saved), json.loads(now)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    raise UserError(f"{out} holds a pruner trained with " + ", ".join(f"{k}={a.get(k)}" for k in diff)
                    + "; this run has " + ", ".join(f"{k}={b.get(k)}" for k in diff)
                    + ": resume with the same settings, or give a fresh --out (or --run-dir)"
                    + (f" (--anneal defaults to --iters: to train this run longer, give --anneal {a['anneal']})"
                       if diff == ["anneal"] else ""))


def train_dipgo(pipe, cfg: DipgoConfig, units: Optional[PlanUnits] = None,
                callback: Optional[Callable[[int, dict], None]] = None, pool=None) -> DipgoResult:
    """Train a DiP-GO pruner for ``pipe``'s denoiser and post-process its scores to a plan for ``cfg.ratio``.

    With ``cfg.out`` set, a checkpoint (pruner, optimizer, log) is written every ``checkpoint_every``
    steps to ``out/checkpoints/step_N.pt``; running again with the same ``out`` resumes from the
    last one and gives exactly the result of an uninterrupted run (batches are a function of the
    step and the seed). Data parallel under ``accelerate launch`` (each process its share of a batch).
    ``pool``: the training inputs (a list of pipeline input dicts) in place of ``cfg.data``.
    """
    from diffslim import launch
    from diffslim.models.load import denoiser_of

    cfg.check()
    den = denoiser_of(pipe)
    given_pool = pool
    pool = pipeline_inputs(pipe, cfg.data, cfg.seed) if pool is None else pool
    from diffslim.sample import SampleSpec, denoiser_calls_per_run

    first = SampleSpec([pool[0]], [cfg.seed], num_inference_steps=cfg.num_inference_steps, scheduler=cfg.scheduler,
                       call_kwargs=dict(cfg.call_kwargs), batch_size=1)
    if units is None:  # MACs measured on the call the training inputs make (size, context, guidance batch)
        units = plan_units_at(pipe, first, cfg.granularity)
    if cfg.scheduler is not None:
        from diffslim.sample import make_scheduler

        check_scheduler(make_scheduler(cfg.scheduler, pipe.scheduler.config), cfg.num_inference_steps,
                        cfg.num_inference_steps, cfg.scheduler)
    if cfg.restarts > 1:
        return _train_restarts(pipe, cfg, units, callback, given_pool)
    # the plan's rows are the denoiser calls a run makes: an image-to-image run at strength s < 1 makes only
    # int(steps * s) of them (its first rows); the budget is of those, and the rows after them keep every unit
    rows = min(cfg.num_inference_steps, denoiser_calls_per_run(pipe, first.replace(
        inputs=list(pool), seeds=[cfg.seed] * len(pool))))
    torch.manual_seed(cfg.seed)
    pruner = Pruner(rows, len(units), cfg.width, cfg.heads, cfg.self_attention, cfg.keep_bias,
                    prior=prior_plan(cfg.init, units, rows, cfg.ratio))
    # low first-moment decay: the sparsity push stops at the budget, momentum should not carry it far below
    opt = torch.optim.Adam(pruner.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    # like diffslim's other trainers: on this process's GPU when torch sees one, else on the CPU; the pipeline
    # moves there for the training and back to where it was afterwards
    acc = launch.accelerator()
    home = den.device
    pruner, opt = acc.prepare(pruner, opt)
    raw = acc.unwrap_model(pruner)
    # every model of the pipeline is frozen while the pruner trains (the gradient only needs to pass through)
    frozen = [(p, p.requires_grad) for m in pipe.components.values() if isinstance(m, nn.Module)
              for p in m.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    rt = apply_skip_plan(den, full_plan(cfg.num_inference_steps, len(units)), units)
    out = Path(cfg.out) if cfg.out else None
    settings = _resume_settings(cfg, len(units), rows)
    start, log, seconds = 0, [], 0.0
    score_sum = torch.zeros(rows, len(units), dtype=torch.float64)
    best = {"val": float("inf"), "scores": None, "step": 0}
    if out is not None:
        existing = _checkpoints(out)
        if existing:
            # tensors, numbers and lists only: no unpickling; onto the CPU, so a run resumes on another device
            ck = torch.load(existing[-1], weights_only=True, map_location="cpu")
            _check_resume(out, ck.get("settings"), settings)
            raw.load_state_dict(ck["pruner"])
            opt.load_state_dict(ck["opt"])
            start, log, seconds = ck["step"], ck["log"], ck["seconds"]
            if start > cfg.iters:  # it would post-process the longer run's scores as this one's
                raise UserError(f"{out} holds a pruner trained to step {start}, past --iters {cfg.iters}: give "
                                f"--iters {start} or more to go on from it, or another --out (or --run-dir)")
            score_sum = ck.get("score_sum", score_sum)
            best = ck.get("best", best)
            say(acc, f"resumed from {existing[-1]} at step {start}")
    if rows < cfg.num_inference_steps:
        say(acc, f"dipgo: a run of {cfg.num_inference_steps} steps makes {rows} denoiser calls (its strength's "
                  f"share): the plan is trained for those, the budget is theirs, and its last "
                  f"{cfg.num_inference_steps - rows} rows, which never run, keep every unit")
    progress = None
    if cfg.progress and acc.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.iters, initial=start, desc=f"dipgo R={cfg.ratio:g} seed {cfg.seed}",
                        dynamic_ncols=True)
    val = None
    try:
        if home != acc.device:
            pipe.to(acc.device)
        if cfg.select:  # a fixed validation batch: training inputs with noise seeds no training step draws
            vseed = cfg.seed if cfg.val_seed is None else cfg.val_seed
            vpool = pool if given_pool is not None or vseed == cfg.seed else pipeline_inputs(pipe, cfg.data, vseed)
            rng = np.random.default_rng([vseed, 2**31])
            val_traj = _trajectory(pipe, [vpool[i % len(vpool)] for i in range(cfg.select)],
                                   [int(x) for x in rng.integers(2**31, 2**32, size=cfg.select)], cfg)
            with torch.no_grad():
                val = (val_traj, val_traj.run(rt.state), {})
        t0 = time.perf_counter()
        # Ctrl-C or SIGTERM: a checkpoint at this step, then Interrupted (only with a folder to resume from)
        with StopOnSignal("dipgo", enabled=out is not None) as stop:
            for step in range(start, cfg.iters):
                inputs, seeds = _batch(pool, step, cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes)
                traj = _trajectory(pipe, inputs, seeds, cfg)
                # the runtime runs the effective plan (units whose consumers are all skipped are skipped too),
                # so the gates that switch the units are the effective ones: same values as the hard plan
                noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step) if cfg.gumbel else None
                gates, kept = _gates_and_kept(pruner(), noise, units, cfg.gumbel_scale)
                if cfg.objective == "unrolled":
                    with torch.no_grad():
                        ref = traj.run(rt.state)
                    pred = traj.run(rt.state, gates=gates, checkpoint=cfg.gradient_checkpointing)
                    cons = consistency_loss(pred, ref, cfg.loss)
                else:
                    cons = _local_loss(traj, rt.state, gates)
                floor = sparsity_floor(step, cfg.ratio, cfg.anneal)
                sparse = kept if float(kept.detach()) > floor else kept.detach() * 0
                loss = cons + cfg.alpha * sparse
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                opt.step()
                with torch.no_grad():
                    hard_kept = float(kept)
                    score_sum += raw.keep_prob().detach().cpu().double()
                rec = {"step": step + 1, "loss": float(loss.detach()), "consistency": float(cons.detach()),
                       "kept_macs": hard_kept}
                if val is not None:
                    cur = score_sum / (step + 1) if cfg.average_scores else raw.keep_prob().detach().cpu().double()
                    rec["val"] = _validation_loss(val, cur.numpy(), units, cfg, rt.state)
                    if rec["val"] < best["val"]:
                        best = {"val": rec["val"], "scores": cur.clone(), "step": step + 1}
                log.append(rec)
                if callback is not None:
                    callback(step + 1, rec)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(cons=f"{rec['consistency']:.4f}", kept=f"{hard_kept:.3f}",
                                         **({"val": f"{rec['val']:.4f}"} if "val" in rec else {}))
                stopped = stop.requested(acc) and step + 1 < cfg.iters
                if out is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.iters or stopped) \
                        and acc.is_main_process:
                    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
                    tmp = out / "checkpoints" / f".step_{step + 1}.tmp"
                    torch.save({"pruner": raw.state_dict(), "opt": opt.state_dict(), "step": step + 1, "log": log,
                                "seconds": seconds + time.perf_counter() - t0, "score_sum": score_sum, "best": best,
                                "settings": settings}, tmp)
                    tmp.rename(out / "checkpoints" / f"step_{step + 1}.pt")
                if stopped:
                    acc.wait_for_everyone()  # the checkpoint is written before any process raises
                    raise Interrupted("dipgo", stop.signum, step + 1, cfg.iters, out / "checkpoints" / f"step_{step + 1}.pt")
    finally:
        if progress is not None:
            progress.close()
        remove_skip_plan(den)
        for p, flag in frozen:
            p.requires_grad_(flag)
        if den.device != home:
            pipe.to(home)
    seconds += time.perf_counter() - t0
    with torch.no_grad():
        if best["scores"] is not None:
            scores = best["scores"].numpy()
        else:
            scores = (score_sum / cfg.iters if cfg.average_scores else raw.keep_prob().detach().cpu().double()).numpy()
    plan = pad_plan(plan_from_scores(scores, units, cfg.ratio), cfg.num_inference_steps)
    res = DipgoResult(scores, plan, plan_macs_ratio(plan, units, rows), units, seconds, log, cfg)
    if acc.is_main_process:
        _write_result(res, out)
    return res


def _write_result(res: DipgoResult, out: Optional[Path]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "scores.npy", res.scores)
    (out / "result.json").write_text(json.dumps({"provenance": res.provenance(), "units": list(res.units.names),
                                                 "plan": res.plan.astype(int).tolist()}, default=str))


def _train_restarts(pipe, cfg: DipgoConfig, units: PlanUnits, callback, pool) -> DipgoResult:
    """``cfg.restarts`` pruners from seeds ``seed + k``, each in ``out/restart_k`` (each resumes on its own),
    all validated on the same batch; the one whose best plan has the lowest validation loss is kept."""
    from dataclasses import replace

    runs = []
    for k in range(cfg.restarts):
        sub = replace(cfg, restarts=1, seed=cfg.seed + k, val_seed=cfg.seed if cfg.val_seed is None else cfg.val_seed,
                      out=str(Path(cfg.out) / f"restart_{k}") if cfg.out else None)
        runs.append(train_dipgo(pipe, sub, units, callback, pool))
    vals = [min(r["val"] for r in run.log) for run in runs]
    k = int(np.argmin(vals))
    best = runs[k]
    log = [dict(r, restart=j) for j, run in enumerate(runs) for r in run.log]
    res = DipgoResult(best.scores, best.plan, best.macs_ratio, units, sum(r.seconds for r in runs), log, cfg,
                      restart=k)
    from accelerate import PartialState

    if PartialState().is_main_process:
        _write_result(res, Path(cfg.out) if cfg.out else None)
    return res


def _validation_loss(val, scores: np.ndarray, units: PlanUnits, cfg: DipgoConfig, state) -> float:
    """The consistency loss, on the validation batch, of the plan ``scores`` post-process to (memoized by plan)."""
    traj, ref, seen = val
    plan = effective_plan(plan_from_scores(scores, units, cfg.ratio), units)
    key = plan.tobytes()
    if key not in seen:
        # the runtime's fast path under the hard plan (skipped units do not compute), then the full plan back
        hard = PlanState(plan.tolist(), units)
        fields = ("run", "any_run", "store", "store_output")
        saved = [getattr(state, f) for f in fields]
        for f in fields:
            setattr(state, f, getattr(hard, f))
        try:
            with torch.no_grad():
                pred = traj.run(state, checkpoint=False)
        finally:
            for f, v in zip(fields, saved):
                setattr(state, f, v)
        seen[key] = float(consistency_loss(pred, ref, cfg.loss))
    return seen[key]


def _gates_and_kept(logits: torch.Tensor, noise, units: PlanUnits, scale: float = 1.0):
    """The gates that switch the units ``(T, U)`` and the kept MACs share (scalar) of one training step.

    Values: the runtime runs the *effective* plan (a unit whose consumers are all skipped is skipped too),
    so the gates take the effective plan's 0/1 values. Gradients: straight to each unit's own gate; taking
    them through the dependency product would give a closed unit's upstream units a zero gradient forever
    (their effective gate is 0 whatever they do), and training could never reopen them. The kept share's
    gradient comes from the dependency product on the keep probabilities, so a unit's share includes the
    units it forces to run.
    """
    g = straight_through_gates(logits, noise, scale=scale)
    eff = effective_plan_soft(g.detach(), units)  # exact 0/1 values
    gates = g + (eff - g).detach()  # exact: 0/1 arithmetic
    p = logits.softmax(-1)[..., 1]
    p = torch.cat([torch.ones_like(p[:1]), p[1:]], dim=0)
    soft = kept_macs(effective_plan_soft(p, units), units)
    kept = kept_macs(eff, units) + soft - soft.detach()
    return gates, kept


def _local_loss(traj: _Trajectory, state, gates: torch.Tensor) -> torch.Tensor:
    """Learning-to-Cache's local objective: step k from the full model's state and caches at k - 1."""
    with torch.no_grad():
        # all-ones gates: every unit runs and leaves its output in the caches (the runtime's own path keeps
        # only what the next step of the installed plan reads, which for the keep-all plan is nothing)
        _, rec = traj.run(state, gates=torch.ones_like(gates), checkpoint=False, record=True)
    ts = traj.timesteps()
    state.manual = True
    state.gates = gates
    total = 0.0
    try:
        for k in range(1, len(ts)):
            x, e_full, _ = rec[k]
            state.step = k
            state.caches = dict(rec[k - 1][2])
            e = traj.eps(x, ts[k])
            total = total + ((e - e_full) ** 2).mean()
    finally:
        state.manual = False
        state.gates = None
        state.reset()
    return total / (len(ts) - 1)


# ------------------------------------------------------------------------------------------------
# Search baselines: random search and a genetic algorithm over plans at a MACs ratio


def plan_psnr_fn(pipe, spec, reference: torch.Tensor, units: PlanUnits) -> Callable[[np.ndarray], float]:
    """``fn(plan) -> mean PSNR`` of ``pipe`` sampling ``spec`` under ``plan`` against ``reference`` ``(N, C, H, W)``."""
    from diffslim.measure.quality import psnr
    from diffslim.sample import run_pipeline

    from diffslim.models.load import denoiser_of

    den = denoiser_of(pipe)

    def fn(plan: np.ndarray) -> float:
        apply_skip_plan(den, plan, units)
        try:
            out = run_pipeline(pipe, spec, list(range(len(spec.inputs))))
        finally:
            remove_skip_plan(den)
        v = psnr(out, reference)
        return float(torch.clamp(v, max=100.0).mean())

    return fn


@dataclass
class SearchResult:
    plan: np.ndarray
    score: float
    n_evals: int
    seconds: float
    history: list


def search_plan(evaluate: Callable[[np.ndarray], float], units: PlanUnits, num_steps: int, ratio: float,
                budget: int, method: str = "random", seed: int = 0, population: int = 8,
                mutation: float = 0.15) -> SearchResult:
    """Best plan at MACs ``<= 1 - ratio`` found in ``budget`` evaluations of ``evaluate(plan) -> score``.

    Candidates are score tables ``(T, U)`` turned into plans by :func:`plan_from_scores`, so each
    meets the ratio. ``random``: uniform random scores. ``ga``: a population of score tables,
    truncation selection (top half), uniform crossover and gaussian mutation, elitism.
    """
    if method not in ("random", "ga"):
        raise UserError(f"unknown search {method!r}; accepted: random, ga")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    history = []
    scored: list[tuple[float, np.ndarray]] = []

    def ev(genome):
        plan = plan_from_scores(genome, units, ratio)
        s = evaluate(plan)
        history.append(s)
        scored.append((s, genome))
        return s

    shape = (num_steps, len(units))
    if method == "random":
        for _ in range(budget):
            ev(rng.random(shape))
    else:
        pop = [rng.random(shape) for _ in range(min(population, budget))]
        for g in pop:
            ev(g)
        while len(history) < budget:
            ranked = sorted(scored, key=lambda x: -x[0])
            parents = [g for _, g in ranked[:max(2, population // 2)]]
            a, b = rng.choice(len(parents), 2, replace=False)
            mask = rng.random(shape) < 0.5
            child = np.where(mask, parents[a], parents[b]) + rng.normal(0, mutation, shape)
            ev(np.clip(child, 0, 1))
    best_s, best_g = max(scored, key=lambda x: x[0])
    return SearchResult(plan_from_scores(best_g, units, ratio), best_s, len(history), time.perf_counter() - t0,
                        history)
