"""Skip plans: which unit of a denoiser runs at which denoising step, the rest hand on cached features.

A *skip plan* is a boolean table ``steps x units`` (True = the unit runs). The units are those of the
anatomy (``diffslim.models.anatomy``):

* ``coarse``: a U-Net's down blocks, mid block and up blocks (9 for SD); a transformer's blocks.
* ``fine``: a U-Net's resnet+attention pairs, down/upsamplers and the mid block (27 in the SD layout
  with 3 resnets per up level); a transformer's blocks.

Runtime semantics (the DiP-GO SuperNet, also what DeepCache does):

* *Backup connection*: a skipped unit returns, unchanged, every tensor its modules returned at the
  most recent step where they ran; the cache is refreshed only when the unit runs. Step 0 runs
  everything; what is outside the units (conv_in, embeddings, conv_out, patch embed, final norm)
  always runs.
* *Dependencies*: a unit whose every consumer is skipped at a step is skipped too (its output would
  go unused); :func:`effective_plan` applies this, and MACs are counted on the effective plan. The same
  holds for a transformer's patch embedding (``PlanUnits.stem``), read only by the first block: at a
  step where that block is skipped it does not run either (and its MACs are not counted).
* *Tail memo*: a transformer's final norm (DiT, PixArt: a LayerNorm of the last block's output and
  nothing else, ``PlanUnits.tail``) is not recomputed while the last block hands on its cache: the
  same tensor in gives the same tensor out. Both are exact; they keep the per-call cost of a step at
  which few blocks run close to its MACs share on small models, where such fixed costs dominate.
* *Step index*: a head hook on the denoiser root counts denoising steps by the timestep of each
  call: a call at a lower timestep than the previous one starts the next step, a call at the same
  timestep belongs to the same step (pipelines that call the denoiser twice per step for CFG, PLMS's
  repeated first timestep), and a call at a HIGHER timestep than the previous one starts a new
  generation, which resets the step index and drops every cache. Sampling always walks timesteps
  downwards (for denoisers whose timestep grows instead, ``REVERSED_TIME``, the rule reads it negated),
  so this needs no cooperation from the pipeline; :meth:`SkipPlanRuntime.reset` resets
  explicitly (e.g. before a generation that starts at the same timestep the last one ended on).
  Schedulers that evaluate the denoiser at more distinct timesteps than they take steps (Heun,
  PNDM's Runge-Kutta warm-up) cannot run a plan indexed by step: :func:`denoiser_steps` tells,
  and :func:`check_scheduler` says so in one line.
* *Lanes*: a pipeline that guides with two calls per step on the same latents (cond, then uncond:
  Lumina2, CogView4, Flux's true CFG) gets a cache per call: the uncond call of a step reads what the
  uncond call of the step before left, not the cond call's features (other text, and in Lumina2 another
  sequence length). A second call at the same timestep on other latents (PLMS's warm-up) continues the
  first call's lane, as before.

Everything is a diffusers ``ModelHook`` registered through ``HookRegistry``: one shared
:class:`PlanState` (step index, caches), one head hook on the root, one hook per unit module, so it
composes with diffusers' own hooks and is removed by :func:`remove_skip_plan`.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from diffslim.errors import UserError

__all__ = [
    "GRANULARITIES", "PlanUnits", "plan_units", "effective_plan", "effective_plan_soft", "plan_macs_ratio", "pad_plan",
    "PlanState", "SkipPlanRuntime", "apply_skip_plan", "remove_skip_plan", "deepcache_plan", "random_plan",
    "validate_plan", "denoiser_steps", "check_scheduler", "full_plan", "plan_units_at", "compile_skip_plan",
    "apply_diffusers_cache", "remove_diffusers_cache", "magcache_ratios",
]

GRANULARITIES = ("coarse", "fine")
_ROOT_HOOK = "diffslim_skip_plan_root"
_UNIT_HOOK = "diffslim_skip_plan_unit"
_STEM_HOOK = "diffslim_skip_plan_stem"
_TAIL_HOOK = "diffslim_skip_plan_tail"
OUTSIDE = -1  # consumer index meaning "outside the units": always runs
_OUTPUT = "<denoiser output>"  # cache key of the whole denoiser's last output (see PlanUnits.reuse_output)


@dataclass(frozen=True)
class PlanUnits:
    """The prunable units of a denoiser at one granularity, in forward order.

    ``names[i]``: unit name (its first module); ``modules[i]``: its ``named_modules()`` names;
    ``macs[i]``: its MACs in one forward at batch 1; ``outside_macs``: MACs outside every unit;
    ``consumers[i]``: indices of the units that read unit i's output (``OUTSIDE`` = the denoiser's
    tail, which always runs). Consumers always come later in forward order. ``reuse_output``: the
    denoiser's output is a function of its last unit's output alone (a U-Net's tail is norm, activation
    and conv_out), so a step at which no unit runs returns the previous step's output without calling
    the denoiser at all, and costs no MACs. Not for transformers, whose final adaLN reads the timestep.
    ``stem``: modules outside the units whose output only unit 0 reads (a transformer's patch
    embedding), skipped at steps where unit 0 does not run; ``stem_macs``: their MACs (part of
    ``outside_macs``). ``tail``: pure modules that read only the last unit's output (a DiT's or
    PixArt's final LayerNorm), whose result is reused while that output is the same cached tensor.
    """

    granularity: str
    names: tuple[str, ...]
    modules: tuple[tuple[str, ...], ...]
    macs: tuple[int, ...]
    outside_macs: int
    consumers: tuple[tuple[int, ...], ...]
    family: str = "unet2d_condition"
    reuse_output: bool = False
    stem: tuple[str, ...] = ()
    stem_macs: int = 0
    tail: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    @property
    def total_macs(self) -> int:
        return self.outside_macs + sum(self.macs)


def plan_units(denoiser: nn.Module, granularity: str = "fine", anat=None, count_macs: bool = True) -> PlanUnits:
    """The units of ``denoiser`` a plan switches, with MACs and the consumer graph.

    ``granularity``: "coarse" or "fine" (the same units for transformer denoisers). ``anat``: an
    already computed anatomy (with MACs) to reuse. ``count_macs=False``: no profiled forward (all
    MACs 0): enough to install and run a plan, not to cost it (:func:`plan_macs_ratio` refuses).
    """
    from diffslim.models.anatomy import anatomy

    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; accepted: {', '.join(GRANULARITIES)}")
    if anat is None or (count_macs and anat.macs is None):
        anat = anatomy(denoiser, count_macs=count_macs)
    units = anat.blocks if granularity == "coarse" else anat.layers
    names = tuple(u.name for u in units)
    modules = tuple(tuple(u.modules) for u in units)
    macs = tuple(int(u.macs or 0) for u in units) if count_macs else (0,) * len(units)
    outside = int(anat.macs) - sum(macs) if count_macs else 0
    n = len(units)
    consumers: list[set[int]] = [set() for _ in range(n)]
    for i in range(n - 1):  # the main path: each unit feeds the next one
        consumers[i].add(i + 1)
    consumers[n - 1].add(OUTSIDE)
    if anat.family != "transformer":
        def unit_of(module: str) -> Optional[int]:
            for i, mods in enumerate(modules):
                if any(module == m or module.startswith(m + ".") for m in mods):
                    return i
            return None

        ins = anat.input_units
        if any(out.pair is None for out in anat.output_units):
            raise UserError(f"{type(denoiser).__name__}'s skip connections do not pair its input and output levels "
                            f"one to one ({len(ins)} against {len(anat.output_units)}, as in a K-diffusion U-Net), so "
                            "a skip plan cannot tell which cached outputs a layer reads: deepcache, dipgo and skip "
                            "plans need an SD-style U-Net or a transformer")
        for out in anat.output_units:
            producer = unit_of(ins[out.pair].modules[0])  # None: conv_in, outside the units
            consumer = unit_of(next(m for m in out.modules if ".resnets." in m))
            if producer is not None and consumer is not None and consumer != producer:
                consumers[producer].add(consumer)
        # the mid block (or, without one, the deepest down unit) feeds the first up unit: covered by
        # the main path since units are listed in forward order
    # UNet2DModel with Fourier time features divides its output by the timestep: not a function of the last unit
    reuse = anat.family != "transformer" and getattr(denoiser.config, "time_embedding_type", None) != "fourier"
    stem, tail = _stem_and_tail(denoiser) if anat.family == "transformer" else ((), ())
    stem_macs = sum(int((anat.module_macs or {}).get(m, 0)) for m in stem) if count_macs else 0
    return PlanUnits(granularity, names, modules, macs, outside, tuple(tuple(sorted(c)) for c in consumers),
                     anat.family, reuse, stem, stem_macs, tail)


def _stem_and_tail(denoiser: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A transformer denoiser's patch embedding (read by its first block only: DiT, PixArt and SD3's
    ``pos_embed``, Flux's ``x_embedder``; Flux's ``pos_embed`` is the rotary embedding every block reads)
    and its final norm when that is a plain LayerNorm of the last block's output (DiT, PixArt; SD3's and
    Flux's final norm also reads the timestep embedding)."""
    stem = "x_embedder" if isinstance(getattr(denoiser, "x_embedder", None), nn.Module) else "pos_embed"
    stems = (stem,) if isinstance(getattr(denoiser, stem, None), nn.Module) else ()
    tails = ("norm_out",) if isinstance(getattr(denoiser, "norm_out", None), nn.LayerNorm) else ()
    return stems, tails


def plan_units_at(pipe, spec, granularity: str = "fine") -> PlanUnits:
    """The plan units of ``pipe``'s denoiser, with MACs measured on the call the pipeline really makes.

    :func:`plan_units` measures one forward at the config's ``sample_size`` with dummy conditioning;
    a pipeline may call its denoiser at another size (a super-resolution pipeline works at the size of
    its input) or with another context length. Attention products grow with the square of the tokens
    and convolutions linearly, so the units' shares of the MACs, and with them a plan's MACs ratio,
    depend on it. This runs ``pipe`` on the first input of ``spec`` (a ``diffslim.sample.SampleSpec``)
    up to its first denoiser call and counts the MACs of that call.
    """
    from diffslim.models.anatomy import anatomy
    from diffslim.models.load import denoiser_of
    from diffslim.sample import first_denoiser_call

    den = denoiser_of(pipe)
    if getattr(den, "_diffslim_skip_plan", None) is not None:
        raise UserError("plan_units_at measures the full denoiser: remove the installed skip plan first")
    args, kwargs = first_denoiser_call(pipe, spec)
    return plan_units(den, granularity, anat=anatomy(den, inputs=(args, kwargs)))


def full_plan(num_steps: int, n_units: int) -> np.ndarray:
    """The keep-everything plan ``(num_steps, n_units)``."""
    return np.ones((num_steps, n_units), dtype=bool)


def pad_plan(plan, num_steps: int) -> np.ndarray:
    """``plan`` for the denoiser calls a run makes, as a plan of ``num_steps`` rows: the rows after it keep every
    unit. An image-to-image run at strength s < 1 makes only its first ``int(steps * s)`` calls; the plan a
    pipeline is pinned to has a row per step."""
    plan = np.asarray(plan, dtype=bool)
    return np.concatenate([plan, full_plan(num_steps - len(plan), plan.shape[1])]) if len(plan) < num_steps else plan


def validate_plan(plan, units: PlanUnits, num_steps: Optional[int] = None) -> np.ndarray:
    """``plan`` as a ``(steps, units)`` bool array, checked against ``units`` (and ``num_steps``).

    Raises :class:`UserError` naming the mismatch. Step 0 must keep every unit.
    """
    arr = np.asarray(plan, dtype=bool)
    if arr.ndim != 2 or arr.shape[1] != len(units):
        raise UserError(f"skip plan has shape {tuple(arr.shape)}, but the model has {len(units)} "
                        f"{units.granularity} units: give a steps x {len(units)} table")
    if num_steps is not None and arr.shape[0] != num_steps:
        raise UserError(f"skip plan has {arr.shape[0]} steps but sampling runs {num_steps}; "
                        f"sample with {arr.shape[0]} steps or make a plan for {num_steps}")
    if arr.shape[0] < 1 or not arr[0].all():
        raise UserError("skip plan: step 0 must run every unit (the caches are empty before it)")
    return arr


def effective_plan(plan: np.ndarray, units: PlanUnits) -> np.ndarray:
    """The units that actually run: ``plan`` with every unit whose consumers are all skipped switched off.

    ``plan``: ``(steps, units)`` bool. Returns the same shape; step 0 stays full.
    """
    eff = np.array(plan, dtype=bool, copy=True)
    for i in reversed(range(len(units))):
        needed = np.zeros(eff.shape[0], dtype=bool)
        for c in units.consumers[i]:
            needed |= True if c == OUTSIDE else eff[:, c]
        eff[:, i] &= needed
    eff[0] = True
    return eff


def effective_plan_soft(gates: torch.Tensor, units: PlanUnits) -> torch.Tensor:
    """Differentiable :func:`effective_plan` for gates in [0, 1] ``(steps, units)``.

    A unit runs if it is kept AND some consumer runs: ``e_i = g_i * (1 - prod_c (1 - e_c))``; with
    0/1 gates this is exactly :func:`effective_plan` (step 0 is not forced here).
    """
    cols: list[Optional[torch.Tensor]] = [None] * len(units)
    for i in reversed(range(len(units))):
        if OUTSIDE in units.consumers[i]:
            cols[i] = gates[:, i]
            continue
        none = torch.ones_like(gates[:, i])
        for c in units.consumers[i]:
            none = none * (1 - cols[c])
        cols[i] = gates[:, i] * (1 - none)
    return torch.stack(cols, dim=1)


def plan_macs_ratio(plan, units: PlanUnits, calls: Optional[int] = None) -> float:
    """MACs of the denoiser calls under ``plan`` (after dependencies) over the full model's, in [0, 1].

    With ``units.reuse_output``, a step at which no unit runs costs nothing (the runtime returns the
    previous output without calling the denoiser). ``calls``: the run makes only that many denoiser calls,
    the plan's first rows (an image-to-image run at strength < 1); the rest never run and do not count."""
    if units.total_macs <= 0:
        raise UserError("these plan units were built without MACs (plan_units(count_macs=False)): "
                        "build them with plan_units or plan_units_at to cost a plan")
    plan = np.asarray(plan, dtype=bool)
    eff = effective_plan(plan[:calls] if calls else plan, units)
    macs = np.asarray(units.macs, dtype=np.float64)
    calls = int(eff.any(axis=1).sum()) if units.reuse_output else eff.shape[0]  # idle steps reuse the output
    run = units.outside_macs * calls + float((eff * macs).sum())
    if units.stem:  # the patch embedding does not run where the first block does not
        run -= units.stem_macs * int((~eff[1:, 0]).sum())
    return run / (units.total_macs * eff.shape[0])


def deepcache_plan(units: PlanUnits, num_steps: int, interval: int, branch: int = 0) -> np.ndarray:
    """DeepCache (Ma et al., 2024) as a plan: every ``interval``-th step runs in full, the others run only
    the shallow branch ``branch`` and reuse everything deeper.

    Semantics of the ``DeepCache`` package's ``DeepCacheSDHelper`` (uniform mode): branch ``b`` is
    (level ``b // 3``, layer ``b % 3``); at a cached step, down units of deeper levels, the down layers
    ``>= layer`` of that level and its downsampler, the mid block, and the up layers of deeper levels
    and the first ``L - 1 - layer`` up layers of that level are skipped. Needs ``fine`` U-Net units.
    """
    if units.granularity != "fine" or units.family == "transformer":
        raise UserError("deepcache plans are defined on the fine units of a U-Net")
    if interval < 1:
        raise UserError(f"deepcache interval must be >= 1, got {interval}")
    level, layer = branch // 3, branch % 3
    n_up = 1 + max(int(n.split(".")[1]) for n in units.names if n.startswith("up_blocks."))
    if not 0 <= level < n_up:  # a branch past the last level would skip nothing
        raise UserError(f"deepcache branch {branch}: this U-Net has {n_up} levels, so branches 0..{3 * n_up - 1}")
    skip_row = np.ones(len(units), dtype=bool)
    for i, name in enumerate(units.names):
        parts = name.split(".")
        if name == "mid_block":
            skip_row[i] = False
            continue
        blk, part = int(parts[1]), parts[2]
        if parts[0] == "down_blocks":
            if blk > level:
                skip_row[i] = False
            elif blk == level:
                k = int(parts[3]) if part == "resnets" else 10**6  # the downsampler comes after every layer
                skip_row[i] = not (k >= layer)
        else:
            rev = n_up - 1 - blk
            if rev > level:
                skip_row[i] = False
            elif rev == level and part == "resnets":
                n_layers = sum(1 for n in units.names if n.startswith(f"up_blocks.{blk}.resnets."))
                skip_row[i] = not (n_layers - 1 - int(parts[3]) > layer)
    if not skip_row.any() and level > 0:
        raise UserError(f"deepcache branch {branch} lies deeper than this U-Net")
    plan = np.ones((num_steps, len(units)), dtype=bool)
    for s in range(num_steps):
        if s % interval:
            plan[s] = skip_row
    return plan


def random_plan(units: PlanUnits, num_steps: int, keep_prob: float, seed: int) -> np.ndarray:
    """A random plan: each (step > 0, unit) kept with probability ``keep_prob`` (numpy ``seed``)."""
    rng = np.random.default_rng(seed)
    plan = rng.random((num_steps, len(units))) < keep_prob
    plan[0] = True
    return plan


# ------------------------------------------------------------------------------------------------
# Runtime


def _tree_map(fn, a, b=None):
    """Apply ``fn`` to the tensors of a nested output (tensor, tuple, list, dict/BaseOutput)."""
    if isinstance(a, torch.Tensor):
        return fn(a) if b is None else fn(a, b)
    if isinstance(a, (tuple, list)):
        items = [_tree_map(fn, x, None if b is None else y) for x, y in zip(a, b if b is not None else a)]
        return type(a)(items) if isinstance(a, list) or type(a) is tuple else type(a)(*items)
    if isinstance(a, dict):
        return type(a)(**{k: _tree_map(fn, v, None if b is None else b[k]) for k, v in a.items()})
    return a


def _tree_tensors(a) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _tree_map(lambda t: out.append(t) or t, a)
    return out


class PlanState:
    """What one generation shares across the hooks: step index, last timestep, per-module caches.

    ``run``: the effective plan as a list of lists of bools (fast to index); ``gates``: for training,
    a ``(steps, units)`` tensor of 0/1 straight-through gates that replaces ``run`` (every unit then
    computes, and its output is ``g * fresh + (1 - g) * cache``, the same value as the hard plan).
    """

    def __init__(self, run: Sequence[Sequence[bool]], units: PlanUnits):
        self.run = [list(r) for r in run]
        self.any_run = [any(r) for r in self.run]
        # a unit's output is kept only when the next step skips the unit (it reads the cache then; a unit that
        # runs again refreshes it anyway): a keep-all plan holds nothing, and no step holds more than it needs
        steps = len(self.run)
        self.store = [[k + 1 < steps and not self.run[k + 1][i] for i in range(len(r))]
                      for k, r in enumerate(self.run)]
        self.store_output = [k + 1 < steps and not self.any_run[k + 1] for k in range(steps)]
        self.units = units
        self.gates: Optional[torch.Tensor] = None
        self.manual = False  # training sets ``step`` itself and passes caches explicitly
        self.checkpoint = False  # training through the pipeline's own loop: checkpoint each denoiser call
        self.reset()

    def reset(self) -> None:
        self.peak_bytes = max(getattr(self, "peak_bytes", 0), self.cache_bytes() if hasattr(self, "caches") else 0)
        self.step = -1
        self.last_t: Optional[float] = None
        self.caches: dict[str, Any] = {}
        self.lanes: dict[int, dict[str, Any]] = {0: self.caches}  # see the module docstring's *Lanes*
        self.lane = 0
        self.step_input: Optional[torch.Tensor] = None  # the latents of the step's first call
        self.placeholders: dict[str, torch.Tensor] = {}  # a skipped stem's stand-in: one element, expanded
        self.elide = True  # this call may skip the stem (not with SD3's own ``skip_layers``)
        self.generations = getattr(self, "generations", 0)

    def cache_bytes(self) -> int:
        """Bytes held by the caches now (each distinct tensor once)."""
        seen = {}
        lanes = [self.caches] + [lane for lane in getattr(self, "lanes", {}).values() if lane is not self.caches]
        for v in (v for lane in lanes for v in lane.values()):
            for t in _tree_tensors(v):
                seen[id(t)] = t.numel() * t.element_size()
        return int(sum(seen.values()))


# denoisers whose timestep grows as sampling goes on (Lumina's: 0 is noise, 1 the image; Z-Image's pipelines pass
# (1000 - t) / 1000 too)
REVERSED_TIME = ("Lumina2Transformer2DModel", "LuminaNextDiT2DModel", "ZImageTransformer2DModel")


def _noise_level(denoiser: Optional[nn.Module], t) -> float:
    """A call's timestep as a number that falls as sampling goes on (the step rule's): the timestep, negated for a
    denoiser of ``REVERSED_TIME`` (its subclasses too: a layer-pruned Lumina2)."""
    tf = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
    return -tf if _is_one_of(denoiser, REVERSED_TIME) else tf


def _is_one_of(denoiser: Optional[nn.Module], names: Sequence[str]) -> bool:
    """Whether ``denoiser``'s class, or a class it derives from (a layer-pruned model's base), is named in ``names``."""
    return denoiser is not None and any(c.__name__ in names for c in type(denoiser).__mro__)


# denoisers their pipelines call with the timestep as a fraction of the training schedule (``t / 1000``)
FRACTION_TIME = ("FluxTransformer2DModel", "AuraFlowTransformer2DModel", "QwenImageTransformer2DModel",
                 "ChromaTransformer2DModel", "Flux2Transformer2DModel")


def schedule_timestep(denoiser: Optional[nn.Module], t) -> float:
    """A call's timestep on the scheduler's scale, 1000 at pure noise (where PAB's and FasterCache's timestep windows
    lie): Flux and AuraFlow are called with ``t / 1000``, Sana with ``t`` x its ``timestep_scale``, and Lumina2 and
    Z-Image (``REVERSED_TIME``) with ``1 - t / 1000``, time running from noise at 0 to the image at 1."""
    tf = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
    if _is_one_of(denoiser, REVERSED_TIME):
        return (1.0 - tf) * 1000.0
    if _is_one_of(denoiser, FRACTION_TIME):
        return tf * 1000.0
    if _is_one_of(denoiser, ("SanaTransformer2DModel",)):
        return tf / float(getattr(denoiser.config, "timestep_scale", 1.0) or 1.0)
    return tf


def _latents_of(args, kwargs) -> Optional[torch.Tensor]:
    """The noisy latents a denoiser call takes (its first argument, ``sample`` or ``hidden_states``)."""
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    return x if torch.is_tensor(x) else None


def _same_latents(x: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> bool:
    """Whether a call at the step's timestep denoises the step's latents again (a second guidance call)."""
    if x is None or ref is None:
        return False
    return x is ref or (x.shape == ref.shape and x.dtype == ref.dtype and x.device == ref.device
                        and bool(torch.equal(x, ref)))


class _RootHook(ModelHook):
    """Head hook: advances the step index by timestep and resets at the start of a generation.

    In training (``state.gates`` set and ``state.checkpoint`` true, gradients on) it also runs the whole
    denoiser call under gradient checkpointing. The step index, the caches read and the gates are
    captured at call time and handed to the recomputation explicitly: when backward recomputes step k,
    the shared state has long moved on to the last step.
    """

    _is_stateful = True

    def __init__(self, state: PlanState, t_index: int):
        super().__init__()
        self.state = state
        self.t_index = t_index

    def initialize_hook(self, module):
        self._denoiser = weakref.ref(module)
        return module

    def pre_forward(self, module, *args, **kwargs):
        # ``copy.deepcopy`` of a hooked module copies diffusers' forward wrappers by reference: the copy calls this
        # (the original's) hook, which would run the original's modules with the original's caches. The plan is
        # installed on the copy afresh, and this call goes to it.
        if module is not self._denoiser():
            self._redirect = _reinstall_on_copy(module)
        return args, kwargs

    def _advance(self, args, kwargs) -> None:
        st = self.state
        t = _call_timestep(self._denoiser(), args, kwargs, self.t_index)
        if t is None:
            raise UserError("skip plan: the denoiser was called without a timestep; cannot tell the step")
        t = _noise_level(self._denoiser(), t)
        x = _latents_of(args, kwargs)
        if st.last_t is None or t > st.last_t:
            st.reset()
            st.generations += 1
            st.step = 0
            st.lane, st.step_input = 0, x
        elif t < st.last_t:
            st.step += 1
            st.lane, st.step_input = 0, x
        elif _same_latents(x, st.step_input):  # another call of the step on its latents: the next lane
            st.lane += 1
        st.caches = st.lanes.setdefault(st.lane, {})
        st.last_t = t
        if st.step >= len(st.run):
            raise UserError(f"skip plan has {len(st.run)} steps but the pipeline runs more denoising steps; "
                            f"sample with {len(st.run)} steps or use a scheduler with one denoiser call per step")

    def new_forward(self, module, *args, **kwargs):
        copied = self.__dict__.pop("_redirect", None)
        if copied is not None:  # see pre_forward
            return copied(*args, **kwargs)
        st = self.state
        if st.manual:
            return self.fn_ref.original_forward(*args, **kwargs)
        self._advance(args, kwargs)
        if st.gates is None:
            if st.units.reuse_output:
                # a step where no unit runs: the U-Net's tail would map the same cached features to the same
                # output, so the previous output is returned without the call (embeddings, conv_in, Python)
                if st.step > 0 and not st.any_run[st.step] and _OUTPUT in st.caches:
                    return st.caches[_OUTPUT]
                out = self.fn_ref.original_forward(*args, **kwargs)
                if st.store_output[st.step]:
                    st.caches[_OUTPUT] = out
                else:
                    st.caches.pop(_OUTPUT, None)
            else:
                # SD3's ``skip_layers`` bypasses a block without calling it: the stem's output would then
                # reach the next block, so it must run
                st.elide = not kwargs.get("skip_layers")
                out = self.fn_ref.original_forward(*args, **kwargs)
            st.peak_bytes = max(st.peak_bytes, st.cache_bytes())
            return out
        if not st.checkpoint or not torch.is_grad_enabled():
            return self.fn_ref.original_forward(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        step, caches, gates = st.step, dict(st.caches), st.gates

        def call(*a, **k):
            saved = (st.manual, st.step, st.caches, st.gates)
            st.manual, st.step, st.caches, st.gates = True, step, dict(caches), gates
            try:
                return self.fn_ref.original_forward(*a, **k), st.caches
            finally:
                st.manual, st.step, st.caches, st.gates = saved

        out, st.caches = checkpoint(call, *args, use_reentrant=False, **kwargs)
        st.lanes[st.lane] = st.caches
        return out

    def reset_state(self, module):
        self.state.reset()
        return module


class _UnitHook(ModelHook):
    """One module of a unit: run and refresh the cache, or return the cache (the backup connection)."""

    def __init__(self, state: PlanState, unit: int, key: str):
        super().__init__()
        self.state = state
        self.unit = unit
        self.key = key
        self.compiled: Optional[Callable] = None  # set by compile_skip_plan: the module's forward, compiled

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        if st.gates is not None:
            out = self.fn_ref.original_forward(*args, **kwargs)
            prev = st.caches.get(self.key)
            if prev is not None:
                g = st.gates[st.step, self.unit]
                # exact for 0/1 gates (f * 1 + c * 0 == f), gradient f - c w.r.t. g
                out = _tree_map(lambda f, c: f * g.to(f.dtype) + c * (1 - g.to(f.dtype)), out, prev)
            st.caches[self.key] = out
            return out
        if st.run[st.step][self.unit]:
            out = (self.compiled or self.fn_ref.original_forward)(*args, **kwargs)
            if st.store[st.step][self.unit]:
                st.caches[self.key] = out
            else:
                st.caches.pop(self.key, None)
            return out
        return st.caches[self.key]


class _OutsideHook(ModelHook):
    """A hook on a module outside the units, sharing the plan's state; ``key``: the module's name."""

    def __init__(self, state: PlanState, key: str):
        super().__init__()
        self.state = state
        self.key = key


class _StemHook(_OutsideHook):
    """The patch embedding: not run at a step where the first unit is skipped (its output would go unused).

    It returns a stand-in of the right shape that holds one zero (expanded, so it costs no memory): the
    skipped first unit ignores its input and returns its cache."""

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        if st.gates is not None or st.manual:
            return self.fn_ref.original_forward(*args, **kwargs)
        if st.step > 0 and st.elide and not st.run[st.step][0] and self.key in st.placeholders:
            return st.placeholders[self.key]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            st.placeholders[self.key] = out.new_zeros(()).expand(out.shape)
        return out


def _version(t) -> Optional[int]:
    """``t``'s in-place version counter; None where there is none (inference-mode tensors)."""
    try:
        return t._version if isinstance(t, torch.Tensor) else None
    except RuntimeError:
        return None


class _TailHook(_OutsideHook):
    """A pure module of the last unit's output (the final LayerNorm): while that output is the same
    cached tensor, unchanged, the previous result is returned. Kept only when the next step skips the
    last unit."""

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        if st.gates is not None or st.manual or torch.is_grad_enabled() or len(args) != 1 or kwargs:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0]
        version = _version(x)
        memo = st.caches.get(self.key)
        if memo is not None and memo[0] is x and version is not None and memo[1] == version:
            return memo[2]
        out = self.fn_ref.original_forward(x)
        if st.store[st.step][-1] and version is not None:  # the next step hands on the last unit's cache
            st.caches[self.key] = (x, version, out)
        else:
            st.caches.pop(self.key, None)
        return out


@dataclass
class SkipPlanRuntime:
    """A plan installed on a denoiser: its units, the effective plan and the shared state."""

    denoiser: nn.Module
    units: PlanUnits
    plan: np.ndarray
    effective: np.ndarray
    state: PlanState
    hooked: list = field(default_factory=list)

    def reset(self) -> None:
        """Drop the caches and restart the step count (the next call is step 0)."""
        self.state.reset()

    def cache_bytes(self) -> int:
        """Bytes the caches hold now."""
        return self.state.cache_bytes()

    def peak_cache_bytes(self) -> int:
        """The most bytes the caches held after any denoiser call since the plan was installed: the extra
        memory the plan costs."""
        return max(self.state.peak_bytes, self.state.cache_bytes())

    def macs_ratio(self) -> float:
        return plan_macs_ratio(self.plan, self.units)


def _timestep_index(denoiser: nn.Module) -> int:
    params = [p for p in inspect.signature(type(denoiser).forward).parameters if p != "self"]
    return params.index("timestep") if "timestep" in params else 1


def _call_timestep(denoiser: nn.Module, args: tuple, kwargs: dict, t_index: int):
    """A denoiser call's timestep: its ``t_index``-th argument, given by position or by name (``timestep``, or
    Z-Image's ``t``)."""
    if len(args) > t_index:
        return args[t_index]
    params = [p for p in inspect.signature(type(denoiser).forward).parameters if p != "self"]
    return kwargs.get(params[t_index] if t_index < len(params) else "timestep", kwargs.get("timestep"))


def apply_skip_plan(denoiser: nn.Module, plan, units: Optional[PlanUnits] = None,
                    granularity: str = "fine") -> SkipPlanRuntime:
    """Install ``plan`` (``(steps, units)`` bools, True = run) on ``denoiser`` in place with diffusers hooks.

    Returns the runtime (``.reset()``, ``.cache_bytes()``, ``.peak_cache_bytes()``, ``.state``). A plan
    already installed is replaced. Hooks of other kinds on the same modules are kept and composed with.
    """
    if units is None:
        units = plan_units(denoiser, granularity)
    arr = validate_plan(plan, units)
    remove_skip_plan(denoiser)
    eff = effective_plan(arr, units)
    state = PlanState(eff.tolist(), units)
    reg = HookRegistry.check_if_exists_or_initialize(denoiser)
    reg.register_hook(_RootHook(state, _timestep_index(denoiser)), _ROOT_HOOK)
    hooked = []
    for i, mods in enumerate(units.modules):
        for m in mods:
            sub = denoiser.get_submodule(m)
            HookRegistry.check_if_exists_or_initialize(sub).register_hook(_UnitHook(state, i, m), _UNIT_HOOK)
            hooked.append(m)
    for names, make, hook_name in ((units.stem, _StemHook, _STEM_HOOK), (units.tail, _TailHook, _TAIL_HOOK)):
        for m in names:
            HookRegistry.check_if_exists_or_initialize(denoiser.get_submodule(m)).register_hook(
                make(state, m), hook_name)
    rt = SkipPlanRuntime(denoiser, units, arr, eff, state, hooked)
    denoiser._diffslim_skip_plan = rt
    return rt


def compile_skip_plan(denoiser: nn.Module, compile_fn: Optional[Callable[[Callable, str], Callable]]) -> int:
    """Run each module of an installed plan's units through ``compile_fn(forward, name)`` (the module's
    forward and its name; see ``diffslim.compiling``); ``None`` goes back to the eager forwards. Returns
    how many modules it compiled.

    The plan's decisions (which step this is, run or hand on the cache) stay in Python, outside every
    compiled region: compiling the whole denoiser would instead guard on the step index, recompile at
    each step until Dynamo's recompile limit, and then run the rest eagerly. Modules outside the units
    (embeddings, conv_in, conv_out, the final norm) stay eager; with the training gates the hooks run
    the eager forwards.
    """
    rt = getattr(denoiser, "_diffslim_skip_plan", None)
    if rt is None:
        raise ValueError("no skip plan is installed on this denoiser")
    n = 0
    for m in rt.hooked:
        hook = denoiser.get_submodule(m)._diffusers_hook.get_hook(_UNIT_HOOK)
        hook.compiled = None if compile_fn is None else compile_fn(hook.fn_ref.original_forward, m)
        n += compile_fn is not None
    return n


def _reinstall_on_copy(copied: nn.Module) -> nn.Module:
    """Install on a deep copy of a denoiser the plan it was copied with, in place of the copied hooks (which
    call the original's): see ``_RootHook.pre_forward``."""
    rt = copied._diffslim_skip_plan
    remove_skip_plan(copied)
    apply_skip_plan(copied, rt.plan, rt.units)  # eager: compile_skip_plan the copy again if it was compiled
    return copied


def remove_skip_plan(denoiser: nn.Module) -> None:
    """Remove an installed plan's hooks (no-op when none is installed)."""
    rt = getattr(denoiser, "_diffslim_skip_plan", None)
    if rt is None:
        return
    for names, hook_name in ((rt.hooked, _UNIT_HOOK), (rt.units.stem, _STEM_HOOK), (rt.units.tail, _TAIL_HOOK)):
        for m in names:
            reg = getattr(denoiser.get_submodule(m), "_diffusers_hook", None)
            if reg is not None and reg.get_hook(hook_name) is not None:
                reg.remove_hook(hook_name, recurse=False)
    reg = getattr(denoiser, "_diffusers_hook", None)
    if reg is not None and reg.get_hook(_ROOT_HOOK) is not None:
        reg.remove_hook(_ROOT_HOOK, recurse=False)
    del denoiser._diffslim_skip_plan


# ------------------------------------------------------------------------------------------------
# Schedulers


def denoiser_steps(scheduler, num_inference_steps: int) -> tuple[int, int]:
    """``(steps, calls)``: the distinct-timestep steps and the loop iterations ``scheduler`` runs.

    A plan indexed by step fits a scheduler when ``steps`` equals the plan's and the scheduler makes
    at most one extra call at a repeated timestep (PLMS's warm-up); Heun (two calls per step, the
    second at the next step's timestep) and PNDM's Runge-Kutta warm-up do not fit.
    """
    s = type(scheduler).from_config(scheduler.config)
    # dynamic shifting (Flux) needs the image-size dependent mu; the step count does not depend on it
    s.set_timesteps(num_inference_steps, **({"mu": 1.0} if s.config.get("use_dynamic_shifting", False) else {}))
    ts = [float(t) for t in s.timesteps]
    steps = 1 + sum(1 for a, b in zip(ts, ts[1:]) if b < a)
    if any(b > a for a, b in zip(ts, ts[1:])):
        steps = -1  # not monotone: a step index by timestep cannot be defined
    return steps, len(ts)


def check_scheduler(scheduler, num_inference_steps: int, plan_steps: int, name: str = "") -> None:
    """Raise :class:`UserError` when ``scheduler`` cannot run a ``plan_steps``-step plan at ``num_inference_steps``."""
    steps, calls = denoiser_steps(scheduler, num_inference_steps)
    label = name or type(scheduler).__name__
    if steps == num_inference_steps != plan_steps and calls <= steps + 1:  # the scheduler is fine; the count is not
        raise UserError(f"the skip plan has {plan_steps} steps (one row per step) but the run samples "
                        f"{num_inference_steps}: sample with {plan_steps} steps, or make the plan again at "
                        f"{num_inference_steps}")
    if steps != plan_steps or calls > steps + 1:
        raise UserError(f"scheduler {label} evaluates the denoiser at {steps if steps > 0 else 'non-monotone'} "
                        f"timesteps ({calls} calls) for {num_inference_steps} steps, but the plan has {plan_steps} "
                        "steps; use a scheduler with one denoiser timestep per step (ddim, dpm++, euler, plms, unipc)")


# ------------------------------------------------------------------------------------------------
# diffusers' own caches (FirstBlockCache, FasterCache, TaylorSeer, MagCache, PyramidAttentionBroadcast)

_CTX_HOOK = "diffslim_cache_context"
DIFFUSERS_CACHES = ("fbcache", "fastercache", "taylorseer", "magcache", "pab")
# each cache's argument: (syntax, the default setting), a threshold (float >= 0) and/or a count of steps (int >= 1)
_CACHE_SYNTAX = {"fbcache": ("fbcache[:THRESHOLD], THRESHOLD >= 0 (e.g. fbcache:0.05)", (0.05,)),
                 "taylorseer": ("taylorseer[:INTERVAL], INTERVAL >= 1 steps (e.g. taylorseer:5)", (5,)),
                 "pab": ("pab[:K], K >= 1 calls (e.g. pab:2)", (2,)),
                 "fastercache": ("fastercache[:K], K >= 1 calls (e.g. fastercache:2)", (2,)),
                 "magcache": ("magcache[:THRESHOLD[:K]], THRESHOLD >= 0 and K >= 1 steps (e.g. magcache:0.06:3)",
                              (0.06, 3))}


def diffusers_cache_setting(name: str, arg: Optional[str], shown: Optional[str] = None) -> tuple:
    """The setting of diffusers' cache ``name`` from its argument text (None or "": the default): ``(threshold,)``,
    ``(interval,)`` or MagCache's ``(threshold, K)``; a :class:`UserError` naming the syntax otherwise (and the
    argument as ``shown``, by default ``arg``)."""
    shown = arg if shown is None else shown
    if name not in _CACHE_SYNTAX:
        raise UserError(f"unknown diffusers cache {name!r}; accepted: {', '.join(DIFFUSERS_CACHES)}")
    syntax, default = _CACHE_SYNTAX[name]
    parts = (arg or "").split(":") if arg else []
    if len(parts) > len(default):
        raise UserError(f"{name}:{shown}: too many parts; {syntax}")
    out = []
    for text, fallback in zip(parts + [""] * (len(default) - len(parts)), default):
        if not text:
            out.append(fallback)
            continue
        try:
            value = type(fallback)(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < (0 if isinstance(fallback, float) else 1):
            raise UserError(f"{name}:{shown}: {text!r} is not a valid setting; {syntax}")
        out.append(value)
    return tuple(out)


def _cache_context_of(module: nn.Module):
    """The ``CacheContext`` diffusers' stateful hooks under ``module`` hold now (None: none set)."""
    from diffusers.hooks.hooks import StateManager

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for child in (registry, *registry._get_child_registries()):
        for hook in child.hooks.values():
            for attr in vars(hook).values():
                if isinstance(attr, StateManager):
                    return attr._context
    return None


class _CacheContextHook(ModelHook):
    """Outermost root hook for diffusers' caches: sets the ``CacheContext`` they read (pipelines outside
    diffusers, like the zoo's, do not call ``cache_context``) and resets their state when a generation
    starts (same timestep rule as the plan runtime). A pipeline that names its calls (``cache_context("uncond")``:
    CogView4) keeps its names; one that guides with a second call on the step's latents without naming it
    (Lumina2) gets ``"uncond"`` for it, so the two calls keep apart states as diffusers' caches expect (both
    were "cond", and the uncond call read the cond call's residuals)."""

    def __init__(self, t_index: int, num_steps: int):
        super().__init__()
        self.t_index, self.num_steps = t_index, num_steps
        self.last_t: Optional[float] = None
        self.step = -1
        self.lane = 0
        self.step_input: Optional[torch.Tensor] = None
        self.ours = None  # the context this hook set last (a context still set at the next call is not the pipeline's)

    def pre_forward(self, module, *args, **kwargs):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        t = _call_timestep(module, args, kwargs, self.t_index)
        tf = _noise_level(module, t)
        self.raw_t = schedule_timestep(module, t)
        x = _latents_of(args, kwargs)
        if self.last_t is None or tf > self.last_t:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()
            self.step, self.lane, self.step_input = 0, 0, x
        elif tf < self.last_t:
            self.step += 1
            self.lane, self.step_input = 0, x
        elif _same_latents(x, self.step_input):
            self.lane += 1
        self.last_t = tf
        given = _cache_context_of(module)
        name = given.name if given is not None and given is not self.ours else (
            "cond", "uncond")[self.lane] if self.lane < 2 else f"call{self.lane}"
        self.ours = CacheContext(name, step_index=self.step, num_inference_steps=self.num_steps, timestep=tf)
        _set_cache_context(module, self.ours)
        return args, kwargs

    def current_timestep(self) -> float:
        """The current call's timestep on the scheduler's scale (:func:`schedule_timestep`): PAB's and FasterCache's
        windows are on it."""
        return self.raw_t if self.last_t is not None else 999.0


def check_block_registry(denoiser: nn.Module, name: str) -> None:
    """Refuse in one line a denoiser whose first or last block diffusers' FirstBlockCache and MagCache (``name``)
    cannot read: they take a block's inputs and outputs from a registry of block classes, and read its argument
    ``hidden_states``, which diffusers 0.42 registers Z-Image's block for although its forward takes ``x``."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from diffslim.models.anatomy import block_lists

    lists = block_lists(denoiser)
    hint = "try pab, taylorseer or fastercache, or dipgo"
    for block in (getattr(denoiser, lists[0])[0], getattr(denoiser, lists[-1])[-1]):
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            raise UserError(f"{name}: diffusers' cache does not know {type(denoiser).__name__}'s block class "
                            f"{type(block).__name__} (it reads a block's inputs and outputs by a registry of "
                            f"classes): {hint}") from None
        if "hidden_states" not in inspect.signature(block.forward).parameters:
            raise UserError(f"{name}: diffusers' cache reads a block's argument hidden_states, which "
                            f"{type(block).__name__} does not take: {hint}")


def check_diffusers_cache(denoiser: nn.Module, name: str) -> None:
    """Refuse in one line, before anything samples, a denoiser diffusers' cache ``name`` cannot take: one without
    transformer block lists (a U-Net), FirstBlockCache on a last block that returns no text stream (SD3's), and
    FirstBlockCache and MagCache on blocks their registry cannot read (:func:`check_block_registry`)."""
    from diffslim.models.anatomy import block_lists

    if not block_lists(denoiser):
        raise UserError(f"{name}: diffusers' cache hooks find transformer blocks by name (transformer_blocks, ...); "
                        f"{type(denoiser).__name__} has none (U-Nets: use deepcache or dipgo)")
    if name == "fbcache" and getattr(getattr(denoiser, block_lists(denoiser)[-1])[-1], "context_pre_only", False):
        # diffusers 0.42's FirstBlockCache subtracts the last block's text stream, which SD3's last block returns as
        # None (a TypeError mid-sampling)
        raise UserError(f"fbcache: diffusers' FirstBlockCache reads a text stream from the last block, and "
                        f"{type(denoiser).__name__}'s last block returns none (context_pre_only, as SD3's): use "
                        "magcache, taylorseer, pab, fastercache or dipgo")
    if name in ("fbcache", "magcache"):
        check_block_registry(denoiser, name)
    if name == "fbcache":
        _check_head_and_tail_streams(denoiser)


def _check_head_and_tail_streams(denoiser: nn.Module) -> None:
    """Refuse FirstBlockCache where the first block returns both streams and the last block one (Flux.2's one-stream
    blocks return a bare tensor where Flux's return both): diffusers 0.42 subtracts the first block's output, kept as
    a list, from the last one's (a TypeError mid-sampling)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from diffslim.models.anatomy import block_lists

    lists = block_lists(denoiser)
    head, tail = getattr(denoiser, lists[0])[0], getattr(denoiser, lists[-1])[-1]
    two = [TransformerBlockRegistry.get(type(b)).return_encoder_hidden_states_index is not None for b in (head, tail)]
    if two[0] and not two[1]:
        raise UserError(f"fbcache: diffusers' FirstBlockCache compares the first block's output with the last one's, "
                        f"and {type(denoiser).__name__}'s first block returns two streams where its last returns one: "
                        "use taylorseer, pab, fastercache, magcache or dipgo")


def apply_diffusers_cache(denoiser: nn.Module, name: str, arg: Optional[str], num_steps: int,
                          mag_ratios: Optional[Sequence[float]] = None) -> str:
    """Apply diffusers' cache ``name`` (see ``DIFFUSERS_CACHES``) to ``denoiser``; returns a note of its settings.

    ``mag_ratios``: MagCache's per-step magnitude ratios, from :func:`magcache_ratios` (one per denoiser call of a
    generation); without them MagCache runs on flat ratios, which make it skip as many steps as its limit allows.

    Raises :class:`UserError` saying why when the cache cannot take this model family.
    """
    from diffusers import hooks as H

    from diffslim.models.anatomy import block_lists

    setting = diffusers_cache_setting(name, arg)
    check_diffusers_cache(denoiser, name)
    ctx_hook = _CacheContextHook(_timestep_index(denoiser), num_steps)
    try:
        if name == "fbcache":
            (thr,) = setting
            H.apply_first_block_cache(denoiser, H.FirstBlockCacheConfig(threshold=thr))
            note = f"FirstBlockCache threshold {thr:g}"
        elif name == "taylorseer":
            (k,) = setting
            # diffusers' default patterns match attention modules named "attn" (Flux, SD3) but not DiT's and
            # PixArt's "attn1"/"attn2": name the block lists' attention modules, whatever their number
            attn = [rf"{ln}\.\d+\.attn\d*" for ln in block_lists(denoiser)]
            H.apply_taylorseer_cache(denoiser, H.TaylorSeerCacheConfig(cache_interval=k, disable_cache_before_step=3,
                                                                       taylor_factors_dtype=torch.float32,
                                                                       cache_identifiers=attn))
            note = f"TaylorSeer cache interval {k}, order 1, on the attention layers"
        elif name == "pab":
            (k,) = setting
            H.apply_pyramid_attention_broadcast(denoiser, H.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=k, spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=ctx_hook.current_timestep))
            note = f"PAB: self-attention reused for {k - 1} of every {k} calls in t in (100, 800)"
        elif name == "fastercache":
            (k,) = setting
            H.apply_faster_cache(denoiser, H.FasterCacheConfig(
                spatial_attention_block_skip_range=k, spatial_attention_timestep_skip_range=(-1, 681),
                current_timestep_callback=ctx_hook.current_timestep, attention_weight_callback=lambda _: 0.5,
                is_guidance_distilled=True, tensor_format="BCHW"))
            note = (f"FasterCache: attention reused every {k} calls for t < 681 (its guidance-distilled mode: no "
                    "reuse across the unconditional batch, which many pipelines batch with the conditional one)")
        else:  # magcache
            thr, k = setting
            ratios = list(mag_ratios) if mag_ratios is not None else [1.0] * num_steps
            H.apply_mag_cache(denoiser, H.MagCacheConfig(threshold=thr, max_skip_steps=k,
                                                         num_inference_steps=len(ratios), mag_ratios=ratios))
            note = (f"MagCache threshold {thr:g}, at most {k} steps skipped in a row, "
                    + ("magnitude ratios calibrated" if mag_ratios is not None
                       else "uncalibrated (flat magnitude ratios: a skip every step the limit allows)"))
    except UserError:
        raise
    except Exception as e:  # the hook rejects this family: say why in one line
        remove_diffusers_cache(denoiser, name)
        raise UserError(f"{name} cannot be applied to {type(denoiser).__name__}: {type(e).__name__}: {e}") from None
    root = getattr(denoiser, "_diffusers_hook", None)
    if not [n for r, n in _cache_hooks(denoiser) if r is not root]:  # acting on nothing: the full model's outputs
        remove_diffusers_cache(denoiser, name)
        raise UserError(f"{name} found no module of {type(denoiser).__name__} to act on (diffusers' hook looks for "
                        "transformer blocks and attention layers by name)")
    reg = HookRegistry.check_if_exists_or_initialize(denoiser)
    _forget_child_registries(reg)
    reg.register_hook(ctx_hook, _CTX_HOOK)
    return note


def _forget_child_registries(reg: HookRegistry) -> None:
    """Drop the root registry's cached list of its children's registries: diffusers builds it once, so a cache applied
    after another one (the bench's rows, one after the other) would otherwise get no cache context on the modules
    it hooks anew."""
    if getattr(reg, "_child_registries_cache", None) is not None:
        reg._child_registries_cache = None


_CACHE_HOOK_PREFIXES = ("fbc", "taylorseer", "pyramid", "faster_cache", "mag_cache")


def _cache_hooks(denoiser: nn.Module) -> list[tuple[HookRegistry, str]]:
    """The diffusers cache hooks installed in ``denoiser``, as (registry, hook name)."""
    out = []
    for mod in denoiser.modules():
        r = getattr(mod, "_diffusers_hook", None)
        if r is not None:
            out += [(r, n) for n in r._hook_order if n.startswith(_CACHE_HOOK_PREFIXES)]
    return out


def remove_diffusers_cache(denoiser: nn.Module, name: str) -> None:
    """Remove every hook :func:`apply_diffusers_cache` installed."""
    reg = HookRegistry.check_if_exists_or_initialize(denoiser)
    if reg.get_hook(_CTX_HOOK) is not None:
        reg.remove_hook(_CTX_HOOK, recurse=False)
    for r, hook_name in _cache_hooks(denoiser):
        r.remove_hook(hook_name, recurse=False)
    _forget_child_registries(reg)


def magcache_ratios(denoiser: nn.Module, run: Callable[[], Any]) -> list[float]:
    """MagCache's magnitude ratios of ``denoiser``, measured while ``run()`` samples with it (calibration inputs).

    The ratio at call i of a generation is MagCache's: the mean over tokens (and the batch) of
    ``|r_i| / |r_(i-1)|``, where ``r`` is the residual the transformer block stack adds (the last block's
    output minus the first block's input), and 1 at the first call. Generations are told apart by the
    timestep rule of the skip plans (a call at a higher timestep starts a new one); the ratios are averaged
    over the generations ``run`` makes, which must all make the same number of denoiser calls.
    Nothing is skipped meanwhile: the outputs are the model's own. Same ratios as diffusers'
    ``MagCacheConfig(calibrate=True)`` prints for one generation (``tests/test_skip_plan.py``).
    """
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from diffslim.models.anatomy import block_lists

    lists = block_lists(denoiser)
    if not lists:
        raise UserError(f"magcache: {type(denoiser).__name__} has no transformer blocks to calibrate "
                        "(U-Nets: use deepcache or dipgo)")
    head, tail = getattr(denoiser, lists[0])[0], getattr(denoiser, lists[-1])[-1]
    check_block_registry(denoiser, "magcache")  # diffusers' caches know the block classes they registered
    head_meta, tail_meta = (TransformerBlockRegistry.get(type(b)) for b in (head, tail))
    t_index = _timestep_index(denoiser)
    gens: list[list[float]] = []
    st: dict[str, Any] = {"t": None, "input": None, "prev": None}

    def on_root(module, args, kwargs):
        t = _call_timestep(module, args, kwargs, t_index)
        tf = _noise_level(module, t)
        if st["t"] is None or tf > st["t"]:
            gens.append([])
            st["prev"] = None
        st["t"] = tf

    def on_head(module, args, kwargs):
        st["input"] = head_meta._get_parameter_from_args_kwargs(head_meta.hidden_states_argument_name, args, kwargs)

    def on_tail(module, args, kwargs, output):
        out = output[tail_meta.return_hidden_states_index] if isinstance(output, tuple) else output
        inp = st["input"]
        if out.shape == inp.shape:
            res = out - inp
        elif out.ndim == 3 and inp.ndim == 3 and out.shape[2] == inp.shape[2]:
            res = out[:, -inp.shape[1]:] - inp  # the tail returned text + image tokens: the image ones are last
        else:
            res = out
        res = res.detach().float()
        prev = st["prev"]
        gens[-1].append(1.0 if prev is None else
                        float((torch.linalg.norm(res, dim=-1) / (torch.linalg.norm(prev, dim=-1) + 1e-8)).mean()))
        st["prev"] = res

    handles = [denoiser.register_forward_pre_hook(on_root, with_kwargs=True),
               head.register_forward_pre_hook(on_head, with_kwargs=True),
               tail.register_forward_hook(on_tail, with_kwargs=True)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    gens = [g for g in gens if g]
    if not gens:
        raise UserError("magcache: the calibration run never called the denoiser's transformer blocks")
    if len({len(g) for g in gens}) != 1:
        raise UserError(f"magcache: the calibration generations made {sorted({len(g) for g in gens})} denoiser calls; "
                        "MagCache needs the same number in every generation")
    return [float(np.mean(col)) for col in zip(*gens)]
