import json
import subprocess
import sys

import numpy as np

import pytest
import torch

from diffslim import Recipe, RecipeError, apply, load_recipe
from diffslim.recipe import SCHEDULERS, parse_recipe
from diffslim.sample import SCHEDULER_CLASSES, SampleSpec, sample


def test_empty_recipe_is_identity_and_roundtrips(tmp_path):
    r = Recipe()
    assert r.is_identity()
    p = r.save(tmp_path / "r.json")
    assert load_recipe(p) == r
    assert json.loads(p.read_text()) == {"schema_version": 1}


@pytest.mark.parametrize("data, field", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"sampling": {"steps": 3}}, "sampling.steps: unknown key"),
    ({"sampling": {"scheduler": "fast"}}, "sampling.scheduler: unknown scheduler 'fast'"),
    ({"sampling": {"num_inference_steps": 0}}, "sampling.num_inference_steps: must be a positive integer"),
    ({"sampling": {"timesteps": [10, 500]}}, "sampling.timesteps: must be strictly descending"),
    ({"sampling": {"timesteps": [999, 999, 0]}}, "sampling.timesteps: must be strictly descending"),
    ({"sampling": {"timesteps": [1200, 0]}}, "sampling.timesteps: every timestep must lie in 0..999"),
    ({"sampling": {"timesteps": [900, 0], "num_inference_steps": 3}}, "differs from len(timesteps)"),
    ({"schema_version": 7}, "schema_version 7 is not supported"),
    ([1, 2], "a recipe is a JSON object"),
])
def test_bad_recipes_name_the_field(data, field):
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    assert field in str(e.value)
    assert "\n" not in str(e.value)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(bad)


def test_compose_merges_sections_and_rejects_overlap():
    a = Recipe(model="zoo:digits-sd")
    b = parse_recipe({"sampling": {"num_inference_steps": 5}})
    c = a.compose(b)
    assert c.model == "zoo:digits-sd" and c.sampling.num_inference_steps == 5
    with pytest.raises(RecipeError, match="both recipes set section"):
        c.compose(b)


def test_scheduler_names_agree():
    assert set(SCHEDULERS) == set(SCHEDULER_CLASSES)


def _spec(n=4, steps=6):
    return SampleSpec([{"class_label": i % 10} for i in range(n)], list(range(n)), num_inference_steps=steps,
                      batch_size=4)


def test_apply_sampling_matches_explicit_call(tiny_digits_pipe):
    import copy

    pipe = copy.deepcopy(tiny_digits_pipe)
    want = sample(pipe, _spec(steps=3).replace(scheduler="euler"))
    apply(pipe, {"sampling": {"scheduler": "euler", "num_inference_steps": 3}})
    # the pipeline now samples the recipe's schedule whatever step count the caller asks for
    got = sample(pipe, _spec(steps=50))
    assert torch.equal(got, want)
    assert len(pipe.scheduler.timesteps) == 3


def test_apply_explicit_timesteps(tiny_digits_pipe):
    import copy

    pipe = copy.deepcopy(tiny_digits_pipe)
    apply(pipe, {"sampling": {"scheduler": "euler", "timesteps": [999, 700, 300, 50]}})
    sample(pipe, _spec(n=1))
    assert pipe.scheduler.timesteps.tolist() == [999, 700, 300, 50]


def test_a_sampling_section_and_a_skip_plan_apply_together(tiny_digits_pipe):
    """A pinned schedule survives the copies that checks make with ``from_config`` (the skip-plan installer checks
    the scheduler on one): sampling + skip_plan in one recipe, as the workflow writes them, used to fail."""
    import copy

    from diffslim.apply import pin_schedule
    from diffslim.methods.skip_plan import plan_units

    pinned = pin_schedule(tiny_digits_pipe.scheduler, 4)
    again = type(pinned).from_config(pinned.config)
    again.set_timesteps(50)
    assert len(again.timesteps) == 4
    units = plan_units(tiny_digits_pipe.denoiser, "fine", count_macs=False)
    plan = [[True] * len(units)] + [[i % 2 == 0 for i in range(len(units))]] * 3
    pipe = copy.deepcopy(tiny_digits_pipe)
    apply(pipe, {"sampling": {"num_inference_steps": 4},
                 "skip_plan": {"granularity": "fine", "units": list(units.names), "plan": plan}})
    got = sample(pipe, _spec(n=2, steps=50))
    assert len(pipe.scheduler.timesteps) == 4
    assert not torch.equal(got, sample(copy.deepcopy(tiny_digits_pipe), _spec(n=2, steps=4)))


def test_apply_timesteps_ddim_becomes_non_uniform_and_pndm_is_rejected(tiny_digits_pipe):
    import copy

    from diffslim.methods.timesteps import NonUniformDDIMScheduler

    pipe = copy.deepcopy(tiny_digits_pipe)
    apply(pipe, {"sampling": {"scheduler": "ddim", "timesteps": [999, 500, 1]}})
    assert isinstance(pipe.scheduler, NonUniformDDIMScheduler)
    sample(pipe, _spec(n=1))
    assert pipe.scheduler.timesteps.tolist() == [999, 500, 1]
    with pytest.raises(RecipeError, match="accepts no explicit timesteps"):
        apply(copy.deepcopy(tiny_digits_pipe), {"sampling": {"scheduler": "pndm", "timesteps": [999, 500, 1]}})


def test_identity_recipe_reproduces_full_model_bit_for_bit(tiny_digits_pipe):
    import copy

    pipe = copy.deepcopy(tiny_digits_pipe)
    before = sample(pipe, _spec())
    apply(pipe, Recipe())
    assert torch.equal(sample(pipe, _spec()), before)


def test_a_pipeline_with_a_recipe_saves_and_plain_diffusers_loads_it_back(tiny_sd_pipe, tmp_path):
    """save_pretrained writes a pinned scheduler as its base class, which diffusers loads back (unpinned: the steps
    live in the recipe); a non-uniform DDIM loads through its diffslim module. Pinned, the pipeline refuses
    timesteps of its own instead of diffusers' 'does not support custom timestep schedules'."""
    import copy

    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    from diffslim.errors import UserError
    from diffslim.methods.timesteps import NonUniformDDIMScheduler

    pipe = copy.deepcopy(tiny_sd_pipe)
    apply(pipe, {"sampling": {"scheduler": "euler", "num_inference_steps": 3}})
    assert type(pipe.scheduler) is not EulerDiscreteScheduler and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    pipe.save_pretrained(tmp_path / "euler")
    assert json.loads((tmp_path / "euler" / "model_index.json").read_text())["scheduler"] == \
        ["diffusers", "EulerDiscreteScheduler"]
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "euler").scheduler) is EulerDiscreteScheduler
    with pytest.raises(UserError, match="the recipe fixes the schedule"):
        pipe("a cat", timesteps=[999, 500], height=32, width=32, output_type="pt")

    pipe = copy.deepcopy(tiny_sd_pipe)
    apply(pipe, {"sampling": {"scheduler": "ddim", "timesteps": [999, 500, 1]}})
    pipe("a cat", num_inference_steps=2, timesteps=[999, 500, 1], height=32, width=32, output_type="pt")  # its own
    assert pipe.scheduler.timesteps.tolist() == [999, 500, 1]
    pipe.save_pretrained(tmp_path / "ddim")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "ddim").scheduler) is NonUniformDDIMScheduler
    # in a fresh process ``import diffslim`` is enough (diffusers loads only modules that are imported already)
    code = ("import diffslim; from diffusers import DiffusionPipeline; "
            f"print(type(DiffusionPipeline.from_pretrained({str(tmp_path / 'ddim')!r}).scheduler).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("NonUniformDDIMScheduler"), r.stderr[-500:]


def test_pinned_schedulers_that_set_their_timesteps_while_constructed(tiny_sd_pipe, caplog):
    """Heun's and LMS's constructors call set_timesteps themselves (Heun with a third positional argument that is
    not timesteps): pinned, Heun failed to construct and LMS warned of a count nobody asked for. Heun now samples
    its pinned steps (two calls per step but the last) and timesteps, and LMS pins without a word."""
    import copy
    import logging

    seen = []

    def record(pipe, i, t, kw):
        seen.append(int(t))
        return kw

    for section, want in (({"scheduler": "heun", "num_inference_steps": 3}, 3),
                          ({"scheduler": "heun", "timesteps": [999, 500, 1]}, [999, 500, 500, 1, 1])):
        pipe = apply(copy.deepcopy(tiny_sd_pipe), {"sampling": section})
        seen.clear()
        out = pipe("a cat", num_inference_steps=7, height=32, width=32, output_type="np", callback_on_step_end=record,
                   generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
        assert (len(set(seen)) == want if isinstance(want, int) else seen == want), seen
    caplog.clear()  # (Heun was asked for 7 steps above: one warning each)
    with caplog.at_level(logging.WARNING, logger="diffslim.apply"):
        pipe = apply(copy.deepcopy(tiny_sd_pipe), {"sampling": {"scheduler": "lms", "num_inference_steps": 3}})
    assert caplog.records == [] and type(pipe.scheduler).__name__ == "LMSDiscreteScheduler"
    pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="np")
    assert len(pipe.scheduler.timesteps) == 3


def test_apply_checks_its_arguments_adds_to_what_is_installed_and_leaves_a_pipeline_as_it_was_on_failure(
        tiny_digits_pipe):
    import copy

    import diffslim
    from diffslim.errors import UserError
    from diffslim.methods.skip_plan import plan_units

    pipe = copy.deepcopy(tiny_digits_pipe)
    recipe = {"sampling": {"num_inference_steps": 4}}
    for args, says in (((pipe.denoiser, recipe), "apply takes a diffusers pipeline"),
                       ((recipe, pipe), "apply takes a diffusers pipeline"),
                       ((pipe, None), "a recipe is a diffslim.Recipe, a dict, a JSON text or the path"),
                       ((pipe, '{"sampling": '), "the recipe text is not valid JSON")):
        with pytest.raises((UserError, RecipeError), match=says):
            apply(*args)
    # a JSON text, then a section with only a scheduler: the pinned steps stay, and the record holds both
    apply(pipe, json.dumps(recipe))
    apply(pipe, {"sampling": {"scheduler": "euler"}})
    sample(pipe, _spec(n=1, steps=50))
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and len(pipe.scheduler.timesteps) == 4
    assert pipe._diffslim_recipe.sampling.model_dump(exclude_none=True) == {"scheduler": "euler",
                                                                            "num_inference_steps": 4}
    # a skip plan, then a recipe whose later section does not fit: the scheduler, the denoiser and its plan stay
    units = plan_units(pipe.denoiser, "fine", count_macs=False)
    plan = [[True] * len(units)] + [[i % 2 == 0 for i in range(len(units))]] * 3
    apply(pipe, {"skip_plan": {"granularity": "fine", "units": list(units.names), "plan": plan}})
    before = sample(pipe, _spec(n=2, steps=4))
    scheduler, den, runtime = pipe.scheduler, pipe.denoiser, pipe.denoiser._diffslim_skip_plan
    with pytest.raises(RecipeError, match="^skip_plan.units: the plan names 2 fine units, this model has"):
        apply(pipe, {"sampling": {"scheduler": "ddim", "num_inference_steps": 4},  # installs, then the plan fails
                     "skip_plan": {"units": ["down_blocks.9", "mid_block"], "plan": [[True, True]] * 4}})
    assert pipe.scheduler is scheduler and pipe.denoiser is den and den._diffslim_skip_plan is runtime
    assert torch.equal(sample(pipe, _spec(n=2, steps=4)), before)
    # what diffslim.load returns: its pipeline gets the recipe, and its denoiser follows
    loaded = diffslim.load("zoo:digits-sd")
    assert "UNet2DConditionModel(" not in repr(loaded)  # no whole model in a notebook's output
    got = apply(loaded, {"removed_layers": {"layers": ["up_blocks.3.resnets.1"]}})
    assert got is loaded.pipe and loaded.denoiser is loaded.pipe.denoiser
    assert type(loaded.denoiser).__name__ == "LayerPrunedUNet2DConditionModel"


def test_a_pinned_pipeline_asked_for_other_steps_says_so_once(tiny_digits_pipe, caplog):
    """A pinned pipeline samples the recipe's steps whatever it is asked: a count other than the recipe's and than
    the pipeline's own default (which a caller gets without asking) logs one warning per count, naming both."""
    import copy
    import logging

    pipe = apply(copy.deepcopy(tiny_digits_pipe), {"sampling": {"num_inference_steps": 3}})
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="diffslim.apply"):
        plain = pipe([1], generator=gen(), output_type="np").images
        assert caplog.records == []  # the pipeline's default count, 50: nothing asked
        pipe([1], num_inference_steps=3, generator=gen(), output_type="np")
        assert caplog.records == []  # the recipe's own count
        asked = pipe([1], num_inference_steps=7, generator=gen(), output_type="np").images
        pipe([1], num_inference_steps=7, generator=gen(), output_type="np")
    assert [r.getMessage() for r in caplog.records] == [
        f"{type(pipe.scheduler).__name__}: asked for num_inference_steps=7, but the recipe fixes the schedule at 3 "
        "steps; sampling 3 (diffslim.apply pinned them)"]
    assert len(pipe.scheduler.timesteps) == 3
    assert (plain == asked).all()


def test_a_pipeline_with_fused_projections_prunes_and_samples_as_the_unfused_one(tiny_sd_pipe):
    """fuse_qkv_projections() before apply: the pruned copy got the fused processors but not the fused projections
    they read ('Attention' object has no attribute 'to_qkv'). It shares them now, samples what the unfused pruned
    pipeline samples, and unfuse_qkv_projections() gives back the kept layers' processors."""
    import copy

    from diffslim.methods.layer_prune import candidate_names

    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for recipe in ({"depth": {"depth": 2}}, {"removed_layers": {"layers": candidate_names(tiny_sd_pipe.unet)[-2:]}}):
        plain = apply(copy.deepcopy(tiny_sd_pipe), recipe)
        want = plain("a cat", num_inference_steps=2, height=32, width=32, output_type="np", generator=gen()).images
        fused = copy.deepcopy(tiny_sd_pipe)
        fused.fuse_qkv_projections()
        apply(fused, recipe)
        attn = [m for m in fused.unet.modules() if type(m).__name__ == "Attention"]
        assert attn and all(m.fused_projections and hasattr(m, "to_qkv" if not m.is_cross_attention else "to_kv")
                            for m in attn)
        got = fused("a cat", num_inference_steps=2, height=32, width=32, output_type="np", generator=gen()).images
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        fused.unfuse_qkv_projections()
        assert {type(p).__name__ for p in fused.unet.attn_processors.values()} == \
            {type(p).__name__ for p in plain.unet.attn_processors.values()}
        back = fused("a cat", num_inference_steps=2, height=32, width=32, output_type="np", generator=gen()).images
        np.testing.assert_allclose(back, want, atol=1e-5, rtol=0)


def test_a_denoiser_replaced_after_a_skip_plan_is_freed(tiny_sd_pipe):
    """The restart a skip plan registers on the pinned scheduler holds its denoiser weakly: a later recipe that
    replaces the denoiser (layer pruning with a plan for the pruned model) frees the old one, weights of the removed
    layers with it."""
    import copy
    import gc
    import weakref

    from diffslim.methods.layer_prune import candidate_names, prune_layers
    from diffslim.methods.skip_plan import full_plan, plan_units

    pipe = copy.deepcopy(tiny_sd_pipe)
    units = plan_units(pipe.unet, "fine")
    apply(pipe, {"skip_plan": {"granularity": "fine", "units": list(units.names),
                               "plan": full_plan(3, len(units)).tolist()}})
    old = weakref.ref(pipe.unet)
    layers = candidate_names(pipe.unet)[-1:]
    pruned_units = plan_units(prune_layers(pipe.unet, layers), "fine")
    apply(pipe, {"removed_layers": {"layers": layers},
                 "skip_plan": {"granularity": "fine", "units": list(pruned_units.names),
                               "plan": full_plan(3, len(pruned_units)).tolist()}})
    gc.collect()
    assert old() is None and pipe.scheduler.__dict__["_diffslim_on_new_run"]
    pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="np")  # the stale restart is a no-op


def _sd_plan_recipe(unet, steps=4):
    from diffslim.methods.skip_plan import deepcache_plan, plan_units

    units = plan_units(unet, "fine")
    return {"skip_plan": {"granularity": "fine", "units": list(units.names),
                          "plan": deepcache_plan(units, steps, steps, 0).tolist()}}


def test_layer_pruning_after_a_skip_plan_is_refused_and_together_they_apply_in_model_order(tiny_sd_pipe):
    """Layer pruning or a depth on a denoiser that already runs a skip plan made a pruned copy without the plan
    while the recorded recipe still named it (the plan was silently gone): refused, the pipeline left as it was. In
    one recipe the sections install in model order (the denoiser's structure first, then the plan for it), whatever
    the order of the recipe's fields: the same images as pruning first and applying the plan afterwards."""
    import copy

    from diffslim.errors import UserError
    from diffslim.methods.depth_skip import max_depth
    from diffslim.methods.layer_prune import candidate_names, prune_layers

    def gen():
        return torch.Generator().manual_seed(0)

    def run(p):
        return p("a cat", num_inference_steps=4, height=32, width=32, output_type="np", generator=gen()).images

    pipe = copy.deepcopy(tiny_sd_pipe)
    with pytest.raises(UserError, match="down_blocks.9.resnets.0 is not a module"):
        apply(pipe, {"removed_layers": {"layers": ["down_blocks.9.resnets.0"]}})
    apply(pipe, _sd_plan_recipe(pipe.unet))
    unet, recorded, planned = pipe.unet, pipe._diffslim_recipe, run(pipe)
    layers = candidate_names(pipe.unet)[-1:]
    for section in ({"removed_layers": {"layers": layers}}, {"depth": {"depth": max_depth(pipe.unet) - 1}}):
        with pytest.raises(RecipeError, match=f"^{next(iter(section))}: the pipeline's denoiser already runs a "
                                              "skip plan"):
            apply(pipe, section)
        assert pipe.unet is unet and pipe._diffslim_recipe is recorded
        assert np.array_equal(run(pipe), planned)

    routed = copy.deepcopy(tiny_sd_pipe)  # a multi-depth schedule is dropped by layer pruning in the same way
    apply(routed, {"depth": {"schedule": [{"t_min": 500, "depth": max_depth(routed.unet) - 1}]}})
    with pytest.raises(RecipeError, match="^removed_layers: the pipeline's denoiser already runs a multi-depth"):
        apply(routed, {"removed_layers": {"layers": layers}})

    pruned_plan = _sd_plan_recipe(prune_layers(tiny_sd_pipe.unet, layers))
    two_steps = copy.deepcopy(tiny_sd_pipe)
    apply(two_steps, {"removed_layers": {"layers": layers}})
    apply(two_steps, pruned_plan)
    together = copy.deepcopy(tiny_sd_pipe)
    apply(together, {**pruned_plan, "removed_layers": {"layers": layers}})
    assert together.unet._diffslim_skip_plan is not None
    assert set(together._diffslim_recipe.model_dump(exclude_none=True)) >= {"skip_plan", "removed_layers"}
    assert np.array_equal(run(together), run(two_steps))
    assert not np.array_equal(run(together), planned)


def test_a_deep_copy_of_a_pipeline_runs_its_own_skip_plan(tiny_sd_pipe):
    """``copy.deepcopy`` copies diffusers' forward wrappers by reference: a copy of a pipeline with a skip plan ran
    its hooked blocks with the original's weights and caches, and its scheduler restarted the original's plan (an
    img2img call at strength 0.25 after one at 0.8 on the copy: 0.04 off). The copy now installs the plan on itself
    at its first call."""
    import copy

    from diffusers import StableDiffusionImg2ImgPipeline

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def run(p, strength):
        return p("a cat", image=image, strength=strength, num_inference_steps=4, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    def halve(p):
        with torch.no_grad():
            for w in p.unet.parameters():
                w.mul_(0.5)

    pipe = StableDiffusionImg2ImgPipeline(**copy.deepcopy(tiny_sd_pipe.components))
    pipe.set_progress_bar_config(disable=True)
    halved = copy.deepcopy(pipe)  # the reference for the copy's own weights: halved, then the plan applied
    recipe = _sd_plan_recipe(pipe.unet)
    apply(pipe, recipe)
    fresh = run(pipe, 0.25)
    twin = copy.deepcopy(pipe)
    run(twin, 0.8)  # 3 calls, ending on the timestep a call at 0.25 starts on
    assert np.array_equal(run(twin, 0.25), fresh)
    halve(twin)
    halve(halved)
    apply(halved, recipe)
    assert np.array_equal(run(twin, 1.0), run(halved, 1.0))
    run(pipe, 0.8)
    assert np.array_equal(run(pipe, 0.25), fresh)  # the original keeps its own plan and weights


def test_a_pinned_scheduler_pickles(tiny_sd_pipe):
    """A recipe's pinned scheduler is a class made at run time, which pickle could not find by its name: a pipeline
    with a sampling recipe did not pickle (multiprocessing, Ray). It pickles now, and loads pinned."""
    import copy
    import pickle

    pipe = copy.deepcopy(tiny_sd_pipe)
    apply(pipe, {"sampling": {"scheduler": "ddim", "timesteps": [900, 500, 100]}})
    sched = pickle.loads(pickle.dumps(pipe.scheduler))
    assert type(sched).__name__ == type(pipe.scheduler).__name__ and type(sched)._diffslim_pinned
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == [900, 500, 100]
    back = pickle.loads(pickle.dumps(pipe))

    def run(p):
        return p("a cat", height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images

    assert np.array_equal(run(back), run(pipe))
