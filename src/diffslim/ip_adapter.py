"""IP-Adapters of the original model on the stock export of a pruned one.

A pruned model of diffslim's own classes (``LayerPruned*``, ``DepthSkip*``) loads an IP-Adapter of the original
model as it is (``pipe.load_ip_adapter``): its loader maps the file's numbering, which counts the original
model's attention processors, to the kept ones (:mod:`diffslim.models.adapters`). A stock export
(:func:`diffslim.methods.layer_prune.stock_model`) is a plain diffusers class that numbers its own, fewer,
processors, so the original file loads wrong there: diffusers fails on a shape, or puts a layer's weights into
the next one where both have one width. :func:`adapt_ip_adapter` writes the file for the stock model: the weights
of every kept attention layer under its number there, the removed layers' dropped.

This module sits on the floor above the methods (with ``lora``): it asks layer pruning for the stock structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from diffslim.errors import UserError
from diffslim.methods import layer_prune as _layers
from diffslim.models.adapters import (diffusers_base, ip_adapter_parts, original_processor_names, read_safetensors,
                                      renumber_ip_adapter, safetensors_file)

_PROCESSOR = ".processor"


@dataclass
class IPAdapterAdaptation:
    """An IP-Adapter adapted to a stock export. ``state_dict``: flat keys (``image_proj.*``, ``ip_adapter.<n>.*``,
    as diffusers' safetensors IP-Adapter files have them; the same tensors as the input's). ``kept``: the stock
    model's attention processors that have weights; ``dropped``: the original processors whose weights went with
    their removed layers; ``renumbered``: how many kept processors' numbers changed."""

    state_dict: dict[str, torch.Tensor]
    kept: list[str]
    dropped: list[str] = field(default_factory=list)
    renumbered: int = 0

    def summary(self) -> dict:
        """Counts for a report (JSON-ready)."""
        return {"kept_processors": len(self.kept), "dropped_processors": len(self.dropped),
                "renumbered_processors": self.renumbered}


def adapt_ip_adapter(model: nn.Module, state_dict: Mapping) -> IPAdapterAdaptation:
    """Adapt an IP-Adapter of the original denoiser (``state_dict``: nested ``{"image_proj", "ip_adapter"}`` or a
    safetensors file's flat keys) to the stock export of the layer-pruned ``model`` (``stock_model(model)``).

    Raises ``UserError`` for a file that is not an IP-Adapter, one numbered past the original model's processors,
    and a model that has no stock export (with the reason).
    """
    image_proj, ip, rest = ip_adapter_parts(state_dict)
    original = original_processor_names(model)
    stock, where = _layers.stock_structure(model)
    target = list(stock.attn_processors)
    rename = {n: where[n[: -len(_PROCESSOR)]] + _PROCESSOR for n in original if n[: -len(_PROCESSOR)] in where}
    unet = "UNet" in diffusers_base(type(model)).__name__
    out, dropped = renumber_ip_adapter(ip, original, target, rename, unet=unet)
    if unet:  # (SD3's and Flux's IP-Adapters project image features of their own width into joint attention)
        _check_shapes(stock, target, out)
    position = {name: i for i, name in enumerate(target)}
    moved = sum(1 for i in {int(k.split(".", 1)[0]) for k in ip}
                if original[i] in rename and position.get(rename[original[i]], i) != i)
    flat = {**rest, **{f"image_proj.{k}": v for k, v in image_proj.items()},
            **{f"ip_adapter.{k}": v for k, v in out.items()}}
    kept = sorted({target[int(k.split(".", 1)[0])] for k in out})
    return IPAdapterAdaptation(flat, kept, dropped, moved)


def _check_shapes(model: nn.Module, processors: list, ip: Mapping[str, torch.Tensor]) -> None:
    """Every ``{n}.to_k_ip`` / ``to_v_ip`` weight of ``ip`` (numbered for the U-Net ``model``'s ``processors``)
    belongs to a cross-attention layer and has the shape of its ``to_k``: else the file is another model's, which
    diffusers would refuse only when the written file is loaded."""
    import re

    for key, value in ip.items():
        m = re.match(r"(\d+)\.(to_[kv]_ip)(?:\.\d+)?\.weight$", key)
        if m is None:
            continue
        name = processors[int(m[1])]
        attn = model.get_submodule(name[: -len(_PROCESSOR)])
        if not getattr(attn, "is_cross_attention", True):
            raise UserError(f"the IP-Adapter has {m[2]} weights for {name}, a self-attention layer; IP-Adapters "
                            "add image keys and values to cross-attention only: an IP-Adapter of another model")
        want = tuple(attn.to_k.weight.shape)
        if tuple(value.shape) != want:
            raise UserError(f"the IP-Adapter's {m[2]} weight for {name} is {tuple(value.shape)}, the layer's to_k is "
                            f"{want}: an IP-Adapter of another model")


def ip_adapter_file(path: Union[str, Path]) -> Path:
    """``path``, checked to be a safetensors file (pickled .bin files are refused)."""
    return safetensors_file(Path(path), "IP-Adapter", "diffusers' IP-Adapter repositories ship a .safetensors "
                                                      "beside each .bin")


def read_ip_adapter(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """An IP-Adapter safetensors file's tensors (flat keys). Pickled files (.bin) are refused."""
    path = ip_adapter_file(path)
    return read_safetensors(path, "IP-Adapter")[0]


def write_ip_adapter(result: IPAdapterAdaptation, out: Union[str, Path]) -> Path:
    """Write an adapted IP-Adapter to ``out`` (a safetensors file that ``pipe.load_ip_adapter(folder,
    subfolder="", weight_name=NAME)`` loads into the stock pipeline)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.state_dict.items()}, str(out), metadata={"format": "pt"})
    return out

