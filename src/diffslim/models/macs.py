"""Multiply-accumulate counts (MACs) of one denoiser call, per submodule.

One forward under ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of matrix products,
convolutions and attention (2 FLOPs per multiply-add, so MACs = FLOPs // 2); element-wise work
(norms, activations, softmax, additions) is not counted, as in the MACs papers report. Papers differ
on the attention products (QK^T, AV): DiT's 118.6 G "Gflops" for DiT-XL/2 at 256 px include them
(we count 118.67 G), BK-SDM's 338.7 G for the SD U-Net at 64x64 latents leaves them out (we count
401.6 G, of which 63.0 G attention products); ``macs_by_kind`` gives the split.

The forward works on real weights and on the meta device (a model built under
``torch.device("meta")`` or accelerate's ``init_empty_weights``, whose CPU buffers are moved to
meta for the call): counting needs shapes only.

Attention: on CPU ``F.scaled_dot_product_attention`` dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode (torch 2.13) has no
formula for, so attention would count as zero. We register torch's own SDPA formula for it and for
the other fused SDPA ops it misses (on meta, and for masks the CPU kernel does not take, SDPA runs
its math path, whose two ``bmm`` are counted natively).

``default_inputs`` builds dummy inputs for one call of each supported denoiser family.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffslim.errors import UserError

__all__ = ["count_macs", "macs_by_kind", "default_inputs", "attention_flop_mapping"]


def _fused_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a fused SDPA kernel: QK^T and AV, ``2 * 2 * B * heads * Lq * Lk * head_dim``."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def attention_flop_mapping() -> dict[Any, Any]:
    """``custom_mapping`` for FlopCounterMode: formulas for the fused SDPA ops it does not count.

    Only ops that exist in the installed torch and that torch does not count already are returned.
    """
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_attention_math_for_mps",
    )
    mapping = {}
    for name in names:
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry:
            mapping[op] = _fused_sdpa_flop
    return mapping


def _tracker_aliases(module: nn.Module) -> dict[str, str]:
    """Map every name FlopCounterMode's ModuleTracker may give a submodule to its ``named_modules`` name.

    The tracker names the root ``type(root).__name__`` and each child ``f"{parent}.{attr}"``; a module
    reachable by several paths gets one of them. Every path is listed here, so whichever it picked
    maps to the canonical (first) name.
    """
    canonical = {id(m): name for name, m in module.named_modules()}
    root = type(module).__name__
    aliases = {}
    for path, m in module.named_modules(remove_duplicate=False):
        aliases[f"{root}.{path}" if path else root] = canonical[id(m)]
    return aliases


@contextmanager
def _buffers_like_params(module: nn.Module):
    """Put the buffers on meta for the call when the parameters are there.

    accelerate's ``init_empty_weights`` leaves buffers (DiT's and PixArt's sin-cos ``pos_embed``) on
    the CPU next to meta parameters, and a forward would mix devices. The buffers are swapped for
    meta copies and put back afterwards, so the model is left as it was.
    """
    on_meta = any(p.is_meta for p in module.parameters())
    saved = []
    if on_meta:
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is not None and not buf.is_meta:
                    saved.append((sub, name, buf))
                    sub._buffers[name] = buf.to("meta")
    try:
        yield
    finally:
        for sub, name, buf in saved:
            sub._buffers[name] = buf


def _profile(module: nn.Module, args, kwargs) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_mapping())
    with torch.no_grad(), _buffers_like_params(module), counter:
        module(*args, **kwargs)
    return counter


def count_macs(module: nn.Module, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """MACs of one ``module(*args, **kwargs)`` call, in total and per submodule.

    Runs exactly one forward under ``torch.no_grad`` and FlopCounterMode (attention included, see the
    module docstring). Returns ``(total, per_module)``: ``per_module`` maps each submodule's
    ``named_modules()`` name ("" for ``module`` itself, "down_blocks.0.resnets.1", ...) to the MACs
    spent inside it, children included; submodules that did no counted work are absent. Works with
    meta tensors.
    """
    counter = _profile(module, args, kwargs)
    aliases = _tracker_aliases(module)
    per_module: dict[str, int] = {}
    for key, by_op in counter.get_flop_counts().items():
        name = aliases.get(key)
        if name is None:  # "Global", or a module outside module's tree
            continue
        per_module[name] = per_module.get(name, 0) + sum(by_op.values()) // 2
    return counter.get_total_flops() // 2, per_module


_KIND_OF_OP = {"convolution": "conv", "_convolution": "conv", "conv2d": "conv", "conv1d": "conv",
               "conv3d": "conv", "conv_transpose1d": "conv", "conv_transpose2d": "conv",
               "conv_transpose3d": "conv", "mm": "linear", "addmm": "linear",
               "bmm": "attention", "baddbmm": "attention"}


def macs_by_kind(module: nn.Module, *args, **kwargs) -> dict[str, int]:
    """MACs of one ``module(*args, **kwargs)`` call split by kind of work.

    Keys: "conv" (convolutions), "linear" (``mm``/``addmm``: linear layers), "attention" (the
    QK^T and AV products: fused SDPA ops, and ``bmm``/``baddbmm``, which in diffusers denoisers only
    occur in attention: SDPA's math path on meta, the legacy attention processors), and the aten op
    name for anything else. Papers differ in whether they count attention products: BK-SDM's
    338.7 G for the SD U-Net leaves them out, DiT's 118.6 G includes them.
    """
    counter = _profile(module, args, kwargs)
    out: dict[str, int] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = getattr(op, "__name__", str(op)).split(".")[-1]
        kind = _KIND_OF_OP.get(name, "attention" if "scaled_dot_product" in name or "attention" in name else name)
        out[kind] = out.get(kind, 0) + flops // 2
    return out


# ---------------------------------------------------------------------------------------------
# Dummy inputs

SUPPORTED = ("UNet2DConditionModel", "UNet2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
             "SD3Transformer2DModel", "FluxTransformer2DModel")


def _first_param(denoiser: nn.Module) -> torch.Tensor | None:
    return next(iter(denoiser.parameters()), None)


def _spatial(config, height: int | None, width: int | None, cls: str) -> tuple[int, int]:
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        h0, w0 = size
    else:
        h0 = w0 = size
    h, w = height or h0, width or w0
    if h is None or w is None:
        raise UserError(f"{cls} has no sample_size in its config: pass height and width (latent pixels)")
    return int(h), int(w)


def _single_dim(value, what: str, cls: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserError(f"{cls} has per-block {what} {list(value)}; pass inputs yourself")
        value = value[0]
    return int(value)


def _class_labels(config, batch: int, device, dtype, cls: str) -> torch.Tensor | None:
    """class_labels a U-Net's class embedding expects, or None when it has none."""
    kind = config.get("class_embed_type")
    if kind is None and config.get("num_class_embeds") is not None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if kind is None:
        return None
    if kind == "timestep":
        return torch.zeros(batch, dtype=torch.long, device=device)
    if kind == "identity":
        time_dim = config.get("time_embedding_dim") or config["block_out_channels"][0] * 4
        return torch.zeros(batch, time_dim, dtype=dtype, device=device)
    if kind in ("projection", "simple_projection"):
        return torch.zeros(batch, config["projection_class_embeddings_input_dim"], dtype=dtype, device=device)
    raise UserError(f"{cls}: class_embed_type {kind!r} is not supported by default_inputs")


def default_inputs(
    denoiser: nn.Module,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    device: torch.device | str | None = None,
    context_tokens: int | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """Dummy ``(args, kwargs)`` for one call ``denoiser(*args, **kwargs)``.

    ``height``/``width`` are in denoiser-input units (latent pixels), default the config's
    ``sample_size``. Tensors go on ``device`` (default: the denoiser's) in its dtype; values are
    zeros (timestep 500), which is all counting needs.

    - ``UNet2DConditionModel``: sample ``(B, in_channels, H, W)``, timestep ``(B,)``,
      encoder_hidden_states ``(B, T, D)`` with ``T = context_tokens`` (default 77) and ``D`` the
      config's ``encoder_hid_dim`` if set else ``cross_attention_dim``; class_labels if the model
      has a class embedding; for ``addition_embed_type == "text_time"`` (SDXL) ``added_cond_kwargs``
      with text_embeds ``(B, projection_class_embeddings_input_dim - 6 * addition_time_embed_dim)``
      and time_ids ``(B, 6)``.
    - ``UNet2DModel``: sample, timestep, class_labels if it has a class embedding.
    - ``DiTTransformer2DModel``: hidden_states ``(B, C, H, W)``, timestep, class_labels ``(B,)``.
    - ``PixArtTransformer2DModel``: hidden_states, encoder_hidden_states ``(B, T, caption_channels)``
      (T default 120), timestep, added_cond_kwargs: resolution ``(B, 2)`` (image pixels, 8 x latent)
      and aspect_ratio ``(B, 1)`` when ``use_additional_conditions``, else None for both.
    - ``SD3Transformer2DModel``: hidden_states, encoder_hidden_states ``(B, T, joint_attention_dim)``
      (T default 333 = 77 CLIP + 256 T5), pooled_projections, timestep.
    - ``FluxTransformer2DModel``: packed latents ``(B, H/2 * W/2, in_channels)`` (height and width
      required: Flux has no sample_size), encoder_hidden_states (T default 512), pooled_projections,
      timestep, img_ids, txt_ids, guidance when ``guidance_embeds``.

    Raises ``ValueError`` naming the class for other families.
    """
    # subclasses (e.g. our depth-skipped U-Nets) are called like the diffusers class they extend
    cls = next((c.__name__ for c in type(denoiser).__mro__ if c.__name__ in SUPPORTED), type(denoiser).__name__)
    if cls not in SUPPORTED:
        raise UserError(f"default_inputs does not know how to call {cls}; supported: {', '.join(SUPPORTED)}")
    config = denoiser.config
    p = _first_param(denoiser)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    timestep = torch.full((batch,), 500, dtype=torch.long, device=device)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device)

    if cls == "UNet2DConditionModel":
        h, w = _spatial(config, height, width, cls)
        hid_type = config.get("encoder_hid_dim_type")
        if config.get("encoder_hid_dim") is not None and hid_type not in (None, "text_proj"):
            raise UserError(f"{cls}: encoder_hid_dim_type {hid_type!r} is not supported by default_inputs")
        dim = config.get("encoder_hid_dim") or _single_dim(config["cross_attention_dim"], "cross_attention_dim", cls)
        kwargs: dict[str, Any] = {"encoder_hidden_states": zeros(batch, context_tokens or 77, dim)}
        labels = _class_labels(config, batch, device, dtype, cls)
        if labels is not None:
            kwargs["class_labels"] = labels
        if config.get("time_cond_proj_dim") is not None:  # an LCM U-Net's guidance embedding (its pipeline passes one)
            kwargs["timestep_cond"] = zeros(batch, config["time_cond_proj_dim"])
        add = config.get("addition_embed_type")
        if add == "text_time":
            n_time = 6
            text_dim = config["projection_class_embeddings_input_dim"] - n_time * config["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {"text_embeds": zeros(batch, text_dim), "time_ids": zeros(batch, n_time)}
        elif add not in (None, "text"):
            raise UserError(f"{cls}: addition_embed_type {add!r} is not supported by default_inputs")
        return (zeros(batch, config["in_channels"], h, w), timestep), kwargs

    if cls == "UNet2DModel":
        h, w = _spatial(config, height, width, cls)
        kwargs = {}
        labels = _class_labels(config, batch, device, dtype, cls)
        if labels is not None:
            kwargs["class_labels"] = labels
        return (zeros(batch, config["in_channels"], h, w), timestep), kwargs

    if cls == "DiTTransformer2DModel":
        h, w = _spatial(config, height, width, cls)
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        return (), {"hidden_states": zeros(batch, config["in_channels"], h, w), "timestep": timestep,
                    "class_labels": labels}

    if cls == "PixArtTransformer2DModel":
        h, w = _spatial(config, height, width, cls)
        dim = config.get("caption_channels") or config["cross_attention_dim"]
        if denoiser.use_additional_conditions:
            added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]] * batch, dtype=dtype, device=device),
                     "aspect_ratio": torch.tensor([[h / w]] * batch, dtype=dtype, device=device)}
        else:
            added = {"resolution": None, "aspect_ratio": None}
        return (), {"hidden_states": zeros(batch, config["in_channels"], h, w),
                    "encoder_hidden_states": zeros(batch, context_tokens or 120, dim),
                    "timestep": timestep, "added_cond_kwargs": added}

    if cls == "SD3Transformer2DModel":
        h, w = _spatial(config, height, width, cls)
        return (), {"hidden_states": zeros(batch, config["in_channels"], h, w),
                    "encoder_hidden_states": zeros(batch, context_tokens or 333, config["joint_attention_dim"]),
                    "pooled_projections": zeros(batch, config["pooled_projection_dim"]),
                    "timestep": timestep}

    if cls == "FluxTransformer2DModel":
        if height is None or width is None:
            raise UserError(f"{cls} has no sample_size: give the size to count at (latent pixels, before 2x2 packing; "
                            "profile --height and --width take image pixels)")
        n_txt = context_tokens or 512
        n_img = (height // 2) * (width // 2)
        kwargs = {"hidden_states": zeros(batch, n_img, config["in_channels"]),
                  "encoder_hidden_states": zeros(batch, n_txt, config["joint_attention_dim"]),
                  "pooled_projections": zeros(batch, config["pooled_projection_dim"]),
                  "timestep": torch.full((batch,), 0.5, dtype=dtype, device=device),
                  "img_ids": zeros(n_img, 3), "txt_ids": zeros(n_txt, 3)}
        if config.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 3.5, dtype=dtype, device=device)
        return (), kwargs

    raise AssertionError(f"unhandled family {cls}")  # SUPPORTED and the branches above disagree
