"""Model cards: the ``README.md`` diffslim writes into the model and pipeline folders it exports.

diffusers' own training scripts leave a model card beside the weights (``huggingface_hub.ModelCard``), and the Hub
shows it on the model's page. Ours says what a folder is before anyone loads it: YAML metadata the Hub reads
(``library_name: diffusers``, the base model where it is a Hub id, tags, the task), what was removed or trained,
the sizes against the original, the quality where the command measured it, how to load the folder (with diffusers
alone where every class in it is diffusers' or transformers', else after ``import diffslim``, which registers the
pruned classes), and the command and versions that made it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

CARD = "README.md"
# The string a card's loading code names the folder by; a user puts the folder's path (or its Hub id) there.
PLACEHOLDER = "path/to/this/folder"
_STOCK_LIBRARIES = ("diffusers", "transformers")
# the Hub's task of a pipeline, by words in its class name (first match); class-conditional DiTs have none
_TASKS = (("Upscale", "image-to-image"), ("Img2Img", "image-to-image"), ("InstructPix2Pix", "image-to-image"),
          ("Inpaint", "image-to-image"), ("ZooSR", "image-to-image"), ("StableDiffusion", "text-to-image"),
          ("PixArt", "text-to-image"), ("Flux", "text-to-image"))

Table = tuple[str, Sequence[str], Sequence[Sequence[str]]]  # (title, header, rows), cells already formatted


def hub_id(source: str) -> Optional[str]:
    """The Hub repository ``source`` names (``OWNER/NAME``, also of ``OWNER/NAME/SUBFOLDER``, where no folder of
    that name is here), else None: the card's ``base_model`` must be a Hub id, and a local path would only leak the
    exporter's file system."""
    from diffslim.models.load import split_hub_id

    hub = None if source.startswith("zoo:") or Path(source).exists() else split_hub_id(source)
    return hub[0] if hub else None


def size_table(params: tuple[Optional[int], int], macs: Optional[tuple[Optional[int], Optional[int]]] = None,
               what: str = "denoiser", macs_label: Optional[str] = None) -> Table:
    """The card's size table: ``(original, this)`` parameter counts of the denoiser and, where counted, its MACs per
    call (``macs_label``: how they were counted; default one call at batch 1); ``None`` for an original the command
    did not see."""
    rows = [[f"parameters ({what})", *_pair(*params)]]
    if macs is not None and macs[1] is not None:
        rows.append([macs_label or f"MACs per {what} call (batch 1)", *_pair(*macs)])
    return "Size", ["", "original", "this model", "share of the original"], rows


def _pair(before: Optional[int], after: int) -> list[str]:
    return (["", f"{after:,}", ""] if before is None else
            [f"{before:,}", f"{after:,}", f"{after / before:.3f}" if before else ""])


def _components(folder: Path) -> tuple[bool, str, list[tuple[str, str]]]:
    """(whether ``folder`` is a pipeline, its class name, the ``(library, class)`` of each of its components)."""
    index = folder / "model_index.json"
    if not index.is_file() and not (folder / "config.json").is_file():
        return False, "", []
    if index.is_file():
        data = json.loads(index.read_text())
        parts = [(v[0], v[1]) for k, v in data.items()
                 if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]]
        return True, data.get("_class_name", ""), parts
    data = json.loads((folder / "config.json").read_text())
    name = data.get("_class_name", "")
    import diffusers

    return False, name, [("diffusers" if hasattr(diffusers, name) else "diffslim", name)]


def _stock(folder: Path) -> bool:
    """Whether diffusers alone (with transformers) loads ``folder``: every class in it is theirs."""
    import diffusers

    pipeline, name, parts = _components(folder)
    return (not pipeline or hasattr(diffusers, name)) and all(lib in _STOCK_LIBRARIES for lib, _ in parts)


def loading_code(folder: Path, recipe: Optional[str] = None) -> str:
    """Python that loads ``folder`` (the folder named by :data:`PLACEHOLDER`): diffusers' ``from_pretrained`` where
    diffusers can (after ``import diffslim`` where a class is diffslim's), ``diffslim.load`` for the zoo's own
    pipelines, and ``diffslim.from_recipe`` where ``recipe`` (a file inside the folder) holds a schedule or a
    skip plan the weights do not."""
    if recipe is not None:
        return (f'import diffslim\n\n# the pipeline the recipe names, with what the recipe applies to it\n'
                f'pipe = diffslim.from_recipe("{PLACEHOLDER}/{recipe}")\n')
    import diffusers

    pipeline, name, parts = _components(folder)
    if pipeline and not hasattr(diffusers, name):  # a zoo pipeline: diffslim's own class
        return f'import diffslim\n\npipe = diffslim.load("{PLACEHOLDER}").pipe\n'
    weights = pipeline or any(folder.glob("*.safetensors"))
    if _stock(folder):
        if pipeline:
            return ('from diffusers import DiffusionPipeline\n\n'
                    f'pipe = DiffusionPipeline.from_pretrained("{PLACEHOLDER}")  # diffusers alone loads it\n')
        if not weights:
            return (f'from diffusers import {name}\n\n# a config without weights: the architecture, randomly '
                    f'initialised (to train, or to count)\nmodel = {name}.from_config({name}.load_config('
                    f'"{PLACEHOLDER}"))\n')
        return f'from diffusers import {name}\n\nmodel = {name}.from_pretrained("{PLACEHOLDER}")\n'
    if pipeline:
        return ('import diffslim  # registers diffslim\'s pruned classes, which this folder names\n'
                'from diffusers import DiffusionPipeline\n\n'
                f'pipe = DiffusionPipeline.from_pretrained("{PLACEHOLDER}")\n')
    return (f'import diffslim\n\nmodel = diffslim.load("{PLACEHOLDER}").denoiser  # a {name}'
            + ("" if weights else " without weights, on the meta device (structure, params, MACs)") + "\n")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _task(folder: Path) -> Optional[str]:
    pipeline, name, _ = _components(folder)
    if not pipeline:
        return None
    return next((task for word, task in _TASKS if word in name), None)


def model_card(folder: Path, *, base: str, title: str, done: Sequence[str], tables: Sequence[Table] = (),
               notes: Sequence[str] = (), recipe: Optional[str] = None, command: Optional[str] = None,
               tags: Sequence[str] = (), task_of: Optional[Path] = None, history: Optional[Earlier] = None,
               images: Sequence[tuple[str, str]] = (), recipe_model: Optional[str] = None):
    """The ``huggingface_hub.ModelCard`` of the exported ``folder`` (a pipeline or model folder, already written).

    ``base``: the model it was made from, as the user named it (the YAML's ``base_model`` where that is a Hub id);
    ``done``: one line per thing done to it; ``tables``: ``(title, header, rows)`` sections (sizes, quality);
    ``notes``: closing lines (what to do next); ``recipe``: a recipe file inside ``folder`` to load it by;
    ``command``: the command line that made it; ``task_of``: the pipeline folder whose class gives the Hub task
    (default ``folder``); ``history``: the card of the folder it was made from (:func:`earlier`), whose steps come
    first; ``images``: ``(caption, file inside folder)`` figures shown after the tables; ``recipe_model``: the
    model ``recipe`` names, where it lies outside ``folder``."""
    from huggingface_hub import ModelCard, ModelCardData

    import diffslim

    data = ModelCardData(library_name="diffusers", base_model=hub_id(base), pipeline_tag=_task(task_of or folder),
                         tags=list(dict.fromkeys(["diffslim", *([] if history is None else history.tags), *tags])))
    body = [f"# {title}", "",
            f"Made from `{base}` with diffslim {diffslim.__version__}, which compresses diffusers models while "
            "keeping their outputs close to the original's.", "", "## What was done", ""]
    steps = [] if history is None else history.done
    body += [f"- {line}" for line in steps + [d for d in done if d not in steps]]
    for name, header, rows in tables:
        body += ["", f"## {name}", "", _markdown_table(header, rows)]
    if images:
        body += ["", "## Samples and figures"]
        for caption, file in images:
            body += ["", f"![{caption}]({file})", "", f"*{caption}*"]
    code = loading_code(folder, recipe)
    where = ("this folder, or its Hub repository once uploaded" if "from_pretrained" in code else
             f"this folder; its recipe loads `{recipe_model}`, which lies outside it (from there)" if recipe_model
             else "this folder, as a whole (the recipe names its pipeline by a path inside it)" if recipe else
             "this folder")
    body += ["", "## How to load", "", "```python", code.rstrip("\n"), "```", "", f"`{PLACEHOLDER}`: {where}."]
    if notes:
        body += [""] + list(notes)
    body += ["", "## How it was made", ""]
    commands = ([] if history is None else history.commands) + ([command] if command else [])
    if commands:
        body += ["```bash", *commands, "```", ""]
    body.append(_versions())
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _versions() -> str:
    import diffusers
    import torch

    import diffslim

    return f"diffslim {diffslim.__version__}, diffusers {diffusers.__version__}, torch {torch.__version__}."


def ours(path: Path) -> bool:
    """Whether ``path`` is a card diffslim wrote (its YAML tags say so): a rerun replaces it, a user's README stays."""
    try:
        if not path.read_text().startswith("---"):  # no metadata block: someone's own README (and no hub warning)
            return False
        from huggingface_hub import ModelCard

        return "diffslim" in (ModelCard.load(path).data.tags or [])
    except Exception:  # not a model card at all: someone's own README
        return False


@dataclass
class Earlier:
    """What the card of a folder diffslim exported says was done to it: the next export of that folder (a
    distillation of a pruned model, its stock rewrite) tells the whole story, from the same original."""

    base: str
    done: list[str]
    commands: list[str]
    params: Optional[int] = None  # the original denoiser's parameters, where the card's size table has them
    macs: Optional[tuple[int, int]] = None  # (original, exported) MACs per call, where the size table has them
    macs_label: str = ""  # how that row says the MACs were counted
    tags: list[str] = field(default_factory=list)


def earlier(folder: Path) -> Optional[Earlier]:
    """The history in ``folder``'s diffslim card (a pipeline component's: its pipeline's); None where it has none."""
    path = Path(folder) / CARD
    if not path.is_file() and (Path(folder).parent / "model_index.json").is_file():
        path = Path(folder).parent / CARD
    if not path.is_file() or not ours(path):
        return None
    text = path.read_text()
    base = re.search(r"^Made from `([^`]+)`", text, flags=re.M)
    made = "\n".join(_section(text, "How it was made", r"(?s)```bash\n(.*?)\n```"))
    params = _section(text, "Size", r"^\| parameters \([^)]*\) \| ([\d,]+) \|")
    macs = _section(text, "Size", r"^\| (MACs per [^|]*) \| ([\d,]+) \| ([\d,]+) \|")
    from huggingface_hub import ModelCard

    return Earlier(base=base.group(1) if base else str(folder), done=_section(text, "What was done", r"^- (.*)$"),
                   commands=[c for c in made.splitlines() if c.strip()],
                   params=int(params[0].replace(",", "")) if params else None,
                   macs=(int(macs[0][1].replace(",", "")), int(macs[0][2].replace(",", ""))) if macs else None,
                   macs_label=macs[0][0] if macs else "",
                   tags=[t for t in (ModelCard.load(path).data.tags or []) if isinstance(t, str)])


def _section(text: str, title: str, pattern: str) -> list[str]:
    part = text.split(f"\n## {title}\n", 1)
    if len(part) < 2:
        return []
    return re.findall(pattern, part[1].split("\n## ", 1)[0], flags=re.M)


def write_model_card(folder: Path, **kwargs) -> Optional[Path]:
    """Write :func:`model_card` (same arguments) to ``folder/README.md`` and return its path; None, writing nothing,
    where the folder holds a README.md that is not a diffslim card (the user's own, kept)."""
    path = Path(folder) / CARD
    if path.exists() and not ours(path):
        return None
    model_card(Path(folder), **kwargs).save(path)
    return path


# ------------------------------------------------------------------------------------------
# What each command's cards say (the keyword arguments of write_model_card but ``command``)


def title_name(model: str) -> str:
    """How a card's title names MODEL: a zoo name or Hub id as given, a local folder by its name."""
    return model if model.startswith("zoo:") or hub_id(model) else Path(model).resolve().name


def layer_prune_card(out: Path, model: str, res, params_after: int, max_params: Optional[float], stocked: bool,
                     candidates: int, weights: bool = True, macs_label: Optional[str] = None) -> dict:
    """The card of ``diffslim layer-prune``'s ``model/`` and ``pipeline/`` (``res``: its
    :class:`~diffslim.methods.layer_prune.LayerPruneResult`; ``candidates``: how many layers it could remove;
    ``weights``: False for a config-only model; ``macs_label``: how the MACs were counted, where not at batch 1)."""
    history = earlier(Path(model))
    if res.criterion.startswith("bk-sdm-"):
        what = (f"BK-SDM's {res.criterion[7:].capitalize()} removal (Kim et al., 2023), by the same removal machinery: "
                f"the {len(res.removed)} of {candidates} layers it names")
        tags = ["pruned", "layer-pruning", "bk-sdm"]
    else:
        share = "" if res.ratio is None else f", at a ratio of {res.ratio} of the {res.by}" + (
            "" if max_params is None else f" (at most {max_params} of the params)")
        what = (f"Layer pruning (one-shot, LAPTOP-Diff's scoring and selection): {len(res.removed)} of {candidates} "
                f"layers removed by the `{res.criterion}` criterion{share}")
        tags = ["pruned", "layer-pruning", "laptop-diff"]
    done = [what + ("; their weights are gone from the folder" if weights else " (a config without weights)")
            + "; not retrained at this step.",
            "Removed: " + (", ".join(f"`{n}`" for n in res.removed) or "nothing")]
    if stocked:
        done.append("Written as the stock diffusers class: its config lists fewer blocks, so diffusers alone loads "
                    "it.")
    params = (res.params if history is None or history.params is None else history.params, params_after)
    macs = None
    if res.macs:
        macs = (res.macs, res.macs - res.macs_removed)
        if history is not None and history.macs is not None and \
                (macs_label or "MACs per denoiser call (batch 1)") == history.macs_label:
            macs = (history.macs[0], macs[1])  # counted alike: the share is of the original's
    notes = [] if not weights else [
        f"Retraining recovers most of the quality the removal costs: `diffslim distill "
        f"{model if history is None else history.base} {out / 'model'} --data DATA --out DIR` distils the original "
        "into it (normalized feature distillation)."]
    base = model if history is None else history.base
    return dict(base=base, title=f"{title_name(base)}, layer-pruned ({1 - params[1] / params[0]:.0%} of the "
                                 "denoiser's parameters removed)",
                done=done, tables=[size_table(params, macs, macs_label=macs_label)], notes=notes, tags=tags,
                history=history)


def trained_card(teacher: str, teacher_model, student_model, cfg, res, what: str, data: str,
                 started_from: Optional[Path] = None) -> dict:
    """The card of a trained student (``distill``, ``finetune``) and of the pipeline written with it: ``cfg`` the
    :class:`~diffslim.train.distill.DistillConfig`, ``res`` its result (or None), ``what`` the first words of the
    line that says what was done; ``started_from``: the student's folder before training (its history first)."""
    history = None if started_from is None else earlier(started_from)
    feat = ("normalized (LAPTOP-Diff: each block's term over the teacher feature's norm)" if cfg.normalized
            else "plain (BK-SDM's sum)")
    on = "the zoo model's own data" if data == "zoo" else f"`{data}`"
    from diffslim.launch import world_size

    n = world_size()
    batch = f"batch {cfg.batch_size}" + ("" if n == 1 else f" per process x {n} processes (accelerate launch)")
    line = (f"{what}: {cfg.steps} steps, {batch}, lr {cfg.lr:g}, on {on}; losses: task "
            f"x{cfg.lambda_task:g}, output x{cfg.lambda_out:g}, {feat} features x{cfg.lambda_feat:g}"
            + ("" if cfg.ema_decay is None else f"; EMA weights (decay {cfg.ema_decay:g})"))
    if res is not None and res.final_losses:
        line += "; final losses " + ", ".join(f"{k} {v:.4g}" for k, v in res.final_losses.items())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    base = teacher if history is None else history.base
    original = count(teacher_model) if history is None or history.params is None else history.params
    # training changes no structure: the student's MACs are those its card counted
    macs = None if history is None else history.macs
    return dict(base=base, title=f"{title_name(base)}, pruned and distilled", done=[line + "."],
                tables=[size_table((original, count(student_model)), macs,
                                   macs_label=None if history is None else history.macs_label)],
                tags=["pruned", "distillation"], history=history)


def workflow_card(out: Path, model: str, res, stages: str, n: int, floor: Optional[str], check: str) -> dict:
    """The card of ``diffslim workflow``'s ``OUT/`` (``res``: its :class:`~diffslim.workflow.WorkflowResult`):
    every row, and ``diffslim.from_recipe`` on ``OUT/recipe.json`` to load the result; ``check``: the command that
    evaluates the result again."""
    import math

    def cell(v, form):
        return "" if not isinstance(v, (int, float)) or not math.isfinite(v) else format(v, form)

    history = earlier(Path(model))
    not_metrics = {"stage", "kind", "params", "macs_per_sample", "macs_ratio", "seconds", "speedup", "skipped",
                   "accepted"}
    metrics = [k for k, v in res.rows[0].items() if k not in not_metrics and isinstance(v, (int, float))
               and not isinstance(v, bool)]
    from diffslim.report import is_reference_cell

    rows = [[r["stage"], cell(r.get("params"), ","), cell(r.get("macs_ratio"), ".3f"),
             cell(r.get("speedup"), ".2f") + ("x" if cell(r.get("speedup"), ".2f") else ""),
             *["ref" if is_reference_cell(r, k, "stage") else cell(r.get(k), ".4g") for k in metrics],
             "yes" if r.get("accepted") else "no"] for r in res.rows]
    done = [f"Guided workflow: the stages `{stages}` stacked in order, each judged against the outputs of "
            f"`{model}` on {n} inputs" + (f", down to the floor {floor}" if floor else "") + ".",
            "Kept: " + (", ".join(f"`{k}`" for k in res.stages_kept) or "none")]
    if res.stopped:
        done.append(res.stopped)
    model_dir = Path(res.recipe.model)
    if not model_dir.is_absolute():
        model_dir = out / model_dir
    last = next((r for r in reversed(res.rows) if r.get("accepted")), res.rows[0])
    share = cell(last.get("macs_ratio"), ".0%")
    # the report's figures beside the card (report.add_workflow_section writes them): samples, then the trade-off
    images = [(caption, found.name) for pattern, caption in (
        ("workflow_grid_*_all.png", "the same inputs and seeds through every stage, the original first"),
        ("workflow_[!g]*.png", "quality against the MACs of a sampling run, stage by stage"))
        for found in sorted(out.glob(pattern))[:1]]
    kinds = {r.get("kind") for r in res.rows[1:] if r.get("accepted")}
    tags = (["pruned"] if "model" in kinds else []) + ["workflow"]
    base = model if history is None else history.base
    inside = model_dir.exists() and model_dir.resolve().is_relative_to(out.resolve())  # not a zoo name or Hub id
    return dict(images=images, base=base, recipe="recipe.json", task_of=model_dir if model_dir.is_dir() else None,
                recipe_model=None if inside else res.recipe.model,
                title=f"{title_name(base)}, slimmed by diffslim's workflow" + (f" ({share} of the MACs)" if share
                                                                               else ""),
                done=done, tables=[("Every stage against the original (the last kept row is this model)",
                                    ["stage", "params", "MACs of a sampling run (share)", "speedup", *metrics, "kept"],
                                    rows)],
                notes=[f"`{check}` checks it again, on other inputs or more of them; `{out / 'index.html'}` is the "
                       "workflow's report."], tags=tags, history=history)


def stage_card(before, after, label: str, original: str) -> dict:
    """The card of a workflow's model stage (``OUT/stages/.../pipeline``): ``before``/``after`` the
    :class:`~diffslim.models.load.LoadedModel` the stage started from and its result's pipeline, ``original`` the
    model the workflow started from (a later ``diffslim stock`` or ``distill`` of the stage names it)."""
    from diffslim.models.load import denoiser_of

    source = Path(before.source)
    history = earlier(source) if source.is_dir() else None
    den = denoiser_of(after)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    params = (count(before.denoiser) if history is None or history.params is None else history.params, count(den))
    base = original if history is None else history.base
    done = [f"Workflow stage `{label}` (diffslim workflow; its folder's workflow.json has every stage's quality)."]
    config = lambda m: dict(getattr(m, "config", {}) or {})  # noqa: E731
    gone = [n for n in config(den).get("removed_layers") or [] if n not in (config(before.denoiser).get(
        "removed_layers") or [])]
    if gone:
        done.append("Removed: " + ", ".join(f"`{n}`" for n in gone))
    depth = config(den).get("depth_skip")
    if depth is not None and depth != config(before.denoiser).get("depth_skip"):
        done.append(f"Depth-skip pruning (Kim and Cho, 2024) to depth {depth}")
    return dict(base=base, title=f"{title_name(base)}, workflow stage {label}", done=done,
                tables=[size_table(params)], tags=["pruned", "workflow"], history=history)
