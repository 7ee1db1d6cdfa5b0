"""LoRAs on pruned models: a LoRA trained on the original model, adapted to a pruned one.

A LoRA names the modules it changes (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``). On a
pruned model some of them are gone with the layers that held them, and after a stock export
(:func:`diffslim.methods.layer_prune.stock_model`) the kept blocks are renumbered, so the same name can mean
another block. diffusers' ``load_lora_weights`` then warns about every key of a removed layer (a
``LayerPruned`` or depth-skipped model), fails on shapes (a U-Net that lost a level), or, worst, loads a
block's LoRA into the block that now has its number (DiT, PixArt, SD3, Flux with blocks removed: same
shapes, no warning for the kept names, wrong outputs).

:func:`adapt_lora` keeps the LoRA of every module the pruned model still runs, under the name it has there
(the stock model's with ``stock=True``), drops the LoRA of the removed layers and says which, and refuses a
LoRA whose modules the model never had or whose shapes differ (a LoRA for another model). The scale of every
kept module stays what diffusers gives it on the original model: the result carries its LoRA config
(diffusers' ``lora_adapter_metadata``: rank and alpha per module), computed on the whole LoRA. A removed
resnet's kept 1x1 shortcut keeps its LoRA: the pruned model still runs it.

This module sits on the floor above the methods (with ``apply`` and ``combined``): it asks layer pruning for
the removed layers and the stock names, and depth skipping for its stand-ins.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from diffslim.errors import UserError
from diffslim.methods import depth_skip as _depth
from diffslim.methods import layer_prune as _layers
from diffslim.models.adapters import read_safetensors, safetensors_file

# a key of diffusers' (PEFT) LoRA format: ``<module>.lora_A.weight`` and the like
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias"
                  r"|lora_magnitude_vector(?:\.weight)?)$")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry for the LoRA config
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name in a LoRA folder
_CONVERT_HINT = ("give the original pipeline (diffslim lora ... --original FOLDER), whose diffusers loader converts "
                 "Kohya/A1111 and the other formats it knows")


@dataclass
class LoraAdaptation:
    """A LoRA adapted to a pruned denoiser.

    ``state_dict``: its tensors (the same tensors as the input's, not copies), keyed in PEFT format by the
    target model's module names. ``config``: the LoRA config (``LoraConfig`` keyword arguments, diffusers'
    ``lora_adapter_metadata``). ``kept``: the target's names of the modules that keep their LoRA.
    ``dropped``: ``{removed layer: [LoRA modules removed with it]}``. ``renamed``: ``{original name: stock
    name}`` for the kept modules whose name changed (only with ``stock=True``).
    """

    state_dict: dict[str, torch.Tensor]
    config: dict
    kept: list[str]
    dropped: dict[str, list[str]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        """Counts and names for a report (JSON-ready)."""
        return {"kept_modules": len(self.kept), "dropped_modules": sum(len(v) for v in self.dropped.values()),
                "dropped_by_layer": {k: len(v) for k, v in self.dropped.items()},
                "renamed_modules": len(self.renamed)}


def _peft_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` in PEFT key format (diffusers' older ``lora.down``/``lora.up`` keys are converted)."""
    if state_dict and not all(_KEY.match(k) for k in state_dict):
        from diffusers.utils import convert_unet_state_dict_to_peft

        state_dict = convert_unet_state_dict_to_peft(dict(state_dict))
    odd = [k for k in state_dict if not _KEY.match(k)]
    if odd:
        raise UserError(f"{odd[0]} is not a key of a LoRA in diffusers' format (<module>.lora_A.weight, "
                        f"<module>.lora_B.weight): {_CONVERT_HINT}")
    return dict(state_dict)


_COMPONENTS = ("unet", "transformer", "denoiser")


def _denoiser_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state_dict`` without the component name a pipeline LoRA file puts before the denoiser's keys (``unet.``),
    where every key has it and ``model`` has no submodule of that name; a file with other components' keys too
    (text encoders) is refused, naming them."""
    first = {k.split(".", 1)[0] for k in state_dict}
    ours = first & set(_COMPONENTS)
    if not ours or any(hasattr(model, c) for c in ours):
        return state_dict
    if len(first) > 1:
        others = sorted(first - ours)
        raise UserError(f"the LoRA holds the keys of several pipeline components ({', '.join(sorted(first))}): give "
                        f"the denoiser's alone (the keys after '{sorted(ours)[0]}.'), or adapt the whole file with "
                        f"diffslim.lora.adapt_lora_file / `diffslim lora`, which keeps {others[0]}'s keys as they are")
    prefix = ours.pop() + "."
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def lora_config(state_dict: Mapping[str, torch.Tensor], metadata: Optional[Mapping] = None) -> dict:
    """The LoRA config diffusers builds for ``state_dict`` (PEFT keys of one model) on the original model:
    ``metadata`` when the file has it, else ranks read off the ``lora_B`` weights and an alpha equal to each
    module's rank (scale 1, diffusers' convention for a file without alphas)."""
    if metadata:
        return dict(metadata)
    from diffusers.utils import get_peft_kwargs

    ranks = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    if not ranks:
        raise UserError("the LoRA has no lora_B weights: nothing to adapt")
    return get_peft_kwargs(ranks, network_alpha_dict=None, peft_state_dict=dict(state_dict))


def _removed_owner(model: nn.Module, module_name: str, removed: set[str]) -> Optional[str]:
    """The removed layer (or depth-skip stand-in) that held ``module_name``, or None if none did."""
    parts = module_name.split(".")
    current: Optional[nn.Module] = model
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in removed:
            return prefix
        part = parts[i - 1]
        if current is None:
            return None
        current = (current[int(part)] if part.isdigit() and isinstance(current, (nn.ModuleList, nn.Sequential))
                   and int(part) < len(current) else getattr(current, part, None))
        if isinstance(current, nn.Module) and _depth.is_removed(current):
            return prefix
    return None


def _module(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _rename_pattern(key: str, names: Mapping[str, str], dropped: set[str]) -> Optional[str]:
    """A ``rank_pattern``/``alpha_pattern`` key for the target: an exact module name (``^name`` or ``name``) is
    renamed, or None when its module is dropped; any other pattern (a suffix such as ``to_q``) stays."""
    anchored = key.startswith("^")
    name = key[1:] if anchored else key
    if name in dropped:
        return None
    if name in names:
        return ("^" if anchored else "") + names[name]
    return key


def adapt_lora(model: nn.Module, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Mapping] = None,
               stock: bool = False) -> LoraAdaptation:
    """Adapt a LoRA of the original denoiser (``state_dict``: its keys without the pipeline prefix, PEFT or
    diffusers' older format; ``metadata``: its LoRA config, if the file has one) to the pruned ``model``
    (``LayerPruned``, depth-skipped, both, or the unpruned model itself, which keeps every key); with
    ``stock=True`` to ``stock_model(model)``, the stock export of a layer-pruned ``model``.

    Raises ``UserError`` for a LoRA whose modules ``model`` never had (outside its removed layers) or whose
    shapes differ from the model's: a LoRA of another model.
    """
    sd = _peft_keys(_denoiser_keys(model, state_dict))
    config = lora_config(sd, metadata)
    removed = set(_layers.removed_layers_of(model))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _KEY.match(k)
        modules.setdefault(m["module"], {})[m["part"]] = v
    kept: list[str] = []
    dropped: dict[str, list[str]] = {}
    foreign: list[str] = []
    for name, parts in modules.items():
        target = _module(model, name)
        if target is None:
            owner = _removed_owner(model, name, removed)
            if owner is None:
                foreign.append(name)
            else:
                dropped.setdefault(owner, []).append(name)
            continue
        weight = getattr(target, "weight", None)
        a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if (not isinstance(weight, torch.Tensor) or weight.ndim < 2 or a is None or b is None
                or a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else "no weight"
            raise UserError(f"the LoRA's {name} (in {None if a is None else a.shape[1]}, out "
                            f"{None if b is None else b.shape[0]}) does not fit the model's ({shape}): "
                            "a LoRA of another model")
        kept.append(name)
    if foreign:
        raise UserError(f"the LoRA changes {foreign[0]}"
                        + (f" and {len(foreign) - 1} more modules" if len(foreign) > 1 else "")
                        + f" that {type(model).__name__} never had (not inside a removed layer either): "
                        "a LoRA of another model")
    names = {n: n for n in kept}
    renamed: dict[str, str] = {}
    if stock:
        where = _layers.stock_names(model)
        names = {n: where[n] for n in kept}
        renamed = {n: s for n, s in names.items() if n != s}
    out = {f"{names[n]}.{part}": v for n in kept for part, v in modules[n].items()}
    gone = {n for ns in dropped.values() for n in ns}
    config = dict(config)
    config["target_modules"] = sorted(names.values())
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {new: v for k, v in config[key].items()
                           if (new := _rename_pattern(k, names, gone)) is not None}
    return LoraAdaptation(out, config, sorted(names.values()), dropped, renamed)


# ------------------------------------------------------------------------------------------
# Files: diffusers' LoRA safetensors (what save_lora_weights writes)


def lora_file(path: Union[str, Path]) -> Path:
    """The safetensors file of a LoRA: ``path`` itself, or in a folder diffusers' ``pytorch_lora_weights.
    safetensors`` or its only safetensors file. Pickled LoRAs (.bin, .pt, .ckpt) are refused."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHT_NAME).is_file():
            return path / WEIGHT_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise UserError(f"{path} holds {len(found)} safetensors files and no {WEIGHT_NAME}: give the LoRA file")
        return found[0]
    if not path.exists():
        raise UserError(f"LoRA {path}: no such file or folder")
    return safetensors_file(path, "LoRA", "save it with save_lora_weights(..., safe_serialization=True)")


def read_lora(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """A LoRA file's tensors and its ``lora_adapter_metadata`` (the LoRA configs, keys prefixed by component,
    e.g. ``unet.r``), or None when it has none."""
    file = lora_file(path)
    tensors, header = read_safetensors(file, "LoRA")
    raw = header.get(METADATA_KEY)
    if not raw:
        return tensors, None
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{file}: its {METADATA_KEY} header is not a JSON object of LoRA configs (diffusers writes "
                        "one per component, e.g. {\"unet.r\": 4, ...}); remove the entry or save the LoRA again")
    return tensors, meta


# diffusers' old attention-processor naming, which its Kohya conversion still gives the alphas of attention
# projections, for the module PEFT wraps: a U-Net's ``attn1.processor.to_q_lora`` is ``attn1.to_q``, a text
# encoder's ``self_attn.to_q_lora`` is ``self_attn.q_proj``
_PROCESSOR_NAME = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_TEXT_PROCESSOR_NAME = re.compile(r"\.self_attn\.to_(q|k|v|out)_lora$")


def _file_alphas(pipe, file: Path) -> dict[str, dict[str, float]]:
    """The alphas a LoRA file gives its modules, as diffusers' own converter reads them
    (``pipe.lora_state_dict``), by component and PEFT module name; empty for a format without alphas.

    diffusers 0.42 keys the alphas of a Kohya file's attention projections (U-Net and text encoders) in its old
    processor naming, which PEFT then matches to no module: those modules got the file's most common alpha
    instead of their own. Taking
    the alphas from here corrects that (``bench/kohya_alphas.py``)."""
    try:
        read = pipe.lora_state_dict(str(file))
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError):
        return {}
    alphas = read[1] if isinstance(read, tuple) and len(read) > 1 and isinstance(read[1], dict) else None
    found: dict[str, dict[str, float]] = {}
    for key, alpha in (alphas or {}).items():
        component, _, name = key.partition(".")
        name = name.removesuffix(".alpha")
        for tail in (".lora.down.weight", ".lora_linear_layer.down.weight", ".down.weight"):
            name = name.removesuffix(tail)
        name = _PROCESSOR_NAME.sub(lambda m: "." + ("to_out.0" if m[1] == "to_out" else m[1]), name)
        name = _TEXT_PROCESSOR_NAME.sub(lambda m: f".self_attn.{m[1]}_proj", name)
        found.setdefault(component, {})[name] = float(alpha)
    return found


def _loaded_config(module: nn.Module, adapter: str, config, alphas: Optional[Mapping[str, float]] = None) -> dict:
    """The LoRA config of ``adapter`` as it took effect in ``module``: the rank and the scale that PEFT gave each
    wrapped module, written as explicit per-module ``rank_pattern``/``alpha_pattern`` (alpha = scale * rank)
    around the most common ones. Exact whatever patterns the config was built from, including ones PEFT could
    not match and left at the default. ``alphas``: the file's own alpha of a module, which wins over the one
    PEFT gave it (:func:`_file_alphas`)."""
    from collections import Counter

    from peft.tuners.tuners_utils import BaseTunerLayer

    ranks, alphas_in = {}, {}
    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "r", {}):
            ranks[name] = int(layer.r[adapter])
            # transformers 5's CLIP text models lost the ``text_model.`` level that sd-scripts' keys still name
            file_alpha = (alphas or {}).get(name, (alphas or {}).get(f"text_model.{name}"))
            alphas_in[name] = float(layer.scaling[adapter]) * ranks[name] if file_alpha is None else file_alpha
    alphas = alphas_in
    if not ranks:
        return {}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {f"^{n}": v for n, v in ranks.items() if v != r},
            "alpha_pattern": {f"^{n}": v for n, v in alphas.items() if v != alpha},
            "use_dora": bool(config.use_dora), "lora_bias": bool(getattr(config, "lora_bias", False))}


def lora_via_pipeline(pipe, lora: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA in any format diffusers reads (Kohya/A1111 and the other trainers' formats it converts), as diffusers
    loads it into the original ``pipe`` (which keeps it loaded: use a pipeline you discard): its PEFT tensors and
    each component's LoRA config, keys prefixed by component (``unet.``, ``text_encoder.``). The configs carry
    the rank each module got there and the alpha the file gives it (:func:`_loaded_config`,
    :func:`_file_alphas`), so the scales stay exact, also where diffusers' own loading gets them wrong."""
    from peft.utils import get_peft_model_state_dict

    file = lora_file(lora)
    if not callable(getattr(pipe, "load_lora_weights", None)):
        raise UserError(f"{type(pipe).__name__} loads no LoRA (no load_lora_weights): give the original pipeline "
                        "folder the LoRA was trained on")
    name = "diffslim_source"
    try:
        pipe.load_lora_weights(str(file), adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as e:  # diffusers' reason: a format it does not know, other shapes
        raise UserError(f"diffusers could not load {file} into the original {type(pipe).__name__}: {e}") from None
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict = {}
    file_alphas = _file_alphas(pipe, file)
    for component, module in pipe.components.items():
        config = getattr(module, "peft_config", {}).get(name) if isinstance(module, nn.Module) else None
        if config is None:
            continue
        sd = get_peft_model_state_dict(module, adapter_name=name)
        tensors.update({f"{component}.{k}": v.detach().clone() for k, v in sd.items()})
        loaded = _loaded_config(module, name, config, file_alphas.get(component))
        metadata.update({f"{component}.{k}": v for k, v in loaded.items()})
    if not tensors:
        raise UserError(f"diffusers loaded nothing of {file} into {type(pipe).__name__}: a LoRA of another model")
    return tensors, metadata


def adapt_lora_file(model: nn.Module, prefix: Optional[str], lora: Union[str, Path], out: Union[str, Path],
                    stock: bool = False, original=None) -> LoraAdaptation:
    """Adapt the LoRA file ``lora`` to the pruned denoiser ``model`` and write it to ``out`` (a safetensors
    file that ``pipe.load_lora_weights(out)`` or ``model.load_lora_adapter(out, prefix=prefix)`` loads).

    ``prefix``: the denoiser's component name in the pipeline (``unet``, ``transformer``; the zoo's
    ``denoiser``), which prefixes its keys in a pipeline LoRA; None for a LoRA of the model alone. Keys of
    other components (text encoders) are written unchanged, with their metadata. ``original``: the original
    pipeline, to read a LoRA that is not in diffusers' format through diffusers' own loader
    (:func:`lora_via_pipeline`); the file written is then in diffusers' format, with every component's config.
    """
    from safetensors.torch import save_file

    if not callable(getattr(model, "load_lora_adapter", None)):
        raise UserError(f"{type(model).__name__} takes no LoRA in diffusers (its class has no load_lora_adapter): "
                        "LoRAs load into U-Nets, SD3, Flux and the other PEFT-enabled denoisers")
    tensors, metadata = lora_via_pipeline(original, lora) if original is not None else read_lora(lora)
    metadata = dict(metadata or {})
    if prefix is None:  # a lone model: a pipeline LoRA's denoiser keys still carry their component name
        components = {k.split(".", 1)[0] for k in tensors}
        if len(components) == 1 and components <= {"unet", "transformer"}:
            prefix = components.pop()
    if prefix is not None and not any(k.startswith(f"{prefix}.") for k in tensors):
        components = sorted({k.split(".", 1)[0] for k in tensors})
        if set(components) & {"unet", "transformer", "denoiser", "text_encoder", "text_encoder_2"}:
            raise UserError(f"the LoRA has no {prefix}.* keys (it has {', '.join(components)}): nothing to adapt "
                            "for this model's denoiser")
        prefix = None  # a LoRA of the denoiser alone: its keys carry no component prefix
    mine = (lambda k: k.startswith(f"{prefix}.")) if prefix else (lambda k: True)
    cut = len(prefix) + 1 if prefix else 0
    own_meta = {k[cut:]: v for k, v in metadata.items() if mine(k)} or None
    result = adapt_lora(model, {k[cut:]: v for k, v in tensors.items() if mine(k)}, own_meta, stock=stock)
    pre = f"{prefix}." if prefix else ""
    written = {k: v for k, v in tensors.items() if not mine(k)}
    written.update({pre + k: v.contiguous() for k, v in result.state_dict.items()})
    # The config goes in only where the file had one: without it diffusers gives every module scale 1 (alpha =
    # rank), on the adapted LoRA as on the original, and a header with one component's config but not the
    # others' would make diffusers read an empty config for them.
    meta = {k: v for k, v in metadata.items() if not mine(k)}
    if own_meta:
        meta.update({pre + k: v for k, v in result.config.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt"}
    if meta:
        header[METADATA_KEY] = json.dumps(meta, indent=2, sort_keys=True, default=list)
    save_file(written, str(out), metadata=header)
    return result
