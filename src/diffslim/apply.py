"""``apply(pipe, recipe)``: install a recipe on a live diffusers pipeline.

Each recipe section has an installer here that asks its method's runtime part to install itself; the
result is still an ordinary diffusers pipeline that a user calls as before.
"""

from __future__ import annotations

import inspect

import torch

from diffslim.errors import UserError
from diffslim.recipe import Recipe, RecipeError, load_recipe, parse_recipe


def _install_sampling(pipe, sampling) -> None:
    """Swap the scheduler and pin the step count / timesteps, so that ``pipe(...)`` samples the recipe's schedule."""
    from diffslim.sample import make_scheduler

    sched = make_scheduler(sampling.scheduler, pipe.scheduler.config) if sampling.scheduler else pipe.scheduler
    if sampling.timesteps is not None:
        sched = scheduler_for_timesteps(sched)
    if sampling.timesteps is not None and "timesteps" not in inspect.signature(sched.set_timesteps).parameters:
        raise RecipeError(
            f"sampling.timesteps: {type(sched).__name__} accepts no explicit timesteps; "
            "choose a scheduler that does (ddim, euler, dpm++, unipc, ddpm, lms, heun)")
    if sampling.num_inference_steps is not None or sampling.timesteps is not None:
        sched = pin_schedule(sched, sampling.num_inference_steps, sampling.timesteps)
    pipe.scheduler = sched


def scheduler_for_timesteps(scheduler):
    """A scheduler that samples an explicit timestep list: DDIM becomes non-uniform DDIM (the paper's
    sampler: x0 from the noise prediction, re-noised to the next listed timestep); others are kept."""
    from diffusers import DDIMScheduler

    from diffslim.methods.timesteps import NonUniformDDIMScheduler

    if type(scheduler) is DDIMScheduler:
        return NonUniformDDIMScheduler.from_config(scheduler.config)
    return scheduler


def denoiser_attr(pipe) -> str:
    """The pipeline attribute that holds its denoiser: ``unet``, ``transformer`` or the zoo's ``denoiser``."""
    for name in ("denoiser", "unet", "transformer"):
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise RecipeError(f"{type(pipe).__name__} has no unet/transformer to compress")


def _install_depth(pipe, depth) -> None:
    """Replace the U-Net by its depth-skipped version (kept weights shared, removed ones freed)."""
    from diffslim.methods.depth_skip import depth_skip, multi_depth

    name = denoiser_attr(pipe)
    if depth.schedule is not None:
        multi_depth(getattr(pipe, name), [(r.t_min, r.depth) for r in depth.schedule])
        return
    setattr(pipe, name, depth_skip(getattr(pipe, name), depth.depth))


def pin_schedule(scheduler, num_inference_steps=None, timesteps=None):
    """A copy of ``scheduler`` whose ``set_timesteps`` always uses the given steps or timesteps.

    Pipelines call ``scheduler.set_timesteps(num_inference_steps, device=...)``; the pinned copy
    ignores the requested count, so a recipe's schedule holds however the pipeline is called.
    """
    base = type(scheduler)
    if getattr(base, "_diffslim_pinned", False):
        base = base.__mro__[1]

    def set_timesteps(self, num_inference_steps_=None, device=None, sigmas=None, **kwargs):
        kwargs.pop("timesteps", None)
        kwargs.pop("num_inference_steps", None)
        if sigmas is not None:  # Flux's pipeline passes its own sigmas, one per step it was asked for
            if self._pinned_timesteps is not None or len(sigmas) != self._pinned_steps:
                raise UserError(f"{type(self).__name__}: the pipeline passed {len(sigmas)} sigmas of its own, but the "
                                f"recipe fixes the schedule ({self._pinned_steps or len(self._pinned_timesteps)} "
                                f"steps); call it with num_inference_steps={self._pinned_steps or len(self._pinned_timesteps)}")
            return base.set_timesteps(self, device=device, sigmas=sigmas, **kwargs)
        if self._pinned_timesteps is not None:
            return base.set_timesteps(self, device=device, timesteps=list(self._pinned_timesteps), **kwargs)
        return base.set_timesteps(self, self._pinned_steps, device=device, **kwargs)

    # the pin lives on the class, so that copies made by ``from_config`` (as schedule checks make) keep it
    pinned_cls = type(f"Pinned{base.__name__}", (base,), {
        "set_timesteps": set_timesteps, "_diffslim_pinned": True, "_pinned_steps": num_inference_steps,
        "_pinned_timesteps": tuple(timesteps) if timesteps is not None else None})
    return pinned_cls.from_config(scheduler.config)


def _install_removed_layers(pipe, section) -> None:
    """Replace the denoiser by its layer-pruned version (kept weights shared, removed ones freed)."""
    from diffslim.methods.layer_prune import prune_layers

    name = denoiser_attr(pipe)
    setattr(pipe, name, prune_layers(getattr(pipe, name), section.layers))


INSTALLERS = {
    "depth": _install_depth,
    "sampling": _install_sampling,
    "removed_layers": _install_removed_layers,
    "skip_plan": lambda pipe, section: _install_skip_plan(pipe, section),
}


def _install_skip_plan(pipe, section) -> None:
    """Install a skip plan's hooks on the denoiser and pin the step count to the plan's rows."""
    import numpy as np

    from diffslim.errors import UserError
    from diffslim.methods.skip_plan import apply_skip_plan, check_scheduler, plan_units

    den = getattr(pipe, denoiser_attr(pipe))
    # running a plan needs the units and their consumers, not their MACs: no profiled forward (which
    # a denoiser without a sample_size, such as Flux's, could not even be given)
    units = plan_units(den, section.granularity, count_macs=False)
    if list(units.names) != list(section.units):
        raise RecipeError(f"skip_plan.units: the plan names {len(section.units)} {section.granularity} units, this "
                          f"model has {len(units)} ({', '.join(units.names[:3])}, ...): a plan for another model")
    steps = len(section.plan)
    try:
        check_scheduler(pipe.scheduler, steps, steps)
    except UserError as e:
        raise RecipeError(f"skip_plan: {e}") from None
    apply_skip_plan(den, np.asarray(section.plan, dtype=bool), units)
    if not getattr(type(pipe.scheduler), "_diffslim_pinned", False):
        pipe.scheduler = pin_schedule(pipe.scheduler, steps)


_DENOISER_SECTIONS = ("depth", "removed_layers", "skip_plan")


def _check_not_compiled(pipe) -> None:
    """Refuse to change a compiled denoiser: its compiled code would not run the hooks or see the copy."""
    den = getattr(pipe, denoiser_attr(pipe))
    # torch.compile(module) wraps it (the wrapper holds ``_orig_mod``); module.compile() sets ``_compiled_call_impl``
    if isinstance(getattr(den, "_orig_mod", None), torch.nn.Module) or getattr(den, "_compiled_call_impl", None) \
            is not None or getattr(den, "_diffslim_compiled", None) is not None:
        raise UserError("the pipeline's denoiser is compiled: apply the recipe to the eager pipeline, then compile "
                        "(diffslim.compile(pipe)); diffslim.compiling.uncompile(pipe.unet) undoes diffslim.compile")


def _as_recipe(recipe) -> Recipe:
    """A :class:`Recipe` from a Recipe, a dict or the path of a JSON file."""
    if isinstance(recipe, Recipe):
        return recipe
    return parse_recipe(recipe) if isinstance(recipe, dict) else load_recipe(recipe)


def apply(pipe, recipe):
    """Apply ``recipe`` (a :class:`Recipe`, a dict or a path to a JSON file) to ``pipe`` in place; returns ``pipe``."""
    recipe = _as_recipe(recipe)
    if any(getattr(recipe, s) is not None for s in _DENOISER_SECTIONS):
        _check_not_compiled(pipe)
    for section in Recipe.section_names():
        value = getattr(recipe, section)
        if value is None:
            continue
        if section not in INSTALLERS:
            raise RecipeError(f"{section}: this diffslim cannot apply this section yet")
        INSTALLERS[section](pipe, value)
    pipe._diffslim_recipe = recipe
    return pipe


def from_recipe(recipe, device="cpu", dtype=torch.float32):
    """The pipeline a recipe describes, ready to call: its ``model`` loaded (a pipeline folder or ``zoo:NAME``; a
    workflow's recipe names its last pruned stage, relative to the recipe file) and the recipe applied.

    ``recipe``: a path to a recipe JSON file, a dict or a :class:`Recipe`; ``device``/``dtype`` as for
    :func:`diffslim.load`. Equivalent to ``apply(load(recipe.model, device, dtype).pipe, recipe)``.
    """
    from diffslim.models.load import load

    recipe = _as_recipe(recipe)
    if not recipe.model:
        raise RecipeError("the recipe names no model (its \"model\" is empty): load the model yourself and call "
                          "diffslim.apply(pipe, recipe)")
    loaded = load(recipe.model, dtype=dtype, device=device)
    if loaded.pipe is None:
        raise RecipeError(f"the recipe's model {recipe.model} is a lone {loaded.kind} folder, not a pipeline: "
                          "load a pipeline with it and call diffslim.apply(pipe, recipe)")
    return apply(loaded.pipe, recipe)
