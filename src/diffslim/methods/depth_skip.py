"""Depth-skip pruning (Kim and Cho, 2024): keep the shallow part of a U-Net, remove the deep part.

Depth is counted in the latent-diffusion depth units of the anatomy: with ``n`` input units
(SD: 12), depth ``N`` keeps input units ``0..N-1`` and output units ``n-N..n-1`` and removes the
rest, the middle block included; depth ``n + 1`` is the full model. The deepest kept output unit
receives zeros of the removed path's channel width in place of the upsampled feature; its skip
connection is unchanged and no kept weight changes.

How: every removed module is replaced by a parameter-free *stand-in* that returns zeros of the
shape the module would have returned (a resnet, an attention, a down/upsampler, the mid block), so
the stock diffusers forward runs unchanged around them and the removed path costs no MACs, no
weights and almost no time. A diffusers ``ModelHook`` on the up block that holds the deepest kept
unit zeroes that block's incoming feature when the unit is the block's first layer (this is where
ControlNet's mid-block residual would otherwise leak in). ControlNet residuals that would feed
removed units are added to stand-in outputs that nothing reads, i.e. dropped.

The pruned model is an ordinary diffusers model of class ``DepthSkipUNet2DConditionModel`` /
``DepthSkipUNet2DModel``: its config is the original's plus ``depth_skip``; ``save_pretrained``
writes only the kept weights and ``from_pretrained`` reloads them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
# diffusers decides how to load a component recorded as ["diffslim.methods.depth_skip", CLASS] by
# looking up ModelMixin in that module: this import lets a pipeline folder written by save_pretrained
# with a depth-skipped U-Net reload with DiffusionPipeline.from_pretrained.
from diffusers import ModelMixin  # noqa: F401
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from diffslim.errors import UserError

_ZERO_INPUT_HOOK = "diffslim_depth_skip_zero_input"


# ------------------------------------------------------------------------------------------
# Stand-ins: what a removed module returns, without weights or compute


class RemovedResnet(nn.Module):
    """Stands in for a removed ``ResnetBlock2D``: zeros ``(B, out_channels, H', W')``."""

    def __init__(self, out_channels: int, up: bool = False, down: bool = False):
        super().__init__()
        self.out_channels, self.up, self.down = out_channels, up, down

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        b, _, h, w = input_tensor.shape
        if self.up:
            h, w = 2 * h, 2 * w
        if self.down:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return input_tensor.new_zeros(b, self.out_channels, h, w)


class RemovedAttention(nn.Module):
    """Stands in for a removed attention: zeros like its input, in the wrapper the original returned."""

    def __init__(self, returns_output_object: bool):
        super().__init__()
        self.returns_output_object = returns_output_object

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        out = torch.zeros_like(hidden_states)
        if not self.returns_output_object:
            return out
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)


class RemovedDownsampler(nn.Module):
    """Stands in for a removed ``Downsample2D``: zeros at half the spatial size (rounded up)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, hidden_states, *args, **kwargs):
        b, _, h, w = hidden_states.shape
        return hidden_states.new_zeros(b, self.out_channels, math.ceil(h / 2), math.ceil(w / 2))


class RemovedUpsampler(nn.Module):
    """Stands in for a removed ``Upsample2D``: zeros at ``output_size`` or twice the spatial size."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        b, _, h, w = hidden_states.shape
        size = tuple(output_size) if output_size is not None else (2 * h, 2 * w)
        return hidden_states.new_zeros(b, self.out_channels, *size)


class RemovedMidBlock(nn.Module):
    """Stands in for a removed mid block: zeros like its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class _ZeroIncomingFeature(ModelHook):
    """Zeroes an up block's incoming ``hidden_states``: the removed path's place at the deepest kept unit."""

    def pre_forward(self, module, *args, **kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = torch.zeros_like(kwargs["hidden_states"])
        else:
            args = (torch.zeros_like(args[0]),) + tuple(args[1:])
        return args, kwargs


def _stand_in(module: nn.Module, name: str) -> nn.Module:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    if isinstance(module, ResnetBlock2D):
        return RemovedResnet(module.out_channels, up=module.up, down=module.down)
    if isinstance(module, Downsample2D):
        return RemovedDownsampler(module.out_channels)
    if isinstance(module, Upsample2D):
        return RemovedUpsampler(module.out_channels)
    if isinstance(module, Attention):
        return RemovedAttention(returns_output_object=False)
    if type(module).__name__ in ("Transformer2DModel", "DualTransformer2DModel"):
        return RemovedAttention(returns_output_object=True)
    if name == "mid_block":
        return RemovedMidBlock()
    raise UserError(f"depth-skip cannot remove {name} ({type(module).__name__}); supported: resnets, "
                    "attentions, down/upsamplers and the mid block of SD-style U-Nets")


# ------------------------------------------------------------------------------------------
# The depth plan


def depth_layout(unet: nn.Module):
    """``(input_units, middle_unit, output_units)`` of a U-Net from its anatomy (no MACs counted)."""
    from diffslim.models.anatomy import anatomy

    an = anatomy(unet, count_macs=False)
    if not an.input_units or len(an.input_units) != len(an.output_units):
        raise UserError(f"{type(unet).__name__} has no symmetric depth-unit layout; depth-skip needs an SD-style U-Net")
    return an.input_units, an.middle_unit, an.output_units


def max_depth(unet: nn.Module) -> int:
    """The full model's depth: number of input units + 1 (SD-1.5: 13; SDXL: 10)."""
    return len(depth_layout(unet)[0]) + 1


def removed_modules(unet: nn.Module, depth: int) -> list[str]:
    """Names of the modules depth ``depth`` removes, in forward order (down, mid, up)."""
    inputs, middle, outputs = depth_layout(unet)
    n = len(inputs)
    if not 1 <= depth <= n + 1:
        raise UserError(f"depth {depth} is outside 1..{n + 1} for this U-Net ({n} input units; {n + 1} is the full model)")
    if depth == n + 1:
        return []
    names = [m for u in inputs[depth:] for m in u.modules]
    if middle is not None:
        names += list(middle.modules)
    names += [m for u in outputs[: n - depth] for m in u.modules]
    return names


def _zero_input_block(unet: nn.Module, depth: int) -> Optional[str]:
    """The up block whose incoming feature must be zeroed: the deepest kept output unit's, if it is that block's first layer."""
    inputs, _, outputs = depth_layout(unet)
    n = len(inputs)
    if depth == n + 1:
        return None
    first_kept = outputs[n - depth]
    name = first_kept.modules[0]  # up_blocks.{i}.resnets.{k}
    parts = name.split(".")
    if parts[0] == "up_blocks" and parts[2] == "resnets" and parts[3] == "0":
        return ".".join(parts[:2])
    return None


def _prune_in_place(unet: nn.Module, depth: int) -> None:
    for name in removed_modules(unet, depth):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        old = unet.get_submodule(name)
        stand_in = _stand_in(old, name)
        if isinstance(parent, nn.ModuleList):
            parent[int(child)] = stand_in
        else:
            setattr(parent, child, stand_in)
    block = _zero_input_block(unet, depth)
    if block is not None:
        HookRegistry.check_if_exists_or_initialize(unet.get_submodule(block)).register_hook(
            _ZeroIncomingFeature(), _ZERO_INPUT_HOOK)


def _pruned_class(base: type, name: str) -> type:
    """A subclass of ``base`` whose config adds ``depth_skip`` (see ``diffslim.models.derived``)."""
    from diffslim.models.derived import config_extended_class

    return config_extended_class(
        base, name, "depth_skip", lambda model, depth: _prune_in_place(model, int(depth)), __name__,
        f"A ``{base.__name__}`` pruned to depth ``depth_skip`` (see ``diffslim.methods.depth_skip``).")


DepthSkipUNet2DConditionModel = _pruned_class(UNet2DConditionModel, "DepthSkipUNet2DConditionModel")
DepthSkipUNet2DModel = _pruned_class(UNet2DModel, "DepthSkipUNet2DModel")


def install_depth(model: nn.Module, depth: int) -> None:
    """Depth-skip ``model`` in place (its modules must still be the original ones): what a class with a
    ``depth_skip`` config runs at construction, also when another method's class extends it."""
    _prune_in_place(model, int(depth))


def is_removed(module: nn.Module) -> bool:
    """Whether ``module`` is a depth-skip stand-in (a removed resnet, attention, sampler or mid block)."""
    return isinstance(module, (RemovedResnet, RemovedAttention, RemovedDownsampler, RemovedUpsampler, RemovedMidBlock))


def depth_skip(unet: nn.Module, depth: int) -> nn.Module:
    """A depth-``depth`` copy of ``unet`` that shares the kept weights (no copy, no change).

    Works on real weights and on the meta device. ``depth == max_depth(unet)`` gives a model whose
    outputs equal the original's bit for bit. LoRAs loaded into ``unet`` stay on the kept modules. A model changed by another method (a layer-pruned U-Net)
    keeps that change when a class recording both is registered (``diffslim.combined``).
    """
    from diffslim.models.derived import extension_of, share_weights

    base = extension_of(type(unet), "depth_skip")
    if base is None:
        raise UserError(f"depth-skip supports UNet2DConditionModel and UNet2DModel (and their layer-pruned "
                        f"exports), not {type(unet).__name__}")
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    previous = config.pop("depth_skip", None)
    if previous is not None and depth > previous:
        raise UserError(f"this U-Net is already pruned to depth {previous}; cannot grow it to depth {depth}")
    removed_modules(unet, depth)  # validates the depth with a clear message
    param = next(unet.parameters())
    with torch.device("meta"):
        pruned = base.from_config({**config, "depth_skip": depth})
    if param.device.type == "meta":
        return pruned.eval()
    share_weights(unet, pruned)  # and the LoRAs loaded on the kept modules
    return pruned.to(param.device).eval()


# ------------------------------------------------------------------------------------------
# Multi-depth: a different depth per range of timesteps (the paper's ablation)

_ROUTER_HOOK = "diffslim_multi_depth_router"


class _MultiDepthRouter(ModelHook):
    """Sends each denoiser call to the depth-skipped variant of its timestep's range.

    ``ranges``: ``[(t_min, depth), ...]`` sorted by ``t_min`` descending; a call at timestep ``t``
    uses the first range with ``t >= t_min``; a depth of None or the full depth runs the model itself.
    The variants share the model's weights.
    """

    def __init__(self, ranges, variants):
        super().__init__()
        self.ranges = ranges
        self.variants = variants
        self.compiled: Optional[dict] = None  # set by compile_multi_depth: depth -> compiled callable

    def depth_for(self, t: float):
        for t_min, depth in self.ranges:
            if t >= t_min:
                return depth
        return None

    def new_forward(self, module, sample, timestep, *args, **kwargs):
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        depth = self.depth_for(t)
        if depth is None or depth not in self.variants:
            run = self.compiled.get(None) if self.compiled else None
            return (run or self.fn_ref.original_forward)(sample, timestep, *args, **kwargs)
        run = self.compiled.get(depth) if self.compiled else None
        return (run or self.variants[depth])(sample, timestep, *args, **kwargs)


def multi_depth_router(unet: nn.Module):
    """The multi-depth router :func:`multi_depth` installed on ``unet`` (its ``ranges``: ``[(t_min, depth), ...]``),
    or None."""
    reg = getattr(unet, "_diffusers_hook", None)
    return reg.get_hook(_ROUTER_HOOK) if reg is not None else None


def remove_multi_depth(unet: nn.Module) -> None:
    """Remove an installed multi-depth router (no-op when none is installed): ``unet`` runs at full depth again."""
    if multi_depth_router(unet) is not None:
        unet._diffusers_hook.remove_hook(_ROUTER_HOOK, recurse=False)


def compile_multi_depth(unet: nn.Module, compile_fn: Optional[Callable[[Callable, str], Callable]]) -> int:
    """Run each depth of an installed multi-depth schedule, and the full model, through
    ``compile_fn(forward, name)`` (``None``: back to eager); returns how many it compiled. The routing by timestep stays in Python:
    a compiled router would guard on the timestep and recompile at every step."""
    router = multi_depth_router(unet)
    if router is None:
        raise ValueError("no multi-depth schedule is installed on this model")
    if compile_fn is None:
        router.compiled = None
        return 0
    # torch.compile is lazy: a wrapped forward that no timestep reaches costs nothing
    router.compiled = {d: compile_fn(v.__call__, f"depth_{d}") for d, v in router.variants.items()}
    router.compiled[None] = compile_fn(router.fn_ref.original_forward, "full_depth")
    return len(router.compiled)


def multi_depth(unet: nn.Module, ranges) -> nn.Module:
    """Install on ``unet`` (in place) a router that runs depth ``d`` for timesteps ``t >= t_min``.

    ``ranges``: ``[(t_min, depth), ...]``; ranges are matched from the highest ``t_min`` down, and a
    timestep below every ``t_min`` runs the full model. The full weights stay (steps at full depth
    need them); the pruned variants share them. Returns ``unet``.
    """
    full = max_depth(unet)
    ranges = sorted(((int(t), int(d)) for t, d in ranges), key=lambda r: -r[0])
    if not ranges:
        raise UserError("a multi-depth schedule needs at least one (t_min, depth) range")
    if len({t for t, _ in ranges}) != len(ranges):
        raise UserError(f"multi-depth ranges repeat a t_min: {ranges}")
    for _, d in ranges:
        removed_modules(unet, d)  # validates each depth
    variants = {d: depth_skip(unet, d) for _, d in ranges if d < full}
    remove_multi_depth(unet)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(_MultiDepthRouter(ranges, variants), _ROUTER_HOOK)
    return unet


# ------------------------------------------------------------------------------------------
# Profiles of depth-skipped models (measure's profiler on this method's copies)


def profile_depth(model, height: Optional[int] = None, width: Optional[int] = None, repeats: int = 5, *,
                  depth: Optional[int] = None, **kwargs) -> dict:
    """:func:`diffslim.measure.profile.profile_model` (the same arguments) of the model depth-skipped to ``depth``
    (None: the model as it is); the result also says ``depth``."""
    from diffslim.measure.profile import profile_model

    out = profile_model(model, height, width, repeats, **kwargs,
                        transform=None if depth is None else (lambda den: depth_skip(den, depth)))
    out["depth"] = depth
    return out


def profile_depths(model: str, height: Optional[int] = None, width: Optional[int] = None) -> list[dict]:
    """Params and MACs of the depth-skipped model at every depth (1 .. full); no timing.

    One row per depth: ``depth``, ``params``, ``macs``, ``macs_excl_attention`` and their ratios to the full
    model.
    """
    from diffslim.measure.profile import profile_denoiser
    from diffslim.models.load import load

    loaded = load(model)
    rows = []
    for d in range(1, max_depth(loaded.denoiser) + 1):
        p = profile_denoiser(loaded, depth_skip(loaded.denoiser, d), height, width, timing=False)
        rows.append({"depth": d, "params": p["params"], "macs": p["macs"],
                     "macs_excl_attention": p["macs_excl_attention"]})
    full = rows[-1]
    for r in rows:
        r["params_ratio"] = r["params"] / full["params"]
        r["macs_ratio"] = r["macs"] / full["macs"]
    return rows
