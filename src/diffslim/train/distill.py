"""The distillation trainer: fine-tune a smaller student denoiser against its teacher (Accelerate).

Used to fine-tune depth-skipped U-Nets (Kim and Cho, 2024) and for LAPTOP-Diff's normalized
feature distillation; with ``normalized=False`` the feature term is BK-SDM's plain sum of MSEs.
The loss of one step, with ``x_t = add_noise(x0, eps, t)``, the student prediction ``eps_S`` and the
teacher prediction ``eps_T`` (both ``(B, C, H, W)``; "eps" is the scheduler's prediction target,
the noise for ``prediction_type="epsilon"``, the velocity for ``"v_prediction"``; for SD3's rectified flow
``x_t = (1 - sigma) x0 + sigma eps`` and the target ``eps - x0``, see :class:`Noising`)::

    loss = lambda_task * task + lambda_out * out + lambda_feat * feat
    task = mean((target - eps_S)^2)          out = mean((eps_T - eps_S)^2)
    feat = sum_l mean((F_l^T - F_l^S)^2) / (mean((F_l^T)^2) + feat_eps)    normalized (LAPTOP-Diff)
    feat = sum_l mean((F_l^T - F_l^S)^2)                                   plain (BK-SDM)

where ``mean`` runs over every element of the batch (batch, channels, positions), so the normalized
term of a layer is ``||F^T - F^S||^2 / (||F^T||^2 + feat_eps * numel)`` with squared Frobenius
norms over the whole batch, the teacher's norm detached. With ``match_plain_weight`` the normalized
term is multiplied by ``sum_l P_l / sum_l N_l``, the plain (``P_l``) and normalized (``N_l``) terms of the
untrained student on the first batches, so that it starts with the plain sum's total weight and only
redistributes it among the layers (``lambda_feat`` tuned for BK-SDM's loss then carries over).
Features ``F_l`` are the outputs of the
denoiser's blocks (``down_blocks.i`` (first element of its tuple), ``mid_block``, ``up_blocks.i``,
``transformer_blocks.i``), captured on teacher and student by diffusers ``ModelHook`` taps.

The whole loop is visible in ``distill`` (prepare, step, log, checkpoint, resume), as in
Accelerate's examples. Batches, label dropout, noise and timesteps are a pure function of
(seed, step, process index), so a resumed run continues exactly where the stopped one was.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from diffslim.errors import Interrupted, UserError
from diffslim.models.derived import diffusers_base, ip_adapter_loaded
from diffslim.train.data import collate
from diffslim.train.stop import StopOnSignal, say

logger = logging.getLogger(__name__)

_TAP_HOOK = "diffslim_distill_feature_tap"
_TERMS = ("loss", "task", "out", "feat")


@dataclass
class DistillConfig:
    """Settings of one distillation run (see the module docstring for the loss).

    ``batch_size`` is per process (the global batch is ``batch_size * num_processes``). ``warmup``:
    linear warm-up steps before the cosine decay (None: ``min(200, steps // 10)``). ``features``:
    ``"auto"``, a list of block names present in both models, or a dict ``{student_name:
    teacher_name}``. ``ema_decay=None`` disables the EMA (then ``out/student`` holds the raw
    weights). ``stop_at``: end this call after that global step with a checkpoint (a time-boxed
    slice of a longer run; calling again with the same settings resumes). ``label_dropout``: the
    share of class labels replaced by the null label (classifier-free guidance), zoo class task only.
    ``find_unused_parameters``: for multi-process (DDP) runs of students with parameters the forward
    does not use. ``match_plain_weight`` (normalized only): scale the normalized feature term so that
    its total starts equal to the plain one's, measured before training on the batches of the first
    ``weight_batches`` steps, summed over processes; the scale is checkpointed with the run. ``feat_norm``
    (normalized only): ``"batch"`` divides each block's term by the teacher's norm over the whole batch,
    ``"sample"`` each sample's by its own (see :func:`feature_loss`). User mistakes (unknown feature names, a checkpoint of other settings, an
    unsupported pipeline) raise ``diffslim.errors.UserError``, a ``ValueError``.
    """

    steps: int
    batch_size: int
    lr: float
    out: Union[str, Path]
    checkpoint_every: int = 500
    log_every: int = 50
    lambda_task: float = 1.0
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    normalized: bool = True
    features: Union[str, Sequence[str], Mapping[str, str]] = "auto"
    feat_eps: float = 1e-6
    ema_decay: Optional[float] = 0.999
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    log_with: str = "csv"
    warmup: Optional[int] = None
    progress: bool = True
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    label_dropout: float = 0.1
    keep_checkpoints: int = 2
    stop_at: Optional[int] = None
    find_unused_parameters: bool = False
    match_plain_weight: bool = False
    weight_batches: int = 4
    feat_norm: str = "batch"

    def check(self) -> "DistillConfig":
        """Raise a :class:`UserError` naming the setting (and its command-line option) that is out of range."""
        import math

        def name(key):
            return f"{key} (--{key.replace('_', '-')})"

        if self.match_plain_weight and not self.normalized:
            raise UserError(f"{name('match_plain_weight')} scales the normalized feature loss: use it with "
                            "normalized=True (--normalized)")
        if self.feat_norm not in ("batch", "sample"):
            raise UserError(f"{name('feat_norm')} {self.feat_norm!r}: accepted 'batch' or 'sample'")
        if self.feat_norm == "sample" and not self.normalized:
            raise UserError(f"{name('feat_norm')} 'sample' divides by each sample's teacher norm: use it with "
                            "normalized=True (--normalized)")
        if self.log_with not in ("csv", "tensorboard"):
            raise UserError(f"{name('log_with')} {self.log_with!r}: accepted 'csv' or 'tensorboard'")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"{name('mixed_precision')} {self.mixed_precision!r}: accepted 'no', 'fp16' or 'bf16'")
        for key in ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints", "weight_batches"):
            if getattr(self, key) < 1:
                raise UserError(f"{name(key)} must be at least 1, not {getattr(self, key)}")
        for key in ("lr", "feat_eps"):
            if not getattr(self, key) > 0 or not math.isfinite(getattr(self, key)):
                raise UserError(f"{name(key)} must be a number > 0, not {getattr(self, key)}")
        for key in ("lambda_task", "lambda_out", "lambda_feat", "max_grad_norm", "weight_decay"):
            if not getattr(self, key) >= 0 or not math.isfinite(getattr(self, key)):
                raise UserError(f"{name(key)} must be a number >= 0, not {getattr(self, key)}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise UserError(f"{name('ema_decay')} must be in [0, 1) (0 or None: no EMA), not {self.ema_decay}")
        if not 0 <= self.label_dropout < 1:
            raise UserError(f"{name('label_dropout')} must be in [0, 1), not {self.label_dropout}")
        if self.warmup is not None and self.warmup < 0:
            raise UserError(f"{name('warmup')} must be >= 0 steps, not {self.warmup}")
        return self


@dataclass
class DistillResult:
    """What a run left: ``out_dir/student`` (the exported student), the global step reached, the mean
    of each loss term (``loss, task, out, feat``) over the last logged window, and the CSV log path.
    ``feat_scale``: the factor on ``lambda_feat * feat`` (1 unless ``match_plain_weight``)."""

    out_dir: Path
    steps: int
    final_losses: dict = field(default_factory=dict)
    log_path: Optional[Path] = None
    feat_scale: float = 1.0


# ------------------------------------------------------------------------------------------
# Feature taps and the loss


class FeatureTap(ModelHook):
    """Records a block's output in ``store[name]``: the first element of a tuple (the image stream, the
    second, of a two-stream block: SD3, Flux), ``.sample`` of an output object."""

    def __init__(self, store: dict, name: str):
        super().__init__()
        self.store, self.name = store, name

    def post_forward(self, module, output):
        from diffslim.models.anatomy import TWO_STREAM_BLOCKS

        feat = output
        if isinstance(feat, (tuple, list)):
            feat = feat[1] if type(module).__name__ in TWO_STREAM_BLOCKS and len(feat) == 2 else feat[0]
        if hasattr(feat, "sample"):
            feat = feat.sample
        self.store[self.name] = feat
        return output


def add_feature_taps(model: nn.Module, names: Sequence[str], store: dict, keys: Optional[Sequence[str]] = None) -> None:
    """Register a ``FeatureTap`` on each named submodule; its output goes to ``store[key]`` (key defaults to the name)."""
    for name, key in zip(names, keys or names):
        HookRegistry.check_if_exists_or_initialize(model.get_submodule(name)).register_hook(FeatureTap(store, key),
                                                                                             _TAP_HOOK)


def remove_feature_taps(model: nn.Module, names: Sequence[str]) -> None:
    """Remove the taps ``add_feature_taps`` registered; the modules' forwards are restored."""
    for name in names:
        registry = getattr(model.get_submodule(name), "_diffusers_hook", None)
        if registry is not None and _TAP_HOOK in registry.hooks:
            registry.remove_hook(_TAP_HOOK, recurse=False)


def _is_stand_in(module: Optional[nn.Module]) -> bool:
    # The pruning methods' convention: a removed module is replaced by a parameter-free stand-in,
    # ``Removed*`` (depth-skip: returns zeros) or ``Pruned*`` (layer pruning: returns its shortcut).
    # Methods sit above train/, so we recognise them by name rather than import them.
    return module is not None and type(module).__name__.startswith(("Removed", "Pruned"))


def _computes_feature(block: nn.Module) -> bool:
    """Whether a student block still computes a feature comparable to the teacher's: its output is no
    zeros stand-in, none of its samplers is removed (that changes the output's size) and at least one
    of its resnets/attentions is kept."""
    out = _output_module(block)
    if out is not block and type(out).__name__.startswith("Removed"):
        return False
    for attr in ("downsamplers", "upsamplers"):
        if any(_is_stand_in(m) for m in (getattr(block, attr, None) or [])):
            return False
    layers = [m for attr in ("resnets", "attentions") for m in (getattr(block, attr, None) or []) if m is not None]
    return not layers or not all(_is_stand_in(m) for m in layers)


def _output_module(block: nn.Module) -> nn.Module:
    """The submodule whose output is the block's output (sampler, else last resnet, else the block)."""
    for attr in ("downsamplers", "upsamplers", "resnets"):
        mods = getattr(block, attr, None)
        if mods is not None and len(mods) > 0:
            return mods[-1]
    return block


def _block_lists(model: nn.Module) -> list[str]:
    """The U-Net's block lists, or a transformer's (``diffslim.models.anatomy.block_lists``: ``transformer_blocks``,
    Flux's and AuraFlow's two lists, HunyuanDiT's ``blocks``, Lumina2's and Z-Image's ``layers``), in forward
    order."""
    from diffslim.models.anatomy import block_lists

    return [a for a in ("down_blocks", "mid_block", "up_blocks") if getattr(model, a, None) is not None] + [
        a for a in block_lists(model) if a not in ("down_blocks", "up_blocks")]


def candidate_blocks(model: nn.Module) -> list[str]:
    """Block names of a denoiser in forward order: ``down_blocks.i``, ``mid_block``, ``up_blocks.i``, or a
    transformer's blocks (``transformer_blocks.i``, Flux's ``single_transformer_blocks.i``, Lumina2's ``layers.i``,
    ...)."""
    names = []
    for attr in _block_lists(model):
        mod = getattr(model, attr)
        names += [attr] if attr == "mid_block" else [f"{attr}.{i}" for i in range(len(mod))]
    return names


def _stream(model: nn.Module) -> tuple[str, ...]:
    """The prefixes of the transformer block lists that form one residual stream, in forward order (Flux: double,
    then single blocks)."""
    return tuple(f"{a}." for a in _block_lists(model) if a not in ("down_blocks", "mid_block", "up_blocks"))


def select_features(teacher: nn.Module, student: nn.Module,
                    features: Union[str, Sequence[str], Mapping[str, str]] = "auto") -> dict[str, str]:
    """The blocks to distil, as ``{student_name: teacher_name}``.

    ``"auto"``: every block of ``candidate_blocks`` present in both models whose student module is
    neither a stand-in (``Removed*``, ``Pruned*``) nor replaced (a different class than the teacher's),
    and whose output the student still computes (see ``_computes_feature``: a down block whose last
    layer was removed by depth-skip returns zeros, a block without its sampler has another size, a
    block whose every layer was pruned is the identity; they are left out). Each is matched with the
    teacher's block of the same name, except that a transformer block followed by removed blocks
    (identities) is matched with the last of those in the teacher, whose output reaches the same place in
    the residual stream (DiT with blocks 1 and 2 removed: student block 0 against teacher block 2; in Flux
    the stream runs on from the double-stream into the single-stream blocks).
    A list names blocks present in both; a dict maps student names to teacher names. Raises
    ``UserError`` (a ``ValueError``) for unknown names.
    """
    def get(model, name):
        try:
            return model.get_submodule(name)
        except AttributeError:
            return None

    if isinstance(features, str):
        if features != "auto":
            raise UserError(f"features must be 'auto', a list of block names or a dict, not {features!r}")
        for attr in [a for a in _block_lists(student) if a != "mid_block"]:
            s_list, t_list = getattr(student, attr, None), getattr(teacher, attr, None)
            if s_list is not None and t_list is not None and len(s_list) != len(t_list):
                # a pruned model exported as its stock class (diffslim stock) no longer records its removals
                raise UserError(
                    f"the student has {len(s_list)} {attr} and the teacher {len(t_list)} (a stock export of a pruned "
                    "model?): nothing records which teacher block each student block stands for, and matching "
                    "features by position would pair the wrong ones; distil the LayerPruned model (what layer-prune "
                    "writes without --stock) and export it afterwards with `diffslim stock`, or name the pairs "
                    "(features={student_block: teacher_block})")
        out = {}
        names, stream = candidate_blocks(student), _stream(student)
        for i, name in enumerate(names):
            s, t = get(student, name), get(teacher, name)
            if t is None or _is_stand_in(s) or type(s) is not type(t) or not _computes_feature(s):
                continue
            # a transformer block followed by removed (identity) blocks feeds the place the last of them feeds
            # in the teacher: its output is matched with that block's
            j = i
            while (stream and name.startswith(stream) and j + 1 < len(names)
                   and names[j + 1].startswith(stream) and _is_stand_in(get(student, names[j + 1]))):
                j += 1
            out[name] = names[j]
        return out
    mapping = dict(features) if isinstance(features, Mapping) else {n: n for n in features}
    for s_name, t_name in mapping.items():
        if get(student, s_name) is None or get(teacher, t_name) is None:
            raise UserError(f"feature {s_name!r}->{t_name!r} is not a module of both models; blocks: "
                             f"{', '.join(candidate_blocks(student))}")
        if _is_stand_in(get(student, s_name)):
            raise UserError(f"feature {s_name!r} is a removed block (a depth-skip stand-in) in the student")
    return mapping


def feature_loss(teacher_feats: Mapping[str, torch.Tensor], student_feats: Mapping[str, torch.Tensor],
                 normalized: bool = True, eps: float = 1e-6, per_sample: bool = False) -> torch.Tensor:
    """The feature term: ``sum_l mean((T_l - S_l)^2) [/ (mean(T_l^2) + eps)]`` over the layers of ``teacher_feats``.

    ``teacher_feats[l]`` and ``student_feats[l]`` have the same shape (e.g. ``(B, C, H, W)``); means run
    over all elements; the teacher features are detached and everything is computed in float32.
    ``normalized=True`` is LAPTOP-Diff's normalized feature loss, ``False`` BK-SDM's plain sum. With
    ``per_sample=True`` (normalized only) each sample is divided by its own teacher norm and the ratios
    are averaged over the batch, ``mean_b [mean((T_lb - S_lb)^2) / (mean(T_lb^2) + eps)]``: the loss as
    an expectation over inputs and timesteps, which also evens out samples whose features are small
    (e.g. some noise levels). Returns a 0-dim tensor (0 when there are no layers).
    """
    total = None
    for name, ft in teacher_feats.items():
        fs = student_feats[name]
        if fs.shape != ft.shape:
            raise UserError(f"feature {name}: student shape {tuple(fs.shape)} != teacher shape {tuple(ft.shape)}; "
                             "map student blocks to teacher blocks of the same shape (features={...})")
        ft = ft.detach().float()
        if normalized and per_sample:
            dims = tuple(range(1, ft.dim()))
            term = ((fs.float() - ft).pow(2).mean(dims) / (ft.pow(2).mean(dims) + eps)).mean()
        else:
            term = F.mse_loss(fs.float(), ft)
            if normalized:
                term = term / (ft.pow(2).mean() + eps)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


# ------------------------------------------------------------------------------------------
# Task adapters: batch -> (x0, conditioning); conditioning + denoiser -> prediction


def _denoiser_of(pipe) -> nn.Module:
    for attr in ("unet", "transformer", "denoiser"):
        mod = getattr(pipe, attr, None)
        if mod is not None:
            return mod
    raise UserError(f"{type(pipe).__name__} has no unet, transformer or denoiser to distil")


class _ZooClassTask:
    """Digits: ``x0 = image * 2 - 1``; labels (with CFG dropout to the null label) via the cond encoder or ``class_labels``."""

    def __init__(self, pipe, label_dropout: float):
        self.pipe, self.label_dropout = pipe, label_dropout

    def encode(self, batch: dict, g: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        x0 = batch["image"].to(device) * 2 - 1
        labels = batch["label"].clone()
        drop = torch.rand(labels.shape[0], generator=g) < self.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.pipe.null_label), labels).to(device)
        if self.pipe.cond_encoder is not None:
            return x0, {"encoder_hidden_states": self.pipe.cond_encoder(labels)}
        return x0, {"class_labels": labels}

    def predict(self, denoiser, xt, t, cond: dict) -> torch.Tensor:
        return denoiser(xt, t, **cond, return_dict=False)[0]


class _ZooSRTask:
    """Super-resolution: residual target ``(HR - up(LR)) * 2 * residual_scale``, ``up(LR) * 2 - 1`` concatenated."""

    def __init__(self, pipe):
        self.pipe = pipe

    def encode(self, batch: dict, g: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        hr = batch["image"].to(device)
        scale = int(self.pipe.config.upscale)
        if "cond" in batch:  # an explicit low-resolution input (ConditionPairs)
            lr = batch["cond"].to(device)
            up = lr if lr.shape[-2:] == hr.shape[-2:] else self.pipe.upsample(lr, hr.shape[-1] // lr.shape[-1])
        else:
            up = self.pipe.upsample(self.pipe.degrade(hr), scale)
        x0 = (hr - up) * 2 * float(self.pipe.config.residual_scale)
        ctx = self.pipe.cond_encoder(torch.zeros(hr.shape[0], dtype=torch.long, device=device))
        return x0, {"cond_image": up * 2 - 1, "encoder_hidden_states": ctx}

    def predict(self, denoiser, xt, t, cond: dict) -> torch.Tensor:
        x = torch.cat([xt, cond["cond_image"].to(xt.dtype)], dim=1)
        return denoiser(x, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


def _vae_latents(vae, batch: dict, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image in [-1, 1], x0)``: the batch's images and their sampled VAE latents ``(z - shift) * scaling_factor``
    (a video VAE's, Qwen-Image's: of one frame, ``(z - latents_mean) / latents_std`` per channel)."""
    img = batch["image"].to(device=device, dtype=vae.dtype) * 2 - 1
    mean = getattr(vae.config, "latents_mean", None)
    video = mean is not None and hasattr(vae.config, "z_dim")  # Qwen-Image's (Wan's) video VAE: one frame
    enc = vae.encode(img.unsqueeze(2) if video else img)
    # a KL autoencoder's posterior is sampled; Sana's deep-compression autoencoder (AutoencoderDC) is deterministic
    z = enc.latent_dist.sample(generator=g) if hasattr(enc, "latent_dist") else enc.latent
    if video:  # per-channel mean and std, as its pipelines normalize
        shape = (1, -1, 1, 1, 1)
        z = (z - z.new_tensor(mean).view(shape)) / z.new_tensor(vae.config.latents_std).view(shape)
        return img, z.squeeze(2).float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return img, ((z - shift) * vae.config.scaling_factor).float()


def sdxl_time_ids(pipe, size, dtype) -> torch.Tensor:
    """The size ids an SDXL pipeline passes its U-Net for an image of ``size`` (pixels; its own size, no crop),
    ``(1, n)``. The image-to-image and inpainting pipelines take the aesthetic scores too (used in place of the target
    size where the pipeline ``requires_aesthetics_score``, as a refiner's does) and return the negative prompt's ids
    beside, dropped here."""
    import inspect

    h, w = (int(v) for v in size)
    proj = pipe.text_encoder_2.config.projection_dim
    if "aesthetic_score" not in inspect.signature(pipe._get_add_time_ids).parameters:
        return pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=dtype, text_encoder_projection_dim=proj)
    call = inspect.signature(pipe.__call__).parameters
    return pipe._get_add_time_ids((h, w), (0, 0), (h, w), call["aesthetic_score"].default,
                                  call["negative_aesthetic_score"].default, (h, w), (0, 0), (h, w), dtype=dtype,
                                  text_encoder_projection_dim=proj)[0]


class _LatentTextTask:
    """SD-style: VAE latents ``(z - shift) * scaling_factor`` of ``image * 2 - 1``; captions via the text encoder.

    SDXL-style pipelines (``text_encoder_2``) also get ``added_cond_kwargs`` (pooled text, size ids);
    with a ``cond`` image and a U-Net taking twice the latent channels (InstructPix2Pix) the cond
    image's latent mode is concatenated to the noisy latents (scaled by the VAE's factor for CosXL Edit, as its
    pipeline does). A ControlNet pipeline's ``cond`` image is its control image (in [0, 1], as its control image
    processor leaves it): :meth:`extra_cond` runs the frozen ControlNet on each noisy batch, at the pipeline's default
    ``controlnet_conditioning_scale``, and the U-Net adds its residuals as the pipeline's call adds them.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        net = getattr(pipe, "controlnet", None)
        if net is not None and len(getattr(net, "nets", [net])) > 1:
            raise UserError(f"{type(pipe).__name__} holds {len(net.nets)} ControlNets, and a training pair gives one "
                            "control image: train with a pipeline of one ControlNet (the U-Net is the same)")
        self.controlnet = net

    @torch.no_grad()
    def _text(self, captions: list, device):
        pipe = self.pipe
        if hasattr(pipe, "encode_prompt"):
            enc = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
            return enc[0], (enc[2] if len(enc) >= 4 else None)
        tok = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return pipe.text_encoder(tok.input_ids.to(device))[0], None

    def encode(self, batch: dict, g: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        pipe, vae = self.pipe, self.pipe.vae
        img, x0 = _vae_latents(vae, batch, g, device)
        captions = list(batch.get("text") or [""] * img.shape[0])
        emb, pooled = self._text(captions, device)
        cond = {"encoder_hidden_states": emb}
        if getattr(pipe, "text_encoder_2", None) is not None and pooled is not None:
            ids = sdxl_time_ids(pipe, img.shape[-2:], emb.dtype)
            cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids.to(device).repeat(img.shape[0], 1)}
        den = _denoiser_of(pipe)
        proj = getattr(den.config, "time_cond_proj_dim", None)
        if proj is not None:  # an LCM U-Net: the guidance embedding every call of its pipeline passes
            cond["timestep_cond"] = guidance_condition(pipe, img.shape[0], proj).to(device=device, dtype=emb.dtype)
        if "cond" not in batch and den.config.in_channels > x0.shape[1]:
            raise UserError(f"{type(den).__name__} takes {den.config.in_channels} input channels, the latents "
                            f"{x0.shape[1]} and a conditioning image ({type(self.pipe).__name__}): give a folder "
                            "with input/ and target/ subfolders of image pairs (the same file names)")
        if "cond" in batch and den.config.in_channels > x0.shape[1]:
            c = batch["cond"].to(device=device, dtype=vae.dtype) * 2 - 1
            cond["concat"] = vae.encode(c).latent_dist.mode()
            if getattr(pipe, "is_cosxl_edit", False):  # CosXL Edit's pipeline scales the input's latents
                cond["concat"] = cond["concat"] * vae.config.scaling_factor
        if self.controlnet is not None:
            if "cond" not in batch:
                raise UserError(f"{type(pipe).__name__} is steered by its ControlNet's control image: give a folder "
                                "with input/ (the control images) and target/ (the images, captions beside them) of "
                                "the same file names")
            cond["control"] = batch["cond"].to(device=device, dtype=torch.float32)
        return x0, cond

    @torch.no_grad()
    def extra_cond(self, xt, t, cond: dict) -> dict:
        """What the U-Net takes beside ``cond`` that depends on the noisy input: a ControlNet's residuals, one per skip
        connection and the mid block's (``{"controlnet": {"down": {"0": ...}, "mid": ...}}``; none without a
        ControlNet). Teacher and student take the same, so the trainer and the calibration run it once per batch."""
        if self.controlnet is None or "control" not in cond:
            return {}
        import inspect

        net = self.controlnet
        dtype = next(net.parameters()).dtype
        scale = inspect.signature(self.pipe.__call__).parameters["controlnet_conditioning_scale"].default
        cast = (lambda v: {k: cast(x) for k, x in v.items()} if isinstance(v, dict)  # noqa: E731
                else v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
        extra = {"added_cond_kwargs": cast(cond["added_cond_kwargs"])} if "added_cond_kwargs" in cond else {}
        down, mid = net(xt.to(dtype), t, encoder_hidden_states=cast(cond["encoder_hidden_states"]),
                        controlnet_cond=cast(cond["control"]), conditioning_scale=float(scale), guess_mode=False,
                        return_dict=False, **extra)
        return {"controlnet": {"down": {str(i): d for i, d in enumerate(down)}, "mid": mid}}

    def predict(self, denoiser, xt, t, cond: dict) -> torch.Tensor:
        if "control" in cond and "controlnet" not in cond:  # a caller that did not run extra_cond
            cond = {**cond, **self.extra_cond(xt, t, cond)}
        kwargs = {k: v for k, v in cond.items() if k not in ("concat", "control", "controlnet")}
        if "concat" in cond:
            xt = torch.cat([xt, cond["concat"].to(xt.dtype)], dim=1)
        if "controlnet" in cond:
            down = cond["controlnet"]["down"]
            kwargs["down_block_additional_residuals"] = [down[str(i)] for i in range(len(down))]
            kwargs["mid_block_additional_residual"] = cond["controlnet"]["mid"]
        return denoiser(xt, t, **kwargs, return_dict=False)[0]


def pad_rows(rows: Sequence[torch.Tensor], length: Optional[int] = None) -> torch.Tensor:
    """Per-row tensors of their own lengths (dim 0; Z-Image's captions) stacked, zero-padded to ``length`` (default
    the longest): ``(len(rows), length, ...)``."""
    length = max(r.shape[0] for r in rows) if length is None else length
    return torch.stack([torch.cat([r, r.new_zeros((length - r.shape[0], *r.shape[1:]))]) for r in rows])


# schedulers that sample a consistency model: each step maps the latents to the trajectory's end, not to the mean
# clean image the diffusion objective regresses to
CONSISTENCY_SCHEDULERS = ("LCMScheduler", "TCDScheduler")


def consistency_model(pipe) -> bool:
    """Whether ``pipe`` samples a consistency model (an LCM, an LCM-LoRA or TCD fused in, a U-Net with a guidance
    embedding): its denoiser was trained to match its teacher's trajectory, not the diffusion objective, so a student
    of it is distilled without the task loss (:func:`default_task_weight`)."""
    if pipe is None:
        return False
    den = next((m for m in (getattr(pipe, a, None) for a in ("unet", "transformer", "denoiser")) if m is not None),
               None)
    return (type(getattr(pipe, "scheduler", None)).__name__ in CONSISTENCY_SCHEDULERS
            or getattr(getattr(den, "config", None), "time_cond_proj_dim", None) is not None)


def default_task_weight(pipe, training_data: bool = True) -> float:
    """The task loss's weight when none is given: 1 (the papers' loss) on training data. 0 for a consistency model,
    whose sampler reads the denoiser's output as the trajectory's end: the diffusion objective would pull the student
    towards the blurred mean of the clean images. 0 too on the images the teacher samples itself when there is no
    training data, where the task loss only repeats the output term through the noise (bench/teacher_data.py: 4.2 dB
    worse on zoo:digits-sd with it, level on zoo:digits-dit)."""
    return 0.0 if consistency_model(pipe) or not training_data else 1.0


def guidance_condition(pipe, batch: int, dim: int) -> torch.Tensor:
    """The ``timestep_cond`` a U-Net with a ``time_cond_proj_dim`` (a latent consistency model's) gets from its
    pipeline: the embedding of ``guidance_scale - 1`` at the pipeline's default guidance scale (8.5 for
    ``LatentConsistencyModelPipeline``), ``(batch, dim)``. Without it the U-Net silently skips that projection, so
    training and scoring would see a model that sampling never runs."""
    import inspect

    embed = getattr(pipe, "get_guidance_scale_embedding", None)
    param = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    if embed is None or param is None or not isinstance(param.default, (int, float)):
        raise UserError(f"{type(pipe).__name__}'s denoiser takes a guidance embedding (time_cond_proj_dim), and the "
                        "pipeline states no default guidance_scale to embed")
    return embed(torch.full((batch,), float(param.default) - 1.0), embedding_dim=dim)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's (and Chroma's) position ids of an ``h`` x ``w`` grid of packed tokens, ``(h * w, 3)``: 0, row, column
    (as their pipelines' ``_prepare_latent_image_ids``, whose signatures differ among them)."""
    rows = torch.arange(h, device=device, dtype=dtype)[:, None].expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype)[None, :].expand(h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(h * w, 3)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Flux's packing: ``(B, C, H, W)`` latents to ``(B, H/2 * W/2, 4C)`` tokens of 2x2 patches (as ``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``(B, H/2 * W/2, 4C)`` tokens to ``(B, C, H, W)`` latents."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# the guidance a guidance-distilled Flux (dev) is called with by default (FluxPipeline's guidance_scale); a Flux
# pipeline that states another default (image-to-image and inpainting: 7) is trained at its own
FLUX_GUIDANCE = 3.5

# pipelines whose denoiser call is their family's text-to-image one: an input image only sets where sampling starts,
# a mask only blends the latents between steps (the inpainting pipelines of denoisers that take no mask channels)
TRANSFORMER_FAMILIES = {
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
    "SanaPipeline": "sana", "SanaPAGPipeline": "sana", "AuraFlowPipeline": "auraflow",
    "HunyuanDiTPipeline": "hunyuandit", "HunyuanDiTPAGPipeline": "hunyuandit", "CogView4Pipeline": "cogview4",
    "Lumina2Pipeline": "lumina2", "Lumina2Text2ImgPipeline": "lumina2",
    "ZImagePipeline": "zimage", "ZImageImg2ImgPipeline": "zimage", "ZImageInpaintPipeline": "zimage",
    "QwenImagePipeline": "qwenimage", "QwenImageImg2ImgPipeline": "qwenimage", "QwenImageInpaintPipeline": "qwenimage",
    # (ChromaInpaintPipeline reads a guidance_embeds its transformer's config lacks, and fails in diffusers 0.42)
    "ChromaPipeline": "chroma", "ChromaImg2ImgPipeline": "chroma",
    # with the ControlNet's residuals (the task's extra_cond); SD3's ControlNet pipeline goes by its name's prefix
    "FluxControlNetPipeline": "flux", "FluxControlNetImg2ImgPipeline": "flux",
    # with the control image's latents beside the noisy ones (Canny and Depth dev)
    "FluxControlPipeline": "flux", "FluxControlImg2ImgPipeline": "flux",
    # with the input image's tokens after the noisy ones (an edit), or as Flux without one
    "FluxKontextPipeline": "flux",
    "QwenImageControlNetPipeline": "qwenimage",
}
KONTEXT = ("FluxKontextPipeline",)


def _takes_mask_channels(pipe) -> bool:
    """Whether ``pipe``'s denoiser takes more input channels than the VAE's latents (an inpainting U-Net's mask and
    masked-image latents; Flux's 2x2 packing counted)."""
    den = next((m for m in (getattr(pipe, a, None) for a in ("unet", "transformer")) if m is not None), None)
    vae_config = getattr(getattr(pipe, "vae", None), "config", None)
    latent = getattr(vae_config, "latent_channels", None) or getattr(vae_config, "z_dim", None)  # Qwen-Image's: z_dim
    channels = getattr(getattr(den, "config", None), "in_channels", None)
    if latent is None or channels is None:
        return True
    return channels not in (latent, 4 * latent)


class _LatentClassTask:
    """diffusers' DiTPipeline: VAE latents as for SD (``scaling_factor``) of labelled images; class labels, dropped with
    ``label_dropout`` to the null class (``num_embeds_ada_norm``, the extra row DiT's label embedding keeps for
    classifier-free guidance, which its pipeline passes as the unconditional label); the learned-variance half of the
    output is dropped, as the pipeline does."""

    def __init__(self, pipe, label_dropout: float):
        self.pipe, self.label_dropout = pipe, label_dropout
        self.null_label = int(pipe.transformer.config.num_embeds_ada_norm)

    @torch.no_grad()
    def encode(self, batch: dict, g: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        _, x0 = _vae_latents(self.pipe.vae, batch, g, device)
        labels = batch["label"].clone()
        drop = torch.rand(labels.shape[0], generator=g) < self.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return x0, {"class_labels": labels.to(device)}

    def predict(self, denoiser, xt, t, cond: dict) -> torch.Tensor:
        out = denoiser(xt, timestep=t, class_labels=cond["class_labels"], return_dict=False)[0]
        return out[:, : xt.shape[1]] if out.shape[1] == 2 * xt.shape[1] else out  # learned variance


class _LatentTransformerTask:
    """PixArt-alpha/sigma, SD3, Flux, Sana, AuraFlow, CogView4, HunyuanDiT, Lumina2, Z-Image, Qwen-Image, Chroma: VAE
    latents as for SD; captions through the pipeline's ``encode_prompt``.

    PixArt gets the T5 embeddings and their attention mask (and, for the 1024 px models that take them,
    the resolution and aspect ratio); its learned-variance half of the output is dropped, as its pipeline
    does. SD3 gets the joint CLIP+T5 embeddings and the pooled CLIP projections. Flux gets the T5
    embeddings and the pooled CLIP embedding; ``predict`` packs the ``(B, C, H, W)`` latents into 2x2
    patch tokens with their position ids, calls the transformer with the timestep as a fraction
    (``t / 1000``, as the pipeline does) and, for guidance-distilled models, the pipeline's default guidance, and
    unpacks the prediction, so the trainer and the criteria see ``(B, C, H, W)`` as for every other model.
    Sana gets the Gemma embeddings and their mask, encoded with the pipeline's default complex human instruction
    (what its sampling encodes the prompts with), and the timestep times its ``timestep_scale``; AuraFlow the T5
    embeddings and the timestep as a fraction, as their pipelines call them. Lumina2 (Gemma embeddings after its
    system prompt, with their mask) and Z-Image (a list of per-image latents and caption embeddings of their own
    lengths) get ``1 - t / 1000``, their time running from noise at 0 to the image at 1, and their prediction is
    negated, as their pipelines negate it before the scheduler's step: the trainer's target ``noise - x0`` holds.
    CogView4 gets the GLM embeddings, the image's size and no crop, and the timestep its pipeline passes: the
    *unshifted* one beside the shifted sigma the latents are noised at (its scheduler shifts by CogView4's own mu,
    ``sqrt(tokens / base_image_seq_len) * max_shift + base_shift``). HunyuanDiT gets both text encoders' embeddings
    and masks, the size ids and style 0 its call passes by default, and the rotary embeddings of the latent grid
    (cropped to its 512 px base size, as its pipeline computes them); its learned-variance half is dropped.
    Qwen-Image gets its latents from its video VAE (one frame, normalized by the per-channel mean and std), the
    Qwen2.5-VL embeddings after its prompt template with their mask, and is called as Flux is (packed 2x2 patches, the
    timestep as a fraction) with the grid's shape per image (``img_shapes``). Chroma is called as Flux is, with T5
    embeddings only and their mask extended over the image tokens, as its pipeline extends it.
    """

    def __init__(self, pipe, family: str):
        self.pipe, self.family = pipe, family
        net = getattr(pipe, "controlnet", None)
        if net is not None:
            if len(getattr(net, "nets", [net])) > 1:
                raise UserError(f"{type(pipe).__name__} holds {len(net.nets)} ControlNets, and a training pair gives "
                                "one control image: train with a pipeline of one ControlNet (the transformer is the "
                                "same)")
            if family not in ("sd3", "flux", "qwenimage"):
                raise UserError(f"no distillation task for {type(pipe).__name__}'s ControlNet: tasks run SD3's, "
                                "Flux's and Qwen-Image's; score its layers on its own sampling with --calibration "
                                "sampling --data inputs.jsonl")
            if (getattr(net.config, "extra_conditioning_channels", 0)  # SD3's inpainting ControlNet takes a mask,
                    or getattr(net.config, "extra_condition_channels", 0)):  # as Qwen-Image's does
                raise UserError(f"no distillation task for {type(pipe).__name__}: its ControlNet takes a mask beside "
                                "the control image; score its layers on its own sampling with --calibration sampling "
                                "--data inputs.jsonl")
        self.controlnet = net

    def _embedded_guidance(self) -> float:
        """The guidance a guidance-distilled Flux (or Qwen-Image) is trained at: its pipeline's default
        ``guidance_scale`` (``FLUX_GUIDANCE`` where it states none)."""
        import inspect

        param = inspect.signature(self.pipe.__call__).parameters.get("guidance_scale")
        default = getattr(param, "default", None)
        return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else FLUX_GUIDANCE

    @torch.no_grad()
    def encode(self, batch: dict, g: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        pipe = self.pipe
        img, x0 = _vae_latents(pipe.vae, batch, g, device)
        captions = list(batch.get("text") or [""] * img.shape[0])
        if self.family == "pixart":
            emb, mask = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                           num_images_per_prompt=1, clean_caption=False)[:2]
            cond = {"encoder_hidden_states": emb, "encoder_attention_mask": mask}
            if getattr(pipe.transformer, "use_additional_conditions", False):
                h, w = img.shape[-2:]
                b = img.shape[0]
                cond["resolution"] = torch.tensor([[h, w]], dtype=emb.dtype, device=device).repeat(b, 1)
                cond["aspect_ratio"] = torch.tensor([[h / w]], dtype=emb.dtype, device=device).repeat(b, 1)
            return x0, cond
        if self.family == "sana":
            import inspect

            chi = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
            emb, mask = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                           num_images_per_prompt=1, clean_caption=False,
                                           complex_human_instruction=chi)[:2]
            return x0, {"encoder_hidden_states": emb, "encoder_attention_mask": mask}
        if self.family == "auraflow":
            emb = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                     num_images_per_prompt=1)[0]
            return x0, {"encoder_hidden_states": emb}
        if self.family == "hunyuandit":  # both encoders' embeddings and masks; the size ids and style its call passes
            import inspect

            params = inspect.signature(pipe.__call__).parameters
            dtype = pipe.transformer.dtype
            emb, _, mask, _ = pipe.encode_prompt(captions, device=device, dtype=dtype,
                                                 do_classifier_free_guidance=False, max_sequence_length=77,
                                                 text_encoder_index=0)
            emb2, _, mask2, _ = pipe.encode_prompt(captions, device=device, dtype=dtype,
                                                   do_classifier_free_guidance=False, max_sequence_length=256,
                                                   text_encoder_index=1)
            b, (h, w) = img.shape[0], img.shape[-2:]
            ids = list(params["original_size"].default) + [h, w] + list(params["crops_coords_top_left"].default)
            return x0, {"encoder_hidden_states": emb, "text_embedding_mask": mask, "encoder_hidden_states_t5": emb2,
                        "text_embedding_mask_t5": mask2,
                        "image_meta_size": torch.tensor([ids], dtype=emb.dtype, device=device).repeat(b, 1),
                        "style": torch.zeros(b, dtype=torch.long, device=device)}
        if self.family == "cogview4":  # GLM embeddings; the image's size as its own and target size, no crop
            emb = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device)[0]
            b, (h, w) = img.shape[0], img.shape[-2:]
            size = torch.tensor([[h, w]], dtype=emb.dtype, device=device).repeat(b, 1)
            return x0, {"encoder_hidden_states": emb, "original_size": size, "target_size": size.clone(),
                        "crop_coords": torch.zeros_like(size)}
        if self.family == "lumina2":  # Gemma embeddings after the pipeline's default system prompt, with their mask
            emb, mask = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                           num_images_per_prompt=1)[:2]
            return x0, {"encoder_hidden_states": emb, "encoder_attention_mask": mask}
        if self.family == "zimage":  # one caption tensor per image, of its own length: padded, with the lengths
            caps = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)[0]
            return x0, {"cap_feats": pad_rows(caps), "cap_lens": torch.tensor([c.shape[0] for c in caps],
                                                                              device=device)}
        if self.family == "chroma":  # T5 embeddings and their mask, no pooled projection
            if x0.shape[-1] % 2 or x0.shape[-2] % 2:
                raise UserError(f"Chroma packs 2x2 latent patches: latents of {tuple(x0.shape[-2:])} do not divide; "
                                f"use images whose sides are multiples of {2 * pipe.vae_scale_factor} px")
            emb, _, mask = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)[:3]
            return x0, {"encoder_hidden_states": emb, "text_mask": mask}
        if self.family == "qwenimage":  # Qwen2.5-VL embeddings after its template, with their mask
            if x0.shape[-1] % 2 or x0.shape[-2] % 2:
                raise UserError(f"Qwen-Image packs 2x2 latent patches: latents of {tuple(x0.shape[-2:])} do not "
                                f"divide; use images whose sides are multiples of {2 * pipe.vae_scale_factor} px")
            emb, mask = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1)
            return x0, {"encoder_hidden_states": emb, "encoder_hidden_states_mask": mask,
                        **self._control(batch, g, device)}
        if self.family == "flux":
            if x0.shape[-1] % 2 or x0.shape[-2] % 2:
                raise UserError(f"Flux packs 2x2 latent patches: latents of {tuple(x0.shape[-2:])} do not divide; "
                                f"use images whose sides are multiples of {2 * pipe.vae_scale_factor} px")
            emb, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device, num_images_per_prompt=1)
            return x0, {"encoder_hidden_states": emb, "pooled_projections": pooled, **self._control(batch, g, device),
                        **self._reference(batch, device)}
        emb, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device=device,
                                               num_images_per_prompt=1, do_classifier_free_guidance=False)
        return x0, {"encoder_hidden_states": emb, "pooled_projections": pooled, **self._control(batch, g, device)}

    def _control(self, batch: dict, g: torch.Generator, device) -> dict:
        """The ControlNet's input as SD3's and Flux's ControlNet pipelines make it from the control image (a training
        pair's input): its VAE latents, shifted as the VAE's are (not for an InstantX SD3 ControlNet, which forces a
        zero pooled projection; its pipeline leaves the shift out too), or for a Flux ControlNet with its own
        conditioning embedding (XLabs') the image in [-1, 1]; for Flux Control (no ControlNet, a transformer taking
        twice the channels) the latents to concatenate (``concat``). Nothing for the others."""
        net = self.controlnet
        if net is None and not self._control_channels():
            return {}
        if "cond" not in batch:
            what = "its ControlNet's control image" if net is not None else "a control image"
            raise UserError(f"{type(self.pipe).__name__} is steered by {what}: give a folder with input/ (the control "
                            "images) and target/ (the images, captions beside them) of the same file names")
        vae = self.pipe.vae
        img = batch["cond"].to(device=device, dtype=vae.dtype) * 2 - 1
        if self.family == "flux" and getattr(net, "input_hint_block", None) is not None:
            return {"control": img.float()}
        if self.family == "qwenimage":  # its video VAE, one frame, normalized per channel (as its pipeline does)
            z = vae.encode(img.unsqueeze(2)).latent_dist.sample(generator=g)
            shape = (1, -1, 1, 1, 1)
            mean, std = z.new_tensor(vae.config.latents_mean), z.new_tensor(vae.config.latents_std)
            z = (z - mean.view(shape)) / std.view(shape)
            return {"control": z.squeeze(2).float()}
        z = vae.encode(img).latent_dist.sample(generator=g)
        no_shift = self.family == "sd3" and net is not None and net.config.force_zeros_for_pooled_projection
        shift = 0.0 if no_shift else (getattr(vae.config, "shift_factor", None) or 0.0)
        latents = ((z - shift) * vae.config.scaling_factor).float()
        return {"control": latents} if net is not None else {"concat": latents}

    def _reference(self, batch: dict, device) -> dict:
        """Flux Kontext's input image, where a training pair gives one: its VAE latents (the posterior's mode, shifted
        and scaled, as its pipeline encodes them), whose tokens the transformer sees after the noisy ones. Without
        one Kontext generates from the prompt, as Flux."""
        if type(self.pipe).__name__ not in KONTEXT or "cond" not in batch:
            return {}
        vae = self.pipe.vae
        z = vae.encode(batch["cond"].to(device=device, dtype=vae.dtype) * 2 - 1).latent_dist.mode()
        return {"reference": ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()}

    def _control_channels(self) -> bool:
        """Whether the transformer takes the control image's latents beside the noisy ones (Flux Control: Canny and
        Depth dev, whose pipelines concatenate the packed control latents to the packed noisy ones)."""
        vae_config = self.pipe.vae.config
        latent = getattr(vae_config, "latent_channels", None)
        return (self.family == "flux" and latent is not None
                and self.pipe.transformer.config.in_channels == 8 * latent)

    @torch.no_grad()
    def extra_cond(self, xt, t, cond: dict) -> dict:
        """A ControlNet's residuals for the noisy batch, at the pipeline's default ``controlnet_conditioning_scale``
        (``{"controlnet": {...}}``; none without one): SD3's one per block, Flux's for the double- and the single-stream
        blocks. Teacher and student take the same, so the trainer and the calibration run it once per batch."""
        net = self.controlnet
        if net is None or "control" not in cond:
            return {}
        import inspect

        dtype = next(net.parameters()).dtype
        scale = float(inspect.signature(self.pipe.__call__).parameters["controlnet_conditioning_scale"].default)
        emb, control = cond["encoder_hidden_states"].to(dtype), cond["control"].to(dtype)
        pooled = cond["pooled_projections"].to(dtype) if "pooled_projections" in cond else None
        if self.family == "qwenimage":
            b, _, h, w = xt.shape
            blocks = net(hidden_states=pack_latents(xt.to(dtype)), controlnet_cond=pack_latents(control),
                         conditioning_scale=scale, timestep=t.to(dtype) / 1000, encoder_hidden_states=emb,
                         encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
                         img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)
            return {"controlnet": {"blocks": {str(i): r for i, r in enumerate(blocks)}}}
        if self.family == "sd3":
            blocks = net(hidden_states=xt.to(dtype), timestep=t, controlnet_cond=control, conditioning_scale=scale,
                         encoder_hidden_states=emb if net.config.joint_attention_dim is not None else None,
                         pooled_projections=torch.zeros_like(pooled) if net.config.force_zeros_for_pooled_projection
                         else pooled, return_dict=False)[0]
            return {"controlnet": {"blocks": {str(i): b for i, b in enumerate(blocks)}}}
        b, _, h, w = xt.shape
        guidance = (torch.full((b,), self._embedded_guidance(), device=xt.device, dtype=torch.float32)
                    if net.config.guidance_embeds else None)
        hint = getattr(net, "input_hint_block", None) is not None
        double, single = net(hidden_states=pack_latents(xt.to(dtype)), timestep=t.to(dtype) / 1000,
                             controlnet_cond=control if hint else pack_latents(control), conditioning_scale=scale,
                             guidance=guidance, pooled_projections=pooled, encoder_hidden_states=emb,
                             txt_ids=torch.zeros(emb.shape[1], 3, device=xt.device, dtype=dtype),
                             img_ids=latent_image_ids(h // 2, w // 2, xt.device, dtype), return_dict=False)
        return {"controlnet": {"double": {str(i): r for i, r in enumerate(double or [])},
                               "single": {str(i): r for i, r in enumerate(single or [])}}}

    def _residuals(self, denoiser, xt, t, cond: dict) -> dict:
        """The transformer's ControlNet arguments from ``cond`` (run on the way where the caller did not)."""
        if "control" not in cond:
            return {}
        res = cond["controlnet"] if "controlnet" in cond else self.extra_cond(xt, t, cond)["controlnet"]

        def listed(d):
            return [d[str(i)] for i in range(len(d))] or None

        if self.family == "sd3":
            return {"block_controlnet_hidden_states": listed(res["blocks"])}
        if self.family == "qwenimage":
            return {"controlnet_block_samples": listed(res["blocks"])}
        return {"controlnet_block_samples": listed(res["double"]),
                "controlnet_single_block_samples": listed(res["single"]),
                "controlnet_blocks_repeat": getattr(self.controlnet, "input_hint_block", None) is not None}

    def predict(self, denoiser, xt, t, cond: dict) -> torch.Tensor:
        if self.family == "pixart":
            extra = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
            out = denoiser(xt, encoder_hidden_states=cond["encoder_hidden_states"],
                           encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                           added_cond_kwargs=extra, return_dict=False)[0]
            return out[:, : xt.shape[1]] if out.shape[1] == 2 * xt.shape[1] else out  # learned variance
        if self.family == "sana":
            scale = getattr(denoiser.config, "timestep_scale", 1.0) or 1.0
            return denoiser(xt, encoder_hidden_states=cond["encoder_hidden_states"],
                            encoder_attention_mask=cond["encoder_attention_mask"], timestep=t.to(xt.dtype) * scale,
                            return_dict=False)[0]
        if self.family == "auraflow":
            return denoiser(xt, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t.to(xt.dtype) / 1000,
                            return_dict=False)[0]
        if self.family == "hunyuandit":  # rotary embeddings of the latent grid, cropped to its 512 px base size
            from diffusers.models.embeddings import get_2d_rotary_pos_embed
            from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

            patch = denoiser.config.patch_size
            grid = (xt.shape[-2] // patch, xt.shape[-1] // patch)
            rope = get_2d_rotary_pos_embed(denoiser.inner_dim // denoiser.num_heads,
                                           get_resize_crop_region_for_grid(grid, 512 // 8 // patch), grid,
                                           device=xt.device, output_type="pt")
            out = denoiser(xt, t.to(xt.dtype), **cond, image_rotary_emb=rope, return_dict=False)[0]
            return out[:, : xt.shape[1]]  # the learned variance half, dropped as the pipeline does
        if self.family == "cogview4":
            # its pipeline shifts the sigmas (by its own mu) but passes the transformer the unshifted timestep: the
            # trainer's sigma x 1000 goes back through the shift, u = sigma / (s - (s - 1) sigma)
            s = noising_for(self.pipe).shift_for(xt.shape)
            sigma = t.to(torch.float64) / 1000
            u = sigma / (s - (s - 1) * sigma)
            return denoiser(hidden_states=xt, encoder_hidden_states=cond["encoder_hidden_states"],
                            timestep=(u * 1000).to(xt.dtype), original_size=cond["original_size"],
                            target_size=cond["target_size"], crop_coords=cond["crop_coords"], return_dict=False)[0]
        # Lumina2 and Z-Image run time the other way (0 is noise, 1 the image) and predict x0 - noise: their
        # pipelines negate the output before the scheduler's step, so the prediction here is negated too
        if self.family == "lumina2":
            return -denoiser(xt, timestep=1 - t.to(xt.dtype) / 1000,
                             encoder_hidden_states=cond["encoder_hidden_states"],
                             encoder_attention_mask=cond["encoder_attention_mask"], return_dict=False)[0]
        if self.family == "zimage":  # per-image lists: latents (C, 1 frame, H, W) and captions cut to their lengths
            caps = [c[:n] for c, n in zip(cond["cap_feats"], cond["cap_lens"].tolist())]
            out = denoiser(list(xt.unsqueeze(2).unbind(0)), 1 - t.to(xt.dtype) / 1000, caps, return_dict=False)[0]
            return -torch.stack(list(out)).squeeze(2)
        if self.family == "qwenimage":  # packed 2x2 patches, the timestep as a fraction, the grid's shape per image
            b, _, h, w = xt.shape
            guidance = (torch.full((b,), self._embedded_guidance(), device=xt.device, dtype=torch.float32)
                        if denoiser.config.guidance_embeds else None)
            out = denoiser(hidden_states=pack_latents(xt), timestep=t.to(xt.dtype) / 1000, guidance=guidance,
                           encoder_hidden_states=cond["encoder_hidden_states"],
                           encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
                           img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False,
                           **self._residuals(denoiser, xt, t, cond))[0]
            return unpack_latents(out, h, w)
        if self.family == "chroma":  # as Flux, with the caption mask extended over the image tokens
            b, _, h, w = xt.shape
            emb = cond["encoder_hidden_states"]
            img_ids = latent_image_ids(h // 2, w // 2, xt.device, xt.dtype)
            txt_ids = torch.zeros(emb.shape[1], 3, device=xt.device, dtype=xt.dtype)
            mask = self.pipe._prepare_attention_mask(b, (h // 2) * (w // 2), xt.dtype, cond["text_mask"])
            out = denoiser(hidden_states=pack_latents(xt), timestep=t.to(xt.dtype) / 1000, encoder_hidden_states=emb,
                           txt_ids=txt_ids, img_ids=img_ids, attention_mask=mask, return_dict=False)[0]
            return unpack_latents(out, h, w)
        if self.family == "flux":
            b, _, h, w = xt.shape
            emb = cond["encoder_hidden_states"]
            img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, xt.dtype)
            txt_ids = torch.zeros(emb.shape[1], 3, device=xt.device, dtype=xt.dtype)
            guidance = (torch.full((b,), self._embedded_guidance(), device=xt.device, dtype=torch.float32)
                        if denoiser.config.guidance_embeds else None)
            # Flux Control: the control latents beside the noisy ones (packing keeps channel order: the same tokens)
            hidden = pack_latents(torch.cat([xt, cond["concat"].to(xt.dtype)], 1) if "concat" in cond else xt)
            n = hidden.shape[1]
            if "reference" in cond:  # Kontext: the input image's tokens after the noisy ones, their ids marked 1
                ref = cond["reference"].to(xt.dtype)
                ref_ids = self.pipe._prepare_latent_image_ids(b, ref.shape[-2] // 2, ref.shape[-1] // 2, xt.device,
                                                              xt.dtype)
                ref_ids[..., 0] = 1
                hidden, img_ids = torch.cat([hidden, pack_latents(ref)], 1), torch.cat([img_ids, ref_ids])
            out = denoiser(hidden_states=hidden, timestep=t.to(xt.dtype) / 1000, guidance=guidance,
                           pooled_projections=cond["pooled_projections"], encoder_hidden_states=emb,
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
                           **self._residuals(denoiser, xt, t, cond))[0]
            return unpack_latents(out[:, :n], h, w)  # (Kontext drops the input image's outputs)
        return denoiser(hidden_states=xt, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"], return_dict=False,
                        **self._residuals(denoiser, xt, t, cond))[0]


def task_for(pipe, label_dropout: float = 0.1):
    """The task adapter of a pipeline: ``encode(batch, generator, device) -> (x0, cond)`` and
    ``predict(denoiser, x_t, t, cond) -> prediction`` (both ``(B, C, H, W)``). Raises ``UserError``
    for pipelines it does not know."""
    import inspect

    from diffslim.zoo.pipelines import ZooClassPipeline, ZooSRPipeline

    if isinstance(pipe, ZooSRPipeline):
        return _ZooSRTask(pipe)
    if isinstance(pipe, ZooClassPipeline):
        return _ZooClassTask(pipe, label_dropout)
    if getattr(pipe, "low_res_scheduler", None) is not None:  # the x4 upscaler: its U-Net takes a noise level
        raise UserError(f"no distillation task for {type(pipe).__name__} (its U-Net takes the low-resolution image and "
                        "its noise level): score its layers on its own sampling with --calibration sampling "
                        "--data inputs.jsonl")
    if "mask_image" in inspect.signature(pipe.__call__).parameters and _takes_mask_channels(pipe):
        raise UserError(f"no distillation task for {type(pipe).__name__} (an inpainting U-Net takes the mask and the "
                        "masked image's latents besides the noisy latents): score its layers on its own sampling "
                        "with --calibration sampling --data inputs.jsonl (image and mask_image per line)")
    if all(getattr(pipe, n, None) is not None for n in ("vae", "text_encoder", "tokenizer", "unet")):
        return _LatentTextTask(pipe)
    name = type(pipe).__name__
    if getattr(pipe, "transformer", None) is not None and getattr(pipe, "vae", None) is not None:
        if name.startswith("PixArt"):
            return _LatentTransformerTask(pipe, "pixart")
        if name.startswith("StableDiffusion3"):
            return _LatentTransformerTask(pipe, "sd3")
        if name in TRANSFORMER_FAMILIES:
            return _LatentTransformerTask(pipe, TRANSFORMER_FAMILIES[name])
        if name == "DiTPipeline":
            return _LatentClassTask(pipe, label_dropout)
    raise UserError(f"no distillation task for {name}: supported are the zoo pipelines, SD-style pipelines "
                     "with unet, vae, text_encoder and tokenizer (SD, SDXL, InstructPix2Pix, their ControlNet "
                     "pipelines), DiT (DiTPipeline), PixArt-alpha/sigma, Stable Diffusion 3 (and its ControlNet "
                     "pipeline), Flux (FluxPipeline, FluxControlNetPipeline, FluxControlPipeline, "
                     "FluxKontextPipeline), Sana "
                     "(SanaPipeline), AuraFlow "
                     "(AuraFlowPipeline), CogView4 (CogView4Pipeline), HunyuanDiT (HunyuanDiTPipeline), Lumina2 "
                     "(Lumina2Pipeline), Z-Image (ZImagePipeline), Qwen-Image (QwenImagePipeline, "
                     "QwenImageControlNetPipeline) and Chroma "
                     "(ChromaPipeline), and their "
                     "image-to-image and inpainting "
                     "pipelines that call the denoiser as these do (" + ", ".join(
                         n for n in TRANSFORMER_FAMILIES
                         if ("Img2Img" in n or "Inpaint" in n) and "ControlNet" not in n)
                     + "); layer-prune "
                     "scores any pipeline's layers on its own sampling instead: --calibration sampling --data FILE")


@dataclass
class Noising:
    """How a pipeline's denoiser was trained to be noised: timesteps, noisy inputs and the target.

    ``kind`` "ddpm": integer timesteps in ``[0, T)``, ``x_t = add_noise(x0, eps, t)`` with the pipeline's
    noise schedule, the target by ``prediction_type`` (noise, velocity or sample). "flow": rectified flow
    (FlowMatchEulerDiscreteScheduler: SD3, Flux): ``sigma`` in (0, 1), shifted as the scheduler shifts its
    sampling sigmas (``shift * u / (1 + (shift - 1) * u)``), ``x_t = (1 - sigma) x0 + sigma eps``, the
    target ``eps - x0`` and the denoiser's timestep ``sigma * T``. With ``dynamic`` (Flux's
    ``use_dynamic_shifting``: ``(base_seq_len, max_seq_len, base_shift, max_shift, time_shift_type)``) the
    shift depends on the image's token count ``(H / patch) * (W / patch)`` of the latents, as the
    pipeline computes ``mu``: ``exp(mu)`` for the exponential time shift, ``mu`` for the linear one (the
    scheduler's ``time_shift`` is then exactly the fixed-shift formula).
    """

    kind: str
    T: int
    sched: object = None
    shift: float = 1.0
    dynamic: Optional[tuple] = None
    patch: int = 2
    # how ``dynamic`` turns the token count into mu: "interpolate" (Flux's calculate_shift, linear between the
    # base and max shifts) or "sqrt" (CogView4's, sqrt(tokens / base_seq_len) * max_shift + base_shift)
    mu_rule: str = "interpolate"

    def shift_for(self, shape: Optional[Sequence[int]] = None) -> float:
        """The shift for latents of ``shape`` (``(..., H, W)``; needed with ``dynamic``)."""
        if self.dynamic is None:
            return self.shift
        if shape is None:
            raise ValueError("dynamic shifting needs the latents' shape")
        base_seq, max_seq, base_shift, max_shift, kind = self.dynamic
        seq = (int(shape[-2]) // self.patch) * (int(shape[-1]) // self.patch)
        if self.mu_rule == "sqrt":
            mu = (seq / base_seq) ** 0.5 * max_shift + base_shift
        else:
            mu = base_shift + (max_shift - base_shift) * (seq - base_seq) / (max_seq - base_seq)
        return math.exp(mu) if kind == "exponential" else mu

    def shifted(self, u: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Flow sigmas: uniform ``u`` in (0, 1] shifted as the scheduler shifts its sampling sigmas."""
        shift = self.shift_for(shape)
        return shift * u / (1 + (shift - 1) * u)

    def timesteps(self, n: int, g: torch.Generator, stratified: bool = False,
                  shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``n`` denoiser timesteps: uniform, or stratified (one in each of ``n`` equal bins); ``shape``: the
        latents' shape, for dynamic shifting."""
        if self.kind == "ddpm":
            if stratified:
                return ((torch.arange(n) + torch.rand(n, generator=g)) * self.T / n).long().clamp(0, self.T - 1)
            return torch.randint(0, self.T, (n,), generator=g)
        u = (torch.arange(n) + torch.rand(n, generator=g)) / n if stratified else torch.rand(n, generator=g)
        return self.shifted(u.clamp(1e-4, 1.0), shape) * self.T

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)`` for clean ``x0``, ``noise`` and timesteps ``t``."""
        if self.kind == "flow":
            sigma = (t.float() / self.T).view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
            return (1 - sigma) * x0 + sigma * noise, noise - x0
        xt = self.sched.add_noise(x0, noise, t)
        ptype = self.sched.config.prediction_type
        if ptype == "epsilon":
            return xt, noise
        if ptype == "v_prediction":
            return xt, self.sched.get_velocity(x0, noise, t)
        return xt, x0


def noising_for(pipe) -> Noising:
    """The :class:`Noising` of ``pipe``'s scheduler (flow matching for SD3's and Flux's, DDPM-style otherwise)."""
    from diffusers import DDPMScheduler

    cfg = pipe.scheduler.config
    if cfg.get("use_flow_sigmas") and cfg.get("prediction_type") == "flow_prediction":
        # DPM-Solver on flow sigmas (Sana's released scheduler): the same rectified flow, shifted by flow_shift
        return Noising("flow", int(cfg.get("num_train_timesteps", 1000)), shift=float(cfg.get("flow_shift", 1.0)))
    if "FlowMatch" in type(pipe.scheduler).__name__:
        T = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("use_dynamic_shifting", False):
            kind = cfg.get("time_shift_type", "exponential")
            if kind not in ("exponential", "linear"):
                raise UserError(f"time_shift_type {kind!r} is not supported for training: accepted exponential, linear")
            # Flux and Chroma pack 2x2 latent patches into a token; other transformers patch by their patch_size
            den = getattr(pipe, "transformer", None)
            packed = "Flux" in type(pipe).__name__ or type(pipe).__name__.startswith("Chroma")
            patch = 2 if packed else int(getattr(getattr(den, "config", None), "patch_size", 2) or 2)
            dyn = (int(cfg.get("base_image_seq_len", 256)), int(cfg.get("max_image_seq_len", 4096)),
                   float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15)), kind)
            # CogView4's pipeline computes mu by its own rule (its calculate_shift)
            rule = "sqrt" if type(pipe).__name__.startswith("CogView4") else "interpolate"
            return Noising("flow", T, dynamic=dyn, patch=patch, mu_rule=rule)
        return Noising("flow", T, shift=float(cfg.get("shift", 1.0)))
    sched = DDPMScheduler.from_config(cfg)
    return Noising("ddpm", int(sched.config.num_train_timesteps), sched)


# ------------------------------------------------------------------------------------------
# Determinism: batches and randomness as functions of (seed, step, process)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2 ** 63))


class _EpochOrder:
    """Sample order without replacement, one seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, None, None

    def __call__(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_seed_of(self.seed, 1, epoch)))
        return int(self._perm[position % self.n])


def batch_indices(order: _EpochOrder, step: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Dataset indices of process ``rank``'s batch at ``step``: the ``rank``-th slice of the global batch."""
    start = (step * world + rank) * batch_size
    return [order(start + j) for j in range(batch_size)]


# ------------------------------------------------------------------------------------------
# Checkpointed state that is not a model or an optimizer


def _export(model: nn.Module, ema: Optional["_EMA"], dtype: torch.dtype, folder: Path, main: bool) -> None:
    """Save ``model`` with the EMA's weights (if any) in ``dtype``, and give it back its trained float32 tensors.

    The EMA's tensors are swapped in rather than the trained ones cloned aside (a student-sized copy less; the
    export needs no memory beyond a ``dtype`` copy, none in float32), and the trained tensors are put back as they
    were, not converted back from ``dtype`` (which rounded them where there was no EMA)."""
    params = [(m, name, p, p.data) for m in model.modules() for name, p in m._parameters.items() if p is not None]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        if ema is not None:
            names = {id(p): n for n, p in model.named_parameters()}  # a tied weight appears once, under its first name
            for _, _, p, _ in params:
                p.data = ema.shadow[names[id(p)]]
        if dtype != torch.float32:
            model.to(dtype)
        model.save_pretrained(str(folder), is_main_process=main, safe_serialization=True)
    finally:
        for m, name, p, data in params:
            m._parameters[name] = p
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b


class _EMA:
    """Exponential moving average of a model's parameters, with zoo training's warm-up ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


class _RunState:
    """Where the run is: the global step, the running sums of the current log window, the settings that fix the data."""

    def __init__(self, cfg: DistillConfig, world: int):
        self.step = 0
        self.sums = torch.zeros(len(_TERMS), dtype=torch.float64)
        self.count = 0
        self.last_logged: dict = {}
        self.feat_scale: Optional[float] = None  # set once, before step 0, with match_plain_weight
        self.settings = {"seed": cfg.seed, "batch_size": cfg.batch_size, "num_processes": world, "steps": cfg.steps}

    def state_dict(self) -> dict:
        return {"step": self.step, "sums": self.sums.clone(), "count": self.count,
                "last_logged": dict(self.last_logged), "settings": dict(self.settings), "feat_scale": self.feat_scale}

    def load_state_dict(self, state: dict) -> None:
        saved = state["settings"]
        for key in ("seed", "batch_size", "num_processes"):
            if saved[key] != self.settings[key]:
                raise UserError(f"the checkpoint was made with {key}={saved[key]}, this run has "
                                 f"{key}={self.settings[key]}: use the same setting to resume, or a fresh out folder")
        if saved["steps"] != self.settings["steps"] and int(state["step"]) <= self.settings["steps"]:
            logger.warning("resuming a run planned for %d steps with steps=%d: the LR schedule changes from here",
                           saved["steps"], self.settings["steps"])
        self.step, self.count = int(state["step"]), int(state["count"])
        self.sums = state["sums"].clone()
        self.last_logged = dict(state["last_logged"])
        self.feat_scale = state.get("feat_scale")


def _plain_to_normalized(inputs, task, teacher, student, feats_t, feats_s, cfg: DistillConfig, accelerator) -> float:
    """``sum P_l / sum N_l`` of the untrained student over the batches of steps ``0 .. weight_batches-1`` (all processes)."""
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), accelerator.autocast():
        for step in range(min(cfg.weight_batches, cfg.steps)):
            xt, t, cond, _ = inputs(step)
            feats_t.clear()
            feats_s.clear()
            task.predict(teacher, xt, t, cond)
            task.predict(student, xt, t, cond)
            sums[0] += float(feature_loss(feats_t, feats_s, normalized=False))
            sums[1] += float(feature_loss(feats_t, feats_s, normalized=True, eps=cfg.feat_eps,
                                          per_sample=cfg.feat_norm == "sample"))
    feats_t.clear()
    feats_s.clear()
    plain, norm = accelerator.reduce(sums.to(accelerator.device), "sum").cpu().tolist()
    if not norm > 0:
        logger.warning("the student matches the teacher at every distilled feature: match_plain_weight keeps lambda_feat")
        return 1.0
    scale = plain / norm
    logger.info("match_plain_weight: feature weight x%.4g (plain %.4g / normalized %.4g)", scale, plain, norm)
    return scale


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (``complete.json`` written after ``save_state``), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / "complete.json").is_file() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def _untie(student: nn.Module, teacher: nn.Module) -> None:
    """Give the student its own copy of every tensor it shares with the teacher (depth_skip shares them)."""
    shared = {t.untyped_storage().data_ptr() for t in list(teacher.parameters()) + list(teacher.buffers())}
    for module in student.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.untyped_storage().data_ptr() in shared:
                p.data = p.data.clone()
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.untyped_storage().data_ptr() in shared:
                module._buffers[name] = b.clone()


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------
# The loop


# settings a resumed run may change: how long it runs, how often it logs and checkpoints, how it reports
_RESUMABLE = ("out", "steps", "stop_at", "checkpoint_every", "log_every", "keep_checkpoints", "progress", "log_with",
              "gradient_checkpointing", "find_unused_parameters")


def _check_student_fits(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse, before any training, a student of another kind than the teacher (its class or its input and output
    channels differ): it could not take the teacher's inputs, or predict what the teacher predicts; and a teacher
    or student with LoRAs or an IP-Adapter loaded."""
    for who, model in (("teacher", teacher), ("student", student)):
        # a pruned copy keeps the LoRA layers of the model it came from as the same objects: training one would
        # train the other
        if getattr(model, "peft_config", None):
            raise UserError(f"the {who} has LoRAs loaded ({', '.join(model.peft_config)}): distil without them "
                            "(pipe.unload_lora_weights()), then adapt each LoRA to the student with diffslim lora")
        # its processors would be shared the same way, and the trainer passes no image embeddings
        if ip_adapter_loaded(model):
            raise UserError(f"the {who} has an IP-Adapter loaded: distil without it (pipe.unload_ip_adapter()); "
                            "the pruned student loads the original IP-Adapter afterwards")
    t_cls, s_cls = diffusers_base(type(teacher)), diffusers_base(type(student))
    t_cfg, s_cfg = getattr(teacher, "config", {}), getattr(student, "config", {})
    keys = ("in_channels", "out_channels", "cross_attention_dim", "num_embeds_ada_norm", "class_embed_type")
    diff = [k for k in keys if k in t_cfg and t_cfg.get(k) != s_cfg.get(k)]
    if t_cls is not s_cls or diff:
        what = f"{s_cls.__name__}" if t_cls is not s_cls else ", ".join(f"{k}={s_cfg.get(k)}" for k in diff)
        want = f"{t_cls.__name__}" if t_cls is not s_cls else ", ".join(f"{k}={t_cfg.get(k)}" for k in diff)
        raise UserError(f"the student ({what}) does not fit the teacher ({want}): give a student made from this "
                        "teacher (layer-prune, depth-skip, or a model of the same kind)")


def _signature(model: nn.Module) -> str:
    """A digest of ``model``'s parameter names and shapes: which student a run trains."""
    import hashlib

    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _weights_digest(model: nn.Module) -> str:
    """A digest of ``model``'s weights (each tensor's sum and absolute sum to 6 digits): which teacher a run
    distils. Robust to the device and the order of summation, not to a change of the weights."""
    import hashlib

    with torch.no_grad():
        text = ";".join(f"{k}:{float(v.double().sum()):.6g}:{float(v.double().abs().sum()):.6g}"
                        for k, v in model.state_dict().items() if v.is_floating_point())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _data_digest(dataset) -> str:
    """What identifies a run's training data: the dataset's kind and size, and a folder's path and file names."""
    import hashlib

    parts = [type(dataset).__name__, str(len(dataset))]
    if getattr(dataset, "root", None) is not None:
        parts.append(str(Path(dataset.root).resolve()))
    parts += [Path(f).name for f in getattr(dataset, "files", None) or ()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _check_resume(out: Path, cfg: DistillConfig, student: nn.Module, teacher: nn.Module, dataset) -> None:
    """Refuse to resume the run in ``out`` with another student, teacher, training data or other training settings
    (``distill.json`` of its first start records them): its checkpoints would not load, or would continue another
    run's training."""
    record = out / "distill.json"
    if not record.is_file():
        return
    saved = json.loads(record.read_text())
    if saved.get("student_signature") not in (None, _signature(student)):
        raise UserError(f"{out} holds checkpoints of another student ({saved.get('student')}, other layers or shapes): "
                        "resume it with the same student, or give a fresh out folder")
    if saved.get("teacher_weights") not in (None, _weights_digest(teacher)):
        raise UserError(f"{out} holds checkpoints of a run that distilled another teacher (other weights): resume "
                        "it with the same teacher, or give a fresh out folder")
    if saved.get("data") not in (None, _data_digest(dataset)):
        raise UserError(f"{out} holds checkpoints of a run on other training data ({saved.get('data_kind')}): resume "
                        "it with the same --data, or give a fresh out folder")
    now = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    now = json.loads(json.dumps(now, default=str))  # the form distill.json stores (tuples as lists)
    diff = [k for k, v in saved.get("config", {}).items() if k not in _RESUMABLE and k in now and now[k] != v]
    if diff:
        raise UserError(f"{out} was started with " + ", ".join(f"{k}={saved['config'][k]}" for k in diff)
                        + "; this run has " + ", ".join(f"{k}={now[k]}" for k in diff)
                        + ": resume it with the same settings, or give a fresh out folder")


def distill(teacher_pipe, student: nn.Module, dataset, cfg: DistillConfig, label: str = "distill") -> DistillResult:
    """Train ``student`` to match the denoiser of ``teacher_pipe`` on ``dataset``; resumes from ``cfg.out``.
    ``label``: the progress bar's and the stop message's (``finetune`` for depth-skip fine-tuning).

    ``teacher_pipe``: a zoo pipeline or an SD-style pipeline; its denoiser (``unet``/``transformer``/
    ``denoiser``) is the frozen teacher and its other components encode the data (see ``task_for``).
    ``student``: a denoiser with the teacher's call signature, e.g. ``depth_skip(teacher, N)``; it
    is trained in place (in float32) after any tensor it shares with the teacher is copied, so the
    teacher never changes. ``dataset``: indexable, samples as in ``diffslim.train.data`` (``image``
    ``(C, H, W)`` in [0, 1], plus ``label``, ``text`` or ``cond`` as the task needs).

    Writes ``out/train_log.csv`` (step,loss,task,out,feat,lr: window means every ``log_every``
    steps and at the end), ``out/checkpoints/step_N`` (``accelerator.save_state``: student, AdamW,
    LR schedule, EMA, run state, RNG; the newest complete one is resumed), ``out/student``
    (``save_pretrained``, EMA weights if enabled, in the student's original dtype) and
    ``out/distill.json`` (settings and the distilled features).
    """
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from diffslim import launch

    cfg.check()
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():  # Accelerate would train in float32, silently
        raise UserError("mixed_precision (--mixed-precision) 'fp16' needs a CUDA GPU and torch sees none: give 'no', "
                        "or 'bf16' (which CPUs run)")
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    tensorboard = cfg.log_with == "tensorboard" and _tensorboard_available()
    if cfg.log_with == "tensorboard" and not tensorboard:
        logger.warning("tensorboard is not installed: logging to CSV only")
    accelerator = launch.accelerator(cfg.mixed_precision, log_with="tensorboard" if tensorboard else None,
                                     project_dir=str(out), kwargs_handlers=[DistributedDataParallelKwargs(
                                         find_unused_parameters=cfg.find_unused_parameters)])
    set_seed(cfg.seed)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes

    # --- models: a frozen teacher, a student with weights of its own
    teacher = _denoiser_of(teacher_pipe)
    _check_student_fits(teacher, student)
    if student is teacher:
        student = copy.deepcopy(teacher)
    _untie(student, teacher)
    components = [m for m in teacher_pipe.components.values() if isinstance(m, nn.Module)]
    # the caller's pipeline gets its train/eval modes and requires_grad flags back at the end
    saved_flags = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in components]
    for m in components:
        m.requires_grad_(False).eval()
    # the teacher's pipeline trains on the accelerator and goes back to its own device at the end (a bench on the
    # CPU keeps sampling its other methods there)
    home = next(teacher.parameters()).device
    teacher_pipe.to(device)
    save_dtype = next(student.parameters()).dtype
    if save_dtype != torch.float32:
        student.to(torch.float32)
    student.requires_grad_(True)
    # eval mode: diffusers denoisers have no batch norm and no dropout by default, and DiT's label
    # embedding drops labels by itself in training mode, which would desynchronise student and teacher.
    student.eval()
    if cfg.gradient_checkpointing:
        if getattr(student, "_supports_gradient_checkpointing", False):
            student.enable_gradient_checkpointing()
        else:
            logger.warning("%s does not support gradient checkpointing; training without", type(student).__name__)

    need_teacher = bool(cfg.lambda_out or cfg.lambda_feat)
    features: dict = {}
    feats_t: dict = {}
    feats_s: dict = {}
    try:
        features = select_features(teacher, student, cfg.features) if cfg.lambda_feat else {}
        add_feature_taps(teacher, list(features.values()), feats_t, keys=list(features))
        add_feature_taps(student, list(features), feats_s)
        task = task_for(teacher_pipe, cfg.label_dropout)
        noising = noising_for(teacher_pipe)

        # --- optimizer, schedule, EMA, run state; Accelerate prepares and checkpoints them
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup if cfg.warmup is not None else min(200, cfg.steps // 10)

        def lr_factor(s: int) -> float:
            return min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps))))

        # The schedule is stepped by hand once per global step (a prepared scheduler steps once per
        # process), so the LR is a function of the step alone; it is checkpointed as a custom object.
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        model, opt = accelerator.prepare(student, opt)
        unwrapped = accelerator.unwrap_model(model)
        ema = _EMA(unwrapped, cfg.ema_decay) if cfg.ema_decay is not None else None
        state = _RunState(cfg, world)
        accelerator.register_for_checkpointing(lr_sched, state, *([ema] if ema is not None else []))

        existing = _checkpoints(ckpt_root)
        if existing:
            _check_resume(out, cfg, unwrapped, teacher, dataset)
            accelerator.load_state(str(existing[-1]))
            if state.step > cfg.steps:  # it would export the longer run's student as this one's
                raise UserError(f"{out} holds a run trained to step {state.step}, past --steps {cfg.steps}: give "
                                f"--steps {state.step} or more to go on from it, or another --out")
            say(accelerator, f"resumed from {existing[-1]} at step {state.step}")
        order = _EpochOrder(len(dataset), cfg.seed)

        def inputs(step: int):
            """The batch of ``step`` on this process, a pure function of (seed, step, process)."""
            batch = collate([dataset[i] for i in batch_indices(order, step, cfg.batch_size, rank, world)])
            g = torch.Generator().manual_seed(_seed_of(cfg.seed, 2, step, rank))
            # the data in float32 even under mixed precision (and inside the autocast of _plain_to_normalized): zoo:sr's
            # target is a difference of nearly equal images, 13 % of its spread wrong when bfloat16 convolutions make
            # it, and SDXL's VAE overflows in float16; diffusers' training scripts keep that VAE in float32 too
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                x0, cond = task.encode(batch, g, device)
            x0 = x0.float()
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = noising.timesteps(x0.shape[0], g, shape=x0.shape).to(device)
            xt, target = noising.noisy(x0, noise, t)
            extra = getattr(task, "extra_cond", None)
            return xt, t, ({**cond, **extra(xt, t, cond)} if extra is not None else cond), target

        if cfg.match_plain_weight and state.feat_scale is None:  # the prepared model: FSDP gathers its shards
            state.feat_scale = _plain_to_normalized(inputs, task, teacher, model, feats_t, feats_s, cfg,
                                                    accelerator) if features else 1.0
        feat_weight = cfg.lambda_feat * (state.feat_scale if state.feat_scale is not None else 1.0)
        start = state.step
        end = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps

        log_path = out / "train_log.csv"
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            rows = []
            if start > 0 and log_path.is_file():  # drop rows written after the checkpoint we resume from
                with open(log_path) as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
            with open(log_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", *_TERMS, "lr"])
                w.writeheader()
                w.writerows(rows)
            (out / "distill.json").write_text(json.dumps(
                {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                 "features": features, "feat_scale": state.feat_scale, "num_processes": world, "teacher": type(teacher).__name__,
                 "student": type(unwrapped).__name__, "student_signature": _signature(unwrapped),
                 "teacher_weights": _weights_digest(teacher), "data": _data_digest(dataset),
                 "data_kind": f"{type(dataset).__name__} of {len(dataset)}"}, indent=2,
                default=str))
            if tensorboard:
                accelerator.init_trackers("distill", config={k: v for k, v in asdict(cfg).items()
                                                             if isinstance(v, (int, float, str, bool))})
        accelerator.wait_for_everyone()

        progress = None
        if cfg.progress and accelerator.is_local_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=end, initial=start, desc=label, dynamic_ncols=True)

        stopped = False
        with StopOnSignal(label) as stop:  # Ctrl-C or SIGTERM: a checkpoint at this step
            for step in range(start, end):
                xt, t, cond, target = inputs(step)

                # --- teacher and student predictions, features captured by the taps
                feats_t.clear()
                feats_s.clear()
                if need_teacher:
                    with torch.no_grad(), accelerator.autocast():
                        pred_t = task.predict(teacher, xt, t, cond)
                with accelerator.autocast():
                    pred_s = task.predict(model, xt, t, cond)
                task_l = F.mse_loss(pred_s.float(), target.float())
                zero = task_l.new_zeros(())
                out_l = F.mse_loss(pred_s.float(), pred_t.float()) if need_teacher else zero
                feat_l = (feature_loss(feats_t, feats_s, cfg.normalized, cfg.feat_eps, cfg.feat_norm == "sample").to(device)
                          if features else zero)
                loss = cfg.lambda_task * task_l + cfg.lambda_out * out_l + feat_weight * feat_l

                # --- update
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                lr_now = lr_sched.get_last_lr()[0]
                opt.step()
                lr_sched.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(unwrapped)

                # --- log: every process holds the same window sums (reduced across processes each step)
                terms = accelerator.reduce(torch.stack([loss, task_l, out_l, feat_l]).detach().float(), "mean")
                state.sums += terms.cpu().double()
                state.count += 1
                state.step = step + 1
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    means = (state.sums / state.count).tolist()
                    state.last_logged = dict(zip(_TERMS, means))
                    state.sums.zero_()
                    state.count = 0
                    if accelerator.is_main_process:
                        with open(log_path, "a", newline="") as f:
                            csv.writer(f).writerow([state.step, *(f"{v:.6g}" for v in means), f"{lr_now:.6g}"])
                    if tensorboard:
                        accelerator.log({**state.last_logged, "lr": lr_now}, step=state.step)
                    if progress is not None:
                        progress.set_postfix(loss=f"{means[0]:.4f}")
                if progress is not None:
                    progress.update(1)

                # --- checkpoint (always at the end of this call, or on a signal, so a stopped run resumes)
                stopped = stop.requested(accelerator) and state.step < end
                if state.step % cfg.checkpoint_every == 0 or state.step == end or stopped:
                    path = ckpt_root / f"step_{state.step}"
                    accelerator.save_state(str(path))
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        (path / "complete.json").write_text(json.dumps({"step": state.step}))
                        for old in _checkpoints(ckpt_root)[:-max(1, cfg.keep_checkpoints)]:
                            shutil.rmtree(old, ignore_errors=True)
                    accelerator.wait_for_everyone()
                if stopped:
                    break
        if progress is not None:
            progress.close()
        if stopped:
            raise Interrupted(label, stop.signum, state.step, cfg.steps, ckpt_root / f"step_{state.step}")

        if state.count:  # stopped inside a log window: report the partial window
            final = dict(zip(_TERMS, (state.sums / state.count).tolist()))
        else:
            final = dict(state.last_logged)

        # --- export: EMA weights (if any) in the original dtype; the student keeps its trained weights
        accelerator.wait_for_everyone()
        if state.step >= cfg.steps:
            _export(unwrapped, ema, save_dtype, out / "student", accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if tensorboard:
            accelerator.end_training()
    finally:
        remove_feature_taps(teacher, list(features.values()))
        remove_feature_taps(student, list(features))
        for m, training, flags in saved_flags:
            m.train(training)
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)
        if next(teacher.parameters()).device != home:
            teacher_pipe.to(home)
    return DistillResult(out_dir=out, steps=state.step, final_losses=final, log_path=log_path,
                         feat_scale=state.feat_scale if state.feat_scale is not None else 1.0)
