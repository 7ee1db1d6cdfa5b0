"""Diffusers model classes with one extra config key that rebuilds a structural change on load.

A pruned model exports as an ordinary diffusers folder: its ``config.json`` holds the base model's
config plus one key (``depth_skip``, ``removed_layers``) and its safetensors only the kept weights.
``from_pretrained`` builds the full structure from the base config, then the subclass's ``__init__``
applies the change recorded in the extra key before the weights are loaded.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional


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
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": module})
