"""The guided workflow: stack compression methods on one model, a stage at a time, each judged against the original.

    diffslim workflow zoo:digits-sd --stages layers:0.3+kd,steps:20,dipgo:0.3 --floor psnr=20 --out DIR

A stage is a bench method (:data:`diffslim.bench.METHODS`), applied to the result of the stage before it:

* **model stages** (``layers``, ``bk-sdm``, ``depth``) change the denoiser. The stage's pipeline is saved under
  ``OUT/stages/`` and reloaded from there, so that the next stage (and its caches, keyed by the weights) sees it as
  a model of its own: ``layers:0.3+kd`` then ``layers:0.2+kd`` distils the second pruning from the first one's
  student, not from the original;
* one **schedule stage** (``steps:N``, ``dpm:N``, or the explicit timestep lists ``gamma``, ``uniform``,
  ``karras``, ``ays``, ``xue``, ``evo``) changes how it samples;
* one **skip-plan stage** (``dipgo``, ``deepcache``, ``random``, ``ga``) goes last: a plan is learned for the
  denoiser and the step count before it. It cannot follow an explicit timestep list (plans are learned on the
  scheduler's own steps; use ``steps:N`` before it).

After each stage its outputs on the evaluation inputs are compared with the ORIGINAL model's outputs (same inputs,
seeds and step count as the original's run): PSNR/SSIM and the task's metrics, MACs of a sampling run and wall time
relative to the original's. ``floor`` (e.g. ``{"psnr": 20}``) makes it guided: the first stage that falls below a
floor is rejected, the workflow stops, and the result is the stage before it. With a floor, ``auto`` in place of a
stage's setting (``layers:auto``, ``depth:auto``, ``steps:auto``, ``dpm:auto``, ``deepcache:auto``) searches for
the most aggressive setting that still meets the floor, by bisection over the setting's range (see :data:`AUTO`);
an auto stage that no setting lets meet the floor is skipped, and the workflow goes on. Auto stages spend the
floor in the order given: the first takes all it can, unless ``search="joint"`` (``--search joint``) also tries
milder settings of it, and the stack without it, and keeps the cheapest result (see :func:`run_workflow`).

Writes ``OUT/workflow.json`` (the rows), ``OUT/recipe.json`` (its ``model`` names the pipeline folder to load: the
last model stage's, or the original; its sections the schedule and the skip plan) and, from the CLI,
``OUT/index.html`` with the cost/quality path and image grids. A model stage whose folder is complete is loaded,
not rebuilt, when the same command runs again; training inside stages is cached as the bench caches it. Every
sampling run is kept in ``OUT/evals/`` (outputs, wall time, MACs; one file per model, stage, schedule and inputs),
so what one stack of a joint search or an earlier run has sampled is not sampled again (its row's notes say so and
keep that first wall time; delete ``OUT/evals/`` to time afresh).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from diffslim.bench import (METHODS, BenchContext, check_processes_agree, check_task_weight, count_run_macs,
                            default_task_weight, layer_variant, parse_methods, refuse_together)
from diffslim.errors import UserError
from diffslim.launch import is_first, slowest, wait_for_everyone
from diffslim.methods.layer_prune import SelectionUnreachable
from diffslim.recipe import Recipe
from diffslim.sample import SampleSpec, model_fingerprint, run_pipeline, sample

MODEL_STAGES = ("layers", "bk-sdm", "depth")
SCHEDULE_STAGES = ("steps", "dpm", "gamma", "uniform", "karras", "ays", "xue", "evo")
EXPLICIT_SCHEDULES = ("gamma", "uniform", "karras", "ays", "xue", "evo")
PLAN_STAGES = ("dipgo", "deepcache", "random", "ga")
# metrics a floor may hold, all higher-is-better
FLOOR_METRICS = ("psnr", "ssim", "digit_accuracy", "psnr_gt", "ssim_gt", "clip_score")
BOUNDED_METRICS = ("ssim", "digit_accuracy", "ssim_gt")  # at most 1
# stages whose setting ``auto`` searches: a valid setting to check the stage with before anything runs
AUTO = {"layers": "0.5", "depth": "1", "steps": "1", "dpm": "2", "deepcache": "2"}
LAYER_RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # the ratios layers:auto tries from
MAX_DEEPCACHE_INTERVAL = 10
SEARCHES = ("greedy", "joint")
JOINT_WIDTH = 3  # default number of milder settings the joint search tries of an auto stage
# what the joint search minimises: the result's row key, then the key that breaks ties
OBJECTIVES = {"macs": ("macs_ratio", "params"), "params": ("params", "macs_ratio")}


def default_stages(denoiser) -> str:
    """The stack ``diffslim workflow`` runs when no stages are given (it needs a floor): every stage ``auto``, one of
    each kind that applies to the denoiser. On a U-Net: layer pruning, fewer steps, then DeepCache; on a
    transformer: layer pruning, then fewer steps. An auto stage that cannot meet the floor is skipped."""
    if hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks"):
        return "layers:auto,steps:auto,deepcache:auto"
    return "layers:auto,steps:auto"


def stage_kind(name: str) -> str:
    """``"model"``, ``"schedule"`` or ``"plan"``; a :class:`UserError` for a bench method that cannot be a stage."""
    for kind, names in (("model", MODEL_STAGES), ("schedule", SCHEDULE_STAGES), ("plan", PLAN_STAGES)):
        if name in names:
            return kind
    raise UserError(f"{name!r} cannot be a workflow stage; accepted: {', '.join(MODEL_STAGES + SCHEDULE_STAGES + PLAN_STAGES)}"
                    " (diffusers' caches and full are bench-only)")


def parse_stages(text: str) -> list[tuple[str, Optional[str]]]:
    """``"layers:0.3+kd,steps:20,dipgo:0.3"`` -> ``[("layers", "0.3+kd"), ("steps", "20"), ("dipgo", "0.3")]``.

    Checks the order: model stages (any number: depth-skip and layer pruning stack, see ``diffslim.combined``),
    then at most one schedule stage, then at most one skip-plan stage."""
    for item in (t.strip() for t in text.split(",")):
        if item and item.partition(":")[0] not in METHODS:
            stage_kind(item.partition(":")[0])  # names the stages a workflow accepts
    stages = parse_methods(text, "--stages")
    rank = {"model": 0, "schedule": 1, "plan": 2}
    kinds = [stage_kind(n) for n, _ in stages]
    for (a, ka), (b, kb) in zip(zip(stages, kinds), zip(stages[1:], kinds[1:])):
        if rank[kb] < rank[ka]:
            raise UserError(f"stage {_label(b)} ({kb}) after {_label(a)} ({ka}): give model stages first, then one "
                            "schedule stage, then one skip-plan stage")
    for kind in ("schedule", "plan"):
        if kinds.count(kind) > 1:
            raise UserError(f"{kinds.count(kind)} {kind} stages ({', '.join(_label(s) for s, k in zip(stages, kinds) if k == kind)}); "
                            f"give at most one")
    for name, arg in stages:
        if arg is not None and arg.startswith("auto"):
            if name not in AUTO:
                raise UserError(f"{name}:{arg}: auto searches the setting of {', '.join(f'{k}:auto' for k in AUTO)} "
                                f"only")
            body, variant = arg.partition("@")[0], auto_variant(arg)
            if "+" in body:
                raise UserError(f"{name}:{arg}: auto takes no suffix (it searches without distillation or "
                                f"fine-tuning); run {name}:auto, then {name}:SETTING{arg[4:]} with the setting it kept")
            if body != "auto" and name != "layers":
                raise UserError(f"{name}:{arg}: only layers:auto takes a criterion (layers:auto:pairs, ...); give "
                                f"{name}:auto")
            if body != "auto":
                layer_variant(variant, "auto")
            stage_floor(arg, {})  # checks an own floor's form
    explicit = [s for s in stages if s[0] in EXPLICIT_SCHEDULES]
    if explicit and "plan" in kinds:
        raise UserError(f"a skip plan cannot follow {_label(explicit[0])}: plans are learned on the scheduler's own "
                        "steps; use steps:N before the plan, or put the timestep schedule last without a plan")
    return stages


def parse_floor(text: Optional[str]) -> dict[str, float]:
    """``"psnr=20,digit_accuracy=0.9"`` -> ``{"psnr": 20.0, "digit_accuracy": 0.9}`` (None or "" -> ``{}``)."""
    out = {}
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        key, eq, value = item.partition("=")
        if not eq or key not in FLOOR_METRICS:
            raise UserError(f"floor {item!r}: give METRIC=VALUE with METRIC one of {', '.join(FLOOR_METRICS)}, "
                            "e.g. psnr=20")
        if key in out:
            raise UserError(f"floor {text!r} sets {key} twice; give each metric once")
        try:
            out[key] = float(value)
        except ValueError:
            raise UserError(f"floor {item!r}: {value!r} is not a number") from None
        if not math.isfinite(out[key]):
            raise UserError(f"floor {item!r}: give a finite number, e.g. {key}=20")
        if key in BOUNDED_METRICS and not out[key] <= 1:
            raise UserError(f"floor {item!r}: {key} is at most 1, so no stage could meet it; e.g. {key}=0.95")
    return out


def stage_floor(arg: Optional[str], floor: dict[str, float]) -> Optional[dict[str, float]]:
    """The floor an ``auto`` stage searches against (None for a stage that is not auto): the workflow's ``floor``,
    raised by the stage's own ``auto@METRIC=V`` (which keeps quality for the stages after it; it may not be lower
    than the workflow's floor of that metric)."""
    if arg is None or not arg.startswith("auto"):
        return None
    body, at, text = arg.partition("@")
    if not at:
        return dict(floor)
    own = parse_floor(text)
    if len(own) != 1:
        raise UserError(f"{body}@{text}: give one METRIC=VALUE after auto@, e.g. layers:auto@psnr=40")
    (key, value), = own.items()
    if key in floor and value < floor[key]:
        raise UserError(f"{arg}: a stage's own floor keeps more quality than the workflow's, not less "
                        f"({key} {value:g} < {floor[key]:g})")
    return {**floor, key: value}


def auto_variant(arg: Optional[str]) -> str:
    """The criterion of ``layers:auto:CRITERION[@METRIC=V]`` (``"pairs"``, ``"similarity"``, ...; ``""`` for plain
    ``auto``): the ratio is searched with the layers that criterion picks (see ``diffslim.bench.LAYER_VARIANTS``)."""
    return (arg or "").partition("@")[0].partition(":")[2]


def _floor_text(floor: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in floor.items())


def _label(stage) -> str:
    name, arg = stage
    return f"{name}:{arg}" if arg else name


def _slug(i: int, stage) -> str:
    return f"{i}-" + "".join(c if c.isalnum() or c in ".+-" else "-" for c in _label(stage))


@dataclass
class WorkflowResult:
    """The rows (``original`` first, then one per stage run), the outputs of each, and the recipe of the result."""

    rows: list[dict]
    outputs: dict[str, torch.Tensor]
    recipe: Recipe
    stopped: Optional[str] = None  # why the workflow stopped early (a floor), None when every stage ran
    stages_kept: list[str] = field(default_factory=list)
    # the joint search's stacks tried: their stages, kept stages, folder, final cost and quality, the chosen one
    branches: list[dict] = field(default_factory=list)
    # the original timed again after the stages, as the bench does (``{"first", "last", "drift"}``; see
    # :func:`diffslim.bench.timing_note`); where every stage was read from ``evals/``, the timing the run that
    # sampled them recorded there
    timing: Optional[dict] = None
    # where the stages sampled: ``{"device", "dtype"}`` (a bfloat16 run's rows are not a float32 run's)
    ran_on: Optional[dict] = None

    def to_json(self) -> dict:
        return {"rows": self.rows, "stopped": self.stopped, "stages_kept": self.stages_kept,
                "recipe": self.recipe.model_dump(exclude_none=True),
                **({"ran_on": self.ran_on} if self.ran_on else {}),
                **({"branches": self.branches} if self.branches else {}),
                **({"timing": self.timing} if self.timing else {})}


def _below_floor(row: dict, floor: dict[str, float]) -> list[str]:
    bad = []
    for key, value in floor.items():
        if key not in row:
            raise UserError(f"floor {key}: this model's metrics have no {key}; they are "
                            f"{', '.join(k for k in FLOOR_METRICS if k in row)}")
        if not row[key] >= value:
            bad.append(f"{key} {row[key]:.4g} < {value:g}")
    return bad


def _stage_key(cur, stage, floor: dict, n: int, task_weight: float = 1.0,
               layer_calibration: Optional[int] = None) -> dict:
    """What makes a model stage's saved folder reusable: the stage, its input model, for ``auto`` the floor and the
    number of inputs the search judged by, for ``+kd``/``+ft`` another task-loss weight than the default, for
    ``layers`` a calibration count other than the default, and a dtype other than float32 (the stage's weights are
    saved in it: a float32 rerun rebuilt nothing and sampled the bfloat16 stage)."""
    key = {"stage": _label(stage), "input": model_fingerprint(cur.source)}
    if (stage[1] or "").startswith("auto"):
        key.update(floor=dict(sorted(floor.items())), n=n)
    if task_weight != 1.0 and any(t in (stage[1] or "") for t in ("+kd", "+ft")):
        key.update(task_weight=task_weight)
    if layer_calibration is not None and stage[0] == "layers":
        key.update(layer_calibration=layer_calibration)
    if "dtype" in _placement_key(cur):  # the stage's weights are saved in the run's dtype
        key.update(dtype=_placement_key(cur)["dtype"])
    return key


def _model_stage(cur, variant, key: dict, row: dict, folder: Path, log: Callable[[str], None], original: str,
                 command: Optional[str] = None) -> None:
    """Save the stage's pipeline to ``folder/pipeline`` (with its model card; ``original``: the workflow's MODEL,
    ``command``: the command line that runs the workflow); ``row``: its label and, of an auto stage, its search
    trail and candidates, kept beside it. :func:`_reloaded_stage` loads it back."""
    if is_first():  # under `accelerate launch` the first process writes, the others load what it wrote
        if folder.exists():  # a stale or half-written stage of an earlier run
            shutil.rmtree(folder)
        variant.pipe.save_pretrained(str(folder / "pipeline"), safe_serialization=True)
        from diffslim.report.card import stage_card, write_model_card

        write_model_card(folder / "pipeline", command=command, **stage_card(cur, variant.pipe, row["stage"], original))
        # written last: a folder without it is incomplete and is rebuilt
        (folder / "stage.json").write_text(json.dumps({**key, "label": row["stage"], "search": row.get("search"),
                                                       "candidates": row.get("candidates")}))
    wait_for_everyone()
    log(f"  saved {folder / 'pipeline'}")


def _reloaded_stage(folder: Path, placement: dict, zoo):
    """The stage saved in ``folder/pipeline``, loaded where (and in the dtype) the stage before it ran; ``zoo``: that
    stage's zoo entry, which says which training data the later stages use (a pruned zoo model still learns its zoo
    task)."""
    from diffslim.models.load import load

    return replace(load(str(folder / "pipeline"), **placement), zoo=zoo)


def _built_stage(cur, key: dict, folder: Path):
    """``(loaded, label, search, candidates)`` of a model stage completed by an earlier run of the same command, or
    None."""
    from diffslim.models.load import load

    meta = folder / "stage.json"
    if not (meta.exists() and (folder / "pipeline" / "model_index.json").exists()):
        return None
    saved = json.loads(meta.read_text())
    label, search, cands = saved.pop("label", key["stage"]), saved.pop("search", None), saved.pop("candidates", None)
    if saved != key:
        return None
    return replace(load(str(folder / "pipeline"), **_placement_of(cur)), zoo=cur.zoo), label, search, cands


def _placement_of(loaded) -> dict:
    """``{"device", "dtype"}`` of ``loaded``'s denoiser (stages reload their saved pipelines so); the CPU in float32
    when it has none."""
    import torch

    den = getattr(loaded, "denoiser", None)
    p = next(den.parameters(), None) if den is not None else None
    return {"device": p.device, "dtype": p.dtype} if p is not None else {"device": torch.device("cpu"),
                                                                          "dtype": torch.float32}


def _placement_key(loaded) -> dict:
    """What to add to a sampled run's cache key for where and how it ran: nothing on the CPU in float32 (the keys
    of earlier runs stay valid), else the device type and the dtype (other kernels give other outputs and
    timings)."""
    import torch

    where = _placement_of(loaded)
    key = {} if where["device"].type == "cpu" else {"device": where["device"].type}
    if where["dtype"] != torch.float32:
        key["dtype"] = str(where["dtype"]).removeprefix("torch.")
    return key


def _auto_candidates(name: str, ctx: BenchContext) -> list[str]:
    """The settings ``name:auto`` tries, mildest first (the stage's identity, where it has one, left out)."""
    if name == "steps":
        return [str(n) for n in range(ctx.default_steps - 1, 0, -1)]
    if name == "dpm":
        return [str(n) for n in range(ctx.default_steps, 1, -1)]
    if name == "depth":
        from diffslim.methods.depth_skip import max_depth

        den = ctx.loaded.denoiser
        full = getattr(den.config, "depth_skip", None) or max_depth(den)
        return [str(d) for d in range(full - 1, 0, -1)]
    if name == "deepcache":
        return [str(k) for k in range(2, min(MAX_DEEPCACHE_INTERVAL, ctx.default_steps) + 1)]
    return [f"{r:g}" for r in LAYER_RATIOS]


def _auto_search(name: str, ctx: BenchContext, evaluate, floor: dict, log: Callable[[str], None], criterion: str = ""):
    """The most aggressive setting of ``name`` whose outputs meet ``floor``, by bisection over
    :func:`_auto_candidates` (quality is taken to fall as the setting grows more aggressive; every kept
    setting was measured to meet the floor, but a more aggressive one past a setting that misses it is not tried).

    Returns ``(variant, row, images, trail)`` of the kept setting, or of the mildest one, which then misses the
    floor, when none meets it; ``trail``: every setting tried, in order, with its metrics and verdict. The row's
    ``candidates`` are the settings searched, mildest first (the joint search picks milder ones from them).
    ``criterion``: a layer criterion other than the output loss (``pairs`` of ``layers:auto:pairs``), kept in every
    setting.
    """
    from diffslim.evaluate import finite

    cands = [c + (f":{criterion}" if criterion else "") for c in _auto_candidates(name, ctx)]
    if not cands:
        raise UserError(f"{name}:auto has no setting to try here: the stage before already left {name} at its most "
                        "aggressive (e.g. 1 step, depth 1)")
    trail, results = [], {}
    lo, hi = -1, len(cands)  # cands[:lo + 1] meet the floor, cands[hi:] miss it (taken as monotone)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        setting = f"{name}:{cands[mid]}"
        try:
            variant = METHODS[name](cands[mid], ctx)
        except SelectionUnreachable as e:  # past what a stock config or a params cap allows: as if it missed
            trail.append({"setting": setting, "accepted": False, "unavailable": str(e)})
            log(f"  {setting}: cannot be made ({e})")
            hi = mid
            continue
        row, images = evaluate(variant, setting)
        bad = _below_floor(row, floor)
        results[mid] = (variant, row, images)
        trail.append({"setting": setting, "accepted": not bad,
                      **{k: finite(row[k]) for k in floor if k in row}, "macs_ratio": row["macs_ratio"]})
        log(f"  {setting}: " + ", ".join(f"{k} {row[k]:.4g}" for k in floor if k in row) +
            (" meets the floor" if not bad else " misses the floor"))
        if bad:
            hi = mid
        else:
            lo = mid
    if max(lo, 0) not in results:  # even the mildest setting cannot be made
        raise UserError(f"{name}:auto{':' + criterion if criterion else ''}: no setting can be made here; "
                        + trail[-1].get("unavailable", ""))
    variant, row, images = results[max(lo, 0)]
    row["candidates"] = [f"{name}:{c}" for c in cands]
    return variant, row, images, trail


def run_workflow(loaded, stages: str, evalset, out, default_steps: int = 50, scheduler: Optional[str] = None,
                 batch_size: int = 16, metrics_fn: Optional[Callable] = None, floor: Optional[dict] = None,
                 progress: bool = True, log: Callable[[str], None] = print, data: str = "zoo",
                 resolution: Optional[int] = None, task_weight: Optional[float] = None, search: str = "greedy",
                 objective: str = "macs", joint_width: int = JOINT_WIDTH, repeats: int = 1,
                 command: Optional[str] = None, layer_calibration: Optional[int] = None) -> WorkflowResult:
    """Run ``stages`` (see :func:`parse_stages`) on ``loaded`` in order; every row is judged against the original.
    ``command``: the command line that runs it, which the model stages' cards quote.

    ``evalset``: the inputs and seeds every stage samples; ``metrics_fn(outputs, reference) -> dict`` as in
    :func:`diffslim.bench.run_bench`; ``floor``: ``{metric: lowest accepted value}`` (see :func:`parse_floor`);
    ``data``/``resolution``: the training data of stages that score or train, ``task_weight`` the task loss's weight in
    their training (None: :func:`~diffslim.bench.default_task_weight`, 1 on training data, 0 on the images the
    original samples itself when there is none; see :class:`~diffslim.bench.BenchContext`).
    ``repeats``: timed sampling runs per stage, the fastest counts (the first one's outputs are judged).
    ``layer_calibration``: how many calibration triples the ``layers`` stages' criteria score on (None: the bench's
    default, 32).
    Rows hold ``stage``, ``kind``, ``params``, ``macs_per_sample``, ``macs_ratio`` and ``speedup`` (against the
    original), the metrics, ``accepted`` and ``notes``.

    ``search="greedy"``: each ``auto`` stage takes all the floor it can, in the order given. ``search="joint"``: an
    auto stage followed by another auto stage may leave some of the floor to the stages after it: the stack is run
    again with that stage at ``joint_width`` milder settings (spread evenly from its mildest candidate to the
    one it kept) and without the stage, recursively, and the stack whose result is cheapest in ``objective``
    (``"macs"``: MACs of a sampling run, then parameters; ``"params"``: the other way round) is returned, every
    stack tried in its ``branches`` (each run's rows under ``out/joint/``; the model stages of all runs in
    ``out/stages/``, where a stage built once on one model serves every run that has it). Its cost: with two auto stages
    ``joint_width + 2`` runs of the workflow, with three ``(joint_width + 2) ** 2`` (the original is sampled once).
    """
    check_search(search, objective, joint_width)
    if check_task_weight(task_weight) is None:
        task_weight = default_task_weight(loaded, data)
    if search == "joint":
        return _run_joint(loaded, stages, evalset, out, objective, joint_width, floor=floor, log=log,
                          default_steps=default_steps,
                          scheduler=scheduler, batch_size=batch_size, metrics_fn=metrics_fn, progress=progress,
                          data=data, resolution=resolution, task_weight=task_weight, repeats=repeats,
                          command=command, layer_calibration=layer_calibration)
    return _run_stages(loaded, stages, evalset, out, default_steps=default_steps, scheduler=scheduler,
                       batch_size=batch_size, metrics_fn=metrics_fn, floor=floor, progress=progress, log=log,
                       data=data, resolution=resolution, task_weight=task_weight, repeats=repeats, command=command,
                       layer_calibration=layer_calibration)


def check_search(search: str, objective: str, joint_width: int = JOINT_WIDTH) -> None:
    if search not in SEARCHES:
        raise UserError(f"search {search!r}: accepted: greedy (each auto stage takes all the floor it can, in order) "
                        "or joint (also tries the stack with each auto stage milder or left out, keeps the cheapest)")
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r}: accepted: {', '.join(OBJECTIVES)} (what the joint search makes "
                        "smallest)")
    if search == "greedy" and (objective, joint_width) != ("macs", JOINT_WIDTH):
        raise UserError("an objective and a joint width steer search='joint' (--search joint) only; the greedy search "
                        "keeps each auto stage's most aggressive setting")
    if not 0 <= joint_width <= 10:
        raise UserError(f"joint width {joint_width}: give 0 to 10 milder settings per auto stage (0: the kept setting "
                        "or none)")


def _final_row(result: WorkflowResult) -> dict:
    """The row of the workflow's result: its last accepted stage, or the original."""
    return [r for r in result.rows if r.get("accepted")][-1]


def cheapest(branches: list[dict], objective: str, floor: dict) -> dict:
    """The branch the joint search keeps: the least ``objective``, then the other cost, then the most of the first
    floor metric. ``branches``: dicts with ``params``, ``macs_ratio`` and the floor's metrics of a stack's result."""
    first, second = OBJECTIVES[objective]
    quality = next(iter(floor), None)

    def key(b):
        q = b.get(quality, 0.0)
        return b[first], b[second], -(math.inf if q is None else q)  # None: the original's own, infinite PSNR

    return min(branches, key=key)


def _branch_points(parsed: list, result: WorkflowResult) -> list[int]:
    """Indices of the auto stages with a later auto stage, among the stages ``result`` ran: where the joint search
    branches."""
    autos = [i for i, (_, arg) in enumerate(parsed) if (arg or "").startswith("auto")]
    ran = len(result.rows) - 1  # rows[1:] are parsed's stages in order, up to where the workflow stopped
    return [i for i in autos[:-1] if i < ran]


def _run_joint(loaded, stages: str, evalset, out, objective: str, width: int, floor: Optional[dict], log,
               **kw) -> WorkflowResult:
    """The joint search of :func:`run_workflow`: every stack tried, the cheapest returned with ``branches``."""
    floor = dict(floor or {})
    out = Path(out)
    leaves: list[tuple[str, WorkflowResult, Path]] = []

    spec = SampleSpec(inputs=evalset.inputs, seeds=evalset.seeds, num_inference_steps=kw["default_steps"],
                      scheduler=kw["scheduler"], call_kwargs=dict(evalset.call_kwargs))
    # what makes a finished run of a stack reusable when the search runs again (after an interruption)
    same = {"input": model_fingerprint(loaded.source), "inputs": spec.digest(), "floor": dict(sorted(floor.items())),
            **{k: kw[k] for k in ("data", "resolution", "task_weight")}, **_placement_key(loaded),
            **({"layer_calibration": kw["layer_calibration"]} if kw["layer_calibration"] is not None else {})}
    resumed = []
    reference: list = []  # the original's (outputs, seconds, MACs), once a run has sampled it

    def run(text: str, where: Path) -> WorkflowResult:
        done = where / "joint_run.json"
        key = {**same, "stages": text}
        if done.exists():
            saved = json.loads(done.read_text())
            if saved["key"] == key:
                resumed.append(text)
                return WorkflowResult(rows=saved["rows"], outputs={}, recipe=Recipe.model_validate(saved["recipe"]),
                                      stopped=saved["stopped"], stages_kept=saved["stages_kept"],
                                      timing=saved.get("timing"), ran_on=saved.get("ran_on"))
        res = _run_stages(loaded, text, evalset, where, floor=floor, log=log,
                          reference=reference[0] if reference else None, shared_stages=out / "stages", **kw)
        if not reference:
            reference.append((res.outputs["original"], res.rows[0]["seconds"], res.rows[0]["macs_per_sample"]))
        if is_first():
            done.write_text(json.dumps({"key": key, **res.to_json(), "rows": _json_rows(res)}))  # written last
        wait_for_everyone()  # every process finds this stack's run the next time it looks
        return res

    def explore(parsed: list, where: Path):
        """Run ``parsed`` greedily, then each of its branch points' alternatives, the earlier ones at the settings
        this run kept (every combination of one alternative or the kept setting per branch point is one run)."""
        text = ",".join(_label(s) for s in parsed)
        res = run(text, where)
        leaves.append((text, res, where))
        fixed: list = list(parsed)  # the stages as this run kept them, up to the branch point at hand
        for i in _branch_points(parsed, res):
            row, (name, _) = res.rows[i + 1], parsed[i]
            if not row["accepted"]:  # the stage was skipped: this run already is the stack without it
                fixed[i] = None
                continue
            cands = row["candidates"]
            k = cands.index(row["stage"])
            milder = sorted({round(k * w / (width + 1)) for w in range(1, width + 1)} - {k})
            for alt in [cands[j] for j in milder] + [None]:  # None: the stack without this stage
                branch = [s for s in fixed[:i] + [tuple(alt.split(":", 1)) if alt else None] + fixed[i + 1:] if s]
                log(f"joint search: {','.join(_label(s) for s in branch)} (instead of {row['stage']} "
                    f"at stage {i + 1})")
                explore(branch, where / "joint" / (alt.replace(":", "-") if alt else f"no-{name}"))
            fixed[i] = tuple(row["stage"].split(":", 1))

    parsed = parse_stages(stages)
    if sum((arg or "").startswith("auto") for _, arg in parsed) < 2:
        log("joint search: fewer than two auto stages, so no floor to share between them: one greedy run")
    explore(parsed, out)
    from diffslim.evaluate import finite

    branches = [{"stages": text, "kept": res.stages_kept, "out": str(where),
                 **{k: finite(_final_row(res)[k]) for k in ("params", "macs_ratio", *floor) if k in _final_row(res)}}
                for text, res, where in leaves]
    best = cheapest(branches, objective, floor)
    text, result, where = next(leaf for leaf, b in zip(leaves, branches) if b is best)
    if resumed:
        log(f"joint search: {len(resumed)} of {len(leaves)} stacks loaded from an earlier run (joint_run.json in "
            "their folders)")
    if not result.outputs:  # loaded from an earlier run: run it again for its outputs (the same, deterministic)
        result = _run_stages(loaded, text, evalset, where, floor=floor, log=log,
                             reference=reference[0] if reference else None, shared_stages=out / "stages", **kw)
    result.branches = [{**b, "chosen": b is best} for b in branches]
    result.timing = leaves[0][1].timing  # the greedy stack's run sampled the original and timed it again
    first, _ = OBJECTIVES[objective]
    log(f"joint search: {len(leaves)} stacks tried; the cheapest in {first}: "
        f"{', '.join(result.stages_kept) or 'the original'} ({first} {_final_row(result)[first]:.4g})")
    if is_first():
        result.recipe.save(out / "recipe.json")
        _write_rows(result, out)
    return result


def _time_sampling(pipe, s, repeats: int, progress: bool = False, label: str = ""):
    """``(outputs, seconds)``: ``pipe`` warmed up at the timed batch's shape, then sampled ``repeats`` times on ``s``;
    the fastest run counts (the others waited on something else), the first one's outputs are returned."""
    run_pipeline(pipe, s, list(range(min(len(s.inputs), s.batch_size))))
    wait_for_everyone()  # under a launch the clocks start together (a process still warming up is not timed)
    t0 = time.perf_counter()
    images = sample(pipe, s, show_progress=progress, description=label)
    seconds = slowest(time.perf_counter() - t0)  # under a launch, the slowest process's time, the same in all
    for _ in range(repeats - 1):
        wait_for_everyone()
        t0 = time.perf_counter()
        sample(pipe, s)
        seconds = min(seconds, slowest(time.perf_counter() - t0))
    return images, seconds


AGAIN = "original (timed again)"


def _time_original_again(result: WorkflowResult, pipe, s, repeats: int, log: Callable[[str], None]) -> bool:
    """Sample the original once more after the stages, as the bench does: ``result.timing`` holds both timings and
    how far apart they are, and the speedups are over the faster one (no speedup borrows a slow first run). True
    where the second timing is the faster (the original's recorded time is then that one)."""
    from diffslim.bench import timing_note

    log("the original, timed again after the stages")
    first = result.rows[0]["seconds"]
    _, again = _time_sampling(pipe, s, repeats, label=AGAIN)
    result.timing = {"first": first, "last": again, "drift": abs(again - first) / first}
    log(f"  {timing_note(result.timing, 'the stages')}")
    if again >= first:
        return False
    result.rows[0]["seconds"] = again
    for row in result.rows:
        row["speedup"] = again / row["seconds"]
    return True


def _run_stages(loaded, stages: str, evalset, out, default_steps: int = 50, scheduler: Optional[str] = None,
                batch_size: int = 16, metrics_fn: Optional[Callable] = None, floor: Optional[dict] = None,
                progress: bool = True, log: Callable[[str], None] = print, data: str = "zoo",
                resolution: Optional[int] = None, task_weight: float = 1.0, reference=None,
                shared_stages: Optional[Path] = None, repeats: int = 1,
                command: Optional[str] = None, layer_calibration: Optional[int] = None) -> WorkflowResult:
    """The greedy workflow of :func:`run_workflow`; ``reference``: ``(outputs, seconds, MACs)`` of the original's
    run, when another run on the same inputs has made it; ``shared_stages``: a folder of model stages shared by
    several runs (the joint search's), each named by its position, label and a digest of its key (stage and input
    model), so that runs building the same stage on the same model share it and no two stages share a folder."""
    if loaded.pipe is None:
        raise UserError(f"{loaded.source} has no pipeline to sample; the workflow needs a pipeline folder or zoo:NAME")
    parsed = parse_stages(stages)
    check_task_weight(task_weight)
    if layer_calibration is not None and layer_calibration < 1:
        raise UserError(f"layer_calibration={layer_calibration}: the layer criteria need at least 1 calibration triple")
    floor = dict(floor or {})
    out = Path(out)
    spec = SampleSpec(inputs=evalset.inputs, seeds=evalset.seeds, num_inference_steps=default_steps,
                      scheduler=scheduler, call_kwargs=dict(evalset.call_kwargs), batch_size=batch_size)
    dry = BenchContext(loaded=loaded, base_spec=spec, default_steps=default_steps, dry_run=True, data=data,
                       resolution=resolution)

    def check(name, arg):
        own = stage_floor(arg, floor)
        METHODS[name](AUTO[name] if own is not None else arg, dry)
        if own is not None and not own:
            raise UserError(f"{name}:auto searches for the most aggressive setting that meets a floor: give one, "
                            "e.g. --floor psnr=30")

    # every stage's argument is checked before anything runs, and every refusal said at once
    refuse_together(parsed, check, "stages")
    out.mkdir(parents=True, exist_ok=True)
    evals = (shared_stages.parent if shared_stages is not None else out) / "evals"
    placed = _placement_key(loaded)
    count = {"sampled": 0, "read": 0}

    def eval_file(s, label, model) -> tuple[dict, Path]:
        key = {"input": model, "stage": label, "spec": s.digest(), "data": data, "resolution": resolution,
               "task_weight": task_weight, **placed, **({"repeats": repeats} if repeats > 1 else {}),
               **({"layer_calibration": layer_calibration} if layer_calibration is not None else {})}
        return key, evals / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".pt")

    def timed(pipe, s, label, model):
        """``(outputs, seconds, MACs, reused)`` of ``pipe`` (``model``'s fingerprint, with stage ``label`` applied) on ``s``;
        read from ``evals/`` when this model, stage, inputs and schedule were sampled before (by this command, an
        earlier run of it, or another stack of a joint search: then ``reused``)."""
        key, path = eval_file(s, label, model)
        if path.exists():
            try:
                saved = torch.load(path, weights_only=True)
                if saved["key"] == json.dumps(key, sort_keys=True):
                    count["read"] += 1
                    return saved["images"], saved["seconds"], saved["macs"], True
            except Exception:  # a truncated file is sampled again, not trusted
                pass
        images, seconds = _time_sampling(pipe, s, repeats, progress, label)
        macs = count_run_macs(pipe, s)
        if is_first():  # every process holds the gathered outputs; the first keeps them
            evals.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"key": json.dumps(key, sort_keys=True), "images": images, "seconds": seconds, "macs": macs},
                       tmp)
            tmp.replace(path)  # whole or absent
        wait_for_everyone()  # no process looks for the file before it is there
        count["sampled"] += 1
        return images, seconds, macs, False

    timed_here = reference is None  # a joint search's later stacks take the original's sampling from its first
    original_spec = spec
    reference, t_full, macs_full = reference or timed(loaded.pipe, spec, "original", model_fingerprint(loaded.source))[:3]
    sampled_before = count["sampled"]
    params0 = sum(p.numel() for p in loaded.denoiser.parameters())
    rows = [{"stage": "original", "kind": "", "params": params0, "macs_per_sample": macs_full, "macs_ratio": 1.0,
             "seconds": t_full, "speedup": 1.0, **(metrics_fn(reference, reference) if metrics_fn else {}),
             "accepted": True}]
    outputs = {"original": reference}
    cur, steps, model_source = loaded, default_steps, loaded.source
    sections: dict = {}
    kept, stopped = [], None
    for i, stage in enumerate(parsed, start=1):
        name, arg = stage
        kind = stage_kind(name)
        label = _label(stage)
        log(f"stage {i}/{len(parsed)}: {label} ({kind})")
        own = stage_floor(arg, floor)  # an auto stage's floor (None for other stages)
        want = _stage_key(cur, stage, own or floor, len(evalset.inputs), task_weight, layer_calibration)
        folder = out / "stages" / _slug(i, stage) if shared_stages is None else shared_stages / (
            _slug(i, stage) + "-" + hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:10])
        built = _built_stage(cur, want, folder) if kind == "model" else None

        def evaluate(variant, label):
            """The row of ``variant`` (judged against the original) and its outputs."""
            try:
                images, seconds, macs, reused = timed(variant.pipe, variant.spec, label, want["input"])
                check_processes_agree(variant, macs)
            finally:
                if variant.cleanup is not None:
                    variant.cleanup()
            row = {"stage": label, "kind": kind, "params": variant.params, "macs_per_sample": macs,
                   "macs_ratio": macs / macs_full, "seconds": seconds, "speedup": t_full / seconds,
                   **(metrics_fn(images, reference) if metrics_fn else {})}
            notes = [variant.notes] if variant.notes else []
            if reused:
                notes.append(f"outputs and time from an earlier sampling of the same stage ({evals})")
            if notes:
                row["notes"] = "; ".join(notes)
            return row, images

        search = None
        if built is not None:
            from diffslim.bench import Variant

            loaded_stage, label, search, cands = built
            log(f"  loaded from {folder / 'pipeline'} (built by an earlier run)")
            row, images = evaluate(Variant(label, loaded_stage.pipe, spec, sum(
                p.numel() for p in loaded_stage.denoiser.parameters()), notes=f"loaded from {folder / 'pipeline'}"),
                label)
            if cands:
                row["candidates"] = cands
            built = loaded_stage
        else:
            ctx = BenchContext(loaded=cur, base_spec=spec, default_steps=steps, data=data, resolution=resolution,
                               task_weight=task_weight, progress=progress, layer_calibration=layer_calibration)
            if own is not None:
                variant, row, images, search = _auto_search(name, ctx, evaluate, own, log, auto_variant(arg))
                label = row["stage"]
            else:
                variant = METHODS[name](arg, ctx)
                row, images = evaluate(variant, label)
        bad = _below_floor(row, own or floor)
        row["accepted"] = not bad
        if search is not None:
            row["search"] = search
            tried = "; ".join(f"{t['setting']} " + ("cannot be made" if "unavailable" in t
                                                     else "meets it" if t["accepted"] else "misses it")
                              for t in search)
            mine = f" (its own floor: {_floor_text(own)})" if own != floor else ""
            row["notes"] = (row.get("notes", "") + "; " if row.get("notes") else "") + f"auto{mine}, tried: {tried}"
        rows.append(row)
        outputs[label] = images
        log(f"  MACs {row['macs_ratio']:.3f} of the original" +
            (f", PSNR {row['psnr']:.2f} dB" if "psnr" in row else "") + ("" if not bad else f": below the floor ({'; '.join(bad)})"))
        if bad and search is not None:  # nothing to keep of this stage: go on without it
            row["notes"] += f"; no setting meets the floor (the mildest, {label}: {'; '.join(bad)}): stage skipped"
            log(f"  no setting of {_label(stage)} meets the floor: the stage is skipped")
            continue
        if bad:
            stopped = (f"stage {label} fell below the floor ({'; '.join(bad)}); the result is "
                       f"{'the original' if not kept else 'the stage ' + kept[-1]}. Try a milder setting of it")
            break
        kept.append(label)
        if kind == "model":
            if built is None and shared_stages is None and folder.exists() and is_first():
                # an earlier run's stage is replaced: its recipe and report, which load and show it, go first (an
                # interrupted run must not leave a recipe that loads this run's model as that run's stage)
                for name_ in ("recipe.json", "workflow.json", "index.html", "report.json"):
                    (out / name_).unlink(missing_ok=True)
            if built is not None:
                cur = built
            else:
                placement, zoo = _placement_of(cur), cur.zoo
                _model_stage(cur, variant, want, row, folder, log, portable_source(loaded.source), command)
                # the stage before (unless it is the original) and the pruned copy that shares its weights are let
                # go before the reload: a workflow of two SD-1.5 model stages held three sets of weights at once
                cur = variant = ctx = None
                gc.collect()
                cur = _reloaded_stage(folder, placement, zoo)
            model_source = str((folder / "pipeline").resolve())  # loadable from any working directory
        elif kind == "schedule":
            spec = variant.spec
            steps = spec.num_inference_steps if spec.timesteps is None else len(spec.timesteps)
            sampling = {"scheduler": spec.scheduler, "num_inference_steps": spec.num_inference_steps,
                        "timesteps": spec.timesteps}
            sections["sampling"] = {k: v for k, v in sampling.items() if v is not None}
        else:
            sections.update(variant.recipe)
    original = portable_source(loaded.source)
    recipe = Recipe.model_validate({"model": portable_source(model_source), **sections,
                                    **({"original": original} if model_source != loaded.source else {}),
                                    "description": "diffslim workflow: " + (", ".join(kept) or "no stage kept")})
    where = _placement_of(loaded)
    ran_on = {"device": str(where["device"]), "dtype": str(where["dtype"]).removeprefix("torch.")}
    result = WorkflowResult(rows=rows, outputs=outputs, recipe=recipe, stopped=stopped, stages_kept=kept,
                            ran_on=ran_on)
    if timed_here:
        path = eval_file(original_spec, "original", model_fingerprint(loaded.source))[1]
        try:
            stored = torch.load(path, weights_only=True).get("timing")
        except Exception:  # absent or damaged: time the original again
            stored = None
        if count["sampled"] > sampled_before or stored is None:  # a stage sampled by this run, or a run stopped
            # before it timed the original again (every sampling is then read from evals/ and none timed it)
            faster = _time_original_again(result, loaded.pipe, original_spec, repeats, log)
            # the timing, and the faster time as the original's, in evals/ too: a run that reads them gives these
            # speedups and this timing again
            if is_first():
                saved = torch.load(path, weights_only=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                torch.save({**saved, **({"seconds": result.rows[0]["seconds"]} if faster else {}),
                            "timing": result.timing}, tmp)
                tmp.replace(path)
            wait_for_everyone()
        else:
            result.timing = stored
    if count["read"]:
        log(f"  {count['read']} of {count['read'] + count['sampled']} samplings read from {evals} (sampled before; "
            "delete it to sample and time afresh)")
    if is_first():
        recipe.save(out / "recipe.json")
        _write_rows(result, out)
    return result


def portable_source(source: str) -> str:
    """How a recipe names a model so that it loads from anywhere: a local folder by its absolute path (a path given
    relative to the working directory worked from there only), a zoo name or a Hub id as it is."""
    return str(Path(source).resolve()) if not source.startswith("zoo:") and Path(source).exists() else source


def _json_rows(result: WorkflowResult) -> list[dict]:
    from diffslim.evaluate import finite

    return [{k: finite(v) for k, v in r.items()} for r in result.rows]


def _write_rows(result: WorkflowResult, out: Path) -> None:
    (out / "workflow.json").write_text(json.dumps({**result.to_json(), "rows": _json_rows(result)}, indent=2) + "\n")
