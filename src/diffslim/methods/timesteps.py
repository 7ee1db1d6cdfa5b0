"""Time-step optimisation (Kim and Cho, 2024, "Diffusion Model Compression for Image-to-Image Translation").

The paper replaces the uniform DDIM schedule of ``n`` steps by a one-parameter family: the gamma
schedule. Uniform points ``u_i`` in ``[0, T]`` are shifted into ``[0, 1]`` and raised to the power
``gamma``; ``gamma > 1`` packs the steps towards small ``t`` (fine detail), ``gamma < 1`` towards large
``t``; ``gamma = 1`` is the uniform (truncated linspace) schedule. ``gamma`` is found by a greedy line
search on a quality score (PSNR against the many-step output), done once per model, task and step count.

Everything here is a short pure function of numbers and tensors (k-diffusion style): schedules
(``gamma_timesteps`` and the baselines ``uniform_timesteps``, ``ays_timesteps``, ``karras_timesteps``),
``validate_timesteps``, one DDIM update between two arbitrary timesteps (``ddim_step``), the two gamma
searches, and ``NonUniformDDIMScheduler``, a ``DDIMScheduler`` that steps along an explicit list.

Conventions: a *timestep list* is a plain ``list[int]``, strictly descending, each entry a training
timestep index in ``[0, T]`` with ``T = num_train_timesteps - 1 = 999``. (``uniform_timesteps``
takes ``T = num_train_timesteps = 1000`` like diffusers' config; see its docstring.)

Reference code: the paper's ``timestep-opt.py`` (github.com/KIMGEONUNG/ID-compression). Differences
from it are written where they occur: float64 arithmetic instead of float32 (a handful of entries
differ by 1, see ``gamma_timesteps``); schedules with duplicate timesteps raise instead of being
sampled; the greedy search tries both directions (the reference only ever moves with ``sign = -1``).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDIMScheduler
# diffusers loads a pipeline folder's component of a custom module (NonUniformDDIMScheduler, saved with a
# pipeline that had an explicit-timestep recipe applied) only if that module also holds the base class it checks
from diffusers import SchedulerMixin  # noqa: F401
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "gamma_timesteps",
    "uniform_timesteps",
    "ays_timesteps",
    "karras_timesteps",
    "solver_aware_timesteps",
    "solver_error_bound",
    "validate_timesteps",
    "ddim_step",
    "NonUniformDDIMScheduler",
    "SearchResult",
    "gamma_search_greedy",
    "gamma_search_bounded",
    "gamma_move",
    "AYS_FAMILIES",
]

# ------------------------------------------------------------------------------------------
# Validation


def validate_timesteps(ts: Union[Sequence[int], np.ndarray, torch.Tensor], T: int = 999) -> list[int]:
    """Check a timestep list and return it as ``list[int]``.

    Accepted: a non-empty sequence (list, tuple, 1-D array or tensor) of integer-valued numbers in
    ``[0, T]``, strictly descending, no duplicates. Anything else raises one ``ValueError`` line
    naming the problem and what is accepted.
    """
    accepted = (f"a non-empty, strictly descending list of distinct integers in [0, {T}], "
                f"e.g. [{T}, {T * 2 // 3}, {T // 3}, 0]")
    if isinstance(ts, torch.Tensor):
        ts = ts.detach().cpu().reshape(-1).tolist()
    elif isinstance(ts, np.ndarray):
        ts = ts.reshape(-1).tolist()
    try:
        raw = list(ts)
    except TypeError:
        raise ValueError(f"timesteps: got {type(ts).__name__}; expected {accepted}") from None
    if not raw:
        raise ValueError(f"timesteps: empty; expected {accepted}")
    out = []
    for i, t in enumerate(raw):
        if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) \
                or not math.isfinite(t) or float(t) != int(t):
            raise ValueError(f"timesteps: entry {i} is {t!r}, not an integer; expected {accepted}")
        out.append(int(t))
    bad = [t for t in out if t < 0 or t > T]
    if bad:
        raise ValueError(f"timesteps: {bad[0]} is out of range; expected {accepted}")
    seen = {}
    for i, t in enumerate(out):
        if t in seen:
            raise ValueError(f"timesteps: {t} appears twice (positions {seen[t]} and {i}); expected {accepted}")
        seen[t] = i
    for i in range(len(out) - 1):
        if out[i] < out[i + 1]:
            raise ValueError(
                f"timesteps: not descending ({out[i]} at position {i} is followed by {out[i + 1]}); "
                f"expected {accepted}")
    return out


# ------------------------------------------------------------------------------------------
# Schedules


def gamma_timesteps(steps: int, gamma: float, coef: float = 30, T: int = 999) -> list[int]:
    """The paper's gamma schedule: ``steps`` descending timesteps in ``[0, T]``.

    With ``u_i = i * T / (steps - 1)`` for ``i = 0..steps-1``::

        gamma >= 1:  t_l = 0,                        t_u = T + coef * (gamma - 1)
        gamma <  1:  t_l = coef * (1 - 1 / gamma),   t_u = T
        s_i = (u_i - t_l) / (t_u - t_l)
        t_i = int(T * clip(s_i ** gamma, 0, 1))      (int() truncates towards zero)

    returned in descending order. ``gamma = 1`` gives the truncated linspace ``[999, 888, ..., 111, 0]``
    (for 10 steps), which is also the paper's uniform baseline (``torch.linspace(0, 999, n).int()``).
    ``coef`` moves the end that ``gamma`` pulls away from, so that the first (``gamma < 1``) or last
    (``gamma > 1``) step is not wasted on a near-duplicate of its neighbour; the paper's script
    defaults to 30 (its helper function to 60).

    Edge cases, decided here:
    - ``steps == 1``: returns ``[T]``; one step must start from pure noise and ``gamma`` has no
      effect (the reference code would return ``[0]`` for ``gamma >= 1``).
    - Truncation can map two neighbouring points to the same integer (many steps and an extreme
      ``gamma``). The reference code would sample such a list, taking a zero-length step; here it
      raises ``ValueError`` naming ``steps`` and ``gamma``.
    - Arithmetic is float64 numpy; the reference computes in float32 torch, so a truncated value
      right at an integer boundary can differ by 1 (6 entries over steps 2..59 x gamma 0.30..3.00
      in steps of 0.01).

    Raises ``ValueError`` for ``steps < 1``, ``gamma <= 0``, ``coef < 0`` or duplicate timesteps.
    """
    steps, T = int(steps), int(T)
    if steps < 1:
        raise ValueError(f"gamma_timesteps: steps must be >= 1, got {steps}")
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma_timesteps: gamma must be a finite number > 0, got {gamma!r}")
    if not coef >= 0:
        raise ValueError(f"gamma_timesteps: coef must be >= 0, got {coef!r}")
    if steps == 1:
        return [T]
    u = np.arange(steps, dtype=np.float64) * T / (steps - 1)
    if gamma >= 1:
        t_l, t_u = 0.0, T + coef * (gamma - 1)
    else:
        t_l, t_u = coef * (1 - 1 / gamma), float(T)
    s = (u - t_l) / (t_u - t_l)
    ts = [int(v) for v in (T * np.clip(s ** gamma, 0.0, 1.0))[::-1]]
    if len(set(ts)) != len(ts):
        dup = next(a for a, b in zip(ts, ts[1:]) if a == b)
        raise ValueError(
            f"gamma_timesteps: steps={steps}, gamma={gamma:g}, coef={coef:g} gives timestep {dup} twice "
            "(integer truncation); use fewer steps or a gamma closer to 1")
    return ts


_SPACINGS = ("leading", "trailing", "linspace")


def uniform_timesteps(steps: int, spacing: str = "leading", T: int = 1000, steps_offset: int = 1) -> list[int]:
    """Exactly the timesteps ``DDIMScheduler.set_timesteps(steps)`` makes (diffusers 0.42.1).

    ``T`` here is ``num_train_timesteps`` (1000), as in the scheduler config, not the largest index.
    ``steps_offset`` only affects ``"leading"`` (as in diffusers)::

        leading:  (arange(steps) * (T // steps)).round()[::-1] + steps_offset     (SD 1.x default)
        trailing: round(arange(T, 0, -T / steps)) - 1
        linspace: linspace(0, T - 1, steps).round()[::-1]

    Raises ``ValueError`` where diffusers' own list is not a valid schedule: ``steps > T``;
    ``leading`` with ``(steps - 1) * (T // steps) + steps_offset > T - 1`` (e.g. 1000 steps, offset 1
    gives timestep 1000); ``trailing`` for the step counts where float ``arange`` overshoots and
    diffusers returns ``steps + 1`` entries ending in ``-1`` (e.g. 61, 103, 121 with T=1000).
    """
    steps, T = int(steps), int(T)
    if spacing not in _SPACINGS:
        raise ValueError(f"uniform_timesteps: spacing {spacing!r} unknown; accepted: {', '.join(_SPACINGS)}")
    if not 1 <= steps <= T:
        raise ValueError(f"uniform_timesteps: steps must lie in 1..{T}, got {steps}")
    # The numpy expressions are diffusers' verbatim, so that float rounding matches too.
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        step_ratio = T // steps
        ts = (np.arange(0, steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        ts += steps_offset
    else:
        step_ratio = T / steps
        ts = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)
        ts -= 1
        if len(ts) != steps:
            raise ValueError(
                f"uniform_timesteps: diffusers' trailing spacing gives {len(ts)} timesteps (ending {ts[-1]}) for "
                f"steps={steps}, T={T} (float arange overshoot); use another step count or spacing")
    return validate_timesteps(ts.tolist(), T=T - 1)


AYS_FAMILIES = {"sd15": "StableDiffusion", "sdxl": "StableDiffusionXL", "svd": "StableDiffusionVideo"}


def _loglinear_interp(values: Sequence[float], num: int) -> np.ndarray:
    """Resample a decreasing positive sequence to ``num`` points, linearly in log value over an even grid.

    The interpolation of NVIDIA's AYS how-to: both grids span ``[0, 1]``, so the first and last
    values are kept. Returns float64, shape ``(num,)``, decreasing.
    """
    xs = np.linspace(0, 1, len(values))
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num), xs, ys))[::-1].copy()


def ays_timesteps(steps: int, family: str) -> list[int]:
    """Align-Your-Steps timesteps for ``family`` in ``"sd15" | "sdxl"``.

    The 10-step lists are ``diffusers.schedulers.AysSchedules["StableDiffusionTimesteps"]`` and
    ``["StableDiffusionXLTimesteps"]``, returned as is for ``steps == 10``. diffusers 0.42.1 ships
    only these 10-step tables, no interpolation; for other counts this resamples the table with the
    log-linear interpolation of the AYS how-to (``loglinear_interp``: log of the values, linear
    on an even grid over [0, 1], exp), applied here to the timestep table (AYS applies it to sigmas;
    diffusers' timestep tables end at 24 / 13, never 0, so the log is defined), and rounds to
    integers. ``steps == 1`` returns ``[999]``. ``"svd"`` has only a sigma table (EDM, continuous
    time) and raises, as does any step count whose rounding collides (``ValueError``).
    """
    from diffusers.schedulers import AysSchedules

    if family not in AYS_FAMILIES:
        raise ValueError(f"ays_timesteps: family {family!r} unknown; accepted: sd15, sdxl")
    key = AYS_FAMILIES[family] + "Timesteps"
    if key not in AysSchedules:
        raise ValueError(
            f"ays_timesteps: diffusers has no AYS timestep table for {family!r} (only sigmas: "
            f"{AYS_FAMILIES[family]}Sigmas); accepted: sd15, sdxl")
    table = list(AysSchedules[key])
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"ays_timesteps: steps must be >= 1, got {steps}")
    if steps == len(table):
        return [int(t) for t in table]
    if steps == 1:
        return [int(table[0])]
    ts = np.round(_loglinear_interp(table, steps)).astype(np.int64).tolist()
    if len(set(ts)) != len(ts):
        raise ValueError(f"ays_timesteps: steps={steps} for {family!r} gives duplicate timesteps after rounding; "
                         "use fewer steps")
    return validate_timesteps(ts)


def karras_timesteps(steps: int, alphas_cumprod: Union[torch.Tensor, np.ndarray], rho: float = 7.0) -> list[int]:
    """The training timesteps a Karras-sigma schedule visits, rounded to integers.

    ``alphas_cumprod``: shape ``(num_train_timesteps,)``. Sigmas ``sqrt((1 - a) / a)``; Karras
    sigmas between ``sigma_max = sigma[-1]`` and ``sigma_min = sigma[0]`` (the full range, as
    ``EulerDiscreteScheduler(use_karras_sigmas=True)`` with its default ``"linspace"`` spacing and
    no ``sigma_min``/``sigma_max`` in the config); each mapped back to a fractional ``t`` by linear
    interpolation in log sigma (diffusers' ``_sigma_to_t``), then rounded. Computes in the dtype of
    ``alphas_cumprod`` (float32 for a scheduler's) like diffusers does. Raises ``ValueError`` when
    rounding collides (for SD 1.x's schedule from about 50 steps: the low-sigma end is dense).
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"karras_timesteps: steps must be >= 1, got {steps}")
    a = torch.as_tensor(alphas_cumprod)
    sigmas = (((1 - a) / a) ** 0.5).detach().cpu().numpy()
    log_sigmas = np.log(sigmas)
    sigma_min, sigma_max = float(sigmas[0]), float(sigmas[-1])
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    k_sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    ts = np.array([_sigma_to_t(s, log_sigmas) for s in k_sigmas])
    out = np.round(ts.astype(np.float32)).astype(np.int64).tolist()
    if len(set(out)) != len(out):
        raise ValueError(f"karras_timesteps: steps={steps}, rho={rho:g} gives duplicate timesteps after rounding; "
                         "use fewer steps")
    return validate_timesteps(out, T=len(sigmas) - 1)


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional timestep of ``sigma``: linear interpolation of ``log_sigmas`` (shape ``(T+1,)``), as diffusers."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return float(((1 - w) * low_idx + w * high_idx).reshape(()))


# ------------------------------------------------------------------------------------------
# Solver-aware time steps (Xue et al., CVPR 2024, "Accelerating Diffusion Sampling with Optimized
# Time Steps"): no sampling, only the noise schedule and the solver's interpolation rule.


def _half_log_snr(alphas_cumprod: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """``lambda_t = log(alpha_t / sigma_t)`` per training timestep, shape ``(T+1,)``, float64."""
    a = (alphas_cumprod.detach().cpu().double().numpy() if isinstance(alphas_cumprod, torch.Tensor)  # MPS: no float64
         else np.asarray(alphas_cumprod, dtype=np.float64))
    return 0.5 * (np.log(a) - np.log1p(-a))


def _lagrange_integrals(lam: np.ndarray, n: int, order: int, nodes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``J_j = int_{lam[n]}^{lam[n+1]} e^l * ell_j(l) dl`` for the Lagrange basis ``ell_j`` through the
    points ``lam[n], lam[n-1], ..., lam[n-order+1]`` (the multistep interpolant of the data
    prediction); ``j = 0`` is the newest point. Gauss-Legendre quadrature (exact up to e^l's smoothness)."""
    a, b = lam[n], lam[n + 1]
    x = 0.5 * (b - a) * nodes + 0.5 * (a + b)
    w = 0.5 * (b - a) * weights * np.exp(x)
    pts = [lam[n - k] for k in range(order)]
    out = np.empty(order)
    for j in range(order):
        basis = np.ones_like(x)
        for k in range(order):
            if k != j:
                basis *= (x - pts[k]) / (pts[j] - pts[k])
        out[j] = float(np.sum(w * basis))
    return out


def solver_error_bound(lam: np.ndarray, order: int = 2, lower_order_final: bool = True, trunc: int = 3) -> float:
    """Xue et al.'s surrogate of the discretisation error of a multistep DPM-Solver++ run.

    ``lam``: ``(N+1,)`` increasing half-log-SNRs: the ``N`` points where the model is evaluated, then
    the end point. In data-prediction form ``x_t / sigma_t = x_s / sigma_s + int e^l x_theta dl``,
    so an error ``e_j`` of the data prediction at point ``j`` reaches the result through the
    interpolation integrals ``J``. The error of the prediction at point ``j`` is modelled as
    ``sigma_j^2 / alpha_j`` (the paper's choice). Steps before ``trunc`` add the norm of their own
    terms; later steps accumulate signed coefficients per point, whose absolute values are summed
    (errors of one point can cancel across the steps that reuse it). Step ``n`` has order
    ``min(order, n + 1)`` (multistep warm-up), and 1 for the last step when ``lower_order_final``
    (diffusers' DPMSolverMultistepScheduler does so below 15 steps).
    """
    lam = np.asarray(lam, dtype=np.float64)
    n_steps = len(lam) - 1
    alpha = 1.0 / np.sqrt(1.0 + np.exp(-2 * lam))
    sigma = 1.0 / np.sqrt(1.0 + np.exp(2 * lam))
    err = sigma ** 2 / alpha
    nodes, weights = np.polynomial.legendre.leggauss(16)
    total, coef = 0.0, np.zeros(n_steps)
    for n in range(n_steps):
        p = min(order, n + 1)
        if lower_order_final and n == n_steps - 1:
            p = 1
        J = _lagrange_integrals(lam, n, p, nodes, weights)
        terms = np.array([J[j] * err[n - j] for j in range(p)])
        if n < trunc:
            total += float(np.sqrt(np.sum(terms ** 2)))
        else:
            for j in range(p):
                coef[n - j] += terms[j]
    return total + float(np.sum(np.abs(coef)))


def solver_aware_timesteps(
    steps: int,
    alphas_cumprod: Union[torch.Tensor, np.ndarray],
    order: int = 2,
    init: str = "uniform_t",
    lower_order_final: Optional[bool] = None,
) -> tuple[list[int], dict]:
    """Time steps for an ``order``-step multistep DPM-Solver++ that minimise :func:`solver_error_bound`.

    No model and no sampling: only ``alphas_cumprod`` (shape ``(T+1,)``). The ``steps + 1`` points
    run from ``t = T`` to ``t = 0`` in half-log-SNR; the ``steps - 1`` interior points are optimised
    (ordered, ends fixed; a local constrained trust-region search as in the paper's code) from
    ``init``: "uniform_t" (evenly spaced t; the paper's advice for latent models) or "uniform_lambda"
    (evenly spaced log-SNR; its advice for pixel models). The first ``steps`` points, mapped back to
    integer training timesteps (linear interpolation of ``lambda``), are returned with a summary
    ``{"bound", "init_bound", "seconds", "lambdas"}``. ``lower_order_final`` defaults to
    ``steps < 15``, as diffusers' DPMSolverMultistepScheduler does. diffusers' scheduler ends its last step at
    sigma = 0 rather than at ``t = 0`` (sigma 0.03 for SD's schedule); the bound is computed to
    ``t = 0``, as in the paper's code. Raises ``ValueError`` for ``steps < 2`` or when rounding to
    integers collides (too many steps for the schedule's resolution).
    """
    from scipy.optimize import LinearConstraint, minimize

    steps = int(steps)
    if steps < 2:
        raise ValueError(f"solver_aware_timesteps: steps must be >= 2, got {steps}")
    if init not in ("uniform_t", "uniform_lambda"):
        raise ValueError(f"solver_aware_timesteps: init must be 'uniform_t' or 'uniform_lambda', got {init!r}")
    t0 = time.perf_counter()
    if lower_order_final is None:
        lower_order_final = steps < 15
    table = _half_log_snr(alphas_cumprod)  # decreasing in t
    T = len(table) - 1
    lam_start, lam_end = table[T], table[0]
    if init == "uniform_t":
        t_init = np.linspace(T, 0, steps + 1)
        lam0 = np.interp(t_init, np.arange(T + 1), table)
    else:
        lam0 = np.linspace(lam_start, lam_end, steps + 1)

    # The paper's optimiser: a local, constrained trust-region search from the initial points (the
    # surrogate has degenerate global minima with coinciding points, where coefficients of opposite
    # sign cancel; a local search from a sensible spacing is what the method prescribes).
    min_gap = 1e-3
    n_free = steps - 1
    A = np.zeros((steps, n_free))  # gaps: x_1 - start, x_2 - x_1, ..., end - x_{n-1}
    for i in range(n_free):
        A[i, i] = 1.0
        A[i + 1, i] = -1.0
    lb = np.full(steps, min_gap)
    lb[0] += lam_start
    lb[-1] -= lam_end
    constraint = LinearConstraint(A, lb, np.full(steps, np.inf))

    def full(x):
        return np.concatenate([[lam_start], x, [lam_end]])

    def objective(x):
        return solver_error_bound(full(x), order, lower_order_final)

    x0 = lam0[1:-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = minimize(objective, x0, method="trust-constr", constraints=[constraint],
                       options={"maxiter": 1000})
    x = res.x if res.fun <= objective(x0) else x0
    lam = full(x)
    # lambda -> t: the table decreases in t, np.interp wants increasing x
    t_float = np.interp(lam[:-1], table[::-1], np.arange(T + 1)[::-1].astype(np.float64))
    ts = [int(round(t)) for t in t_float]
    if len(set(ts)) != len(ts):
        raise ValueError(f"solver_aware_timesteps: {steps} steps collide after rounding to integer timesteps; "
                         "use fewer steps")
    info = {"bound": float(objective(x)), "init_bound": float(objective(x0)),
            "seconds": time.perf_counter() - t0, "lambdas": lam.tolist()}
    return validate_timesteps(ts, T=T), info

# ------------------------------------------------------------------------------------------
# DDIM between arbitrary timesteps


def ddim_step(
    model_output: torch.Tensor,
    t: int,
    t_prev: int,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    final_alpha_cumprod: Optional[Union[float, torch.Tensor]] = None,
) -> torch.Tensor:
    """One DDIM update from ``t`` to ``t_prev`` for an epsilon-predicting model (DDIM eq. 12, 16).

    ``model_output`` (predicted noise) and ``sample`` (``x_t``) have the same shape ``(B, C, ...)``;
    ``alphas_cumprod`` shape ``(num_train_timesteps,)``. Returns ``x_{t_prev}``, same shape::

        x0     = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
        sigma  = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise

    ``t_prev < 0`` means the last step: ``a_prev = final_alpha_cumprod``, by default
    ``alphas_cumprod[0]`` (diffusers' ``set_alpha_to_one=False``, the SD 1.x config). Pass 1.0 to
    get the paper's reference code, which returns ``x0`` itself after the last step. ``noise`` is
    drawn with diffusers' ``randn_tensor(shape, generator, device, dtype)`` only when ``eta > 0``,
    so a seeded generator gives the same noise as ``DDIMScheduler.step``.
    """
    a_t = alphas_cumprod[t]
    if t_prev >= 0:
        a_prev = alphas_cumprod[t_prev]
    else:
        a_prev = alphas_cumprod[0] if final_alpha_cumprod is None else torch.as_tensor(final_alpha_cumprod)
    x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t ** 0.5
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * model_output
    if eta > 0:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        prev = prev + std * noise
    return prev


class NonUniformDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` that also samples an explicit, possibly non-uniform, descending timestep list.

    ``set_timesteps(num_inference_steps=N)`` is ``DDIMScheduler``'s, and ``step`` then is too (its
    previous timestep is ``t - T // N``), so the class is a drop-in replacement. After
    ``set_timesteps(timesteps=[...])`` (what diffusers' ``retrieve_timesteps`` calls) ``step`` goes from
    ``t`` to the next listed timestep, and from the last one to ``final_alpha_cumprod`` (1 or
    ``alphas_cumprod[0]``, per ``set_alpha_to_one``). The step is found by looking ``t`` up in the list,
    so img2img pipelines that start part-way down the list work. Use::

        pipe.scheduler = NonUniformDDIMScheduler.from_config(pipe.scheduler.config)
        pipe(..., timesteps=gamma_timesteps(10, 1.3))
    """

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[int]] = None,
    ):
        """Set ``self.timesteps`` (int64 tensor, shape ``(n,)``) from a step count or an explicit list."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "NonUniformDDIMScheduler.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is None:
            self._listed_timesteps = None
            return super().set_timesteps(num_inference_steps, device=device)
        ts = validate_timesteps(timesteps, T=self.config.num_train_timesteps - 1)
        self._listed_timesteps = ts
        self._prev_of = {t: (ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)}
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)

    def previous_timestep(self, timestep) -> int:
        """The timestep ``step`` moves to from ``timestep`` (``-1`` after the last listed one)."""
        t = int(timestep)
        if getattr(self, "_listed_timesteps", None) is None:
            return t - self.config.num_train_timesteps // self.num_inference_steps
        if t not in self._prev_of:
            raise ValueError(f"NonUniformDDIMScheduler.step: timestep {t} is not in the list set by set_timesteps")
        return self._prev_of[t]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[DDIMSchedulerOutput, tuple]:
        """``DDIMScheduler.step`` with the previous timestep taken from the list (shapes as ``sample``)."""
        if getattr(self, "_listed_timesteps", None) is None:
            return super().step(model_output, timestep, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)
        timestep = int(timestep)
        prev_timestep = self.previous_timestep(timestep)
        # From here on DDIMScheduler.step's body, with prev_timestep from the list.
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        pt = self.config.prediction_type
        if pt == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            pred_epsilon = model_output
        elif pt == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        elif pt == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        else:
            raise ValueError(f"prediction_type {pt!r} must be one of epsilon, sample, v_prediction")
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range)
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance ** (0.5)
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# ------------------------------------------------------------------------------------------
# Searching gamma


@dataclass
class SearchResult:
    """Outcome of a gamma search: the best gamma, its score (higher is better), every unique
    evaluation in call order as ``(gamma, score)``, their count, and the wall time in seconds."""

    best_gamma: float
    best_score: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)
    n_evals: int = 0
    seconds: float = 0.0


class _BudgetSpent(Exception):
    pass


class _Memo:
    """``evaluate`` with a cache keyed by gamma (rounded to 12 digits) and a cap on unique calls."""

    def __init__(self, evaluate: Callable[[float], float], max_evals: Optional[int] = None):
        self.evaluate, self.max_evals = evaluate, max_evals
        self.cache: dict[float, float] = {}
        self.order: list[tuple[float, float]] = []

    def __call__(self, gamma: float) -> float:
        key = round(float(gamma), 12)
        if key not in self.cache:
            if self.max_evals is not None and len(self.order) >= self.max_evals:
                raise _BudgetSpent
            score = float(self.evaluate(key))
            self.cache[key] = score
            self.order.append((key, score))
        return self.cache[key]

    def result(self, t0: float) -> SearchResult:
        best_gamma, best_score = max(self.order, key=lambda gs: _rank(gs[1]))  # first of equals wins
        return SearchResult(best_gamma, best_score, list(self.order), len(self.order), time.perf_counter() - t0)


def _rank(score: float) -> float:
    return -math.inf if score != score else score  # NaN never wins


def _gamma_to_q(gamma: float) -> float:
    """Signed distance from uniform in the paper's search coordinate: ``gamma - 1`` or ``1 - 1/gamma``."""
    return round(gamma - 1 if gamma >= 1 else 1 - 1 / gamma, 12)


def _q_to_gamma(q: float) -> float:
    return 1 + q if q >= 0 else 1 / (1 - q)


def gamma_move(gamma: float, delta: float) -> float:
    """The paper's ``update_p``: move ``gamma`` by ``delta``, acting on ``1/gamma`` below 1.

    With ``q = gamma - 1`` for ``gamma >= 1`` and ``q = 1 - 1/gamma`` for ``gamma < 1`` (so ``gamma``
    and ``1/gamma`` sit at ``q`` and ``-q``: the move is symmetric under ``gamma <-> 1/gamma``), the
    move is ``q + delta``, clamped to 0 (``gamma = 1``) when it would cross from one side to the
    other. E.g. ``gamma_move(1, -0.2) = 1/1.2``, ``gamma_move(1.1, -0.2) = 1``. ``q`` is rounded to
    12 decimals so that repeated moves land on the same grid (memoization, determinism).
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    q = _gamma_to_q(gamma)
    q2 = round(q + delta, 12)
    if (q > 0 > q2) or (q < 0 < q2):
        q2 = 0.0
    return _q_to_gamma(q2)


def gamma_search_greedy(
    evaluate: Callable[[float], float],
    steps: Sequence[float] = (0.2, 0.1, 0.05, 0.02, 0.01),
    start: float = 1.0,
    max_evals: int = 200,
) -> SearchResult:
    """The paper's greedy line search for gamma; ``evaluate(gamma)`` returns a score, higher is better.

    Start at ``start`` (1 = uniform). For each step size ``h`` in ``steps`` in turn: move
    ``gamma <- gamma_move(gamma, d * h)`` as long as the score strictly improves, first in the
    direction ``d`` that last improved (initially ``-1``, the reference code's only direction), and
    when that fails in ``-d``; when neither improves, go to the next ``h``. Moves act on ``1/gamma``
    below 1 (see ``gamma_move``), so the search treats ``gamma`` and ``1/gamma`` alike.

    Differences from the reference ``timestep-opt.py``: it moves only with ``sign = -1`` (never
    towards larger gamma from 1) and starts from ``psnr_opt = 0``, so its first move is accepted
    even when worse than uniform; here the start is scored and both directions are tried.

    ``evaluate`` is memoized on gamma (12 digits), so revisiting a gamma is free; at most
    ``max_evals`` unique evaluations are made (the search stops there). Deterministic given a
    deterministic ``evaluate``; ties keep the earlier gamma.
    """
    if not start > 0:
        raise ValueError(f"gamma_search_greedy: start must be > 0, got {start!r}")
    if not steps or any(not 0 < h for h in steps):
        raise ValueError(f"gamma_search_greedy: steps must be positive step sizes, got {tuple(steps)!r}")
    if max_evals < 1:
        raise ValueError(f"gamma_search_greedy: max_evals must be >= 1, got {max_evals}")
    t0 = time.perf_counter()
    f = _Memo(evaluate, max_evals)
    gamma = _q_to_gamma(_gamma_to_q(start))
    try:
        best = _rank(f(gamma))
        direction = -1
        for h in steps:
            improved = True
            while improved:
                improved = False
                for d in (direction, -direction):
                    cand = gamma_move(gamma, d * h)
                    if cand == gamma:
                        continue
                    score = _rank(f(cand))
                    if score > best:
                        gamma, best, direction, improved = cand, score, d, True
                        break
    except _BudgetSpent:
        pass
    return f.result(t0)


def gamma_search_bounded(
    evaluate: Callable[[float], float],
    bounds: tuple[float, float] = (0.3, 3.0),
    xatol: float = 0.01,
    maxiter: int = 30,
) -> SearchResult:
    """Bounded Brent search for the gamma maximising ``evaluate(gamma)`` (higher is better).

    Runs ``scipy.optimize.minimize_scalar(method="bounded")`` on ``-evaluate(exp(x))`` over
    ``x = log(gamma)`` in ``log(bounds)``, so ``gamma`` and ``1/gamma`` are equally far from 1;
    ``xatol`` is therefore in log-gamma units (0.01 is about 1% of gamma), ``maxiter`` caps Brent's
    iterations. Brent never evaluates the bounds themselves. Memoized like the greedy search; the
    result is the best of all unique evaluations.
    """
    from scipy.optimize import minimize_scalar

    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0 < lo < hi:
        raise ValueError(f"gamma_search_bounded: bounds must satisfy 0 < low < high, got {tuple(bounds)!r}")
    t0 = time.perf_counter()
    f = _Memo(evaluate)

    def objective(x: float) -> float:
        s = _rank(f(math.exp(x)))
        return math.inf if s == -math.inf else -s

    minimize_scalar(objective, bounds=(math.log(lo), math.log(hi)), method="bounded",
                    options={"xatol": xatol, "maxiter": maxiter})
    return f.result(t0)
