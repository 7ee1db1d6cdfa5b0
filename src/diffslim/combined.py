"""Depth-skip pruning and layer pruning on one U-Net: the exported class that records both.

A depth-skipped U-Net whose layers are then pruned (or a layer-pruned U-Net that is then depth-skipped) is a
``DepthSkipLayerPruned<Base>``: its config holds the base config plus ``depth_skip`` and ``removed_layers``,
its safetensors only the weights that both kept, and it reloads with ``from_pretrained``. The two removals
commute (each replaces other modules by parameter-free stand-ins or kept shortcuts), so the class builds
them in one order whichever came first: the depth first, then the removed layers that the depth kept.
A removed layer inside the depth's removed part is dropped from ``removed_layers``: the depth already
removed it.

This module sits on the floor above the methods (with ``apply``): the methods do not know each other, and
find the stacked class through ``diffslim.models.derived.extension_of``, where this module registers it.
"""

from __future__ import annotations

from typing import Sequence

from diffusers import ModelMixin  # noqa: F401  (diffusers finds the classes' base through this module)
from torch import nn

from diffslim.methods import depth_skip as _depth
from diffslim.methods import layer_prune as _layers
from diffslim.models.derived import config_extended_class, register_extension


def _inside_depth_removal(model: nn.Module, name: str) -> bool:
    """Whether module ``name``, or a module that contains it, is a depth-skip stand-in."""
    parts = name.split(".")
    module = model
    for part in parts:
        module = module[int(part)] if part.isdigit() and isinstance(module, nn.ModuleList) else getattr(module, part, None)
        if module is None or _depth.is_removed(module):
            return True
    return False


def _install_removed_layers(model: nn.Module, names: Sequence[str]) -> None:
    kept = [n for n in names if not _inside_depth_removal(model, n)]
    model.register_to_config(removed_layers=kept or None)
    _layers.install_removed_layers(model, kept)


def _stacked_class(depth_cls: type, layers_cls: type, name: str) -> type:
    cls = config_extended_class(
        depth_cls, name, "removed_layers", _install_removed_layers, __name__,
        f"A ``{depth_cls.__mro__[1].__name__}`` pruned to depth ``depth_skip`` and without the layers "
        "``removed_layers`` (see ``diffslim.combined``).")
    # a layer-pruned U-Net that is then depth-skipped is one of these too
    register_extension(layers_cls, "depth_skip", cls)
    register_extension(cls, "depth_skip", cls)
    return cls


DepthSkipLayerPrunedUNet2DConditionModel = _stacked_class(
    _depth.DepthSkipUNet2DConditionModel, _layers.LayerPrunedUNet2DConditionModel,
    "DepthSkipLayerPrunedUNet2DConditionModel")
DepthSkipLayerPrunedUNet2DModel = _stacked_class(
    _depth.DepthSkipUNet2DModel, _layers.LayerPrunedUNet2DModel, "DepthSkipLayerPrunedUNet2DModel")
