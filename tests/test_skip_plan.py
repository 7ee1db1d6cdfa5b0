"""Skip-plan runtime: identity when keeping all, exact cache hand-off, resets, dependencies, DeepCache equivalence."""

import numpy as np
import pytest
import torch

from diffslim.errors import UserError
from diffslim.methods.skip_plan import (
    OUTSIDE, apply_skip_plan, check_scheduler, deepcache_plan, effective_plan, effective_plan_soft, plan_macs_ratio,
    plan_units, random_plan, remove_skip_plan,
)

STEPS = 6


def _gen(pipe, labels=(3, 7), steps=STEPS, seed=0):
    g = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=g, output_type="pt").images


@pytest.fixture(scope="module")
def digits(tiny_digits_pipe):
    return tiny_digits_pipe


def test_units_and_consumers(digits):
    u = plan_units(digits.denoiser, "fine")
    c = plan_units(digits.denoiser, "coarse")
    assert len(c) == 9 and c.names[4] == "mid_block"
    assert len(u) == 27 and u.total_macs == c.total_macs
    # the last up layer feeds the tail; the first down layer also feeds an up layer by its skip connection
    assert u.consumers[-1] == (OUTSIDE,)
    assert len(u.consumers[0]) == 2 and all(k > 0 for k in u.consumers[0])
    # coarse: down block 0 feeds down block 1, up block 2 (its downsampler's skip) and up block 3
    assert c.consumers[0] == (1, 7, 8)


def test_keep_all_is_bit_identical_and_remove_restores(digits):
    full = _gen(digits)
    u = plan_units(digits.denoiser, "fine")
    rt = apply_skip_plan(digits.denoiser, np.ones((STEPS, len(u)), bool), u)
    try:
        assert torch.equal(_gen(digits), full)
        # nothing is ever read back, so nothing is held
        assert rt.state.generations == 1 and rt.cache_bytes() == 0 and rt.peak_cache_bytes() == 0
    finally:
        remove_skip_plan(digits.denoiser)
    assert not hasattr(digits.denoiser, "_diffusers_hook") or digits.denoiser._diffusers_hook.get_hook(
        "diffslim_skip_plan_root") is None
    assert torch.equal(_gen(digits), full)


def test_skipped_unit_returns_exact_cache_and_resets(digits):
    den = digits.denoiser
    u = plan_units(den, "coarse")
    plan = np.ones((STEPS, len(u)), bool)
    k, unit = 3, u.names.index("up_blocks.3")  # the last up block: nothing upstream depends on it alone
    plan[k, unit] = False
    rt = apply_skip_plan(den, plan, u)
    seen = []
    mod = den.get_submodule("up_blocks.3")
    # a torch hook on a child fires only when the unit really runs (the unit's own wraps the plan hook)
    h = mod.resnets[0].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        first = _gen(digits)
        assert len(seen) == STEPS - 1  # it ran at every step but k
        # a second generation: the reset is detected from the timestep going back up; same output
        second = _gen(digits)
        assert torch.equal(first, second) and rt.state.generations == 2
        # call the denoiser step by step: at step k the cached object itself is handed on
        rt.reset()
        x = torch.randn(2, 1, 8, 8)
        ctx = digits.cond_encoder(torch.tensor([1, 2]))
        digits.scheduler.set_timesteps(STEPS)
        pairs = []
        for t in digits.scheduler.timesteps:
            before = rt.state.caches.get("up_blocks.3")
            den(x, t.expand(2), encoder_hidden_states=ctx)
            pairs.append((before, rt.state.caches.get("up_blocks.3")))
        assert pairs[k - 1][1] is not None  # step k - 1 keeps its output: step k skips the unit
        assert pairs[k][1] is pairs[k][0]  # step k hands on that very object
        assert pairs[k + 1][1] is None and pairs[k - 2][1] is None  # otherwise nothing is held
        held = pairs[k - 1][1]
        assert rt.peak_cache_bytes() >= held.numel() * held.element_size() > 0
        assert rt.state.step == STEPS - 1
    finally:
        h.remove()
        remove_skip_plan(den)


def test_skip_changes_output_and_deterministic(digits):
    u = plan_units(digits.denoiser, "fine")
    full = _gen(digits)
    plan = random_plan(u, STEPS, 0.5, seed=1)
    assert np.array_equal(plan, random_plan(u, STEPS, 0.5, seed=1))
    apply_skip_plan(digits.denoiser, plan, u)
    try:
        a, b = _gen(digits), _gen(digits)
    finally:
        remove_skip_plan(digits.denoiser)
    assert torch.equal(a, b) and not torch.equal(a, full)


def test_effective_plan_dependencies_and_macs(digits):
    c = plan_units(digits.denoiser, "coarse")
    plan = np.ones((3, len(c)), bool)
    plan[1, c.names.index("up_blocks.0")] = False  # the only consumer of the mid block
    eff = effective_plan(plan, c)
    # down_blocks.3 feeds only the mid block and up_blocks.0 (its skip connections): off too
    assert [c.names[i] for i in np.flatnonzero(~eff[1])] == ["down_blocks.3", "mid_block", "up_blocks.0"]
    plan[1, c.names.index("up_blocks.1")] = False
    eff = effective_plan(plan, c)
    # down_blocks.2 feeds down_blocks.3, up_blocks.0 and up_blocks.1: all off now; down_blocks.1 also feeds up_blocks.2
    assert [c.names[i] for i in np.flatnonzero(~eff[1])] == ["down_blocks.2", "down_blocks.3", "mid_block",
                                                             "up_blocks.0", "up_blocks.1"]
    soft = effective_plan_soft(torch.tensor(plan, dtype=torch.float32), c)
    assert np.array_equal(soft.numpy()[1:] > 0.5, eff[1:])
    r = plan_macs_ratio(plan, c)
    expect = (3 * c.total_macs - sum(c.macs[i] for i in range(len(c)) if not eff[1, i])) / (3 * c.total_macs)
    assert r == pytest.approx(expect)


def test_bad_plans_and_schedulers(digits):
    u = plan_units(digits.denoiser, "fine")
    with pytest.raises(UserError, match="27 fine units"):
        apply_skip_plan(digits.denoiser, np.ones((STEPS, 5), bool), u)
    bad = np.ones((STEPS, len(u)), bool)
    bad[0, 3] = False
    with pytest.raises(UserError, match="step 0"):
        apply_skip_plan(digits.denoiser, bad, u)
    from diffusers import HeunDiscreteScheduler, PNDMScheduler

    cfg = digits.scheduler.config
    check_scheduler(PNDMScheduler.from_config(cfg, skip_prk_steps=True), 10, 10)
    with pytest.raises(UserError, match="one denoiser timestep per step"):
        check_scheduler(HeunDiscreteScheduler.from_config(cfg), 10, 10)
    apply_skip_plan(digits.denoiser, np.ones((3, len(u)), bool), u)
    try:
        with pytest.raises(UserError, match="has 3 steps"):
            _gen(digits, steps=4)
    finally:
        remove_skip_plan(digits.denoiser)


@pytest.mark.parametrize("branch", [0, 1])
def test_deepcache_plan_equals_deepcache_package(tiny_sd_pipe, branch):
    """Our DeepCache plan reproduces the DeepCache package's own helper bit for bit."""
    DeepCache = pytest.importorskip("DeepCache")
    pipe = tiny_sd_pipe
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=7, output_type="pt", guidance_scale=5.0)
    full = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    finally:
        helper.disable()
    u = plan_units(pipe.unet, "fine")
    plan = deepcache_plan(u, 7, 3, branch)
    assert not plan[1].all() and plan[3].all()
    apply_skip_plan(pipe.unet, plan, u)
    try:
        ours = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    finally:
        remove_skip_plan(pipe.unet)
    assert not torch.equal(ref, full)
    assert torch.equal(ours, ref)


def test_bench_methods_validate_arguments(digits):
    from types import SimpleNamespace

    from diffslim.bench import BenchContext, METHODS
    from diffslim.sample import SampleSpec

    def ctx(den):
        loaded = SimpleNamespace(denoiser=den, pipe=digits, zoo=None, source="x")
        return BenchContext(loaded=loaded, base_spec=SampleSpec([{"class_label": 1}], [0], num_inference_steps=10),
                            default_steps=10, dry_run=True)

    c = ctx(digits.denoiser)
    for name, arg, msg in (("dipgo", "1.2", r"\(0, 1\)"), ("random", "0", r"\(0, 1\)"), ("deepcache", "0", ">= 1"),
                           ("fbcache", None, "has none")):
        with pytest.raises(UserError, match=msg):
            METHODS[name](arg, c)
    assert METHODS["deepcache"]("3:1", c) is None and METHODS["ga"]("0.5:4", c) is None


def test_diffusers_cache_on_a_dit_resets_per_generation_and_removes():
    from diffslim.methods.skip_plan import apply_diffusers_cache, remove_diffusers_cache
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("digits-dit")
    pipe.denoiser.eval()  # freshly built modules are in train mode (dropout)
    pipe.set_progress_bar_config(disable=True)
    full = _gen(pipe)
    apply_diffusers_cache(pipe.denoiser, "fbcache", "1e9", STEPS)  # everything after step 0 reuses the cache
    try:
        a, b = _gen(pipe), _gen(pipe)
    finally:
        remove_diffusers_cache(pipe.denoiser, "fbcache")
    assert torch.equal(a, b) and not torch.equal(a, full)  # state reset between generations
    assert torch.equal(_gen(pipe), full)


def test_magcache_ratios_are_diffusers_own_and_calibrated_magcache_skips_by_them(tiny_digits_pipe):
    """Our MagCache calibration gives the ratios diffusers' ``calibrate=True`` mode prints, averages them over
    generations, and MagCache run on them is exact at threshold 0 and skips steps (the blocks do not run) above."""
    import ast
    import contextlib
    import io

    from diffusers import hooks as H

    from diffslim.methods.skip_plan import apply_diffusers_cache, magcache_ratios, remove_diffusers_cache
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("digits-dit")
    pipe.denoiser.eval()
    pipe.set_progress_bar_config(disable=True)
    den = pipe.denoiser
    full = _gen(pipe)
    ours = magcache_ratios(den, lambda: _gen(pipe))
    H.apply_mag_cache(den, H.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            _gen(pipe)
    finally:
        remove_diffusers_cache(den, "magcache")
    theirs = ast.literal_eval(printed.getvalue().strip().splitlines()[-1])
    assert len(ours) == STEPS and ours[0] == 1.0 and ours == pytest.approx(theirs, rel=1e-6, abs=0)
    assert len(set(ours[1:])) == STEPS - 1  # real measurements, not a constant

    other = magcache_ratios(den, lambda: _gen(pipe, seed=5))
    both = magcache_ratios(den, lambda: (_gen(pipe), _gen(pipe, seed=5)))  # two generations: their mean
    assert both == pytest.approx([(a + b) / 2 for a, b in zip(ours, other)], rel=1e-6)
    assert torch.equal(_gen(pipe), full)  # calibration leaves no hook behind

    calls = []
    h = den.transformer_blocks[1].attn1.register_forward_hook(lambda *a: calls.append(1))  # runs only if the block does
    try:
        apply_diffusers_cache(den, "magcache", "0", STEPS, mag_ratios=ours)
        try:
            exact = _gen(pipe)
            n_exact = len(calls)
        finally:
            remove_diffusers_cache(den, "magcache")
        calls.clear()
        apply_diffusers_cache(den, "magcache", "1e9:2", STEPS, mag_ratios=ours)
        try:
            skipping = _gen(pipe)
        finally:
            remove_diffusers_cache(den, "magcache")
    finally:
        h.remove()
    assert torch.equal(exact, full) and n_exact == STEPS
    # retention 0.2 of 6 steps keeps the first one; then at most 2 skipped in a row: run 0, 3 (skip 1-2, 4-5)
    assert len(calls) == 2 and not torch.equal(skipping, full)
    with pytest.raises(UserError, match=r"magcache:-1: .-1. is not a valid setting; .*THRESHOLD >= 0"):
        apply_diffusers_cache(den, "magcache", "-1", STEPS, mag_ratios=ours)
    with pytest.raises(UserError, match="no transformer blocks"):
        magcache_ratios(tiny_digits_pipe.denoiser, lambda: None)


def test_bench_magcache_rows_calibrate_first():
    """The bench's magcache rows run on ratios measured on its calibration inputs: threshold 0 is the full
    model (every step runs), an unbounded threshold with K=2 runs 2 of 6 steps; the rows say so."""
    from diffslim.bench import run_bench
    from diffslim.evaluate import metrics_fn_for
    from diffslim.models.load import LoadedModel
    from diffslim.train.zoo import build_pipeline
    from diffslim.zoo.evalsets import EvalSet

    torch.manual_seed(0)
    pipe = build_pipeline("digits-dit")
    pipe.denoiser.eval()
    loaded = LoadedModel("tiny-dit", "pipeline", pipe.denoiser, pipe=pipe)
    es = EvalSet(inputs=[{"class_label": i} for i in range(3)], seeds=list(range(3)))
    rows = {r["method"]: r for r in run_bench(loaded, "magcache:0,magcache:1e9:2", es, default_steps=STEPS,
                                              batch_size=3, metrics_fn=metrics_fn_for(loaded, es),
                                              progress=False).rows}
    assert rows["magcache:0"]["psnr"] == 100.0 and rows["magcache:0"]["macs_ratio"] == pytest.approx(1.0)
    assert rows["magcache:1e9:2"]["macs_ratio"] < 0.5 and rows["magcache:1e9:2"]["psnr"] < 100
    assert "ratios calibrated on 3 calibration inputs" in rows["magcache:1e9:2"]["notes"]


def test_bench_counts_first_block_cache_macs_over_the_batches_it_ran():
    """FirstBlockCache decides per batch, by the features, whether to reuse its cache: the bench's row costs what
    the batched run cost (here 4 inputs in one batch), not what sampling the first input alone would."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffslim.bench import count_run_macs, run_bench
    from diffslim.models.macs import attention_flop_mapping
    from diffslim.methods.skip_plan import apply_diffusers_cache, remove_diffusers_cache
    from diffslim.models.load import LoadedModel
    from diffslim.sample import SampleSpec, run_pipeline
    from diffslim.train.zoo import build_pipeline
    from diffslim.zoo.evalsets import EvalSet

    torch.manual_seed(0)
    pipe = build_pipeline("digits-dit")
    pipe.denoiser.eval()
    pipe.set_progress_bar_config(disable=True)
    spec = SampleSpec([{"class_label": i} for i in range(4)], [0, 1, 2, 3], num_inference_steps=8, batch_size=4)
    full = count_run_macs(pipe, spec)
    apply_diffusers_cache(pipe.denoiser, "fbcache", "0.2", 8)
    try:
        alone = count_run_macs(pipe, spec)
        with FlopCounterMode(display=False, custom_mapping=attention_flop_mapping()) as fc:
            run_pipeline(pipe, spec, [0, 1, 2, 3])
        batched = fc.get_total_flops() // 2 / 4
    finally:
        remove_diffusers_cache(pipe.denoiser, "fbcache")
    assert batched < full and abs(batched - alone) > 0.05 * full  # the first input alone skips other steps
    loaded = LoadedModel("tiny-dit", "pipeline", pipe.denoiser, pipe=pipe)
    es = EvalSet(inputs=spec.inputs, seeds=spec.seeds)
    row = run_bench(loaded, "fbcache:0.2", es, default_steps=8, batch_size=4, progress=False).rows[1]
    assert row["macs_per_sample"] == int(batched) and "counted over the whole run" in row["notes"]


def test_every_diffusers_cache_acts_on_a_dit_and_one_that_finds_nothing_is_refused():
    """Each cache the bench offers changes a DiT's outputs and costs fewer MACs (TaylorSeer's own patterns miss
    DiT's attn1/attn2, which went unnoticed as a row equal to the full model); a cache that hooks nothing is refused."""
    from diffslim.bench import count_run_macs
    from diffslim.methods.skip_plan import (DIFFUSERS_CACHES, apply_diffusers_cache, magcache_ratios,
                                            remove_diffusers_cache)
    from diffslim.sample import SampleSpec
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("digits-dit")
    pipe.denoiser.eval()
    pipe.set_progress_bar_config(disable=True)
    den, steps = pipe.denoiser, 8
    spec = SampleSpec([{"class_label": 3}], [0], num_inference_steps=steps)
    full, full_macs = _gen(pipe, steps=steps), count_run_macs(pipe, spec)
    ratios = magcache_ratios(den, lambda: _gen(pipe, steps=steps))
    args = {"fbcache": "1e9", "taylorseer": "2", "pab": "2", "fastercache": "2", "magcache": "1e9"}
    for name in DIFFUSERS_CACHES:
        apply_diffusers_cache(den, name, args[name], steps, mag_ratios=ratios)
        try:
            out, macs = _gen(pipe, steps=steps), count_run_macs(pipe, spec)
        finally:
            remove_diffusers_cache(den, name)
        assert not torch.equal(out, full) and macs < full_macs, name
    assert torch.equal(_gen(pipe, steps=steps), full)

    class NoAttention(torch.nn.Module):  # transformer blocks by name, no attention layer in them
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

        def forward(self, x, timestep=None):
            return self.transformer_blocks[0](x)

    with pytest.raises(UserError, match="taylorseer found no module of NoAttention to act on"):
        apply_diffusers_cache(NoAttention(), "taylorseer", None, steps)


def _tiny_dit_budget_bench():
    """A fresh 8-step digits DiT pipeline, 4 inputs, and ``share(name, setting)``: the MACs a cache setting costs
    on the bench's calibration inputs, as a share of the full model's."""
    from diffslim.bench import BenchContext, calibration_spec, count_run_macs
    from diffslim.methods.skip_plan import apply_diffusers_cache, remove_diffusers_cache
    from diffslim.models.load import LoadedModel
    from diffslim.sample import SampleSpec
    from diffslim.train.zoo import build_pipeline
    from diffslim.zoo.evalsets import EvalSet

    torch.manual_seed(0)
    pipe = build_pipeline("digits-dit")
    pipe.denoiser.eval()
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedModel("tiny-dit", "pipeline", pipe.denoiser, pipe=pipe)
    es = EvalSet(inputs=[{"class_label": i} for i in range(4)], seeds=list(range(4)))
    ctx = BenchContext(loaded=loaded, base_spec=SampleSpec(es.inputs, es.seeds, num_inference_steps=8, batch_size=4),
                       default_steps=8)
    calib = calibration_spec(ctx)
    full = count_run_macs(pipe, calib, whole_run=True)

    def share(name, setting):
        apply_diffusers_cache(pipe.denoiser, name, setting, 8)
        try:
            return count_run_macs(pipe, calib, whole_run=True) / full
        finally:
            remove_diffusers_cache(pipe.denoiser, name)

    return loaded, es, share


def _refused_before_sampling(loaded, es, methods, match):
    """``methods`` stop the bench with ``match`` before any row is sampled (no sampling lost)."""
    import diffslim.bench as bench_module
    from diffslim.bench import run_bench

    sampled = []
    real_sample = bench_module.sample
    bench_module.sample = lambda *a, **k: sampled.append(1) or real_sample(*a, **k)
    try:
        with pytest.raises(UserError, match=match):
            run_bench(loaded, methods, es, default_steps=8, batch_size=4, progress=False)
    finally:
        bench_module.sample = real_sample
    assert sampled == []


@pytest.mark.parametrize("name,budget", [("taylorseer", 0.85), ("pab", 0.8), ("fastercache", 0.8)])
def test_bench_interval_caches_search_the_least_interval_for_a_macs_budget(name, budget):
    """taylorseer|pab|fastercache:macs=M: the least interval whose run on the calibration inputs costs at most M of
    the MACs (one step shorter costs more); a budget no interval reaches stops the bench before any sampling."""
    import re

    from diffslim.bench import run_bench

    loaded, es, share = _tiny_dit_budget_bench()
    row = run_bench(loaded, f"{name}:macs={budget}", es, default_steps=8, batch_size=4, progress=False).rows[1]
    assert row["method"] == f"{name}:macs={budget}"
    k = int(re.search(rf"interval (\d+) searched for at most {budget} of the MACs", row["notes"]).group(1))
    assert share(name, str(k)) <= budget and (k == 2 or share(name, str(k - 1)) > budget)
    _refused_before_sampling(loaded, es, f"steps:4,{name}:macs=0.01",
                             rf"{name}:macs=0.01: even at its longest interval \(8 steps\)")


def test_bench_threshold_caches_search_the_least_threshold_for_a_macs_budget():
    """fbcache:macs=M: the least threshold whose run on the calibration inputs costs at most M of the MACs (a
    slightly smaller one costs more); the settings are checked before anything runs."""
    import re

    from diffslim.bench import METHODS, BenchContext, run_bench

    loaded, es, share_of = _tiny_dit_budget_bench()
    row = run_bench(loaded, "fbcache:macs=0.6", es, default_steps=8, batch_size=4, progress=False).rows[1]
    assert row["method"] == "fbcache:macs=0.6"
    thr = float(re.search(r"threshold ([0-9.e+-]+) searched for at most 0.6 of the MACs", row["notes"]).group(1))

    def share(t):
        return share_of("fbcache", f"{t:.6g}")

    assert share(thr) <= 0.6 < share(thr / 1.01)
    dry = BenchContext(loaded=loaded, base_spec=None, default_steps=8, dry_run=True)
    for name, arg, msg in (("fbcache", "macs=1.5", "0 < M < 1"), ("pab", "macs=0.5:3", "takes nothing after it"),
                           ("fbcache", "macs=0.5:2", "sets its threshold")):
        with pytest.raises(UserError, match=msg):
            METHODS[name](arg, dry)
    # a budget no threshold reaches stops the bench before any row is sampled (no sampling lost)
    _refused_before_sampling(loaded, es, "steps:4,magcache:macs=0.01", r"magcache:macs=0.01: even with an unbounded "
                                                                         "threshold")


def test_idle_steps_reuse_the_unet_output_without_calling_it(digits):
    """A step at which no unit runs returns the previous output without the call: same images as the
    per-unit path, the denoiser's conv_in does not run at those steps, and they cost no MACs."""
    import dataclasses

    den = digits.denoiser
    u = plan_units(den, "fine")
    assert u.reuse_output
    plan = random_plan(u, STEPS, 0.6, seed=4)
    plan[[2, 3, 5]] = False  # idle steps
    eff = effective_plan(plan, u)
    busy = int(eff.any(axis=1).sum())  # a skipped last unit idles its whole step too
    assert busy <= STEPS - 3
    calls = []
    h = den.conv_in.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        apply_skip_plan(den, plan, u)
        fast = _gen(digits)
        assert len(calls) == busy
        apply_skip_plan(den, plan, dataclasses.replace(u, reuse_output=False))
        calls.clear()
        slow = _gen(digits)
        assert len(calls) == STEPS and torch.equal(fast, slow)
    finally:
        h.remove()
        remove_skip_plan(den)
    kept = float((eff * np.asarray(u.macs, dtype=np.float64)).sum())
    assert plan_macs_ratio(plan, u) == pytest.approx((u.outside_macs * busy + kept) / (STEPS * u.total_macs))
    assert plan_macs_ratio(plan, dataclasses.replace(u, reuse_output=False)) == pytest.approx(
        (u.outside_macs * STEPS + kept) / (STEPS * u.total_macs))


def test_transformers_never_reuse_the_output():
    from diffusers import DiTTransformer2DModel

    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    u = plan_units(tr, "fine")
    assert not u.reuse_output  # the final adaLN reads the timestep
    plan = np.ones((3, len(u)), bool)
    plan[1] = False
    # the call still runs the embeddings and the final layer, but not the patch embedding the skipped first block
    # alone reads
    assert plan_macs_ratio(plan, u) == pytest.approx(
        (3 * u.total_macs - sum(u.macs) - u.stem_macs) / (3 * u.total_macs))


def test_units_measured_on_the_pipelines_own_call_give_the_counted_macs_ratio():
    """An SR pipeline calls its U-Net at the size of its input, not at the config's sample_size, and
    attention grows faster with size than convolution: a plan's MACs ratio from ``plan_units_at``
    equals the ratio FlopCounterMode counts for the denoiser over a real run; the config-size one does not."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffslim.models.macs import attention_flop_mapping
    from diffslim.methods.skip_plan import plan_units_at
    from diffslim.sample import SampleSpec, run_pipeline
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("sr")
    pipe.set_progress_bar_config(disable=True)
    den = pipe.denoiser
    size = den.config.sample_size
    lr = torch.rand(3, size, size)  # the U-Net runs at the HR size: upscale x the config's sample_size
    spec = SampleSpec(inputs=[{"image": lr}], seeds=[0], num_inference_steps=STEPS, batch_size=1)
    at_config, at_call = plan_units(den, "fine"), plan_units_at(pipe, spec, "fine")
    assert at_call.names == at_config.names and at_call.consumers == at_config.consumers

    def denoiser_macs():
        with FlopCounterMode(display=False, custom_mapping=attention_flop_mapping()) as fc:
            run_pipeline(pipe, spec, [0])
        return sum(fc.get_flop_counts()[type(den).__name__].values()) // 2

    full = denoiser_macs()
    assert at_call.total_macs * STEPS == full
    plan = deepcache_plan(at_call, STEPS, 3, 0)
    apply_skip_plan(den, plan, at_call)
    try:
        measured = denoiser_macs() / full
        with pytest.raises(UserError, match="remove the installed skip plan"):
            plan_units_at(pipe, spec)
    finally:
        remove_skip_plan(den)
    assert plan_macs_ratio(plan, at_call) == pytest.approx(measured, rel=1e-9)
    assert abs(plan_macs_ratio(plan, at_config) - measured) > 5e-3


def _stemless(u):
    import dataclasses

    return dataclasses.replace(u, stem=(), stem_macs=0, tail=())


def test_transformer_skips_a_dead_patch_embedding_and_reuses_its_final_norm():
    """On a DiT, the patch embedding does not run where the first block is skipped, and the final norm is
    not recomputed while the last block hands on its cache: the images equal those of the runtime that
    runs both every call, the calls are counted, and the MACs FlopCounterMode counts over the run are
    those ``plan_macs_ratio`` and the pruner's ``kept_macs`` give."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffslim.models.macs import attention_flop_mapping
    from diffslim.methods.dipgo import kept_macs
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("digits-dit")
    pipe.denoiser.eval()
    pipe.set_progress_bar_config(disable=True)
    den = pipe.denoiser
    u = plan_units(den, "fine")
    assert u.stem == ("pos_embed",) and u.tail == ("norm_out",) and 0 < u.stem_macs < u.outside_macs
    plan = np.ones((STEPS, len(u)), bool)
    plan[1, :] = False  # nothing runs
    plan[2, 0] = False  # the first block is skipped, the others run
    plan[3, -1] = False  # the last block is skipped: so are all the others
    plan[4, 0] = plan[4, -1] = False
    eff = effective_plan(plan, u)
    calls = {"pos_embed": 0, "norm_out": 0}

    def counting(m):  # counts the module's own forward runs (a torch forward hook fires on every call)
        forward = getattr(den, m).forward

        def run_forward(*a, **k):
            calls[m] += 1
            return forward(*a, **k)
        return run_forward

    for m in calls:  # installed before the plan's hooks, which then wrap it
        setattr(getattr(den, m), "forward", counting(m))

    def run(units, count=False):
        calls.update(pos_embed=0, norm_out=0)
        rt = apply_skip_plan(den, plan, units)
        try:
            if not count:
                return _gen(pipe), rt.peak_cache_bytes()
            with FlopCounterMode(display=False, custom_mapping=attention_flop_mapping()) as fc:
                _gen(pipe)
            return sum(fc.get_flop_counts()[type(den).__name__].values()) // 2
        finally:
            remove_skip_plan(den)

    try:
        full = _gen(pipe)
        per_step = calls["norm_out"] // STEPS  # denoiser calls per step
        (slow, slow_bytes), (fast, fast_bytes) = run(_stemless(u)), run(u)
        assert torch.equal(fast, slow) and not torch.equal(fast, full)
        assert calls["pos_embed"] == per_step * int(eff[:, 0].sum())
        assert calls["norm_out"] == per_step * int(eff[:, -1].sum())
        assert fast_bytes > slow_bytes  # the reused norm output is counted as cache
        with FlopCounterMode(display=False, custom_mapping=attention_flop_mapping()) as fc:
            _gen(pipe)
        full_macs = sum(fc.get_flop_counts()[type(den).__name__].values()) // 2
        measured = run(u, count=True) / full_macs
    finally:
        for m in calls:
            delattr(getattr(den, m), "forward")
    assert plan_macs_ratio(plan, u) == pytest.approx(measured, rel=1e-9)
    assert plan_macs_ratio(plan, u) < plan_macs_ratio(plan, _stemless(u))
    gates = torch.as_tensor(plan, dtype=torch.float64)
    assert float(kept_macs(effective_plan_soft(gates, u), u)) == pytest.approx(measured, rel=1e-9)
    # keep-all: nothing is skipped, nothing is held
    rt = apply_skip_plan(den, np.ones((STEPS, len(u)), bool), u)
    try:
        assert torch.equal(_gen(pipe), full) and rt.peak_cache_bytes() == 0
    finally:
        remove_skip_plan(den)


def test_sd3_skip_layers_keeps_the_patch_embedding_running():
    """SD3's own ``skip_layers`` bypasses a block without calling it, so the patch embedding's output reaches
    the next block: with ``skip_layers`` the stem is not skipped, and the result equals the runtime's without it."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    u = plan_units(sd3, "fine")
    assert u.stem == ("pos_embed",) and u.tail == ()  # SD3's final norm reads the timestep embedding
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = dict(encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g))
    plan = np.ones((3, len(u)), bool)
    plan[1:, 0] = False

    def run(units, **kw):
        apply_skip_plan(sd3, plan, units)
        try:
            with torch.no_grad():
                return [sd3(x, timestep=torch.tensor([t]), **cond, **kw).sample for t in (900, 600, 300)]
        finally:
            remove_skip_plan(sd3)

    for kw in ({}, {"skip_layers": [0]}):
        assert all(torch.equal(a, b) for a, b in zip(run(u, **kw), run(_stemless(u), **kw)))


def _guided_loop(model, cond, uncond, steps, split: bool, context: bool = False):
    """A classifier-free-guided denoising loop on a U-Net or a PixArt transformer: one batched call per step, or
    (``split``) a cond call and an uncond call on the same latents, as Lumina2 and CogView4 do (``context``: named
    by ``cache_context``, as CogView4 names them)."""
    import contextlib

    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    @contextlib.contextmanager
    def named(name):  # what diffusers' CacheMixin.cache_context does (PixArt's model class has no such method)
        _set_cache_context(model, CacheContext(name))
        try:
            yield
        finally:
            _set_cache_context(model, None)

    def call(x, t, emb):
        if hasattr(model, "down_blocks"):
            return model(x, t, encoder_hidden_states=emb).sample
        return model(x, encoder_hidden_states=emb, timestep=t.expand(len(x)), added_cond_kwargs={},
                     return_dict=False)[0][:, :4]

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in torch.linspace(900, 100, steps).long():
        if split:
            ctx = named if context else (lambda name: contextlib.nullcontext())
            with ctx("cond"):
                c = call(x, t, cond)
            with ctx("uncond"):
                u = call(x, t, uncond)
        else:
            u, c = call(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
        x = x - 0.1 * (u + 3.0 * (c - u))
    return x


def test_a_plan_keeps_the_cond_and_uncond_calls_of_a_step_apart(tiny_sd_pipe):
    """A pipeline that guides with two calls per step on the same latents (cond, then uncond) samples with a skip
    plan as the batched call does: each call reads the cache its own kind left at the step before (the uncond
    call read the cond call's features, and its guidance went wrong)."""
    unet = tiny_sd_pipe.unet
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 77, 16, generator=g), torch.randn(1, 77, 16, generator=g)
    u = plan_units(unet, "fine")
    plan = deepcache_plan(u, 5, 2, 0)
    with torch.no_grad():
        full = _guided_loop(unet, cond, uncond, 5, split=True)
        apply_skip_plan(unet, plan, u)
        try:
            batched = _guided_loop(unet, cond, uncond, 5, split=False)
            split = _guided_loop(unet, cond, uncond, 5, split=True)
        finally:
            remove_skip_plan(unet)
    assert not torch.allclose(batched, full, atol=1e-4)  # the plan skips work that matters
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-5)


def test_diffusers_caches_keep_the_calls_of_a_step_apart_by_their_names(tiny_sd_pipe):
    """diffusers' caches keep a state per call name: the bench's context hook named every call "cond", so a
    pipeline's uncond call (named by the pipeline, or a second call on the step's latents) shared the cond call's
    state. With FirstBlockCache at a threshold that reuses everything after the first step, each call now reuses
    its own residual: the split loops sample as the batched one does."""
    from test_pipeline_families import _tiny_pixart

    from diffslim.methods.skip_plan import apply_diffusers_cache, remove_diffusers_cache

    model = _tiny_pixart(tiny_sd_pipe, 3).transformer
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    with torch.no_grad():
        full = _guided_loop(model, cond, uncond, 4, split=False)
        apply_diffusers_cache(model, "fbcache", "1e9", 4)
        try:
            batched = _guided_loop(model, cond, uncond, 4, split=False)
            split = _guided_loop(model, cond, uncond, 4, split=True)
            named = _guided_loop(model, cond, uncond, 4, split=True, context=True)
        finally:
            remove_diffusers_cache(model, "fbcache")
    assert not torch.allclose(batched, full, atol=1e-4)  # the cache reuses work that matters
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(named, batched, rtol=1e-4, atol=1e-5)


def test_a_plan_counts_the_steps_of_a_denoiser_whose_timestep_grows():
    """Lumina2's timestep runs from 0 (noise) to 1 (the image): the step rule took every call for a new generation,
    so every step ran as step 0, with nothing skipped. Its steps count up now: a plan that skips every unit after
    the first step changes the outputs there, and a keep-all plan changes nothing."""
    from test_layer_prune import _tiny_family_denoiser

    model, kw = _tiny_family_denoiser("lumina2")
    u = plan_units(model, "fine", count_macs=False)

    def run():
        outs = []
        for t in (0.1, 0.5, 0.9):
            outs.append(model(**{**kw, "timestep": torch.tensor([t, t])}, return_dict=False)[0])
        return outs

    with torch.no_grad():
        full = run()
        for plan, same in ((np.ones((3, len(u.names)), bool), True), (np.array([[True] * len(u.names)] + [
                [False] * len(u.names)] * 2), False)):
            apply_skip_plan(model, plan, u)
            try:
                outs = run()
            finally:
                remove_skip_plan(model)
            assert torch.equal(outs[0], full[0])
            assert all(torch.equal(a, b) for a, b in zip(outs[1:], full[1:])) == same


@pytest.mark.parametrize("family", ["lumina2", "zimage", "flux", "qwenimage", "chroma", "flux2"])
def test_pab_windows_read_the_schedulers_timestep_where_a_pipeline_calls_with_another_scale(family):
    """PAB reuses attention for timesteps in (100, 800) of the scheduler's 0..1000, 1000 at noise. Lumina2 and
    Z-Image are called with 1 - t / 1000 and Flux and Qwen-Image with t / 1000, so the window never opened there and
    the bench's pab row was the full model (100 dB). On the scheduler's scale (``schedule_timestep``) the middle calls reuse
    attention and change, and the first, at noise, does not."""
    from diffslim.methods.skip_plan import apply_diffusers_cache, remove_diffusers_cache, schedule_timestep
    from test_layer_prune import _tiny_family_denoiser

    if family == "flux":
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
        g = torch.Generator().manual_seed(1)
        kw = dict(hidden_states=torch.randn(1, 16, 8, generator=g), encoder_hidden_states=torch.randn(1, 4, 16, generator=g),
                  pooled_projections=torch.randn(1, 8, generator=g), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(4, 3))
        times, key = [1.0, 0.75, 0.5, 0.25], "timestep"  # t / 1000 of 1000, 750, 500, 250
    elif family in ("qwenimage", "chroma", "flux2"):
        model, kw = _tiny_family_denoiser(family)
        kw = {k: v if k in ("img_ids", "txt_ids") else v[:1] for k, v in kw.items() if k != "timestep"}
        times, key = [1.0, 0.75, 0.5, 0.25], "timestep"
    else:
        model, kw = _tiny_family_denoiser(family)
        times, key = [0.0, 0.25, 0.5, 0.75], "timestep" if family == "lumina2" else "t"
    assert [schedule_timestep(model, t) for t in times] == [1000.0, 750.0, 500.0, 250.0]

    def run():
        with torch.no_grad():
            outs = [model(**{**kw, key: torch.full((len(kw.get("x", [0])) if family == "zimage" else
                                                    kw["hidden_states"].shape[0],), t)}, return_dict=False)[0]
                    for t in times]
        return [torch.stack(list(o)) if isinstance(o, (list, tuple)) else o for o in outs]

    full = run()
    apply_diffusers_cache(model, "pab", "2", len(times))
    try:
        cached = run()
    finally:
        remove_diffusers_cache(model, "pab")
    assert torch.equal(cached[0], full[0])
    assert not all(torch.equal(a, b) for a, b in zip(cached[1:], full[1:]))


def test_fbcache_is_refused_where_the_first_block_returns_two_streams_and_the_last_one(tiny_sd_pipe):
    """Flux.2's two-stream blocks return both streams and its one-stream blocks a bare tensor: diffusers 0.42's
    FirstBlockCache subtracts the first block's output (a list) from the last one's and crashed mid-sampling
    (``TypeError: unsupported operand type(s) for -: 'Tensor' and 'list'``). It is refused before anything samples;
    Flux's blocks (both return two streams) are not."""
    from diffslim.errors import UserError
    from diffslim.methods.skip_plan import check_diffusers_cache
    from test_layer_prune import _tiny_family_denoiser
    from test_pipeline_families import _tiny_flux

    flux2, _ = _tiny_family_denoiser("flux2")
    with pytest.raises(UserError, match="first block returns two streams where its last returns one"):
        check_diffusers_cache(flux2, "fbcache")
    check_diffusers_cache(flux2, "magcache")
    check_diffusers_cache(_tiny_flux(tiny_sd_pipe).transformer, "fbcache")
