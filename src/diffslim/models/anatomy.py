"""The anatomy of a denoiser: one inventory of its units, with params and MACs, that every method uses.

A *unit* is a set of diffusers modules (``named_modules()`` names) that a method treats as one
piece: a down block, a resnet with its attention, a transformer block, a depth unit. The anatomy
lists the units of a denoiser at three granularities and computes each unit's parameter count and
MACs once (params from the module tree, MACs from one profiled forward, see ``diffslim.models.macs``).

- ``blocks`` (coarse): each down block, the mid block, each up block of a U-Net; each transformer
  block of a transformer.
- ``layers`` (fine): for U-Nets, in order down -> mid -> up, each resnet together with the attention
  of the same index (kind "layer", or "resnet" when the level has no attention), each down/upsampler,
  and the mid block as one unit; for transformers the same units as ``blocks``.
- depth units (U-Nets only): the layout of the original latent-diffusion U-Net (``input_blocks``,
  ``middle_block``, ``output_blocks``), derived from the diffusers config for any number of levels
  and ``layers_per_block``:

  * input unit 0 is ``conv_in``; then for each down level: one unit per layer (``resnets[k]`` +
    ``attentions[k]`` if present), then one unit for the level's downsampler if it has one.
    SD-1.5 (4 levels, 2 layers, 3 downsamplers): 1 + 3 * (2 + 1) + 2 = 12 input units;
    SDXL (3 levels): 1 + (2 + 1) + (2 + 1) + 2 = 9.
  * the middle unit is ``mid_block``.
  * output units: for each up level, one unit per layer (``up_blocks[i].resnets[k]`` +
    ``attentions[k]``); the level's upsampler belongs to the level's LAST layer unit, as in the
    original LDM where the upsample sits inside the output block. SD-1.5: 4 * 3 = 12 output units.
  * output unit ``j`` reads the skip connection written by input unit ``n - 1 - j`` (diffusers pushes
    the output of ``conv_in``, of each down layer and of each downsampler on a stack that the up
    layers pop): that index is the unit's ``pair``.

Children of a block that are none of resnets/attentions/downsamplers/upsamplers (the skip paths of
``SkipDownBlock2D``/``SkipUpBlock2D``) join the block's last unit, so that at every granularity the
units, together with ``outside``, partition the denoiser's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from torch import nn

from diffslim.errors import UserError
from diffslim.models.macs import count_macs as _count_macs
from diffslim.models.macs import default_inputs

__all__ = ["Unit", "DepthUnit", "Anatomy", "anatomy", "unet_families", "block_lists"]

FAMILIES = ("unet2d_condition", "unet2d", "transformer")
_BLOCK_PARTS = ("resnets", "attentions", "downsamplers", "upsamplers")

# Two-stream transformer blocks (SD3's MMDiT, Flux's double- and single-stream blocks): they take and return
# ``(encoder_hidden_states, hidden_states)``, the image stream second.
TWO_STREAM_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                     "AuraFlowJointTransformerBlock", "QwenImageTransformerBlock", "ChromaTransformerBlock",
                     "Flux2TransformerBlock")
# two-stream blocks that return ``(hidden_states, encoder_hidden_states)``, the image stream first
HIDDEN_FIRST_BLOCKS = ("CogView4TransformerBlock",)


@dataclass(frozen=True)
class Unit:
    """A piece of a denoiser: ``modules`` are ``named_modules()`` names, disjoint and not nested.

    ``params`` counts each parameter of the modules once; ``macs`` is the MACs spent inside them
    in the anatomy's profiled forward (None when MACs were not counted).
    Kinds: "conv_in", "resnet", "attention", "layer" (a resnet + its attention), "downsampler",
    "upsampler", "down_block", "mid_block", "up_block", "transformer_block", "depth_unit".
    """

    name: str
    kind: str
    modules: tuple[str, ...]
    params: int
    macs: int | None


@dataclass(frozen=True)
class DepthUnit(Unit):
    """A depth unit of a U-Net (kind "depth_unit"), in the original latent-diffusion layout.

    ``side`` is "input", "middle" or "output"; ``index`` its position on that side (0 for the
    middle); ``pair`` the index on the other side that it is joined to by a skip connection (output
    unit ``j`` <-> input unit ``n - 1 - j``; None for the middle unit). ``role`` says what it holds:
    "conv_in", "layer", "resnet", "downsampler" or "mid_block". Its ``name`` is its first module's.
    """

    side: str
    index: int
    pair: int | None
    role: str


@dataclass(frozen=True)
class Anatomy:
    """The inventory of one denoiser (see the module docstring for the three granularities).

    ``params``: all parameters; ``macs``: MACs of one forward at ``sample_size`` (latent ``(h, w)``;
    None if not counted); ``outside``: names of the root's children (and of parameters held by the
    root itself) that are in no block: ``conv_in``, embeddings, ``conv_norm_out``, ``conv_out``,
    patch embedding, final norm and projection; ``outside_params``: their parameters, so that
    ``sum(b.params for b in blocks) + outside_params == params``. ``module_macs``: MACs per module
    name from the same forward (children included), for methods that need a finer split.
    """

    denoiser_class: str
    family: str
    params: int
    macs: int | None
    sample_size: tuple[int, int] | None
    blocks: tuple[Unit, ...]
    layers: tuple[Unit, ...]
    input_units: tuple[DepthUnit, ...] = ()
    middle_unit: DepthUnit | None = None
    output_units: tuple[DepthUnit, ...] = ()
    outside: tuple[str, ...] = ()
    outside_params: int = 0
    module_macs: Mapping[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def depth_units(self) -> tuple[DepthUnit, ...]:
        """Input units, the middle unit (if any), then output units."""
        middle = (self.middle_unit,) if self.middle_unit is not None else ()
        return self.input_units + middle + self.output_units

    def units(self, level: str = "blocks") -> tuple[Unit, ...]:
        """The units of ``level``: "blocks", "layers" or "depth"."""
        if level == "blocks":
            return self.blocks
        if level == "layers":
            return self.layers
        if level == "depth":
            return self.depth_units
        raise ValueError(f"unknown level {level!r}; use 'blocks', 'layers' or 'depth'")

    def table(self, level: str = "blocks") -> list[dict[str, Any]]:
        """One row ``{name, params, macs}`` per unit of ``level`` ("blocks", "layers" or "depth")."""
        return [{"name": u.name, "params": u.params, "macs": u.macs} for u in self.units(level)]


# ---------------------------------------------------------------------------------------------


def unet_families() -> dict[type, str]:
    """The diffusers U-Net classes the anatomy knows, with their family names."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    return {UNet2DConditionModel: "unet2d_condition", UNet2DModel: "unet2d"}


def block_lists(denoiser: nn.Module) -> list[str]:
    """Names of a transformer denoiser's block lists, in definition order.

    Root-level ``nn.ModuleList`` children named ``*transformer_blocks`` (DiT, PixArt, SD3, Flux's
    ``transformer_blocks`` + ``single_transformer_blocks``), ``blocks`` (HunyuanDiT) or ``layers`` (Lumina2's main
    stack; its ``noise_refiner`` and ``context_refiner`` before it are not units).
    """
    return [n for n, m in denoiser.named_children()
            if isinstance(m, nn.ModuleList) and (n.endswith("transformer_blocks") or n in ("blocks", "layers"))]


def _family(denoiser: nn.Module) -> str:
    for cls, fam in unet_families().items():
        if isinstance(denoiser, cls):
            return fam
    if block_lists(denoiser):
        return "transformer"
    raise UserError(
        f"no anatomy for {type(denoiser).__name__}: supported are UNet2DConditionModel, UNet2DModel and "
        "transformer denoisers with `transformer_blocks` (DiT, PixArt, SD3, Flux, ...)"
    )


class _Builder:
    """Makes units, computing params from the module tree and MACs from the profiled forward."""

    def __init__(self, root: nn.Module, module_macs: Mapping[str, int] | None):
        self.root = root
        self.module_macs = module_macs

    def params_of(self, modules: Iterable[str]) -> dict[int, int]:
        """``{id(parameter): numel}`` over the modules, each parameter once."""
        ids = {}
        for name in modules:
            for p in self.root.get_submodule(name).parameters():
                ids[id(p)] = p.numel()
        return ids

    def _measure(self, modules: tuple[str, ...]) -> tuple[int, int | None]:
        params = sum(self.params_of(modules).values())
        macs = None if self.module_macs is None else sum(self.module_macs.get(m, 0) for m in modules)
        return params, macs

    def unit(self, name: str, kind: str, modules: Iterable[str]) -> Unit:
        modules = tuple(modules)
        return Unit(name, kind, modules, *self._measure(modules))

    def depth(self, side: str, index: int, pair: int | None, role: str, modules: Iterable[str]) -> DepthUnit:
        modules = tuple(modules)
        return DepthUnit(modules[0], "depth_unit", modules, *self._measure(modules), side, index, pair, role)


def _block_layers(block: nn.Module, bname: str) -> tuple[list[tuple[str, list[str]]], list[str], list[str]]:
    """Split a U-Net block into its layers ``[(role, modules)]``, samplers and leftover children.

    Layer k is ``resnets[k]`` plus ``attentions[k]`` when the block has such an attention.
    """
    resnets = getattr(block, "resnets", None) or []
    attentions = getattr(block, "attentions", None) or []
    layers, used = [], set()
    for k in range(len(resnets)):
        mods = [f"{bname}.resnets.{k}"]
        if k < len(attentions) and attentions[k] is not None:
            mods.append(f"{bname}.attentions.{k}")
        layers.append(("layer" if len(mods) == 2 else "resnet", mods))
        used.update(mods)
    samplers = []
    for part in ("downsamplers", "upsamplers"):
        for k, m in enumerate(getattr(block, part, None) or []):
            if m is not None:
                samplers.append(f"{bname}.{part}.{k}")
    used.update(samplers)
    leftovers = []
    for cname, child in block.named_children():
        full = f"{bname}.{cname}"
        if cname in _BLOCK_PARTS:
            for k, m in enumerate(child):
                if m is not None and f"{full}.{k}" not in used:
                    leftovers.append(f"{full}.{k}")
        else:
            leftovers.append(full)
    return layers, samplers, leftovers


def _unet_units(b: _Builder, root: nn.Module):
    blocks, layers, inputs, outputs = [], [], [], []
    middle = None
    inputs.append(b.depth("input", 0, None, "conv_in", ["conv_in"]))

    for i, block in enumerate(root.down_blocks):
        bname = f"down_blocks.{i}"
        blocks.append(b.unit(bname, "down_block", [bname]))
        lay, samplers, left = _block_layers(block, bname)
        pieces = [(role, mods) for role, mods in lay] + [("downsampler", [s]) for s in samplers]
        if left and pieces:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + left)
        elif left:
            pieces = [("layer", left)]
        for role, mods in pieces:
            layers.append(b.unit(mods[0], role, mods))
            inputs.append(b.depth("input", len(inputs), None, role, mods))

    if getattr(root, "mid_block", None) is not None:
        blocks.append(b.unit("mid_block", "mid_block", ["mid_block"]))
        layers.append(b.unit("mid_block", "mid_block", ["mid_block"]))
        middle = b.depth("middle", 0, None, "mid_block", ["mid_block"])

    for i, block in enumerate(root.up_blocks):
        bname = f"up_blocks.{i}"
        blocks.append(b.unit(bname, "up_block", [bname]))
        lay, samplers, left = _block_layers(block, bname)
        fine = [(role, mods) for role, mods in lay] + [("upsampler", [s]) for s in samplers]
        if left and fine:
            fine[-1] = (fine[-1][0], fine[-1][1] + left)
        elif left:
            fine = [("layer", left)]
        for role, mods in fine:
            layers.append(b.unit(mods[0], role, mods))
        # depth units: the upsampler (and any leftovers) ride with the level's last layer
        depth = [list(mods) for _, mods in lay]
        extra = samplers + left
        if depth:
            depth[-1] += extra
        elif extra:
            depth = [extra]
        roles = [role for role, _ in lay] or ["upsampler" if samplers else "layer"]
        for role, mods in zip(roles, depth):
            outputs.append(b.depth("output", len(outputs), None, role, mods))

    n_in, n_out = len(inputs), len(outputs)
    if n_in == n_out:  # the stack of skip connections pairs them in reverse order
        inputs = [_with_pair(u, n_in - 1 - u.index) for u in inputs]
        outputs = [_with_pair(u, n_in - 1 - u.index) for u in outputs]
    return blocks, layers, inputs, middle, outputs


def _with_pair(u: DepthUnit, pair: int) -> DepthUnit:
    return replace(u, pair=pair)


def _transformer_units(b: _Builder, root: nn.Module):
    blocks = [b.unit(f"{ln}.{k}", "transformer_block", [f"{ln}.{k}"])
              for ln in block_lists(root) for k in range(len(getattr(root, ln)))]
    return blocks, list(blocks), [], None, []


def _profiled_size(denoiser: nn.Module, height, width, args, kwargs) -> tuple[int, int] | None:
    if height is not None and width is not None:
        return int(height), int(width)
    for value in list(args) + list(kwargs.values()):
        if hasattr(value, "ndim") and value.ndim == 4:
            return int(value.shape[-2]), int(value.shape[-1])
    size = denoiser.config.get("sample_size") if hasattr(denoiser, "config") else None
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    if size is not None:
        return int(height or size), int(width or size)
    return None


def anatomy(
    denoiser: nn.Module,
    height: int | None = None,
    width: int | None = None,
    count_macs: bool = True,
    inputs: tuple[tuple, dict[str, Any]] | None = None,
    **input_kw,
) -> Anatomy:
    """The anatomy of ``denoiser`` (a diffusers U-Net or transformer; real weights or meta device).

    Params are read from the module tree; MACs, when ``count_macs``, from ONE forward on dummy
    inputs of ``height`` x ``width`` latent pixels (default the config's ``sample_size``; batch 1)
    built by ``diffslim.models.macs.default_inputs(denoiser, height, width, **input_kw)`` (e.g.
    ``context_tokens=2``), or on ``inputs=(args, kwargs)`` when given.
    Raises ``ValueError`` for unsupported families (and, when counting MACs, for families
    ``default_inputs`` cannot feed: pass ``inputs`` or ``count_macs=False``).
    """
    family = _family(denoiser)
    macs, module_macs, size = None, None, None
    if count_macs:
        args, kwargs = inputs if inputs is not None else default_inputs(denoiser, height, width, **input_kw)
        macs, module_macs = _count_macs(denoiser, *args, **kwargs)
        size = _profiled_size(denoiser, height, width, args, kwargs)
    else:
        size = _profiled_size(denoiser, height, width, (), {})

    b = _Builder(denoiser, module_macs)
    if family == "transformer":
        blocks, layers, inputs_u, middle, outputs = _transformer_units(b, denoiser)
    else:
        blocks, layers, inputs_u, middle, outputs = _unet_units(b, denoiser)

    in_blocks = b.params_of(u.modules[0] for u in blocks)
    total = {id(p): p.numel() for p in denoiser.parameters()}
    block_roots = {u.modules[0].split(".")[0] for u in blocks}
    outside = [n for n, _ in denoiser.named_children() if n not in block_roots]
    outside += [n for n, _ in denoiser.named_parameters(recurse=False)]
    outside_params = sum(v for k, v in total.items() if k not in in_blocks)
    return Anatomy(
        denoiser_class=type(denoiser).__name__,
        family=family,
        params=sum(total.values()),
        macs=macs,
        sample_size=size,
        blocks=tuple(blocks),
        layers=tuple(layers),
        input_units=tuple(inputs_u),
        middle_unit=middle,
        output_units=tuple(outputs),
        outside=tuple(outside),
        outside_params=outside_params,
        module_macs=module_macs,
    )
