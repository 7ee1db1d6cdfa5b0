import json

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
