"""``diffslim.compile(pipe)``: ``torch.compile`` a pipeline's denoiser so that what a recipe installed still compiles well.

A denoiser that a recipe made smaller (layer pruning, one depth) is an ordinary module: it is compiled whole,
as ``pipe.unet.compile()`` would, in one graph without breaks. A recipe that decides *per denoising step*
what runs (a skip plan from DiP-GO or DeepCache, a multi-depth schedule) cannot be compiled whole: Dynamo
would guard on the step index, recompile at every step until its recompile limit (8), and then run the
remaining steps eagerly. Here those decisions stay in Python and only what they call is compiled: each
module of a skip plan's units on its own (regional compilation, as diffusers' ``compile_repeated_blocks``
does for transformer blocks), each depth of a multi-depth schedule as one model.

Compile last: after :func:`diffslim.apply`, not before (``apply`` refuses a compiled denoiser, whose
compiled code would not see the hooks it installs). :func:`uncompile` goes back to eager.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from diffslim.apply import denoiser_attr
from diffslim.errors import UserError

__all__ = ["CompileInfo", "COMPILE_MODES", "check_compile_options", "compile_pipeline", "compile_denoiser", "compiled_info",
           "uncompile"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# modes that capture CUDA graphs: their outputs live in memory the next replay overwrites, so a cache
# that keeps a unit's output from one step for the next would read another step's values
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class CompileInfo:
    """How a denoiser was compiled: ``how`` is ``"whole"``, ``"skip-plan units"`` or ``"multi-depth"``;
    ``regions``: the number of separately compiled callables; ``options``: the ``torch.compile`` arguments."""

    how: str
    regions: int
    options: dict = field(default_factory=dict)


def compiled_info(model: nn.Module) -> Optional[CompileInfo]:
    """The :class:`CompileInfo` of a denoiser compiled by :func:`compile_denoiser`; None when it is not."""
    return getattr(model, "_diffslim_compiled", None)


def _runtime_kind(model: nn.Module) -> str:
    if getattr(model, "_diffslim_skip_plan", None) is not None:
        return "skip-plan units"
    from diffslim.methods.depth_skip import _ROUTER_HOOK

    reg = getattr(model, "_diffusers_hook", None)
    if reg is not None and reg.get_hook(_ROUTER_HOOK) is not None:
        return "multi-depth"
    return "whole"


def _region(fn: Callable, name: str, kwargs: dict) -> Callable:
    """``torch.compile`` of a call of ``fn`` under a code object of its own.

    Dynamo keeps its compiled code, and counts recompilations against its limit (8), per code object.
    Every resnet of a U-Net runs ``ResnetBlock2D.forward``: compiled as they are, the U-Net's resnets of
    other widths and sizes would share one cache and pass the limit (the rest then runs eagerly, or fails
    with ``fullgraph``). A trampoline with its own code object gives each region its own cache.
    """
    def call(*args, **kw):
        return fn(*args, **kw)

    call.__code__ = call.__code__.replace(co_name="diffslim_region_" + re.sub(r"\W", "_", name))
    call.__qualname__ = call.__name__ = call.__code__.co_name
    return torch.compile(call, **kwargs)


def check_compile_options(backend: str = "inductor", mode: Optional[str] = None) -> None:
    """Raise :class:`UserError` naming what is accepted for an unknown ``torch.compile`` backend or mode."""
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise UserError(f"unknown torch.compile backend {backend!r}; accepted: {', '.join(torch._dynamo.list_backends())}"
                        " (and for checks: eager, aot_eager)")
    if mode is not None and mode not in COMPILE_MODES:
        raise UserError(f"unknown torch.compile mode {mode!r}; accepted: {', '.join(COMPILE_MODES)}")


def compile_denoiser(model: nn.Module, backend: str = "inductor", mode: Optional[str] = None,
                     fullgraph: bool = False, dynamic: Optional[bool] = None,
                     options: Optional[dict] = None) -> CompileInfo:
    """Compile ``model`` (a denoiser, with or without a recipe installed) in place; returns how.

    The arguments are ``torch.compile``'s. ``fullgraph=True`` applies to each compiled region (with a
    skip plan: each unit module). Compiling again first goes back to eager, so the last call's
    arguments hold. Raises :class:`UserError` for an unknown ``mode`` and for the CUDA-graph modes with a
    skip plan or a multi-depth schedule (``max-autotune-no-cudagraphs`` is their counterpart without CUDA graphs).
    """
    check_compile_options(backend, mode)
    kind = _runtime_kind(model)
    if kind != "whole" and mode in _CUDAGRAPH_MODES:
        raise UserError(f"mode {mode!r} captures CUDA graphs, whose outputs the next replay overwrites, and the "
                        f"installed {'skip plan' if kind == 'skip-plan units' else 'multi-depth schedule'} keeps "
                        "outputs across steps; use mode='max-autotune-no-cudagraphs' or the default mode")
    uncompile(model)
    kwargs = {"backend": backend, "mode": mode, "fullgraph": fullgraph, "dynamic": dynamic, "options": options}
    kwargs = {k: v for k, v in kwargs.items() if v is not None and not (k == "fullgraph" and not v)}
    if kind == "skip-plan units":
        from diffslim.methods.skip_plan import compile_skip_plan

        regions = compile_skip_plan(model, functools.partial(_region, kwargs=kwargs))
    elif kind == "multi-depth":
        from diffslim.methods.depth_skip import compile_multi_depth

        regions = compile_multi_depth(model, functools.partial(_region, kwargs=kwargs))
    else:
        model.compile(**kwargs)
        regions = 1
    info = CompileInfo(kind, regions, kwargs)
    model._diffslim_compiled = info
    return info


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_denoiser` (no-op on a denoiser it did not compile): the eager forwards run again."""
    info = compiled_info(model)
    if info is None:
        return
    if info.how == "skip-plan units" and getattr(model, "_diffslim_skip_plan", None) is not None:
        from diffslim.methods.skip_plan import compile_skip_plan

        compile_skip_plan(model, None)
    elif info.how == "multi-depth":
        from diffslim.methods.depth_skip import compile_multi_depth

        compile_multi_depth(model, None)
    else:
        model._compiled_call_impl = None
    del model._diffslim_compiled


def compile_pipeline(pipe, backend: str = "inductor", mode: Optional[str] = None, fullgraph: bool = False,
                     dynamic: Optional[bool] = None, options: Optional[dict] = None):
    """Compile ``pipe``'s denoiser in place (see :func:`compile_denoiser`) and return ``pipe``.

    The first call of each compiled region compiles it (minutes on a CPU for a small U-Net); later calls
    reuse the code while the input shapes stay the same. The VAE is left alone.
    """
    if not hasattr(pipe, "components"):
        raise UserError(f"diffslim.compile takes a diffusers pipeline; got {type(pipe).__name__} "
                        "(for a denoiser on its own use diffslim.compiling.compile_denoiser)")
    try:
        name = denoiser_attr(pipe)
    except UserError:
        raise UserError(f"{type(pipe).__name__} has no unet/transformer to compile") from None
    compile_denoiser(getattr(pipe, name), backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic,
                     options=options)
    return pipe
