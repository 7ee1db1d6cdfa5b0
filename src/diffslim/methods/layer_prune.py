"""One-shot layer pruning (LAPTOP-Diff, 2024) and the handcrafted BK-SDM baselines.

A *layer* is a piece of a denoiser that can be removed while the model stays well formed:

- U-Nets: every ``ResnetBlock2D`` (without its own up/down sampling) and every attention layer
  (``Transformer2DModel``) of the down blocks, the mid block and the up blocks; with
  ``inner=True`` the individual transformer blocks inside attention layers that hold several
  (SDXL's deep levels) replace those attention layers as candidates.
- transformer denoisers: each block of ``transformer_blocks`` (DiT, PixArt, SD3, Sana, CogView4, Qwen-Image) and,
  for Flux and Chroma, of ``transformer_blocks`` and ``single_transformer_blocks`` (AuraFlow: ``joint_transformer_blocks`` and
  ``single_transformer_blocks``; HunyuanDiT: ``blocks``; Lumina2 and Z-Image: ``layers``).

Removal replaces a layer by a *stand-in* whose forward is the layer's shortcut:

- a resnet whose hidden input has its output's channel count: the identity on that hidden input. In
  an up block the resnet's input is ``cat([hidden, skip])``: the stand-in keeps ``hidden`` and
  drops the skip, which is exactly BK-SDM's architecture (the removed pair's skip connection is gone).
- another resnet (channels change): its 1x1 ``conv_shortcut`` (kept, with its weights);
- an attention layer, a transformer block: the identity (DiT's first block keeps ``norm1.emb``, the
  conditioning embedding its output layer reads; SD3's and Flux's two-stream blocks pass both the
  image and the text stream through);
- down/upsamplers (only BK-SDM Tiny removes them, in pairs): the identity.

The pruned model is an ordinary diffusers model of class ``LayerPruned<Base>`` whose config adds
``removed_layers`` (module names): ``save_pretrained`` writes only the kept weights and
``from_pretrained`` / ``diffslim.load`` rebuild the same structure. Scoring never copies the model:
a diffusers ``ModelHook`` (:func:`layers_removed`) makes a layer run its stand-in for the duration of
a ``with`` block.

Criteria (a score per layer; larger = more important to keep): ``output-loss`` (L_i = mean squared
difference between the full model's prediction and the prediction with layer i alone removed, over
calibration triples), ``random``, ``magnitude`` (L1 norm of the removed weights), ``taylor``
(|sum g * w| of the diffusion loss' gradient), ``similarity`` (1 - cosine similarity of a layer's
output and its shortcut's output, i.e. of input and output for identity shortcuts) and
``greedy`` (iterative re-scoring, not one-shot). Selection at a target ratio minimises the summed
scores of the removed layers subject to the removed share of params (or MACs) reaching the ratio:
a 0-1 knapsack solved by dynamic programming (:func:`knapsack_min`).

``output-loss-pairs`` (ours, beyond the paper) is the output loss to second order: besides every L_i it
measures L_ij for pairs of layers (all pairs, or those among the ``pair_pool`` layers of least L_i per
unit cost) and predicts L(S) = sum L_i + sum_{i<j in S} (L_ij - L_i - L_j). It is still one-shot (one
scoring pass, no re-scoring after a removal) and costs n(n-1)/2 more calibration runs. Where losses are
far from additive (zoo:digits-dit, six blocks: Pearson r 0.83 over random sets) the prediction tracks the
measured loss much better (r 0.99); with many layers removed at once it over-counts. Selection minimises it under the same constraint
(:func:`quadratic_select`: exact for up to 16 layers, a swap local search from the knapsack's set beyond),
and the measured losses of that set and the first-order one decide between them (:func:`pairs_select`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
# diffusers resolves a component recorded as ["diffslim.methods.layer_prune", CLASS] by looking up
# ModelMixin in that module (pipeline folders with a pruned denoiser reload with from_pretrained).
from diffusers import ModelMixin  # noqa: F401
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from diffslim.errors import UserError
from diffslim.launch import shared_map, world_size
from diffslim.models.adapters import ip_adapter_loaded
from diffslim.models.anatomy import HIDDEN_FIRST_BLOCKS, TWO_STREAM_BLOCKS
from diffslim.models.derived import share_plain_tensors, share_weights

CRITERIA = ("output-loss", "output-loss-pairs", "random", "magnitude", "taylor", "similarity", "greedy")
BK_SDM = ("base", "small", "tiny")
_BYPASS_HOOK = "diffslim_layer_prune_bypass"


# ------------------------------------------------------------------------------------------
# Stand-ins


class PrunedResnet(nn.Module):
    """A removed ``ResnetBlock2D``: ``input[:, :keep]`` (identity on the hidden part), or its 1x1 shortcut.

    Input ``(B, C_in, H, W)``, output ``(B, C_out, H, W)``. ``keep``: channels of the hidden input
    (the rest, an up block's skip connection, is dropped); else ``conv_shortcut`` maps ``C_in -> C_out``.
    """

    def __init__(self, keep: Optional[int] = None, conv_shortcut: Optional[nn.Module] = None):
        super().__init__()
        self.keep = keep
        self.conv_shortcut = conv_shortcut

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        if self.conv_shortcut is not None:
            return self.conv_shortcut(input_tensor)
        if self.keep is not None and self.keep != input_tensor.shape[1]:
            return input_tensor[:, : self.keep]
        return input_tensor


class PrunedAttention(nn.Module):
    """A removed attention layer (``Transformer2DModel``): the identity, in the wrapper it returned."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=hidden_states)
        return (hidden_states,)


class _Holder(nn.Module):
    """Keeps a submodule of a removed layer under its original name (e.g. DiT's ``norm1.emb``)."""

    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


class PrunedTransformerBlock(nn.Module):
    """A removed transformer block: the identity on ``hidden_states`` ``(B, N, D)``.

    ``norm1``: kept when the denoiser reads ``transformer_blocks[0].norm1.emb`` outside the blocks (DiT).
    ``joint``: the block was a two-stream block (SD3's ``JointTransformerBlock``, Flux's double- and
    single-stream blocks, AuraFlow's joint blocks), which returns ``(encoder_hidden_states, hidden_states)``, or
    with ``hidden_first`` (CogView4's blocks) ``(hidden_states, encoder_hidden_states)``: both pass through
    unchanged, as SD3's own ``skip_layers`` does. ``context_pre_only``: SD3's flag, read by its ControlNet
    loop, kept.
    """

    def __init__(self, norm1: Optional[nn.Module] = None, joint: bool = False,
                 context_pre_only: Optional[bool] = None, hidden_first: bool = False):
        super().__init__()
        if norm1 is not None:
            self.norm1 = norm1
        self.joint = joint
        self.hidden_first = hidden_first
        if context_pre_only is not None:
            self.context_pre_only = context_pre_only

    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if self.joint:
            return (hidden_states, encoder_hidden_states) if self.hidden_first else (encoder_hidden_states,
                                                                                      hidden_states)
        return hidden_states


class PrunedSampler(nn.Module):
    """A removed down/upsampler: the identity (removed in pairs, so the skip connections still match)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


# ------------------------------------------------------------------------------------------
# Candidates


@dataclass(frozen=True)
class Layer:
    """A removable layer: its module ``name``, ``kind`` ("resnet", "attention", "transformer_block",
    "downsampler", "upsampler"), the ``params`` and ``macs`` its removal saves (the kept shortcut is not
    counted), and for a resnet the hidden input channels its stand-in keeps (None: the 1x1 shortcut)."""

    name: str
    kind: str
    params: int
    macs: Optional[int] = None
    keep: Optional[int] = None


def _is_resnet(m: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return isinstance(m, ResnetBlock2D) and not (m.up or m.down)


def _is_attention(m: nn.Module) -> bool:
    return type(m).__name__ in ("Transformer2DModel", "DualTransformer2DModel")


def _unet_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    out = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        out.append(("mid_block", unet.mid_block))
    out += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    return out


def _hidden_channels(unet: nn.Module, name: str) -> Optional[int]:
    """Channels of the hidden (non-skip) part of an up-block resnet's input; None elsewhere."""
    parts = name.split(".")
    if parts[0] != "up_blocks":
        return None
    i, k = int(parts[1]), int(parts[3])
    block = unet.up_blocks[i]
    if k > 0:
        return _out_channels(block.resnets[k - 1])
    if i > 0:
        return _out_channels(unet.up_blocks[i - 1].resnets[-1])
    # the mid block (even a removed one) hands on the innermost level's channels
    return int(unet.config.block_out_channels[-1])


def _out_channels(m: nn.Module) -> int:
    if isinstance(m, PrunedResnet):  # removed by an earlier pruning: it hands on ``keep`` channels or its shortcut's
        return int(m.keep if m.keep is not None else m.conv_shortcut.out_channels)
    return int(m.out_channels if hasattr(m, "out_channels") else m.conv2.out_channels)


def _resnet_keep(unet: nn.Module, name: str, resnet: nn.Module) -> Optional[int]:
    """The stand-in rule: keep the hidden input when its channels equal the output's, else None (1x1 shortcut)."""
    out = resnet.out_channels
    hidden = _hidden_channels(unet, name)
    if hidden is not None:
        return out if hidden == out else None
    return out if resnet.conv_shortcut is None else None


def _transformer_lists(model: nn.Module) -> list[str]:
    from diffslim.models.anatomy import block_lists

    return block_lists(model)


def is_unet(model: nn.Module) -> bool:
    return hasattr(model, "down_blocks") and hasattr(model, "up_blocks")


def candidate_names(model: nn.Module, inner: bool = False) -> list[str]:
    """The removable layers of ``model`` in forward order (see the module docstring).

    ``inner``: for attention layers with more than one transformer block (SDXL), the blocks
    ``...attentions.k.transformer_blocks.j`` are the candidates instead of the attention layer.
    Layers already removed (stand-ins) are not candidates.
    """
    if is_unet(model):
        names = []
        for bname, block in _unet_blocks(model):
            resnets = getattr(block, "resnets", None) or []
            attentions = getattr(block, "attentions", None) or []
            # diffusers' mid block runs resnets[0], then (attention, resnet) pairs
            order = []
            for k in range(max(len(resnets), len(attentions))):
                if k < len(resnets):
                    order.append(f"{bname}.resnets.{k}")
                if k < len(attentions) and attentions[k] is not None:
                    order.append(f"{bname}.attentions.{k}")
            for name in order:
                m = model.get_submodule(name)
                if _is_resnet(m):
                    names.append(name)
                elif _is_attention(m):
                    tb = getattr(m, "transformer_blocks", None)
                    if inner and tb is not None and len(tb) > 1:
                        names += [f"{name}.transformer_blocks.{j}" for j, b in enumerate(tb)
                                  if not isinstance(b, PrunedTransformerBlock)]
                    else:
                        names.append(name)
        return names
    lists = _transformer_lists(model)
    if not lists:
        raise UserError(f"layer pruning supports U-Nets and transformer denoisers with transformer_blocks, "
                        f"not {type(model).__name__}")
    return [f"{ln}.{k}" for ln in lists for k, b in enumerate(getattr(model, ln))
            if not isinstance(b, PrunedTransformerBlock)]


def _kept_children(model: nn.Module, name: str, module: nn.Module) -> dict[str, nn.Module]:
    """Submodules of a removed layer that its stand-in keeps: a resnet's 1x1 shortcut, DiT's ``norm1.emb``."""
    if _is_resnet(module):
        keep = _resnet_keep(model, name, module)
        return {"conv_shortcut": module.conv_shortcut} if keep is None and module.conv_shortcut is not None else {}
    if name.endswith(".0") and not is_unet(model) and name.count(".") == 1:
        norm1 = getattr(module, "norm1", None)
        if norm1 is not None and isinstance(getattr(norm1, "emb", None), nn.Module) and \
                type(model).__name__.startswith(("DiT", "LayerPrunedDiT")):
            return {"norm1.emb": norm1.emb}
    return {}


def stand_in(model: nn.Module, name: str) -> nn.Module:
    """The stand-in for layer ``name`` of ``model`` (shares the kept submodules; holds no other weights)."""
    from diffusers.models.resnet import Downsample2D, Upsample2D

    module = model.get_submodule(name)
    kept = _kept_children(model, name, module)
    if _is_resnet(module):
        return PrunedResnet(keep=_resnet_keep(model, name, module), conv_shortcut=kept.get("conv_shortcut"))
    if _is_attention(module):
        return PrunedAttention()
    if isinstance(module, (Downsample2D, Upsample2D)):
        return PrunedSampler()
    if _is_block_entry(model, name):
        norm1 = _Holder(emb=kept["norm1.emb"]) if "norm1.emb" in kept else None
        if isinstance(module, PrunedTransformerBlock):
            return PrunedTransformerBlock(norm1=norm1, joint=module.joint, hidden_first=module.hidden_first,
                                          context_pre_only=getattr(module, "context_pre_only", None))
        kind = type(module).__name__
        return PrunedTransformerBlock(norm1=norm1, joint=kind in JOINT_BLOCKS + HIDDEN_FIRST_BLOCKS,
                                      hidden_first=kind in HIDDEN_FIRST_BLOCKS,
                                      context_pre_only=getattr(module, "context_pre_only", None))
    raise UserError(f"cannot remove {name} ({type(module).__name__}): removable are resnets (without their own "
                    "up/down sampling), attention layers, transformer blocks and down/upsamplers")


# transformer blocks that take and return both streams: ``(encoder_hidden_states, hidden_states)``
JOINT_BLOCKS = TWO_STREAM_BLOCKS


def _is_block_entry(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is one entry of a transformer block list (root level, or inside an attention layer)."""
    parent, _, idx = name.rpartition(".")
    if not idx.isdigit():
        return False
    return parent in _transformer_lists(model) or parent.endswith(".transformer_blocks")


def _kind(module: nn.Module) -> str:
    from diffusers.models.resnet import Downsample2D, Upsample2D

    if _is_resnet(module):
        return "resnet"
    if _is_attention(module):
        return "attention"
    if isinstance(module, Downsample2D):
        return "downsampler"
    if isinstance(module, Upsample2D):
        return "upsampler"
    return "transformer_block"


def _n_params(modules: Iterable[nn.Module]) -> int:
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def candidates(model: nn.Module, inner: bool = False, module_macs: Optional[Mapping[str, int]] = None,
               names: Optional[Sequence[str]] = None) -> list[Layer]:
    """The removable layers with the params (and, given the anatomy's ``module_macs``, the MACs) their
    removal saves: the layer's minus what its stand-in keeps."""
    out = []
    for name in names if names is not None else candidate_names(model, inner):
        module = model.get_submodule(name)
        kept = _kept_children(model, name, module)
        params = _n_params([module]) - _n_params(kept.values())
        macs = None
        if module_macs is not None:
            macs = module_macs.get(name, 0) - sum(module_macs.get(f"{name}.{k}", 0) for k in kept)
        kind = _kind(module)
        keep = _resnet_keep(model, name, module) if _is_resnet(module) else None
        out.append(Layer(name, kind, params, macs, keep))
    return out


# ------------------------------------------------------------------------------------------
# Runtime removal for scoring: a hook that runs the stand-in instead of the layer


class _Bypass(ModelHook):
    """Runs ``stand_in`` in place of the hooked layer's forward."""

    def __init__(self, stand: nn.Module):
        super().__init__()
        self.stand = stand

    def new_forward(self, module, *args, **kwargs):
        return self.stand(*args, **kwargs)


@contextlib.contextmanager
def layers_removed(model: nn.Module, names: Iterable[str]):
    """Within the block, the layers ``names`` of ``model`` run their stand-ins (no copy, no weight change)."""
    names = list(names)
    done = []
    try:
        for name in names:
            module = model.get_submodule(name)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_Bypass(stand_in(model, name)),
                                                                              _BYPASS_HOOK)
            done.append(module)
        yield model
    finally:
        for module in done:
            module._diffusers_hook.remove_hook(_BYPASS_HOOK, recurse=False)


# ------------------------------------------------------------------------------------------
# The pruned model: a diffusers class with a ``removed_layers`` config


def _remove_in_place(model: nn.Module, names: Sequence[str]) -> None:
    stands = {name: stand_in(model, name) for name in names}  # built before anything changes
    for name, stand in stands.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.ModuleList):
            parent[int(child)] = stand
        else:
            setattr(parent, child, stand)


def _pruned_class(base: type, name: str) -> type:
    """A subclass of ``base`` whose config adds ``removed_layers`` (see ``diffslim.models.derived``)."""
    from diffslim.models.derived import config_extended_class

    return config_extended_class(
        base, name, "removed_layers", lambda model, names: install_removed_layers(model, names), __name__,
        f"A ``{base.__name__}`` with the layers ``removed_layers`` removed (see ``diffslim.methods.layer_prune``).")


# the denoisers a layer-pruned model is exported from (as ``LayerPruned<name>``)
EXPORTED = ("UNet2DConditionModel", "UNet2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
            "SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel", "CogView4Transformer2DModel",
            "AuraFlowTransformer2DModel", "HunyuanDiT2DModel", "Lumina2Transformer2DModel", "ZImageTransformer2DModel",
            "QwenImageTransformer2DModel", "ChromaTransformer2DModel", "Flux2Transformer2DModel")


def _make_classes() -> dict[type, type]:
    import diffusers

    out = {}
    for base_name in EXPORTED:
        base = getattr(diffusers, base_name)
        cls = _pruned_class(base, f"LayerPruned{base_name}")
        globals()[cls.__name__] = cls
        out[base] = cls
    return out


_PRUNED_CLASS = _make_classes()
PRUNED_CLASS_NAMES = tuple(c.__name__ for c in _PRUNED_CLASS.values())


def install_removed_layers(model: nn.Module, names: Sequence[str]) -> None:
    """Remove ``names`` from ``model`` in place: what a class with a ``removed_layers`` config runs at
    construction, also when it extends another method's class."""
    _remove_in_place(model, list(names))


def _pruned_class_of(model: nn.Module) -> type:
    from diffslim.models.derived import extension_of

    pruned = extension_of(type(model), "removed_layers")
    if pruned is None:
        raise UserError(f"layer pruning exports {', '.join(EXPORTED[:-1])} and {EXPORTED[-1]} (and depth-skipped "
                        f"U-Nets), not {type(model).__name__}")
    return pruned


def check_prunable(model: nn.Module) -> None:
    """Raise ``UserError`` for a denoiser whose layer-pruned model could not be exported (before any scoring)."""
    _pruned_class_of(model)


def validate_layers(model: nn.Module, names: Sequence[str]) -> None:
    """Raise ``UserError`` naming the first entry of ``names`` that is not a removable module of ``model``."""
    if len(set(names)) != len(names):
        raise UserError("the removed layers repeat a name")
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{name} is not a module of {type(model).__name__}; removable are e.g. "
                            f"{', '.join(candidate_names(model)[:4])}") from None
        if isinstance(m, (PrunedResnet, PrunedAttention, PrunedTransformerBlock, PrunedSampler)):
            raise UserError(f"{name} is already removed")
        try:
            stand_in(model, name)  # raises the message that says what is removable
        except UserError:
            if not any(True for _ in m.parameters()):  # another method's stand-in (depth-skip's)
                raise UserError(f"{name} is already removed ({type(m).__name__}, no weights)") from None
            raise


def prune_layers(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` without the layers ``names``; the kept weights are shared (no copy, no change).

    The result is a ``LayerPruned<Base>`` diffusers model with ``removed_layers`` in its config (the
    union with the model's own, if it was pruned before). Works on real weights and on the meta device;
    ``names=[]`` gives a model whose outputs equal the original's bit for bit. LoRAs loaded into ``model`` stay on
    the kept modules (the same LoRA layers, see :func:`diffslim.models.derived.share_weights`).
    """
    names = list(names)
    validate_layers(model, names)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    pruned = _pruned_on_meta(model, names)
    if device.type == "meta":
        return pruned.eval()
    share_weights(model, pruned)  # and the LoRAs loaded on the kept modules
    # non-persistent buffers (DiT's positional embedding) are not in the state dict: share them too
    buffers = dict(model.named_buffers())
    for name, buf in list(pruned.named_buffers()):
        if buf.device.type == "meta" and name in buffers:
            owner_name, _, attr = name.rpartition(".")
            owner = pruned.get_submodule(owner_name) if owner_name else pruned
            owner._buffers[attr] = buffers[name]
    return pruned.to(device).eval()


def _pruned_on_meta(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """The structure of ``prune_layers(model, names)`` on the meta device (no weights)."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    previous = list(config.pop("removed_layers", None) or [])
    all_names = previous + [n for n in names if n not in previous]
    with torch.device("meta"):
        return _pruned_class_of(model).from_config({**config, "removed_layers": all_names or None}).eval()


def removed_layers_of(model: nn.Module) -> list[str]:
    """The ``removed_layers`` of a pruned model's config (``[]`` for an unpruned model)."""
    return list(getattr(model.config, "removed_layers", None) or [])


# ------------------------------------------------------------------------------------------
# Stock export: a pruned model as its plain diffusers class

# the config key that counts each root-level block list of a stock transformer denoiser
_LIST_LENGTH_KEY = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}
# where a denoiser names its block counts otherwise (HunyuanDiT has no stock export: its long skips pair
# block k with block n - 1 - k, so fewer blocks in a stock config would pair other blocks)
_LIST_LENGTH_KEYS = {"AuraFlowTransformer2DModel": {"joint_transformer_blocks": "num_mmdit_layers",
                                                    "single_transformer_blocks": "num_single_dit_layers"},
                     "Lumina2Transformer2DModel": {"layers": "num_layers"},
                     "ZImageTransformer2DModel": {"layers": "n_layers"}}


def _kept(blocks: nn.ModuleList) -> list[int]:
    return [k for k, b in enumerate(blocks) if not isinstance(b, PrunedTransformerBlock)]


def _stock_base(model: nn.Module) -> type:
    for base, pruned in _PRUNED_CLASS.items():
        if type(model) in (base, pruned):
            return base
    raise UserError(f"a stock export takes a layer-pruned {', '.join(c.__name__ for c in _PRUNED_CLASS)}, "
                    f"not {type(model).__name__}")


def _gone(module: Optional[nn.Module]) -> bool:
    return isinstance(module, (PrunedResnet, PrunedAttention, PrunedSampler))


def _sampler(block: nn.Module, part: str) -> Optional[nn.Module]:
    lst = getattr(block, part, None)
    return lst[0] if lst else None


def _level_kept(model: nn.Module, bname: str) -> list[int]:
    """The kept (resnet, attention) positions of a U-Net block; raises where a resnet and its attention part."""
    block = model.get_submodule(bname)
    attentions = getattr(block, "attentions", None) or []
    kept = []
    for k, r in enumerate(block.resnets):
        a = attentions[k] if k < len(attentions) else None
        if a is not None and _gone(a) != _gone(r):
            which = f"{bname}.attentions.{k}" if _gone(a) else f"{bname}.resnets.{k}"
            raise UserError(f"{which} is removed without its {'resnet' if _gone(a) else 'attention layer'}: a stock "
                            f"{_stock_base(model).__name__} config counts resnet and attention layers in pairs")
        if not _gone(r):
            kept.append(k)
    return kept


def _stock_unet_config(model: nn.Module, config: dict) -> dict[str, list[int]]:
    """Rewrite ``config`` (a copy of ``model``'s) for the stock U-Net that computes what ``model`` does: fewer
    (resnet, attention) pairs per block (``layers_per_block``; an up block keeps one more than its down
    block), no mid block, the innermost level gone with the sampler pair around it (BK-SDM Small and Tiny),
    and transformer depths per attention layer. Returns the renaming ``{source list: kept indices}``.
    Raises ``UserError`` where the removal has no stock config."""
    base = _stock_base(model).__name__
    n_down, n_up = len(model.down_blocks), len(model.up_blocks)
    down = [_level_kept(model, f"down_blocks.{i}") for i in range(n_down)]
    up = [_level_kept(model, f"up_blocks.{i}") for i in range(n_up)]
    rename: dict[str, list[int]] = {}
    levels = list(range(n_down))
    if not down[-1]:  # the innermost level, as BK-SDM Tiny removes it
        if n_down < 2 or up[0] or not _gone(_sampler(model.down_blocks[-2], "downsamplers")) or \
                not _gone(_sampler(model.up_blocks[0], "upsamplers")):
            raise UserError(f"down_blocks.{n_down - 1} is removed whole: a stock {base} loses its innermost level "
                            f"only with up_blocks.0 and the sampler pair around them (BK-SDM Tiny)")
        levels = levels[:-1]
        rename["down_blocks"], rename["up_blocks"] = levels, list(range(1, n_up))
    for i in levels:
        if not down[i]:
            raise UserError(f"every layer of down_blocks.{i} is removed: a stock {base} keeps at least one")
        up_i = n_up - 1 - i
        if len(up[up_i]) != len(down[i]) + 1:
            raise UserError(f"up_blocks.{up_i} keeps {len(up[up_i])} resnets and down_blocks.{i} {len(down[i])}: a "
                            f"stock {base} has one more in the up block than in its down block")
        for j, (bname, part) in enumerate(((f"down_blocks.{i}", "downsamplers"), (f"up_blocks.{up_i}", "upsamplers"))):
            if _gone(_sampler(model.get_submodule(bname), part)) and not (
                    len(levels) < n_down and ((j == 0 and i == n_down - 2) or (j == 1 and up_i == 0))):
                raise UserError(f"{bname}.{part}.0 is removed: a stock {base} has it")
    mid = getattr(model, "mid_block", None)
    mid_layers = [] if mid is None else [*mid.resnets, *(a for a in (getattr(mid, "attentions", None) or [])
                                                         if a is not None)]
    mid_gone = bool(mid_layers) and all(_gone(m) for m in mid_layers)
    if any(_gone(m) for m in mid_layers) and not mid_gone:
        raise UserError(f"part of the mid block is removed: a stock {base} has the whole mid block or none "
                        "(BK-SDM Small)")
    if mid_gone:
        config["mid_block_type"] = None
    # transformer depth of each kept attention layer, in stock order
    depth: dict[str, list[int]] = {}
    inner = False
    for bname, block in _unet_blocks(model):
        if bname == "mid_block" and mid_gone:
            continue
        attentions = getattr(block, "attentions", None)
        if not attentions or getattr(attentions[0], "transformer_blocks", None) is None:
            continue  # no attention, or UNet2DModel's plain Attention
        counts = []
        for k, attn in enumerate(attentions):
            if _gone(attn):
                continue
            kept = _kept(attn.transformer_blocks)
            if len(kept) < len(attn.transformer_blocks):
                rename[f"{bname}.attentions.{k}.transformer_blocks"] = kept
                inner = True
            counts.append(len(kept))
        depth[bname] = counts
    for i in levels:
        for bname, kept, full in ((f"down_blocks.{i}", down[i], len(model.down_blocks[i].resnets)),
                                  (f"up_blocks.{n_up - 1 - i}", up[n_up - 1 - i], len(model.up_blocks[n_up - 1 - i].resnets))):
            if len(kept) < full:
                rename[f"{bname}.resnets"] = kept
                if getattr(model.get_submodule(bname), "attentions", None):
                    rename[f"{bname}.attentions"] = kept
    n_layers = [len(down[i]) for i in levels]
    if len(levels) < n_down:
        for key in ("down_block_types", "block_out_channels", "layers_per_block", "attention_head_dim",
                    "num_attention_heads", "cross_attention_dim", "only_cross_attention",
                    "transformer_layers_per_block"):
            if isinstance(config.get(key), (list, tuple)) and len(config[key]) == n_down:
                config[key] = list(config[key])[:-1]
        for key in ("up_block_types", "reverse_transformer_layers_per_block"):
            if isinstance(config.get(key), (list, tuple)) and len(config[key]) == n_up:
                config[key] = list(config[key])[1:]
    if len(set(n_layers)) == 1:
        config["layers_per_block"] = n_layers[0]
    elif "transformer_layers_per_block" not in config:  # UNet2DModel: one count for every block
        raise UserError(f"the down blocks keep {n_layers} resnets: a stock {base} keeps as many in each")
    else:
        config["layers_per_block"] = n_layers
    if inner:
        orig = config["transformer_layers_per_block"]
        orig = [orig] * len(levels) if isinstance(orig, int) else list(orig)

        def per_attention(bname: str, entry, n: int) -> list[int]:
            if bname in depth:
                return depth[bname]
            return list(entry)[:n] if isinstance(entry, (list, tuple)) else [entry] * n

        downs = [per_attention(f"down_blocks.{i}", orig[j], len(down[i])) for j, i in enumerate(levels)]
        ups = [per_attention(f"up_blocks.{n_up - 1 - i}", orig[j], len(down[i]) + 1)
               for j, i in reversed(list(enumerate(levels)))]
        mid_depth = depth.get("mid_block")
        if mid_depth:  # the mid block reads its depths from the last down block's entry
            last = downs[-1]
            if f"down_blocks.{levels[-1]}" in depth:
                if len(last) < len(mid_depth) or last[:len(mid_depth)] != mid_depth:
                    raise UserError(f"the mid block keeps {mid_depth} transformer blocks per attention layer and the "
                                    f"last down block {last}: a stock {base} gives both the same depths")
            else:
                downs[-1] = mid_depth + last[len(mid_depth):] if len(last) >= len(mid_depth) else list(mid_depth)
        config["transformer_layers_per_block"] = downs
        config["reverse_transformer_layers_per_block"] = ups
    return rename


def _unet_dataflow(model: nn.Module, name_of: Callable[[str], str]) -> dict[str, tuple]:
    """What each module of a U-Net reads, ``{module: (its inputs)}``, values named by the module that computed
    them (mapped by ``name_of``): the skip connections' routing, which shapes alone do not check."""
    flow: dict[str, tuple] = {}
    h = "conv_in"
    skips = [h]

    def run(name: str, module: nn.Module, *inputs: str) -> str:
        if isinstance(module, PrunedResnet) and module.conv_shortcut is not None:
            out = name_of(name) + "#shortcut"
        elif _gone(module):
            return inputs[0]
        else:
            out = name_of(name)
        flow[out] = inputs
        return out

    for i, block in enumerate(model.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for k, r in enumerate(block.resnets):
            h = run(f"down_blocks.{i}.resnets.{k}", r, h)
            if k < len(attentions) and attentions[k] is not None:
                h = run(f"down_blocks.{i}.attentions.{k}", attentions[k], h)
            skips.append(h)
        for k, d in enumerate(getattr(block, "downsamplers", None) or []):
            h = run(f"down_blocks.{i}.downsamplers.{k}", d, h)
            skips.append(h)
    mid = getattr(model, "mid_block", None)
    if mid is not None:
        attentions = getattr(mid, "attentions", None) or []
        h = run("mid_block.resnets.0", mid.resnets[0], h)
        for k, r in enumerate(mid.resnets[1:]):
            if k < len(attentions) and attentions[k] is not None:
                h = run(f"mid_block.attentions.{k}", attentions[k], h)
            h = run(f"mid_block.resnets.{k + 1}", r, h)
    for i, block in enumerate(model.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        for k, r in enumerate(block.resnets):
            h = run(f"up_blocks.{i}.resnets.{k}", r, h, skips.pop())
            if k < len(attentions) and attentions[k] is not None:
                h = run(f"up_blocks.{i}.attentions.{k}", attentions[k], h)
        for k, u in enumerate(getattr(block, "upsamplers", None) or []):
            h = run(f"up_blocks.{i}.upsamplers.{k}", u, h)
    flow["conv_norm_out"] = (h,)
    return flow


def stock_model(model: nn.Module) -> nn.Module:
    """The layer-pruned ``model`` as its stock diffusers class (``LayerPrunedFluxTransformer2DModel`` ->
    ``FluxTransformer2DModel``), which loads with diffusers alone, without diffslim.

    The removed layers leave the model and its config counts the kept ones: ``num_layers`` (DiT, PixArt,
    SD3, Flux's double-stream blocks), ``num_single_layers`` (Flux), SD3.5's ``dual_attention_layers``
    renumbered; for U-Nets ``layers_per_block`` (resnet and attention layers removed in pairs, an up block
    keeping one more than its down block), ``mid_block_type=None`` (the whole mid block removed), the
    innermost level gone with the sampler pair around it, and transformer depths per attention layer
    (``inner=True``): BK-SDM Base, Small and Tiny come out as the stock U-Nets their checkpoints are.
    The kept weights are shared, not copied, and the outputs are the pruned model's bit for bit. Works
    on the meta device (config-only models). A model with nothing removed comes back as the stock class.

    Raises ``UserError`` where no stock config describes the model, for example a lone resnet removed,
    part of a mid block, DiT without its first block (its output layer reads that block's embedding),
    SD3 without its last block (a stock SD3 builds it without the text stream's output layers). The
    checks are general: every weight of the stock model comes from the pruned one, shape for shape,
    every kept weight finds a place, and in a U-Net every module reads the same values (the skip
    connections' routing, :func:`_unet_dataflow`).
    """
    return _stock(model)[0]


def stock_names(model: nn.Module) -> dict[str, str]:
    """Where each module of the layer-pruned ``model`` lives in its stock export (:func:`stock_model`):
    ``{pruned model's module name: stock model's module name}`` for every module the stock model has (a
    block list renumbered: ``transformer_blocks.5`` -> ``transformer_blocks.2``; a U-Net level gone:
    ``up_blocks.1...`` -> ``up_blocks.0...``). Raises ``UserError`` where no stock config describes ``model``."""
    return stock_structure(model)[1]


def stock_structure(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The stock export of the layer-pruned ``model`` (:func:`stock_model`) and :func:`stock_names`'
    ``{pruned model's module name: stock model's module name}``."""
    stock, source = _stock(model)
    return stock, {source(name): name for name, _ in stock.named_modules() if name}


def _stock(model: nn.Module) -> tuple[nn.Module, Callable[[str], str]]:
    """The stock model of :func:`stock_model` and its naming: ``source(stock name) -> pruned model's name``."""
    base = _stock_base(model)
    if getattr(model, "peft_config", None):
        raise UserError(f"{type(model).__name__} has LoRAs loaded ({', '.join(model.peft_config)}): export the model "
                        "without them (unload_lora_weights) and adapt each LoRA to the stock model with "
                        "diffslim lora --stock")
    if ip_adapter_loaded(model):
        raise UserError(f"{type(model).__name__} has an IP-Adapter loaded: export the model without it "
                        "(pipe.unload_ip_adapter()) and adapt the IP-Adapter file to the stock model with "
                        "diffslim stock --ip-adapter")
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k != "removed_layers"}
    if is_unet(model):
        rename = _stock_unet_config(model, config)
    else:
        rename = {}
        for ln in _transformer_lists(model):
            blocks = getattr(model, ln)
            kept = _kept(blocks)
            if len(kept) == len(blocks):
                continue
            key = _LIST_LENGTH_KEYS.get(base.__name__, _LIST_LENGTH_KEY).get(ln)
            _check_stock_blocks(base)
            if key is None or config.get(key) != len(blocks):
                raise UserError(f"{base.__name__}'s config has no count of its {ln}, so blocks removed from "
                                "it have no stock config")
            config[key] = len(kept)
            rename[ln] = kept
            if ln == "transformer_blocks" and config.get("dual_attention_layers"):  # SD3.5
                config["dual_attention_layers"] = [kept.index(i) for i in config["dual_attention_layers"]
                                                   if i in kept]
    with torch.device("meta"):
        stock = base.from_config(config)

    def source(key: str) -> str:
        """The pruned model's name of the stock model's ``key`` (renames nest: a level, then its layers)."""
        out: list[str] = []
        for part in key.split("."):
            kept = rename.get(".".join(out))
            out.append(str(kept[int(part)]) if kept is not None and part.isdigit() else part)
        return ".".join(out)

    state, stock_state = model.state_dict(), stock.state_dict()
    want = {k: source(k) for k in stock_state}
    for k, src in want.items():
        if src not in state or state[src].shape != stock_state[k].shape:
            raise UserError(f"{base.__name__} with the layers {removed_layers_of(model)} removed has no stock "
                            f"config: the stock model's {k} has no counterpart of its shape"
                            + _stock_hint(model))
    unused = sorted(set(state) - set(want.values()))
    if unused:
        raise UserError(f"{base.__name__} with the layers {removed_layers_of(model)} removed has no stock config: "
                        f"the stock model has no place for {unused[0]}" + _stock_hint(model))
    if is_unet(model) and _unet_dataflow(stock, source) != _unet_dataflow(model, lambda n: n):
        raise UserError(f"{base.__name__} with the layers {removed_layers_of(model)} removed has no stock config: "
                        "its skip connections route differently from any stock U-Net's (keep the up blocks' "
                        "removals in line with the down blocks', as BK-SDM does)")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":
        return stock.eval(), source
    stock.load_state_dict({k: state[src] for k, src in want.items()}, assign=True, strict=True)
    buffers = dict(model.named_buffers())
    for name, buf in list(stock.named_buffers()):  # non-persistent buffers (DiT's positional embedding)
        if buf.device.type == "meta" and source(name) in buffers:
            owner_name, _, attr = name.rpartition(".")
            owner = stock.get_submodule(owner_name) if owner_name else stock
            owner._buffers[attr] = buffers[source(name)]
    share_plain_tensors(model, stock, source)  # Lumina2's rotary tables
    return stock.to(device).eval(), source


def stock_keeps(model: nn.Module) -> list[str]:
    """Blocks of a transformer denoiser that a stock export needs kept: DiT's first block (its output layer
    reads that block's embedding), SD3's last (a stock SD3 builds it without the text stream's output layers)."""
    base = _stock_base(model).__name__
    if base == "DiTTransformer2DModel":
        return ["transformer_blocks.0"]
    if base == "SD3Transformer2DModel":
        return [f"transformer_blocks.{len(model.transformer_blocks) - 1}"]
    return []


def _stock_hint(model: nn.Module) -> str:
    removed = removed_layers_of(model)
    name = type(model).__name__
    if "DiT" in name and "transformer_blocks.0" in removed:
        return " (DiT's output layer reads the first block's conditioning embedding: keep transformer_blocks.0)"
    if "SD3" in name and f"transformer_blocks.{len(model.transformer_blocks) - 1}" in removed:
        return (" (a stock SD3 builds its last block without the text stream's output layers: keep "
                f"transformer_blocks.{len(model.transformer_blocks) - 1})")
    return ""


# ------------------------------------------------------------------------------------------
# BK-SDM (Kim et al., 2023): handcrafted removals of an SD-shaped U-Net


def bk_sdm_layers(unet: nn.Module, variant: str) -> list[str]:
    """The layers BK-SDM ``variant`` removes from an SD-shaped U-Net (config only; no weights needed).

    base: the second resnet(+attention) of every down level and the middle resnet(+attention) of every
    up level; small: base and the whole mid block; tiny: small and the innermost level (its down and
    up blocks, and the down/upsampler pair that leads to and from it). On a model pruned before (by layer
    pruning or depth skipping) the layers already gone are left out: the result removes the union.
    """
    if variant not in BK_SDM:
        raise UserError(f"unknown BK-SDM variant {variant!r}; accepted: {', '.join(BK_SDM)}")
    if not is_unet(unet):
        raise UserError(f"BK-SDM needs an SD-shaped U-Net, not {type(unet).__name__}")
    lpb = [len(b.resnets) for b in unet.down_blocks]
    if len(unet.down_blocks) < 2 or any(n != 2 for n in lpb) or any(len(b.resnets) != 3 for b in unet.up_blocks):
        raise UserError("BK-SDM needs an SD-shaped U-Net: 2 resnets per down level and 3 per up level "
                        f"(this one has {lpb} down)")
    names = []

    def pair(bname, k):
        block = unet.get_submodule(bname)
        out = [f"{bname}.resnets.{k}"]
        if getattr(block, "attentions", None) is not None and len(block.attentions) > k:
            out.append(f"{bname}.attentions.{k}")
        return out

    for i in range(len(unet.down_blocks)):
        names += pair(f"down_blocks.{i}", 1)
    for i in range(len(unet.up_blocks)):
        names += pair(f"up_blocks.{i}", 1)
    if variant in ("small", "tiny") and getattr(unet, "mid_block", None) is not None:
        mid = unet.mid_block
        names += [f"mid_block.resnets.{k}" for k in range(len(getattr(mid, "resnets", []) or []))]
        names += [f"mid_block.attentions.{k}" for k in range(len(getattr(mid, "attentions", []) or []))]
    if variant == "tiny":
        last = len(unet.down_blocks) - 1
        for bname in (f"down_blocks.{last}", "up_blocks.0"):
            block = unet.get_submodule(bname)
            for k in range(len(block.resnets)):
                names += [n for n in pair(bname, k) if n not in names]
            for part in ("upsamplers", "downsamplers"):
                names += [f"{bname}.{part}.{k}" for k in range(len(getattr(block, part, None) or []))]
        prev = unet.down_blocks[last - 1]
        names += [f"down_blocks.{last - 1}.downsamplers.{k}" for k in range(len(prev.downsamplers or []))]
    return [n for n in names if _still_there(unet, n)]


def _still_there(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` is still in ``model``: not removed by an earlier pruning (a layer-pruning stand-in)
    nor inside or replaced by another method's stand-in (depth skipping's, which layer pruning cannot remove)."""
    from diffusers.models.resnet import Downsample2D, Upsample2D

    try:
        m = model.get_submodule(name)
    except AttributeError:  # a container on the way was replaced by a stand-in
        return False
    return _is_resnet(m) or _is_attention(m) or isinstance(m, (Downsample2D, Upsample2D)) or (
        _is_block_entry(model, name) and not isinstance(m, PrunedTransformerBlock))


# ------------------------------------------------------------------------------------------
# Calibration triples and output losses


@dataclass
class Calibration:
    """N calibration triples for a denoiser: noisy inputs ``x_t`` ``(N, C, H, W)``, timesteps ``t``
    ``(N,)`` spread across the schedule, conditioning ``cond`` (tensors with batch N), the diffusion
    ``target`` ``(N, C, H, W)`` and ``predict(denoiser, x_t, t, cond)`` (the trainer's task adapter).
    :func:`calibration` noises data; :func:`sampling_calibration` records the pipeline's own denoiser calls
    (``target`` None there; ``source`` says which: the pipeline inputs, their seeds, the steps and each input's
    call)."""

    xt: torch.Tensor
    t: torch.Tensor
    cond: dict
    target: Optional[torch.Tensor]
    predict: Callable
    batch_size: int = 64
    source: dict = field(default_factory=dict)
    # where the conditioning changes shape (CogView4's captions, padded to each call's longest): the starts of the
    # segments after the first; ``cond`` is then a list of one dict per segment, and no batch straddles two
    bounds: tuple = ()

    def __len__(self) -> int:
        return self.xt.shape[0]

    def chunks(self) -> list[tuple[int, int]]:
        """The ``(i, j)`` ranges of triples run together: ``batch_size`` at most, within a segment."""
        edges = [0, *self.bounds, len(self)]
        return [(i, min(i + self.batch_size, b)) for a, b in zip(edges, edges[1:])
                for i in range(a, b, self.batch_size)]

    def _cond_at(self, i: int, j: int):
        if not self.bounds:
            return self._slice(self.cond, i, j)
        edges = [0, *self.bounds, len(self)]
        s = max(k for k in range(len(edges) - 1) if edges[k] <= i)
        if j > edges[s + 1]:
            raise ValueError(f"triples {i}:{j} straddle two conditioning segments (use chunks())")
        return self._slice(self.cond[s], i - edges[s], j - edges[s])

    def _slice(self, value, i, j):
        if torch.is_tensor(value):
            return value[i:j]
        if isinstance(value, dict):
            return {k: self._slice(v, i, j) for k, v in value.items()}
        return value

    def inputs(self, i: int, j: int, dtype: torch.dtype) -> tuple:
        """``(x_t, t, cond)`` of triples ``i:j`` as a denoiser in ``dtype`` takes them: floating inputs and
        conditioning in that dtype (the timesteps as they are)."""
        def cast(v):
            if torch.is_tensor(v):
                return v.to(dtype) if v.is_floating_point() else v
            if isinstance(v, dict):
                return {k: cast(x) for k, x in v.items()}
            return v

        return cast(self.xt[i:j]), self.t[i:j], cast(self._cond_at(i, j))

    @torch.no_grad()
    def run(self, denoiser: nn.Module) -> torch.Tensor:
        """The denoiser's predictions on every triple, ``(N, C, H, W)`` (float32, whatever the denoiser's dtype)."""
        dtype = next(denoiser.parameters()).dtype
        outs = []
        for i, j in self.chunks():
            outs.append(self.predict(denoiser, *self.inputs(i, j, dtype)).float())
        return torch.cat(outs)


def calibration(pipe, n: int = 32, seed: int = 0, data: str = "zoo", batch_size: int = 64,
                size: Optional[int] = None) -> Calibration:
    """``n`` calibration triples for ``pipe``'s denoiser from ``data`` ("zoo" or an image folder, its images at
    ``size`` pixels, default the pipeline's own).

    Samples, noise and timesteps are drawn with ``seed``; the timesteps are stratified over the
    training schedule (one in each of ``n`` equal bins), so every part of the schedule is seen.
    """
    from diffslim.train.data import collate, make_dataset
    from diffslim.train.distill import noising_for, task_for

    if n < 1:
        raise UserError("calibration needs n >= 1 triples")
    task = task_for(pipe, label_dropout=0.0)
    dataset = make_dataset(data, pipe, size)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    while len(idx) < n:
        idx += idx[: n - len(idx)]
    from diffslim.models.load import denoiser_of

    device = next(denoiser_of(pipe).parameters()).device
    with torch.no_grad():
        x0, cond = task.encode(collate([dataset[i] for i in idx]), g, device)
    x0 = x0.float()
    noising = noising_for(pipe)
    t = noising.timesteps(n, g, stratified=True, shape=x0.shape).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    xt, target = noising.noisy(x0, noise, t)
    calib = Calibration(xt=xt, t=t, cond=cond, target=target, predict=task.predict, batch_size=batch_size)
    extra = getattr(task, "extra_cond", None)  # a ControlNet's residuals: once per triple, not once per scored layer
    if extra is not None:
        parts = [extra(xt[i:j], t[i:j], calib._cond_at(i, j)) for i, j in calib.chunks()]
        if parts[0]:
            calib.cond = {**cond, **_cat(parts)}
    return calib


CALIBRATIONS = ("data", "sampling")


def _split(named: dict, rows: list[int], m: int) -> tuple[dict, dict]:
    """A denoiser call's arguments split into the rows ``rows`` of those with one row per batch row (of ``m``) and
    the shared rest (a position-id table, a flag, None), nested dicts split alike."""
    batched, shared = {}, {}
    for k, v in named.items():
        if isinstance(v, dict):
            b, sh = _split(v, rows, m)
            if b:
                batched[k] = b
            if sh or not b:
                shared[k] = sh
        elif torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == m:
            batched[k] = v[rows]
        else:
            shared[k] = v
    return batched, shared


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return type(a) is type(b) and not torch.is_tensor(a) and a == b


def _cat(parts: list):
    if isinstance(parts[0], dict):
        return {k: _cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _merged(shared: dict, batched: dict) -> dict:
    out = dict(shared)
    for k, v in batched.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def sampling_calibration(pipe, n: int = 32, seed: int = 0, data: str = "zoo", steps: int = 50,
                         call_kwargs: Optional[dict] = None, batch_size: int = 64, sample_batch: int = 16,
                         inputs: Optional[Sequence[dict]] = None, progress: bool = False) -> Calibration:
    """Calibration where the pipeline's denoiser really works: the calls it makes while sampling ``n`` inputs
    from ``data`` (:func:`diffslim.train.data.pipeline_inputs`: "zoo", a .txt file of prompts or class labels, a
    .jsonl file of pipeline inputs, an image folder) with ``steps`` steps and ``call_kwargs`` (e.g. the guidance
    scale). Input k contributes its call at one step, the steps stratified over the run (one in each of ``n``
    equal bins of the calls a run makes, drawn with ``seed`` and shuffled over the inputs; an image-to-image run
    at strength s < 1 makes only its ``int(steps * s)`` calls, and they are the ones scored). No training images are needed, only what the
    pipeline takes: prompts are enough for a text-to-image model. A call holds every row the pipeline batches for
    its input (with classifier-free guidance the unconditional and the conditional one), so there are n times
    that many triples. ``target`` is None: a sampling trajectory has no ground truth, so the Taylor criterion,
    which needs the diffusion loss, refuses this calibration. ``inputs``: pipeline inputs to sample instead of
    ``data``'s (cycled to ``n``; the bench passes its own prompts). ``progress``: a bar over the sampled inputs."""
    from diffslim.models.load import denoiser_of
    from diffslim.sample import SampleSpec, denoiser_calls
    from diffslim.train.data import pipeline_inputs
    from diffslim.train.distill import pad_rows

    if n < 1:
        raise UserError("calibration needs n >= 1 triples")
    if steps < 1:
        raise UserError(f"sampling calibration needs steps >= 1, got {steps}")
    pool = list(inputs) if inputs is not None else pipeline_inputs(pipe, data, seed, n)
    if not pool:
        raise UserError("sampling calibration needs at least one pipeline input")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=g).tolist()
    inputs = [pool[order[k % len(pool)]] for k in range(n)]
    seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (n,), generator=g)]
    u, perm = torch.arange(n) + torch.rand(n, generator=g), torch.randperm(n, generator=g)

    def at(calls: int) -> list[int]:  # stratified over the calls the run really makes (img2img: its strength's share)
        return ((u * calls / n).floor().long().clamp(max=calls - 1))[perm].tolist()

    # under `accelerate launch` the runs are split among the processes by batches: small enough that each has one
    sample_batch = min(sample_batch, -(-n // world_size()))
    spec = SampleSpec(inputs, seeds, num_inference_steps=steps, call_kwargs=dict(call_kwargs or {}),
                      batch_size=sample_batch)
    den = denoiser_of(pipe)
    names = list(inspect.signature(den.forward).parameters)
    x_name = names[0]
    # the timestep by name, or a second positional argument named t (Z-Image's forward(x, t, cap_feats))
    t_name = "timestep" if "timestep" in names else ("t" if names[1:2] == ["t"] else None)
    if t_name is None:
        raise UserError(f"{type(den).__name__}.forward takes no 'timestep': sampling calibration cannot tell its "
                        "timestep apart")
    calls = denoiser_calls(pipe, spec, at, progress=progress)
    xs, ts, conds, shared, seqs, per_row, repeated = [], [], [], None, {}, set(), set()
    # a denoiser that takes a list of per-sample tensors (Z-Image: latents and captions, of their own lengths)
    listed = isinstance(calls[0].arguments[x_name], (list, tuple))
    # a mask some calls pass and others leave out where no token is padded (Qwen-Image's encoder_hidden_states_mask):
    # all ones in those, so that the calls batch together
    masks = {k: v.dtype for c in calls for k, v in c.arguments.items() if k.endswith("_mask") and torch.is_tensor(v)}
    for named, rows, _ in calls:
        for k, dtype in masks.items():
            masked = named.get(k[: -len("_mask")])
            if named.get(k) is None and torch.is_tensor(masked):
                named = {**named, k: torch.ones(masked.shape[:2], dtype=dtype, device=masked.device)}
        x = torch.stack(list(named[x_name])) if listed else named[x_name]
        m = x.shape[0]
        t = torch.as_tensor(named[t_name], device=x.device)
        ts.append(t.reshape(-1).expand(m)[rows] if t.numel() == 1 else t[rows])
        xs.append(x[rows].float())
        rest = {}
        for k, v in named.items():
            if k in (x_name, t_name):
                continue
            if listed and isinstance(v, (list, tuple)) and len(v) == m and all(torch.is_tensor(e) for e in v):
                per_row.add(k)  # one tensor per row: padded to one length, and cut back to it for each call
                v = {"rows": pad_rows(list(v)), "lens": torch.tensor([e.shape[0] for e in v], device=x.device)}
            elif isinstance(v, (list, tuple)) and v and all(torch.is_tensor(e) and e.dim() > 0 and e.shape[0] == m
                                                            for e in v):
                seqs[k] = (type(v), len(v))  # e.g. a ControlNet's residuals, one tensor per skip connection
                v = {str(i): e for i, e in enumerate(v)}
            elif (isinstance(v, list) and len(v) == m and not any(torch.is_tensor(e) for e in v)
                  and all(e == v[0] for e in v)):
                repeated.add(k)  # the same value for every row (Qwen-Image's img_shapes): kept once, one per row
                v = v[0]
            rest[k] = v
        batched, static = _split(rest, rows, m)
        conds.append(batched)
        if shared is None:
            shared = static
        elif not _same(static, shared):
            raise UserError(f"{type(pipe).__name__}'s denoiser calls differ in an argument that has no row per "
                            "input; sampling calibration cannot batch them")
    for k in per_row:  # one length over all calls
        longest = max(c[k]["rows"].shape[1] for c in conds)
        for c in conds:
            c[k]["rows"] = pad_rows(list(c[k]["rows"]), longest)
    order, cond, bounds = _segments(conds)
    in_ch = getattr(getattr(den, "config", None), "in_channels", None)
    out_ch = getattr(getattr(den, "config", None), "out_channels", None)
    learned_sigma = in_ch is not None and out_ch == 2 * in_ch  # DiT, PixArt: the pipeline keeps the first half
    kept = {_generated_tokens(c.arguments) for c in calls}
    kept = kept.pop() if len(kept) == 1 else None  # (calls that keep different counts: every output, as before)

    def predict(denoiser, xt, t, c):
        c = {k: (seqs[k][0](v[str(i)] for i in range(seqs[k][1])) if k in seqs else v) for k, v in c.items()}
        c = {k: ([r[:n] for r, n in zip(v["rows"], v["lens"].tolist())] if k in per_row else v) for k, v in c.items()}
        c = _merged(shared, c)
        c.update({k: [c[k]] * xt.shape[0] for k in repeated})
        out = denoiser(**{x_name: list(xt.unbind(0)) if listed else xt, t_name: t}, **c)
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        out = torch.stack(list(out)) if isinstance(out, (list, tuple)) else out
        if kept is not None:  # the input image's tokens: outputs the pipeline drops
            return out[:, :kept]
        return out[:, :in_ch] if learned_sigma else out

    return Calibration(xt=torch.cat([xs[i] for i in order]), t=torch.cat([ts[i] for i in order]), cond=cond,
                       target=None, predict=predict, batch_size=batch_size, bounds=bounds,
                       source={"inputs": inputs, "seeds": seeds, "steps": steps, "calls": [c.call for c in calls],
                               "rows": [len(c.rows) for c in calls]})


def _generated_tokens(named: dict) -> Optional[int]:
    """How many of a denoiser call's tokens (its arguments ``named``) the pipeline keeps, where it appends input
    images' tokens to the noisy ones and drops their outputs (Flux Kontext and Flux.2: the input images' position ids
    are marked in their first column, the generated ones 0, and come after them; Qwen-Image Edit: ``img_shapes``
    lists the generated grid first, then the input images'); None where every output is kept."""
    shapes = named.get("img_shapes")
    if isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], list):
        shapes = shapes[0]  # one list per row, all alike
    if (isinstance(shapes, (list, tuple)) and len(shapes) > 1
            and all(isinstance(x, (list, tuple)) and len(x) == 3 for x in shapes)):
        return int(math.prod(shapes[0]))
    ids = named.get("img_ids")
    if torch.is_tensor(ids) and ids.dim() == 3:  # (batch, tokens, axes): Flux.2's, alike in every row
        ids = ids[0]
    if not torch.is_tensor(ids) or ids.dim() != 2 or not bool((ids[:, 0] != 0).any()):
        return None
    first = int((ids[:, 0] != 0).nonzero()[0, 0])
    return first if first > 0 and bool((ids[first:, 0] != 0).all()) else None


def _shapes(value, prefix: str = "") -> tuple:
    """The shapes beyond the batch dimension of every tensor in a call's batched arguments, by name."""
    if isinstance(value, dict):
        return tuple(x for k in sorted(value) for x in _shapes(value[k], f"{prefix}.{k}"))
    return ((prefix, tuple(value.shape[1:])),) if torch.is_tensor(value) else ()


def _segments(conds: list[dict]) -> tuple[list[int], object, tuple]:
    """The calls' batched arguments joined where their shapes agree: ``(order, cond, bounds)`` with the calls
    reordered so that equal shapes follow each other, ``cond`` one dict (all alike) or a list of one per segment, and
    ``bounds`` the segments' starts after the first, in rows (a Calibration's fields)."""
    keys: dict = {}
    for i, c in enumerate(conds):
        keys.setdefault(_shapes(c), []).append(i)
    groups = list(keys.values())
    order = [i for g in groups for i in g]
    if len(groups) == 1:
        return order, _cat(conds), ()
    cond = [_cat([conds[i] for i in g]) for g in groups]
    sizes = [len(_rows_of(c)) for c in cond]
    return order, cond, tuple(int(x) for x in np.cumsum(sizes)[:-1])


def _rows_of(cond: dict) -> torch.Tensor:
    """A tensor of ``cond`` with one row per triple (any: they all have the batch's rows)."""
    for v in cond.values():
        if torch.is_tensor(v):
            return v
        if isinstance(v, dict):
            found = _rows_of(v)
            if found is not None:
                return found
    return None


def output_loss(model: nn.Module, calib: Calibration, names: Sequence[str],
                reference: Optional[torch.Tensor] = None) -> float:
    """L(S): mean squared difference between ``model``'s predictions and those with the layers ``names``
    removed (by hooks), over every element of every calibration triple. ``reference``: the full
    model's predictions ``calib.run(model)``, when already computed."""
    ref = calib.run(model) if reference is None else reference
    with layers_removed(model, names):
        pred = calib.run(model)
    return float((pred - ref).pow(2).mean())


# ------------------------------------------------------------------------------------------
# Criteria


def _float64(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64 for a score's sum, where the device has it: Apple's MPS has no float64, so there on the CPU."""
    return x.cpu().double() if x.device.type == "mps" else x.double()


def _weights(model: nn.Module, layer: Layer) -> list[nn.Parameter]:
    """The parameters a layer's removal deletes (its stand-in's kept ones excluded)."""
    module = model.get_submodule(layer.name)
    kept = {id(p) for m in _kept_children(model, layer.name, module).values() for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in kept]


def _similarity_scores(model: nn.Module, layers: Sequence[Layer], calib: Calibration) -> dict[str, float]:
    """1 - cos(output, shortcut output) per layer (per sample, flattened), averaged over the triples."""
    sums = {l.name: 0.0 for l in layers}

    class _Tap(ModelHook):
        def __init__(self, name):
            super().__init__()
            self.name, self.stand = name, stand_in(model, name)

        def new_forward(self, module, *args, **kwargs):
            out = self.fn_ref.original_forward(*args, **kwargs)
            short = self.stand(*args, **kwargs)
            a, b = _tensor_of(out), _tensor_of(short)
            cos = torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)
            sums[self.name] += float((1 - cos).sum())
            return out

    mods = []
    try:
        for l in layers:
            m = model.get_submodule(l.name)
            HookRegistry.check_if_exists_or_initialize(m).register_hook(_Tap(l.name), _BYPASS_HOOK)
            mods.append(m)
        calib.run(model)
    finally:
        for m in mods:
            m._diffusers_hook.remove_hook(_BYPASS_HOOK, recurse=False)
    return {k: v / len(calib) for k, v in sums.items()}


def _tensor_of(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "sample"):
        out = out.sample
    return out


def _taylor_scores(model: nn.Module, layers: Sequence[Layer], calib: Calibration) -> dict[str, float]:
    """|sum_w g * w| of each layer's removed weights, g the gradient of the diffusion loss on the triples."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for i, j in calib.chunks():
                pred = calib.predict(model, *calib.inputs(i, j, next(model.parameters()).dtype))
                loss = (pred.float() - calib.target[i:j].float()).pow(2).sum() / calib.target.numel()
                loss.backward()
        scores = {}
        for l in layers:
            s = 0.0
            for p in _weights(model, l):
                if p.grad is not None:
                    s += float((_float64(p.grad) * _float64(p.detach())).sum())
            scores[l.name] = abs(s)
        return scores
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in flags:
            p.requires_grad_(f)


def _share_of(n: int) -> int:
    """How many of ``n`` items this process of a launch computes in :func:`shared_map` (all of them in one process)."""
    from diffslim.launch import group

    dist = group()
    return n if dist is None else len(range(dist.get_rank(), n, dist.get_world_size()))


class _Bar:
    """A tqdm bar when ``on`` (on stderr, as diffusers' own), in the first process of a launch; else nothing."""

    def __init__(self, on: bool, total: Optional[int], desc: str):
        from diffslim.launch import is_first

        self.bar = None
        if on and is_first():  # under `accelerate launch` the first process shows its share
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def score_layers(model: nn.Module, layers: Sequence[Layer], criterion: str, calib: Optional[Calibration] = None,
                 seed: int = 0, reference: Optional[torch.Tensor] = None, progress: bool = False) -> dict[str, float]:
    """One score per layer (larger = more important to keep) by a one-shot ``criterion``.

    "output-loss": L_i of :func:`output_loss`; "random": uniform in [0, 1) from ``seed``;
    "magnitude": L1 norm of the removed weights; "taylor": first-order Taylor |sum g * w|;
    "similarity": 1 - cosine similarity of the layer's output and its shortcut's. Every criterion but
    random and magnitude needs ``calib``. (The iterative "greedy" criterion is :func:`greedy_order`.)
    """
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        vals = torch.rand(len(layers), generator=g, dtype=torch.float64).tolist()
        return {l.name: v for l, v in zip(layers, vals)}
    if criterion == "magnitude":
        return {l.name: float(sum(_float64(p.detach()).abs().sum() for p in _weights(model, l))) for l in layers}
    if criterion not in CRITERIA:
        raise UserError(f"unknown criterion {criterion!r}; accepted: {', '.join(CRITERIA)}")
    if calib is None:
        raise UserError(f"criterion {criterion!r} needs calibration data (a model with weights and a pipeline)")
    if criterion in ("output-loss", "output-loss-pairs"):  # (the pairs' interactions: pair_interactions)
        ref = calib.run(model) if reference is None else reference
        bar = _Bar(progress, _share_of(len(layers)), "output loss of each layer")
        # under `accelerate launch` each process scores its share of the layers
        losses = shared_map(lambda l: output_loss(model, calib, [l.name], ref), layers, bar.update)
        bar.close()
        return {l.name: loss for l, loss in zip(layers, losses)}
    if criterion == "taylor":
        if calib.target is None:
            raise UserError("the taylor criterion needs the diffusion loss, which calibration on sampling "
                            "trajectories has no target for: calibrate on data (--calibration data)")
        return _taylor_scores(model, layers, calib)
    if criterion == "similarity":
        return _similarity_scores(model, layers, calib)
    raise UserError(f"criterion {criterion!r} is iterative: use greedy_order")


def pair_interactions(model: nn.Module, layers: Sequence[Layer], calib: Calibration, single: Mapping[str, float],
                      pool: Optional[int] = None, by: str = "params", reference: Optional[torch.Tensor] = None,
                      progress: bool = False) -> dict[tuple[str, str], float]:
    """The second-order terms of the output loss, ``{(a, b): L({a, b}) - L_a - L_b}`` (``single``: the L_i),
    for every pair of ``layers`` or, with ``pool``, every pair among the ``pool`` layers of least L_i per
    unit of ``by`` (those a selection is likely to remove; pairs outside it count as additive)."""
    if pool is not None and pool < 2:
        raise UserError(f"pair pool {pool!r}: give at least 2 layers (or none for all pairs)")
    ranked = sorted(layers, key=lambda l: single[l.name] / max(1, _cost(l, by)))
    names = [l.name for l in (ranked if pool is None else ranked[:pool])]
    order = {l.name: k for k, l in enumerate(layers)}
    names.sort(key=order.__getitem__)
    ref = calib.run(model) if reference is None else reference
    pairs = [(a, b) for k, a in enumerate(names) for b in names[k + 1:]]
    bar = _Bar(progress, _share_of(len(pairs)), "output loss of layer pairs")
    # under `accelerate launch` each process measures its share of the pairs
    losses = shared_map(lambda ab: output_loss(model, calib, list(ab), ref), pairs, bar.update)
    bar.close()
    return {(a, b): loss - single[a] - single[b] for (a, b), loss in zip(pairs, losses)}


def predicted_loss(names: Iterable[str], single: Mapping[str, float],
                   interactions: Mapping[tuple[str, str], float]) -> float:
    """The second-order prediction of L(S): sum of L_i plus the interaction of every pair in S."""
    s = sorted(set(names))
    inside = set(s)
    return float(sum(single[n] for n in s)
                 + sum(v for (a, b), v in interactions.items() if a in inside and b in inside))


# ------------------------------------------------------------------------------------------
# Selection


def knapsack_min(values: Sequence[float], costs: Sequence[int], target: int, max_states: int = 2_000_000
                 ) -> list[int]:
    """Indices of a subset with ``sum(costs) >= target`` and the least ``sum(values)`` (0-1 knapsack, DP).

    Solved as its complement: keep the items of greatest summed value whose costs fit in
    ``capacity = sum(costs) - target``, remove the rest. Exact when ``capacity / gcd(costs)`` is at most
    ``max_states``; otherwise kept costs are rounded UP to units of ``ceil(capacity / max_states)`` and
    the capacity down, so the constraint still holds (a little optimality may be lost). Raises
    ``UserError`` when even every item together misses the target.
    """
    n = len(values)
    costs = [int(c) for c in costs]
    capacity = sum(costs) - int(target)
    if capacity < 0:
        raise UserError(f"the removable layers hold {sum(costs):,} but the target is {int(target):,}")
    g = 0
    for c in costs:
        g = math.gcd(g, c)
    g = max(g, 1)
    unit = g if capacity // g <= max_states else math.ceil(capacity / max_states)
    C = capacity // unit
    w = [-(-c // unit) for c in costs]  # ceil
    dp = np.zeros(C + 1)  # dp[c]: the best kept value with kept cost <= c
    choice = np.zeros((n, C + 1), dtype=bool)
    for i in range(n):
        wi, vi = w[i], float(values[i])
        if wi > C:
            continue
        cand = np.full(C + 1, -np.inf)
        cand[wi:] = dp[: C + 1 - wi] + vi
        better = cand > dp
        choice[i] = better
        dp = np.where(better, cand, dp)
    kept, c = set(), C
    for i in range(n - 1, -1, -1):
        if choice[i, c]:
            kept.add(i)
            c -= w[i]
    return [i for i in range(n) if i not in kept]


def knapsack_min_capped(values: Sequence[float], costs: Sequence[int], target: int, caps: Sequence[int], cap: int
                        ) -> Optional[list[int]]:
    """Indices of a subset with ``sum(costs) >= target``, ``sum(caps) <= cap`` and the least ``sum(values)`` (a 0-1
    knapsack with two constraints), or None when no subset meets both.

    Solved exactly as a small integer program (scipy's HiGHS): a dynamic program over both constraints needs a grid of
    (cap / gcd) x (target / gcd) cells, billions on a real U-Net, and rounding it coarse enough to fit lost up to 45 %
    of the optimum in our checks. The constraints are checked again in integers on the solution.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(values)
    costs, caps = [int(c) for c in costs], [int(c) for c in caps]
    target, cap = max(int(target), 0), int(cap)
    if cap < 0 or sum(costs) < target:
        return None
    if n == 0:
        return [] if target == 0 else None
    v = np.asarray(values, dtype=float)
    shift = max(1.0, float(np.abs(v).max()))  # scaled to order 1, so that the solver's tolerances are relative
    c = np.asarray(costs, dtype=float) / max(target, 1)
    k = np.asarray(caps, dtype=float) / max(cap, 1)
    lo, hi = (1.0 if target else 0.0), (1.0 if cap else 0.0)
    for margin in (0.0, 1e-6, 1e-4):  # tighten a little where the float solution misses in integers
        res = milp(v / shift, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(c[None], lb=lo + margin), LinearConstraint(k[None], ub=hi - margin)],
                   options={"mip_rel_gap": 0.0, "time_limit": 120.0})
        if res.x is None:
            return None
        taken = [i for i in range(n) if res.x[i] > 0.5]
        if sum(costs[i] for i in taken) >= target and sum(caps[i] for i in taken) <= cap:
            return taken
    return None


def _cost(layer: Layer, by: str) -> int:
    if by == "params":
        return layer.params
    if layer.macs is None:
        raise UserError("selection by MACs needs the layers' MACs (count them with the anatomy)")
    return layer.macs


def target_of(total: int, ratio: float) -> int:
    """The removed amount a ratio asks for: ``ceil(ratio * total)``."""
    check_ratio(ratio)
    return math.ceil(ratio * total)


def check_max_params(share: float) -> float:
    if not (isinstance(share, (int, float)) and 0 < share < 1):
        raise UserError(f"a cap on the params removed of {share!r} is outside (0, 1); e.g. 0.35 removes at most 35% "
                        "of the parameters")
    return float(share)


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
        raise UserError(f"pruning ratio {ratio!r} is outside (0, 1); e.g. 0.5 removes half the parameters")
    return float(ratio)


def check_reachable(model: nn.Module, ratio: float, inner: bool = False, keep: Sequence[str] = (),
                    stock: bool = False) -> None:
    """Refuse, before any calibration or scoring, a ratio of the params that the removable layers cannot reach
    (``keep``, ``stock``, ``inner``: the candidates as :func:`layer_prune` takes them)."""
    from diffslim.models.anatomy import anatomy

    check_ratio(ratio)
    pool = stock_candidate_names(model, inner) if stock and is_unet(model) else candidate_names(model, inner)
    layers = candidates(model, inner=inner, names=[n for n in pool if n not in set(keep)])
    select(layers, dict.fromkeys((l.name for l in layers), 0.0), ratio, anatomy(model, count_macs=False).params)


def select(layers: Sequence[Layer], scores: Mapping[str, float], ratio: float, total: int, by: str = "params",
           max_params: Optional[tuple[float, int]] = None) -> list[str]:
    """The layers to remove: least summed score with removed ``by`` ("params" or "macs") >= ratio * total.

    ``max_params``: ``(share, params of the model)``, with ``by="macs"`` only: also remove at most that share of the
    params (a selection by MACs alone removes whatever is cheap to lose, often most of the params, which a
    distillation afterwards then lacks)."""
    if by not in ("params", "macs"):
        raise UserError(f"--by {by!r}: accepted params, macs")
    target = target_of(total, ratio)
    avail = sum(_cost(l, by) for l in layers)
    if not layers:
        raise UserError("the model has no layer that layer pruning can remove (resnets and attention layers of "
                        "diffusers' U-Net blocks, transformer blocks): a K-diffusion U-Net's blocks, for one, are "
                        "none of these")
    if avail < target:
        raise UserError(f"ratio {ratio} asks to remove {target:,} {by} but the removable layers hold only "
                        f"{avail:,} ({avail / total:.3f} of the model); choose a ratio below {avail / total:.3f}")
    if max_params is not None:
        share, params = max_params
        if by != "macs":
            raise UserError("a cap on the params removed applies to a selection by MACs (--by macs) only")
        check_max_params(share)
        idx = knapsack_min_capped([scores[l.name] for l in layers], [_cost(l, by) for l in layers], target,
                                  [l.params for l in layers], math.floor(share * params))
        if idx is None:
            cap = math.floor(share * params)
            most = knapsack_min_capped([-_cost(l, by) for l in layers], [0] * len(layers), 0,
                                       [l.params for l in layers], cap) or []
            reach = sum(_cost(layers[i], by) for i in most) / total
            raise SelectionUnreachable(f"no set of layers removes {ratio} of the MACs with at most {share} of the "
                                       f"params removed (at most {reach:.3f} of the MACs then); allow more params (a "
                                       f"larger cap) or ask for fewer MACs (a ratio below {reach:.3f})")
        return [layers[i].name for i in idx]
    idx = knapsack_min([scores[l.name] for l in layers], [_cost(l, by) for l in layers], target)
    return [layers[i].name for i in idx]


# _stock_describes' answers: building two models on the meta device per check is what a stock selection spends its
# time on, and the selections at several ratios (layer-compare, layers:auto:stock) and of several runs on one model ask
# the same questions. The answer depends on the structure only: the class, the config (removed layers included), the
# parameter tensors (a fused QKV projection adds some) and a loaded LoRA or IP-Adapter (both refused by the export).
_DESCRIBES: dict = {}


def _stock_describes(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether a stock config describes ``model`` without ``names`` (checked on the meta device, remembered by
    structure)."""
    params = list(model.parameters())
    key = (type(model).__module__, type(model).__qualname__, json.dumps(dict(model.config), sort_keys=True, default=str),
           len(params), sum(p.numel() for p in params), bool(getattr(model, "peft_config", None)),
           ip_adapter_loaded(model), frozenset(names))
    if key not in _DESCRIBES:
        if len(_DESCRIBES) >= 50_000:
            _DESCRIBES.clear()
        try:
            _stock(_pruned_on_meta(model, names))
            _DESCRIBES[key] = True
        except UserError:
            _DESCRIBES[key] = False
    return _DESCRIBES[key]


def stock_groups(model: nn.Module, candidates_: Iterable[str], scores: Optional[Mapping[str, float]] = None
                 ) -> list[list[list[str]]]:
    """The removals of a U-Net that a stock config describes, as groups of exclusive options: per level, r
    (resnet, attention) pairs of the down block with r of its up block (keeping one down pair at least), each
    option checked by :func:`stock_model`'s own rules with nothing else removed; and the whole mid block. Only
    options whose layers are all in ``candidates_`` are offered.

    With transformer blocks inside attention layers among the candidates (``inner``, SDXL), also: per attention
    layer of n blocks, its j blocks of least ``scores`` for j = 1 .. n - 1 (a stock config counts the blocks of each
    attention layer; which ones go does not matter to it), the mid block's attention layer tied to the last down
    block's first one (a stock config gives both one depth: the same j from each)."""
    from itertools import combinations

    allowed = set(candidates_)
    n_down, n_up = len(model.down_blocks), len(model.up_blocks)

    def pair(bname: str, k: int) -> list[str]:
        block = model.get_submodule(bname)
        attentions = getattr(block, "attentions", None) or []
        a = attentions[k] if k < len(attentions) else None
        return [f"{bname}.resnets.{k}"] + ([f"{bname}.attentions.{k}"] if a is not None else [])

    def kept(bname: str) -> list[int]:
        return [k for k, r in enumerate(model.get_submodule(bname).resnets) if not _gone(r)]

    groups = []
    for i in range(n_down):
        down, up = f"down_blocks.{i}", f"up_blocks.{n_up - 1 - i}"
        options = []
        for r in range(1, len(kept(down))):
            for d in combinations(kept(down), r):
                for u in combinations(kept(up), r):
                    names = [n for k in d for n in pair(down, k)] + [n for k in u for n in pair(up, k)]
                    if set(names) <= allowed and _stock_describes(model, names):
                        options.append(names)
        if options:
            groups.append(options)
    mid = getattr(model, "mid_block", None)
    if mid is not None:
        names = [f"mid_block.resnets.{k}" for k, r in enumerate(mid.resnets) if not _gone(r)]
        names += [f"mid_block.attentions.{k}" for k, a in enumerate(getattr(mid, "attentions", None) or [])
                  if a is not None and not _gone(a)]
        if names and set(names) <= allowed and _stock_describes(model, names):
            groups.append([names])
    groups += _inner_groups(model, allowed, scores or {})
    return groups


def _inner_groups(model: nn.Module, allowed: set, scores: Mapping[str, float]) -> list[list[list[str]]]:
    """:func:`stock_groups`' options inside attention layers: the j blocks of least score of each (1 <= j < n)."""
    attn = {}  # attention layer -> its kept blocks' names, least score first
    for name in allowed:
        head, sep, k = name.rpartition(".transformer_blocks.")
        if sep and k.isdigit():
            attn.setdefault(head, []).append(name)
    if not attn:
        return []
    for head in attn:
        attn[head].sort(key=lambda n: (scores.get(n, 0.0), int(n.rpartition(".")[2])))
    ties = []
    mid, last = "mid_block.attentions.0", f"down_blocks.{len(model.down_blocks) - 1}.attentions.0"
    if mid in attn and last in attn and len(attn[mid]) == len(attn[last]):
        ties.append((mid, last))
    tied = {h for t in ties for h in t}
    groups = []
    for heads in [*ties, *((h,) for h in sorted(attn) if h not in tied)]:
        n = min(len(attn[h]) for h in heads)
        options = []
        for j in range(1, n):
            names = [b for h in heads for b in attn[h][:j]]
            if _stock_describes(model, names):
                options.append(names)
        if options:
            groups.append(options)
    return groups


def _attention_of(name: str) -> Optional[str]:
    """The attention layer a candidate is or lies in (``...attentions.k``), else None."""
    head, sep, _ = name.partition(".transformer_blocks.")
    head = head if sep else name
    return head if ".attentions." in head else None


def stock_candidate_names(model: nn.Module, inner: bool = False) -> list[str]:
    """The candidates a stock selection scores: :func:`candidate_names`, and with ``inner`` on a U-Net also the
    whole attention layers that hold several blocks, which the (resnet, attention) pair options and the mid block
    remove whole (:func:`stock_groups`)."""
    names = candidate_names(model, inner)
    if inner and is_unet(model):
        have = set(names)
        names = names + [n for n in candidate_names(model, False) if n not in have]
    return names


class SelectionUnreachable(UserError):
    """The ratio asks for more than the selection's options allow (a stock config's removals, a params cap)."""


class StockUnreachable(SelectionUnreachable):
    """The ratio asks for more than the removals a stock config describes hold."""


# transformers whose blocks a stock config cannot lose, and why
NO_STOCK_BLOCKS = {
    "HunyuanDiT2DModel": "long skips pair its blocks by position (block k feeds block n - 1 - k), so a stock config "
                         "with fewer blocks would pair other blocks",
    "ChromaTransformer2DModel": "distilled guidance layer gives each block its modulation by position (its output is "
                                "sized by the block counts), so a stock config with fewer blocks would not load its "
                                "weights",
}


def _check_stock_blocks(base: type) -> None:
    why = NO_STOCK_BLOCKS.get(base.__name__)
    if why is not None:
        raise UserError(f"{base.__name__}'s {why}: use the LayerPruned model instead (no --stock or :stock; "
                        "diffslim.load, and diffusers once diffslim is imported, load it)")


def check_stock_selection(model: nn.Module, criterion: str, inner: bool = False) -> None:
    """Refuse, before any scoring, a stock selection :func:`stock_select` cannot make on a U-Net, and one on a
    transformer whose blocks no stock config can lose (:data:`NO_STOCK_BLOCKS`)."""
    if not is_unet(model):
        _check_stock_blocks(next((b for b, p in _PRUNED_CLASS.items() if type(model) in (b, p)), type(model)))
    if is_unet(model) and criterion in ("greedy", "output-loss-pairs"):
        raise UserError(f"a stock selection on a U-Net removes whole (resnet, attention) pairs, the mid block and "
                        f"(--inner) transformer blocks inside attention layers, chosen by each layer's own score: use "
                        f"output-loss, similarity, taylor, magnitude or random (not {criterion})")


def check_controlnet_fits(pipe, stock: Optional[nn.Module] = None) -> None:
    """Refuse a stock export that the pipeline's ControlNet cannot feed. A U-Net's ControlNet adds one residual per
    skip connection of the original U-Net, and diffusers pairs them with the stock U-Net's fewer ones by position (the
    first misplaced residual fails on a shape, or is added to the wrong feature). A transformer's (SD3's, Flux's,
    Qwen-Image's) adds its residuals to the blocks by position, spread over the original's count (every k-th block
    takes the next), or at the layer indices it names (Z-Image's): over fewer blocks they land on other blocks,
    silently. ``stock`` None (before any selection): refuse what every
    stock selection breaks, a transformer's ControlNet. The layer-pruned model keeps every place and takes the original
    ControlNet as it is."""
    controlnet = getattr(pipe, "controlnet", None) if pipe is not None else None
    if controlnet is None:
        return
    keep = "keep the layer-pruned pipeline for ControlNet (it takes the original ControlNet as it is)"
    den = getattr(pipe, "transformer", None)
    if den is not None:  # (Z-Image's ControlNet names the layers it feeds by index: the same misplacement)
        for attr in ("transformer_blocks", "single_transformer_blocks", "layers", "blocks"):
            n = len(getattr(den, attr, None) or [])
            left = n if stock is None else len(getattr(stock, attr, None) or [])
            if n and (stock is None or left != n):
                raise UserError(f"the pipeline's ControlNet adds its residuals to the transformer's {attr} by "
                                f"position, placed among the original's {n}; a stock export has "
                                f"{'fewer' if stock is None else left}, so diffusers would add them to other blocks: "
                                f"{keep}")
        return
    if stock is None or not hasattr(stock, "down_blocks"):
        return
    skips = 1 + sum(len(b.resnets) + (1 if getattr(b, "downsamplers", None) else 0) for b in stock.down_blocks)
    for net in getattr(controlnet, "nets", [controlnet]):
        residuals = len(getattr(net, "controlnet_down_blocks", []))
        if residuals and residuals != skips:
            raise UserError(f"the pipeline's ControlNet adds {residuals} residuals, one per skip connection of the "
                            f"original U-Net; the stock U-Net has {skips}, so diffusers would add them to the wrong "
                            f"features: {keep}")


def stock_select(model: nn.Module, layers: Sequence[Layer], scores: Mapping[str, float], ratio: float, total: int,
                 by: str = "params", max_checks: int = 200) -> list[str]:
    """Like :func:`select`, among the removals a stock config describes (:func:`stock_groups`): the options of
    least summed score whose removed ``by`` reaches ``ratio * total``, at most one per group, the union checked
    again as a whole (a stock config may tie the levels together). For U-Nets; the result exports with
    :func:`stock_model` and loads with diffusers alone."""
    if by not in ("params", "macs"):
        raise UserError(f"--by {by!r}: accepted params, macs")
    target = target_of(total, ratio)
    by_name = {l.name: l for l in layers}
    groups = stock_groups(model, by_name, scores)
    # every combination (one option or none per group), pruned to the cost/score Pareto front when it grows large;
    # with --inner an attention layer can be in a pair option (whole) and in an inner option (some of its blocks):
    # combinations that touch one attention layer twice are not made
    combos = [(0, 0.0, (), frozenset())]
    for options in groups:
        scored = [(sum(_cost(by_name[n], by) for n in o), sum(scores[n] for n in o), tuple(o),
                   frozenset(_attention_of(n) for n in o) - {None}) for o in options]
        combos = combos + [(c + oc, v + ov, names + on, t | ot) for c, v, names, t in combos
                           for oc, ov, on, ot in scored if not t & ot]
        if len(combos) > 20_000:
            combos.sort(key=lambda x: (-x[0], x[1]))
            front, best = [], math.inf
            for c in combos:
                if c[1] < best:
                    front.append(c)
                    best = c[1]
            combos = front
    feasible = sorted((c for c in combos if c[0] >= target), key=lambda x: (x[1], -x[0]))
    if not feasible:
        most = max(c[0] for c in combos)
        raise StockUnreachable(f"ratio {ratio} asks to remove {target:,} {by}, but the removals a stock "
                        f"{_stock_base(model).__name__} config describes (resnet and attention pairs, in line in the "
                        f"down and up blocks, and the whole mid block) reach {most / total:.3f} of the model at most: "
                        f"choose a ratio below that, or drop --stock")
    for _, _, names, _ in feasible[:max_checks]:
        if _stock_describes(model, names):
            return list(names)
    raise UserError(f"no removal of ratio {ratio} that a stock {_stock_base(model).__name__} config describes was "
                    f"found among the {min(len(feasible), max_checks)} best: choose another ratio, or drop --stock")


def quadratic_select(layers: Sequence[Layer], single: Mapping[str, float],
                     interactions: Mapping[tuple[str, str], float], ratio: float, total: int, by: str = "params",
                     exact_up_to: int = 16, max_params: Optional[tuple[float, int]] = None) -> list[str]:
    """The layers to remove by the second-order output loss: least :func:`predicted_loss` with removed ``by`` >=
    ratio * total (and, with ``max_params=(share, params)`` and ``by="macs"``, removed params <= share * params).
    Exact (every subset) for up to ``exact_up_to`` layers; beyond, a local search from the first-order knapsack's
    set and from a greedy build, by the best improving move (remove one, add one, or swap one removed layer for a
    kept one) while the constraints hold, until none improves."""
    if by not in ("params", "macs"):
        raise UserError(f"--by {by!r}: accepted params, macs")
    first = select(layers, single, ratio, total, by, max_params)  # checks the ratio, the cap and their reach
    target = target_of(total, ratio)
    n = len(layers)
    cost = np.array([_cost(l, by) for l in layers], dtype=np.int64)
    pcost = np.array([l.params for l in layers], dtype=np.int64)
    cap = math.floor(max_params[0] * max_params[1]) if max_params is not None else int(pcost.sum())
    idx = {l.name: k for k, l in enumerate(layers)}
    lin = np.array([single[l.name] for l in layers], dtype=np.float64)
    M = np.zeros((n, n))
    for (a, b), v in interactions.items():
        M[idx[a], idx[b]] = M[idx[b], idx[a]] = v

    def value(x: np.ndarray) -> float:
        return float(lin @ x + 0.5 * x @ M @ x)

    if n <= exact_up_to:
        X = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(np.float64)
        feasible = (X @ cost >= target) & (X @ pcost <= cap)
        vals = X @ lin + 0.5 * np.einsum("si,ij,sj->s", X, M, X)
        vals[~feasible] = np.inf
        best = X[int(np.argmin(vals))]
        return [layers[i].name for i in range(n) if best[i]]

    def improve(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        while True:
            g = M @ x  # interaction of each layer with the removed set
            removed_cost, removed_params = int(cost @ x), int(pcost @ x)
            add = np.where((x == 0) & (removed_params + pcost <= cap), lin + g, np.inf)  # the value's change on adding j
            drop = np.where((x == 1) & (removed_cost - cost >= target), -(lin + g), np.inf)
            swap = (lin + g)[None, :] - (lin + g)[:, None] - M  # swap[i, j]: remove i from the set, add j
            ok = ((x[:, None] == 1) & (x[None, :] == 0) & (removed_cost - cost[:, None] + cost[None, :] >= target)
                  & (removed_params - pcost[:, None] + pcost[None, :] <= cap))
            swap = np.where(ok, swap, np.inf)
            moves = [(add.min(), "add"), (drop.min(), "drop"), (swap.min(), "swap")]
            delta, kind = min(moves, key=lambda m: m[0])
            if not delta < -1e-15:
                return x
            if kind == "add":
                x[int(np.argmin(add))] = 1
            elif kind == "drop":
                x[int(np.argmin(drop))] = 0
            else:
                i, j = np.unravel_index(int(np.argmin(swap)), swap.shape)
                x[i], x[j] = 0, 1

    starts = []
    pos = {l.name: k for k, l in enumerate(layers)}
    x = np.zeros(n)
    x[[pos[name] for name in first]] = 1
    starts.append(x)
    x = np.zeros(n)  # greedy build: the least increase of the value per unit cost until the target is met
    while cost @ x < target:
        inc = np.where((x == 0) & (pcost @ x + pcost <= cap), (lin + M @ x) / np.maximum(cost, 1), np.inf)
        if not np.isfinite(inc).any():  # the cap stops it: only the knapsack's start
            break
        x[int(np.argmin(inc))] = 1
    if cost @ x >= target:
        starts.append(x)
    best = min((improve(s) for s in starts), key=value)
    return [layers[i].name for i in range(n) if best[i]]


def pairs_select(model: nn.Module, layers: Sequence[Layer], calib: Calibration, single: Mapping[str, float],
                 interactions: Mapping[tuple[str, str], float], ratio: float, total: int, by: str = "params",
                 reference: Optional[torch.Tensor] = None, max_params: Optional[tuple[float, int]] = None
                 ) -> tuple[list[str], dict]:
    """The ``output-loss-pairs`` selection: the second-order set (:func:`quadratic_select`), checked against the
    first-order knapsack set by their measured output loss on ``calib`` (two more runs when they differ; the lower
    one is kept). A second-order expansion over-counts when many layers go at once (every pair's interaction is
    added), so the check keeps it from doing worse than the first-order criterion on the calibration triples.
    ``max_params``: as for :func:`select`, for both sets. Returns ``(removed, info)``: info has each set with its
    measured loss and which was kept."""
    second = quadratic_select(layers, single, interactions, ratio, total, by, max_params=max_params)
    first = select(layers, single, ratio, total, by, max_params)
    info = {"second_order": {"removed": second, "predicted": predicted_loss(second, single, interactions)},
            "first_order": {"removed": first, "summed": float(sum(single[n] for n in first))}}
    if set(first) == set(second):
        info["kept"] = "both"
        return second, info
    ref = calib.run(model) if reference is None else reference
    for key, names in (("second_order", second), ("first_order", first)):
        info[key]["measured"] = output_loss(model, calib, names, ref)
    keep_second = info["second_order"]["measured"] <= info["first_order"]["measured"]
    info["kept"] = "second_order" if keep_second else "first_order"
    return (second if keep_second else first), info


def greedy_order(model: nn.Module, layers: Sequence[Layer], calib: Calibration, until: int, by: str = "params",
                 reference: Optional[torch.Tensor] = None, progress: bool = False) -> list[tuple[str, float]]:
    """Iterative greedy re-scoring: remove, one at a time, the layer whose removal (given those already
    removed) adds the least output loss per unit of cost, until the removed cost reaches ``until``.
    Returns ``[(name, L(removed so far)), ...]`` in removal order; the greedy set for any smaller
    target is a prefix of it (see :func:`greedy_select`)."""
    if sum(_cost(l, by) for l in layers) < until:
        raise UserError(f"the removable layers hold less than the {until:,} {by} asked for")
    ref = calib.run(model) if reference is None else reference
    order, chosen, removed, current = [], [], 0, 0.0
    left = list(layers)
    bar = _Bar(progress, None, "greedy re-scoring (calibration runs)")
    while removed < until:
        best, best_key, best_loss = None, None, None
        # under `accelerate launch` each process tries its share of the layers left; all see every loss
        losses = shared_map(lambda l: output_loss(model, calib, chosen + [l.name], ref), left, bar.update)
        for l, loss in zip(left, losses):
            key = (loss - current) / max(1, _cost(l, by))
            if best_key is None or key < best_key:
                best, best_key, best_loss = l, key, loss
        chosen.append(best.name)
        order.append((best.name, best_loss))
        removed += _cost(best, by)
        current = best_loss
        left.remove(best)
    bar.close()
    return order


def greedy_select(order: Sequence[tuple[str, float]], layers: Sequence[Layer], ratio: float, total: int,
                  by: str = "params") -> list[str]:
    """The shortest prefix of a :func:`greedy_order` whose removed ``by`` reaches ``ratio * total``."""
    target = target_of(total, ratio)
    cost = {l.name: _cost(l, by) for l in layers}
    out, removed = [], 0
    for name, _ in order:
        if removed >= target:
            break
        out.append(name)
        removed += cost[name]
    if removed < target:
        raise UserError(f"the greedy order stops before ratio {ratio}; compute it up to that ratio")
    return out


# ------------------------------------------------------------------------------------------
# Additivity


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equal-length sequences (nan when one is constant)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def additivity(model: nn.Module, layers: Sequence[Layer], calib: Calibration, single: Mapping[str, float],
               n_sets: int = 24, seed: int = 0, max_size: Optional[int] = None,
               reference: Optional[torch.Tensor] = None) -> dict:
    """For ``n_sets`` random sets S of layers (sizes uniform in 2..max_size, default half the layers),
    the measured L(S) against sum_{i in S} L_i (``single``); returns ``{"sets", "measured", "summed",
    "pearson"}``."""
    g = torch.Generator().manual_seed(seed)
    ref = calib.run(model) if reference is None else reference
    names = [l.name for l in layers]
    hi = max(2, min(len(names), max_size or len(names) // 2))
    sets, measured, summed = [], [], []
    for _ in range(n_sets):
        k = int(torch.randint(2, hi + 1, (1,), generator=g)) if hi > 2 else 2
        idx = torch.randperm(len(names), generator=g)[:k].tolist()
        s = [names[i] for i in sorted(idx)]
        sets.append(s)
        measured.append(output_loss(model, calib, s, ref))
        summed.append(float(sum(single[n] for n in s)))
    return {"sets": sets, "measured": measured, "summed": summed, "pearson": pearson(summed, measured)}


# ------------------------------------------------------------------------------------------
# One call: score, select, prune


@dataclass
class LayerPruneResult:
    """What :func:`layer_prune` decided: the removed layers, every candidate's score and cost, and the
    shares removed (of the whole denoiser's params and, when counted, MACs)."""

    criterion: str
    ratio: Optional[float]
    by: str
    removed: list
    layers: list
    scores: dict
    params: int
    params_removed: int
    macs: Optional[int] = None
    macs_removed: Optional[int] = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    max_params: Optional[float] = None  # the cap on the share of params removed (a selection by MACs), if any

    def to_json(self) -> dict:
        return {
            "criterion": self.criterion, "ratio": self.ratio, "by": self.by,
            **({"max_params": self.max_params} if self.max_params is not None else {}), "removed": list(self.removed),
            "params": self.params, "params_removed": self.params_removed,
            "params_removed_share": self.params_removed / self.params if self.params else None,
            "macs": self.macs, "macs_removed": self.macs_removed,
            "macs_removed_share": (self.macs_removed / self.macs) if self.macs else None,
            "seconds": self.seconds,
            "layers": [{"name": l.name, "kind": l.kind, "params": l.params, "macs": l.macs,
                        "score": self.scores.get(l.name), "removed": l.name in self.removed} for l in self.layers],
            **self.extra,
        }


def layer_prune(model: nn.Module, criterion: str = "output-loss", ratio: Optional[float] = None, by: str = "params",
                calib: Optional[Calibration] = None, seed: int = 0, inner: bool = False,
                count_macs: Optional[bool] = None, pair_pool: Optional[int] = None,
                progress: bool = False, keep: Sequence[str] = (), stock: bool = False,
                macs_inputs: Optional[tuple[tuple, dict]] = None, max_params: Optional[float] = None
                ) -> LayerPruneResult:
    """Choose the layers of ``model`` to remove by ``criterion`` at ``ratio`` (of ``by``), or by a BK-SDM
    variant (``criterion="bk-sdm-base|small|tiny"``, no ratio, no weights needed).

    MACs are counted (one profiled forward of the anatomy) when ``by="macs"`` or ``count_macs``, on
    ``macs_inputs`` (``(args, kwargs)`` of a denoiser call, e.g. :func:`diffslim.sample.first_denoiser_call`'s: the
    size and context length the pipeline really uses) or else on dummy inputs at the config's ``sample_size``; on a
    meta-device model only BK-SDM criteria apply unless the MACs come from the meta forward too.
    ``output-loss-pairs`` also measures the pairs' interactions (``pair_pool``: only among that many layers of
    least L_i per unit cost); they go to ``extra["interactions"]``. ``progress``: bars over the calibration runs.
    ``keep``: layers that are not candidates (e.g. :func:`stock_keeps`, for a selection a stock config describes).
    ``stock``: on a U-Net, select only among removals a stock config describes (:func:`stock_select`, with
    ``inner`` also transformer blocks inside attention layers), so that :func:`stock_model` exports the result (for
    transformers, ``keep=stock_keeps(model)`` does it).
    ``max_params``: with ``by="macs"`` and a one-shot criterion or ``output-loss-pairs`` (not stock), remove at most
    this share of the params as well (:func:`select`).
    Returns a :class:`LayerPruneResult`; :func:`prune_layers` then builds the smaller model.
    """
    from diffslim.models.anatomy import anatomy

    check_prunable(model)  # a denoiser whose pruned model could not be exported is refused before any scoring
    t0 = time.perf_counter()
    bk = criterion.startswith("bk-sdm-")
    if not bk and criterion not in CRITERIA:
        raise UserError(f"unknown criterion {criterion!r}; accepted: {', '.join(CRITERIA)}, "
                        + ", ".join(f"bk-sdm-{v}" for v in BK_SDM))
    if by not in ("params", "macs"):
        raise UserError(f"--by {by!r}: accepted params, macs")
    if not bk:
        if ratio is None:
            raise UserError(f"criterion {criterion!r} needs a ratio in (0, 1)")
        check_ratio(ratio)
    if pair_pool is not None and criterion != "output-loss-pairs":
        raise UserError(f"a pair pool applies to criterion output-loss-pairs only, not {criterion!r}")
    if stock:
        check_stock_selection(model, criterion, inner)
    if max_params is not None:
        check_max_params(max_params)
        if by != "macs" or bk or stock or criterion == "greedy":
            raise UserError("a cap on the params removed (--max-params) applies to a selection by MACs (--by macs) "
                            f"with a one-shot criterion or output-loss-pairs and without --stock, not to {criterion} "
                            f"by {by}"
                            f"{' with --stock' if stock else ''}")
    extra: dict = {}
    meta = any(p.device.type == "meta" for p in model.parameters())
    if meta and criterion not in ("random",) and not bk:
        raise UserError(f"criterion {criterion!r} needs weights; this model is config-only: use a bk-sdm-* "
                        "criterion or random")
    want_macs = by == "macs" if count_macs is None else count_macs
    an = anatomy(model, count_macs=want_macs, **({"inputs": macs_inputs} if want_macs and macs_inputs else {}))
    module_macs = an.module_macs
    if bk:
        names = bk_sdm_layers(model, criterion[len("bk-sdm-"):])
        layers = candidates(model, module_macs=module_macs, names=names)
        scores, removed = {}, names
    else:
        pool = stock_candidate_names(model, inner) if stock and is_unet(model) else candidate_names(model, inner)
        names = [n for n in pool if n not in set(keep)]
        layers = candidates(model, inner=inner, module_macs=module_macs, names=names)
        total = an.params if by == "params" else an.macs
        if total is None:
            raise UserError("selection by MACs needs the MACs of the model: it cannot be counted here")
        # an unreachable ratio or cap is refused before any scoring
        select(layers, dict.fromkeys((l.name for l in layers), 0.0), ratio, total, by,
               None if max_params is None else (max_params, an.params))
        if criterion == "greedy":
            if calib is None:
                raise UserError("criterion 'greedy' needs calibration data (a model with weights and a pipeline)")
            order = greedy_order(model, layers, calib, target_of(total, ratio), by, progress=progress)
            removed = greedy_select(order, layers, ratio, total, by)
            scores = {name: loss for name, loss in order}
        elif criterion == "output-loss-pairs":
            if calib is None:
                raise UserError("criterion 'output-loss-pairs' needs calibration data (a model with weights and a "
                                "pipeline)")
            ref = calib.run(model)
            scores = score_layers(model, layers, criterion, calib, reference=ref, progress=progress)
            inter = pair_interactions(model, layers, calib, scores, pool=pair_pool, by=by, reference=ref,
                                      progress=progress)
            removed, check = pairs_select(model, layers, calib, scores, inter, ratio, total, by, reference=ref,
                                          max_params=None if max_params is None else (max_params, an.params))
            extra = {"interactions": [{"layers": [a, b], "interaction": v} for (a, b), v in inter.items()],
                     "predicted_loss": predicted_loss(removed, scores, inter),
                     "summed_loss": float(sum(scores[n] for n in removed)), "check": check}
        else:
            scores = score_layers(model, layers, criterion, calib, seed=seed, progress=progress)
            removed = (stock_select(model, layers, scores, ratio, total, by) if stock and is_unet(model)
                       else select(layers, scores, ratio, total, by,
                                   max_params=None if max_params is None else (max_params, an.params)))
    by_name = {l.name: l for l in layers}
    params_removed = sum(by_name[n].params for n in removed)
    macs_removed = sum(by_name[n].macs for n in removed) if module_macs is not None else None
    return LayerPruneResult(criterion=criterion, ratio=ratio, by=by, removed=list(removed), layers=list(layers),
                            scores=scores, params=an.params, params_removed=params_removed,
                            macs=an.macs, macs_removed=macs_removed, seconds=time.perf_counter() - t0,
                            extra=extra, max_params=max_params)


# ------------------------------------------------------------------------------------------
# Distillation of a pruned student (the shared trainer)


def matched_features(teacher: nn.Module, student: nn.Module) -> dict[str, str]:
    """Block outputs to distil, ``{student_name: teacher_name}``: the trainer's automatic choice, the
    blocks of the student that still hold a kept layer and keep their samplers (a block whose every
    layer, or whose sampler, is removed computes a different feature than the teacher's)."""
    from diffslim.train.distill import select_features

    return select_features(teacher, student, "auto")


def distill_pruned(pipe, student: nn.Module, cfg, data: str = "zoo", size: Optional[int] = None):
    """Distil ``pipe``'s denoiser into the pruned ``student`` with the shared trainer (task + output +
    feature loss at the blocks of :func:`matched_features`, normalized or plain as ``cfg`` says) on
    ``data``. Returns the trainer's ``DistillResult``."""
    from diffslim.train.data import make_dataset
    from diffslim.train.distill import distill

    return distill(pipe, student, make_dataset(data, pipe, size), cfg)
