"""The sampling harness: run any supported pipeline on fixed seeds and inputs, batched, cached, and
split across processes under ``accelerate launch``.

Inputs are a list of dicts, one per sample, in the words of diffusers pipelines' arguments:
``{"prompt": str}`` (txt2img, PixArt), ``{"prompt", "image"}`` (img2img, InstructPix2Pix, ControlNet,
the x4 upscaler), ``{"class_label": int}`` (DiT, zoo digits), ``{"image"}`` (zoo super-resolution).
Sample ``i`` always uses ``torch.Generator().manual_seed(seeds[i])`` for its own noise, so its output
does not depend on the batch it falls in or on the number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from diffslim.errors import UserError
from diffslim.launch import group, shared_map
from diffslim.recipe import SCHEDULERS

# Recipe scheduler names -> (diffusers class name, config overrides).
SCHEDULER_CLASSES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": False}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}
assert set(SCHEDULER_CLASSES) == set(SCHEDULERS)


def make_scheduler(name: str, base_config: dict):
    """A diffusers scheduler called ``name`` (see ``SCHEDULER_CLASSES``) built from a pipeline's scheduler config."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise UserError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULER_CLASSES)}")
    cls_name, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, cls_name).from_config(dict(base_config), **overrides)


def check_pipeline_takes(pipe, name: str, sched) -> None:
    """Raise ``UserError`` where ``pipe`` cannot sample with ``sched`` (scheduler ``name``): a latent consistency
    pipeline passes ``original_inference_steps`` to its scheduler's ``set_timesteps``, which only the LCM scheduler
    takes (DPM-Solver crashed there with a TypeError)."""
    import inspect

    if type(pipe).__name__.startswith("LatentConsistencyModel") and \
            "original_inference_steps" not in inspect.signature(sched.set_timesteps).parameters:
        raise UserError(f"{type(pipe).__name__} samples with its LCMScheduler (it passes original_inference_steps, "
                        f"which {type(sched).__name__} does not take): scheduler {name!r} cannot sample it; use "
                        "steps:N (its own scheduler, fewer steps)")


@contextlib.contextmanager
def scheduler_swapped(pipe, name: Optional[str]):
    """Temporarily give ``pipe`` the scheduler ``name`` (no-op for None)."""
    if name is None:
        yield pipe
        return
    old = pipe.scheduler
    new = make_scheduler(name, old.config)
    check_pipeline_takes(pipe, name, new)
    pipe.scheduler = new
    try:
        yield pipe
    finally:
        pipe.scheduler = old


@dataclass
class SampleSpec:
    """What to sample: one input dict and one seed per sample, and how.

    ``num_inference_steps`` or ``timesteps`` (descending); ``scheduler`` a name from
    ``SCHEDULER_CLASSES`` or None for the pipeline's own; ``call_kwargs`` extra pipeline arguments
    (e.g. ``guidance_scale``).
    """

    inputs: list[dict]
    seeds: list[int]
    num_inference_steps: Optional[int] = 50
    timesteps: Optional[list[int]] = None
    scheduler: Optional[str] = None
    call_kwargs: dict = field(default_factory=dict)
    batch_size: int = 16

    def __post_init__(self):
        if len(self.inputs) != len(self.seeds):
            raise UserError(f"{len(self.inputs)} inputs but {len(self.seeds)} seeds; give one seed per input")

    def replace(self, **kw) -> "SampleSpec":
        d = dict(self.__dict__)
        d.update(kw)
        return SampleSpec(**d)

    def digest(self) -> str:
        """A stable hash of everything that determines the outputs (inputs, seeds, schedule)."""
        h = hashlib.sha256()
        for inp in self.inputs:
            for k in sorted(inp):
                h.update(k.encode())
                h.update(_value_bytes(inp[k]))
        h.update(json.dumps([self.seeds, self.num_inference_steps, self.timesteps, self.scheduler,
                             sorted((k, repr(v)) for k, v in self.call_kwargs.items())]).encode())
        return h.hexdigest()[:32]


def _check_strength(pipe, params, kw: dict) -> None:
    """An image-to-image run at strength s makes ``int(steps * s)`` denoising steps; where that is 0, diffusers fails
    deep in its scheduler (a tensor of 0 elements): refuse it in one line."""
    steps = kw.get("num_inference_steps")
    if "strength" not in params or steps is None or kw.get("denoising_start") is not None:
        return
    strength = kw.get("strength", params["strength"].default)
    if isinstance(strength, (int, float)) and 0 < strength <= 1 and int(steps * strength) < 1:
        raise UserError(f"{type(pipe).__name__} at strength {strength:g} makes int({steps} x {strength:g}) = 0 "
                        f"denoising steps of a {steps}-step run: give at least {math.ceil(1 / strength)} steps, or a "
                        "higher \"strength\" with the inputs (a .jsonl file of pipeline inputs)")


def _value_bytes(v) -> bytes:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().contiguous().numpy().tobytes() + str(tuple(v.shape)).encode()
    if isinstance(v, np.ndarray):
        return v.tobytes() + str(v.shape).encode()
    if hasattr(v, "tobytes"):  # PIL image
        return v.tobytes() + str(getattr(v, "size", "")).encode()
    return repr(v).encode()


@functools.lru_cache(maxsize=None)
def _pil_inputs(cls) -> frozenset:
    """The image inputs pipeline class ``cls`` must get as PIL images: a ``control_image`` where its ``prepare_image``
    takes a tensor as already preprocessed (diffusers' Flux, SD3, Sana, HunyuanDiT, Qwen-Image, Z-Image and CogView4
    ControlNet and Control pipelines: in [-1, 1] at the sampling size, where a PIL image is resized and normalized),
    and an ``image`` whose size its ``__call__`` reads as a PIL image's (Qwen-Image Edit's: ``image[0].size``) or
    that it checks is one (Flux.2's)."""
    def source(fn) -> str:
        try:
            return inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            return ""

    keys = set()
    prepare = getattr(cls, "prepare_image", None) or getattr(cls, "prepare_image_with_mask", None)
    if re.search(r"isinstance\(image, torch\.Tensor\):\s*pass", source(prepare)):
        keys.add("control_image")
    call = source(getattr(cls, "__call__", None))
    # Flux.2's image processor checks for a PIL image (check_image_input)
    if re.search(r"image\[(0|-1)\]\.size\b", call) or "image_processor.check_image_input(" in call:
        keys.add("image")
    return frozenset(keys)


def _pil(image: torch.Tensor):
    """An image ``(C, H, W)`` in [0, 1] as an 8-bit PIL image (exact for images read from 8-bit files)."""
    from PIL import Image

    arr = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _call_kwargs(pipe, batch: Sequence[dict]) -> dict:
    """Turn a batch of input dicts into the pipeline's keyword arguments. An image goes as a PIL image to the pipelines
    that would take a tensor as already preprocessed, or not take it (:func:`_pil_inputs`), so that they resize and
    normalize it as they do a user's image."""
    keys = set(batch[0])
    if any(set(b) != keys for b in batch):
        raise UserError("all inputs of a run must have the same keys")
    params = inspect.signature(pipe.__call__).parameters
    kw: dict[str, Any] = {}
    for key in keys:
        values = [b[key] for b in batch]
        if key in ("class_label", "class_labels"):  # one label per input (the pipeline's own name accepted too)
            name = "class_labels"
            kw[name] = [int(v) for v in values]
        elif (key in ("image", "mask_image", "control_image", "image_embeds")
              and all(isinstance(v, torch.Tensor) for v in values)):
            name = key  # an image (a mask, a control image) per sample, or an image prompt's embedding (the zoo's
            # IP-Adapter input)
            kw[name] = [_pil(v) for v in values] if key in _pil_inputs(type(pipe)) else torch.stack(values)
        elif all(isinstance(v, (bool, int, float)) for v in values):  # a per-call setting (strength, guidance)
            name = key
            if any(v != values[0] for v in values):
                raise UserError(f"{key}: the inputs of one pipeline call give {sorted(set(values))}; "
                                f"{type(pipe).__name__} takes one {key} per call: give every input the same")
            kw[name] = values[0]
        else:
            name = key
            kw[name] = values
        if name not in params:
            raise UserError(f"{type(pipe).__name__} takes no {name!r} input; it takes: "
                             f"{', '.join(p for p in params if p not in ('self', 'kwargs'))}")
    return kw


def _to_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.float().cpu()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float()
    arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]  # PIL
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def check_steps(pipe, n: Optional[int], what: str = "--steps") -> None:
    """Refuse a step count above the scheduler's training timesteps (diffusers raises on it deep in the call)."""
    most = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
    if n is not None and most is not None and n > most:
        raise UserError(f"{what}: {n} steps, but {type(pipe.scheduler).__name__} has {most} training timesteps to "
                        f"sample at: give at most {most}")


def run_pipeline(pipe, spec: SampleSpec, indices: Sequence[int], progress=None,
                 differentiable: bool = False) -> torch.Tensor:
    """Sample ``indices`` of ``spec`` with ``pipe``; returns ``(len(indices), C, H, W)`` in [0, 1].

    ``differentiable``: run the pipeline's own loop with autograd on (its ``no_grad`` decorator bypassed)
    and ask for ``output_type="pt"``, so that gradients reach whatever the denoiser's hooks make
    learnable (DiP-GO's gates). Needs a pipeline whose ``__call__`` returns image tensors in that mode
    (Stable Diffusion, SDXL, img2img, InstructPix2Pix, ControlNet, PixArt, the zoo pipelines).
    """
    outs = []
    params = inspect.signature(pipe.__call__).parameters
    check_steps(pipe, spec.num_inference_steps, "num_inference_steps")
    call = pipe
    if differentiable:
        raw = getattr(type(pipe).__call__, "__wrapped__", None)
        if raw is None or "output_type" not in params:
            raise UserError(f"{type(pipe).__name__} cannot be sampled with gradients: its __call__ is not a "
                            "torch.no_grad-decorated function with an output_type argument")
        call = functools.partial(raw, pipe)
    with scheduler_swapped(pipe, spec.scheduler):
        for start in range(0, len(indices), spec.batch_size):
            idx = list(indices[start:start + spec.batch_size])
            kw = _call_kwargs(pipe, [spec.inputs[i] for i in idx])
            kw.update(spec.call_kwargs)
            if spec.timesteps is not None:
                kw["timesteps"] = list(spec.timesteps)
            elif spec.num_inference_steps is not None:
                kw["num_inference_steps"] = spec.num_inference_steps
            _check_strength(pipe, params, kw)
            kw["generator"] = [torch.Generator("cpu").manual_seed(int(spec.seeds[i])) for i in idx]
            if "output_type" in params:
                kw["output_type"] = "pt" if differentiable else "np"
            with torch.enable_grad() if differentiable else contextlib.nullcontext():
                result = call(**kw)
            images = result.images if hasattr(result, "images") else result[0]
            if differentiable and not torch.is_tensor(images):
                raise UserError(f"{type(pipe).__name__} returns {type(images).__name__} with output_type='pt', "
                                "not a tensor: it cannot be sampled with gradients")
            outs.append(_to_tensor(images))
            if progress is not None:
                progress(len(idx))
    return torch.cat(outs) if outs else torch.empty(0)


class _FirstCall(Exception):
    """Raised by :func:`first_denoiser_call`'s hook to stop the pipeline at its first denoiser call."""


def first_denoiser_call(pipe, spec: SampleSpec) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the first call ``pipe`` makes to its denoiser when sampling ``spec``'s first input.

    The pipeline stops right there (nothing is denoised). What the call holds (the sample size the
    pipeline really works at, the context length, the guidance batch) is what MACs counts should
    use: a denoiser's config ``sample_size`` and dummy conditioning may differ from it.
    """
    return _stop_at_first_call(pipe, spec)["call"]


def denoiser_calls_per_run(pipe, spec: SampleSpec) -> int:
    """The most denoiser calls ``pipe`` makes sampling an input of ``spec`` (:func:`calls_in_run`): the step count,
    or fewer for an image-to-image run at strength < 1. Inputs differ in it only by their per-call settings (a
    ``strength`` of their own), so one input of each setting is run, up to its first denoiser call."""
    firsts = {}
    for i, inp in enumerate(spec.inputs):
        settings = tuple(sorted((k, v) for k, v in inp.items() if isinstance(v, (bool, int, float))
                                and k not in ("class_label", "class_labels")))
        firsts.setdefault(settings, i)
    return max(_stop_at_first_call(pipe, spec.replace(inputs=[spec.inputs[i]], seeds=[spec.seeds[i]]))["calls"]
               for i in firsts.values())


def _stop_at_first_call(pipe, spec: SampleSpec) -> dict:
    """``{"call": (args, kwargs), "calls": calls_in_run}`` of ``spec``'s first input, the run stopped there."""
    from diffslim.models.load import denoiser_of

    den = denoiser_of(pipe)
    seen: dict = {}
    one = spec.replace(inputs=spec.inputs[:1], seeds=spec.seeds[:1], batch_size=1)

    def capture(module, args, kwargs):
        seen["call"] = (args, kwargs)
        seen["calls"] = calls_in_run(pipe, one)
        raise _FirstCall

    handle = den.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run_pipeline(pipe, one, [0])
    except _FirstCall:
        pass
    finally:
        handle.remove()
    if "call" not in seen:
        raise UserError(f"{type(pipe).__name__} did not call its denoiser")
    return seen


class _Enough(Exception):
    """Raised by :func:`denoiser_calls`' hook once a batch's last wanted call is recorded."""


class DenoiserCall(NamedTuple):
    """One input's denoiser call, recorded by :func:`denoiser_calls`."""

    arguments: dict  # the call's arguments by name (positional ones bound to the denoiser's ``forward``)
    rows: list  # the rows of its batch that belong to the input
    call: int  # its call number in the run (0-based)


def calls_in_run(pipe, spec: SampleSpec) -> int:
    """How many denoiser calls ``pipe``'s current run makes: diffusers' pipelines store it as
    ``_num_timesteps`` before their loop (an image-to-image run at strength s makes ``int(steps * s)``); a
    pipeline that does not is taken to make one per step of ``spec``. Valid from its first denoiser call on."""
    n = getattr(pipe, "_num_timesteps", None)
    return int(n) if isinstance(n, int) and n > 0 else spec.num_inference_steps


def denoiser_calls(pipe, spec: SampleSpec, at, progress: bool = False) -> list[DenoiserCall]:
    """What ``pipe``'s denoiser is called with while sampling ``spec``: for input ``i``, its call number ``at[i]``
    (0-based, in sampling order: one call per step for most pipelines). ``at`` may also be a function of the
    number of calls a run makes (:func:`calls_in_run`, known at its first call) returning those call numbers:
    an image-to-image run at strength s < 1 makes only ``int(steps * s)`` calls. Returns, per input, a
    :class:`DenoiserCall`: the call's arguments by name (the inputs sampled together share one call), the rows of
    its batch that belong to input ``i`` and its call number. A pipeline batches its inputs' rows as
    diffusers' pipelines do: with classifier-free guidance ``[uncond; cond]``, so input ``j`` of ``b`` holds rows
    ``j, j + b, ...``. A batch stops at its last wanted call (nothing after it is denoised). ``progress``: a bar over
    the inputs (in one process)."""
    from diffslim.models.load import denoiser_of

    if not callable(at) and len(at) != len(spec.inputs):
        raise UserError(f"{len(at)} call numbers for {len(spec.inputs)} inputs; give one per input")
    den = denoiser_of(pipe)
    sig = inspect.signature(den.forward)
    params = list(sig.parameters)
    t_name = "timestep" if "timestep" in params else (params[1] if len(params) > 1 else None)  # Z-Image: ``t``
    out: list = [None] * len(spec.inputs)

    def batch(idx: list) -> dict:
        """``{input: DenoiserCall}`` of the inputs ``idx``, sampled together."""
        found: dict = {}
        state = {"count": 0, "at": None if callable(at) else list(at)}

        def capture(module, args, kwargs, idx=idx, state=state):
            named = dict(sig.bind(*args, **kwargs).arguments)
            if "kwargs" in named and isinstance(named["kwargs"], dict) and "kwargs" not in kwargs:
                named.update(named.pop("kwargs"))
            if _same_step(state, named, t_name):  # the step's second call (split guidance): the first one counted
                return None
            k = state["count"]
            state["count"] += 1
            if state["at"] is None:
                state["at"] = [int(c) for c in at(calls_in_run(pipe, spec))]
                if len(state["at"]) != len(spec.inputs):
                    raise UserError(f"{len(state['at'])} call numbers for {len(spec.inputs)} inputs; give one per input")
            wanted = {state["at"][i] for i in idx}
            if k not in wanted:
                return None
            first = next(iter(named.values()))
            b, m = len(idx), (len(first) if isinstance(first, (list, tuple)) else first.shape[0])
            if m % b:
                raise UserError(f"{type(pipe).__name__} calls its denoiser with a batch of {m} rows for {b} inputs; "
                                "its rows cannot be told apart by input")
            named = {key: _cloned(v) for key, v in named.items()}
            for j, i in enumerate(idx):
                if state["at"][i] == k:
                    found[i] = DenoiserCall(named, [j + r * b for r in range(m // b)], k)
            if k == max(wanted):
                raise _Enough
            return None

        handle = den.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            run_pipeline(pipe, spec.replace(batch_size=len(idx)), idx)
        except _Enough:
            pass
        finally:
            handle.remove()
        missing = [state["at"][i] for i in idx if i not in found] if state["at"] is not None else [0]
        if missing:
            hint = ("; an image-to-image pipeline runs only its strength's share of the steps: give \"strength\": 1.0 "
                    "with every input (a .jsonl file of pipeline inputs)"
                    if "strength" in inspect.signature(pipe.__call__).parameters else "")
            raise UserError(f"{type(pipe).__name__} called its denoiser {state['count']} times for a run of "
                            f"{spec.num_inference_steps} steps; call number {min(missing)} was asked for{hint}")
        return found

    batches = [list(range(start, min(start + spec.batch_size, len(spec.inputs))))
               for start in range(0, len(spec.inputs), spec.batch_size)]
    if group() is None:
        bar = _progress("calibration: the denoiser's calls while sampling", len(spec.inputs)) if progress else \
            contextlib.nullcontext(None)
        with bar as advance:
            for idx in batches:
                for i, call in batch(idx).items():
                    out[i] = call
                if advance is not None:
                    advance(len(idx))
        return out
    # under `accelerate launch` each process samples its share of the batches; the recorded calls travel on the CPU
    # (a GPU tensor would arrive on the sender's GPU) and come back to the denoiser's device
    device = next(den.parameters()).device
    for part in shared_map(lambda idx: _moved(batch(idx), "cpu"), batches):
        for i, call in _moved(part, device).items():
            out[i] = call
    return out


def _cloned(v):
    """A recorded argument detached from the run: tensors cloned (in lists and tuples too: Z-Image's per-sample
    latents and captions)."""
    if torch.is_tensor(v):
        return v.detach().clone()
    if isinstance(v, (list, tuple)) and any(torch.is_tensor(e) for e in v):
        return type(v)(_cloned(e) for e in v)
    return v


def _same_step(state: dict, named: dict, t_name: Optional[str]) -> bool:
    """Whether a denoiser call is the current step's second one: the same timestep on the same latents as the call
    before (Lumina2, CogView4 and Flux's true CFG call the denoiser for the prompt and then for the negative prompt).
    Such a call is not counted as a step of its own: the calls a run makes are its steps' first calls. Records the
    call's timestep and latents in ``state`` for the next call."""
    x = next(iter(named.values()), None)
    t = named.get(t_name) if t_name is not None else None
    prev = state.get("prev")
    same = prev is not None and _equal(prev[0], t) and _equal(prev[1], x)
    if not same:
        state["prev"] = (_cloned(t), _cloned(x))
    return same


def _equal(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


def _moved(obj, device):
    """``obj`` with every tensor in it (inside dicts, lists, tuples and :class:`DenoiserCall`) on ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, DenoiserCall):
        return DenoiserCall(_moved(obj.arguments, device), obj.rows, obj.call)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(v, device) for v in obj)
    return obj


def write_samples(pipe, spec: SampleSpec, folder: Path, progress: bool = False) -> Path:
    """Sample ``spec`` with ``pipe`` into ``folder`` as an image folder the trainer reads (``00000.png`` with its
    prompt, or class label, in ``00000.txt``): training data made by the teacher itself, for a user who has prompts but no images.
    Inputs that carry an image (a ControlNet's control image, InstructPix2Pix's input) make training pairs instead:
    ``input/00000.png`` (the ``control_image`` where the input has one, else the ``image``) beside
    ``target/00000.png`` and its caption, the layout :class:`diffslim.train.data.ConditionPairs` reads.
    Resumable: a batch whose images are all there is not sampled again, each file is written whole (a temporary
    name, then renamed), and ``samples.json`` records what was asked for; a folder made for other inputs, seeds or
    steps is refused rather than mixed."""
    from accelerate import PartialState

    # under `accelerate launch` each process samples its share of what is missing (the files are its own)
    state = PartialState(cpu=not torch.cuda.is_available())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"n": len(spec.inputs), "digest": spec.digest()}
    mf = folder / "samples.json"
    if mf.exists() and json.loads(mf.read_text()) != manifest:
        raise UserError(f"{folder} holds teacher samples of other prompts, seeds or steps; remove it or give another "
                        "run folder")
    state.wait_for_everyone()  # every process has read the manifest before the first rewrites it
    if state.is_main_process:
        mf.write_text(json.dumps(manifest) + "\n")
    first = spec.inputs[0] if spec.inputs else {}
    pair = next((k for k in ("control_image", "image") if torch.is_tensor(first.get(k))), None)
    target = folder / "target" if pair else folder
    if pair:
        for sub in ("input", "target"):
            (folder / sub).mkdir(exist_ok=True)
    todo = [i for i in range(len(spec.inputs)) if not (target / f"{i:05d}.png").exists()]
    with state.split_between_processes(todo) as mine:
        todo = list(mine)
    bar = (_progress(f"teacher samples ({spec.num_inference_steps} steps)", len(todo))
           if progress and todo and state.is_main_process else contextlib.nullcontext(None))
    with bar as advance:
        for start in range(0, len(todo), spec.batch_size):
            idx = todo[start:start + spec.batch_size]
            for i, img in zip(idx, run_pipeline(pipe, spec, idx)):
                prompt = spec.inputs[i].get("prompt", spec.inputs[i].get("class_label"))
                if pair:  # the pair's input first: a target is there only once its input is
                    _write_png(spec.inputs[i][pair], folder / "input" / f"{i:05d}.png")
                if prompt is not None:  # the caption first: an image is there only once its caption is
                    tmp = target / f".{i:05d}.txt.tmp"
                    tmp.write_text(str(prompt))
                    os.replace(tmp, target / f"{i:05d}.txt")
                _write_png(img, target / f"{i:05d}.png")
            if advance is not None:
                advance(len(idx))
    state.wait_for_everyone()  # the folder is whole before any process trains on it
    return folder


def _write_png(img: torch.Tensor, path: Path) -> None:
    """An image ``(C, H, W)`` in [0, 1] written whole to ``path`` as an 8-bit PNG (a temporary name, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    _pil(img).save(tmp, format="PNG")
    os.replace(tmp, path)


class ReferenceCache:
    """Reference outputs on disk, keyed by model, inputs, scheduler and steps (safetensors files).

    The folder is ``$DIFFSLIM_CACHE`` or ``~/.cache/diffslim`` unless given.
    """

    def __init__(self, folder=None):
        from diffslim.cache import cache_root

        self.folder = Path(folder or cache_root()) / "refs"

    def path(self, model_id: str, spec: SampleSpec) -> Path:
        key = hashlib.sha256(f"{model_id}|{spec.digest()}".encode()).hexdigest()[:40]
        return self.folder / f"{key}.safetensors"

    def get(self, model_id: str, spec: SampleSpec) -> Optional[torch.Tensor]:
        from safetensors.torch import load_file

        p = self.path(model_id, spec)
        if not p.exists():
            return None
        try:
            return load_file(str(p))["images"]
        except Exception:  # a truncated cache file is recomputed, not trusted
            return None

    def put(self, model_id: str, spec: SampleSpec, images: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        p = self.path(model_id, spec)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")  # one per process: two writing the same entry do not mix
        save_file({"images": images.contiguous()}, str(tmp))
        tmp.replace(p)
        return p


def model_fingerprint(source: str) -> str:
    """An identifier of a model's weights for cache keys.

    Its source plus, for every safetensors/JSON file, its name, size and a hash of its content (JSON
    whole; weights by three 1 MiB chunks: start, middle, end), so retrained weights of the same
    architecture and size get a new key.
    """
    path = Path(source)
    if source.startswith("zoo:"):
        from diffslim.zoo.registry import ZOO

        path = ZOO[source[4:]].folder
    else:  # a Hub id: its copy in the local Hugging Face cache
        from diffslim.models.load import cached_hub_folder

        path = cached_hub_folder(source) or path
    parts = [source]
    if path.exists():
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".json"):
                parts.append(f"{f.relative_to(path)}:{f.stat().st_size}:{_content_hash(f)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _content_hash(f: Path, chunk: int = 1 << 20) -> str:
    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        if size <= 3 * chunk:
            h.update(fh.read())
        else:
            for offset in (0, size // 2, size - chunk):
                fh.seek(offset)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def sample(pipe, spec: SampleSpec, *, cache: Optional[ReferenceCache] = None, model_id: Optional[str] = None,
           show_progress: bool = False, description: str = "sampling") -> torch.Tensor:
    """Sample every input of ``spec``; returns ``(N, C, H, W)`` float images in [0, 1].

    With ``cache`` and ``model_id``, outputs are read from / written to the reference cache. Under
    ``accelerate launch`` each process samples its share of the inputs and all processes receive
    the gathered outputs in input order.
    """
    from accelerate import PartialState

    # without CUDA, processes started by `accelerate launch` talk over gloo (accelerate's MULTI_CPU)
    state = PartialState(cpu=not torch.cuda.is_available())
    if cache is not None and model_id is not None:
        hit = _cached(cache, model_id, spec, state)
        if hit is not None:
            return hit
    n = len(spec.inputs)
    all_idx = list(range(n))
    with state.split_between_processes(all_idx) as mine:
        mine = list(mine)
        progress_ctx = _progress(description, len(mine)) if show_progress and state.is_main_process else contextlib.nullcontext(None)
        with progress_ctx as advance:
            local = run_pipeline(pipe, spec, mine, progress=advance)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        pieces = gather_object([(mine, local)])
        out = [None] * n
        for idx, imgs in pieces:
            for j, i in enumerate(idx):
                out[i] = imgs[j]
        images = torch.stack(out)
    else:
        images = local
    if cache is not None and model_id is not None:
        if state.is_main_process:
            cache.put(model_id, spec, images)
        state.wait_for_everyone()  # every process finds the entry the next time it asks
    return images


def _cached(cache: ReferenceCache, model_id: str, spec: SampleSpec, state) -> Optional[torch.Tensor]:
    """The cached outputs, or None; under a launch the first process decides for all (a process that found the
    entry while another did not would leave that one sampling alone, waiting for the others forever)."""
    if state.num_processes == 1:
        return cache.get(model_id, spec)
    from diffslim.launch import first_decides

    hit = cache.get(model_id, spec) if state.is_main_process else None
    found = first_decides(hit is not None)
    if found and hit is None:
        hit = cache.get(model_id, spec)
        if hit is None:
            raise RuntimeError(f"process {state.process_index} cannot read the cached outputs at "
                               f"{cache.path(model_id, spec)} that the first process read: the processes of a "
                               "launch on several machines need one shared cache folder (DIFFSLIM_CACHE)")
    return hit if found else None


@contextlib.contextmanager
def _progress(description: str, total: int, every: float = 30.0):
    """A transient bar on a terminal, yielding ``advance(k)``. Off the terminal (a log file, a batch job's output),
    where the bar would only leave an empty line behind, a line on stderr at most every ``every`` seconds, so that a
    long phase shows in the log and a short one stays silent."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:
        start = time.monotonic()
        state = {"done": 0, "said": start}

        def advance(k: int) -> None:
            state["done"] += k
            now = time.monotonic()
            if now - state["said"] >= every:
                print(f"{description}: {state['done']}/{total} ({now - start:.0f} s)", file=sys.stderr, flush=True)
                state["said"] = now

        yield advance
        return
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True, console=console) as p:
        task = p.add_task(description, total=total)
        yield lambda k: p.advance(task, k)


def shutdown_processes() -> None:
    """End a run started by ``accelerate launch``: wait for every process, then destroy the process group.

    Leaving the gloo process group to interpreter teardown lets a process abort now and then
    ("terminate called without an active exception"), turning a finished run into a failed exit status.
    A no-op in a single process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
