"""Time-step schedules, non-uniform DDIM and the gamma searches (diffslim.methods.timesteps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from diffslim.methods.timesteps import (
    NonUniformDDIMScheduler,
    SearchResult,
    ays_timesteps,
    ddim_step,
    gamma_move,
    gamma_search_bounded,
    gamma_search_greedy,
    gamma_timesteps,
    karras_timesteps,
    uniform_timesteps,
    validate_timesteps,
)

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def sd_ddim(**kw):
    """DDIMScheduler with SD 1.x's config (leading spacing, steps_offset 1, final alpha = alphas_cumprod[0])."""
    cfg = dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cfg.update(kw)
    return DDIMScheduler(**cfg)


# ------------------------------------------------------------------------------------------
# gamma schedule


def _gamma_by_hand(n, gamma, coef, T=999):
    """The formula, element by element with Python floats (independent of the module's numpy code)."""
    if gamma >= 1:
        t_l, t_u = 0.0, T + coef * (gamma - 1)
    else:
        t_l, t_u = coef * (1 - 1 / gamma), float(T)
    out = []
    for i in range(n):
        u = i * T / (n - 1)
        s = (u - t_l) / (t_u - t_l)
        out.append(int(T * min(max(s ** gamma, 0.0), 1.0)))
    return out[::-1]


def _gamma_reference_code(gamma, n, T=999, coef=30):
    """timesteps3func_cho from the paper's timestep-opt.py (float32 torch), restated."""
    p = gamma if gamma >= 1 else 1 / gamma
    t = torch.linspace(0, T, n)
    t_l = 0 if gamma >= 1 else coef * (1 - p)
    t_u = T + coef * (p - 1) if gamma >= 1 else T
    s = (t - t_l) / (t_u - t_l)
    return ((s ** gamma).clamp(0, 1) * T).to(torch.int32).flip(0).tolist()


def test_gamma_one_is_truncated_linspace():
    assert gamma_timesteps(10, 1.0) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # truncation, not rounding: 499.5 -> 499 (diffusers' linspace spacing would give 500)
    assert gamma_timesteps(5, 1.0) == [999, 749, 499, 249, 0]
    assert gamma_timesteps(5, 1.0, coef=60) == [999, 749, 499, 249, 0]  # coef has no effect at gamma = 1


def test_gamma_literal_lists():
    # gamma=2, coef=60: t_u = 1059, u = [0, 249.75, 499.5, 749.25, 999]
    # 999 * (999/1059)^2 = 889.005 -> 889; 999 * (749.25/1059)^2 = 500.07 -> 500;
    # 999 * (499.5/1059)^2 = 222.25 -> 222; 999 * (249.75/1059)^2 = 55.56 -> 55; 0 -> 0
    assert gamma_timesteps(5, 2.0, coef=60) == [889, 500, 222, 55, 0]
    # gamma=0.5, coef=30: t_l = -30, t_u = 999, s = (u + 30) / 1029
    # 999*sqrt(30/1029) = 170.58 -> 170; 999*sqrt(279.75/1029) = 520.89 -> 520;
    # 999*sqrt(529.5/1029) = 716.62 -> 716; 999*sqrt(779.25/1029) = 869.35 -> 869; 999
    assert gamma_timesteps(5, 0.5, coef=30) == [999, 869, 716, 520, 170]
    assert gamma_timesteps(10, 1.5) == [976, 818, 670, 531, 404, 289, 188, 102, 36, 0]


@pytest.mark.parametrize("n", [2, 3, 5, 10, 15, 20])
@pytest.mark.parametrize("gamma", [0.4, 0.7, 0.9, 1.0, 1.1, 1.3, 1.8, 2.5])
@pytest.mark.parametrize("coef", [0, 30, 60])
def test_gamma_matches_formula(n, gamma, coef):
    try:
        expected = _gamma_by_hand(n, gamma, coef)
    except ZeroDivisionError:
        pytest.skip("degenerate")
    if len(set(expected)) != n:
        with pytest.raises(ValueError, match=f"steps={n}, gamma={gamma:g}"):
            gamma_timesteps(n, gamma, coef=coef)
        return
    assert gamma_timesteps(n, gamma, coef=coef) == expected


def test_gamma_agrees_with_paper_code_on_its_step_counts():
    # The paper searches 5, 10, 15, 20 steps; float64 vs the reference's float32 agree on this grid.
    for n in (5, 10, 15, 20):
        for gamma in np.round(np.arange(0.5, 2.01, 0.05), 2):
            ref = _gamma_reference_code(float(gamma), n)
            if len(set(ref)) == n:
                assert gamma_timesteps(n, float(gamma)) == ref, (n, gamma)


def test_gamma_shape_and_direction():
    hi = gamma_timesteps(10, 2.0)
    lo = gamma_timesteps(10, 0.5)
    assert hi[-1] == 0 and hi[0] < 999       # gamma > 1: ends at 0, starts below T
    assert lo[0] == 999 and lo[-1] > 0       # gamma < 1: starts at T, stops above 0
    for ts in (hi, lo):
        assert validate_timesteps(ts) == ts


def test_gamma_edge_cases():
    assert gamma_timesteps(1, 1.7) == [999]
    assert gamma_timesteps(2, 1.0) == [999, 0]
    with pytest.raises(ValueError, match="steps=50, gamma=3"):
        gamma_timesteps(50, 3.0)
    with pytest.raises(ValueError, match="gamma must be"):
        gamma_timesteps(10, 0.0)
    with pytest.raises(ValueError, match="gamma must be"):
        gamma_timesteps(10, -1.0)
    with pytest.raises(ValueError, match="steps must be"):
        gamma_timesteps(0, 1.0)


# ------------------------------------------------------------------------------------------
# baselines


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 20, 25, 50, 333, 999])
def test_uniform_matches_ddim(spacing, n):
    for offset in (0, 1):
        sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        sched.set_timesteps(n)
        assert uniform_timesteps(n, spacing, steps_offset=offset) == sched.timesteps.tolist()


def test_uniform_literals_and_invalid_diffusers_lists():
    assert uniform_timesteps(10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert uniform_timesteps(10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert uniform_timesteps(4, "linspace") == [999, 666, 333, 0]
    # diffusers 0.42.1's trailing spacing returns 62 entries ending in -1 for 61 steps
    sched = DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(61)
    assert len(sched.timesteps) == 62 and sched.timesteps[-1] == -1
    with pytest.raises(ValueError, match="trailing"):
        uniform_timesteps(61, "trailing")
    with pytest.raises(ValueError, match="out of range"):
        uniform_timesteps(1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="spacing"):
        uniform_timesteps(10, "uniform")
    with pytest.raises(ValueError, match="steps must"):
        uniform_timesteps(1001)


def test_ays_tables_and_interpolation():
    from diffusers.schedulers import AysSchedules

    assert ays_timesteps(10, "sd15") == AysSchedules["StableDiffusionTimesteps"]
    assert ays_timesteps(10, "sdxl") == AysSchedules["StableDiffusionXLTimesteps"]
    # log-linear: 5 points at 0, .25, .5, .75, 1 of the ascending table [13, 53, 116, 193, 310, 443, ...]
    # 116*(193/116)^.25 = 131.8 -> 132; sqrt(310*443) = 370.6 -> 371; 587*(730/587)^.75 = 691.4 -> 691
    assert ays_timesteps(5, "sdxl") == [999, 691, 371, 132, 13]
    table = np.array(AysSchedules["StableDiffusionTimesteps"], dtype=float)[::-1]
    for n in (4, 15, 20, 30):
        pos = np.arange(n) * (len(table) - 1) / (n - 1)
        lo = np.floor(pos).astype(int).clip(max=len(table) - 2)
        w = pos - lo
        expected = np.round(np.exp((1 - w) * np.log(table[lo]) + w * np.log(table[lo + 1])))[::-1]
        assert ays_timesteps(n, "sd15") == expected.astype(int).tolist()
    assert ays_timesteps(1, "sd15") == [999]


def test_ays_errors():
    with pytest.raises(ValueError, match="no AYS timestep table"):
        ays_timesteps(10, "svd")
    with pytest.raises(ValueError, match="accepted: sd15, sdxl"):
        ays_timesteps(10, "flux")
    with pytest.raises(ValueError, match="duplicate"):
        ays_timesteps(214, "sdxl")  # first count that collides (sd15: 431)


@pytest.mark.parametrize("n", [2, 5, 10, 20, 30])
def test_karras_matches_euler(n):
    euler = EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    euler.set_timesteps(n)
    expected = [int(t) for t in np.round(euler.timesteps.numpy())]
    assert karras_timesteps(n, euler.alphas_cumprod) == expected


def test_karras_literal_and_duplicates():
    ac = sd_ddim().alphas_cumprod
    assert karras_timesteps(10, ac) == [999, 916, 815, 687, 523, 327, 146, 41, 7, 0]
    with pytest.raises(ValueError, match="steps=50"):
        karras_timesteps(50, ac)  # SD's low-sigma end is too dense for 50 distinct integers


def test_validate_timesteps():
    assert validate_timesteps([999, 500, 0]) == [999, 500, 0]
    assert validate_timesteps(torch.tensor([10, 3])) == [10, 3]
    assert validate_timesteps(np.array([10.0, 3.0])) == [10, 3]
    cases = [([], "empty"), ([999, 500, 500], "500 appears twice"), ([1, 5], "not descending"),
             ([1000, 5], "out of range"), ([5, -1], "out of range"), ([5.5, 1], "not an integer"),
             (["9"], "not an integer")]
    for ts, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            validate_timesteps(ts)
        assert "\n" not in str(e.value) and "strictly descending" in str(e.value)
    with pytest.raises(ValueError, match=r"in \[0, 49\]"):
        validate_timesteps([50, 1], T=49)


# ------------------------------------------------------------------------------------------
# non-uniform DDIM


def test_ddim_step_by_hand():
    ac = torch.tensor([0.99, 0.9, 0.5, 0.2], dtype=torch.float64)
    x = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    eps = torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    out = ddim_step(eps, 3, 1, x, ac)
    for j in range(2):
        x0 = (x[0, j].item() - math.sqrt(1 - 0.2) * eps[0, j].item()) / math.sqrt(0.2)
        assert out[0, j].item() == pytest.approx(math.sqrt(0.9) * x0 + math.sqrt(1 - 0.9) * eps[0, j].item(), abs=1e-12)
    # last step: t_prev < 0 uses alphas_cumprod[0] unless told otherwise
    assert torch.allclose(ddim_step(eps, 2, -1, x, ac), ddim_step(eps, 2, 0, x, ac))
    x0 = (x - math.sqrt(0.5) * eps) / math.sqrt(0.5)
    assert torch.allclose(ddim_step(eps, 2, -1, x, ac, final_alpha_cumprod=1.0), x0)
    # eta > 0: sigma^2 = (1-a_prev)/(1-a_t) * (1 - a_t/a_prev); noise from the generator
    g = torch.Generator().manual_seed(0)
    noisy = ddim_step(eps, 3, 1, x, ac, eta=1.0, generator=g)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    var = (1 - 0.9) / (1 - 0.2) * (1 - 0.2 / 0.9)
    x0 = (x - math.sqrt(0.8) * eps) / math.sqrt(0.2)
    assert torch.allclose(noisy, math.sqrt(0.9) * x0 + math.sqrt(1 - 0.9 - var) * eps + math.sqrt(var) * noise)


@pytest.mark.parametrize("n", [1, 4, 10, 25])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_listed_uniform_schedule_equals_ddim(n, eta):
    ref = sd_ddim()
    ours = NonUniformDDIMScheduler.from_config(ref.config)
    ref.set_timesteps(n)
    ours.set_timesteps(timesteps=uniform_timesteps(n, "leading", steps_offset=1))
    assert torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(1)
    x_ref = x_ours = torch.randn(2, 4, 8, 8, generator=g)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in ref.timesteps:
        eps = torch.randn(2, 4, 8, 8, generator=g)
        x_ref = ref.step(eps, t, x_ref, eta=eta, generator=g_ref).prev_sample
        out = ours.step(eps, t, x_ours, eta=eta, generator=g_ours)
        assert isinstance(out, DDIMSchedulerOutput)
        x_ours = out.prev_sample
        assert torch.equal(x_ours, x_ref)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_step_count_behaves_exactly_like_ddim(spacing):
    ref = sd_ddim(timestep_spacing=spacing, prediction_type="v_prediction")
    ours = NonUniformDDIMScheduler.from_config(ref.config)
    ref.set_timesteps(7)
    ours.set_timesteps(7)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(2)
    x_ref = x_ours = torch.randn(1, 4, 8, 8, generator=g)
    for t in ref.timesteps:
        eps = torch.randn(1, 4, 8, 8, generator=g)
        x_ref = ref.step(eps, t, x_ref).prev_sample
        x_ours = ours.step(eps, t, x_ours).prev_sample
        assert torch.equal(x_ours, x_ref)


def test_non_uniform_list_reproduces_ddim_step():
    ours = NonUniformDDIMScheduler.from_config(sd_ddim().config)
    ts = gamma_timesteps(6, 1.6)
    ours.set_timesteps(timesteps=ts)
    assert ours.timesteps.tolist() == ts and ours.num_inference_steps == 6
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        assert ours.previous_timestep(t) == t_prev
        eps = torch.randn(1, 4, 8, 8, generator=g)
        expected = ddim_step(eps, t, t_prev, x, ours.alphas_cumprod)
        x = ours.step(eps, torch.tensor(t), x).prev_sample
        assert torch.allclose(x, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not in the list"):
        ours.step(eps, 500, x)
    with pytest.raises(ValueError, match="exactly one"):
        ours.set_timesteps()
    with pytest.raises(ValueError, match="not descending"):
        ours.set_timesteps(timesteps=[0, 500])


def test_retrieve_timesteps_accepts_it():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    sched = NonUniformDDIMScheduler.from_config(sd_ddim().config)
    ts, n = retrieve_timesteps(sched, timesteps=[999, 700, 300, 50], device="cpu")
    assert ts.tolist() == [999, 700, 300, 50] and n == 4
    ts, n = retrieve_timesteps(sched, 5, device="cpu")
    assert ts.tolist() == [801, 601, 401, 201, 1] and n == 5


def test_pipelines_sample_the_listed_schedule(tiny_sd_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    comps = dict(tiny_sd_pipe.components)
    ours = NonUniformDDIMScheduler.from_config(comps["scheduler"].config)
    seen = []
    ours.step = (lambda step: lambda out, t, x, **kw: (seen.append(int(t)), step(out, t, x, **kw))[1])(ours.step)
    pipe = StableDiffusionPipeline(**{**comps, "scheduler": ours})
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a", height=16, width=16, guidance_scale=1.0, output_type="latent")
    ts = gamma_timesteps(4, 1.4)
    pipe(**kw, timesteps=ts, generator=torch.Generator().manual_seed(0))
    assert seen == ts
    # the uniform list gives the very same latents as plain DDIM with a step count
    a = pipe(**kw, timesteps=uniform_timesteps(3), generator=torch.Generator().manual_seed(0)).images
    b = StableDiffusionPipeline(**comps)(**kw, num_inference_steps=3,
                                         generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)
    # img2img starts part-way down the list
    seen.clear()
    i2i = StableDiffusionImg2ImgPipeline(**{**comps, "scheduler": ours})
    i2i.set_progress_bar_config(disable=True)
    i2i(prompt="a", image=torch.zeros(1, 3, 16, 16), strength=0.5, timesteps=ts, guidance_scale=1.0,
        output_type="latent", generator=torch.Generator().manual_seed(0))
    assert seen == ts[2:]


# ------------------------------------------------------------------------------------------
# gamma search


def _peak(at):
    return lambda g: -(math.log(g) - math.log(at)) ** 2


def test_gamma_move_is_the_papers_update_p():
    assert gamma_move(1.0, 0.2) == pytest.approx(1.2)
    assert gamma_move(1.0, -0.2) == pytest.approx(1 / 1.2)
    assert gamma_move(1.5, -0.1) == pytest.approx(1.4)
    assert gamma_move(1.1, -0.2) == 1.0          # crossing 1 stops at 1
    assert gamma_move(1 / 1.1, 0.2) == 1.0
    assert gamma_move(1 / 1.4, -0.1) == pytest.approx(1 / 1.5)
    assert gamma_move(1 / 1.4, 0.1) == pytest.approx(1 / 1.3)
    # symmetric under gamma <-> 1/gamma
    for g, d in [(1.0, 0.3), (1.7, -0.2), (2.3, 0.05)]:
        assert gamma_move(1 / g, -d) == pytest.approx(1 / gamma_move(g, d))


@pytest.mark.parametrize("opt", [1.7, 1 / 1.7, 1.0, 2.33])
def test_greedy_finds_optimum(opt):
    calls = []

    def evaluate(g):
        calls.append(g)
        return _peak(opt)(g)

    r = gamma_search_greedy(evaluate)
    assert isinstance(r, SearchResult)
    assert abs(math.log(r.best_gamma) - math.log(opt)) < 0.01
    assert r.n_evals == len(calls) == len(set(calls)) == len(r.evaluations)
    assert r.evaluations[0] == (1.0, _peak(opt)(1.0))
    assert r.best_score == max(s for _, s in r.evaluations)
    r2 = gamma_search_greedy(_peak(opt))
    assert r2.evaluations == r.evaluations and r2.best_gamma == r.best_gamma


def test_greedy_exact_path():
    r = gamma_search_greedy(_peak(1.7), steps=(0.2, 0.1))
    # step 0.2: from 1 tries 1/1.2 first (worse), then up: 1.2, 1.4, 1.6, 1.8 (in log space closer to 1.7
    # than 1.6 is), 2.0 worse, 1.6 known; step 0.1: 1.9 worse, 1.7 better, then 1.6 and 1.8 are known
    assert [round(g, 9) for g, _ in r.evaluations] == [1.0, round(1 / 1.2, 9), 1.2, 1.4, 1.6, 1.8, 2.0, 1.9, 1.7]
    assert r.best_gamma == pytest.approx(1.7) and r.n_evals == 9


def test_greedy_budget_and_errors():
    r = gamma_search_greedy(_peak(2.5), max_evals=4)
    assert r.n_evals == 4 and r.best_gamma == pytest.approx(1.4)
    with pytest.raises(ValueError):
        gamma_search_greedy(_peak(1.0), start=0)


@pytest.mark.parametrize("opt", [1.7, 1 / 1.7, 0.45, 2.6])
def test_bounded_finds_optimum(opt):
    calls = []

    def evaluate(g):
        calls.append(g)
        return _peak(opt)(g)

    r = gamma_search_bounded(evaluate)
    assert abs(math.log(r.best_gamma) - math.log(opt)) < 0.01
    assert r.n_evals == len(calls) == len(set(calls)) <= 30
    assert gamma_search_bounded(_peak(opt)).evaluations == r.evaluations
    assert 0.3 <= min(g for g, _ in r.evaluations) and max(g for g, _ in r.evaluations) <= 3.0


def test_bounded_memoizes_on_a_step_function():
    # a score constant on plateaus (as PSNR is: nearby gammas give the same integer schedule)
    r = gamma_search_bounded(lambda g: -abs(round(g, 1) - 1.5), xatol=1e-4, maxiter=40)
    assert round(r.best_gamma, 1) == 1.5 and r.best_score == 0.0
    assert r.n_evals == len({g for g, _ in r.evaluations})
    with pytest.raises(ValueError, match="bounds"):
        gamma_search_bounded(_peak(1.0), bounds=(2.0, 1.0))


# --- solver-aware time steps (Xue et al., CVPR 2024) -----------------------------------------


def test_lagrange_integrals_match_closed_form():
    """The quadrature equals the exponential integrals of DPM-Solver's derivation (order 1 and 2)."""
    from diffslim.methods.timesteps import _lagrange_integrals

    nodes, weights = np.polynomial.legendre.leggauss(16)
    lam = np.array([-2.0, -0.7, 0.4])
    h0, h1 = lam[1] - lam[0], lam[2] - lam[1]
    H0 = np.expm1(h1)
    H1 = np.exp(h1) * h1 - H0
    (j,) = _lagrange_integrals(lam, 1, 1, nodes, weights)
    assert j == pytest.approx(np.exp(lam[2]) - np.exp(lam[1]), rel=1e-12)
    new, old = _lagrange_integrals(lam, 1, 2, nodes, weights)
    assert old == pytest.approx(-np.exp(lam[1]) * H1 / h0, rel=1e-10)
    assert new == pytest.approx(np.exp(lam[1]) * (H1 + h0 * H0) / h0, rel=1e-10)


def test_solver_aware_timesteps_lower_the_bound_deterministically():
    from diffslim.methods.timesteps import solver_aware_timesteps, solver_error_bound

    from diffslim.zoo.registry import SD_DDIM_CONFIG

    ac = DDIMScheduler(**SD_DDIM_CONFIG).alphas_cumprod
    ts, info = solver_aware_timesteps(5, ac)
    assert ts == validate_timesteps(ts) and len(ts) == 5 and ts[0] == 999
    assert info["bound"] < info["init_bound"]
    assert solver_error_bound(np.array(info["lambdas"]), 2, True) == pytest.approx(info["bound"])
    assert solver_aware_timesteps(5, ac)[0] == ts  # no hidden randomness
    with pytest.raises(ValueError, match="steps must be >= 2"):
        solver_aware_timesteps(1, ac)
    with pytest.raises(ValueError, match="init must be"):
        solver_aware_timesteps(5, ac, init="edm")
