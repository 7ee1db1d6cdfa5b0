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

# (model class, config key) -> the class whose config adds that key to that model class's
_EXTENSIONS: dict[tuple[type, str], type] = {}


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
    cls = type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": module})
    register_extension(base, key, cls)
    register_extension(cls, key, cls)
    return cls


def register_extension(model_class: type, key: str, extended: type) -> None:
    """Record that a model of class ``model_class`` changed by ``key`` becomes an ``extended``."""
    _EXTENSIONS[(model_class, key)] = extended


def extension_of(model_class: type, key: str) -> Optional[type]:
    """The class that records config ``key`` for a model of exactly ``model_class`` (None: none is registered)."""
    return _EXTENSIONS.get((model_class, key))
