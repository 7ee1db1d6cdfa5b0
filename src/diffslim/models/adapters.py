"""IP-Adapters on derived (pruned) models.

An IP-Adapter file numbers its attention weights by the position of each attention processor in the
original model: diffusers' loader (``_convert_ip_adapter_attn_to_diffusers``) gives the ``i``-th processor of
``model.attn_processors`` the weights ``"{i}.to_k_ip.weight"``, ``"{i}.to_v_ip.weight"`` (on U-Nets only the
cross-attention processors read them, at the odd positions, and IP-Adapter FaceID's LoRA weights
``"{i}.to_q_lora..."`` sit at every position; Flux reads its double-stream blocks' positions, SD3 every one).
A pruned model has fewer processors, so on it the same number names another layer: diffusers then fails on a
shape (``to_k_ip.0.weight expected shape [64, 32], but got [32, 32]``) or, where neighbouring layers have one
width, loads a layer's weights into the next one without a word.

:func:`renumber_ip_adapter` maps an IP-Adapter of the original model to the numbering of a pruned one (the
removed layers' weights are dropped), and the derived classes (``LayerPruned*``, ``DepthSkip*``, stacked) apply
it in their ``_load_ip_adapter_weights`` / ``_load_ip_adapter_loras``, so ``pipe.load_ip_adapter(...)`` loads
the original IP-Adapter into a pruned pipeline as it is. :func:`carry_attention` hands an IP-Adapter that was
loaded before pruning (and any other attention processor set on the source) to the pruned copy.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from diffslim.errors import UserError

_IP_KEY = re.compile(r"^(?P<index>\d+)\.(?P<rest>.+)$")
_PROJECTIONS = ("encoder_hid_proj", "text_encoder_hid_proj", "image_proj")  # where loaders put image projections


def safetensors_file(path: Path, what: str, hint: str) -> Path:
    """``path`` (a ``what``: "LoRA", "IP-Adapter"), checked to be a safetensors file; pickles are refused with
    ``hint`` (how to get a safetensors file)."""
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{what} {path}: only .safetensors files are read (pickles are refused); {hint}")
    return path


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A safetensors file's tensors and header metadata; a damaged or foreign file gets safetensors' own reason."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 (whatever safetensors raises, the user gets its reason)
        raise UserError(f"{what} {path} cannot be read as safetensors: {e}") from None


def diffusers_base(cls: type) -> type:
    """The diffusers class ``cls`` derives from (itself for a stock diffusers class)."""
    for c in cls.__mro__:
        if c.__module__.startswith("diffusers."):
            return c
    return cls


def original_processor_names(model: nn.Module) -> list[str]:
    """The names of the attention processors of the model ``model`` was derived from, in diffusers' order
    (``attn_processors``): the model built from the base class's part of ``model``'s config, on the meta device."""
    base = diffusers_base(type(model))
    if base is type(model):
        return list(model.attn_processors)
    params = inspect.signature(base.__init__).parameters
    config = {k: v for k, v in dict(model.config).items() if k in params}
    with torch.device("meta"):
        original = base.from_config(config)
    return list(original.attn_processors)


def _check_unet_numbering(names: Sequence[str], what: str) -> None:
    """diffusers numbers a U-Net's cross-attention processors 1, 3, 5, ... and FaceID's LoRAs by position; the two
    agree only where self- and cross-attention alternate, which renumbering by position relies on."""
    cross = [n for n in names if not n.endswith("attn1.processor")]
    if any(names.index(n) != 2 * j + 1 for j, n in enumerate(cross)):
        raise UserError(f"the {what} model's attention layers do not alternate self- and cross-attention, so its "
                        "IP-Adapter numbering is not diffusers' usual one: renumbering it is not supported")


def ip_adapter_parts(state_dict: Mapping) -> tuple[dict, dict, dict]:
    """An IP-Adapter state dict, nested (``{"image_proj": {...}, "ip_adapter": {...}}``, what diffusers' loader
    passes on) or flat (``"image_proj.proj.weight"``, a safetensors file's keys), as (image_proj, ip_adapter,
    anything else)."""
    if "ip_adapter" in state_dict and isinstance(state_dict["ip_adapter"], Mapping):
        rest = {k: v for k, v in state_dict.items() if k not in ("image_proj", "ip_adapter")}
        return dict(state_dict.get("image_proj", {})), dict(state_dict["ip_adapter"]), rest
    image_proj, ip, rest = {}, {}, {}
    for k, v in state_dict.items():
        if k.startswith("image_proj."):
            image_proj[k[len("image_proj."):]] = v
        elif k.startswith("ip_adapter."):
            ip[k[len("ip_adapter."):]] = v
        else:
            rest[k] = v
    if not ip:
        raise UserError("this is not an IP-Adapter: it has no ip_adapter.* weights (an IP-Adapter file holds "
                        "image_proj.* and ip_adapter.<n>.to_k_ip.weight keys)")
    return image_proj, ip, rest


def renumber_ip_adapter(ip_adapter: Mapping[str, torch.Tensor], original: Sequence[str], target: Sequence[str],
                        rename: Optional[Mapping[str, str]] = None, unet: bool = False
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ``ip_adapter`` weights of an IP-Adapter of the original model (keys ``"{i}.{rest}"``, ``i`` the position of
    a processor in ``original``) numbered for the model whose processors are ``target``, and the original names of
    the processors whose weights were dropped (their layers are removed). ``rename``: original processor name ->
    its name in the target for every kept processor (a stock export's renumbered blocks; the others are dropped);
    by default the names are the same. ``unet``: check diffusers' U-Net numbering (self- and cross-attention
    alternate) on both lists.
    """
    if unet:
        _check_unet_numbering(list(original), "original")
        _check_unet_numbering(list(target), "pruned")
    position = {name: i for i, name in enumerate(target)}
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in ip_adapter.items():
        m = _IP_KEY.match(key)
        if m is None:
            raise UserError(f"ip_adapter.{key} is not a key of an IP-Adapter (ip_adapter.<n>.to_k_ip.weight and "
                            "the like)")
        i = int(m["index"])
        if i >= len(original):
            raise UserError(f"the IP-Adapter has weights for attention processor {i}, but the original model has "
                            f"{len(original)}: an IP-Adapter of another model")
        name = original[i] if rename is None else rename.get(original[i])
        if name in position:
            out[f"{position[name]}.{m['rest']}"] = value
        elif original[i] not in dropped:
            dropped.append(original[i])
    return out, dropped


def renumbered_for(model: nn.Module, state_dicts):
    """``state_dicts`` (one nested IP-Adapter state dict or a list of them, as diffusers' loaders take them)
    renumbered from the original model's processors to ``model``'s (a derived model)."""
    original = original_processor_names(model)
    target = list(model.attn_processors)
    unet = "UNet" in diffusers_base(type(model)).__name__

    def one(sd):
        image_proj, ip, rest = ip_adapter_parts(sd)
        ip, _ = renumber_ip_adapter(ip, original, target, unet=unet)
        return {**rest, "image_proj": image_proj, "ip_adapter": ip}

    return [one(sd) for sd in state_dicts] if isinstance(state_dicts, (list, tuple)) else one(state_dicts)


def ip_adapter_methods(base: type) -> dict:
    """The IP-Adapter loading methods a derived subclass of ``base`` overrides (those ``base`` has): they renumber
    the IP-Adapter to the derived model's processors, then run the diffusers base class's own loader."""
    methods = {}
    if hasattr(base, "_load_ip_adapter_weights"):
        def _load_ip_adapter_weights(self, state_dicts, *args, **kwargs):
            root = diffusers_base(type(self))
            return root._load_ip_adapter_weights(self, renumbered_for(self, state_dicts), *args, **kwargs)
        methods["_load_ip_adapter_weights"] = _load_ip_adapter_weights
    if hasattr(base, "_load_ip_adapter_loras"):
        def _load_ip_adapter_loras(self, state_dicts):
            root = diffusers_base(type(self))
            return root._load_ip_adapter_loras(self, renumbered_for(self, state_dicts))
        methods["_load_ip_adapter_loras"] = _load_ip_adapter_loras
    return methods


def ip_adapter_loaded(model: nn.Module) -> bool:
    """Whether an IP-Adapter is loaded into ``model`` (its image projection, or processors with IP weights)."""
    if any(isinstance(getattr(model, a, None), nn.Module) and type(getattr(model, a)).__name__.startswith(
            ("MultiIPAdapter", "IPAdapter")) for a in _PROJECTIONS):
        return True
    if getattr(getattr(model, "config", None), "encoder_hid_dim_type", None) == "ip_image_proj":
        return True
    procs = _processors(model)
    return any(hasattr(p, "to_k_ip") for p in procs.values())


def _processors(model: nn.Module) -> dict:
    try:
        return dict(model.attn_processors)
    except (AttributeError, TypeError):  # a denoiser without diffusers' attention processors
        return {}


_FUSED = ("to_qkv", "to_kv", "to_added_qkv")  # what diffusers' Attention.fuse_projections adds


def _carry_fused_projections(source: nn.Module, target: nn.Module) -> None:
    """The fused projections of ``source``'s attention layers, on ``target``'s same layers (the same modules)."""
    kept = dict(target.named_modules())
    for name, module in source.named_modules():
        if not getattr(module, "fused_projections", False) or type(kept.get(name)) is not type(module):
            continue
        for attr in _FUSED:
            if isinstance(getattr(module, attr, None), nn.Module):
                setattr(kept[name], attr, getattr(module, attr))
        kept[name].fused_projections = True
    original = getattr(source, "original_attn_processors", None)
    if original is not None:  # what unfuse_qkv_projections sets back: the layers the target keeps
        names = set(_processors(target))
        target.original_attn_processors = {n: p for n, p in original.items() if n in names}


def carry_attention(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` (a pruned copy of ``source`` that shares its weights) ``source``'s attention processors for
    the attention layers it keeps, as the same objects (an IP-Adapter's ``to_k_ip``/``to_v_ip`` live there, as do
    custom processors set with ``set_attn_processor``), and ``source``'s loaded image projection (an IP-Adapter's
    ``encoder_hid_proj`` or SD3's ``image_proj``, with the config flag diffusers sets beside it). Projections fused
    by ``fuse_qkv_projections`` (which the fused processors read) are shared too, and ``unfuse_qkv_projections``
    restores the kept layers' processors."""
    procs = _processors(source)
    if not procs:
        return
    _carry_fused_projections(source, target)
    mine = _processors(target)
    if any(procs.get(n) is not p and n in procs for n, p in mine.items()):
        target.set_attn_processor({n: procs.get(n, p) for n, p in mine.items()})
    for attr in _PROJECTIONS:
        src = getattr(source, attr, None)
        if isinstance(src, nn.Module) and getattr(target, attr, None) is None:
            setattr(target, attr, src)
    if getattr(source.config, "encoder_hid_dim_type", None) == "ip_image_proj":
        target.config.encoder_hid_dim_type = "ip_image_proj"  # as diffusers' loader sets it: the attribute only
