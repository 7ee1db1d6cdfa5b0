"""``profile``: parameters, MACs, per-block table, latency and peak memory of one denoiser call."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Optional

from diffslim.errors import UserError


def profile_model(model, height: Optional[int] = None, width: Optional[int] = None, repeats: int = 5,
                  transform: Optional[Callable] = None, device=None, dtype=None, batch: int = 1,
                  before_timing: Optional[Callable] = None, random_weights: bool = False) -> dict:
    """Parameters, MACs (batch 1, one denoiser call), per-block table and, with real weights, latency and memory.

    ``model``: a path or ``zoo:NAME`` (loaded as :func:`diffslim.load` does), or what a user holds: a pipeline
    (after ``diffslim.apply`` too), a denoiser module or a :class:`~diffslim.LoadedModel`, profiled where it lies.
    ``height``/``width`` are image pixels; they are divided by the model's VAE scale factor.
    ``transform(denoiser)`` gives the model to profile instead, built from the loaded denoiser (a method's pruned
    copy; ``diffslim.profile(..., depth=N)`` passes the depth-skipped one).
    ``device``/``dtype`` (torch objects or names, as :func:`diffslim.load` takes them; default the CPU, float32)
    say where and in which precision the timed calls run; ``batch`` is their batch size (the MACs stay those of
    batch 1). ``before_timing(denoiser)`` runs after the counting and before the first timed call (e.g. to
    ``torch.compile`` it: the first call, reported as ``first_call_s``, then includes the compilation).
    ``random_weights``: a config-only folder is built with random weights on ``device`` and timed too (speed and
    memory do not depend on the values; see :func:`diffslim.load`).

    Returns a dict: ``class``, ``params``, ``macs`` (multiply-accumulates of one call at batch 1),
    ``macs_excl_attention``, ``macs_by_kind``, ``blocks`` (``name``, ``params``, ``macs`` per top-level block),
    ``sample_size`` (the denoiser's input, latent pixels), ``vae_scale_factor``, ``weights``/``random_weights``,
    ``device``, ``dtype``, ``weights_bytes``, ``batch``, and with weights ``latency_s`` (median of ``repeats``
    calls), ``first_call_s``, ``samples_per_s``, ``peak_memory_bytes`` and ``memory_kind`` (else None).
    """
    from diffslim.models.load import as_loaded

    if repeats < 1:
        raise UserError(f"repeats {repeats}: give a positive number of timed calls")
    loaded = as_loaded(model, random_weights=random_weights,
                       **{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    den = loaded.denoiser if transform is None else transform(loaded.denoiser)
    out = profile_denoiser(loaded, den, height, width, repeats=repeats, batch=batch, before_timing=before_timing)
    out.update(model=model if isinstance(model, str) else loaded.source)
    return out


def profile_denoiser(loaded, den, height: Optional[int] = None, width: Optional[int] = None, repeats: int = 5,
                     timing: bool = True, batch: int = 1, before_timing: Optional[Callable] = None) -> dict:
    """:func:`profile_model` for a denoiser already loaded (``loaded`` gives the VAE scale and whether weights are real)."""
    from diffusers import UNet2DConditionModel

    from diffslim.models.macs import default_inputs, macs_by_kind
    from diffslim.models.anatomy import anatomy

    if batch < 1:
        raise UserError(f"batch size {batch}: give a positive number of samples per denoiser call")
    scale = loaded.vae_scale_factor
    h = None if height is None else _pixels_to_latent(height, scale, "height")
    w = None if width is None else _pixels_to_latent(width, scale, "width")
    from diffslim.train.data import pipeline_default_latent_size

    default = None if loaded.pipe is None else pipeline_default_latent_size(loaded.pipe)
    if getattr(den.config, "sample_size", None) is None and default is not None:  # Flux, Z-Image: the pipeline's size
        h, w = default if h is None else h, default if w is None else w
    _check_grid(den, h, w, scale)
    kw = {"context_tokens": 2} if loaded.zoo is not None and isinstance(den, UNet2DConditionModel) else {}
    try:
        inputs, counted_on = default_inputs(den, height=h, width=w, **kw), "dummy inputs"
    except UserError as e:  # a family default_inputs cannot feed (HunyuanDiT, Sana, AuraFlow, ...): its pipeline can
        if loaded.pipe is None:
            raise
        inputs, counted_on = _pipeline_call(loaded, height, width, batch, e), "the pipeline's own first call"
    try:
        an = anatomy(den, height=h, width=w, inputs=inputs)
    except RuntimeError as e:  # a size the denoiser cannot take (a K-diffusion U-Net's padding at a 1x1 map, ...)
        if counted_on != "dummy inputs":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "its config's size" if height is None and width is None else f"{height}x{width} px"
        raise UserError(f"{type(den).__name__} failed on dummy inputs at {where} ({first}): give the size it samples "
                        "at, --height and --width in image pixels") from None
    args, kwargs = inputs
    kinds = macs_by_kind(den, *args, **kwargs)
    first = next(den.parameters(), None)
    out = {
        "class": type(den).__name__,
        "weights": loaded.has_weights,
        "random_weights": bool(loaded.extra.get("random_weights")),
        "sample_size": list(an.sample_size),
        "vae_scale_factor": scale,  # the denoiser's input is sample_size x this in pixels (1: pixel space)
        "params": an.params,
        "macs": an.macs,
        # BK-SDM, DeepCache and most U-Net papers count convolutions and linear layers only; DiT's
        # figures include the attention products. Both are reported so either can be compared.
        "macs_excl_attention": an.macs - kinds.get("attention", 0),
        "macs_by_kind": kinds,
        "blocks": [{"name": b.name, "params": b.params, "macs": b.macs} for b in an.blocks],
        "device": None if first is None else str(first.device),
        "dtype": None if first is None else str(first.dtype).removeprefix("torch."),
        "weights_bytes": sum(p.numel() * p.element_size() for p in den.parameters()),
        "batch": batch,
        "counted_on": counted_on,
        "latency_s": None,
        "first_call_s": None,
        "samples_per_s": None,
        "peak_memory_bytes": None,
    }
    if (loaded.has_weights or loaded.extra.get("random_weights")) and timing:
        if batch != 1:
            args, kwargs = default_inputs(den, height=h, width=w, batch=batch, **kw)
        if before_timing is not None:
            before_timing(den)
        first_s, lat, mem, kind = _latency_and_memory(den, args, kwargs, repeats)
        out.update(latency_s=lat, first_call_s=first_s, samples_per_s=batch / lat if lat > 0 else None,
                   peak_memory_bytes=mem, memory_kind=kind)
    return out


def _pipeline_call(loaded, height: Optional[int], width: Optional[int], batch: int, why: UserError) -> tuple:
    """``(args, kwargs)`` of the first call ``loaded``'s pipeline makes to its denoiser on one default prompt, without
    classifier-free guidance (batch 1), at ``height`` x ``width`` image pixels (default the pipeline's size): what
    profile counts and times where it cannot build dummy inputs itself (``why``)."""
    import inspect

    from diffslim.evaluate import eval_set_for
    from diffslim.sample import SampleSpec, first_denoiser_call
    from diffslim.train.data import needs_image

    pipe = loaded.pipe
    params = inspect.signature(pipe.__call__).parameters
    if batch != 1 or needs_image(pipe) or "prompt" not in params:
        raise UserError(f"{why}; profile counts such a denoiser on its pipeline's own call, for a text-to-image "
                        "pipeline at --batch-size 1") from None
    call = {k: v for k, v in (("guidance_scale", 1.0), ("height", height), ("width", width)) if v is not None}
    missing = [k for k in call if k not in params]
    if "height" in missing or "width" in missing:
        raise UserError(f"{type(pipe).__name__} takes no height and width: profile it at its own size")
    call.pop("guidance_scale", None) if "guidance_scale" in missing else None
    es = eval_set_for(loaded, 1)  # its call settings: the size sample and bench use, unless one is given
    return first_denoiser_call(pipe, SampleSpec(es.inputs, es.seeds, call_kwargs={**es.call_kwargs, **call}))


def _check_grid(den, h: Optional[int], w: Optional[int], scale: int) -> None:
    """Sizes a transformer denoiser cannot take, refused in one line (in torch they fail on a reshape): its input
    goes in patches of ``patch_size`` (Flux packs 2x2), and DiT reads its grid's side from the token count, so it
    takes square inputs only. ``h``/``w`` in latent pixels, None for the config's sample size."""
    config = getattr(den, "config", {})
    names = {c.__name__ for c in type(den).__mro__}
    patch = 2 if names & {"FluxTransformer2DModel", "ChromaTransformer2DModel"} else config.get("patch_size")
    if not isinstance(patch, int) or (h is None and w is None):
        return
    size = config.get("sample_size")
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    hh, ww = h if h is not None else size[0], w if w is not None else size[1]
    cls = next((n for n in ("DiTTransformer2DModel", "FluxTransformer2DModel") if n in names), type(den).__name__)
    for what, v in (("height", hh), ("width", ww)):
        if isinstance(v, int) and v % patch:
            raise UserError(f"--{what} {v * scale}: {cls} takes its input in patches of {patch * scale} px; give a "
                            f"multiple of {patch * scale}")
    if cls == "DiTTransformer2DModel" and isinstance(hh, int) and isinstance(ww, int) and hh != ww:
        raise UserError(f"--height {hh * scale} and --width {ww * scale}: DiTTransformer2DModel takes square inputs "
                        "only (diffusers reads the side of its grid from the token count); give the same for both")


def _pixels_to_latent(px: int, scale: int, what: str) -> int:
    if px <= 0 or px % scale:
        raise UserError(f"--{what} {px} must be a positive multiple of the VAE scale factor {scale}")
    return px // scale


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a GPU's kernels run after their call returns): CUDA on that very
    device (``torch.cuda.synchronize()`` alone waits on the current one, not on a ``cuda:1`` the model is on),
    Apple's MPS; nothing on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_call(fn, args, kwargs, device=None) -> float:
    """Wall time of ``fn(*args, **kwargs)``; on a GPU ``device``, its queued work is waited for before and
    after."""
    if device is not None:
        synchronize(device)
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    if device is not None:
        synchronize(device)
    return time.perf_counter() - t0


def _peak_rss_bytes() -> int:
    """This process's peak resident memory: ``ru_maxrss`` counts KiB on Linux and bytes on macOS."""
    import resource
    import sys

    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def _latency_and_memory(den, args, kwargs, repeats: int):
    """Wall time of the first call (the warm-up), median wall time of ``repeats`` calls after it, and the peak
    memory of those calls: on CUDA what they allocated above the weights on the model's device, elsewhere the
    process's peak resident memory."""
    import torch

    device = next(den.parameters()).device
    cuda = device.type == "cuda"
    with torch.no_grad():
        first = timed_call(den, args, kwargs, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = [timed_call(den, args, kwargs, device) for _ in range(max(1, repeats))]
    if cuda:
        return first, statistics.median(times), int(torch.cuda.max_memory_allocated(device) - base), \
            "cuda_allocated_above_weights"
    return first, statistics.median(times), _peak_rss_bytes(), "process_peak_rss"


class ComponentTimes:
    """What :func:`time_components` measured per pipeline component: ``seconds[name]``, ``entries[name]`` (outermost
    entries into any of its hooked modules: a VAE decode enters ``post_quant_conv``, then ``decoder``: 2) and
    ``calls[name]`` (the most outermost entries into any one of those modules: that decode is 1 call, a U-Net's
    forward once per step; an img2img run's encode and decode, each module entered once, also show 1), and
    ``total`` (the wall time of the whole block)."""

    def __init__(self, names):
        self.seconds = {n: 0.0 for n in names}
        self.entries = {n: 0 for n in names}
        self.by_module: dict[str, dict[int, int]] = {n: {} for n in names}  # outermost entries per hooked module
        self.order: list[str] = []  # the components in the order they first ran
        self.total = 0.0

    @property
    def calls(self) -> dict[str, int]:
        return {n: max(c.values(), default=0) for n, c in self.by_module.items()}

    def rows(self, denoiser: Optional[str] = None) -> list[dict]:
        """One row per component that ran, in the order they first ran, then ``other`` (the scheduler, the
        pipeline's own code, image conversion); ``share`` of the total."""
        calls = self.calls
        rows = [{"component": n, "seconds": self.seconds[n], "share": self.seconds[n] / self.total if self.total
                 else 0.0, "calls": calls[n], "entries": self.entries[n], "denoiser": n == denoiser}
                for n in self.order]
        other = max(0.0, self.total - sum(self.seconds.values()))
        rows.append({"component": "other", "seconds": other, "share": other / self.total if self.total else 0.0,
                     "calls": None, "entries": None, "denoiser": False})
        return rows


@contextlib.contextmanager
def time_components(pipe):
    """Time each ``nn.Module`` component of a diffusers pipeline (text encoders, denoiser, VAE, ...) while the
    block runs, by forward hooks on the component and its direct children (a VAE decodes through its ``decoder``
    and ``post_quant_conv``, never its own ``forward``). Only the outermost entry into a component is timed, so
    nested modules are not counted twice; on CUDA every entry and exit synchronises first. A compiled component
    (``module.compile()`` or a ``torch.compile`` wrapper) is hooked at its own call only, and the hooks run
    outside Dynamo, so that its graph is not split. Yields a :class:`ComponentTimes`, filled when the block ends.
    The hooks are removed afterwards."""
    import torch
    from torch import nn

    comps = {n: m for n, m in pipe.components.items() if isinstance(m, nn.Module)}
    times = ComponentTimes(comps)
    active = {n: 0 for n in comps}
    started = {n: 0.0 for n in comps}
    handles = []

    def sync(module):
        p = next(module.parameters(), None)
        if p is not None:
            synchronize(p.device)

    def pre(name):
        @torch.compiler.disable
        def hook(module, args):
            if active[name] == 0:
                sync(module)
                started[name] = time.perf_counter()
                per = times.by_module[name]
                per[id(module)] = per.get(id(module), 0) + 1
            active[name] += 1
        return hook

    def post(name):
        @torch.compiler.disable
        def hook(module, args, output):
            active[name] -= 1
            if active[name] == 0:
                sync(module)
                times.seconds[name] += time.perf_counter() - started[name]
                times.entries[name] += 1
                if times.entries[name] == 1:
                    times.order.append(name)
        return hook

    seen = set()
    for name, comp in comps.items():
        compiled = getattr(comp, "_compiled_call_impl", None) is not None or hasattr(comp, "_orig_mod")
        for m in [comp] if compiled else [comp, *comp.children()]:
            if id(m) in seen:  # a module shared by two components counts for the first
                continue
            seen.add(id(m))
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name), always_call=True))
    t0 = time.perf_counter()
    try:
        yield times
    finally:
        for m in comps.values():
            sync(m)
        times.total = time.perf_counter() - t0
        for h in handles:
            h.remove()
