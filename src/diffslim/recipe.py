"""The recipe: one validated JSON file that describes a compression of one model.

Data only: this module knows the schema, not the methods that fill it or install it. Each method owns
one optional section; a recipe with no sections is the identity. Later methods add sections here
(``depth``, ``skip_plan``, ``removed_layers``); ``schema_version`` changes when a section's meaning does.

    {"schema_version": 1, "model": "zoo:digits-sd",
     "sampling": {"scheduler": "ddim", "num_inference_steps": 10}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from diffslim.errors import UserError
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
SCHEDULERS = ("ddim", "ddpm", "pndm", "plms", "euler", "euler_a", "dpm++", "dpm++_sde", "unipc", "heun", "lms")


class RecipeError(UserError):
    """A recipe file that does not validate; the message names the field and what it accepts."""


def _known_scheduler(v: Optional[str]) -> Optional[str]:
    if v is not None and v not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {v!r}; accepted: {', '.join(SCHEDULERS)}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Strict):
    """How to sample: the scheduler and either a step count or an explicit timestep list."""

    scheduler: Optional[str] = None
    num_inference_steps: Optional[int] = None
    timesteps: Optional[list[int]] = None
    # provenance of gamma-curve schedules (Kim and Cho, 2024); the timesteps are the truth
    gamma: Optional[float] = None
    coef: Optional[float] = None

    _known_scheduler = field_validator("scheduler")(classmethod(lambda cls, v: _known_scheduler(v)))

    @field_validator("num_inference_steps")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be a positive integer")
        return v

    @field_validator("timesteps")
    @classmethod
    def _valid_timesteps(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("must not be empty")
        if any(t < 0 or t > 999 for t in v):
            raise ValueError("every timestep must lie in 0..999")
        if any(a <= b for a, b in zip(v, v[1:])):
            raise ValueError("must be strictly descending with no duplicates, e.g. [999, 666, 333, 0]")
        return v

    @field_validator("gamma")
    @classmethod
    def _positive_gamma(cls, v):
        if v is not None and v <= 0:
            raise ValueError("must be > 0")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.timesteps is not None and self.num_inference_steps is not None \
                and len(self.timesteps) != self.num_inference_steps:
            raise ValueError(
                f"num_inference_steps ({self.num_inference_steps}) differs from len(timesteps) ({len(self.timesteps)})")
        return self


class DepthRange(_Strict):
    """Timesteps ``t >= t_min`` (down to the next range's ``t_min``) run at ``depth``."""

    t_min: int
    depth: int

    @field_validator("t_min")
    @classmethod
    def _in_range(cls, v):
        if not 0 <= v <= 999:
            raise ValueError("must lie in 0..999")
        return v

    @field_validator("depth")
    @classmethod
    def _positive(cls, v):
        if v < 1:
            raise ValueError("must be >= 1")
        return v


class Depth(_Strict):
    """Depth-skip pruning: keep input units ``0..depth-1`` and the paired output units (see methods.depth_skip).

    Either one ``depth`` for every step (a smaller model), or a multi-depth ``schedule``: a depth per
    range of timesteps (the full weights stay; each step runs its range's depth).
    """

    depth: Optional[int] = None
    schedule: Optional[list[DepthRange]] = None

    @field_validator("depth")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be >= 1 (1 keeps only conv_in and the last output unit; SD-1.5's full depth is 13)")
        return v

    @model_validator(mode="after")
    def _one_of(self):
        if (self.depth is None) == (self.schedule is None):
            raise ValueError("give exactly one of depth (one depth) or schedule (a depth per timestep range)")
        if self.schedule is not None and len({r.t_min for r in self.schedule}) != len(self.schedule):
            raise ValueError("schedule repeats a t_min")
        return self


class RemovedLayers(_Strict):
    """Layer pruning (LAPTOP-Diff / BK-SDM, see methods.layer_prune): the denoiser's modules to remove.

    ``layers`` are ``named_modules()`` names (resnets, attention layers, transformer blocks); the
    other fields record how they were chosen.
    """

    layers: list[str]
    criterion: Optional[str] = None
    ratio: Optional[float] = None
    by: Optional[Literal["params", "macs"]] = None
    max_params: Optional[float] = None  # with by="macs": the cap on the share of params removed

    @field_validator("layers")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("repeats a layer name")
        return v

    @field_validator("ratio", "max_params")
    @classmethod
    def _in_unit(cls, v):
        if v is not None and not 0 < v < 1:
            raise ValueError("must lie in (0, 1)")
        return v


class SkipPlan(_Strict):
    """A skip plan (DiP-GO, DeepCache, searches): ``plan[step][unit]`` is true where the unit runs at that step.

    ``units`` names the denoiser's units at ``granularity`` (``coarse``: blocks; ``fine``: resnet+attention
    pairs and samplers; transformer blocks for both), in forward order; ``plan`` has one row per denoising
    step (so ``len(plan)`` is the step count it runs with) and row 0 keeps every unit. Skipped units hand on
    the output of the last step where they ran (see ``diffslim.methods.skip_plan``). ``scheduler``: the
    scheduler it was made with (others run it by step index); ``provenance``: how it was made.
    """

    granularity: Literal["coarse", "fine"] = "fine"
    units: list[str]
    plan: list[list[bool]]
    scheduler: Optional[str] = None
    provenance: Optional[dict] = None

    _known_scheduler = field_validator("scheduler")(classmethod(lambda cls, v: _known_scheduler(v)))

    @model_validator(mode="after")
    def _shape(self):
        if not self.units:
            raise ValueError("units must not be empty")
        if not self.plan:
            raise ValueError("plan must have at least one step")
        bad = [i for i, row in enumerate(self.plan) if len(row) != len(self.units)]
        if bad:
            raise ValueError(f"plan row {bad[0]} has {len(self.plan[bad[0]])} entries but there are "
                             f"{len(self.units)} units: give a steps x units table")
        if not all(self.plan[0]):
            raise ValueError("plan row 0 must keep every unit (step 0 fills the caches)")
        return self


class Recipe(_Strict):
    """A compression of one model. Every section is optional; an empty recipe changes nothing."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model: Optional[str] = None
    # where ``model`` is an intermediate model (a workflow's last pruned stage): the model the compression started
    # from, which the outputs are judged against (``diffslim evaluate``'s default reference)
    original: Optional[str] = None
    description: Optional[str] = None
    depth: Optional[Depth] = None
    sampling: Optional[Sampling] = None
    skip_plan: Optional[SkipPlan] = None
    removed_layers: Optional[RemovedLayers] = None

    @model_validator(mode="after")
    def _plan_fits_the_steps(self):
        if self.skip_plan is None or self.sampling is None:
            return self
        s = self.sampling
        steps = len(s.timesteps) if s.timesteps is not None else s.num_inference_steps
        rows = len(self.skip_plan.plan)
        if steps is not None and steps != rows:
            raise ValueError(f"sampling gives {steps} steps but skip_plan.plan has {rows} rows, one per step: a skip "
                             f"plan runs at the step count it was made for; sample with {rows} steps, or make the "
                             f"plan again at {steps}")
        return self

    def is_identity(self) -> bool:
        return all(getattr(self, k) is None for k in self.section_names())

    @classmethod
    def section_names(cls) -> list[str]:
        """The method sections (everything but the metadata fields)."""
        return [k for k in cls.model_fields if k not in ("schema_version", "model", "original", "description")]

    def save(self, path) -> Path:
        """Write the recipe as JSON. A ``model`` or ``original`` folder inside the recipe's own folder (a workflow's
        pruned stage) is written relative to it, so that the folder can be moved or copied to another machine as a
        whole; :func:`load_recipe` reads such paths back against the file's folder."""
        path = Path(path)
        data = self.model_dump(mode="json", exclude_none=True)
        for key in _PATH_FIELDS:
            if key in data:
                data[key] = _relative_to(data[key], path.parent)
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def compose(self, other: "Recipe") -> "Recipe":
        """This recipe followed by ``other``: sections of ``other`` are added; a section set in both is an error."""
        both = [k for k in self.section_names() if getattr(self, k) is not None and getattr(other, k) is not None]
        if both:
            raise RecipeError(f"both recipes set section(s) {', '.join(both)}; compose recipes of different methods")
        data = self.model_dump(exclude_none=True)
        data.update({k: v for k, v in other.model_dump(exclude_none=True).items() if k in self.section_names()})
        return Recipe.model_validate(data)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; accepted keys here: {', '.join(_accepted_keys(e['loc']))}"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _accepted_keys(loc) -> list[str]:
    model = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return list(model.model_fields)


def parse_recipe(data: dict, source: str = "recipe") -> Recipe:
    """Validate a dict; raise :class:`RecipeError` naming each bad field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RecipeError(f"{source}: schema_version {version!r} is not supported; this diffslim reads {SCHEMA_VERSION}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_describe(e)}") from None


_PATH_FIELDS = ("model", "original")


def _relative_to(name: str, folder: Path) -> str:
    """``name`` relative to ``folder`` where it is an absolute path inside it; other names (zoo:, hub ids, paths
    elsewhere) as they are."""
    p = Path(name)
    if not p.is_absolute():
        return name
    try:
        return p.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return name


def _resolved_against(name: str, folder: Path) -> str:
    """A relative ``name`` that exists in ``folder`` (the recipe's): its absolute path; else ``name`` as it is
    (a zoo name, a hub id, or a path the user gave relative to the working directory)."""
    if name.startswith("zoo:") or Path(name).is_absolute():
        return name
    there = folder / name
    return str(there.resolve()) if there.exists() else name


def load_recipe(path) -> Recipe:
    """Read and validate a recipe JSON file. A relative ``model``/``original`` path is read against the file's folder
    where it exists there (as :meth:`Recipe.save` writes a folder's own stages), else as given."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a folder; give a recipe JSON file (e.g. {path / 'recipe.json'})")
    if not path.is_file():
        raise RecipeError(f"no recipe file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file; a recipe is a JSON file") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        data = {k: _resolved_against(v, path.parent) if k in _PATH_FIELDS and isinstance(v, str) else v
                for k, v in data.items()}
    return parse_recipe(data, source=str(path))
