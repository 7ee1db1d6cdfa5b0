"""Diffusers model classes with one extra config key that rebuilds a structural change on load.

A pruned model exports as an ordinary diffusers folder: its ``config.json`` holds the base model's
config plus one key (``depth_skip``, ``removed_layers``) and its safetensors only the kept weights.
``from_pretrained`` builds the full structure from the base config, then the subclass's ``__init__``
applies the change recorded in the extra key before the weights are loaded.

Changes of two methods stack when a class extends another extended class (a depth-skipped U-Net whose
layers are then pruned). Methods do not know each other's classes: they ask :func:`extension_of` which
class records their key for a given model class, and the floor above them that stacks two methods
registers the stacked classes here (:func:`register_extension`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from diffslim.models.adapters import (carry_attention, diffusers_base, ip_adapter_loaded,  # noqa: F401 (re-exported)
                                      ip_adapter_methods)

# (model class, config key) -> the class whose config adds that key to that model class's
_EXTENSIONS: dict[tuple[type, str], type] = {}
# class name -> every class made here: the loader finds an exported folder's class by the name in its config without
# knowing which method made it (they register themselves on import, and ``import diffslim`` imports them all)
_CLASSES: dict[str, type] = {}


def config_extended_class(base: type, name: str, key: str, install: Callable[[Any, Any], None],
                          module: str, doc: str) -> type:
    """A subclass ``name`` of ``base`` whose config adds ``key`` (default None).

    ``install(model, value)`` runs after ``base.__init__`` when the value is given (it changes the
    model in place). diffusers reads config keys from the ``__init__`` signature, so the subclass
    advertises the base signature plus ``key``. ``module`` is where the class is found on reload
    (diffusers writes it to a pipeline's ``model_index.json``).
    """

    def __init__(self, *args, **kwargs):
        value: Optional[Any] = kwargs.pop(key, None)
        if isinstance(value, (list, tuple)):
            value = list(value) or None  # an empty list changes nothing: stored as None
        base.__init__(self, *args, **kwargs)
        self.register_to_config(**{key: value})
        if value is not None:
            install(self, value)

    sig = inspect.signature(base.__init__)
    extra = inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None)
    __init__.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
    # an IP-Adapter of the original model loads as it is: its numbering is mapped to the kept attention layers
    cls = type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": module,
                               **ip_adapter_methods(base)})
    register_extension(base, key, cls)
    register_extension(cls, key, cls)
    _CLASSES[name] = cls
    return cls


def exported_class(name: str) -> Optional[type]:
    """The config-extended class called ``name`` (a pruned model's ``_class_name``); None for any other name."""
    return _CLASSES.get(name)


def register_extension(model_class: type, key: str, extended: type) -> None:
    """Record that a model of class ``model_class`` changed by ``key`` becomes an ``extended``."""
    _EXTENSIONS[(model_class, key)] = extended


def extension_of(model_class: type, key: str) -> Optional[type]:
    """The class that records config ``key`` for a model of exactly ``model_class`` (None: none is registered)."""
    return _EXTENSIONS.get((model_class, key))


# ------------------------------------------------------------------------------------------
# A derived model takes its parent's weights, shared, and the LoRAs loaded on them


def _adapter_layers(model) -> dict:
    """The PEFT (LoRA) layers loaded into ``model`` by name; empty without adapters (PEFT is then not imported)."""
    if not getattr(model, "peft_config", None):
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def base_state_dict(model) -> dict:
    """``model.state_dict()`` as the model has it without its loaded LoRAs: a wrapped module's base weights under
    the module's own name (``to_q.base_layer.weight`` -> ``to_q.weight``), the adapters' own tensors left out."""
    state = model.state_dict()
    wrappers = _adapter_layers(model)
    if not wrappers:
        return state
    out = {}
    for k, v in state.items():
        owner = next((w for w in wrappers if k.startswith(w + ".")), None)
        if owner is None:
            out[k] = v
        elif k.startswith(owner + ".base_layer."):
            out[owner + "." + k[len(owner + ".base_layer."):]] = v
    return out


def share_plain_tensors(source, target, source_name: Optional[Callable[[str], str]] = None) -> None:
    """Tensors a module keeps as plain attributes (neither parameters nor buffers: Lumina2's rotary tables, computed
    at construction) are meta tensors in a model built on the meta device: ``target`` takes ``source``'s, by the
    module's name (``source_name``: the source's name of a target module, if they differ; a list or tuple of
    tensors as a whole)."""
    modules = dict(source.named_modules())
    for target_name, module in target.named_modules():
        name = source_name(target_name) if source_name is not None and target_name else target_name
        for attr, value in list(vars(module).items()):
            if attr.startswith("_"):
                continue
            tensors = [value] if torch.is_tensor(value) else (
                list(value) if isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value)
                else [])
            if tensors and any(t.is_meta for t in tensors) and name in modules:
                other = getattr(modules[name], attr, None)
                if other is not None:
                    setattr(module, attr, other)


def share_weights(source, target) -> None:
    """Give ``target`` (built from a config on the meta device, a pruned copy of ``source``) ``source``'s
    tensor for each of its weights, by name: shared, not copied (``strict``: every weight of ``target``
    must come from ``source``). The LoRA layers loaded into ``source`` (diffusers' ``load_lora_weights``)
    that wrap a module ``target`` keeps come along as the same objects, with the model's ``peft_config``: the
    adapters' names, which are active, their weights and scales (``set_adapters``) stay as they were, and
    diffusers' adapter calls (``set_adapters``, ``disable_lora``, ``unload_lora``) work on ``target``. The
    removed modules' LoRA goes with them. So do the attention processors of the kept attention layers, with a
    loaded IP-Adapter (:func:`diffslim.models.adapters.carry_attention`)."""
    state = base_state_dict(source)
    target.load_state_dict({k: state[k] for k in target.state_dict()}, assign=True, strict=True)
    share_plain_tensors(source, target)
    wrappers = _adapter_layers(source)
    kept = {n for n, _ in target.named_modules()}
    for name, layer in wrappers.items():
        if name in kept:
            target.set_submodule(name, layer)
    if wrappers:
        target.peft_config = dict(source.peft_config)
        target._hf_peft_config_loaded = True
    carry_attention(source, target)
