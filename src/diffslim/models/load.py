"""Loading MODEL arguments: pipeline folders, model folders, config-only folders and ``zoo:NAME``.

Every path a user gives goes through :func:`load`, which turns mistakes into :class:`ModelLoadError`
(one line: what is wrong and what is accepted). Only safetensors weights are read; pickles never are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from diffslim.errors import UserError
from diffslim.launch import world_size

# Denoiser classes the anatomy understands (the families of the issues).
SUPPORTED_DENOISERS = (
    "UNet2DConditionModel",
    "UNet2DModel",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "SanaTransformer2DModel",
    "CogView4Transformer2DModel",
    "AuraFlowTransformer2DModel",
    "HunyuanDiT2DModel",
    "Lumina2Transformer2DModel",
    "ZImageTransformer2DModel",
    "QwenImageTransformer2DModel",
    "ChromaTransformer2DModel",
    "Flux2Transformer2DModel",
    # our own exports: diffusers models with a depth-skip config
    "DepthSkipUNet2DConditionModel",
    "DepthSkipUNet2DModel",
    # layer-pruned exports (diffslim.methods.layer_prune): a ``removed_layers`` config
    "LayerPrunedUNet2DConditionModel",
    "LayerPrunedUNet2DModel",
    "LayerPrunedDiTTransformer2DModel",
    "LayerPrunedPixArtTransformer2DModel",
    "LayerPrunedSD3Transformer2DModel",
    "LayerPrunedFluxTransformer2DModel",
    "LayerPrunedSanaTransformer2DModel",
    "LayerPrunedCogView4Transformer2DModel",
    "LayerPrunedAuraFlowTransformer2DModel",
    "LayerPrunedHunyuanDiT2DModel",
    "LayerPrunedLumina2Transformer2DModel",
    "LayerPrunedZImageTransformer2DModel",
    "LayerPrunedQwenImageTransformer2DModel",
    "LayerPrunedChromaTransformer2DModel",
    "LayerPrunedFlux2Transformer2DModel",
    # both (diffslim.combined): a ``depth_skip`` and a ``removed_layers`` config
    "DepthSkipLayerPrunedUNet2DConditionModel",
    "DepthSkipLayerPrunedUNet2DModel",
)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
ACCEPTED = (
    "MODEL is a diffusers pipeline folder (model_index.json), a diffusers model folder "
    "(config.json + *.safetensors), a folder with only a model config.json, zoo:NAME, or a Hub id "
    "(OWNER/NAME[/SUBFOLDER]) in the local Hugging Face cache"
)


class ModelLoadError(UserError):
    """A MODEL argument that cannot be loaded; the message is one line meant for a person."""


@dataclass
class LoadedModel:
    """What :func:`load` returns.

    ``pipe`` is the diffusers pipeline (None for a lone model or config); ``denoiser`` the U-Net or
    transformer; ``has_weights`` False for config-only models built on the meta device;
    ``zoo`` the zoo entry for ``zoo:NAME``; ``vae_scale_factor`` the image-pixels-per-denoiser-pixel
    ratio (1 for pixel-space models, 8 for SD-family latents).
    """

    source: str
    kind: str  # "pipeline" | "model" | "config"
    denoiser: torch.nn.Module = field(repr=False)  # a whole U-Net's repr fills a notebook
    pipe: Optional[object] = field(default=None, repr=False)
    has_weights: bool = True
    zoo: Optional[object] = field(default=None, repr=False)
    vae_scale_factor: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def family_class(self) -> str:
        return type(self.denoiser).__name__


def denoiser_of(pipe) -> torch.nn.Module:
    """The denoiser of a pipeline: ``unet``, ``transformer`` or the zoo's ``denoiser`` component."""
    for name in ("denoiser", "unet", "transformer"):
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise ModelLoadError(f"pipeline {type(pipe).__name__} has no unet/transformer denoiser; {ACCEPTED}")


def _check_no_pickles(folder: Path) -> None:
    safes = list(folder.rglob("*.safetensors"))
    pickles = [p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles and not safes:
        raise ModelLoadError(
            f"{pickles[0]} is a pickle checkpoint, which diffslim never unpickles; convert it to "
            "safetensors (diffusers' save_pretrained(..., safe_serialization=True))"
        )


# a weights file saved with a variant: diffusion_pytorch_model.fp16.safetensors, and sharded
# diffusion_pytorch_model.fp16-00001-of-00002.safetensors (diffusers' names; older ones put the shard first)
_VARIANT = re.compile(
    r"^(?:diffusion_pytorch_model|model)(?:-\d+-of-\d+)?\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors$")
_PLAIN = re.compile(r"^(?:diffusion_pytorch_model|model)(?:-\d+-of-\d+)?\.safetensors$")


def weights_variant(folder: Path) -> Optional[str]:
    """The variant (``fp16``, ``bf16``, ...) of the weights in ``folder`` (a pipeline's components or one model)
    where they were saved only as one, as ``save_pretrained(..., variant=...)`` and ``from_pretrained(...,
    variant="fp16")`` downloads leave SDXL and others; None where plain weights are there. A folder with plain
    weights in one component and a variant in another loads with the variant (diffusers falls back to the plain
    files of a component without it)."""
    names = [p.name for p in folder.rglob("*.safetensors")]
    variants = sorted({m.group(1) for n in names if (m := _VARIANT.match(n))})
    if not variants or (names and all(_PLAIN.match(n) for n in names)):
        return None
    if len(variants) > 1:
        raise ModelLoadError(f"{folder} holds weights of several variants ({', '.join(variants)}) and diffslim "
                             "cannot tell which to load: keep one (diffusers' save_pretrained(..., variant=V))")
    return variants[0]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ModelLoadError(f"{path} holds {kind}, not a JSON object: a diffusers config is "
                             '{"_class_name": ..., ...}')
    return data


def _denoiser_class(name: str, where: Path):
    if name not in SUPPORTED_DENOISERS:
        raise ModelLoadError(
            f"{where}: model class {name!r} is not supported; supported: {', '.join(SUPPORTED_DENOISERS)}"
        )
    from diffslim.models.derived import exported_class

    cls = exported_class(name)  # a pruned export: the method that made it registered its class (import diffslim)
    if cls is not None:
        return cls
    import diffusers

    return getattr(diffusers, name)


def _zoo_pipeline_class(name: str):
    from diffslim.zoo import pipelines

    return getattr(pipelines, name, None)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``"float32"``, ``"bfloat16"``, ``"float16"`` (or ``fp32``, ``bf16``, ``fp16``) -> the torch dtype."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; accepted: float32, bfloat16, float16 (or fp32, bf16, fp16)")
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    """The device to load and sample on: ``"auto"`` is this process's GPU when torch sees one (under
    ``accelerate launch`` each process its own), else Apple's ``mps`` when there is one, else the CPU;
    ``"cpu"``, ``"cuda"`` (under a launch, this process's GPU), ``"cuda:N"`` and ``"mps"`` name one. A device this machine does not have is refused.
    """
    accepted = "auto, cpu" + (", cuda, cuda:N" if torch.cuda.is_available() else "") + (
        ", mps" if torch.backends.mps.is_available() else "")
    if name == "auto":
        if torch.cuda.is_available():
            from accelerate import PartialState

            return PartialState().device
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; accepted here: {accepted}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else \
            f"no CUDA device (torch {torch.__version__})"
        raise UserError(f"device {name!r}: this machine has {have}; accepted here: {accepted}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r}: this machine has no mps device; accepted here: {accepted}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r} is not supported; accepted here: {accepted}")
    if dev.type == "cuda" and world_size() > 1:
        if dev.index is not None:  # every process would load onto that one GPU, and the others stay idle
            raise UserError(f"device {name!r} under accelerate launch ({world_size()} processes) puts every process on "
                            "that one GPU; give cuda or auto (each process its own GPU), or choose the GPUs with "
                            "accelerate launch --gpu_ids or CUDA_VISIBLE_DEVICES")
        from accelerate import PartialState

        return PartialState().device  # under `accelerate launch`, "cuda" is this process's GPU, not the first one
    return dev


def load_pipeline_folder(folder: Path, dtype=torch.float32, device="cpu"):
    """Load a pipeline folder (zoo pipelines included) from safetensors weights only."""
    index = _read_json(folder / "model_index.json")
    cls_name = index.get("_class_name", "")
    _check_no_pickles(folder)
    # the components model_index.json names, each a subfolder (optional ones are null there)
    missing = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
               and v[0] is not None and v[1] is not None and not (folder / k).is_dir()]
    if missing:
        raise ModelLoadError(f"cannot load pipeline folder {folder}: its model_index.json names components with no "
                             f"subfolder here: {', '.join(f'{k}/' for k in missing)} (a whole pipeline folder has "
                             "one per component, as save_pretrained writes it)")
    zoo_cls = _zoo_pipeline_class(cls_name)
    try:
        if zoo_cls is not None:
            from diffslim.zoo.pipelines import load_zoo_pipeline

            pipe = load_zoo_pipeline(zoo_cls, folder, torch_dtype=dtype)
        else:
            from diffusers import DiffusionPipeline

            variant = weights_variant(folder)
            pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, use_safetensors=True,
                                                     **({"variant": variant} if variant else {}))
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers raises many types for broken folders; say which file and why
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelLoadError(f"cannot load pipeline folder {folder}: {msg}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def split_hub_id(model: str) -> Optional[tuple[str, str]]:
    """``(OWNER/NAME, SUBFOLDER)`` of a MODEL written as a Hub id (``OWNER/NAME`` or ``OWNER/NAME/SUB/FOLDER``, no
    ``.`` or ``..`` part, no leading ``./`` or ``/``); None for anything else. Says nothing of whether it exists."""
    parts = model.rstrip("/").split("/")
    if len(parts) < 2 or model.startswith(("/", "~")) or \
            not all(re.fullmatch(r"[\w.-]+", p) and p not in (".", "..") for p in parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def hub_cache_folder(repo_id: str, subfolder: str = "") -> Optional[Path]:
    """The local copy of Hub repository ``repo_id`` (its ``subfolder``, e.g. ``unet``) in the Hugging Face cache
    (``HF_HUB_CACHE``, where ``from_pretrained`` and ``hf download`` keep what they fetched), at the revision
    ``main`` points to; None where the cache has none. Never goes to the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True)) / subfolder
    except Exception:  # not cached (LocalEntryNotFoundError), or an id the Hub would refuse: not a model we have
        return None
    return folder if folder.is_dir() else None


def cached_hub_folder(model: str) -> Optional[Path]:
    """Where the local Hugging Face cache holds MODEL, a Hub id (``OWNER/NAME[/SUBFOLDER]``) that is no local path;
    None for anything else (a folder here, ``zoo:NAME``, an id the cache lacks)."""
    if model.startswith("zoo:") or Path(model).expanduser().exists():
        return None
    hub = split_hub_id(model)
    return hub_cache_folder(*hub) if hub else None


def load(model: str, dtype=torch.float32, device="cpu", random_weights: bool = False) -> LoadedModel:
    """Load ``model`` (a path, ``zoo:NAME``, or a Hub id ``OWNER/NAME[/SUBFOLDER]`` that the local Hugging Face
    cache holds, see :func:`hub_cache_folder`) into a :class:`LoadedModel`.

    ``dtype``: a torch dtype or its name (``"bf16"``, see :func:`resolve_dtype`); ``device``: a torch device
    or its name, ``"auto"`` included (see :func:`resolve_device`). ``random_weights``: build a config-only
    folder's model with the class's own random initialisation on ``device`` instead of on the meta device, so
    that it can run (for timing: speed and memory do not depend on the values); ``has_weights`` stays False and
    ``extra["random_weights"]`` is True. Refused for anything but a config-only folder.

    Raises :class:`ModelLoadError` for a missing folder, an unsupported class, pickle weights or a
    corrupt file.
    """
    model = str(model)
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    device = resolve_device(device) if isinstance(device, str) else device
    if random_weights:
        path = Path(model).expanduser()
        if model.startswith("zoo:") or not (path / "config.json").exists() or (path / "model_index.json").exists() \
                or any(path.glob("*.safetensors")):
            raise ModelLoadError(f"random weights are for a config-only model folder (a config.json and no "
                                 f"weights); {model} is not one: load it as it is")
    if model.startswith("zoo:"):
        from diffslim.zoo.registry import ZOO

        name = model[4:]
        if name not in ZOO:
            raise ModelLoadError(f"no zoo model {name!r}; the zoo has: {', '.join(sorted(ZOO))}")
        entry = ZOO[name]
        if not (entry.folder / "model_index.json").exists():
            raise ModelLoadError(
                f"zoo model {name!r} has no weights at {entry.folder}; train them with "
                f"`diffslim zoo-train {name}`"
            )
        pipe = load_pipeline_folder(entry.folder, dtype=dtype, device=device)
        return LoadedModel(model, "pipeline", denoiser_of(pipe), pipe=pipe, zoo=entry, vae_scale_factor=1)

    if not str(model).strip():
        raise ModelLoadError(f"MODEL is empty; {ACCEPTED}")
    path = Path(model).expanduser()
    if not path.exists():
        hub = split_hub_id(model)
        if hub is not None:
            repo, sub = hub
            cached = hub_cache_folder(repo, sub)
            if cached is not None:  # what diffusers' from_pretrained downloaded before: read it where it lies
                found = load(str(cached), dtype=dtype, device=device, random_weights=random_weights)
                found.source = model  # recipes, cards and cache keys name the Hub id (sample.model_fingerprint)
                return found
            if sub and hub_cache_folder(repo) is not None:
                raise ModelLoadError(f"{repo} is in the local Hugging Face cache, but its copy has no subfolder {sub} "
                                     "(from_pretrained fetches only the components a pipeline loads)")
            raise ModelLoadError(f"no such folder: {model}, which looks like a Hugging Face Hub id, and the local "
                                 "Hugging Face cache has no copy of it; diffslim does not download: fetch it first "
                                 f"(DiffusionPipeline.from_pretrained(\"{repo}\") caches it, or hf download "
                                 f"{repo} --local-dir DIR and give DIR)")
        raise ModelLoadError(f"no such file or folder: {model}; {ACCEPTED}")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{model} is a pickle checkpoint, which diffslim never unpickles; {ACCEPTED}")
        if path.suffix.lower() == ".safetensors":  # a single-file checkpoint, as A1111 and ComfyUI keep them
            raise ModelLoadError(f"{model} is a single-file checkpoint; convert it to a pipeline folder once with "
                                 "diffusers (StableDiffusionPipeline.from_single_file(PATH).save_pretrained(FOLDER), "
                                 "StableDiffusionXLPipeline for SDXL) and give FOLDER; " + ACCEPTED)
        raise ModelLoadError(f"{model} is a single file; {ACCEPTED}")
    if (path / "model_index.json").exists():
        return _pipeline_loaded(model, load_pipeline_folder(path, dtype=dtype, device=device))
    if not (path / "config.json").exists():
        inside = [path / sub for sub in ("pipeline", "model", "student") if (path / sub / "model_index.json").is_file()
                  or (path / sub / "config.json").is_file()]
        if inside:  # what layer-prune, distill and finetune write: the model folders are inside
            raise ModelLoadError(f"{model} is an output folder, not a model: give the model in it, "
                                 + " or ".join(str(f) for f in inside))
        if (path / "recipe.json").is_file():  # a workflow's folder: its model is the stage its recipe names
            named = _read_json(path / "recipe.json").get("model")
            # as a recipe reads it: a relative path inside the recipe's folder, else as it is (recipe.load_recipe)
            where = path / named if isinstance(named, str) and (path / named).exists() else named
            raise ModelLoadError(f"{model} is a recipe's folder (a workflow's output), not a model: give the model its "
                                 f"recipe.json names, {where} (or diffslim.from_recipe(\"{path / 'recipe.json'}\") "
                                 "in Python)")
        raise ModelLoadError(f"{model} has neither model_index.json nor config.json; {ACCEPTED}")
    config = _read_json(path / "config.json")
    cls = _denoiser_class(config.get("_class_name", "<no _class_name>"), path)
    _check_no_pickles(path)
    has_weights = any(path.glob("*.safetensors"))
    latent = _looks_latent(config)
    if has_weights:
        try:
            variant = weights_variant(path)
            denoiser = cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                           **({"variant": variant} if variant else {})).to(device)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ModelLoadError(f"cannot load weights of {model}: {msg}") from None
        return LoadedModel(model, "model", denoiser.eval(), vae_scale_factor=8 if latent else 1)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            denoiser = cls.from_config(config)
    except Exception as e:
        raise ModelLoadError(f"{path / 'config.json'} is not a valid {cls.__name__} config: {e}") from None
    if random_weights:
        with torch.device(device):
            denoiser = cls.from_config(config)
        if dtype != torch.float32:
            denoiser = denoiser.to(dtype)
    return LoadedModel(model, "config", denoiser.eval(), has_weights=False, vae_scale_factor=8 if latent else 1,
                       extra={"random_weights": True} if random_weights else {})


def _pipeline_loaded(source: str, pipe) -> LoadedModel:
    vae = getattr(pipe, "vae", None)
    scale = getattr(pipe, "vae_scale_factor", None) or (
        2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
    return LoadedModel(source, "pipeline", denoiser_of(pipe), pipe=pipe, vae_scale_factor=int(scale))


def as_loaded(model, **load_kwargs) -> LoadedModel:
    """``model`` as a :class:`LoadedModel`: a path or ``zoo:NAME`` loaded by :func:`load` (with ``load_kwargs``), a
    LoadedModel as it is, and a live pipeline or denoiser (``torch.nn.Module``) wrapped where it lies, so that the
    functions that take a MODEL also take what a user already holds (a pipeline after ``diffslim.apply``)."""
    if isinstance(model, (str, Path)):
        return load(str(model), **load_kwargs)
    given = [k for k, v in load_kwargs.items() if v not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)} apply to a MODEL that is loaded from a path; a live "
                        f"{type(model).__name__} is used where it lies (move it first, e.g. pipe.to('cuda'))")
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        meta = any(p.is_meta for p in model.parameters())
        config = dict(getattr(model, "config", {}) or {})
        return LoadedModel(type(model).__name__, "model", model, has_weights=not meta,
                           vae_scale_factor=8 if _looks_latent(config) else 1)
    if hasattr(model, "scheduler") and hasattr(model, "components"):
        from diffslim.zoo.registry import ZOO

        loaded = _pipeline_loaded(getattr(model, "name_or_path", None) or type(model).__name__, model)
        folder = Path(str(getattr(model, "name_or_path", "") or "")).expanduser()
        loaded.zoo = next((e for e in ZOO.values() if folder.name and e.folder.resolve() == folder.resolve()), None)
        return loaded
    raise UserError(f"MODEL is a path, zoo:NAME, a diffusers pipeline or a denoiser module; got {type(model).__name__}")


def _looks_latent(config: dict) -> bool:
    """Whether a lone denoiser config works on VAE latents (SD-family channel counts) or on pixels."""
    return int(config.get("in_channels", 3)) in (4, 8, 9, 16, 64) or "caption_channels" in config
