"""``apply(pipe, recipe)``: install a recipe on a live diffusers pipeline.

Each recipe section has an installer here that asks its method's runtime part to install itself; the
result is still an ordinary diffusers pipeline that a user calls as before.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
import weakref
from typing import Optional

import torch

from diffslim.errors import UserError
from diffslim.recipe import Recipe, RecipeError, load_recipe, parse_recipe

logger = logging.getLogger(__name__)


def _install_sampling(pipe, sampling) -> None:
    """Swap the scheduler and pin the step count / timesteps, so that ``pipe(...)`` samples the recipe's schedule.
    A section that names only a scheduler keeps the steps an earlier recipe pinned (a skip plan's among them)."""
    from diffslim.sample import check_pipeline_takes, make_scheduler

    current = pipe.scheduler
    sched = make_scheduler(sampling.scheduler, current.config) if sampling.scheduler else current
    if sampling.scheduler:
        check_pipeline_takes(pipe, sampling.scheduler, sched)
    steps, timesteps = sampling.num_inference_steps, sampling.timesteps
    if steps is None and timesteps is None and getattr(type(current), "_diffslim_pinned", False):
        steps, timesteps = type(current)._pinned_steps, type(current)._pinned_timesteps
    if timesteps is not None:
        sched = scheduler_for_timesteps(sched)
    if timesteps is not None and not _takes_timesteps(sched):
        from diffslim.recipe import SCHEDULERS

        able = [n for n in SCHEDULERS if _takes_timesteps(scheduler_for_timesteps(make_scheduler(n, current.config)))]
        raise RecipeError(f"sampling.timesteps: {_unpinned(type(sched)).__name__} accepts no explicit timesteps; "
                          f"choose a scheduler that does ({', '.join(able)})")
    most = getattr(sched.config, "num_train_timesteps", None)
    if steps is not None and most is not None and steps > most:
        raise RecipeError(f"sampling.num_inference_steps: {steps} steps, but {_unpinned(type(sched)).__name__} has "
                          f"{most} training timesteps to sample at: give at most {most}")
    if steps is not None or timesteps is not None:
        sched = pin_schedule(sched, steps, timesteps, quiet_steps=_default_steps(pipe), exact_for=_strength_slicer(pipe))
    if sched is not current and current.__dict__.get("_diffslim_on_new_run"):  # an installed skip plan's restart
        sched.__dict__["_diffslim_on_new_run"] = list(current.__dict__["_diffslim_on_new_run"])
    pipe.scheduler = sched


def _takes_timesteps(scheduler) -> bool:
    """Whether the scheduler's ``set_timesteps`` takes an explicit timestep list (in this diffusers version)."""
    return "timesteps" in inspect.signature(_unpinned(type(scheduler)).set_timesteps).parameters


def _strength_slicer(pipe) -> Optional[str]:
    """The pipeline's class name where its ``__call__`` takes a ``strength`` (img2img, inpainting): such a pipeline
    keeps the last ``int(num_inference_steps * strength)`` of the schedule it set, counting with the step count it
    was called with, so a pinned schedule of another length would be cut wrongly (or to nothing)."""
    return type(pipe).__name__ if "strength" in inspect.signature(type(pipe).__call__).parameters else None


def _default_steps(pipe) -> Optional[int]:
    """The ``num_inference_steps`` a pipeline's ``__call__`` uses when not given one (50 in diffusers' pipelines):
    a pinned scheduler asked for that count does not warn, since the caller most likely asked for nothing."""
    param = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    return param.default if param is not None and isinstance(param.default, int) else None


def _unpinned(cls):
    """The scheduler class a pinned one (see :func:`pin_schedule`) derives from; other classes as they are."""
    return cls.__mro__[1] if getattr(cls, "_diffslim_pinned", False) else cls


def scheduler_for_timesteps(scheduler):
    """A scheduler that samples an explicit timestep list: DDIM becomes non-uniform DDIM (the paper's
    sampler: x0 from the noise prediction, re-noised to the next listed timestep); others are kept."""
    from diffusers import DDIMScheduler

    from diffslim.methods.timesteps import NonUniformDDIMScheduler

    if _unpinned(type(scheduler)) is DDIMScheduler:
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


def pin_schedule(scheduler, num_inference_steps=None, timesteps=None, quiet_steps=None, exact_for=None):
    """A copy of ``scheduler`` whose ``set_timesteps`` always uses the given steps or timesteps.

    Pipelines call ``scheduler.set_timesteps(num_inference_steps, device=...)``; the pinned copy ignores the
    requested count, so a recipe's schedule holds however the pipeline is called (explicit ``timesteps=`` or
    ``sigmas=`` other than the recipe's are refused). A requested count other than the pinned one and than
    ``quiet_steps`` (the pipeline's default, which a caller gets without asking) logs a warning, once per count:
    the pipeline samples the recipe's steps, not the ones asked for. ``exact_for``: the name of a pipeline that
    cuts the schedule by ``strength`` (img2img), which must be called with the pinned count: another count is
    refused. The pinned class bears its base class's name and module, so
    that ``save_pretrained`` writes the base scheduler, which diffusers loads back (unpinned: the recipe keeps the
    schedule).
    """
    base = _unpinned(type(scheduler))
    pinned_steps = num_inference_steps or len(timesteps)
    # the base's own signature, with timesteps= and sigmas= where it lacks them: diffusers passes a pipeline's own
    # timesteps only to a scheduler whose signature names them, and the pin refuses them in its own words
    signature = inspect.signature(base.set_timesteps)
    params = list(signature.parameters.values())
    tail = [q for q in params if q.kind is inspect.Parameter.VAR_KEYWORD]
    params = [q for q in params if q.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("timesteps", "sigmas")
               if n not in signature.parameters]
    signature = signature.replace(parameters=params + tail)

    @functools.wraps(base.__init__)  # diffusers reads the config's keys from this signature
    def __init__(self, *args, **kwargs):
        self.__dict__["_pinned_constructing"] = True  # Heun's and LMS's __init__ call set_timesteps themselves
        try:
            base.__init__(self, *args, **kwargs)
        finally:
            self.__dict__.pop("_pinned_constructing", None)

    def set_timesteps(self, *args, **kwargs):
        if self.__dict__.get("_pinned_constructing"):  # the base's own set-up, with its own positional arguments
            return base.set_timesteps(self, *args, **kwargs)
        # bound by the base's own signature: (num_inference_steps, device, ...) differs in its later positions
        kwargs = dict(signature.bind(self, *args, **kwargs).arguments)
        kwargs.pop("self")
        kwargs.update(kwargs.pop("kwargs", {}))
        num_inference_steps, device = kwargs.pop("num_inference_steps", None), kwargs.pop("device", None)
        timesteps, sigmas = kwargs.pop("timesteps", None), kwargs.pop("sigmas", None)
        for new_run in self.__dict__.get("_diffslim_on_new_run", ()):  # a pipeline call starts: see _install_skip_plan
            new_run()
        if timesteps is not None:  # a pipeline called with timesteps=[...]
            if [int(t) for t in timesteps] != list(self._pinned_timesteps or ()):
                raise UserError(f"{base.__name__}: the pipeline was asked for {len(timesteps)} timesteps of its own, "
                                f"but the recipe fixes the schedule ({pinned_steps} steps); call it without timesteps")
        if sigmas is not None:  # Flux's pipeline passes its own sigmas, one per step it was asked for
            if self._pinned_timesteps is not None or len(sigmas) != self._pinned_steps:
                raise UserError(f"{base.__name__}: the pipeline passed {len(sigmas)} sigmas of its own, but the "
                                f"recipe fixes the schedule ({pinned_steps} steps); call it with "
                                f"num_inference_steps={pinned_steps}")
            return base.set_timesteps(self, device=device, sigmas=sigmas, **kwargs)
        if exact_for is not None and num_inference_steps is not None and num_inference_steps != pinned_steps:
            raise UserError(f"{exact_for} takes strength x num_inference_steps of its schedule, counted with the "
                            f"num_inference_steps it is called with ({num_inference_steps}), and the recipe fixes the "
                            f"schedule at {pinned_steps} steps: call it with num_inference_steps={pinned_steps}")
        if num_inference_steps is not None and num_inference_steps not in (pinned_steps, quiet_steps) \
                and num_inference_steps not in self._warned_steps:
            self._warned_steps.add(num_inference_steps)
            logger.warning("%s: asked for num_inference_steps=%s, but the recipe fixes the schedule at %d steps; "
                           "sampling %d (diffslim.apply pinned them)", base.__name__, num_inference_steps,
                           pinned_steps, pinned_steps)
        if self._pinned_timesteps is not None:
            return base.set_timesteps(self, device=device, timesteps=list(self._pinned_timesteps), **kwargs)
        return base.set_timesteps(self, self._pinned_steps, device=device, **kwargs)

    def __reduce__(self):  # pickle cannot find the pinned class by its name: it is made again from the base
        state = {k: v for k, v in self.__dict__.items() if k != "_diffslim_on_new_run"}  # the plan's hooks do
        return _repinned, (base, dict(self.config), num_inference_steps, timesteps, quiet_steps, exact_for), state

    def __copy__(self):  # copy and deepcopy as for any object (not through __reduce__, which drops the restarts)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = memo[id(self)] = object.__new__(type(self))
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    # the pin lives on the class, so that copies made by ``from_config`` (as schedule checks make) keep it
    set_timesteps.__signature__ = signature
    pinned_cls = type(base.__name__, (base,), {
        "__init__": __init__, "set_timesteps": set_timesteps, "_diffslim_pinned": True,
        "__reduce__": __reduce__, "__copy__": __copy__, "__deepcopy__": __deepcopy__,
        "_pinned_steps": num_inference_steps,
        "_warned_steps": set(),
        "_pinned_timesteps": tuple(timesteps) if timesteps is not None else None,
        "__module__": base.__module__, "__qualname__": base.__qualname__})
    return pinned_cls.from_config(scheduler.config)


def _repinned(base, config, num_inference_steps, timesteps, quiet_steps, exact_for):
    """A pinned scheduler made again from its base class and config (what a pickled one loads as)."""
    return pin_schedule(base.from_config(config), num_inference_steps, timesteps, quiet_steps, exact_for)


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
        pipe.scheduler = pin_schedule(pipe.scheduler, steps, quiet_steps=_default_steps(pipe),
                                      exact_for=_strength_slicer(pipe))

    pipe.scheduler.__dict__.setdefault("_diffslim_on_new_run", []).append(_PlanRestart(den))


class _PlanRestart:
    """Called by a pinned scheduler's ``set_timesteps`` (a pipeline call starts): the skip plan installed on the
    denoiser starts again at its row 0 with empty caches. It holds the denoiser weakly, so that a denoiser
    replaced later is freed; a deep copy of the pipeline (which copies the denoiser before the scheduler) restarts
    the copy's plan, not the original's."""

    def __init__(self, denoiser):
        self._ref = weakref.ref(denoiser)

    def __call__(self) -> None:
        rt = getattr(self._ref(), "_diffslim_skip_plan", None)
        if rt is not None:
            rt.state.reset()

    def __deepcopy__(self, memo):
        den = self._ref()
        copied = memo.get(id(den)) if den is not None else None
        return self if copied is None else _PlanRestart(copied)



_DENOISER_SECTIONS = ("depth", "removed_layers", "skip_plan")
# what changes the denoiser's structure first (a skip plan names the units of the model it runs on), then the
# schedule, then the plan, which runs on the scheduler a sampling section pinned
_INSTALL_ORDER = ("depth", "removed_layers", "sampling", "skip_plan")
assert sorted(_INSTALL_ORDER) == sorted(Recipe.section_names())


def _check_plan_kept(pipe, recipe: Recipe) -> None:
    """Refuse a depth or removed_layers section on a denoiser that runs a skip plan installed before (and
    removed_layers on one that runs a multi-depth schedule): the pruned copy would not carry it, and the plan
    names the units of the model before."""
    from diffslim.methods.depth_skip import multi_depth_router

    changes = [s for s in ("depth", "removed_layers") if getattr(recipe, s) is not None]
    if not changes or recipe.skip_plan is not None:  # the recipe's own plan replaces the one installed
        return
    den = getattr(pipe, denoiser_attr(pipe))
    # a depth section replaces a multi-depth schedule (both are the depth section); layer pruning would drop it
    installed = ("a skip plan" if getattr(den, "_diffslim_skip_plan", None) is not None
                 else "a multi-depth schedule" if multi_depth_router(den) is not None
                 and "removed_layers" in changes else None)
    if installed is not None:
        change = changes[0] if installed == "a skip plan" else "removed_layers"
        raise RecipeError(f"{change}: the pipeline's denoiser already runs {installed}, made for the model before "
                          f"this change, which the changed model would drop: apply {change} first (or load the "
                          "model afresh), then the plan")


def _check_not_compiled(pipe) -> None:
    """Refuse to change a compiled denoiser: its compiled code would not run the hooks or see the copy."""
    den = getattr(pipe, denoiser_attr(pipe))
    # torch.compile(module) wraps it (the wrapper holds ``_orig_mod``); module.compile() sets ``_compiled_call_impl``
    if isinstance(getattr(den, "_orig_mod", None), torch.nn.Module) or getattr(den, "_compiled_call_impl", None) \
            is not None or getattr(den, "_diffslim_compiled", None) is not None:
        raise UserError("the pipeline's denoiser is compiled: apply the recipe to the eager pipeline, then compile "
                        "(diffslim.compile(pipe)); diffslim.compiling.uncompile(pipe.unet) undoes diffslim.compile")


def _as_recipe(recipe) -> Recipe:
    """A :class:`Recipe` from a Recipe, a dict, a JSON text or the path of a JSON file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    if isinstance(recipe, str) and recipe.lstrip().startswith("{"):
        try:
            return parse_recipe(json.loads(recipe), source="the recipe text")
        except json.JSONDecodeError as e:
            raise RecipeError(f"the recipe text is not valid JSON: {e}") from None
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    raise RecipeError(f"a recipe is a diffslim.Recipe, a dict, a JSON text or the path of a JSON file; got "
                      f"{type(recipe).__name__}" + (" (the pipeline comes first: apply(pipe, recipe))"
                                                    if hasattr(recipe, "scheduler") else ""))


def _pipeline_of(pipe):
    """The pipeline to install a recipe on: ``pipe`` itself, or a :class:`~diffslim.LoadedModel`'s ``pipe``."""
    from diffslim.models.load import LoadedModel

    if isinstance(pipe, LoadedModel):
        if pipe.pipe is None:
            raise UserError(f"{pipe.source} is a lone {pipe.kind} folder: a recipe is applied to a pipeline (load "
                            "a pipeline folder or zoo:NAME)")
        return pipe.pipe
    if isinstance(pipe, torch.nn.Module) or not hasattr(pipe, "scheduler"):
        raise UserError(f"apply takes a diffusers pipeline (or what diffslim.load returns); got "
                        f"{type(pipe).__name__}" + (": give the pipeline that holds this model"
                                                     if isinstance(pipe, torch.nn.Module) else ""))
    return pipe


def _restorer(pipe):
    """A function that puts back ``pipe``'s scheduler, its denoiser and the skip plan or multi-depth schedule installed
    on that denoiser as they are now, so that a recipe that fails half way leaves the pipeline as it was."""
    from diffslim.methods.depth_skip import multi_depth, multi_depth_router, remove_multi_depth
    from diffslim.methods.skip_plan import apply_skip_plan, remove_skip_plan

    scheduler = pipe.scheduler
    try:
        name = denoiser_attr(pipe)
    except RecipeError:  # no denoiser: only a sampling section can apply, and only the scheduler changes
        name = None
    den = getattr(pipe, name) if name else None
    plan, router = getattr(den, "_diffslim_skip_plan", None), multi_depth_router(den) if name else None

    def restore():
        pipe.scheduler = scheduler
        if name is None:
            return
        setattr(pipe, name, den)
        if getattr(den, "_diffslim_skip_plan", None) is not plan:
            remove_skip_plan(den)
            if plan is not None:
                apply_skip_plan(den, plan.plan, plan.units)
        if multi_depth_router(den) is not router:
            remove_multi_depth(den)
            if router is not None:
                multi_depth(den, router.ranges)

    return restore


def apply(pipe, recipe):
    """Apply ``recipe`` to ``pipe`` in place and return the pipeline, still an ordinary diffusers pipeline.

    ``pipe``: a diffusers pipeline (or :func:`diffslim.load`'s result, whose ``pipe`` and ``denoiser`` are updated);
    ``recipe``: a :class:`Recipe`, a dict, a JSON text or the path of a recipe file. Each section installs itself:
    ``depth`` and ``removed_layers`` replace the denoiser attribute (``unet``/``transformer``) with a smaller model
    that shares the kept weights (a reference to the old denoiser still runs the full model); ``sampling`` swaps the
    scheduler for one pinned to the recipe's steps or timesteps, whatever ``num_inference_steps`` the pipeline is
    called with; ``skip_plan`` hooks the denoiser and pins the step count to the plan's rows. A later ``apply`` adds
    to what is installed (a sampling section with only a scheduler keeps the pinned steps), and
    ``pipe._diffslim_recipe`` records all of it.

    ``save_pretrained`` keeps what is a model: a depth-skipped or layer-pruned denoiser (its class loads with
    diffslim installed) and the base scheduler; the pinned steps, a skip plan and a multi-depth schedule live in
    the recipe: load them back with :func:`from_recipe`.

    Raises :class:`RecipeError` (a ``ValueError``) for a recipe that does not fit this pipeline, with the pipeline
    left as it was, and :class:`~diffslim.errors.UserError` for a compiled denoiser or an argument that is not a
    pipeline.
    """
    target = _pipeline_of(pipe)
    recipe = _as_recipe(recipe)
    _warn_if_original(target, recipe)
    if any(getattr(recipe, s) is not None for s in _DENOISER_SECTIONS):
        _check_not_compiled(target)
    _check_plan_kept(target, recipe)
    restore = _restorer(target)
    try:
        for section in _INSTALL_ORDER:
            value = getattr(recipe, section)
            if value is None:
                continue
            if section not in INSTALLERS:
                raise RecipeError(f"{section}: this diffslim cannot apply this section yet")
            INSTALLERS[section](target, value)
    except BaseException:
        restore()
        raise
    target._diffslim_recipe = _recorded(getattr(target, "_diffslim_recipe", None), recipe)
    if target is not pipe:
        pipe.denoiser = getattr(target, denoiser_attr(target))
    return target


def _warn_if_original(pipe, recipe: Recipe) -> None:
    """Warn where ``pipe`` was loaded from the folder a recipe names as its ``original``: a workflow's recipe holds
    the sections after its model stages (the schedule, a skip plan), and its pruned model is its ``model``, so
    applying it to the original installs those sections on the unpruned denoiser."""
    loaded_from = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not (recipe.original and recipe.model and loaded_from) or recipe.original.startswith("zoo:"):
        return
    from pathlib import Path

    if os.path.isdir(loaded_from) and Path(loaded_from).resolve() == Path(recipe.original).resolve() \
            and Path(recipe.model).resolve() != Path(loaded_from).resolve():
        logger.warning("this pipeline is the recipe's original (%s), not its model (%s): apply installs the recipe's "
                       "sections on the unpruned pipeline; diffslim.from_recipe(path) loads the pruned model with "
                       "them", recipe.original, recipe.model)


def _recorded(before: Optional[Recipe], recipe: Recipe) -> Recipe:
    """What is installed after ``recipe`` is applied on top of ``before``: the sections of both, ``recipe``'s where
    both set one (a sampling section that names only a scheduler keeps the steps ``before`` pinned)."""
    if before is None:
        return recipe
    data, new = before.model_dump(exclude_none=True), recipe.model_dump(exclude_none=True)
    old_sampling, new_sampling = data.get("sampling", {}), new.get("sampling")
    if new_sampling is not None and not {"num_inference_steps", "timesteps"} & set(new_sampling):
        new["sampling"] = {**old_sampling, **new_sampling}
    data.update(new)
    try:
        return Recipe.model_validate(data)
    except ValueError:  # sections that one recipe could not hold together: the newest is still what was applied
        return recipe


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
