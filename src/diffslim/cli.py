"""The ``diffslim`` command: thin wrappers that parse, call the API and render with rich."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup
from rich.table import Table

from diffslim import outputs
from diffslim.errors import Interrupted, UserError

# what the trainers take instead of --dtype
_TRAINERS = {"finetune": "trains float32 weights; --mixed-precision fp16|bf16 runs its passes in half precision",
             "distill": "trains float32 weights; --mixed-precision fp16|bf16 runs its passes in half precision",
             "dipgo": "trains its pruner in float32 (the plan it writes samples in any dtype: sample or bench "
                      "--dtype bf16 with --recipe / dipgo:@RECIPE)",
             "zoo-train": "trains float32 weights (sample the result in any dtype)"}


class _OneLineErrors(TyperGroup):
    """The command group, with click's usage errors (a bad option value, an unknown option, a missing argument) as
    one line and exit code 2, like the commands' own errors, instead of click's usage, hint and boxed message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err_console.print("[bold yellow]aborted[/]", highlight=False)
            sys.exit(1)
        except typer.TyperException as e:  # typer's click exceptions (its own copy of click's, hence by duck type)
            if type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message"):
                e.show()  # bare `diffslim`: the help
                sys.exit(getattr(e, "exit_code", 2))
            ctx = getattr(e, "ctx", None)
            hint = f" ({ctx.command_path} --help lists what it takes)" if ctx is not None else ""
            message = " ".join(e.format_message().split())
            if type(e).__name__ == "NoSuchOption" and getattr(e, "option_name", None) == "--dtype" and ctx is not None \
                    and ctx.command.name in _TRAINERS:  # click suggests --data: say what a trainer takes instead
                message = f"no option --dtype: {ctx.command.name} {_TRAINERS[ctx.command.name]}"
            err_console.print(f"[bold red]error:[/] {escape(message)}{escape(hint)}", highlight=False,
                              soft_wrap=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_OneLineErrors,
                  rich_markup_mode=None,  # plain help: rich's panels cut long option names on narrow terminals
                  help="Make diffusers models smaller and faster while keeping their outputs close.")
# rich assumes 80 columns when stdout is not a terminal; bench tables need more
# off a terminal (a log file, a pipe) lines are not wrapped either, so that grep finds a whole line
console = Console(width=None if sys.stdout.isatty() else 140, soft_wrap=not sys.stdout.isatty(),
                  emoji=False)  # no emoji: "fbcache:-1:" stays text
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140, soft_wrap=not sys.stderr.isatty(),
                      emoji=False)


def _wrote(path, what: str, as_json: bool = False) -> None:
    """Say that ``what`` was written to ``path``: on stdout, or on stderr where stdout holds the JSON."""
    (err_console if as_json else console).print(f"wrote {what}: {path}", highlight=False, markup=False)


def _print_table(t: Table) -> None:
    """Print a result table that stays whole on a narrow terminal: each column is at least as wide as its widest
    number or name, and what still does not fit (a long header, a note) folds onto more lines instead of ending
    in an ellipsis; a table still too wide breaks its headers at underscores and drops its vertical rules."""
    from rich.text import Text

    def need() -> int:
        return sum(max(c.min_width, *(len(w) for w in str(c.header).split())) + 3 for c in t.columns) + 1

    for column in t.columns:
        column.overflow = "fold"
        widths = [Text.from_markup(c).cell_len if isinstance(c, str) else getattr(c, "cell_len", 0)
                  for c in column.cells]
        column.min_width = min(max(widths, default=0), 40)  # a long free-text cell still folds
    if need() > console.width:
        import textwrap

        from rich import box

        t.box, t.show_edge, t.pad_edge, t.collapse_padding = box.SIMPLE_HEAD, False, False, True
        for column in t.columns:  # headers broken at underscores
            if isinstance(column.header, str):
                column.header = column.header.replace("_", " ")
        if need() - len(t.columns) > console.width:  # and still too wide: to the width of the column's values
            for column in t.columns:
                if isinstance(column.header, str):
                    column.header = "\n".join(textwrap.wrap(column.header, max(column.min_width, 4),
                                                             break_long_words=True))
    console.print(t)


def _versions() -> str:
    from importlib.metadata import version

    import diffusers
    import torch

    return (f"diffslim {version('diffslim')} (torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"python {sys.version.split()[0]})")


def _version(value: bool) -> None:
    if value:
        console.print(_versions(), highlight=False)
        raise typer.Exit()


def _ran_on(device, dtype) -> dict:
    """``{"device", "dtype"}`` for a result's JSON: where its numbers were sampled (bfloat16 rows are not float32's)."""
    return {"device": str(device or "cpu"), "dtype": str(dtype or "torch.float32").removeprefix("torch.")}


def _run_info(device, dtype=None) -> str:
    """How a report's numbers were made: the command, where it ran, the versions (reports quote their command)."""
    import shlex

    import torch

    where = f"{device or 'cpu'}" + (f", {str(dtype).removeprefix('torch.')}" if dtype else "") + (
        f", {torch.get_num_threads()} CPU threads" if str(device or "cpu").startswith("cpu") else "")
    return (f"command: diffslim {' '.join(shlex.quote(a) for a in sys.argv[1:])}\nran on {where}; "
            f"{_versions()}; {time.strftime('%Y-%m-%d %H:%M')}")


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the versions of diffslim, torch, diffusers and python, and exit")):
    """Make diffusers models smaller and faster while keeping their outputs close."""


# seeds are offset per sample and per purpose (calibration, validation, teacher samples) and must stay in the range
# torch.Generator.manual_seed takes
_SEED_MAX = 2 ** 62


def _fail(msg: str, code: int = 2):
    if _main_process():
        err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # a path's [x] too
    else:  # the notes of a launch's other processes are quiet, their errors not once they work: one may fail alone
        import os

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # before, every process checks the same options alike
            sys.stderr.write(f"error (process {os.environ.get('RANK')}): {msg}\n")
    raise typer.Exit(code)


def _guard(fn):
    """Run ``fn``; user mistakes become one red line and exit code 2, never a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        done = False
        try:
            _check_launch(fn.__name__.removesuffix("_cmd").replace("_", "-"))
            _check_finite(kwargs)
            result = fn(*args, **kwargs)
            done = True
            return result
        except UserError as e:
            _fail(str(e))
        except Interrupted as e:  # a long run stopped on Ctrl-C or SIGTERM after writing its checkpoint
            if _main_process():  # once per launch
                err_console.print(f"[bold yellow]stopped:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:  # Ctrl-C in a command that keeps no checkpoint: one line, not a traceback
            err_console.print("[bold yellow]interrupted[/] (Ctrl-C): files this command had finished writing are "
                              "kept; cached runs resume when it runs again", highlight=False, soft_wrap=True)
            raise typer.Exit(130)
        except OSError as e:  # a path that cannot be read or written: the system's reason and the path
            _fail(f"{e.strerror}: {e.filename}" if e.filename and e.strerror else str(e))
        finally:
            outputs.settle_claims(failed=not done)

    return wrapper


# the commands that run data parallel under `accelerate launch` (each process its share; the first writes)
_PARALLEL = ("sample", "evaluate", "bench", "workflow", "depth-search", "timesteps", "layer-prune", "layer-compare",
             "distill", "finetune", "dipgo", "zoo-train")


def _world_size() -> int:
    """How many processes run this command (``accelerate launch``, torchrun: ``WORLD_SIZE``); 1 without a launcher."""
    from diffslim.launch import world_size

    return world_size()


def _check_launch(name: str) -> None:
    """Refuse a command that runs in one process when started on several (`accelerate launch`, torchrun): each
    process would run all of it and write the same files, and a method that trains inside the bench waited forever
    for the other processes."""
    world = _world_size()
    if world > 1 and name not in _PARALLEL:
        if not _main_process():  # the first process says it once
            raise typer.Exit(2)
        raise UserError(f"`diffslim {name}` runs in one process; started on {world} (accelerate launch or torchrun) "
                        "each would run all of it and write the same files: run it without the launcher (these "
                        f"run data parallel under it: {', '.join(_PARALLEL)})")


def _check_finite(kwargs: dict) -> None:
    """Refuse nan and inf for a number option: click's ranges let them through (nan compares false with any bound),
    and a learning rate of nan or inf would train a model of NaNs."""
    import math

    import click

    ctx = click.get_current_context(silent=True)
    opts = {p.name: p.opts[0] for p in ctx.command.params} if ctx is not None else {}
    for name, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{opts.get(name, '--' + name.replace('_', '-'))}: must be a finite number, got {value}")


def _metric_weights(clip: Optional[Path], lpips: Optional[Path], inception: Optional[Path]) -> None:
    """The local metric weights a user names must exist (a missing one is skipped only when not asked for)."""
    import importlib.util

    for option, path in (("--clip", clip), ("--lpips", lpips), ("--inception", inception)):
        if path is not None and not path.exists():
            raise UserError(f"{option} {path}: no such file or folder (the metric's local weights)")
    # asked for, a metric must not be skipped: the kind of path each takes, checked before any work
    if clip is not None and not (clip / "config.json").is_file():
        raise UserError(f"--clip {clip}: give a CLIP model folder (config.json and its weights, as "
                        "transformers' save_pretrained writes it)")
    for option, path, example in (("--lpips", lpips, "its backbone's .pth weights"),
                                  ("--inception", inception, "torch-fidelity's "
                                   "weights-inception-2015-12-05-6726825d.pth")):
        if path is not None and not path.is_file():
            raise UserError(f"{option} {path} is a folder; give the weights file ({example})")
    if inception is not None and importlib.util.find_spec("torch_fidelity") is None:
        raise UserError("--inception: torchmetrics builds the FID Inception network with torch-fidelity, which is "
                        "not installed (pip install torch-fidelity)")
    if lpips is not None and importlib.util.find_spec("torchvision") is None:
        raise UserError("--lpips: torchmetrics builds the LPIPS backbone with torchvision, which is not installed "
                        "(pip install torchvision, the build matching your torch)")


def _print_json(data) -> None:
    if not _main_process():
        return
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _quiet_libraries() -> None:
    import logging
    import warnings

    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()  # transformers draws a bar while it loads a pipeline's text encoders
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _placed_id(model: str, device, dtype) -> str:
    """The reference cache's model id: the weights' fingerprint, and where and in which dtype they ran when
    that is not the CPU in float32 (other kernels give other outputs)."""
    from diffslim.sample import model_fingerprint

    fp = model_fingerprint(model)
    if _device_type(device) == "cpu" and str(dtype) == "torch.float32":
        return fp
    return f"{fp}|{_device_type(device)}|{str(dtype).removeprefix('torch.')}"


def _device_type(device) -> str:
    return getattr(device, "type", str(device).split(":")[0])


def _placement(device, dtype) -> dict:
    """``load``'s keyword arguments for a device and dtype (None: its defaults)."""
    return {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}


_SIZE_OPTS = dict(
    height=typer.Option(None, min=1, help="image height in pixels of every sample (default: the pipeline's own; "
                                          "e.g. a 1024 px model at 512 costs about a quarter of the time)"),
    width=typer.Option(None, min=1, help="image width in pixels of every sample (default: the pipeline's own)"),
)

_DEVICE_HELP = ("device to load and sample on: auto (this process's GPU when torch sees one, else the CPU), cpu, "
                "cuda, cuda:N, mps")
_DTYPE_HELP = "weights and sampling dtype: float32, bfloat16 or float16"
_SCORE_DEVICE_HELP = ("device the layers are scored on (in float32): auto (this process's GPU when torch sees one, "
                      "else the CPU), cpu, cuda, cuda:N, mps")


def _sampling_device(device: Optional[str]) -> str:
    """``--device`` of bench and workflow: the CPU unless given (their timings compare methods there), but under
    `accelerate launch` each process's GPU (a launch on a GPU machine that sampled on the CPU would waste it)."""
    if device is not None:
        return device
    return "auto" if _world_size() > 1 else "cpu"


def _precision(device: str, dtype: str):
    """(torch.device, torch.dtype) from --device and --dtype, refused with what is accepted."""
    from diffslim.models.load import resolve_device, resolve_dtype

    return resolve_device(device), resolve_dtype(dtype)


_INPUTS_HELP = ("a text file, one prompt per line (class labels for DiT), or a .jsonl file of pipeline inputs, e.g. "
                "{\"prompt\": \"make it red\", \"image\": \"cat.png\"} per line (ControlNet, img2img, InstructPix2Pix, "
                "upscalers)")


@app.command()
@_guard
def profile(
    model: str = typer.Argument(..., help="pipeline folder, model folder, config-only folder, zoo:NAME or a Hub id the local HF cache holds"),
    height: Optional[int] = typer.Option(None, min=1, help="image height in pixels (default: the model's sample size)"),
    width: Optional[int] = typer.Option(None, min=1, help="image width in pixels"),
    repeats: int = typer.Option(5, min=1, help="timed denoiser calls for the latency median; with --pipeline, "
                                               "whole sampling runs of --n inputs, the fastest one reported (give 1 "
                                               "for a large model)"),
    depth: Optional[str] = typer.Option(None, help="profile the depth-skipped model at depth N, or 'all' for every depth"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    device: str = typer.Option("auto", help="device the timed calls run on: auto (this process's GPU when torch "
                                            "sees one, else the CPU), cpu, cuda, cuda:N, mps"),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP),
    batch_size: int = typer.Option(1, min=1, help="samples per timed denoiser call (the MACs stay batch 1's)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser before the timed calls (the "
                                                          "first call, reported apart, compiles)"),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode (with --compile)"),
    compile_backend: Optional[str] = typer.Option(None, help="torch.compile backend (with --compile; default inductor)"),
    random_weights: bool = typer.Option(False, "--random-weights", help="a config-only folder: build the model with "
                                        "random weights on --device and time it too (speed and memory do not "
                                        "depend on the values)"),
    pipeline: bool = typer.Option(False, "--pipeline", help="time whole sampling runs instead: where the time goes "
                                  "among the pipeline's components (text encoders, denoiser, VAE, the rest), on "
                                  "--n inputs at --batch-size"),
    n: int = typer.Option(4, min=1, help="--pipeline: inputs sampled"),
    steps: Optional[int] = typer.Option(None, min=1, help="--pipeline: sampling steps (default: the model's)"),
    recipe: Optional[Path] = typer.Option(None, help="--pipeline: a recipe to apply first"),
    prompts: Optional[Path] = typer.Option(None, help="--pipeline: the inputs: " + _INPUTS_HELP),
):
    """Parameters, MACs and per-block breakdown of one denoiser call at batch 1; its latency and memory where
    --device says, at --batch-size. With --pipeline: the sampling time of each pipeline component."""
    compile_options = _compile_options(compile, compile_mode, compile_backend)
    dev, dt = _precision(device, dtype)
    _quiet_libraries()
    from diffslim.methods.depth_skip import profile_depth, profile_depths

    if pipeline:
        given = [o for o, v in (("--depth", depth), ("--height", height), ("--width", width),
                                ("--random-weights", random_weights or None)) if v is not None]
        if given:
            raise UserError(f"--pipeline samples the pipeline as it is, at its own size: drop {', '.join(given)}")
        return _profile_pipeline(model, n, steps, recipe, batch_size, repeats, dev, dt, as_json, compile_options,
                                 prompts)
    given = [o for o, v in (("--n", n if n != 4 else None), ("--steps", steps), ("--recipe", recipe),
                            ("--prompts", prompts)) if v is not None]
    if given:
        raise UserError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the sampling runs of --pipeline: "
                        "add --pipeline, or drop them")

    if depth == "all" and (compile_options is not None or batch_size != 1 or random_weights):
        raise UserError("--depth all counts params and MACs at every depth and times nothing: drop --compile, "
                        "--batch-size and --random-weights, or profile one depth (--depth N)")
    if depth == "all":
        rows = profile_depths(model, height, width)
        if as_json:
            _print_json({"model": model, "depths": rows})
            return
        unit, div = ("GMACs", 1e9) if rows and rows[-1]["macs"] >= 1e9 else ("MMACs", 1e6)
        shown = [{"depth": r["depth"], "params": r["params"], unit: round(r["macs"] / div, 3),
                  f"{unit} excl. attention": round(r["macs_excl_attention"] / div, 3),
                  "params_ratio": round(r["params_ratio"], 4), "macs_ratio": round(r["macs_ratio"], 4)} for r in rows]
        _print_rows(f"depth-skip profile of {model} (one denoiser call, batch 1)", shown, key="depth")
        return
    if depth is not None and not depth.isdigit():
        raise UserError(f"--depth {depth!r} is not a depth; give an integer N (1 = shallowest) or 'all'")
    before = None
    if compile_options is not None:
        from diffslim.compiling import compile_denoiser

        def before(den):
            compile_denoiser(den, **compile_options)

    p = profile_depth(model, height, width, repeats, depth=int(depth) if depth else None, device=dev, dtype=dt,
                      batch=batch_size, before_timing=before, random_weights=random_weights)
    p["compiled"] = compile_options is not None
    if as_json:
        _print_json(p)
        return
    (sh, sw), scale = p["sample_size"], p.get("vae_scale_factor") or 1
    size = f"input {sh}x{sw}" if scale == 1 else f"latent {sh}x{sw}, {sh * scale}x{sw * scale} px"
    t = Table(title=f"{model}  ({p['class']}, {size}" + (", random weights" if p["random_weights"] else "") + ")")
    t.add_column("block")
    t.add_column("params", justify="right")
    unit, div = ("GMACs", 1e9) if (p["macs"] or 0) >= 1e9 else ("MMACs", 1e6)
    t.add_column(unit, justify="right")
    t.add_column("share of MACs", justify="right")
    for b in p["blocks"]:
        share = f"{100 * b['macs'] / p['macs']:.1f}%" if p["macs"] and b["macs"] is not None else ""
        t.add_row(b["name"], f"{b['params']:,}", f"{(b['macs'] or 0) / div:.3f}", share)
    rest_params = p["params"] - sum(b["params"] for b in p["blocks"])
    rest_macs = (p["macs"] or 0) - sum(b["macs"] or 0 for b in p["blocks"])
    if rest_params > 0 or rest_macs > 0:  # so that the rows add up to the total
        t.add_row("other (embeddings, stem, head)", f"{rest_params:,}", f"{rest_macs / div:.3f}",
                  f"{100 * rest_macs / p['macs']:.1f}%" if p["macs"] else "")
    t.add_row("[bold]total[/]", f"[bold]{p['params']:,}[/]", f"[bold]{(p['macs'] or 0) / div:.3f}[/]", "100%")
    _print_table(t)
    if p["macs_excl_attention"] is not None:
        console.print(f"{unit} without attention products (the convention of BK-SDM and DeepCache): "
                      f"{p['macs_excl_attention'] / div:.3f}")
    if p.get("counted_on", "dummy inputs") != "dummy inputs":
        console.print(f"counted and timed on {p['counted_on']} (one default prompt, no guidance batch): "
                      "profile has no dummy inputs for this denoiser")
    if p["latency_s"] is not None:
        how = f"{p['device']}, {p['dtype']}, batch {p['batch']}" + (", compiled" if p["compiled"] else "")
        console.print(f"latency ({how}; median of {repeats}): {p['latency_s'] * 1e3:.2f} ms, "
                      f"{p['samples_per_s']:.1f} samples/s; first call {p['first_call_s'] * 1e3:.1f} ms"
                      + (" (compiling)" if p["compiled"] else "") + f"; weights {p['weights_bytes'] / 2**20:.1f} MiB; "
                      f"peak memory ({p['memory_kind']}): {p['peak_memory_bytes'] / 2**20:.1f} MiB", highlight=False)
    else:
        console.print("no weights loaded (config only): latency and memory not measured (--random-weights times the "
                      "architecture with random weights)")


def _profile_pipeline(model: str, n: int, steps: Optional[int], recipe: Optional[Path], batch_size: int,
                      repeats: int, device, dtype, as_json: bool, compile_options: Optional[dict] = None,
                      prompts: Optional[Path] = None) -> None:
    """``profile --pipeline``: the wall time of each pipeline component over sampling runs (the best of
    ``repeats``, after a warm-up run of the first batch, which compiles with ``compile_options``), and the bound it
    puts on compressing the denoiser alone."""
    from diffslim.apply import denoiser_attr
    from diffslim.evaluate import eval_set_for
    from diffslim.measure.profile import time_components
    from diffslim.sample import SampleSpec, run_pipeline, sample

    loaded, rec = _load_with_recipe(model, recipe, steps, device=device, dtype=dtype)
    if loaded.pipe is None:
        raise UserError(f"{model} is not a pipeline; --pipeline samples it: give a pipeline folder or zoo:NAME")
    es = eval_set_for(loaded, n, prompts_file=prompts)
    fixed = _recipe_steps(rec) if rec is not None else None
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=fixed or steps or (loaded.zoo.default_steps if
                                                                                   loaded.zoo else 50),
                      call_kwargs=es.call_kwargs, batch_size=batch_size)
    loaded.pipe.set_progress_bar_config(disable=True)
    if compile_options is not None:
        from diffslim.compiling import compile_pipeline

        compile_pipeline(loaded.pipe, **compile_options)
    run_pipeline(loaded.pipe, spec, list(range(min(batch_size, n))))  # warm-up (and compilation): the first batch
    best = None
    for k in range(repeats):
        with time_components(loaded.pipe) as tc:
            sample(loaded.pipe, spec, show_progress=True, description=f"timed sampling run {k + 1}/{repeats}")
        if best is None or tc.total < best.total:
            best = tc
    den = denoiser_attr(loaded.pipe)
    rows = best.rows(denoiser=den)
    share = next((r["share"] for r in rows if r["denoiser"]), 0.0)
    bound = 1 / (1 - share) if share < 1 else float("inf")
    first = next(loaded.denoiser.parameters())
    result = {"model": model, "recipe": str(recipe) if recipe else None, "compiled": compile_options is not None,
              "n": n, "batch_size": batch_size,
              "steps": spec.num_inference_steps, "device": str(first.device), "dtype": str(first.dtype).removeprefix(
                  "torch."), "repeats": repeats, "total_s": best.total, "components": rows, "denoiser": den,
              "denoiser_share": share, "max_speedup_from_the_denoiser": bound}
    if as_json:
        _print_json(result)
        return
    t = Table(title=f"{model}: {n} samples, {spec.num_inference_steps} steps, batch {batch_size}, "
                    f"{result['device']} {result['dtype']}" + (f", recipe {recipe}" if recipe else "")
                    + (", compiled" if compile_options is not None else "")
                    + f" (best of {repeats})")
    for c in ("component", "seconds", "share", "calls"):
        t.add_column(c, justify="left" if c == "component" else "right")
    for r in rows:
        t.add_row(r["component"] + (" (denoiser)" if r["denoiser"] and r["component"] != "denoiser" else ""),
                  f"{r['seconds']:.3f}",
                  f"{100 * r['share']:.1f}%", "" if r["calls"] is None else str(r["calls"]))
    t.add_row("[bold]total[/]", f"[bold]{best.total:.3f}[/]", "100%", "")
    _print_table(t)
    console.print(f"the denoiser takes {100 * share:.1f}% of sampling: compressing it alone can make sampling at most "
                  f"{bound:.2f}x faster (other: the scheduler, the pipeline's own code, image conversion)",
                  highlight=False)


def _recipe_steps(rec) -> Optional[int]:
    """The number of steps a recipe fixes (its timesteps, step count or skip plan), or None."""
    if rec.sampling is not None and rec.sampling.timesteps:
        return len(rec.sampling.timesteps)
    if rec.sampling is not None and rec.sampling.num_inference_steps:
        return rec.sampling.num_inference_steps
    if rec.skip_plan is not None:
        return len(rec.skip_plan.plan)
    return None


def _same_model(a: str, b: str) -> bool:
    """Whether two MODEL arguments name one model: the same zoo name, the same folder, or a Hub id and its copy in
    the local Hugging Face cache."""
    if a == b:
        return True
    if a.startswith("zoo:") or b.startswith("zoo:"):
        return False
    from diffslim.models.load import cached_hub_folder

    def where(m: str) -> Path:
        return (cached_hub_folder(m) or Path(m).expanduser()).resolve()

    return where(a) == where(b)


def _model_for(model: Optional[str], recipe: Optional[Path]) -> str:
    """MODEL, or where it is left out the model the --recipe names (its ``model``)."""
    if model is not None:
        return model
    if recipe is not None:
        from diffslim.recipe import load_recipe

        named = load_recipe(recipe).model
        from diffslim.models.load import cached_hub_folder

        if named and not named.startswith("zoo:") and not Path(named).exists() and cached_hub_folder(named) is None:
            beside = "" if Path(named).is_absolute() else f" (nor beside the recipe, at {recipe.parent / named})"
            raise UserError(f"{recipe} names the model {named}, which is not there{beside}: move or copy the recipe "
                            "with its folder (a workflow's stages/ go with it), or give MODEL")
        if named:
            return named
        raise UserError(f"MODEL is missing, and {recipe} names no model (its \"model\" is empty): give MODEL, a "
                        "pipeline folder or zoo:NAME")
    raise UserError("MODEL is missing: give a pipeline folder or zoo:NAME (or a --recipe that names its model)")


def _load_with_recipe(model: str, recipe: Optional[Path], steps: Optional[int] = None, device=None, dtype=None):
    from diffslim.apply import apply
    from diffslim.models.load import load
    from diffslim.recipe import load_recipe

    rec = load_recipe(recipe) if recipe is not None else None
    if rec is not None and rec.model and not _same_model(model, rec.model):
        err_console.print(f"[yellow]warning:[/] {escape(str(recipe))} was made for {escape(rec.model)} (its "
                          f"\"model\"), not {escape(model)}; applying it to {escape(model)} as asked (leave MODEL out "
                          "to use the recipe's)", highlight=False)
    fixed = _recipe_steps(rec) if rec is not None else None
    if fixed is not None and steps is not None and steps != fixed:
        raise UserError(f"--steps {steps}: the recipe {recipe} samples {fixed} steps (its schedule or skip plan); "
                        "drop --steps")
    loaded = load(model, **_placement(device, dtype))
    if rec is not None:
        if loaded.pipe is None:
            raise UserError(f"{model} is not a pipeline; a recipe applies to a pipeline folder or zoo:NAME")
        apply(loaded.pipe, rec)
    return loaded, rec


_JSON_HELP = "print the result as JSON on stdout (progress and notes go to stderr)"
# options that several commands share, defined once (typer reuses an option's definition across commands)
_SEED_OPT = typer.Option(0, min=0, max=_SEED_MAX, help="seed of the first input; input i uses seed+i")
_PROMPTS_OPT = typer.Option(None, help="the inputs: " + _INPUTS_HELP)
_RESOLUTION_OPT = typer.Option(None, min=1, help="image size in px of the --data folder's images")
_LAYER_CALIB_HELP = ("calibration triples the {} score on (default 32; without --data on a text-to-image "
                     "pipeline: its own denoiser calls while sampling); each costs one denoiser call per candidate "
                     "layer")
_KD_TASK_WEIGHT_OPT = typer.Option(None, help="weight of the diffusion task loss when +kd distils and +ft fine-tunes "
                                   "(1: the papers' loss; 0: output and feature distillation only, which stays closer "
                                   "to the unpruned model); default 1 on training data, 0 on the pipeline's own samples "
                                   "and for a consistency model (LCM, TCD)")


def _data_option(what: str):
    """bench's and workflow's --data: the training data of the ``what`` (methods, stages) that score or train."""
    return typer.Option("zoo", help=f"training data of the {what} that score or train (layers:R, +kd, +ft): 'zoo' or "
                                    "an image folder, captions optional; without it a non-zoo pipeline's layers:R "
                                    "scores on its own denoiser calls while sampling the prompts, and +kd/+ft train "
                                    "on images the full pipeline samples from them (pipelines of prompts, and of prompts "
                                    "and input images such as ControlNet's: input and output as training pairs)")
_COMPILE_HELP = ("torch.compile the denoiser after the recipe (a skip plan's or multi-depth schedule's per-step "
                 "decisions stay eager, the modules they run are compiled); the first batch compiles")


@app.command("sample")
@_guard
def sample_cmd(
    model: Optional[str] = typer.Argument(None, help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds (default: the --recipe's model)"),
    out: Path = typer.Option(Path("samples"), help="output folder for PNGs"),
    n: int = typer.Option(16, min=1, help="number of samples"),
    steps: Optional[int] = typer.Option(None, min=1, help="inference steps (default: the model's)"),
    scheduler: Optional[str] = typer.Option(None, help="ddim, euler, dpm++, ... (default: the pipeline's)"),
    seed: int = typer.Option(0, min=0, max=_SEED_MAX, help="seed of the first sample; sample i uses seed+i"),
    recipe: Optional[Path] = typer.Option(None, help="a recipe JSON to apply first"),
    prompts: Optional[Path] = _PROMPTS_OPT,
    batch_size: int = typer.Option(16, min=1, help="samples per pipeline call"),
    compile: bool = typer.Option(False, "--compile", help=_COMPILE_HELP),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode (with --compile)"),
    compile_backend: Optional[str] = typer.Option(None, help="torch.compile backend (with --compile; default inductor)"),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP),
    height: Optional[int] = _SIZE_OPTS["height"], width: Optional[int] = _SIZE_OPTS["width"],
):
    """Sample a model on fixed seeds and inputs; write PNGs and a grid."""
    outputs.out_folder(out, command="sample")
    compile_options = _compile_options(compile, compile_mode, compile_backend)
    dev, dt = _precision(device, dtype)
    _quiet_libraries()
    from diffslim.evaluate import eval_set_for, sized
    from diffslim.report import image_grid
    from diffslim.sample import SampleSpec, sample

    if n < 1:
        raise UserError("--n must be at least 1")
    model = _model_for(model, recipe)
    loaded, rec = _load_with_recipe(model, recipe, steps, device=dev, dtype=dt)
    es = sized(eval_set_for(loaded, n, seed=seed, prompts_file=prompts), loaded, height, width)
    default_steps = loaded.zoo.default_steps if loaded.zoo else 50
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=steps or default_steps, scheduler=scheduler,
                      call_kwargs=es.call_kwargs, batch_size=batch_size)
    if compile_options is not None:
        from diffslim.compiling import compile_pipeline

        compile_pipeline(loaded.pipe, **compile_options)
    images = sample(loaded.pipe, spec, show_progress=True)
    again = outputs.claim_out(out, "sample")
    if not _main_process():  # every process holds every image; the first writes them
        return
    if again:  # a rerun with fewer samples leaves none of the earlier run's beside its own
        import re

        outputs.remove_previous(out, [p.name for p in out.iterdir() if re.fullmatch(r"\d{4,}\.png", p.name)])
    for i, im in enumerate(images):
        image_grid(im[None], nrow=1, pad=0).save(out / f"{i:04d}.png")
    image_grid(images, nrow=8, upscale=max(1, 64 // images.shape[-1])).save(out / "grid.png")
    console.print(f"wrote {len(images)} samples and grid.png to {out}")


@app.command()
@_guard
def evaluate(
    model: Optional[str] = typer.Argument(None, help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds (default: the --recipe's model)"),
    recipe: Optional[Path] = typer.Option(None, help="a recipe JSON to apply; metrics compare it to the full model"),
    reference: Optional[str] = typer.Option(None, help="with --recipe: the full model the outputs are compared with "
                                            "(default: the model the recipe started from, e.g. the original of a "
                                            "workflow's pruned stage, else MODEL)"),
    n: int = typer.Option(100, min=1, help="number of evaluation samples"),
    steps: Optional[int] = typer.Option(None, min=1, help="inference steps of the full model (default: the model's)"),
    seed: int = _SEED_OPT,
    prompts: Optional[Path] = _PROMPTS_OPT,
    batch_size: int = typer.Option(50, min=1, help="inputs per pipeline call"),
    clip: Optional[Path] = typer.Option(None, help="local CLIP folder (transformers format) for clip_score"),
    lpips: Optional[Path] = typer.Option(None, help="local LPIPS backbone checkpoint for lpips"),
    inception: Optional[Path] = typer.Option(None, help="local FID Inception weights (torch-fidelity format)"),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP + " (the full model's reference too)"),
    compile: bool = typer.Option(False, "--compile", help=_COMPILE_HELP + " (the full model's reference stays eager)"),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode (with --compile)"),
    compile_backend: Optional[str] = typer.Option(None, help="torch.compile backend (with --compile; default inductor)"),
    height: Optional[int] = _SIZE_OPTS["height"], width: Optional[int] = _SIZE_OPTS["width"],
):
    """The metrics that apply to the model (digit_accuracy, PSNR/SSIM to ground truth or to the full model)."""
    _metric_weights(clip, lpips, inception)
    compile_options = _compile_options(compile, compile_mode, compile_backend)
    dev, dt = _precision(device, dtype)
    _quiet_libraries()
    from diffslim.evaluate import eval_set_for, sized, finite, metrics_fn_for
    from diffslim.models.load import load
    from diffslim.sample import ReferenceCache, SampleSpec, model_fingerprint, sample

    if reference is not None and recipe is None:
        raise UserError("--reference is the full model a --recipe's outputs are compared with: add --recipe")
    model = _model_for(model, recipe)
    loaded, rec = _load_with_recipe(model, recipe, device=dev, dtype=dt)
    es = sized(eval_set_for(loaded, n, seed=seed, prompts_file=prompts), loaded, height, width)
    default_steps = loaded.zoo.default_steps if loaded.zoo else 50
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=steps or default_steps,
                      call_kwargs=es.call_kwargs, batch_size=batch_size)
    ref_outputs, ref_model = None, None
    if rec is not None:
        ref_model = reference or rec.original or model
        full = load(ref_model, device=dev, dtype=dt)
        if full.pipe is None:
            raise UserError(f"--reference {ref_model} is not a pipeline: give the original pipeline folder or zoo:NAME")
        ref_outputs = sample(full.pipe, spec, cache=ReferenceCache(), model_id=_placed_id(ref_model, dev, dt),
                             show_progress=True, description="reference (full model)")
    if compile_options is not None:
        from diffslim.compiling import compile_pipeline

        compile_pipeline(loaded.pipe, **compile_options)
    fixed = _recipe_steps(rec) if rec is not None else None  # the steps the recipe samples, where it sets them
    # the recipe's pipeline is asked for the steps it samples (the reference's --steps would only be overridden)
    outputs = sample(loaded.pipe, dataclasses.replace(spec, num_inference_steps=fixed) if fixed else spec,
                     show_progress=True, description="evaluating")
    metrics = metrics_fn_for(loaded, es, clip_path=clip, lpips_path=lpips, inception_path=inception)(outputs,
                                                                                                     ref_outputs)
    if es.baseline is not None and es.ground_truth is not None:
        import torch

        from diffslim.measure import quality

        metrics["bicubic_psnr_gt"] = float(quality.psnr(es.baseline, es.ground_truth).mean())
        metrics["bicubic_ssim_gt"] = float(quality.ssim(es.baseline, es.ground_truth).mean())
        if getattr(loaded.pipe, "upsampler", None) is not None:  # the base the SR model's residual is added to
            base = loaded.pipe.upsample(torch.stack([i["image"] for i in es.inputs]))
            metrics["upsampler_psnr_gt"] = float(quality.psnr(base, es.ground_truth).mean())
            metrics["upsampler_ssim_gt"] = float(quality.ssim(base, es.ground_truth).mean())
    result = {"model": model, "recipe": str(recipe) if recipe else None, "n": n,
              "steps": fixed or spec.num_inference_steps, "ran_on": _ran_on(dev, dt),
              **({"reference": ref_model, "reference_steps": spec.num_inference_steps} if rec is not None else {}),
              **{k: finite(v) for k, v in metrics.items()}}
    for k, why in (result.get("skipped") or {}).items():
        err_console.print(f"[yellow]{k} skipped: {why}[/]", highlight=False)
    if as_json:
        _print_json(result)
        return
    t = Table(title=f"evaluate {model}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in result.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    _print_table(t)


@app.command()
@_guard
def bench(
    model: str = typer.Argument(..., help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds"),
    methods: str = typer.Option("full,steps:25,steps:10", help="comma-separated methods, e.g. full,steps:10"),
    n: int = typer.Option(50, min=1, help="number of inputs every variant samples"),
    steps: Optional[int] = typer.Option(None, min=1, help="steps of the full model (default: the model's)"),
    scheduler: Optional[str] = typer.Option(None, help="scheduler for every variant (default: the pipeline's)"),
    seed: int = _SEED_OPT,
    prompts: Optional[Path] = _PROMPTS_OPT,
    batch_size: int = typer.Option(50, min=1, help="inputs per pipeline call"),
    repeats: int = typer.Option(1, min=1, help="timed runs per variant; the best counts (the full model is timed "
                                "again after the methods, and the gap between its two timings is printed: the "
                                "run's noise)"),
    clip: Optional[Path] = typer.Option(None, help="local CLIP folder (transformers format) for clip_score"),
    lpips: Optional[Path] = typer.Option(None, help="local LPIPS backbone checkpoint for lpips"),
    inception: Optional[Path] = typer.Option(None, help="local FID Inception weights (torch-fidelity format)"),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
    html: Optional[Path] = typer.Option(None, help="write an HTML report to this folder"),
    data: str = _data_option("methods"),
    resolution: Optional[int] = _RESOLUTION_OPT,
    kd_task_weight: Optional[float] = _KD_TASK_WEIGHT_OPT,
    layer_calibration: Optional[int] = typer.Option(None, min=1, help=_LAYER_CALIB_HELP.format("layers:R criteria")),
    compile: bool = typer.Option(False, "--compile", help="torch.compile every variant's denoiser (a skip plan's or "
                                 "multi-depth schedule's per-step decisions stay eager) and time it compiled; the "
                                 "compile time is its own column"),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode (with --compile)"),
    compile_backend: Optional[str] = typer.Option(None, help="torch.compile backend (with --compile; default inductor)"),
    device: Optional[str] = typer.Option(None, help="device every variant samples on: cpu (the default; under "
                                         "accelerate launch, auto), auto, cuda, cuda:N, mps; the methods that train "
                                         "(+kd, +ft, dipgo:R) train where Accelerate says: the GPU when torch sees "
                                         "one"),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP + "; methods that train need float32"),
    height: Optional[int] = _SIZE_OPTS["height"], width: Optional[int] = _SIZE_OPTS["width"],
):
    """Compare compression methods on the same inputs in one run: MACs, speed and quality, one row each."""
    compile_options = _compile_options(compile, compile_mode, compile_backend)
    dev, dt = _precision(_sampling_device(device), dtype)
    _metric_weights(clip, lpips, inception)
    if html is not None:
        outputs.out_folder(html, "--html", command="bench")
    _quiet_libraries()
    from diffslim.bench import check_task_weight, parse_methods, run_bench, timing_note
    from diffslim.evaluate import eval_set_for, sized, finite, metrics_fn_for, reference_images
    from diffslim.models.load import load

    parsed = parse_methods(methods)  # reject bad method names before loading anything
    _check_data(data, resolution)
    check_task_weight(kd_task_weight)
    _check_training_methods(parsed, dtype, dt)
    loaded = load(model, device=dev, dtype=dt)
    es = sized(eval_set_for(loaded, n, seed=seed, prompts_file=prompts), loaded, height, width)
    default_steps = steps or (loaded.zoo.default_steps if loaded.zoo else 50)
    res = run_bench(loaded, methods, es, default_steps=default_steps, scheduler=scheduler, batch_size=batch_size,
                    metrics_fn=metrics_fn_for(loaded, es, clip_path=clip, lpips_path=lpips, inception_path=inception),
                    progress=not as_json, repeats=repeats, data=data, resolution=resolution, task_weight=kd_task_weight,
                    compile=compile_options, layer_calibration=layer_calibration)
    rows = [{k: finite(v) for k, v in r.items()} for r in res.rows]
    if not _main_process():  # under `accelerate launch` every process holds every row; the first reports
        return
    if html is not None:
        from diffslim.report import Report, add_bench_section

        rep = Report(f"diffslim bench: {model} ({n} inputs, {default_steps} steps full)")
        rep.add_text("how it was run", _run_info(dev, dt))
        rep.add_data("ran_on", _ran_on(dev, dt))
        add_bench_section(rep, model, rows, res.outputs, references=reference_images(es),
                          timing=timing_note(res.timing))
        outputs.claim_out(html, "bench")
        rep.write(html)
    if as_json:
        from diffslim.report import json_rows

        # the full row's PSNR, SSIM, LPIPS: null ("ref")
        _print_json({"rows": json_rows(rows, "method"), **({"timing": res.timing} if res.timing else {}),
                     "ran_on": _ran_on(dev, dt)})
        return
    _print_rows(f"bench {model} ({n} inputs, {default_steps} steps full)", rows)
    if res.timing:
        console.print(timing_note(res.timing), highlight=False)
    if html is not None:
        console.print(f"report: {html / 'index.html'}")


@app.command()
@_guard
def workflow(
    model: str = typer.Argument(..., help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds"),
    stages: Optional[str] = typer.Option(None, help="comma-separated stages, applied in order: model stages (layers:R[+kd], "
                                         "bk-sdm:V, depth:N[+ft]), then one schedule stage (steps:N, dpm:N, gamma:N, "
                                         "...), then one skip-plan stage (dipgo:R, deepcache:K, ...), "
                                         "e.g. layers:0.3+kd,steps:20,dipgo:0.3; with --floor, layers:auto, "
                                         "depth:auto, steps:auto, dpm:auto and deepcache:auto search for the most "
                                         "aggressive setting that meets it; without --stages, with a floor: "
                                         "layers:auto,steps:auto,deepcache:auto on a U-Net, layers:auto,steps:auto "
                                         "on a transformer"),
    out: Path = typer.Option(..., help="folder: workflow.json, recipe.json, index.html, stages/ (model stages)"),
    floor: Optional[str] = typer.Option(None, help="stop at the first stage below a floor and keep the stage before, "
                                                   "e.g. psnr=20 or psnr=20,digit_accuracy=0.9 (against the "
                                                   "original's outputs)"),
    n: int = typer.Option(16, min=1, help="number of inputs every stage samples"),
    steps: Optional[int] = typer.Option(None, min=1, help="steps of the original (default: the model's)"),
    scheduler: Optional[str] = typer.Option(None, help="scheduler (default: the pipeline's)"),
    seed: int = _SEED_OPT,
    prompts: Optional[Path] = _PROMPTS_OPT,
    batch_size: int = typer.Option(16, min=1, help="inputs per pipeline call"),
    data: str = _data_option("stages"),
    resolution: Optional[int] = _RESOLUTION_OPT,
    kd_task_weight: Optional[float] = _KD_TASK_WEIGHT_OPT,
    layer_calibration: Optional[int] = typer.Option(None, min=1, help=_LAYER_CALIB_HELP.format(
        "layers stages' criteria")),
    search: str = typer.Option("greedy", help="greedy: each auto stage takes all the floor it can, in order; joint: "
                                              "also runs the stack with each auto stage that has another auto stage "
                                              "after it at milder settings (--joint-width of them) or left out, and "
                                              "keeps the cheapest result (--objective); a rerun resumes"),
    objective: str = typer.Option("macs", help="what --search joint makes smallest: macs (of a sampling run, then "
                                               "params) or params (then macs)"),
    joint_width: int = typer.Option(3, help="--search joint: milder settings tried of each auto stage that has "
                                            "another after it (with the kept one and none: (W+2)^B workflow runs "
                                            "for B such stages)"),
    repeats: int = typer.Option(1, min=1, help="timed sampling runs per stage; the fastest counts (the speedup "
                                "column; the stages are judged on the first)"),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
    device: Optional[str] = typer.Option(None, help="device every stage samples on (its timings are measured "
                                         "there): cpu (the default; under accelerate launch, auto), auto, cuda, "
                                         "cuda:N, mps; the trainers use the GPU when torch sees one"),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP + "; stages that train (+kd, +ft, dipgo:R) need float32"),
    height: Optional[int] = _SIZE_OPTS["height"], width: Optional[int] = _SIZE_OPTS["width"],
):
    """Stack methods stage by stage, each judged against the original; write the final recipe and pipeline."""
    outputs.out_folder(out, command="workflow")
    dev, dt = _precision(_sampling_device(device), dtype)
    _quiet_libraries()
    from diffslim.bench import check_task_weight
    from diffslim.evaluate import eval_set_for, sized, finite, metrics_fn_for, reference_images
    from diffslim.models.load import load
    from diffslim.report import Report, add_workflow_section, json_rows
    from diffslim.bench import timing_note
    from diffslim.workflow import check_search, parse_floor, parse_stages, run_workflow

    if stages is not None:
        _check_training_methods(parse_stages(stages), dtype, dt, "run")  # bad stages: refused before any loading
    check_search(search, objective, joint_width)
    _check_data(data, resolution)
    check_task_weight(kd_task_weight)
    floors = parse_floor(floor)
    if stages is None and not floors:
        raise UserError("give --stages, or a --floor (e.g. psnr=30) for the default stack of auto stages")
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    loaded = load(model, device=dev, dtype=dt)
    if stages is None:
        from diffslim.workflow import default_stages

        stages = default_stages(loaded.denoiser)
        if not as_json:
            console.print(f"stages: {stages} (the default for a {type(loaded.denoiser).__name__})", highlight=False)
    es = sized(eval_set_for(loaded, n, seed=seed, prompts_file=prompts), loaded, height, width)
    default_steps = steps or (loaded.zoo.default_steps if loaded.zoo else 50)
    outputs.claim_out(out, "workflow")
    res = run_workflow(loaded, stages, es, out, default_steps=default_steps, scheduler=scheduler,
                       batch_size=batch_size, metrics_fn=metrics_fn_for(loaded, es), floor=floors,
                       progress=not as_json, log=lambda m: (err_console if as_json else console).print(
                           m, highlight=False), data=data, resolution=resolution,  # with --json, on stderr
                       task_weight=kd_task_weight, search=search, objective=objective,
                       joint_width=joint_width, repeats=repeats, command=_command_line(),
                       layer_calibration=layer_calibration)
    if not _main_process():  # under `accelerate launch` every process holds every row; the first reports
        return
    rep = Report(f"diffslim workflow: {model}")
    rep.add_text("how it was run", _run_info(dev, dt))
    rep.add_data("ran_on", _ran_on(dev, dt))
    add_workflow_section(rep, model, res, floors, recipe_file="recipe.json", references=reference_images(es),
                         timing=timing_note(res.timing, "the stages"))
    rep.write(out)
    check = " ".join([f"diffslim evaluate --recipe {out / 'recipe.json'} --n {n}"]
                     + [f"--{o.replace('_', '-')} {v}" for o, v in (("steps", steps), ("seed", seed or None),
                                                                     ("prompts", prompts), ("height", height),
                                                                     ("width", width)) if v is not None])
    from diffslim.report.card import workflow_card

    _card(out, **workflow_card(out, model, res, stages, n, floor, check))
    if as_json:
        _print_json({**res.to_json(), "rows": json_rows([{k: finite(v) for k, v in r.items()} for r in res.rows],
                                                        "stage")})
        return
    _print_rows(f"workflow {model} ({n} inputs; every row against the original's outputs)",
                [{k: ("yes" if v else "no") if k == "accepted" else finite(v) for k, v in r.items()} for r in res.rows],
                key="stage")
    if res.branches:
        _print_rows(f"joint search: {len(res.branches)} stacks tried, the cheapest in {objective} chosen",
                    [{"stages": b["stages"], "kept": ", ".join(b["kept"]) or "none",
                      **{k: v for k, v in b.items() if k not in ("stages", "kept", "out", "chosen")},
                      "chosen": "yes" if b["chosen"] else ""} for b in res.branches], key="stages")
    if res.timing:
        console.print(timing_note(res.timing, "the stages"), highlight=False)
    if res.stopped:
        console.print(f"[yellow]{res.stopped}[/]", highlight=False)
    named = Path(res.recipe.model) if Path(res.recipe.model).is_absolute() else out / res.recipe.model
    inside = named.exists() and named.resolve().is_relative_to(out.resolve())  # a stage, not a zoo name or Hub id
    console.print(f"recipe: {out / 'recipe.json'} (diffslim.from_recipe(\"{out / 'recipe.json'}\") loads "
                  f"{res.recipe.model} and applies it; "
                  + (f"move or copy {out} as a whole" if inside else f"it loads {res.recipe.model} from where it is, "
                                                                      f"not from {out}")
                  + f"); report: {out / 'index.html'}", highlight=False)
    console.print(f"[dim]to check the last row on other inputs or more of them: {escape(check)} (against "
                  f"{escape(res.recipe.original or model)})[/]", highlight=False)


def _compile_options(compile: bool, mode: Optional[str], backend: Optional[str]) -> Optional[dict]:
    """``torch.compile`` arguments from --compile, --compile-mode and --compile-backend, checked before any work;
    None without --compile."""
    if not compile:
        given = [o for o, v in (("--compile-mode", mode), ("--compile-backend", backend)) if v is not None]
        if given:
            raise UserError(f"{' and '.join(given)} would be ignored without --compile")
        return None
    from diffslim.compiling import check_compile_options

    check_compile_options(backend or "inductor", mode)
    return {k: v for k, v in (("backend", backend), ("mode", mode)) if v is not None}


def _check_training_methods(parsed, name: str, dtype, command: str = "bench") -> None:
    """Refuse bench methods or workflow stages that train (distillation, fine-tuning, the DiP-GO pruner) in another
    dtype than float32."""
    import torch

    if dtype != torch.float32:
        train = [f"{m}:{a}" for m, a in parsed if a is not None and (("+kd" in a or ("+ft" in a and "+ft@" not in a))
                                                                    or (m == "dipgo" and not a.startswith("@")))]
        if train:
            raise UserError(f"--dtype {name}: {', '.join(train)} train{'s' if len(train) == 1 else ''} the model, "
                            f"which diffslim does in float32; {command} them in float32, or train first and "
                            f"{command} the result (dipgo:@RECIPE, depth:N+ft@FOLDER)")


def _check_data(data: str, resolution: Optional[int] = None) -> None:
    """Refuse, before anything loads or runs, a --data that is neither 'zoo' nor a folder of training images, and a
    --resolution without such a folder."""
    if data == "zoo":
        if resolution is not None:
            raise UserError("--resolution sets the size of a --data folder's images: give --data FOLDER, or drop "
                            "--resolution (the zoo's data has its model's own size)")
        return
    from diffslim.train.data import check_image_folder

    check_image_folder(data)


def _print_rows(title, rows, key: str = "method") -> None:
    t = Table(title=title)
    hidden = ("skipped", "notes", "macs_per_sample", "seconds", "search", "candidates")
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in hidden))
    for c in cols:
        t.add_column(c, justify="left" if c == key else "right")
    from diffslim.report import is_reference_cell, skip_lines

    def cell(r, c):
        if is_reference_cell(r, c, key):  # the reference row itself is what these compare with
            return "ref"
        v = r.get(c)
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(r.get(c, ""))

    for r in rows:
        t.add_row(*[cell(r, c) for c in cols])
    _print_table(t)
    for r in rows:
        if r.get("notes"):
            console.print(f"[dim]{r[key]}: {r['notes']}[/]", highlight=False)
    for line in skip_lines(rows, key):  # one line for a reason every row shares
        console.print(f"[yellow]{escape(line)}[/]", highlight=False)


def _calibration(model: str, n: int, steps: Optional[int], seed: int, prompts: Optional[Path], batch_size: int,
                 depth: Optional[int] = None, check: Optional[Callable] = None, device=None, dtype=None):
    """Load ``model`` (depth-skipped to ``depth`` if given) on ``device`` in ``dtype`` (None: the CPU, float32),
    build ``n`` calibration inputs and the model's own full-step reference outputs (cached, by where and in which
    dtype they ran). ``check(loaded)`` runs before any sampling (it raises ``UserError`` for a model the command
    cannot take)."""
    import torch

    from diffslim.evaluate import eval_set_for
    from diffslim.models.load import load
    from diffslim.sample import ReferenceCache, SampleSpec, sample

    if n < 1:
        raise UserError("--n must be at least 1")
    loaded = load(model, **_placement(device, dtype))
    if loaded.pipe is None:
        raise UserError(f"{model} is not a pipeline; searches sample, so give a pipeline folder or zoo:NAME")
    if check is not None:
        check(loaded)
    es = eval_set_for(loaded, n, seed=seed, prompts_file=prompts)
    full_steps = steps or (loaded.zoo.default_steps if loaded.zoo else 50)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=full_steps, call_kwargs=es.call_kwargs,
                      batch_size=batch_size)
    model_id = _placed_id(model, device or torch.device("cpu"), dtype or torch.float32)
    if depth is not None:
        from diffslim.apply import apply

        apply(loaded.pipe, {"depth": {"depth": depth}})
        model_id += f"|depth={depth}"
    ref = sample(loaded.pipe, spec, cache=ReferenceCache(), model_id=model_id, show_progress=True,
                 description=f"reference outputs ({full_steps} steps)")
    return loaded, spec, ref


@app.command("depth-search")
@_guard
def depth_search_cmd(
    model: str = typer.Argument(..., help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds (a U-Net denoiser)"),
    threshold: Optional[float] = typer.Option(None, help="minimum quality against the full model's outputs "
                                              "(default: 30 dB for psnr, 0.95 for ssim)"),
    metric: str = typer.Option("psnr", help="psnr or ssim"),
    mode: str = typer.Option("binary", help="binary (log2 runs; assumes quality falls with depth) or linear (every depth)"),
    n: int = typer.Option(100, min=1, help="calibration inputs (the paper uses 100)"),
    steps: Optional[int] = typer.Option(None, min=1, help="sampling steps (default: the model's)"),
    seed: int = typer.Option(10_000, min=0, max=_SEED_MAX,
                             help="seed of the first calibration input (kept apart from evaluation seeds)"),
    prompts: Optional[Path] = _PROMPTS_OPT,
    batch_size: int = typer.Option(50, min=1, help="inputs per pipeline call"),
    out: Optional[Path] = typer.Option(None, help="write a recipe with the chosen depth"),
    plot: Optional[Path] = typer.Option(None, help="write the quality-vs-depth plot (PNG, or another format "
                                         "matplotlib writes: .pdf, .svg, ...)"),
    multi: bool = typer.Option(False, "--multi", help="also search a depth per timestep range (two ranges) and "
                                                      "compare its MACs with the single depth's"),
    split: Optional[int] = typer.Option(None, help="with --multi: timesteps >= SPLIT form the first range "
                                                   "(default: the middle of the sampled steps)"),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP + " (the reference outputs too)"),
):
    """Find the shallowest depth-skip depth whose quality stays at or above the threshold (U-Nets: depth skipping
    keeps the outer levels and drops the inner ones with their skip connections; layer-prune serves transformers)."""
    dev, dt = _precision(device, dtype)
    if out is not None:
        outputs.out_file(out)
    if plot is not None:
        outputs.figure_file(plot, "--plot", "depth.png")
    _quiet_libraries()
    from diffslim.apply import denoiser_attr
    from diffslim.methods.depth_search import METRICS, check_split, depth_search_figure, search_depth
    from diffslim.recipe import Depth, Recipe

    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    if threshold is None:
        threshold = {"psnr": 30.0, "ssim": 0.95}[metric]
    if metric == "ssim" and not -1 <= threshold <= 1:
        raise UserError(f"--threshold {threshold:g} with --metric ssim: SSIM lies in [-1, 1]; give e.g. 0.95")
    if metric == "psnr" and threshold < 0:  # images in [0, 1]: the MSE is at most 1, the PSNR at least 0
        raise UserError(f"--threshold {threshold:g} with --metric psnr: every depth has a PSNR of at least 0 dB "
                        "(images in [0, 1]); give e.g. 30")
    if mode not in ("binary", "linear"):
        raise UserError(f"unknown --mode {mode!r}; accepted: binary, linear")
    if split is not None and not multi:
        raise UserError("--split sets where the two timestep ranges of --multi meet: add --multi, or drop --split")
    if split is not None:
        check_split(split)

    def needs_depth_units(loaded):
        from diffslim.methods.depth_skip import max_depth

        max_depth(loaded.denoiser)  # a UserError naming what depth skipping takes

    loaded, spec, ref = _calibration(model, n, steps, seed, prompts, batch_size, check=needs_depth_units,
                                     device=dev, dtype=dt)
    say = (lambda d, q: None) if as_json else (lambda d, q: console.print(f"depth {d:2d}: {metric} {q:.3f}"))
    res = search_depth(loaded.pipe, denoiser_attr(loaded.pipe), spec, ref, threshold, metric, mode, progress=say)
    if res.reached and not as_json:
        console.print(f"shallowest depth with {metric} >= {threshold}: [bold]{res.depth}[/] of {res.full_depth} "
                      f"({res.sampling_runs} sampling runs of {n} inputs, {res.seconds:.1f}s)")
    if plot is not None and _main_process():  # under `accelerate launch` the first process writes
        depth_search_figure(res, f"{model}: depth search ({mode})").savefig(plot, dpi=110, bbox_inches="tight")
        _wrote(plot, "plot", as_json)
    mres = None
    if multi:
        from diffslim.methods.depth_search import search_multi_depth
        from diffslim.recipe import DepthRange

        say2 = (lambda h, lo, q: None) if as_json else \
            (lambda h, lo, q: console.print(f"depth {h:2d} for t >= split, {lo:2d} below: {metric} {q:.3f}"))
        mres = search_multi_depth(loaded.pipe, denoiser_attr(loaded.pipe), spec, ref, threshold, split, metric,
                                  progress=say2)
        single_ratio = mres.depth_macs[res.depth] / mres.depth_macs[res.full_depth]
    if not _main_process():
        pass
    elif out is not None and mres is not None and mres.reached and mres.macs_ratio < single_ratio:
        Recipe(model=model, depth=Depth(schedule=[DepthRange(t_min=t, depth=d) for t, d in mres.schedule()]),
               description=f"multi-depth {mres.depth_high} (t >= {mres.split}) / {mres.depth_low}: "
                           f"{metric} {mres.evaluations.get((mres.depth_high, mres.depth_low), float('inf')):.3f} "
                           f">= {threshold} at {mres.macs_ratio:.3f} of the MACs").save(out)
        _wrote(out, "recipe (the multi-depth schedule)", as_json)
    elif out is not None and res.reached:
        Recipe(model=model, depth=Depth(depth=res.depth),
               description=f"depth-skip at {res.depth}: {metric} {res.evaluations[res.depth]:.3f} >= {threshold}"
               ).save(out)
        _wrote(out, f"recipe (depth {res.depth})", as_json)
    if mres is not None and not as_json:
        console.print(f"single depth {res.depth}: {single_ratio:.3f} of the MACs; multi-depth {mres.depth_high} "
                      f"for t >= {mres.split} ({mres.steps_high} steps), {mres.depth_low} below ({mres.steps_low} "
                      f"steps): {mres.macs_ratio:.3f} of the MACs ({mres.sampling_runs} sampling runs, "
                      f"{mres.seconds:.1f}s)")
    if as_json:
        extra = {"multi": {**mres.to_json(), "single_macs_ratio": single_ratio},
                 "seconds_total": res.seconds + mres.seconds} if mres is not None else {}
        _print_json({"model": model, **res.to_json(), **extra})
    if not res.reached:
        best = res.best_pruned
        _fail(f"no pruned depth reaches {metric} >= {threshold}; the best found is depth {best} with "
              f"{res.evaluations[best]:.3f}; lower --threshold" + (" (no recipe written)" if out else ""), code=1)


@app.command("timesteps")
@_guard
def timesteps_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds to search gamma on; omit to print a schedule"),
    steps: int = typer.Option(..., min=1, help="number of sampling steps N"),
    gamma: Optional[float] = typer.Option(None, help="gamma of the schedule (without MODEL)"),
    coef: float = typer.Option(30.0, help="the schedule's offset c"),
    method: str = typer.Option("both", help="greedy (the paper's line search), bounded (scipy) or both"),
    n: int = typer.Option(16, min=1, help="calibration inputs"),
    full_steps: Optional[int] = typer.Option(None, min=1, help="steps of the reference outputs (default: the model's)"),
    seed: int = typer.Option(10_000, min=0, max=_SEED_MAX,
                             help="seed of the first calibration input (kept apart from evaluation seeds)"),
    prompts: Optional[Path] = _PROMPTS_OPT,
    batch_size: int = typer.Option(50, min=1, help="inputs per pipeline call"),
    depth: Optional[int] = typer.Option(None, help="search for the depth-skipped model at this depth (against its own full-step outputs)"),
    out: Optional[Path] = typer.Option(None, help="write a recipe with the schedule (the one found, or without MODEL "
                                                  "the one of --gamma)"),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
    device: str = typer.Option("auto", help=_DEVICE_HELP + " (with MODEL)"),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP + " (with MODEL; the reference outputs too)"),
):
    """Print a gamma-curve schedule, or find the gamma whose N-step outputs best match the full-step outputs."""
    dev, dt = _precision(device, dtype)
    if out is not None:
        outputs.out_file(out)
    _quiet_libraries()
    from diffslim.methods.timesteps import gamma_timesteps

    if model is not None and gamma is not None:
        raise UserError("--gamma prints the schedule of one gamma (without MODEL); with a MODEL, gamma is searched: "
                        "drop --gamma, or drop MODEL")
    if model is None:
        if gamma is None:
            raise UserError("give --gamma to print a schedule, or a MODEL to search gamma on")
        searching = [p.opts[0] for p in ctx.command.params if p.name in (
            "method", "n", "full_steps", "seed", "prompts", "batch_size", "depth", "device", "dtype")
            and ctx.get_parameter_source(p.name).name == "COMMANDLINE"]
        if searching:
            raise UserError(f"{', '.join(searching)} set{'s' if len(searching) == 1 else ''} up the search of gamma "
                            "on a MODEL; without MODEL only --steps, --gamma, --coef, --out and --json apply")
        try:
            ts = gamma_timesteps(steps, gamma, coef)
        except ValueError as e:
            raise UserError(f"--gamma/--coef: {e}".replace("gamma_timesteps: ", "")) from None
        if out is not None:
            from diffslim.recipe import Recipe, Sampling

            Recipe(sampling=Sampling(timesteps=ts, gamma=gamma, coef=coef),
                   description=f"gamma-curve {steps}-step schedule, gamma {gamma:g}, c {coef:g}").save(out)
            _wrote(out, "recipe", as_json)
        if as_json:
            _print_json({"steps": steps, "gamma": gamma, "coef": coef, "timesteps": ts})
        else:
            console.print(" ".join(map(str, ts)))
        return
    from diffslim.methods.timestep_search import search_gamma
    from diffslim.recipe import Recipe, Sampling

    methods = {"both": ("greedy", "bounded"), "greedy": ("greedy",), "bounded": ("bounded",)}.get(method)
    if methods is None:
        raise UserError(f"unknown --method {method!r}; accepted: greedy, bounded, both")
    if steps < 2:
        raise UserError("--steps must be at least 2")
    loaded, spec, ref = _calibration(model, n, full_steps, seed, prompts, batch_size, depth=depth, device=dev,
                                     dtype=dt)
    res = search_gamma(loaded.pipe, spec, ref, steps, methods=methods, coef=coef)
    if out is not None and _main_process():  # under `accelerate launch` the first process writes
        from diffslim.recipe import Depth

        Recipe(model=model, sampling=Sampling(timesteps=res.timesteps, gamma=res.best.best_gamma, coef=coef),
               depth=Depth(depth=depth) if depth is not None else None,
               description=f"gamma-curve {steps}-step schedule, PSNR {res.best.best_score:.3f} vs {spec.num_inference_steps} steps"
               ).save(out)
        _wrote(out, "recipe", as_json)
    if as_json:
        _print_json({"model": model, "depth": depth, **res.to_json()})
        return
    for k, r in res.results.items():
        console.print(f"{k}: gamma {r.best_gamma:.4f}, PSNR {r.best_score:.3f} dB, {r.n_evals} evaluations, {r.seconds:.1f}s")
    console.print(f"timesteps: {' '.join(map(str, res.timesteps))}")


def _distill_config(out, steps, batch_size, lr, checkpoint_every, log_every, ema_decay, mixed_precision,
                    gradient_checkpointing, seed, log_with, normalized, lambda_task, lambda_out, lambda_feat,
                    match_plain_weight=False, feat_norm="batch"):
    from diffslim.train.distill import DistillConfig

    return DistillConfig(steps=steps, batch_size=batch_size, lr=lr, out=out, checkpoint_every=checkpoint_every,
                         log_every=log_every, ema_decay=ema_decay if ema_decay != 0 else None,
                         mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, seed=seed,
                         log_with=log_with, normalized=normalized, lambda_task=lambda_task, lambda_out=lambda_out,
                         lambda_feat=lambda_feat, match_plain_weight=match_plain_weight, feat_norm=feat_norm).check()


_TRAIN_OPTS = dict(
    data=typer.Option("zoo", help="'zoo' (the zoo model's own data), an image folder, or a folder with input/ and target/"),
    steps=typer.Option(500, "--steps", "--iters", min=1, help="optimizer steps (--iters, as dipgo calls them; not "
                                                               "sampling steps)"),
    batch_size=typer.Option(32, min=1, help="batch size per process"),
    lr=typer.Option(1e-4),
    checkpoint_every=typer.Option(100, min=1, help="checkpoint every N steps; rerun the same command to resume exactly"),
    log_every=typer.Option(10, min=1),
    ema_decay=typer.Option(0.999, help="EMA of the student; 0 disables it"),
    mixed_precision=typer.Option("no", help="no, fp16 (CUDA GPUs) or bf16"),
    gradient_checkpointing=typer.Option(False, help="trade compute for memory"),
    seed=typer.Option(0, min=0, max=_SEED_MAX),
    log_with=typer.Option("csv", help="csv or tensorboard"),
)


@app.command()
@_guard
def finetune(
    model: str = typer.Argument(..., help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds: the teacher"),
    depth: int = typer.Option(..., help="depth-skip depth of the student"),
    out: Path = typer.Option(Path("finetune"), help="run folder: checkpoints, train_log.csv, student/"),
    data: str = _TRAIN_OPTS["data"], steps: int = _TRAIN_OPTS["steps"], batch_size: int = _TRAIN_OPTS["batch_size"],
    lr: float = _TRAIN_OPTS["lr"], checkpoint_every: int = _TRAIN_OPTS["checkpoint_every"],
    log_every: int = _TRAIN_OPTS["log_every"], ema_decay: float = _TRAIN_OPTS["ema_decay"],
    mixed_precision: str = _TRAIN_OPTS["mixed_precision"],
    gradient_checkpointing: bool = _TRAIN_OPTS["gradient_checkpointing"], seed: int = _TRAIN_OPTS["seed"],
    log_with: str = _TRAIN_OPTS["log_with"],
    normalized: bool = typer.Option(False, "--normalized/--plain", help="feature loss normalized by the teacher's feature norm (LAPTOP-Diff) or plain (default)"),
    lambda_out: float = typer.Option(1.0, help="weight of the output distillation"),
    lambda_feat: float = typer.Option(1.0, help="weight of the feature distillation"),
    feat_norm: str = typer.Option("batch", help="with --normalized: the teacher norm over the whole batch ('batch') "
                                  "or each sample's own ('sample')"),
    lambda_task: Optional[float] = typer.Option(None, help="weight of the diffusion task loss; default 1, and 0 for a "
                                                "consistency model (LCM, TCD), which was not trained on it"),
):
    """Fine-tune a depth-skipped model: diffusion loss + distillation from the unpruned teacher."""
    outputs.out_folder(out, command="finetune")
    _quiet_libraries()
    from diffslim.methods.depth_skip import removed_modules
    from diffslim.methods.finetune import finetune_depth
    from diffslim.models.load import load

    cfg = _distill_config(out, steps, batch_size, lr, checkpoint_every, log_every, ema_decay, mixed_precision,
                          gradient_checkpointing, seed, log_with, normalized,
                          1.0 if lambda_task is None else lambda_task, lambda_out, lambda_feat,
                          feat_norm=feat_norm)  # settings refused before the model loads
    loaded = load(model)
    if loaded.pipe is None:
        raise UserError(f"{model} is not a pipeline; fine-tuning needs a pipeline folder or zoo:NAME")
    from diffslim.train.distill import consistency_model

    if lambda_task is None and consistency_model(loaded.pipe):
        cfg.lambda_task = 0.0
        _consistency_note(loaded.pipe)
    removed_modules(loaded.denoiser, depth)
    outputs.claim_out(out, "finetune")
    student, folder, res = finetune_depth(loaded.pipe, depth, data, cfg)
    pipeline = _student_pipeline(loaded, student, Path(out) / "pipeline", folder)
    _trained_cards(model, loaded, folder, pipeline, cfg, res,
                   f"Depth-skip pruning (Kim and Cho, 2024) at depth {depth}, then fine-tuned with distillation from "
                   f"`{model}`", data)
    console.print(f"fine-tuned student (depth {depth}): {folder}; log: {Path(out) / 'train_log.csv'}"
                  + (f"\npipeline with the student (sample, evaluate and bench take it): {pipeline}"
                     if pipeline else ""))


def _trained_cards(teacher: str, loaded, student_dir: Path, pipeline: Optional[Path], cfg, res, what: str,
                   data: str, started_from: Optional[Path] = None) -> None:
    """The model cards of a trained student's folder and of the pipeline written with it (the first process);
    ``started_from``: the student folder the training started from, whose card's history comes first."""
    if not _main_process():
        return
    from diffslim.models.load import load
    from diffslim.report.card import trained_card

    kwargs = trained_card(teacher, loaded.denoiser, load(str(student_dir)).denoiser, cfg, res, what, data,
                          started_from)
    for folder in (student_dir, pipeline):
        if folder is not None and folder.is_dir():
            _card(folder, **kwargs)


def _consistency_note(pipe) -> None:
    console.print(f"[dim]{type(pipe).__name__} samples a consistency model ({type(pipe.scheduler).__name__}): its "
                  "denoiser was trained to match a teacher's trajectory, not the diffusion task loss, which would pull "
                  "the student towards the blurred mean of the training images; training without it (give "
                  "--lambda-task to set it)[/]", highlight=False)


def _student_pipeline(teacher, student, folder: Path, student_dir: Optional[Path] = None) -> Optional[Path]:
    """The teacher's pipeline with the trained ``student`` in its denoiser's place, written to ``folder``: what
    ``sample``, ``evaluate``, ``bench`` and ``diffusers`` load (a lone student folder is a model, not a pipeline).
    None for a teacher without weights."""
    if teacher.pipe is None or not teacher.has_weights:
        return None
    if not _main_process():  # under `accelerate launch` the first process writes it
        return folder
    from diffslim.apply import denoiser_attr

    attr = denoiser_attr(teacher.pipe)
    setattr(teacher.pipe, attr, student)
    teacher.pipe.save_pretrained(str(folder), safe_serialization=True)
    if student_dir is not None:  # the student's weights once on disk, where the two writes gave the same bytes
        outputs.share_files(student_dir, folder / attr, only_identical=True)
    return folder


def _teacher_samples(teacher, prompts: Path, n: int, steps: Optional[int], folder: Path) -> Path:
    """``distill --data PROMPTS.txt``: ``n`` images the teacher samples from the prompts (cycled), with the prompts as
    captions, in ``folder`` (resumed if there): training data for a user who has prompts but no images. ``--data
    INPUTS.jsonl`` of a pipeline that takes an input image (a ControlNet's control image, InstructPix2Pix's input):
    training pairs, each input image beside the teacher's output (``input/`` and ``target/``)."""
    from diffslim.evaluate import eval_set_for
    from diffslim.sample import SampleSpec, write_samples

    from diffslim.train.data import pipeline_inputs

    if prompts.suffix.lower() not in (".txt", ".jsonl"):
        raise UserError(f"--data {prompts}: give 'zoo', an image folder, a .txt file of prompts or class labels "
                        "(one per line), or a .jsonl file of pipeline inputs (one JSON object per line)")
    # prompts, class labels for class-conditional pipelines, or a .jsonl file's inputs (with their images)
    lines = pipeline_inputs(teacher.pipe, str(prompts), 0)
    es = eval_set_for(teacher, 1, require_inputs=False)
    spec = SampleSpec([dict(lines[i % len(lines)]) for i in range(n)], [300_000 + i for i in range(n)],
                      num_inference_steps=steps or (teacher.zoo.default_steps if teacher.zoo is not None else 50),
                      call_kwargs=dict(es.call_kwargs), batch_size=8)
    write_samples(teacher.pipe, spec, folder, progress=True)
    console.print(f"{n} teacher samples of {len(lines)} inputs ({spec.num_inference_steps} steps) in {folder}")
    return folder


@app.command()
@_guard
def distill(
    ctx: typer.Context,
    teacher: str = typer.Argument(..., help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds"),
    student: Path = typer.Argument(..., help="a denoiser folder (config.json + safetensors), e.g. a pruned model"),
    out: Path = typer.Option(Path("distill"), help="run folder"),
    data: str = typer.Option("zoo", help="'zoo' (the zoo model's own data), an image folder, a folder with input/ "
                                         "and target/, or a .txt file of prompts (or class labels): the teacher "
                                         "samples its own training images from them (text-to-image and "
                                         "class-conditional pipelines); a .jsonl file of pipeline inputs with "
                                         "images (ControlNet, InstructPix2Pix): its training pairs"),
    teacher_samples: int = typer.Option(256, min=1, help="with --data PROMPTS.txt (or .jsonl): how many images the teacher "
                                                         "samples (the prompts cycled; written to OUT/teacher_samples, "
                                                         "resumed if interrupted)"),
    sample_steps: Optional[int] = typer.Option(None, min=1, help="with --data PROMPTS.txt: the teacher's sampling "
                                                                 "steps (default: the zoo model's, else 50)"),
    steps: int = _TRAIN_OPTS["steps"], batch_size: int = _TRAIN_OPTS["batch_size"],
    lr: float = _TRAIN_OPTS["lr"], checkpoint_every: int = _TRAIN_OPTS["checkpoint_every"],
    log_every: int = _TRAIN_OPTS["log_every"], ema_decay: float = _TRAIN_OPTS["ema_decay"],
    mixed_precision: str = _TRAIN_OPTS["mixed_precision"],
    gradient_checkpointing: bool = _TRAIN_OPTS["gradient_checkpointing"], seed: int = _TRAIN_OPTS["seed"],
    log_with: str = _TRAIN_OPTS["log_with"],
    normalized: bool = typer.Option(True, "--normalized/--plain", help="LAPTOP-Diff's normalized feature loss (default) or BK-SDM's plain sum"),
    lambda_task: Optional[float] = typer.Option(None, help="weight of the diffusion task loss; default 1, and 0 with "
                                                "--data PROMPTS.txt, where the teacher's own samples make it repeat "
                                                "the output term, and for a consistency model (LCM, TCD), which was "
                                                "not trained on it"),
    lambda_out: float = typer.Option(1.0), lambda_feat: float = typer.Option(1.0),
    match_plain_weight: bool = typer.Option(False, help="with --normalized: scale the feature term so that it starts "
                                            "with the plain sum's total weight (only the balance among layers changes)"),
    feat_norm: str = typer.Option("batch", help="with --normalized: divide each block's feature term by the teacher's "
                                  "norm over the whole batch ('batch') or each sample's by its own ('sample')"),
    resolution: Optional[int] = typer.Option(None, min=1, help="image size in px of the --data folder's training images "
                                                         "(default: the pipeline's own, 1024 for Flux)"),
):
    """Distil a teacher pipeline's denoiser into a student denoiser (task + output + feature losses)."""
    outputs.out_folder(out, command="distill")
    own_samples = data != "zoo" and Path(data).is_file()
    if not own_samples:
        given = [o for o, name in (("--teacher-samples", "teacher_samples"), ("--sample-steps", "sample_steps"))
                 if ctx.get_parameter_source(name).name == "COMMANDLINE"]
        if given:
            raise UserError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} how the teacher samples its "
                            "own training images from --data PROMPTS.txt; with an image folder or 'zoo' drop "
                            f"{'it' if len(given) == 1 else 'them'}")
    task_given = lambda_task is not None
    if lambda_task is None:
        lambda_task = 0.0 if own_samples else 1.0
    cfg = _distill_config(out, steps, batch_size, lr, checkpoint_every, log_every, ema_decay, mixed_precision,
                          gradient_checkpointing, seed, log_with, normalized, lambda_task, lambda_out, lambda_feat,
                          match_plain_weight, feat_norm)
    _quiet_libraries()
    from diffslim.models.load import load
    from diffslim.train.data import make_dataset
    from diffslim.train.distill import distill as run

    # a teacher that samples its own training images does so on the GPU the trainer uses (each process its own under
    # a launch); on the CPU an SD-sized teacher's 256 samples take hours
    t = load(teacher, device="auto" if own_samples else "cpu")
    if t.pipe is None:
        raise UserError(f"{teacher} is not a pipeline; the teacher must be a pipeline folder or zoo:NAME")
    s = load(str(student))
    if not s.has_weights or s.pipe is not None:
        raise UserError(f"{student} must be a denoiser folder with safetensors weights")
    from diffslim.train.distill import consistency_model, task_for

    task_for(t.pipe)  # a pipeline it cannot train is refused before the teacher samples anything
    if not task_given and lambda_task != 0 and consistency_model(t.pipe):
        cfg.lambda_task = lambda_task = 0.0
        _consistency_note(t.pipe)
    outputs.claim_out(out, "distill")
    if own_samples:
        data = str(_teacher_samples(t, Path(data), teacher_samples, sample_steps, Path(out) / "teacher_samples"))
        if lambda_task != 0:
            console.print("[dim]on the teacher's own samples the task loss repeats the output term: without it "
                          "(the default here) the zoo's digits U-Net distilled as well as on its real images, with it "
                          "4 dB worse (docs/layer-pruning.md, 'Calibration without training images')[/]", highlight=False)
    res = run(t.pipe, s.denoiser, make_dataset(data, t.pipe, resolution), cfg)
    scale = f"; feature weight x{res.feat_scale:.4g} (matched to the plain sum)" if match_plain_weight else ""
    folder = Path(res.out_dir) / "student"
    pipeline = _student_pipeline(t, load(str(folder)).denoiser, Path(out) / "pipeline", folder)
    _trained_cards(teacher, t, folder, pipeline, cfg, res, f"Distilled from `{teacher}`", data, student)
    console.print(f"student: {folder}; final losses: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in res.final_losses.items()) + scale
                  + (f"\npipeline with the student (sample, evaluate and bench take it): {pipeline}"
                     if pipeline else ""))


@app.command("zoo-train")
@_guard
def zoo_train(
    name: str = typer.Argument(..., help="zoo model name, or 'classifier'"),
    out: Path = typer.Option(Path("zoo_runs"), help="run folder (checkpoints, log); resumes from it"),
    steps: int = typer.Option(3500, "--steps", "--iters", min=1, help="optimizer steps (--iters, as dipgo calls "
                                                                      "them)"),
    batch_size: int = typer.Option(128, min=1, help="examples per step and process (under accelerate launch the "
                                                   "step's batch is this times the processes)"),
    lr: float = typer.Option(1e-3),
    checkpoint_every: int = typer.Option(250, min=1),
    install: bool = typer.Option(False, help="copy the trained pipeline into the package's zoo folder"),
    blur_sigma: Optional[float] = typer.Option(None, help="sr only: Gaussian blur sigma of the low-resolution "
                                                          "input before 2x decimation (default 1.6, the shipped "
                                                          "zoo:sr's; 0: box averaging)"),
):
    """Train a reference zoo model (checkpoints every N steps; rerun the same command to resume; data parallel under
    accelerate launch)."""
    outputs.out_folder(out, command="zoo-train")
    if lr <= 0:
        raise UserError(f"--lr must be > 0, got {lr}")
    from diffslim.train import zoo as ztrain
    from diffslim.zoo.registry import WEIGHTS_DIR, ZOO

    if name == "classifier":
        if _world_size() > 1:
            raise UserError("`diffslim zoo-train classifier` fits in one process (a few seconds on a CPU): run it "
                            "without the launcher")
        console.print(ztrain.train_classifier(WEIGHTS_DIR))
        return
    if name not in ZOO:
        raise UserError(f"no zoo model {name!r}; the zoo has: {', '.join(sorted(ZOO))}, classifier")
    if blur_sigma is not None and (ZOO[name].task != "sr" or blur_sigma < 0):
        raise UserError("--blur-sigma is for the sr model and must be >= 0")
    _quiet_libraries()
    outputs.claim_out(out, "zoo-train")
    folder = ztrain.train(name, out / name, steps, batch_size, lr, checkpoint_every,
                          pipeline_config=None if blur_sigma is None else {"blur_sigma": blur_sigma})
    console.print(f"pipeline written to {folder}")
    if install and _main_process():
        import shutil

        # copy first, then swap: the installed weights are never gone while the copy could still fail
        target = Path(ZOO[name].folder)
        staging = target.with_name(f".{target.name}.installing")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        console.print(f"installed {name} at {target}")


_CALIBRATION_HELP = ("data: the --data images noised to timesteps across the schedule (the paper's); sampling: the "
                     "calls the pipeline makes to its denoiser while sampling the --data inputs ('zoo', a .txt file "
                     "of prompts or class labels, a .jsonl file of pipeline inputs, an image folder): no training "
                     "images needed, prompts are enough; the taylor criterion needs data")


def _check_calibration(kind: str, calib_steps: Optional[int], resolution: Optional[int]) -> None:
    from diffslim.methods.layer_prune import CALIBRATIONS

    if kind not in CALIBRATIONS:
        raise UserError(f"unknown --calibration {kind!r}; accepted: {', '.join(CALIBRATIONS)}")
    if calib_steps is not None and kind != "sampling":
        raise UserError("--calib-steps sets the sampling steps of --calibration sampling: give that too")
    if resolution is not None and kind == "sampling":
        raise UserError("--resolution sets the size of --calibration data's images; sampling calibration samples "
                        "at the pipeline's own size: drop --resolution")


def _layer_calibration(loaded, kind: str, n: int, seed: int, data: str, resolution: Optional[int],
                       calib_steps: Optional[int]):
    """The calibration triples of layer-prune and layer-compare: noised ``data`` or the pipeline's own denoiser calls
    while sampling it (at ``calib_steps``, default the model's sampling steps)."""
    from diffslim.methods import layer_prune as lp

    if kind == "data":
        return lp.calibration(loaded.pipe, n=n, seed=seed, data=data, size=resolution)
    from diffslim.evaluate import eval_set_for

    steps = calib_steps or (loaded.zoo.default_steps if loaded.zoo is not None else 50)
    return lp.sampling_calibration(loaded.pipe, n=n, seed=seed, data=data, steps=steps,
                                   call_kwargs=dict(eval_set_for(loaded, 1, require_inputs=False).call_kwargs),
                                   progress=True)


@app.command("layer-prune")
@_guard
def layer_prune_cmd(
    model: str = typer.Argument(..., help="pipeline folder, model folder, config-only folder, zoo:NAME or a Hub id the local HF cache holds"),
    ratio: Optional[float] = typer.Option(None, help="share of params (or MACs, --by macs) to remove, in (0, 1); "
                                                     "not used by the bk-sdm-* criteria"),
    criterion: str = typer.Option("output-loss", help="output-loss, output-loss-pairs (second order: also every "
                                                      "pair's loss), magnitude, taylor, random, similarity, greedy, "
                                                      "bk-sdm-base, bk-sdm-small or bk-sdm-tiny"),
    by: str = typer.Option("params", help="params or macs: what the ratio is a share of (a pipeline's MACs are "
                                          "counted on the denoiser call it makes to sample)"),
    max_params: Optional[float] = typer.Option(None, help="with --by macs: also remove at most this share of the "
                                                          "params, in (0, 1) (a selection by MACs alone removes "
                                                          "what is cheap to lose, often most of the params, which "
                                                          "a distillation afterwards then lacks)"),
    out: Path = typer.Option(..., help="folder: model/ (the pruned denoiser), pipeline/ (for pipelines), "
                                       "scores.json, recipe.json"),
    n: int = typer.Option(32, min=1, help="calibration triples (output-loss, taylor, similarity, greedy)"),
    data: str = typer.Option("zoo", help="calibration data: 'zoo' or an image folder, captions optional (SD, SDXL, "
                                                   "InstructPix2Pix, PixArt, SD3, Flux pipelines); with "
                                                   "--calibration sampling also prompts or class labels (.txt) "
                                                   "or pipeline inputs (.jsonl)"),
    calibration_kind: str = typer.Option("data", "--calibration", help=_CALIBRATION_HELP),
    calib_steps: Optional[int] = typer.Option(None, min=1, help="--calibration sampling: sampling steps (default: "
                                                                "the zoo model's, else 50)"),
    seed: int = typer.Option(0, min=0, max=_SEED_MAX,
                             help="seed of the calibration triples (and of the random criterion)"),
    inner: bool = typer.Option(False, help="score the transformer blocks inside deep attention layers (SDXL) "
                                           "instead of whole attention layers"),
    resolution: Optional[int] = typer.Option(None, min=1, help="image size in px of the --data folder's calibration "
                                                         "images (default: the pipeline's own, 1024 for Flux)"),
    pair_pool: Optional[int] = typer.Option(None, help="output-loss-pairs: measure pairs only among this many layers "
                                                       "of least single loss per unit cost (default: all n(n-1)/2 "
                                                       "pairs: 703 for SD-1.5's 38 layers, 3741 for SDXL --inner)"),
    stock: bool = typer.Option(False, help="write model/ and pipeline/ as stock diffusers classes, loadable "
                                           "without diffslim, where a stock config describes the result (fewer "
                                           "transformer blocks; U-Nets: the selection is made among removals a stock "
                                           "config describes: (resnet, attention) pairs in line in the down and up "
                                           "blocks, the whole mid block and, with --inner, blocks inside "
                                           "attention layers)"),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
    device: str = typer.Option("auto", help=_SCORE_DEVICE_HELP),
):
    """One-shot layer pruning (LAPTOP-Diff): score every layer, remove the least important at a ratio."""
    outputs.out_folder(out, command="layer-prune")
    outputs.model_inside(model, out, ("model", "pipeline", *outputs.previous_writes(out)))
    dev = _precision(device, "float32")[0]
    _quiet_libraries()
    from diffslim.methods.layer_prune import (BK_SDM, CRITERIA, check_max_params, check_ratio, is_unet, layer_prune,
                                              prune_layers)
    from diffslim.models.load import load
    from diffslim.recipe import Recipe, RemovedLayers

    bk = [f"bk-sdm-{v}" for v in BK_SDM]
    if criterion not in CRITERIA and criterion not in bk:
        raise UserError(f"unknown --criterion {criterion!r}; accepted: {', '.join(CRITERIA + tuple(bk))}")
    if by not in ("params", "macs"):
        raise UserError(f"unknown --by {by!r}; accepted: params, macs")
    if criterion in bk:
        if ratio is not None:
            raise UserError(f"{criterion} removes a fixed set of blocks; drop --ratio")
    else:
        if ratio is None:
            raise UserError(f"--criterion {criterion} needs --ratio R with 0 < R < 1")
        check_ratio(ratio)
    if max_params is not None:
        check_max_params(max_params)
        if by != "macs" or criterion in bk or stock or criterion == "greedy":
            raise UserError("--max-params caps the params a selection by MACs removes: it needs --by macs and a "
                            "one-shot criterion (output-loss, output-loss-pairs, similarity, taylor, magnitude, "
                            "random), without --stock")
    if n < 1:
        raise UserError("--n must be at least 1")
    _check_calibration(calibration_kind, calib_steps, resolution)
    if calibration_kind == "sampling" and criterion == "taylor":
        raise UserError("--criterion taylor needs the diffusion loss, which sampling trajectories have no target "
                        "for: use --calibration data")
    loaded = load(model, device=dev)
    if pair_pool is not None and (criterion != "output-loss-pairs" or pair_pool < 2):
        raise UserError(f"--pair-pool {pair_pool} applies to --criterion output-loss-pairs only, and must be >= 2")
    needs_calib = criterion in ("output-loss", "output-loss-pairs", "taylor", "similarity", "greedy")
    if not loaded.has_weights and criterion not in bk and criterion != "random":
        raise UserError(f"{model} is config-only (no weights): --criterion {criterion} needs weights; "
                        "use a bk-sdm-* criterion or random")
    if needs_calib and loaded.pipe is None:
        raise UserError(f"--criterion {criterion} samples the model on calibration data: give a pipeline folder or "
                        f"zoo:NAME (for a lone model use magnitude, random or a bk-sdm-* criterion)")
    if inner and criterion in bk:
        raise UserError(f"--inner scores the transformer blocks inside attention layers; {criterion} removes "
                        "BK-SDM's fixed blocks: drop --inner")
    if stock:
        from diffslim.methods.layer_prune import check_controlnet_fits, check_stock_selection

        check_stock_selection(loaded.denoiser, criterion, inner)
        check_controlnet_fits(loaded.pipe)  # a transformer's ControlNet fits no stock export: before any scoring
    keep = []
    if stock and not is_unet(loaded.denoiser):  # select only among blocks a stock config can lose
        from diffslim.methods.layer_prune import stock_keeps

        keep = stock_keeps(loaded.denoiser)
    from diffslim.methods.layer_prune import check_prunable

    check_prunable(loaded.denoiser)  # a denoiser whose pruned model could not be exported: before any sampling
    if by == "params" and criterion not in bk:  # a ratio the removable layers cannot reach: before any sampling
        from diffslim.methods.layer_prune import check_reachable

        check_reachable(loaded.denoiser, ratio, inner, keep, stock)
    calib = (_layer_calibration(loaded, calibration_kind, n, seed, data, resolution, calib_steps) if needs_calib
             else None)
    macs_inputs = None
    if by == "macs" and loaded.pipe is not None and criterion not in bk:  # the MACs of the call the pipeline makes
        macs_inputs = _first_call(loaded, data)
    res = layer_prune(loaded.denoiser, criterion, ratio, by=by, calib=calib, seed=seed, inner=inner,
                      pair_pool=pair_pool, progress=not as_json, keep=keep, stock=stock, macs_inputs=macs_inputs,
                      max_params=max_params)
    pruned = prune_layers(loaded.denoiser, res.removed)
    if not res.macs:  # selected by params: the MACs removed too, where one forward on dummy inputs counts them
        res.macs, res.macs_removed = _macs_removed(loaded.denoiser, pruned)
    if res.macs is None and loaded.pipe is not None and loaded.has_weights:
        # no dummy inputs without a size (Flux, Qwen-Image, Chroma): count the call the pipeline makes instead
        try:
            macs_inputs = _first_call(loaded, data)
        except UserError:  # a pipeline that samples from images, without inputs to sample
            macs_inputs = None
        if macs_inputs is not None:
            res.macs, res.macs_removed = _macs_removed(loaded.denoiser, pruned, macs_inputs)
    not_stock = None
    if stock:
        from diffslim.methods.layer_prune import check_controlnet_fits, stock_model

        try:
            stocked = stock_model(pruned)
            check_controlnet_fits(loaded.pipe, stocked)  # a ControlNet feeds the original's skips, not the stock's
            pruned = stocked
        except UserError as e:  # keep the scoring's work: write the LayerPruned model, then say why
            not_stock = str(e)
    if not _main_process():  # under `accelerate launch` every process scored its share of the layers; the first writes
        return
    previous = outputs.previous_writes(out, ("model", "pipeline"))
    if outputs.claim_out(out, "layer-prune"):  # a rerun leaves no stale pipeline/ or weights beside the new model
        outputs.remove_previous(out, previous)
    before = {p.name for p in out.iterdir()}
    _save_denoiser(loaded, pruned, out / "model", out / "pipeline")
    params_after = sum(p.numel() for p in pruned.parameters())
    from diffslim.report.card import layer_prune_card

    from diffslim.methods.layer_prune import candidate_names

    kwargs = layer_prune_card(out, model, res, params_after, max_params, stocked=stock and not not_stock,
                              candidates=len(candidate_names(loaded.denoiser, inner)), weights=loaded.has_weights,
                              macs_label=None if macs_inputs is None else "MACs per denoiser call as the pipeline "
                              "makes it (its guidance batch included)")
    for folder in (out / "model", out / "pipeline"):
        if (folder / "config.json").is_file() or (folder / "model_index.json").is_file():
            _card(folder, **kwargs)
    outputs.record_writes(out, before)
    report = {"model": model, **res.to_json(), "params_after": params_after, "out": str(out)}
    if keep:
        report["kept_for_stock"] = keep
    if calib is not None:
        report["calibration"] = {"kind": calibration_kind, "n": n, "seed": seed, "data": data,
                                 **({"steps": calib.source["steps"]} if "steps" in calib.source else {})}
    (out / "scores.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    Recipe(model=model, removed_layers=RemovedLayers(layers=res.removed, criterion=criterion, ratio=ratio, by=by,
                                                     max_params=max_params),
           description=f"layer pruning by {criterion}: {len(res.removed)} layers, "
                       f"{res.params_removed / res.params:.3f} of params removed").save(out / "recipe.json")
    if not_stock:
        raise UserError(f"--stock: {not_stock}. Wrote the LayerPruned model, scores and recipe to {out} instead")
    if as_json:
        _print_json(report)
        return
    t = Table(title=f"layer-prune {model} ({criterion}{'' if ratio is None else f', ratio {ratio} of {by}'}"
                    f"{'' if max_params is None else f', at most {max_params} of params'})")
    for c in ("layer", "kind", "params", "score", "removed"):
        t.add_column(c)
    for row in report["layers"]:
        score = row["score"]
        t.add_row(row["name"], row["kind"], f"{row['params']:,}", "" if score is None else f"{score:.4g}",
                  "yes" if row["removed"] else "")
    _print_table(t)
    console.print(f"removed {len(res.removed)} layers: {res.params_removed:,} of {res.params:,} params "
                  f"({res.params_removed / res.params:.3f}); {params_after:,} left"
                  + (f"; MACs removed {res.macs_removed / res.macs:.3f}" if res.macs else "")
                  + (f"\npredicted output loss {res.extra['predicted_loss']:.4g} (sum of single losses "
                     f"{res.extra['summed_loss']:.4g}; {len(res.extra['interactions'])} pairs measured)"
                     if "predicted_loss" in res.extra else "")
                  + f"\npruned model: {out / 'model'}"
                  + (f"; pipeline (sample, evaluate and bench take it): {out / 'pipeline'}"
                     if (out / "pipeline" / "model_index.json").exists() else "")
                  + f"; recipe (for the original model): {out / 'recipe.json'}; scores: {out / 'scores.json'}")


def _macs_removed(full, pruned, inputs=None) -> tuple[Optional[int], Optional[int]]:
    """The MACs of ``full`` and how many of them ``pruned`` no longer spends (one counted forward of each, on dummy
    inputs at the config's sample size, or on ``inputs``, a call's ``(args, kwargs)``); ``(None, None)`` where the
    denoiser's forward takes no dummy inputs."""
    from diffslim.models.anatomy import anatomy

    given = {} if inputs is None else {"inputs": inputs}
    try:
        before, after = anatomy(full, **given).macs, anatomy(pruned, **given).macs
    except (ValueError, RuntimeError, TypeError, IndexError, KeyError):
        return None, None
    return before, before - after


def _save_denoiser(loaded, denoiser, model_dir: Path, pipeline_dir: Optional[Path]) -> None:
    """Write ``denoiser`` to ``model_dir`` (its config only when ``loaded`` has no weights) and, for a
    pipeline, the pipeline with it in place to ``pipeline_dir``. The denoiser's files are written once:
    ``model_dir``'s are hard links to the pipeline's (``outputs.share_files``)."""
    if not loaded.has_weights:
        denoiser.save_config(str(model_dir))
        return
    if loaded.pipe is None or pipeline_dir is None:
        denoiser.save_pretrained(str(model_dir), safe_serialization=True)
        return
    from diffslim.apply import denoiser_attr

    attr = denoiser_attr(loaded.pipe)
    setattr(loaded.pipe, attr, denoiser)
    loaded.pipe.save_pretrained(str(pipeline_dir), safe_serialization=True)
    outputs.share_files(pipeline_dir / attr, model_dir)


@app.command("stock")
@_guard
def stock_cmd(
    model: str = typer.Argument(..., help="a layer-pruned model folder, pipeline folder or config-only folder "
                                          "(what layer-prune, distill or workflow wrote)"),
    out: Path = typer.Option(..., help="folder to write: the stock model (a pipeline folder for a pipeline)"),
    lora: Optional[list[Path]] = typer.Option(None, help="a LoRA of the original model to adapt to the stock "
                                                         "model too (repeat for several): written to "
                                                         "OUT/loras/NAME.safetensors"),
    ip_adapter: Optional[list[Path]] = typer.Option(None, "--ip-adapter", help="an IP-Adapter of the original "
                                                    "model (.safetensors) to adapt to the stock model too (repeat "
                                                    "for several): written to OUT/ip_adapters/NAME.safetensors"),
):
    """Rewrite a layer-pruned model as its stock diffusers class, loadable with diffusers alone.

    The removed blocks leave the block lists and the config counts the kept ones (num_layers,
    num_single_layers; for U-Nets layers_per_block, mid_block_type, the levels and the transformer depths
    per attention layer, as BK-SDM's checkpoints have them). Same weights, same outputs. Refused, with the
    reason, where no stock config describes the model. LoRAs and IP-Adapters of the original model are renamed
    and renumbered for it (the raw files would load into the wrong blocks, or fail on a shape).
    """
    _quiet_libraries()
    from diffslim.ip_adapter import ip_adapter_file, read_ip_adapter
    from diffslim.lora import WEIGHT_NAME, lora_file
    from diffslim.models.adapters import ip_adapter_parts
    from diffslim.methods.layer_prune import check_controlnet_fits, removed_layers_of, stock_model
    from diffslim.models.load import load

    outputs.out_folder(out, command="stock")
    loras = [lora_file(p) for p in lora or []]  # missing or pickled LoRAs are refused before any work
    names = [p.parent.name if p.name == WEIGHT_NAME else p.stem for p in loras]  # a LoRA folder: its name
    if len(set(names)) != len(names):
        raise UserError(f"--lora: two LoRAs would be written as one name ({', '.join(names)})")
    ips = [ip_adapter_file(p) for p in ip_adapter or []]
    ip_states = [read_ip_adapter(p) for p in ips]
    for st in ip_states:
        ip_adapter_parts(st)  # not an IP-Adapter: refused before any work
    if len({p.stem for p in ips}) != len(ips):
        raise UserError(f"--ip-adapter: two IP-Adapters would be written as one name "
                        f"({', '.join(p.stem for p in ips)})")
    loaded = load(model)
    removed = removed_layers_of(loaded.denoiser)
    if not removed:
        raise UserError(f"{model} has no removed layers (its config has no removed_layers): it is stock already")
    try:
        stock = stock_model(loaded.denoiser)
    except UserError as e:  # say how to get a removal that a stock config describes
        raise UserError(f"{e}; layer-prune --stock (or the bench's and workflow's layers:R:stock) chooses among the "
                        "removals a stock config can describe") from None
    check_controlnet_fits(loaded.pipe, stock)
    previous = outputs.previous_writes(out)
    # what the export writes: the pipeline's parts, or a model's config and weights; and what it removes
    parts = list(loaded.pipe.components) if loaded.pipe is not None and loaded.has_weights else []
    outputs.model_inside(model, out, [*parts, "model_index.json", "config.json", "diffusion_pytorch_model.safetensors",
                               "loras", "ip_adapters", *previous])
    if outputs.claim_out(out, "stock"):  # replace its own earlier export; what it did not write stays
        outputs.remove_previous(out, previous)
    before = {p.name for p in out.iterdir()}
    kind = "pipeline" if loaded.pipe is not None and loaded.has_weights else "model"
    if kind == "pipeline":
        from diffslim.apply import denoiser_attr

        setattr(loaded.pipe, denoiser_attr(loaded.pipe), stock)
        loaded.pipe.save_pretrained(str(out), safe_serialization=True)
    else:
        _save_denoiser(loaded, stock, out, None)
    params = sum(p.numel() for p in stock.parameters())
    console.print(f"{type(stock).__name__} ({len(removed)} layers removed, {params:,} params): {kind} written to "
                  f"{out}")
    outputs.record_writes(out, before)
    done = [f"Rewritten from diffslim's {type(loaded.denoiser).__name__} (`{model}`, {len(removed)} layers removed) "
            f"as diffusers' {type(stock).__name__}, whose config lists fewer blocks: the same weights and outputs, "
            "loadable with diffusers alone.",
            "Removed: " + ", ".join(f"`{n}`" for n in removed)]
    for path, name in zip(loras, names):
        _print_lora(_write_lora(loaded, path, out / "loras" / f"{name}.safetensors", stock=True))
        outputs.record_writes(out, before)
        done.append(f"LoRA `{path}` adapted to it: `loras/{name}.safetensors` (`pipe.load_lora_weights`)")
    if ips:
        from diffslim.ip_adapter import adapt_ip_adapter, write_ip_adapter

        for path, state in zip(ips, ip_states):
            result = adapt_ip_adapter(loaded.denoiser, state)
            target = write_ip_adapter(result, out / "ip_adapters" / f"{path.stem}.safetensors")
            outputs.record_writes(out, before)
            info = result.summary()
            console.print(f"IP-Adapter {path} -> {target}: {info['kept_processors']} attention processors kept "
                          f"({info['renumbered_processors']} renumbered for the stock model), "
                          f"{info['dropped_processors']} dropped with the removed layers")
            done.append(f"IP-Adapter `{path}` adapted to it: `ip_adapters/{path.stem}.safetensors`")
    from diffslim.report.card import earlier, size_table, title_name

    history = earlier(Path(model))  # the card layer-prune or distill wrote: the original, what was done to it
    if history is not None and any(d.startswith("Removed: ") for d in history.done):
        done = [d for d in done if not d.startswith("Removed: ")]  # its card lists them
    base = model if history is None else history.base
    _card(out, base=base, title=f"{title_name(base)}, layer-pruned, as a stock {type(stock).__name__}", done=done,
          tables=[size_table((None if history is None else history.params, params),
                             None if history is None else history.macs,  # same structure, same MACs
                             macs_label=None if history is None else history.macs_label)],
          tags=["pruned", "layer-pruning"], history=history)  # the criterion's tag, if any, comes with the history
    outputs.record_writes(out, before)


def _denoiser_prefix(loaded) -> Optional[str]:
    """The pipeline component name that prefixes the denoiser's keys in a LoRA file (None for a lone model)."""
    if loaded.pipe is None:
        return None
    from diffslim.apply import denoiser_attr

    return denoiser_attr(loaded.pipe)


def _write_lora(loaded, lora: Path, out: Path, stock: bool, original=None) -> dict:
    from diffslim.lora import adapt_lora_file

    res = adapt_lora_file(loaded.denoiser, _denoiser_prefix(loaded), lora, out, stock=stock, original=original)
    return {"lora": str(lora), "out": str(out), **res.summary()}


def _print_lora(info: dict) -> None:
    console.print(f"LoRA {info['lora']} -> {info['out']}: {info['kept_modules']} modules kept"
                  + (f" ({info['renamed_modules']} renamed for the stock model)" if info["renamed_modules"] else "")
                  + f", {info['dropped_modules']} dropped with {len(info['dropped_by_layer'])} removed layers")


@app.command("lora")
@_guard
def lora_cmd(
    model: str = typer.Argument(..., help="the pruned model or pipeline folder (what layer-prune, distill, "
                                          "workflow or a depth-skip export wrote)"),
    lora: Path = typer.Argument(..., help="a LoRA of the original model: a .safetensors file in diffusers' "
                                          "format (save_lora_weights), or a folder holding one"),
    out: Path = typer.Option(..., help="the adapted LoRA file to write (.safetensors)"),
    stock: bool = typer.Option(False, "--stock", help="adapt it to the stock export of MODEL (diffslim stock, "
                                                      "layer-prune --stock), whose blocks are renumbered"),
    original: Optional[str] = typer.Option(None, help="the original pipeline folder: read the LoRA through its "
                                                      "diffusers loader, for Kohya/A1111 and other formats"),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
):
    """Adapt a LoRA trained on the original model to a pruned one: keep the LoRA of every module the pruned
    model still runs (under its stock name with --stock), drop the removed layers' LoRA, refuse a LoRA of
    another model. The result loads with pipe.load_lora_weights(OUT) without unexpected keys."""
    from diffslim.lora import lora_file

    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the adapted LoRA is a .safetensors file; give a name ending in .safetensors")
    outputs.out_file(out, example="lora.safetensors")
    lora_file(lora)  # a missing or pickled LoRA is refused before the model loads
    _quiet_libraries()
    from diffslim.models.load import load

    source = None
    if original is not None:
        if not original.startswith("zoo:") and not Path(original).exists():
            raise UserError(f"--original {original}: no such folder; give the pipeline folder the LoRA was trained on")
        source = load(original).pipe
        if source is None:
            raise UserError(f"--original {original} is not a pipeline folder: give the pipeline the LoRA was trained on")
    loaded = load(model)
    info = _write_lora(loaded, lora, out, stock, source)
    if as_json:
        _print_json(info)
    else:
        _print_lora(info)


@app.command("layer-compare")
@_guard
def layer_compare_cmd(
    model: str = typer.Argument(..., help="pipeline folder, zoo:NAME or a Hub id the local HF cache holds"),
    ratios: str = typer.Option("0.3,0.5,0.7", help="comma-separated shares of params (--by macs: of MACs) to remove, "
                                                   "each in (0, 1)"),
    out: Path = typer.Option(..., help="folder: index.html, compare.json, output_loss.png, additivity.png (with "
                                       "--sample: sampled_psnr.png too)"),
    by: str = typer.Option("params", help="what the ratios are shares of: params, or macs (of the denoiser call the "
                                          "pipeline makes); by macs BK-SDM is also compared at its own MACs and params"),
    max_params: Optional[float] = typer.Option(None, help="with --by macs: every selection also removes at most this "
                                                          "share of the params, in (0, 1); greedy is left out"),
    n: int = typer.Option(32, min=1, help="calibration triples to score on, and as many held-out triples to judge on"),
    greedy: bool = typer.Option(True, "--greedy/--no-greedy", help="also the iterative greedy re-scoring "
                                                                   "(about n_layers calibration runs per removal)"),
    pairs: bool = typer.Option(True, "--pairs/--no-pairs", help="also output-loss-pairs (n(n-1)/2 calibration runs)"),
    data: str = typer.Option("zoo", help="calibration data: 'zoo' or an image folder, captions optional; with "
                                         "--calibration sampling also a .txt file of prompts or class labels or a "
                                         ".jsonl file of pipeline inputs"),
    resolution: Optional[int] = _RESOLUTION_OPT,
    calibration_kind: str = typer.Option("data", "--calibration", help=_CALIBRATION_HELP + " (held-out triples "
                                         "alike, with other inputs, seeds and steps; taylor is left out)"),
    calib_steps: Optional[int] = typer.Option(None, min=1, help="--calibration sampling: sampling steps (default: "
                                                                "the zoo model's, else 50)"),
    sample_n: int = typer.Option(0, "--sample", help="also sample every selection on N evaluation inputs and judge "
                                 "its outputs against the full model's (PSNR, SSIM, the task's metrics): what the "
                                 "output loss stands for; 0: off"),
    steps: Optional[int] = typer.Option(None, min=1, help="sampling steps of --sample (default: the zoo model's, else 50)"),
    prompts: Optional[Path] = typer.Option(None, help="--sample's inputs: " + _INPUTS_HELP),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
    device: str = typer.Option("auto", help=_SCORE_DEVICE_HELP),
):
    """Compare every layer-pruning criterion on your model: held-out output loss of each one's selection at each
    ratio, BK-SDM (U-Nets), and the additivity of the single-layer losses, with figures; with --sample N also
    each selection's samples against the full model's."""
    outputs.out_folder(out, command="layer-compare")
    _quiet_libraries()
    from diffslim.methods import layer_prune as lp
    from diffslim.methods.layer_compare import compare_criteria, curves_of
    from diffslim.models.load import load
    from diffslim.report import additivity_figure, output_loss_figure

    try:
        rs = sorted({float(x) for x in ratios.split(",")})
    except ValueError:
        raise UserError(f"--ratios {ratios!r}: give comma-separated numbers in (0, 1), e.g. 0.3,0.5,0.7") from None
    for r in rs:
        lp.check_ratio(r)
    if n < 2:
        raise UserError("--n must be at least 2")
    if sample_n < 0:
        raise UserError(f"--sample takes a count of evaluation inputs >= 0 (0: off), got {sample_n}")
    if steps is not None and not sample_n:
        raise UserError("--steps sets the sampling steps of --sample N: give --sample too (e.g. --sample 16)")
    if prompts is not None and not sample_n:
        raise UserError("--prompts gives the inputs of --sample N: give --sample too (e.g. --sample 16)")
    if by not in ("params", "macs"):
        raise UserError(f"--by {by!r}: accepted params, macs")
    if max_params is not None:
        lp.check_max_params(max_params)
        if by != "macs":
            raise UserError("--max-params caps the params a selection by MACs removes: give --by macs too")
    _check_calibration(calibration_kind, calib_steps, resolution)
    dev = _precision(device, "float32")[0]
    loaded = load(model, device=dev)
    if loaded.pipe is None or not loaded.has_weights:
        raise UserError(f"{model}: comparing criteria samples the model on calibration data; give a pipeline folder "
                        "with weights or zoo:NAME")
    macs_inputs = None
    if by == "macs":  # the MACs of the call the pipeline makes, as layer-prune --by macs counts them
        macs_inputs = _first_call(loaded, data)
    if max_params is not None and greedy:
        greedy = False
        if not as_json:
            console.print("greedy re-scoring has no cap on the params removed: left out with --max-params")
    calib = _layer_calibration(loaded, calibration_kind, n, 0, data, resolution, calib_steps)
    held = _layer_calibration(loaded, calibration_kind, n, 1, data, resolution, calib_steps)
    res = compare_criteria(loaded.denoiser, calib, held, rs, greedy=greedy, pairs=pairs, progress=not as_json, by=by,
                           max_params=max_params, macs_inputs=macs_inputs)
    res = {"model": model, "n_calib": n, "calibration": calibration_kind, **res}
    curves = curves_of(res)
    share = "params" if by == "params" else "MACs"
    xlabel = f"target ratio (the least share of {share} removed; whole layers go)" + ("" if max_params is None else
                                                            f", at most {max_params:g} of params")
    x = "macs_ratio" if by == "macs" else "ratio"
    outputs.claim_out(out, "layer-compare")
    def matched(key):  # by MACs: the output-loss selection at each BK-SDM variant's MACs and params
        return {b["variant"]: (b["macs_ratio"], v) for b in res["bk_sdm"]
                if (v := (b.get(key) if key == "output_loss_at_macs" else b.get(key, {}).get("psnr"))) is not None}

    from diffslim.report import Report

    def removed(row) -> str:  # the shares the selections at a ratio removed (whole layers go)
        shares = [v for k, v in row.items() if k.endswith("_share") and isinstance(v, float)]
        lo, hi = (min(shares), max(shares)) if shares else (None, None)
        return "" if lo is None else f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}-{hi:.3f}"

    # index.html beside the JSON and figures: the tables, the figures with what they show, how it was run
    rep = Report(f"diffslim layer-compare: {model}")
    rep.add_text("how it was run", _run_info(dev))
    rep.add_table(f"held-out output loss (MSE of the noise prediction against the full model's; lower is better); "
                  f"ratio: the least share of {share} to remove, removed: what the selections removed",
                  [{"ratio": row["ratio"], "removed": removed(row), **{c: row[c] for c in curves}}
                   for row in res["ratios"]])
    add = res["additivity"]
    if sample_n:
        psnr_curves, bk_psnr = _sample_selections(loaded, res, sample_n, steps, progress=not as_json, prompts=prompts)
        rep.add_table(f"PSNR (dB) of each selection's samples against the full model's ({sample_n} inputs; higher is "
                      "better)", [{"ratio": row["ratio"], **{c: row[f"{c}_sampled"].get("psnr") for c in curves}}
                                  for row in res["ratios"]])
        rep.add_figure("sampled PSNR", "sampled_psnr.png", output_loss_figure(
            psnr_curves, model, bk_psnr, ylabel="PSNR of samples vs the full model's (dB)", log=False, xlabel=xlabel,
            matched=matched("output_loss_at_macs_sampled")), "what users see: each selection sampled, against the "
                                                              "full model's samples")
    if not _main_process():  # under `accelerate launch` every process scored its share; the first writes
        return
    (out / "compare.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    rep.add_figure("output loss", "output_loss.png", output_loss_figure(
        curves, model, {b["variant"]: (b[x], b["bk_sdm_loss"]) for b in res["bk_sdm"]}, xlabel=xlabel,
        matched=matched("output_loss_at_macs")), "each criterion's selection at each ratio (crosses: BK-SDM's "
                                                 "handcrafted removals at their own share); random is the mean of 3 draws")
    rep.add_figure("additivity", "additivity.png", additivity_figure(
        add["summed"], add["measured"], add["pearson"], model, add.get("second_order"),
        add.get("pearson_second_order")), f"{len(add['sets'])} random layer sets: their measured output loss against "
                                          "the sum of their layers' single losses (the one-shot criterion's "
                                          "assumption); second order adds each pair's interaction")
    rep.write(out)
    if as_json:
        _print_json(res)
        return
    t = Table(title=f"layer-compare {model}: held-out output loss (lower is better), ratio = the least share of "
                    f"{share} to remove (whole layers go: 'removed' is the share the selections removed)"
                    + ("" if max_params is None else f", at most {max_params:g} of params"))
    t.add_column("ratio")
    t.add_column("removed")
    for c in curves:
        t.add_column(c)
    for row in res["ratios"]:
        best = min(row[c] for c in curves if c not in ("greedy", "random"))
        t.add_row(f"{row['ratio']:g}", removed(row), *[("[bold]" if row[c] == best and c not in ("greedy", "random")
                                                        else "") + f"{row[c]:.3g}" for c in curves])
    _print_table(t)
    if sample_n:
        t = Table(title=f"sampled outputs against the full model's ({sample_n} inputs, {res['sampled']['steps']} "
                        "steps): PSNR in dB (higher is better)")
        t.add_column("ratio")
        for c in curves:
            t.add_column(c)
        for row in res["ratios"]:
            vals = {c: row[f"{c}_sampled"].get("psnr") for c in curves}
            best = max((v for c, v in vals.items() if v is not None and c not in ("greedy", "random")), default=None)
            t.add_row(f"{row['ratio']:g}", *[("-" if v is None else ("[bold]" if v == best and c not in (
                "greedy", "random") else "") + f"{v:.2f}") for c, v in vals.items()])
        _print_table(t)
        for row in res["ratios"]:  # where the proxy and the samples disagree, say so: the samples decide
            one_shot = [c for c in curves if c not in ("greedy", "random") and row[f"{c}_sampled"].get("psnr")
                        is not None]
            if not one_shot:
                continue
            by_loss = min(one_shot, key=lambda c: row[c])
            by_psnr = max(one_shot, key=lambda c: row[f"{c}_sampled"]["psnr"])
            if row[f"{by_psnr}_sampled"]["psnr"] > row[f"{by_loss}_sampled"]["psnr"]:
                console.print(f"[yellow]at {row['ratio']:g} the lowest output loss ({by_loss}, {row[by_loss]:.3g}) "
                              f"samples at {row[f'{by_loss}_sampled']['psnr']:.2f} dB, below {by_psnr}'s "
                              f"{row[f'{by_psnr}_sampled']['psnr']:.2f} dB (output loss {row[by_psnr]:.3g}): the "
                              "output loss is a proxy, the samples decide[/]", highlight=False)
    for b in res["bk_sdm"]:
        console.print(f"{b['variant']}: removes {b['ratio']:.3f} of params"
                      + (f" and {b['macs_ratio']:.3f} of MACs" if by == "macs" else "")
                      + f", output loss {b['bk_sdm_loss']:.3g} "
                      f"(output-loss criterion at that share of params: {b['output_loss_at_ratio']:.3g})"
                      + (f"; samples {b['sampled']['psnr']:.2f} dB" if sample_n and b["sampled"].get("psnr") is not None
                         else ""), highlight=False)
        if by == "macs":
            console.print("  at its MACs with at most its params removed: " + (
                "no set of candidate layers gets there" if b["output_loss_at_macs"] is None else
                f"output loss {b['output_loss_at_macs']:.3g} ({b['output_loss_at_macs_share']:.3f} of params)"
                + (f", output-loss-pairs {b['output_loss_pairs_at_macs']:.3g} ({b['output_loss_pairs_at_macs_share']:.3f})"
                   if "output_loss_pairs_at_macs" in b else "")
                + "".join(f"; {lab} samples {b[k]['psnr']:.2f} dB" for k, lab in (
                    ("output_loss_at_macs_sampled", "output loss"), ("output_loss_pairs_at_macs_sampled", "pairs"))
                    if b.get(k, {}).get("psnr") is not None)), highlight=False)
    for row in res.get("stock", []):
        console.print(f"--stock at {row['ratio']:g}: " + (
            f"removes {row['share']:.3f} of params, output loss {row['loss']:.3g} (a stock diffusers config "
            "describes it)" if "loss" in row else "no removal a stock config describes reaches it"), highlight=False)
    console.print(f"additivity over {len(add['sets'])} random layer sets: Pearson r = {add['pearson']:.3f}"
                  + (f" (second order {add['pearson_second_order']:.3f})" if "pearson_second_order" in add else "")
                  + f"\nwritten: {out / 'index.html'}, {out / 'compare.json'}, {out / 'output_loss.png'}, "
                    f"{out / 'additivity.png'}"
                  + (f", {out / 'sampled_psnr.png'}" if sample_n else
                     "\nthe output loss is a proxy: before committing to a selection, compare its samples with the "
                     "full model's (--sample 16)"))


def _first_call(loaded, data: Optional[str]):
    """The first denoiser call of ``loaded``'s pipeline on one input, whose MACs ``--by macs`` counts: an evaluation
    input, or for a pipeline that samples from images the first input of the calibration ``data`` (a .jsonl file of
    pipeline inputs or an image folder)."""
    from diffslim.evaluate import eval_set_for
    from diffslim.sample import SampleSpec, first_denoiser_call
    from diffslim.train.data import needs_image

    takes_images = loaded.zoo is None and needs_image(loaded.pipe)
    if takes_images and data in (None, "zoo"):
        raise UserError(f"{type(loaded.pipe).__name__} samples from input images: --by macs counts the denoiser call "
                        "it makes on one, so give --data inputs.jsonl, one JSON object of pipeline inputs per line, "
                        "e.g. {\"prompt\": \"make it red\", \"image\": \"photo.png\"} (paths relative to the file)")
    if takes_images:
        from diffslim.train.data import pipeline_inputs

        inputs = [dict(pipeline_inputs(loaded.pipe, data, 0)[0])]
        return first_denoiser_call(loaded.pipe, SampleSpec(inputs, [0]))
    es = eval_set_for(loaded, 1)
    return first_denoiser_call(loaded.pipe, SampleSpec(es.inputs, es.seeds, call_kwargs=dict(es.call_kwargs)))


def _sample_selections(loaded, res: dict, n: int, steps: Optional[int], progress: bool,
                       prompts: Optional[Path] = None):
    """``layer-compare --sample``: every selection of ``res`` sampled on ``n`` evaluation inputs (see
    :func:`diffslim.bench.sample_layer_selections`)."""
    from diffslim.bench import sample_layer_selections
    from diffslim.evaluate import eval_set_for, metrics_fn_for
    from diffslim.sample import SampleSpec

    es = eval_set_for(loaded, n, prompts_file=prompts)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=steps or (loaded.zoo.default_steps if loaded.zoo
                                                                         is not None else 50),
                      call_kwargs=dict(es.call_kwargs), batch_size=min(16, n))
    return sample_layer_selections(loaded.pipe, res, spec, metrics_fn_for(loaded, es), progress=progress)


@app.command("dipgo")
@_guard
def dipgo_cmd(
    model: str = typer.Argument(..., help="zoo:NAME or a diffusers pipeline folder"),
    ratio: float = typer.Option(..., help="share of the MACs to remove, in (0, 1): 0.8 keeps <= 20%"),
    steps: int = typer.Option(50, min=2, help="denoising steps the plan is made for"),
    scheduler: Optional[str] = typer.Option(None, help="scheduler to train with (default: the pipeline's)"),
    loss: str = typer.Option("ssim", help="consistency loss: ssim, l1, l2 or ssim+l1"),
    alpha: float = typer.Option(1.0, help="weight of the sparsity loss"),
    out: Path = typer.Option(..., help="recipe JSON file to write"),
    run_dir: Optional[Path] = typer.Option(None, help="checkpoints and scores (default: OUT without suffix + _run); "
                                                      "rerun the same command to resume exactly"),
    iters: int = typer.Option(60, min=1, help="optimizer steps of the pruner"),
    batch_size: int = typer.Option(4, min=1, help="inputs per step (per process under accelerate launch)"),
    lr: float = typer.Option(1e-2),
    granularity: str = typer.Option("fine", help="coarse (blocks) or fine (resnet+attention pairs, samplers)"),
    objective: str = typer.Option("unrolled", help="unrolled (the whole trajectory) or local (Learning-to-Cache)"),
    self_attention: bool = typer.Option(True, "--self-attention/--no-self-attention"),
    init: str = typer.Option("keep", help="where the gates start: keep (all open, as in the paper), or a warm "
                                          "start from the equal-MACs plan of: steps (fewer steps), deepcache"),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
    data: str = typer.Option("zoo", help="'zoo'; a .txt file, one prompt (or class label) per line; a .jsonl file "
                                         "of pipeline inputs; or, for an image-to-image pipeline, a folder of "
                                         "input images (their captions as the prompts)"),
    guidance_scale: Optional[float] = typer.Option(None, help="passed to the pipeline (default: its own)"),
    anneal: Optional[int] = typer.Option(None, min=0, help="optimizer steps over which the sparsity floor falls from 1 to "
                                                    "1 - RATIO (default: all of --iters; 0: the target at once)"),
    select: int = typer.Option(8, min=0, help="validation inputs: keep the scores whose plan validated best over the run "
                                       "(0: the last scores; --anneal 0 --select 0 is the paper's schedule)"),
    restarts: int = typer.Option(1, min=1, help="pruners trained from seeds SEED, SEED+1, ...; the one that validates best "
                                         "is kept (needs --select)"),
    checkpoint_every: int = typer.Option(20, min=1),
    seed: int = typer.Option(0, min=0, max=_SEED_MAX,
                             help="seed of the pruner's training (and of the first restart)"),
):
    """Learn a skip plan with DiP-GO and write it as a recipe (skip_plan section)."""
    outputs.out_file(out)
    outputs.out_folder(run_dir or out.with_name(out.stem + "_run"),
                "--run-dir" if run_dir is not None else "the run folder (--run-dir's default)", command="dipgo")
    _quiet_libraries()
    from diffslim.methods.dipgo import DipgoConfig, check_ratio, train_dipgo
    from diffslim.methods.skip_plan import GRANULARITIES
    from diffslim.models.load import load
    from diffslim.recipe import SCHEDULERS, Recipe, SkipPlan

    check_ratio(ratio)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise UserError(f"unknown --scheduler {scheduler!r}; accepted: {', '.join(SCHEDULERS)}")
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown --granularity {granularity!r}; accepted: {', '.join(GRANULARITIES)}")
    cfg = DipgoConfig(ratio=ratio, num_inference_steps=steps, scheduler=scheduler, loss=loss, alpha=alpha,
                      iters=iters, batch_size=batch_size, lr=lr, granularity=granularity, objective=objective,
                      init=init, anneal=iters if anneal is None else anneal, select=select, restarts=restarts,
                      self_attention=self_attention, gradient_checkpointing=gradient_checkpointing, data=data,
                      call_kwargs={} if guidance_scale is None else {"guidance_scale": guidance_scale},
                      checkpoint_every=checkpoint_every, seed=seed,
                      out=str(run_dir or out.with_name(out.stem + "_run"))).check()
    loaded = load(model)
    if loaded.pipe is None:
        raise UserError(f"{model} is not a pipeline; DiP-GO samples it: give zoo:NAME or a pipeline folder")
    from diffslim.evaluate import call_settings

    cfg.call_kwargs = {**call_settings(loaded.pipe), **cfg.call_kwargs}  # PixArt at a size it cannot bin
    outputs.claim_out(Path(cfg.out), "dipgo")
    res = train_dipgo(loaded.pipe, cfg)  # units with MACs measured on the training inputs' own call
    units = res.units
    if not _main_process():  # under `accelerate launch` the first process writes the recipe and reports
        return
    Recipe(model=model, description=f"DiP-GO skip plan, R={ratio:g}, MACs ratio {res.macs_ratio:.3f}",
           skip_plan=SkipPlan(granularity=granularity, units=list(units.names), plan=res.plan.tolist(),
                              scheduler=scheduler, provenance=res.provenance())).save(out)
    kept = int(res.plan.sum())
    vals = [r["val"] for r in res.log if "val" in r and r.get("restart", res.restart) == res.restart]
    chosen = (f"; kept the plan that validated best (loss {min(vals):.4g}"
              + (f", seed {seed + res.restart} of {restarts}" if res.restart is not None else "") + ")") if vals else ""
    console.print(f"plan: {kept}/{res.plan.size} (step, unit) pairs kept, denoiser MACs ratio {res.macs_ratio:.3f} "
                  f"(target <= {1 - ratio:.3f}); trained {res.seconds:.0f}s{chosen}; recipe: {out}; run folder "
                  f"(checkpoints, scores; the same command resumes from it): {cfg.out}")


@app.command("recipe")
@_guard
def recipe_cmd(path: Path = typer.Argument(..., help="recipe JSON file to validate")):
    """Validate a recipe file and print it normalised."""
    from diffslim.recipe import load_recipe

    r = load_recipe(path)
    _print_json(json.loads(r.model_dump_json(exclude_none=True)))


@app.command("cache")
@_guard
def cache_cmd(
    clear: Optional[str] = typer.Option(None, help="remove entries: 'all' or kinds, comma-separated "
                                                   "(refs, finetune, layer_kd, dipgo, teacher_samples)"),
    older_than: Optional[float] = typer.Option(None, help="with --clear: only entries last written more than this "
                                                          "many days ago"),
    as_json: bool = typer.Option(False, "--json", help="print the entries as JSON"),
):
    """List diffslim's cache ($DIFFSLIM_CACHE or ~/.cache/diffslim): reference samples and the bench's cached
    training runs, with sizes and ages; --clear removes them (entries another process is building are kept)."""
    from diffslim import cache

    kinds = None
    if clear is not None:
        asked = [k.strip() for k in clear.split(",") if k.strip()]
        wrong = [k for k in asked if k not in cache.KINDS and k != "all"]
        if wrong or not asked:
            raise UserError(f"--clear {clear!r}: unknown kind {', '.join(wrong) or '(none given)'}; accepted: all, "
                            + ", ".join(cache.KINDS))
        kinds = None if "all" in asked else asked
    if older_than is not None:
        if clear is None:
            raise UserError("--older-than chooses what --clear removes: add --clear KINDS (or all)")
        if older_than < 0:
            raise UserError(f"--older-than must be >= 0 days, got {older_than:g}")
    root = cache.cache_root()
    if clear is not None:
        removed, busy = cache.clear(root, kinds, older_than)
        freed = sum(e.bytes for e in removed)
        console.print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} ({freed / 2**20:.1f} MiB) "
                      f"from {root}" + (f"; kept {len(busy)} that another process is building" if busy else ""),
                      highlight=False)
        return
    found = cache.entries(root)
    if as_json:
        _print_json({"root": str(root), "entries": [
            {"kind": e.kind, "path": str(e.path), "bytes": e.bytes, "age_days": round(e.age_days, 3)} for e in found]})
        return
    from rich.table import Table

    t = Table(title=f"diffslim cache: {root}")
    for c in ("kind", "what", "entries", "size", "newest", "oldest"):
        t.add_column(c, justify="right" if c in ("entries", "size", "newest", "oldest") else "left")
    for kind, what in cache.KINDS.items():
        es = [e for e in found if e.kind == kind]
        ages = [e.age_days for e in es]
        t.add_row(kind, what, str(len(es)), f"{sum(e.bytes for e in es) / 2**20:.1f} MiB",
                  f"{min(ages):.1f} d" if es else "-", f"{max(ages):.1f} d" if es else "-")
    t.add_section()
    t.add_row("total", "", str(len(found)), f"{sum(e.bytes for e in found) / 2**20:.1f} MiB", "", "")
    _print_table(t)


@app.command()
@_guard
def demo(
    out: Path = typer.Option(Path("report"), help="report folder"),
    n: Optional[int] = typer.Option(None, min=1, help="inputs per bench (default: per model, see diffslim.demo.DEMO_PLAN)"),
    methods: Optional[str] = typer.Option(None, help="bench methods (default: per model)"),
):
    """Profile, sample and bench the zoo models; write index.html + report.json + figures."""
    outputs.out_folder(out, command="demo")
    _quiet_libraries()
    from diffslim.demo import run_demo

    outputs.claim_out(out, "demo")
    folder = run_demo(out, n=n, methods=methods, console=console)
    console.print(f"report: {folder / 'index.html'}")


_ARGV: Optional[list[str]] = None  # the command line as `diffslim ...` was called (set by main)


def _command_line() -> Optional[str]:
    """The command line that is running, for a model card (None when the app runs without :func:`main`)."""
    import shlex

    return None if _ARGV is None else "diffslim " + shlex.join(_ARGV)


def _card(folder: Path, **kwargs) -> None:
    """Write ``folder``'s model card (:func:`diffslim.report.card.write_model_card`), or say why it kept the
    README.md already there."""
    from diffslim.report.card import CARD, write_model_card

    if write_model_card(folder, command=_command_line(), **kwargs) is None:  # on stderr: --json keeps stdout
        err_console.print(f"[dim]{folder / CARD} is not a diffslim model card: kept it, wrote no card[/]",
                      highlight=False)


def _main_process() -> bool:
    """False in every process of a multi-process launch but the first (`accelerate launch` and torchrun set RANK):
    those compute their share, and the first alone prints and writes the results."""
    from diffslim.launch import is_first

    return is_first()


def main():
    from diffslim.sample import shutdown_processes

    global _ARGV
    _ARGV = sys.argv[1:]  # the model cards record the command that made a folder
    if not _main_process():  # one table, JSON document and note per launch, not one per process
        console.quiet = err_console.quiet = True
    try:
        app()
    finally:
        shutdown_processes()


if __name__ == "__main__":
    main()
