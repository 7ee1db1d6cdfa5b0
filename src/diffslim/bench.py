"""``bench``: several variants of one model, sampled on the same inputs in one process, one row each.

A method is a name with an optional argument (``full``, ``steps:10``); each registered builder turns
it into a :class:`Variant` (a pipeline and how to sample it). Later methods register themselves with
:func:`register_method`. Rows: ``method``, ``params``, ``macs_ratio`` (MACs of the whole sampling
run relative to ``full``), ``speedup`` (wall time of ``full`` over this row's, same run), ``psnr``,
``ssim`` (against the ``full`` outputs) and the task metrics of the model.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from diffslim.cache import build_once, cache_root
from diffslim.errors import UserError
from diffslim.launch import group, is_first, slowest, wait_for_everyone, world_size

from diffslim.sample import SampleSpec, calls_in_run, denoiser_calls_per_run, run_pipeline, sample


@dataclass
class BenchContext:
    """What builders get: the loaded model, the base sampling spec (the ``full`` run) and its default steps."""

    loaded: object
    base_spec: SampleSpec
    default_steps: int
    reference: Optional[torch.Tensor] = None  # the full row's outputs, once it has run
    dry_run: bool = False  # builders only validate their argument and return None
    # training data of the builders that score or train (layers, +kd, +ft): "zoo" (the zoo task's own) or an image
    # folder (captions optional), its images at ``resolution`` px (default: the pipeline's own size)
    data: str = "zoo"
    resolution: Optional[int] = None
    # weight of the diffusion task loss in the distillation of ``+kd`` and the fine-tuning of ``+ft`` (1: the papers'
    # loss; 0: output and feature distillation only, which keeps the student closer to the model it was pruned from);
    # None: :func:`default_task_weight`, 1 on training data and 0 on the teacher's own samples or for a consistency
    # model
    task_weight: Optional[float] = None
    # results a builder may reuse when called again on the same model (the layer scores of a ratio search)
    memo: dict = field(default_factory=dict, repr=False)
    progress: bool = False  # bars over the long phases of a builder (layer scoring and its calibration)
    # calibration triples (or, without data, the pipeline's own denoiser calls) the layer criteria score on;
    # None: LAYER_CALIB's
    layer_calibration: Optional[int] = None

    def __post_init__(self):
        if self.task_weight is None and not self.dry_run:
            self.task_weight = default_task_weight(self.loaded, self.data)

    def train_key(self) -> str:
        """What the training settings add to a cache key: nothing for the defaults, so earlier caches still hit."""
        return "" if self.task_weight == 1.0 else f"|task={self.task_weight:g}"

    def train_note(self, what: str) -> str:
        """The loss of a ``+kd``/``+ft`` run in words."""
        if self.task_weight == 0.0:
            return f"output + {what} distillation (no task loss)"
        weight = "" if self.task_weight == 1.0 else f" x{self.task_weight:g}"
        return f"task{weight} + output + {what} distillation"

    def has_data(self) -> bool:
        """Whether there is training data: a ``data`` folder, or the zoo task's own for a zoo model."""
        return has_training_data(self.loaded, self.data)

    def needs_data(self, method: str) -> None:
        """Refuse ``method`` (which trains) on a model that has no zoo data when no ``data`` is given, unless it is a
        pipeline that samples its own training images from the bench's inputs (:meth:`train_data`): from prompts, or
        from prompts and input images (a ControlNet's control images), the inputs beside the outputs as pairs."""
        if not self.has_data() and not _samples_its_training_data(self.loaded.pipe, self.base_spec):
            raise UserError(f"{method} trains the model on data, and {self.loaded.source} is neither a zoo model nor "
                            "a pipeline of prompts (and input images): give --data FOLDER (images, captions optional)")
        if self.loaded.pipe is not None:  # a pipeline the trainer has no task for: before anything samples
            from diffslim.train.distill import task_for

            try:
                task_for(self.loaded.pipe)
            except UserError as e:
                raise UserError(f"{method}: {e}") from None

    def train_data(self, method: str) -> tuple[str, str]:
        """``(data, cache key part)`` of a method that trains: the given data, or, for a pipeline of prompts (and input
        images) without it, ``TEACHER_SAMPLES`` images the full pipeline samples from the bench's prompts (seeds apart from
        evaluation's and calibration's; cached, resumed if interrupted)."""
        self.needs_data(method)
        if self.has_data():
            return self.data, ("" if self.data == "zoo" else f"|{self.data_key()}")  # zoo keys as before
        import hashlib

        from diffslim.sample import model_fingerprint, write_samples

        if ("teacher_samples",) not in self.memo:
            base = self.base_spec
            spec = base.replace(inputs=[base.inputs[i % len(base.inputs)] for i in range(TEACHER_SAMPLES)],
                                seeds=[300_000 + i for i in range(TEACHER_SAMPLES)],
                                num_inference_steps=base.num_inference_steps or self.default_steps)
            digest = spec.digest()
            key = hashlib.sha256(f"{model_fingerprint(self.loaded.source)}|{digest}".encode()).hexdigest()[:16]
            folder = write_samples(self.loaded.pipe, spec, cache_root() / "teacher_samples" / key,
                                   progress=True)
            self.memo[("teacher_samples",)] = (str(folder), f"|teacher:{digest}")
        return self.memo[("teacher_samples",)]

    def train_size(self) -> Optional[int]:
        """The training images' size in px: ``resolution`` with data; on the full pipeline's own samples their size
        (the shorter side where the bench samples at ``--height``/``--width``), so that a 1024 px model benched at 512
        px does not train on its 512 px samples blown up to 1024; else None (the pipeline's own)."""
        if self.has_data():
            return self.resolution
        sides = [self.base_spec.call_kwargs.get(k) for k in ("height", "width")]
        sides = [int(v) for v in sides if v is not None]
        return min(sides) if sides else None

    def train_data_note(self) -> str:
        if self.has_data():
            return ""
        first = self.base_spec.inputs[0] if self.base_spec.inputs else {}
        pairs = any(torch.is_tensor(first.get(k)) for k in ("control_image", "image"))
        return (f"; trained on {TEACHER_SAMPLES} images the full pipeline sampled from the prompts"
                + (" and input images (as pairs)" if pairs else "") + " (no --data)")

    def data_key(self) -> str:
        """The training data for cache keys: "zoo", or the folder with its files' names, sizes and times."""
        if self.data == "zoo":
            return "zoo"
        folder = Path(self.data)
        files = sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else [folder]
        return f"{folder.resolve()}|{self.resolution}|" + ",".join(
            f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists())


def _samples_its_training_data(pipe, spec: SampleSpec) -> bool:
    """A pipeline whose training data can be its own samples of ``spec``'s inputs: one that makes images from prompts
    alone, or from prompts and one input image each (written as training pairs, :func:`diffslim.sample.write_samples`;
    a multi-ControlNet's list of images makes none)."""
    import inspect

    from diffslim.train.data import needs_image

    if "prompt" not in inspect.signature(pipe.__call__).parameters:
        return False
    first = spec.inputs[0] if spec.inputs else {}
    # (an optional input image, Kontext's and Flux.2's: prompts alone are enough)
    return not needs_image(pipe) or any(torch.is_tensor(first.get(k)) for k in ("control_image", "image"))


@dataclass
class Variant:
    """A pipeline to sample and the spec to sample it with; ``params`` of its denoiser."""

    method: str
    pipe: object
    spec: SampleSpec
    params: int
    notes: str = ""
    cleanup: Optional[Callable[[], None]] = None
    # the recipe sections that reproduce what the variant installs on the pipeline at run time (a skip plan);
    # the sampling section follows from ``spec`` and a changed denoiser is a model folder of its own
    recipe: dict = field(default_factory=dict)
    # the cost depends on the inputs and their batching (a cache that decides by the features): MACs are counted
    # over the whole run, not on one input
    input_dependent: bool = False


METHODS: dict[str, Callable[[Optional[str], BenchContext], Variant]] = {}
METHOD_HELP: dict[str, str] = {}


def register_method(name: str, help: str):
    """Register a bench method builder ``fn(arg, ctx) -> Variant`` under ``name`` (``name:ARG`` on the CLI)."""

    def deco(fn):
        METHODS[name] = fn
        METHOD_HELP[name] = help
        return fn

    return deco


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@register_method("full", "the unchanged model at its default step count")
def _full(arg, ctx: BenchContext) -> Variant:
    if arg:
        raise UserError("method 'full' takes no argument")
    if ctx.dry_run:
        return None
    return Variant("full", ctx.loaded.pipe, ctx.base_spec, _n_params(ctx.loaded.denoiser))


@register_method("steps", "steps:N, the same scheduler with N steps")
def _steps(arg, ctx: BenchContext) -> Variant:
    try:
        n = int(arg)
        assert n >= 1
    except (TypeError, ValueError, AssertionError):
        raise UserError(f"steps:N needs a positive integer N, got {arg!r}") from None
    from diffslim.sample import check_steps

    check_steps(getattr(ctx.loaded, "pipe", None), n, f"steps:{n}")
    if ctx.dry_run:
        return None
    return Variant(f"steps:{n}", ctx.loaded.pipe, ctx.base_spec.replace(num_inference_steps=n, timesteps=None),
                   _n_params(ctx.loaded.denoiser))


def _int_arg(arg, form: str, lo: int = 1) -> int:
    try:
        n = int(arg)
        assert n >= lo
    except (TypeError, ValueError, AssertionError):
        raise UserError(f"{form} needs an integer >= {lo}, got {arg!r}") from None
    return n


def _steps_arg(arg, form: str, ctx: BenchContext, lo: int = 1) -> int:
    """A step count N of ``form`` (steps:N, dpm:N, ...), within the scheduler's training timesteps."""
    from diffslim.sample import check_steps

    n = _int_arg(arg, form, lo)
    check_steps(getattr(ctx.loaded, "pipe", None), n, form.replace("N", str(n), 1))
    return n


def _ratio_arg(text, form: str) -> float:
    """A share strictly between 0 and 1 (layers:R of params, dipgo:R, random:R and ga:R of MACs)."""
    try:
        r = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{form}: the ratio R must be a number in (0, 1), got {text!r}") from None
    if not 0 < r < 1:
        of = "params" if form.startswith("layers") else "MACs"
        raise UserError(f"{form}: the ratio R must lie in (0, 1), the share of {of} removed, e.g. 0.5; got {r:g}")
    return r


def _with_denoiser(pipe, module):
    """A shallow copy of ``pipe`` whose denoiser is ``module`` (the original pipeline is untouched)."""
    import copy

    from diffslim.apply import denoiser_attr

    new = copy.copy(pipe)
    setattr(new, denoiser_attr(pipe), module)
    return new


def sample_layer_sets(pipe, sets: dict, spec: SampleSpec, metrics_fn: Callable, progress: bool = False) -> dict:
    """The samples of ``pipe`` with each set of layers removed, judged against the full pipeline's on ``spec``.

    ``sets``: ``{key: [layer names]}`` (e.g. each criterion's selection at each ratio); identical sets are sampled
    once. ``metrics_fn(outputs, reference) -> dict`` as in :func:`run_bench`. Returns ``{key: metrics}``; the output
    loss of a selection is a proxy, and this is what it stands for.
    """
    from diffslim.methods.layer_prune import prune_layers
    from diffslim.models.load import denoiser_of

    denoiser = denoiser_of(pipe)
    reference = sample(pipe, spec, show_progress=progress, description="full model")
    done: dict = {}
    out = {}
    for key, names in sets.items():
        k = frozenset(names)
        if k not in done:
            pruned = prune_layers(denoiser, list(names))
            done[k] = metrics_fn(sample(_with_denoiser(pipe, pruned), spec, show_progress=progress,
                                        description=str(key)), reference)
        out[key] = dict(done[k])
    return out


def sample_layer_selections(pipe, res: dict, spec: SampleSpec, metrics_fn: Callable, progress: bool = False):
    """Sample every selection of a criteria comparison ``res`` (:func:`diffslim.methods.layer_compare.compare_criteria`)
    on ``spec`` and judge it against the full model's samples: adds ``<criterion>_sampled`` (the metrics) to its
    rows, ``random_sampled`` (PSNR and SSIM, the mean over the random seeds), ``sampled`` to its BK-SDM rows and
    ``res["sampled"] = {"n", "steps"}`` (by MACs, also ``output_loss_at_macs_sampled`` and
    ``output_loss_pairs_at_macs_sampled`` to the BK-SDM rows that have those sets). Returns ``(curves, bk_points)`` of the PSNR for
    :func:`diffslim.report.output_loss_figure`."""
    from diffslim.evaluate import finite
    from diffslim.methods.layer_compare import curves_of

    sets = {(i, k[: -len("_removed")]): v for i, row in enumerate(res["ratios"]) for k, v in row.items()
            if k.endswith("_removed")}
    sets.update({("bk", b["variant"]): b["removed"] for b in res["bk_sdm"]})
    # by MACs: the output-loss selections at BK-SDM's MACs and params too
    sets.update({(f"bk:{k}", b["variant"]): b[f"{k}_removed"] for b in res["bk_sdm"]
                 for k in ("output_loss_at_macs", "output_loss_pairs_at_macs") if f"{k}_removed" in b})
    for (i, key), m in sample_layer_sets(pipe, sets, spec, metrics_fn, progress=progress).items():
        m = {k: finite(v) for k, v in m.items()}
        if i == "bk":
            next(b for b in res["bk_sdm"] if b["variant"] == key)["sampled"] = m
        elif isinstance(i, str):
            next(b for b in res["bk_sdm"] if b["variant"] == key)[f"{i[3:]}_sampled"] = m
        else:
            res["ratios"][i][f"{key}_sampled"] = m
    for row in res["ratios"]:
        seeds = [row[k] for k in row if k.startswith("random#") and k.endswith("_sampled")]
        row["random_sampled"] = {k: (sum(s[k] for s in seeds) / len(seeds) if all(s.get(k) is not None for s in seeds)
                                     else None) for k in ("psnr", "ssim")}
    res["sampled"] = {"n": len(spec.inputs), "steps": spec.num_inference_steps}
    curves = {c: [(row["ratio"], row[f"{c}_sampled"]["psnr"]) for row in res["ratios"]
                  if row[f"{c}_sampled"].get("psnr") is not None] for c in curves_of(res)}
    x = "macs_ratio" if res.get("by") == "macs" else "ratio"
    bk = {b["variant"]: (b[x], b["sampled"]["psnr"]) for b in res["bk_sdm"] if b["sampled"].get("psnr") is not None}
    return curves, bk


def sample_with_adapters(model: str, methods: str, spec: SampleSpec, lora: Optional[dict] = None,
                         ip_adapter: Optional[dict] = None) -> dict:
    """Sample each bench method's model of ``model`` (a pipeline folder or ``zoo:NAME``) on ``spec``, with the LoRA
    ``lora`` (a PEFT state dict of the original denoiser, keys without the pipeline prefix) adapted to it by
    :func:`diffslim.lora.adapt_lora`, and/or the IP-Adapter ``ip_adapter`` of the original denoiser (nested
    ``{"image_proj", "ip_adapter"}``) loaded as it is (the pruned classes renumber it), or with neither. Each model
    is built from a fresh load by the method's own builder, as the bench builds it (a pruned model is selected and
    trained without the adapters; PEFT then wraps the modules of that model only). Returns ``{method: {"outputs":
    (N, C, H, W), "params", "lora_modules_kept", "lora_modules_dropped", "ip_processors"}}``."""
    from diffslim.apply import denoiser_attr
    from diffslim.lora import adapt_lora
    from diffslim.models.load import load

    out = {}
    for name, arg in parse_methods(methods):
        loaded = load(model)
        loaded.pipe.set_progress_bar_config(disable=True)
        default = loaded.zoo.default_steps if loaded.zoo else 50
        variant = METHODS[name](arg, BenchContext(loaded, spec, default))
        pipe = variant.pipe
        pipe.set_progress_bar_config(disable=True)
        den = getattr(pipe, denoiser_attr(pipe))
        row = {"params": _n_params(den)}
        if lora is not None:
            res = adapt_lora(den, lora)
            den.load_lora_adapter(res.state_dict, prefix=None, adapter_name="lora", metadata=res.config)
            row.update(lora_modules_kept=len(res.kept), lora_modules_dropped=sum(len(v) for v in res.dropped.values()))
        if ip_adapter is not None:
            import copy

            den._load_ip_adapter_weights([copy.deepcopy(ip_adapter)], low_cpu_mem_usage=False)
            row["ip_processors"] = sum(hasattr(p, "to_k_ip") for p in den.attn_processors.values())
        row["outputs"] = sample(pipe, variant.spec)
        out[variant.method] = row
    return out


@register_method("depth", "depth:N, depth-skip pruning at depth N (Kim and Cho 2024); depth:N+ft fine-tuned by a "
                          "short default run (cached), depth:N+ft@FOLDER from a fine-tuned student folder")
def _depth(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.depth_skip import depth_skip, removed_modules

    text = arg or ""
    ft_path = None
    ft = "+ft" in text
    if "+ft@" in text:
        text, _, ft_path = text.partition("+ft@")
    else:
        text = text.replace("+ft", "")
    n = _int_arg(text, "depth:N")
    removed_modules(ctx.loaded.denoiser, n)  # validates the depth
    if ft_path is not None and not Path(ft_path).is_dir():
        raise UserError(f"depth:{arg}: no fine-tuned student folder at {ft_path}")
    if ft and ft_path is None:
        ctx.needs_data(f"depth:{arg}")
    if ctx.dry_run:
        return None
    if not ft:
        pruned = depth_skip(ctx.loaded.denoiser, n)
        return Variant(f"depth:{n}", _with_denoiser(ctx.loaded.pipe, pruned), ctx.base_spec, _n_params(pruned))
    notes = f"student from {ft_path}"
    if ft_path is None:
        ft_path, notes = _default_finetune(ctx, n)
    student = _placed_student(ft_path, ctx)
    if getattr(student.config, "depth_skip", None) != n:
        raise UserError(f"depth:{arg}: the student at {ft_path} has depth {getattr(student.config, 'depth_skip', None)}")
    return Variant(f"depth:{n}+ft", _with_denoiser(ctx.loaded.pipe, student), ctx.base_spec, _n_params(student),
                   notes=notes)


def _placed_student(folder, ctx: BenchContext):
    """A trained student from its folder, on the device and in the dtype of the pipeline it joins (a float32
    student in a bfloat16 pipeline got its inputs in bfloat16 and failed, or ran in float32 beside the rest)."""
    from diffslim.methods.finetune import load_student

    weight = next(ctx.loaded.denoiser.parameters())
    return load_student(folder).to(device=weight.device, dtype=weight.dtype)


@register_method("mdepth", "mdepth:T=D[/T=D...], multi-depth: timesteps >= T run at depth D (highest T first), "
                           "the rest at full depth, e.g. mdepth:500=7")
def _mdepth(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.depth_skip import depth_skip, max_depth, multi_depth, removed_modules

    ranges = []
    for part in (arg or "").split("/"):
        t, _, d = part.partition("=")
        t, d = _int_arg(t, "mdepth:T=D (T)", lo=0), _int_arg(d, "mdepth:T=D (D)")
        if t > 999:
            raise UserError(f"mdepth:{arg}: timestep {t} is outside 0..999")
        removed_modules(ctx.loaded.denoiser, d)
        ranges.append((t, d))
    if ctx.dry_run:
        return None
    # a full-depth copy that shares the weights, so the router does not touch the loaded model
    routed = multi_depth(depth_skip(ctx.loaded.denoiser, max_depth(ctx.loaded.denoiser)), ranges)
    return Variant(f"mdepth:{arg}", _with_denoiser(ctx.loaded.pipe, routed), ctx.base_spec, _n_params(routed),
                   notes="full weights kept; each step runs its range's depth")


DEFAULT_FT = dict(steps=300, batch_size=32, lr=2e-4)


def _per_process(settings: dict) -> tuple[dict, str]:
    """A cached training's settings for each process of a launch, and the words for the note: the batch is split
    among the processes (rounded up), so that a launch trains with about the batch one process does."""
    world = world_size()
    if world <= 1:
        return dict(settings), ""
    each = -(-settings["batch_size"] // world)
    return dict(settings, batch_size=each), f" over {world} processes, {each} each"


def _launch_key(key: str) -> str:
    """A cached training's folder name: a launch of N processes draws its noise otherwise than one process does, so
    its run is an entry of its own."""
    world = world_size()
    return key if world <= 1 else f"{key}-x{world}"


def check_task_weight(weight: Optional[float]) -> Optional[float]:
    """A task-loss weight for ``+kd``/``+ft`` training: a finite number >= 0, or None for
    :func:`default_task_weight`; else a :class:`UserError`."""
    import math

    if weight is None:
        return None
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise UserError(f"--kd-task-weight {weight!r}: give a number >= 0 (1: the papers' loss; 0: distillation only)")
    return float(weight)


def has_training_data(loaded, data: str = "zoo") -> bool:
    """Whether ``+kd``/``+ft`` have training data: a ``data`` folder, or the zoo task's own for a zoo model."""
    from diffslim.zoo.pipelines import ZooClassPipeline, ZooSRPipeline

    return data != "zoo" or getattr(loaded, "zoo", None) is not None or isinstance(
        getattr(loaded, "pipe", None), (ZooClassPipeline, ZooSRPipeline))


def default_task_weight(loaded, data: str = "zoo") -> float:
    """The task loss's weight when none is given (``train.distill.default_task_weight``): 1 on training data, 0 for
    a consistency model and on the images the full pipeline samples itself."""
    from diffslim.train.distill import default_task_weight as weight

    return weight(getattr(loaded, "pipe", None), has_training_data(loaded, data))


def _default_finetune(ctx: BenchContext, depth: int):
    """The short default fine-tuning run of ``depth:N+ft``, cached by model, depth and settings."""
    import hashlib

    from diffslim.methods.finetune import finetune_depth
    from diffslim.sample import model_fingerprint
    from diffslim.train.distill import DistillConfig

    train_data, data = ctx.train_data(f"depth:{depth}+ft")
    size = ctx.train_size()  # (before session 38 +ft trained at the pipeline's size whatever the --resolution)
    key = hashlib.sha256(f"{model_fingerprint(ctx.loaded.source)}|{depth}|{sorted(DEFAULT_FT.items())}{data}"
                         f"{ctx.train_key()}{'' if size is None else f'|size={size}'}".encode()).hexdigest()[:16]
    settings, launch = _per_process(DEFAULT_FT)
    root = cache_root() / "finetune" / _launch_key(key)
    folder = root / "student"

    def build():
        cfg = DistillConfig(out=root, checkpoint_every=100, log_every=25, normalized=False,
                            lambda_task=ctx.task_weight, **settings)
        finetune_depth(ctx.loaded.pipe, depth, train_data, cfg, size=ctx.train_size())

    build_once(root, f"the depth:{depth}+ft fine-tune", lambda: (folder / "config.json").exists(), build)
    return folder, (f"fine-tuned {DEFAULT_FT['steps']} steps (batch {DEFAULT_FT['batch_size']}{launch}, lr "
                    f"{DEFAULT_FT['lr']}) with {ctx.train_note('feature')}{ctx.train_data_note()}; cached at {root}")


def _explicit_schedule_variant(method: str, ctx: BenchContext, timesteps, notes: str = "") -> Variant:
    from diffslim.methods.timestep_search import explicit_timesteps
    from diffslim.methods.timesteps import validate_timesteps

    ts = validate_timesteps(list(timesteps))
    pipe = ctx.loaded.pipe
    stack = explicit_timesteps(pipe)
    stack.__enter__()
    return Variant(method, pipe, ctx.base_spec.replace(timesteps=ts, num_inference_steps=None),
                   _n_params(ctx.loaded.denoiser), notes=(notes + "; " if notes else "") + f"timesteps {ts}",
                   cleanup=lambda: stack.__exit__(None, None, None))


def calibration_spec(ctx: BenchContext, n: int = 8) -> SampleSpec:
    """Calibration inputs for searches inside the bench: the first ``n`` inputs with other seeds, so a
    search never sees the evaluation samples it is then graded on."""
    base = ctx.base_spec
    k = min(n, len(base.inputs))
    return base.replace(inputs=base.inputs[:k], seeds=[s + 100_000 for s in base.seeds[:k]], batch_size=k)


@register_method("gamma", "gamma:N (gamma searched on calibration inputs) or gamma:N:G, the gamma-curve N-step schedule")
def _gamma(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.timesteps import gamma_timesteps

    steps_s, _, g = (arg or "").partition(":")
    n = _steps_arg(steps_s, "gamma:N", ctx, lo=2)
    if g:
        try:
            gamma = float(g)
            ts = gamma_timesteps(n, gamma)
        except ValueError as e:
            raise UserError(f"gamma:{arg}: {e}") from None
        if ctx.dry_run:
            return None
        return _explicit_schedule_variant(f"gamma:{n}:{gamma:g}", ctx, ts, f"gamma {gamma:g}")
    if ctx.dry_run:
        return None
    from diffslim.methods.timestep_search import search_gamma

    calib = calibration_spec(ctx)
    ref = sample(ctx.loaded.pipe, calib.replace(num_inference_steps=ctx.default_steps))
    res = search_gamma(ctx.loaded.pipe, calib, ref, n)
    return _explicit_schedule_variant(f"gamma:{n}", ctx, res.timesteps,
                                      f"gamma {res.best.best_gamma:.3f} found by {res.best_method} search in "
                                      f"{res.best.n_evals} evaluations ({res.best.seconds:.1f}s)")


@register_method("evo", "evo:N[:BUDGET], evolutionary search over N-step timestep sets on calibration inputs "
                        "(AutoDiffusion-style baseline; default budget 24 evaluations)")
def _evo(arg, ctx: BenchContext) -> Variant:
    steps_s, _, budget_s = (arg or "").partition(":")
    n = _steps_arg(steps_s, "evo:N", ctx, lo=2)
    budget = _int_arg(budget_s, "evo:N:BUDGET") if budget_s else 24
    if ctx.dry_run:
        return None
    from diffslim.methods.timestep_search import evolutionary_timesteps, schedule_psnr

    calib = calibration_spec(ctx)
    ref = sample(ctx.loaded.pipe, calib.replace(num_inference_steps=ctx.default_steps))
    res = evolutionary_timesteps(lambda ts: schedule_psnr(ctx.loaded.pipe, calib, ref, ts), n, budget=budget)
    return _explicit_schedule_variant(f"evo:{n}", ctx, res.best_timesteps,
                                      f"evolutionary search: {res.n_evals} evaluations ({res.seconds:.1f}s)")


@register_method("uniform", "uniform:N[:leading|trailing|linspace], evenly spaced N-step schedule (default linspace)")
def _uniform(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.timesteps import uniform_timesteps

    steps_s, _, spacing = (arg or "").partition(":")
    n = _steps_arg(steps_s, "uniform:N", ctx)
    spacing = spacing or "linspace"
    try:
        ts = uniform_timesteps(n, spacing)
    except ValueError as e:
        raise UserError(f"uniform:{arg}: {e}") from None
    if ctx.dry_run:
        return None
    return _explicit_schedule_variant(f"uniform:{n}" + (f":{spacing}" if spacing != "linspace" else ""), ctx, ts)


@register_method("karras", "karras:N, the timesteps of Karras et al.'s sigma spacing (rho 7), same sampler")
def _karras(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.timesteps import karras_timesteps

    n = _steps_arg(arg, "karras:N", ctx, lo=2)
    try:
        ts = karras_timesteps(n, ctx.loaded.pipe.scheduler.alphas_cumprod)
    except ValueError as e:
        raise UserError(f"karras:{arg}: {e}") from None
    if ctx.dry_run:
        return None
    return _explicit_schedule_variant(f"karras:{n}", ctx, ts)


@register_method("ays", "ays:N, Align Your Steps (diffusers' AysSchedules; SD-1.5 table for SD-1.x noise schedules)")
def _ays(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.timesteps import ays_timesteps

    n = _steps_arg(arg, "ays:N", ctx, lo=2)
    family = "sdxl" if type(ctx.loaded.denoiser).__name__.endswith("UNet2DConditionModel") and \
        getattr(ctx.loaded.denoiser.config, "addition_embed_type", None) == "text_time" else "sd15"
    try:
        ts = ays_timesteps(n, family)
    except ValueError as e:
        raise UserError(f"ays:{arg}: {e}") from None
    if ctx.dry_run:
        return None
    return _explicit_schedule_variant(f"ays:{n}", ctx, ts, f"AYS {family} table, {ts}")


def _scheduler_fits(ctx: BenchContext, name: str) -> None:
    """Refuse, before anything samples, a method whose scheduler the pipeline cannot sample with (an LCM's)."""
    from diffslim.sample import check_pipeline_takes, make_scheduler

    pipe = getattr(ctx.loaded, "pipe", None)
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        check_pipeline_takes(pipe, name, make_scheduler(name, pipe.scheduler.config))


@register_method("dpm", "dpm:N, DPM-Solver++ (2M) with N steps at diffusers' default spacing (the reference for xue:N)")
def _dpm(arg, ctx: BenchContext) -> Variant:
    n = _steps_arg(arg, "dpm:N", ctx, lo=2)
    _scheduler_fits(ctx, "dpm++")
    if ctx.dry_run:
        return None
    return Variant(f"dpm:{n}", ctx.loaded.pipe, ctx.base_spec.replace(scheduler="dpm++", num_inference_steps=n,
                                                                      timesteps=None),
                   _n_params(ctx.loaded.denoiser), notes="DPM-Solver++ 2M, default spacing")


@register_method("xue", "xue:N, DPM-Solver++ (2M) on N solver-aware optimised time steps (Xue et al., CVPR 2024; "
                        "no sampling)")
def _xue(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.timesteps import solver_aware_timesteps

    n = _steps_arg(arg, "xue:N", ctx, lo=2)
    _scheduler_fits(ctx, "dpm++")
    if ctx.dry_run:
        return None
    try:
        ts, info = solver_aware_timesteps(n, ctx.loaded.pipe.scheduler.alphas_cumprod)
    except ValueError as e:
        raise UserError(f"xue:{arg}: {e}") from None
    return Variant(f"xue:{n}", ctx.loaded.pipe, ctx.base_spec.replace(scheduler="dpm++", timesteps=ts,
                                                                      num_inference_steps=None),
                   _n_params(ctx.loaded.denoiser),
                   notes=f"DPM-Solver++ 2M, optimised in {info['seconds']:.1f}s without sampling "
                         f"(bound {info['init_bound']:.2f} -> {info['bound']:.2f}); timesteps {ts}")


# ------------------------------------------------------------------------------------------
# Layer pruning (LAPTOP-Diff) and BK-SDM: methods.layer_prune

DEFAULT_KD = dict(steps=300, batch_size=32, lr=2e-4, match_plain_weight=True)
# images a text-to-image pipeline without --data samples from the bench's prompts to train +kd and +ft on
TEACHER_SAMPLES = 64
LAYER_CALIB = dict(n=32, seed=0)  # the layer criteria's calibration by default


# the criterion a ``layers:R:NAME`` variant selects by (``layers:R`` alone: the paper's output loss)
LAYER_VARIANTS = {"": "output-loss", "pairs": "output-loss-pairs", "similarity": "similarity", "taylor": "taylor",
                  "magnitude": "magnitude", "random": "random", "greedy": "greedy", "stock": "output-loss"}
# variants whose selection is made among the removals a stock config describes, and whose model is the stock class
STOCK_VARIANTS = ("stock",)
# the criteria a ``layers:R:[CRITERION:]macs[:P]`` variant selects by, R a share of the MACs (the denoiser's, counted on
# the pipeline's own call) instead of the params, P a cap on the share of params removed
MACS_CRITERIA = ("", "pairs", "similarity", "taylor", "magnitude", "random")


def layer_variant(text: str, ratio: str = "R") -> tuple[str, str, Optional[float]]:
    """``(criterion key, by, max_params)`` of the ``VARIANT`` in ``layers:R:VARIANT`` (``ratio``: what stands for R
    in messages, e.g. ``auto``): ``CRITERION`` (a key of :data:`LAYER_VARIANTS`), or ``[CRITERION:]macs[:P]``: R a
    share of the MACs, at most a share P of the params removed."""
    tokens = text.split(":")
    by, max_params, key = "params", None, text
    if "macs" in tokens:
        at = tokens.index("macs")
        key, cap, by = ":".join(tokens[:at]), ":".join(tokens[at + 1:]), "macs"
        if key not in MACS_CRITERIA:
            raise UserError(f"layers:{ratio}:{text}: a selection by MACs takes the criteria "
                            f"{', '.join(repr(k) for k in MACS_CRITERIA)} (layers:{ratio}:macs, "
                            f"layers:{ratio}:pairs:macs, ...), not {key!r}")
        if cap:
            from diffslim.methods.layer_prune import check_max_params

            try:
                max_params = float(cap)
            except ValueError:
                raise UserError(f"layers:{ratio}:{text}: the cap on the params removed must be a number in (0, 1), "
                                f"e.g. layers:{ratio}:macs:0.35") from None
            check_max_params(max_params)
    if key not in LAYER_VARIANTS:
        raise UserError(f"layers:{ratio}:{key} is not a criterion; accepted: layers:{ratio}, "
                        + ", ".join(f"layers:{ratio}:{v}" for v in LAYER_VARIANTS if v)
                        + f", layers:{ratio}:[CRITERION:]macs[:P] (each +kd)")
    return key, by, max_params


def _layer_macs(ctx: BenchContext) -> tuple[list, int, int]:
    """The denoiser's removable layers with the MACs each one's removal saves, the MACs and the params of the
    denoiser, counted on the pipeline's own denoiser call (attention grows with the tokens: at the size the pipeline
    uses). Counted once per bench."""
    if ("layer_macs",) not in ctx.memo:
        from diffslim.methods.layer_prune import candidate_names, candidates
        from diffslim.models.anatomy import anatomy
        from diffslim.sample import first_denoiser_call

        den = ctx.loaded.denoiser
        an = anatomy(den, inputs=first_denoiser_call(ctx.loaded.pipe, ctx.base_spec))
        ctx.memo[("layer_macs",)] = (candidates(den, module_macs=an.module_macs, names=candidate_names(den)),
                                     an.macs, an.params)
    return ctx.memo[("layer_macs",)]


def _check_layer_cap(arg: Optional[str], ctx: BenchContext) -> None:
    """Refuse a ``layers:R:...macs:P`` whose cap no set of layers meets at R, before the bench samples any row (the
    reach depends on the layers' costs only, not on their scores)."""
    from diffslim.methods.layer_prune import select

    core = (arg or "").removesuffix("+kd")
    ratio_text, _, variant = core.partition(":")
    _, by, max_params = layer_variant(variant)
    if max_params is None or ratio_text == "auto":
        return
    layers, total, params = _layer_macs(ctx)
    select(layers, dict.fromkeys((l.name for l in layers), 0.0), _ratio_arg(ratio_text, "layers:R"), total, by,
           (max_params, params))


def _layer_selection(ctx: BenchContext, ratio: float, criterion: str = "output-loss", stock: bool = False,
                     by: str = "params", max_params: Optional[float] = None) -> list[str]:
    """The layers ``criterion`` removes at ``ratio`` of ``by`` (params or MACs), scored on the model's training
    data (one-shot criteria score once for every ratio; ``output-loss-pairs`` and ``greedy`` select per ratio).
    ``stock``: among the removals a stock config describes (on a U-Net; transformers keep what their stock config
    needs). ``max_params`` (by MACs): remove at most that share of the params too."""
    from diffslim.methods.layer_prune import is_unet, layer_prune, select, stock_keeps, stock_select

    if by == "macs":  # one-shot scores, selected by the MACs each layer's removal saves in the pipeline's own call
        first = ctx.memo.get(("layer_scores", criterion))
        if first is None:
            _layer_selection(ctx, ratio, criterion)
            first = ctx.memo[("layer_scores", criterion)]
        den = ctx.loaded.denoiser
        layers, total, _ = _layer_macs(ctx)  # the same candidates as the scores' (the default pool)
        cap = None if max_params is None else (max_params, first.params)
        if criterion == "output-loss-pairs":  # the single and pair losses of one pass, selected by MACs
            from diffslim.methods.layer_prune import pairs_select

            calib, ref = ctx.memo[("layer_calib", criterion)]
            inter = {tuple(x["layers"]): x["interaction"] for x in first.extra["interactions"]}
            return pairs_select(den, layers, calib, first.scores, inter, ratio, total, "macs", reference=ref,
                                max_params=cap)[0]
        return select(layers, first.scores, ratio, total, "macs", max_params=cap)

    if stock:
        first = ctx.memo.get(("layer_scores", criterion))
        if first is None:
            _layer_selection(ctx, ratio, criterion)  # scores every layer once, for every ratio and both selections
            first = ctx.memo[("layer_scores", criterion)]
        den = ctx.loaded.denoiser
        if is_unet(den):
            return stock_select(den, first.layers, first.scores, ratio, first.params, first.by)
        keep = set(stock_keeps(den))
        return select([l for l in first.layers if l.name not in keep], first.scores, ratio, first.params, first.by)

    first = ctx.memo.get(("layer_scores", criterion))
    if first is not None and criterion == "output-loss-pairs":  # the single and pair losses of one pass
        from diffslim.methods.layer_prune import pairs_select

        calib, ref = ctx.memo[("layer_calib", criterion)]
        inter = {tuple(x["layers"]): x["interaction"] for x in first.extra["interactions"]}
        return pairs_select(ctx.loaded.denoiser, first.layers, calib, first.scores, inter, ratio, first.params,
                            first.by, reference=ref)[0]
    if first is not None:  # one-shot: the scores of one pass serve every ratio
        return select(first.layers, first.scores, ratio, first.params, first.by)
    calib = _layer_calibration(ctx)
    result = layer_prune(ctx.loaded.denoiser, criterion, ratio, calib=calib, progress=ctx.progress)
    if criterion != "greedy":  # greedy re-scores after each removal: its order depends on the ratio's target
        ctx.memo[("layer_scores", criterion)] = result
    if criterion == "output-loss-pairs":
        ctx.memo[("layer_calib", criterion)] = (calib, calib.run(ctx.loaded.denoiser))
    return result.removed


def _calib_n(ctx: BenchContext) -> int:
    return ctx.layer_calibration or LAYER_CALIB["n"]


def _layer_calibration(ctx: BenchContext):
    """The layer criteria's calibration triples: the training data noised (the paper's), or, on a model without
    data (a user's text-to-image pipeline and no --data), the calls the pipeline makes to its denoiser while sampling
    the bench's calibration inputs (its prompts with other seeds than evaluation's)."""
    from diffslim.methods.layer_prune import calibration, sampling_calibration

    if ctx.has_data():
        return calibration(ctx.loaded.pipe, data=ctx.data, size=ctx.resolution, n=_calib_n(ctx),
                           seed=LAYER_CALIB["seed"])
    spec = calibration_spec(ctx, n=_calib_n(ctx))
    return sampling_calibration(ctx.loaded.pipe, inputs=spec.inputs, steps=spec.num_inference_steps or ctx.default_steps,
                                call_kwargs=spec.call_kwargs, sample_batch=spec.batch_size, progress=ctx.progress,
                                n=_calib_n(ctx), seed=LAYER_CALIB["seed"])


def _layer_calibration_note(ctx: BenchContext) -> str:
    n = _calib_n(ctx)
    return (f"{n} calibration triple{'s' if n != 1 else ''}" if ctx.has_data() else
            f"calibrated on {n} of the pipeline's own denoiser calls while sampling its inputs "
            "(no --data)")


def _default_layer_kd(ctx: BenchContext, names: list[str]):
    """The short normalized distillation of ``layers:R+kd``, cached by model, layers and settings."""
    import hashlib

    from diffslim.methods.layer_prune import distill_pruned, prune_layers
    from diffslim.sample import model_fingerprint
    from diffslim.train.distill import DistillConfig

    train_data, data = ctx.train_data("layers+kd")
    # (before session 38 the full pipeline's own samples trained at the pipeline's size whatever their own)
    size = "" if ctx.has_data() or ctx.train_size() is None else f"|size={ctx.train_size()}"
    key = hashlib.sha256(f"{model_fingerprint(ctx.loaded.source)}|{sorted(names)}|{sorted(DEFAULT_KD.items())}{data}"
                         f"{ctx.train_key()}{size}".encode()).hexdigest()[:16]
    settings, launch = _per_process(DEFAULT_KD)
    root = cache_root() / "layer_kd" / _launch_key(key)
    folder = root / "student"

    def build():
        cfg = DistillConfig(out=root, checkpoint_every=100, log_every=25, normalized=True,
                            lambda_task=ctx.task_weight, **settings)
        distill_pruned(ctx.loaded.pipe, prune_layers(ctx.loaded.denoiser, names), cfg, data=train_data,
                       size=ctx.train_size())

    build_once(root, "the layers+kd distillation", lambda: (folder / "config.json").exists(), build)
    return folder, (f"{DEFAULT_KD['steps']} steps of {ctx.train_note('normalized feature')} (batch "
                    f"{DEFAULT_KD['batch_size']}{launch}, lr {DEFAULT_KD['lr']}, feature weight matched to the plain "
                    f"sum){ctx.train_data_note()}; cached at {root}")


@register_method("layers", "layers:R, one-shot layer pruning (LAPTOP-Diff output-loss criterion) removing a share R "
                           "of params; layers:R:pairs by the second-order output loss (output-loss-pairs), "
                           "layers:R:similarity|taylor|magnitude|random|greedy by the other criteria; "
                           "layers:R:stock by output loss among removals a stock config describes (the model "
                           "is the stock diffusers class); layers:R:macs by output loss, R a share of the MACs "
                           "instead of the params (layers:R:macs:P: removing at most a share P of the params; "
                           "layers:R:CRITERION:macs[:P] by another criterion); +kd after a short normalized "
                           "distillation (cached), e.g. layers:0.5+kd")
def _layers(arg, ctx: BenchContext) -> Variant:
    text = arg or ""
    kd = text.endswith("+kd")
    core = text[:-3] if kd else text
    if "+" in core:
        raise UserError(f"layers:{text}: the only suffix layers:R takes is one +kd (a short distillation), at the end; "
                        "e.g. layers:0.5+kd or layers:0.5:macs+kd")
    ratio_text, _, variant = core.partition(":")
    variant, by, max_params = layer_variant(variant, "R")
    ratio = _ratio_arg(ratio_text, "layers:R")
    criterion = LAYER_VARIANTS[variant]
    tag = "".join(f":{t}" for t in (variant, "macs" if by == "macs" else "",
                                     "" if max_params is None else f"{max_params:g}") if t)
    stock = variant in STOCK_VARIANTS
    if ctx.dry_run:
        from diffslim.methods.layer_prune import check_controlnet_fits, check_prunable, check_stock_selection

        check_prunable(ctx.loaded.denoiser)  # before the full model samples
        if stock:
            check_stock_selection(ctx.loaded.denoiser, criterion)
            check_controlnet_fits(ctx.loaded.pipe)
        if kd:
            ctx.needs_data(f"layers:{arg}")
        return None
    from diffslim.methods.layer_prune import check_controlnet_fits, prune_layers, stock_model

    names = _layer_selection(ctx, ratio, criterion, stock=stock, by=by, max_params=max_params)
    how = {"output-loss": "output loss", "output-loss-pairs": "output loss to second order"}.get(criterion,
                                                                                                 f"{criterion} criterion")
    note = (f"{len(names)} layers removed ({how}{', among removals a stock config describes' if stock else ''}"
            f"{', a share of the MACs' if by == 'macs' else ''}"
            f"{'' if max_params is None else f', at most {max_params:g} of the params'}, "
            f"{_layer_calibration_note(ctx)})")
    if stock and getattr(ctx.loaded.pipe, "controlnet", None) is not None:  # before any distillation or sampling
        check_controlnet_fits(ctx.loaded.pipe, stock_model(prune_layers(ctx.loaded.denoiser, names)))
    # the stock class computes what the LayerPruned model does, bit for bit; a workflow saves it as that class
    as_model = stock_model if stock else (lambda m: m)

    if not kd:
        pruned = as_model(prune_layers(ctx.loaded.denoiser, names))
        return Variant(f"layers:{ratio:g}{tag}", _with_denoiser(ctx.loaded.pipe, pruned), ctx.base_spec,
                       _n_params(pruned), notes=note + ("; the stock class" if stock else "")
                       + f"; not retrained (layers:{ratio:g}{tag}+kd distils it)")
    folder, kd_note = _default_layer_kd(ctx, names)  # distilled as the LayerPruned model, then exported
    student = as_model(_placed_student(folder, ctx))
    return Variant(f"layers:{ratio:g}{tag}+kd", _with_denoiser(ctx.loaded.pipe, student), ctx.base_spec,
                   _n_params(student), notes=f"{note}; {kd_note}")


@register_method("bk-sdm", "bk-sdm:base|small|tiny, BK-SDM's handcrafted block removal (SD-shaped U-Nets), "
                           "before retraining; +kd after the same distillation as layers:R+kd (cached), "
                           "e.g. bk-sdm:base+kd")
def _bk_sdm(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.layer_prune import BK_SDM, bk_sdm_layers, prune_layers

    text = arg or ""
    kd = text.endswith("+kd")
    variant = text[:-3] if kd else text
    if variant not in BK_SDM:
        raise UserError(f"bk-sdm:VARIANT needs one of {', '.join(BK_SDM)} (each +kd), got {arg!r}")
    names = bk_sdm_layers(ctx.loaded.denoiser, variant)  # validates the U-Net's shape
    if ctx.dry_run:
        if kd:
            ctx.needs_data(f"bk-sdm:{arg}")
        return None
    note = f"{len(names)} modules removed"
    if not kd:
        pruned = prune_layers(ctx.loaded.denoiser, names)
        return Variant(f"bk-sdm:{variant}", _with_denoiser(ctx.loaded.pipe, pruned), ctx.base_spec,
                       _n_params(pruned), notes=f"{note}; removal only, not retrained (BK-SDM retrains: "
                                                f"bk-sdm:{variant}+kd distils it)")
    # the same trainer, loss and steps as layers:R+kd: the rows compare the removals, not the retraining
    folder, kd_note = _default_layer_kd(ctx, names)
    student = _placed_student(folder, ctx)
    return Variant(f"bk-sdm:{variant}+kd", _with_denoiser(ctx.loaded.pipe, student), ctx.base_spec,
                   _n_params(student), notes=f"{note}; {kd_note}")


# ---------------------------------------------------------------------------------------------------
# Skip plans (issue 5): DiP-GO, DeepCache, random search, genetic algorithm, diffusers' caches.
# Builders stay thin; the logic is in diffslim.methods.skip_plan and diffslim.methods.dipgo.

DIPGO_VERSION = 3
# the floor annealed over the whole run, the best-validating plan of each run, the best of 3 seeds (not in the
# paper; see diffslim.methods.dipgo): on the zoo the paper's schedule depends on its seed by several dB
DEFAULT_DIPGO = dict(iters=30, batch_size=2, lr=2e-3, gradient_checkpointing=False, anneal=30, select=8, restarts=3)
# random search and the GA get as many plan evaluations, on as many calibration inputs, as DiP-GO validates
SEARCH_BUDGET = DEFAULT_DIPGO["iters"] * DEFAULT_DIPGO["restarts"]
SEARCH_INPUTS = DEFAULT_DIPGO["select"]


def _plan_scheduler_check(ctx: BenchContext, steps: int) -> None:
    from diffslim.methods.skip_plan import check_scheduler
    from diffslim.sample import make_scheduler

    name = ctx.base_spec.scheduler
    sched = make_scheduler(name, ctx.loaded.pipe.scheduler.config) if name else ctx.loaded.pipe.scheduler
    check_scheduler(sched, steps, steps, name or "")


def _bench_units(ctx: BenchContext, granularity: str):
    """The plan units with MACs measured on the denoiser call the bench's own inputs make (its size,
    context and guidance batch), so plan MACs ratios agree with the rows' counted ``macs_ratio``."""
    from diffslim.methods.skip_plan import plan_units_at

    return plan_units_at(ctx.loaded.pipe, ctx.base_spec, granularity)


def _plan_variant(method: str, ctx: BenchContext, plan, units, notes: str = "") -> Variant:
    """A variant that samples the loaded pipeline with ``plan`` installed (removed again after the row)."""
    import numpy as np

    from diffslim.methods.skip_plan import apply_skip_plan, plan_macs_ratio, remove_skip_plan

    den = ctx.loaded.denoiser
    rt = apply_skip_plan(den, plan, units)
    one = ctx.base_spec.replace(inputs=ctx.base_spec.inputs[:1], seeds=ctx.base_spec.seeds[:1], batch_size=1)
    run_pipeline(ctx.loaded.pipe, one, [0])
    kib = rt.peak_cache_bytes() / 1024
    calls = min(len(plan), calls_in_run(ctx.loaded.pipe, one))  # img2img below strength 1: the first rows run
    share = f" over the {calls} of its {len(plan)} steps the run makes" if calls < len(plan) else ""
    notes = (notes + "; " if notes else "") + (f"plan MACs ratio {plan_macs_ratio(plan, units, calls):.3f} "
                                               f"(denoiser{share}); caches {kib:.1f} KiB per sample")
    section = {"granularity": units.granularity, "units": list(units.names),
               "plan": np.asarray(plan, dtype=bool).tolist(), "scheduler": ctx.base_spec.scheduler,
               "provenance": {"method": method}}
    return Variant(method, ctx.loaded.pipe, ctx.base_spec, _n_params(den), notes=notes,
                   cleanup=lambda: remove_skip_plan(den), recipe={"skip_plan": section})


def _default_dipgo(ctx: BenchContext, ratio: float, **overrides):
    """The short default DiP-GO run of ``dipgo:R``, cached on disk by model, ratio, settings and data.

    Zoo pipelines train on their task's data; other pipelines on the bench's inputs with other noise seeds.
    """
    import hashlib
    import json

    import numpy as np

    from diffslim.methods.dipgo import DipgoConfig, plan_from_scores, train_dipgo
    from diffslim.methods.skip_plan import pad_plan
    from diffslim.sample import model_fingerprint

    from diffslim.zoo.pipelines import ZooClassPipeline, ZooSRPipeline

    settings = dict(DEFAULT_DIPGO, **overrides)
    steps, sched = ctx.default_steps, ctx.base_spec.scheduler
    # zoo pipelines train on their task's data; any other pipeline on the bench's own inputs (prompts),
    # with other noise seeds than the evaluation's
    zoo = isinstance(ctx.loaded.pipe, (ZooClassPipeline, ZooSRPipeline))
    pool = None if zoo else list(ctx.base_spec.inputs)
    data_key = "zoo" if zoo else ctx.base_spec.digest()
    # DIPGO_VERSION changes whenever the training changes, so that no stale cached run is reused
    units = _bench_units(ctx, settings.get("granularity", "fine"))
    # the ratio is in the key: it sets the pruner's sparsity floor, its starting plan and its validation
    # a run of fewer calls than steps (img2img below strength 1) trains a plan of those rows since session 27
    calls = steps if zoo else min(steps, denoiser_calls_per_run(ctx.loaded.pipe, ctx.base_spec))
    key = hashlib.sha256(f"{DIPGO_VERSION}|{model_fingerprint(ctx.loaded.source)}|{ratio!r}|{steps}|{sched}|"
                         f"{sorted(settings.items())}|{data_key}|{units.macs}|{units.outside_macs}"
                         f"{'' if calls == steps else f'|rows={calls}'}".encode()).hexdigest()[:16]
    per_process, launch = _per_process(settings)
    root = cache_root() / "dipgo" / _launch_key(key)
    meta = root / "train.json"

    def build():
        cfg = DipgoConfig(ratio=ratio, num_inference_steps=steps, scheduler=sched, out=str(root),
                          progress=True, call_kwargs=dict(ctx.base_spec.call_kwargs), **per_process)
        res = train_dipgo(ctx.loaded.pipe, cfg, units, pool=pool)
        if is_first():
            tmp = meta.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"seconds": res.seconds, "log": res.log}))
            os.replace(tmp, meta)

    reused = not build_once(root, f"the dipgo:{ratio:g} training", meta.exists, build)
    info = json.loads(meta.read_text())
    scores = np.load(root / "scores.npy")
    plan = pad_plan(plan_from_scores(scores, units, ratio), steps)  # img2img below strength 1: rows no call reaches
    runs = settings.get("restarts", 1)
    notes = (f"DiP-GO pruner trained {settings['iters']} steps (batch {settings['batch_size']}{launch}, "
             f"{settings.get('objective', 'unrolled')}" + (f", best of {runs} seeds" if runs > 1 else "") +
             (f" on {settings['select']} validation inputs" if settings.get("select") else "") +
             f") in {info['seconds']:.0f}s" + (" (an earlier run, reused)" if reused else "") +
             f"; cached at {root}")
    return plan, units, notes, info["seconds"]


@register_method("dipgo", "dipgo:R, DiP-GO learned skip plan removing a share R of the MACs (short default "
                          "training, cached); dipgo:R:steps / dipgo:R:deepcache start the pruner from that "
                          "equal-MACs plan; dipgo:@RECIPE a skip_plan recipe")
def _dipgo(arg, ctx: BenchContext) -> Variant:
    text = arg or ""
    if text.startswith("@"):
        from diffslim.recipe import load_recipe

        rec = load_recipe(text[1:])
        if rec.skip_plan is None:
            raise UserError(f"dipgo:{text}: the recipe has no skip_plan section")
        _plan_scheduler_check(ctx, len(rec.skip_plan.plan))
        if len(rec.skip_plan.plan) != ctx.default_steps:
            raise UserError(f"dipgo:{text}: the plan has {len(rec.skip_plan.plan)} steps, the bench samples "
                            f"{ctx.default_steps}; pass --steps {len(rec.skip_plan.plan)}")
        if ctx.dry_run:
            return None
        import numpy as np

        from diffslim.methods.skip_plan import validate_plan

        units = _bench_units(ctx, rec.skip_plan.granularity)
        if list(units.names) != rec.skip_plan.units:
            raise UserError(f"dipgo:{text}: the plan's units do not match this model's")
        plan = validate_plan(np.asarray(rec.skip_plan.plan), units, ctx.default_steps)
        return _plan_variant("dipgo:recipe", ctx, plan, units, f"plan from {text[1:]}")
    from diffslim.methods.dipgo import INITS

    r_s, _, init = text.partition(":")
    ratio = _ratio_arg(r_s, "dipgo:R")
    if init and init not in INITS:
        raise UserError(f"dipgo:R:INIT: unknown init {init!r}; accepted: {', '.join(INITS)}")
    _plan_scheduler_check(ctx, ctx.default_steps)
    if ctx.dry_run:
        return None
    overrides = {"init": init} if init and init != "keep" else {}
    plan, units, notes, _ = _default_dipgo(ctx, ratio, **overrides)
    return _plan_variant(f"dipgo:{ratio:g}" + (f":{init}" if overrides else ""), ctx, plan, units, notes)


@register_method("deepcache", "deepcache:K[:B], DeepCache as a skip plan: a full step every K steps, else only "
                              "the shallow branch B (default 0) runs (U-Nets)")
def _deepcache(arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.skip_plan import deepcache_plan

    k_s, _, b_s = (arg or "").partition(":")
    k = _int_arg(k_s, "deepcache:K")
    b = _int_arg(b_s, "deepcache:K:B", lo=0) if b_s else 0
    if "unet" not in type(ctx.loaded.denoiser).__name__.lower():
        raise UserError(f"deepcache needs a U-Net; {type(ctx.loaded.denoiser).__name__} is a transformer "
                        "(use dipgo, fbcache, fastercache, taylorseer, magcache or pab)")
    levels = len(getattr(ctx.loaded.denoiser, "up_blocks", ()))
    if levels and b >= 3 * levels:  # a branch past the last level would skip nothing
        raise UserError(f"deepcache:{k}:{b}: this U-Net has {levels} levels, so branches B in 0..{3 * levels - 1}")
    _plan_scheduler_check(ctx, ctx.default_steps)
    if ctx.dry_run:
        return None
    units = _bench_units(ctx, "fine")
    plan = deepcache_plan(units, ctx.default_steps, k, b)
    return _plan_variant(f"deepcache:{k}:{b}", ctx, plan, units, f"interval {k}, branch {b}")


def _search_variant(method: str, arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.dipgo import plan_psnr_fn, search_plan
    from diffslim.methods.skip_plan import pad_plan

    r_s, _, b_s = (arg or "").partition(":")
    ratio = _ratio_arg(r_s, f"{method}:R")
    budget = _int_arg(b_s, f"{method}:R:BUDGET") if b_s else SEARCH_BUDGET
    _plan_scheduler_check(ctx, ctx.default_steps)
    if ctx.dry_run:
        return None
    units = _bench_units(ctx, "fine")
    calib = calibration_spec(ctx, n=SEARCH_INPUTS)
    ref = sample(ctx.loaded.pipe, calib)
    rows = min(ctx.default_steps, denoiser_calls_per_run(ctx.loaded.pipe, ctx.base_spec))  # img2img: its share
    res = search_plan(plan_psnr_fn(ctx.loaded.pipe, calib, ref, units), units, rows, ratio, budget,
                      method=method, seed=0)
    return _plan_variant(f"{method}:{ratio:g}", ctx, pad_plan(res.plan, ctx.default_steps), units,
                         f"{method} search: {res.n_evals} evaluations on {len(calib.inputs)} calibration inputs "
                         f"({res.seconds:.0f}s), best calibration PSNR {res.score:.2f}")


@register_method("random", "random:R[:BUDGET], best of BUDGET random skip plans removing a share R of the MACs "
                           "(calibration PSNR; default budget = the plans DiP-GO's default run validates)")
def _random(arg, ctx: BenchContext) -> Variant:
    return _search_variant("random", arg, ctx)


@register_method("ga", "ga:R[:BUDGET], genetic algorithm over skip plans removing a share R of the MACs")
def _ga(arg, ctx: BenchContext) -> Variant:
    return _search_variant("ga", arg, ctx)


_DIFFUSERS_CACHES = {
    "fbcache": "FirstBlockCache", "fastercache": "FasterCache", "taylorseer": "TaylorSeerCache",
    "magcache": "MagCache", "pab": "PyramidAttentionBroadcast",
}


def _diffusers_cache_variant(name: str, arg, ctx: BenchContext) -> Variant:
    from diffslim.methods.skip_plan import (apply_diffusers_cache, check_diffusers_cache, diffusers_cache_setting,
                                            remove_diffusers_cache)

    den = ctx.loaded.denoiser
    check_diffusers_cache(den, name)  # before anything samples
    budget, rest = _cache_budget(name, arg)
    diffusers_cache_setting(name, arg if budget is None else (f"0:{rest}" if rest else None), arg)  # syntax, now
    if ctx.dry_run:
        return None
    setting, ratios, calib_note = _cache_setting(name, arg, ctx)
    info = apply_diffusers_cache(den, name, setting, ctx.default_steps, mag_ratios=ratios) + calib_note
    dynamic = name == "fbcache"  # reuses its cache where the first block's output changed little: per batch
    if dynamic:
        info += "; MACs counted over the whole run (the cache decides per batch, by the features)"
    label = f"{name}:macs={budget:g}" + (f":{rest}" if rest else "") if budget is not None else \
        f"{name}" + (f":{arg}" if arg else "")
    return Variant(label, ctx.loaded.pipe, ctx.base_spec, _n_params(den),
                   notes=info, cleanup=lambda: remove_diffusers_cache(den, name), input_dependent=dynamic)


def _cache_setting(name: str, arg: Optional[str], ctx: BenchContext) -> tuple[Optional[str], Optional[list], str]:
    """What a cache row runs with, measured on the calibration inputs and kept in ``ctx.memo``: the cache's argument
    (the threshold searched for a ``macs=M`` budget), MagCache's magnitude ratios, and a note. :func:`run_bench`
    asks for the budgets' settings before it samples any row, so that a budget no threshold reaches stops the bench
    before any work."""
    key = ("cache_setting", name, arg)
    if key in ctx.memo:
        return ctx.memo[key]
    budget, rest = _cache_budget(name, arg)
    den = ctx.loaded.denoiser
    ratios, note, setting = None, "", arg
    calib = calibration_spec(ctx)
    if name == "magcache":  # MagCache's skips follow the model's own magnitude ratios: measure them first
        from diffslim.methods.skip_plan import magcache_ratios

        t0 = time.perf_counter()
        ratios = magcache_ratios(den, lambda: run_pipeline(ctx.loaded.pipe, calib, list(range(len(calib.inputs)))))
        note = f" on {len(calib.inputs)} calibration inputs ({time.perf_counter() - t0:.0f}s)"
    if budget is not None:
        search = _threshold_for_macs if name in _THRESHOLD_CACHES else _interval_for_macs
        setting, search_note = search(ctx, name, budget, rest, calib, ratios)
        note += f"; {search_note}"
    ctx.memo[key] = (setting, ratios, note)
    return ctx.memo[key]


# caches whose setting is a threshold (searched for a MACs budget by bisection over reals) and those whose setting is
# an interval in steps (searched over integers)
_THRESHOLD_CACHES = ("fbcache", "magcache")
_INTERVAL_CACHES = ("taylorseer", "pab", "fastercache")


def _cache_budget(name: str, arg: Optional[str]) -> tuple[Optional[float], str]:
    """``macs=M[:K]`` of a cache: (M, the rest of the argument), else (None, arg)."""
    if not arg or not arg.startswith("macs="):
        return None, arg or ""
    text, _, rest = arg[len("macs="):].partition(":")
    if rest and name not in ("magcache",):
        raise UserError(f"{name}:{arg}: macs=M takes nothing after it for {name} (the search sets its "
                        f"{'threshold' if name in _THRESHOLD_CACHES else 'interval'}); give {name}:macs=M")
    try:
        budget = float(text)
    except ValueError:
        budget = -1.0
    if not 0 < budget < 1:
        raise UserError(f"{name}:{arg}: macs=M keeps at most a share M of the MACs, with 0 < M < 1 (e.g. "
                        f"{name}:macs=0.5)")
    return budget, rest


def _threshold_for_macs(ctx: BenchContext, name: str, budget: float, rest: str, calib: SampleSpec,
                        ratios) -> tuple[str, str]:
    """The least threshold of cache ``name`` whose run on the calibration inputs costs at most ``budget`` of the
    full model's MACs (geometric bisection; a larger threshold reuses the cache more). Returns the cache's argument
    and a note."""
    from diffslim.methods.skip_plan import apply_diffusers_cache, remove_diffusers_cache

    den, pipe = ctx.loaded.denoiser, ctx.loaded.pipe
    full = count_run_macs(pipe, calib, whole_run=True)
    runs = 0

    def share(thr: float) -> float:
        nonlocal runs
        runs += 1
        apply_diffusers_cache(den, name, f"{thr:.6g}" + (f":{rest}" if rest else ""), ctx.default_steps,
                              mag_ratios=ratios)
        try:
            return count_run_macs(pipe, calib, whole_run=True) / full
        finally:
            remove_diffusers_cache(den, name)

    t0 = time.perf_counter()
    lo, hi = 1e-4, 1e3
    least = share(hi)
    if least > budget:
        more = " or a longer run of skipped steps (magcache:macs=M:K, K > 3 by default)" if name == "magcache" else ""
        raise UserError(f"{name}:macs={budget:g}: even with an unbounded threshold the cache costs {least:.3f} of the "
                        f"MACs on the calibration inputs (it always runs some steps in full); give a larger share{more}")
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        if share(mid) <= budget:
            hi = mid
        else:
            lo = mid
    got = share(hi)
    return (f"{hi:.6g}" + (f":{rest}" if rest else ""),
            f"threshold {hi:.4g} searched for at most {budget:g} of the MACs on {len(calib.inputs)} calibration "
            f"inputs ({got:.3f} there; {runs} runs, {time.perf_counter() - t0:.0f}s)")


def _interval_for_macs(ctx: BenchContext, name: str, budget: float, rest: str, calib: SampleSpec,
                       ratios=None) -> tuple[str, str]:
    """The least interval (in steps, 2 to the step count) of cache ``name`` whose run on the calibration inputs costs
    at most ``budget`` of the full model's MACs (bisection over the integers; a longer interval reuses the cache
    more). Returns the cache's argument and a note."""
    from diffslim.methods.skip_plan import apply_diffusers_cache, remove_diffusers_cache

    den, pipe = ctx.loaded.denoiser, ctx.loaded.pipe
    full = count_run_macs(pipe, calib, whole_run=True)
    seen: dict[int, float] = {}

    def share(k: int) -> float:
        if k not in seen:
            apply_diffusers_cache(den, name, str(k), ctx.default_steps)
            try:
                seen[k] = count_run_macs(pipe, calib, whole_run=True) / full
            finally:
                remove_diffusers_cache(den, name)
        return seen[k]

    t0 = time.perf_counter()
    lo, hi = 1, max(ctx.default_steps, 2)  # share(lo) is taken to exceed the budget, share(hi) is checked
    least = share(hi)
    if least > budget:
        raise UserError(f"{name}:macs={budget:g}: even at its longest interval ({hi} steps) the cache costs "
                        f"{least:.3f} of the MACs on the calibration inputs; give a larger share")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if share(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return (str(hi), f"interval {hi} searched for at most {budget:g} of the MACs on {len(calib.inputs)} calibration "
                     f"inputs ({seen[hi]:.3f} there; {len(seen)} runs, {time.perf_counter() - t0:.0f}s)")


_CACHE_ARGS = {"fbcache": "[:THRESHOLD|:macs=M] (macs=M: the least threshold that keeps at most a share M of the MACs "
                          "on the calibration inputs)",
               "fastercache": "[:K|:macs=M]", "taylorseer": "[:INTERVAL|:macs=M]",
               "pab": "[:K|:macs=M] (macs=M: the least interval that keeps at most a share M of the MACs on the "
                      "calibration inputs)",
               "magcache": "[:THRESHOLD[:K]|:macs=M[:K]] (its magnitude ratios calibrated on the bench's calibration "
                           "inputs first)"}

for _name, _cls in _DIFFUSERS_CACHES.items():
    register_method(_name, f"{_name}{_CACHE_ARGS[_name]}, diffusers' {_cls} hook on the denoiser (transformers; a "
                           "row note says why where a family cannot take it)")(
        lambda arg, ctx, _n=_name: _diffusers_cache_variant(_n, arg, ctx))


def parse_methods(text: str, option: str = "--methods") -> list[tuple[str, Optional[str]]]:
    """``"full,steps:10"`` -> ``[("full", None), ("steps", "10")]``; unknown names, empty entries and (for the
    bench's ``--methods``) a method listed twice raise ``UserError`` (a ``ValueError``) naming ``option``."""
    example = "--methods full,steps:10" if option == "--methods" else "--stages layers:0.3,steps:20"
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise UserError(f"{option} is empty; give a comma-separated list, e.g. {example}")
    out, seen = [], {}
    for item in items:
        if not item:
            raise UserError(f"{option} {text!r} has an empty entry (two commas, or one at an end); e.g. {example}")
        name, _, arg = item.partition(":")
        if name not in METHODS:
            raise UserError(f"unknown bench method {name!r}; accepted: {', '.join(sorted(METHODS))}")
        key = (name, _same_numbers(arg))  # layers:0.30 is layers:0.3
        if option == "--methods" and key in seen:
            again = "" if seen[key] == item else f" (as {seen[key]!r} and {item!r})"
            raise UserError(f"{option} lists {seen[key]!r} twice{again}; each method runs once (full always runs, "
                            "first)")
        seen.setdefault(key, item)
        out.append((name, arg or None))
    return out


def refuse_together(parsed: list, check: Callable[[str, Optional[str]], object], what: str = "methods") -> None:
    """Run ``check(name, arg)`` on every parsed method and raise one :class:`UserError` for all that refused, so that
    a user who lists several methods a model cannot run learns of all of them at once, not one per try. One refusal
    keeps its own message; several are joined on one line, each led by its method where its message does not name
    it."""
    refused: list[str] = []
    for name, arg in parsed:
        try:
            check(name, arg)
        except UserError as e:
            msg = str(e)
            msg = msg if msg.startswith(name) else f"{name if arg is None else f'{name}:{arg}'}: {msg}"
            if msg not in refused:
                refused.append(msg)
    if len(refused) == 1:
        raise UserError(refused[0])
    if refused:
        raise UserError(f"{len(refused)} {what} cannot run here. " + " | ".join(refused))


def _same_numbers(arg: str) -> str:
    """``arg`` with every number written one way (0.30, .3 and 3e-1 as 0.3; 010 as 10): two specs that differ only
    in how a number is written are one method."""
    import re

    return re.sub(r"(?<![A-Za-z_])(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?",
                  lambda m: repr(float(m.group())), arg)


def _compile_and_warm(variant: Variant, options: dict):
    """Compile ``variant``'s denoiser with ``options`` (``torch.compile``'s arguments) and run one batch of
    each size its spec samples in, so that the timed runs neither compile nor recompile. Returns the
    denoiser, how it was compiled (:class:`diffslim.compiling.CompileInfo`'s ``how``) and the seconds this took."""
    import torch._dynamo

    from diffslim.apply import denoiser_attr
    from diffslim.compiling import compile_denoiser

    # each variant starts from empty compile caches: no variant pays for another's recompilations, and
    # the code of one is not reused for the next (they are different modules of the same classes)
    torch._dynamo.reset()
    den = getattr(variant.pipe, denoiser_attr(variant.pipe))
    t0 = time.perf_counter()
    info = compile_denoiser(den, **options)
    spec, n, bs = variant.spec, len(variant.spec.inputs), variant.spec.batch_size
    for size in sorted({min(bs, n), n % bs} - {0}, reverse=True):
        warm = spec.replace(inputs=spec.inputs[:size], seeds=spec.seeds[:size], batch_size=size)
        run_pipeline(variant.pipe, warm, list(range(size)))
    return den, info.how, time.perf_counter() - t0


def count_run_macs(pipe, spec: SampleSpec, whole_run: bool = False) -> int:
    """MACs of sampling ONE input of ``spec`` with ``pipe`` (every module the pipeline runs), FLOPs/2.

    ``whole_run``: the mean per input over sampling every input of ``spec`` in its batches, for variants whose
    cost depends on the inputs and the batching (FirstBlockCache decides per batch whether to reuse its cache)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffslim.models.macs import attention_flop_mapping

    n = len(spec.inputs) if whole_run else 1
    run = spec if whole_run else spec.replace(inputs=spec.inputs[:1], seeds=spec.seeds[:1], batch_size=1)
    with FlopCounterMode(display=False, custom_mapping=attention_flop_mapping()) as fc:
        run_pipeline(pipe, run, list(range(n)))
    return int(fc.get_total_flops()) // (2 * n)


@dataclass
class BenchResult:
    rows: list[dict]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    # the full model timed again after every method: ``{"first": s, "last": s, "drift": |last - first| / first}``
    # (None with --compile or without other methods); how far the machine's speed moved during the run
    timing: Optional[dict] = None

    def to_json(self) -> dict:
        return {"rows": self.rows, **({"timing": self.timing} if self.timing else {})}


def timing_note(timing: Optional[dict], after: str = "the other methods") -> Optional[str]:
    """One line on the run's timing noise from :attr:`BenchResult.timing` (the speedups are over the faster of
    the two); ``after``: what ran between the two timings."""
    if not timing:
        return None
    return (f"timing: the full model sampled in {timing['first']:.3g} s first and {timing['last']:.3g} s again after "
            f"{after} ({100 * timing['drift']:.0f} % apart): differences in speedup smaller than that are "
            "this machine's noise" + (" (more --repeats, or a quieter machine, narrow it)"
                                             if timing["drift"] > 0.05 else ""))


def _time_best(variant: "Variant", repeats: int, progress: bool) -> tuple[float, torch.Tensor]:
    """The best wall time of ``repeats`` samplings of ``variant`` (warmed up already) and the last outputs."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        wait_for_everyone()  # under a launch the clocks start together (a process still warming up is not timed)
        t0 = time.perf_counter()
        out = sample(variant.pipe, variant.spec, show_progress=progress, description=variant.method)
        best = min(best, slowest(time.perf_counter() - t0))  # under a launch, the slowest process's time
    return best, out


def check_processes_agree(variant: Variant, macs: int) -> None:
    """Under `accelerate launch` every process builds each variant itself (searches, layer scores and cached
    trainings see the same gathered outputs and files) and samples its share of the inputs; check that they built
    the same variant (params, MACs, schedule, recipe, the denoiser's layers), since a row of outputs from two
    different variants would be wrong without a sign."""
    dist = group()
    if dist is None:
        return
    import hashlib
    import json

    from diffslim.models.load import ModelLoadError, denoiser_of

    try:
        layers = sorted(denoiser_of(variant.pipe).state_dict())
    except ModelLoadError:
        layers = []
    mine = hashlib.sha256(json.dumps([variant.params, macs, variant.spec.digest(), variant.recipe, layers],
                                     sort_keys=True, default=str).encode()).hexdigest()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        raise RuntimeError(f"the processes of this launch built different {variant.method} variants (a search that "
                           "came out otherwise on one of them): run the bench without the launcher")


def _calls_note(variant: Variant, ctx: BenchContext) -> str:
    """For an image-to-image pipeline below strength 1, a method that changes the schedule may not change the number
    of denoiser calls: at strength s an N-step run makes int(N x s) of them, so int(3 x 0.6) = int(2 x 0.6). Says so
    where the variant makes as many calls as the full run (else "")."""
    import inspect

    base = ctx.base_spec
    spec = variant.spec
    if spec is base or (spec.num_inference_steps, spec.timesteps) == (base.num_inference_steps, base.timesteps):
        return ""
    if "strength" not in inspect.signature(variant.pipe.__call__).parameters:
        return ""
    steps = spec.num_inference_steps or len(spec.timesteps or ())
    if not steps or steps >= (base.num_inference_steps or ctx.default_steps):
        return ""
    if ("full_calls",) not in ctx.memo:
        ctx.memo[("full_calls",)] = denoiser_calls_per_run(ctx.loaded.pipe, base)
    full, calls = ctx.memo[("full_calls",)], denoiser_calls_per_run(variant.pipe, spec)
    if calls < full:
        return ""
    return (f"{calls} denoiser call{'s' if calls != 1 else ''} per sample, as many as the full run's "
            f"{base.num_inference_steps} steps make: below strength 1 an N-step run makes int(N x strength) calls "
            f"({steps} steps here), so fewer steps save nothing; compare at more steps (--steps)")


def run_bench(loaded, methods: str, evalset, default_steps: int = 50, scheduler: Optional[str] = None,
              batch_size: int = 16, metrics_fn: Optional[Callable] = None, progress: bool = True,
              repeats: int = 1, data: str = "zoo", resolution: Optional[int] = None,
              task_weight: Optional[float] = None, compile: Optional[dict] = None,
              layer_calibration: Optional[int] = None) -> BenchResult:
    """Run every method on ``evalset``'s inputs; ``full`` always runs first as the reference.

    ``metrics_fn(outputs, reference) -> dict`` adds quality and task metrics to each row. ``data`` and
    ``resolution``: what the methods that score or train use; ``task_weight``: the task loss's weight in their
    training (None: :func:`default_task_weight`; see :class:`BenchContext`).
    Wall time is the best of ``repeats`` timed runs after one untimed warm-up batch; after every method the full
    model is timed again (``BenchResult.timing``), which shows how much of a speedup is the machine's noise.
    ``compile``: ``torch.compile`` arguments (``{}`` for the defaults); every variant's denoiser is then
    compiled as :func:`diffslim.compiling.compile_denoiser` does, after its MACs are counted, the warm-up
    runs a batch of every size the timed runs use (it compiles; its time is the row's ``compile_seconds``),
    and the variant goes back to eager afterwards. ``layer_calibration``: how many calibration triples (without
    data: the pipeline's own denoiser calls) the ``layers`` criteria score on (None: ``LAYER_CALIB``'s 32).
    """
    if loaded.pipe is None:
        raise UserError(f"{loaded.source} has no pipeline to sample; bench needs a pipeline folder or zoo:NAME")
    parsed = parse_methods(methods)
    if ("full", None) in parsed:
        parsed.remove(("full", None))
    parsed.insert(0, ("full", None))
    base = SampleSpec(inputs=evalset.inputs, seeds=evalset.seeds, num_inference_steps=default_steps,
                      scheduler=scheduler, call_kwargs=dict(evalset.call_kwargs), batch_size=batch_size)
    # every method's argument is checked before anything is sampled
    dry = BenchContext(loaded=loaded, base_spec=base, default_steps=default_steps, dry_run=True, data=data,
                       resolution=resolution)
    refuse_together(parsed, lambda name, arg: METHODS[name](arg, dry))
    if layer_calibration is not None and layer_calibration < 1:
        raise UserError(f"layer_calibration={layer_calibration}: the layer criteria need at least 1 calibration triple")
    ctx = BenchContext(loaded=loaded, base_spec=base, default_steps=default_steps, data=data, resolution=resolution,
                       task_weight=check_task_weight(task_weight), progress=progress,
                       layer_calibration=layer_calibration)
    for name, arg in parsed:  # a cache's MACs budget that no threshold reaches, or a layer selection's params cap that
        # no set of layers meets, stops the bench before any sampling
        if name in _DIFFUSERS_CACHES and _cache_budget(name, arg)[0] is not None:
            _cache_setting(name, arg, ctx)
        if name == "layers":
            _check_layer_cap(arg, ctx)
    rows, outputs = [], {}
    full_time = full_macs = None
    for name, arg in parsed:
        variant = METHODS[name](arg, ctx)
        compiled = None
        try:
            if compile is None:  # warm up at the timed batch's shape: a first call at a new shape costs more
                run_pipeline(variant.pipe, variant.spec, list(range(min(len(variant.spec.inputs),
                                                                        variant.spec.batch_size))))
            else:
                # eager: the flop counter does not see compiled code
                macs = count_run_macs(variant.pipe, variant.spec, whole_run=variant.input_dependent)
                compiled, how, compile_seconds = _compile_and_warm(variant, compile)
            best, out = _time_best(variant, repeats, progress)
            if compile is None:
                macs = count_run_macs(variant.pipe, variant.spec, whole_run=variant.input_dependent)
        finally:
            if compiled is not None:
                from diffslim.compiling import uncompile

                uncompile(compiled)
            if variant.cleanup is not None:
                variant.cleanup()
        check_processes_agree(variant, macs)
        if full_time is None:
            full_time, full_macs, reference = best, macs, out
            ctx.reference = out
        row = {
            "method": variant.method,
            "params": variant.params,
            "macs_per_sample": macs,
            "macs_ratio": macs / full_macs,
            "seconds": best,
            "speedup": full_time / best,
        }
        if compile is not None:
            row["compiled"] = how
            row["compile_seconds"] = compile_seconds
        if metrics_fn is not None:
            row.update(metrics_fn(out, reference))
        calls_note = _calls_note(variant, ctx) if rows else ""
        if variant.notes or calls_note:
            row["notes"] = "; ".join(n for n in (variant.notes, calls_note) if n)
        rows.append(row)
        outputs[variant.method] = out
    timing = None
    if compile is None and len(rows) > 1:  # the full model once more: how far the machine's speed moved
        again, _ = _time_best(METHODS["full"](None, ctx), repeats, progress)
        timing = {"first": full_time, "last": again, "drift": abs(again - full_time) / full_time}
        if again < full_time:  # the fastest run counts, the full model's too: no speedup borrows its slow start
            rows[0]["seconds"] = again
            for row in rows:
                row["speedup"] = again / row["seconds"]
    return BenchResult(rows=rows, outputs=outputs, timing=timing)
