"""Pipelines of the reference zoo: ordinary diffusers ``DiffusionPipeline`` subclasses.

Two tasks cover what the methods need from a test bed:

* ``ZooClassPipeline``: class-conditional generation (the digit models). The denoiser is either a
  ``UNet2DConditionModel`` conditioned through cross-attention on label tokens (a miniature Stable
  Diffusion) or a class-conditional ``DiTTransformer2DModel``. Classifier-free guidance as in SD.
* ``ZooSRPipeline``: image-to-image super-resolution in the InstructPix2Pix/StableSR style: the
  low-resolution image, upsampled bicubically, is concatenated to the noisy input channels. The
  denoised quantity is the residual ``(HR - bicubic(LR)) * residual_scale``.

Both accept ``num_inference_steps`` or an explicit descending ``timesteps`` list and return images in
[0, 1] (``output_type="pt"``: float tensor ``(B, C, H, W)``; ``"np"``: ``(B, H, W, C)``; ``"pil"``).
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

from diffslim.errors import UserError


class LabelTokenEncoder(ModelMixin, ConfigMixin):
    """The miniature "text encoder": a label id -> a short sequence of token embeddings.

    Returns ``(B, num_tokens, dim)``: a learned start token (as CLIP has) followed by the label's
    own tokens. Label ``num_labels`` is the null label used for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, num_labels: int = 10, dim: int = 32, num_tokens: int = 2):
        super().__init__()
        self.start = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.embed = torch.nn.Embedding(num_labels + 1, dim * (num_tokens - 1))

    @property
    def null_label(self) -> int:
        return self.config.num_labels

    def forward(self, labels: torch.LongTensor) -> torch.Tensor:
        b = labels.shape[0]
        tok = self.embed(labels).view(b, self.config.num_tokens - 1, self.config.dim)
        return torch.cat([self.start.expand(b, -1, -1).to(tok.dtype), tok], dim=1)


class LinearUpsampler(ModelMixin, ConfigMixin):
    """A fixed linear ``scale``x upsampler: bicubic, then a ``kernel_size`` x ``kernel_size`` filter per output
    phase (``scale**2`` filters shared by the colour channels), fitted by least squares to undo the training
    degradation (see ``diffslim.train.zoo.fit_upsampler``). zoo:sr samples the residual over its output.

    ``(B, C, h, w)`` in [0, 1] -> ``(B, C, scale*h, scale*w)`` clamped to [0, 1]. Initialised to the identity
    filter: then it is plain bicubic upsampling.

    Its weights stay float32 when the pipeline loads in half precision (``_keep_in_fp32_modules``): the fitted
    filters sum to |w| ~ 16 per phase and amplify bfloat16's rounding (zoo:sr lost 1 dB against the ground truth).
    """

    _keep_in_fp32_modules = ["weight", "bias"]

    @register_to_config
    def __init__(self, scale: int = 2, kernel_size: int = 9):
        super().__init__()
        w = torch.zeros(scale * scale, 1, kernel_size, kernel_size)
        w[:, 0, kernel_size // 2, kernel_size // 2] = 1.0
        self.weight = torch.nn.Parameter(w, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(scale * scale), requires_grad=False)

    def phase_responses(self, up: torch.Tensor) -> torch.Tensor:
        """Every phase's filter applied to every pixel of bicubic images ``(B, C, H, W)`` -> ``(B, C, P, H, W)``."""
        b, c, h, w = up.shape
        k = self.config.kernel_size
        x = F.pad(up.reshape(b * c, 1, h, w), (k // 2,) * 4, mode="reflect")
        y = F.conv2d(x, self.weight.to(up.dtype), self.bias.to(up.dtype))
        return y.view(b, c, -1, h, w)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        s = self.config.scale
        up = F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False)
        y = self.phase_responses(up)
        h, w = up.shape[-2:]
        rows = torch.arange(h, device=up.device) % s
        cols = torch.arange(w, device=up.device) % s
        phase = (rows[:, None] * s + cols[None, :]).expand(up.shape[0], up.shape[1], 1, h, w)
        return y.gather(2, phase).squeeze(2).clamp(0, 1)


def _component_class(library: str, class_name: str):
    """A component class from model_index.json: diffusers', ours (zoo components, depth-skipped U-Nets)."""
    import importlib

    import diffusers

    if library == "diffusers":
        return getattr(diffusers, class_name)
    if class_name in globals():
        return globals()[class_name]
    if library.split(".")[0] == "diffslim":
        return getattr(importlib.import_module(library), class_name)
    raise ValueError(f"component class {library}.{class_name} is neither diffusers' nor diffslim's")


def load_zoo_pipeline(cls, folder, torch_dtype=torch.float32):
    """Load a zoo pipeline folder written by ``save_pretrained``, component by component (safetensors only).

    diffusers' own ``from_pretrained`` resolves component libraries by top-level package name; ours
    live in ``diffslim.zoo.pipelines``, so the components are loaded here explicitly.
    """
    import json
    from pathlib import Path

    import diffusers

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    for key, value in index.items():
        if key.startswith("_") or key not in params:
            continue
        if isinstance(value, list) and len(value) == 2:
            library, class_name = value
            if class_name is None:
                kwargs[key] = None
                continue
            comp_cls = _component_class(library, class_name)
            if hasattr(comp_cls, "from_pretrained") and issubclass(comp_cls, ModelMixin):
                kwargs[key] = comp_cls.from_pretrained(str(folder / key), dtype=torch_dtype, use_safetensors=True)
            else:
                kwargs[key] = comp_cls.from_pretrained(str(folder / key))
        else:
            kwargs[key] = value
    return cls(**kwargs)


def save_zoo_pipeline(pipe, folder) -> None:
    """``save_pretrained`` plus the components diffusers does not know how to save (ours)."""
    from pathlib import Path

    DiffusionPipeline.save_pretrained(pipe, str(folder), safe_serialization=True)
    for name in ("cond_encoder", "upsampler"):
        component = getattr(pipe, name, None)
        if component is not None:
            component.save_pretrained(str(Path(folder) / name), safe_serialization=True)


class _ZooPipelineIO:
    """Folder I/O of zoo pipelines: ``save_pretrained``/``from_pretrained`` that include our own components."""

    def save_pretrained(self, save_directory, **kwargs):
        save_zoo_pipeline(self, save_directory)

    @classmethod
    def from_pretrained(cls, folder, torch_dtype=torch.float32, **kwargs):
        return load_zoo_pipeline(cls, folder, torch_dtype=torch_dtype)


def _set_timesteps(scheduler, num_inference_steps, timesteps, device):
    """Set the scheduler's schedule from a step count or an explicit descending timestep list."""
    if timesteps is not None:
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(
                f"{type(scheduler).__name__}.set_timesteps accepts no explicit timesteps; "
                "use a scheduler that does (e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler)"
            )
        scheduler.set_timesteps(timesteps=list(int(t) for t in timesteps), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps


def _to_output(images: torch.Tensor, output_type: str):
    images = images.clamp(0, 1).float().cpu()
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        arr = (arr * 255).round().astype(np.uint8)
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
    raise ValueError(f"output_type {output_type!r} is not one of 'pt', 'np', 'pil'")


def _class_labels(class_labels, null_label: int, repeat: int) -> list[int]:
    """``class_labels`` (an int, a digit string such as ``"3"``, a tensor or a sequence of them) as a list of ints in
    ``0 .. null_label`` (``null_label``: no class, as an image prompt alone samples), each ``repeat`` times in a row."""
    if torch.is_tensor(class_labels):
        items = class_labels.flatten().tolist()
    elif isinstance(class_labels, (int, str, np.integer)):
        items = [class_labels]
    else:
        items = list(class_labels)
    labels = []
    for c in items:
        c = int(c) if isinstance(c, str) and c.strip().isdigit() else c
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) <= null_label:
            raise UserError(f"class_labels: give classes 0..{null_label - 1}, or {null_label} for none (an int, a "
                            f"digit string such as '3', or a list of them); got {c!r}")
        labels += [int(c)] * repeat
    return labels


def _lr_images(image) -> torch.Tensor:
    """The SR pipeline's input as a (B, 3, h, w) tensor in [0, 1]: such a tensor, a (3, h, w) one, or PIL images."""
    from PIL import Image

    if isinstance(image, Image.Image) or (isinstance(image, (list, tuple)) and image
                                          and all(isinstance(i, Image.Image) for i in image)):
        images = [image] if isinstance(image, Image.Image) else list(image)
        return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                            for i in images])
    if torch.is_tensor(image) and image.ndim in (3, 4) and image.shape[-3] == 3:
        return image[None] if image.ndim == 3 else image
    shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
    raise UserError(f"image: give low-resolution RGB images as a (B, 3, h, w) or (3, h, w) tensor in [0, 1] or as PIL "
                    f"images; got {shape}")


class ZooClassPipeline(_ZooPipelineIO, DiffusionPipeline):
    """Class-conditional pixel-space diffusion with classifier-free guidance.

    ``denoiser`` is a ``UNet2DConditionModel`` (then ``cond_encoder`` gives its cross-attention
    tokens) or a ``DiTTransformer2DModel`` (then ``cond_encoder`` is None and labels go in as
    ``class_labels``; its null class is ``num_embeds_ada_norm``).
    """

    model_cpu_offload_seq = "denoiser"

    def __init__(self, denoiser, scheduler, cond_encoder: Optional[LabelTokenEncoder] = None):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler, cond_encoder=cond_encoder)

    @property
    def null_label(self) -> int:
        if self.cond_encoder is not None:
            return self.cond_encoder.null_label
        return self.denoiser.config.num_embeds_ada_norm

    def predict_noise(self, x: torch.Tensor, t, labels: torch.LongTensor,
                      image_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One denoiser call: ``x`` (B, C, H, W), ``labels`` (B,) -> epsilon (B, C, H, W). ``image_embeds`` (B, D):
        the image prompts of an IP-Adapter loaded into the denoiser (``denoiser._load_ip_adapter_weights``)."""
        tt = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        if self.cond_encoder is not None:
            ctx = self.cond_encoder(labels).to(x.dtype)
            extra = {} if image_embeds is None else {"added_cond_kwargs": {"image_embeds": [image_embeds[:, None]]}}
            return self.denoiser(x, tt, encoder_hidden_states=ctx, **extra).sample
        if image_embeds is not None:
            raise UserError("image_embeds need a cross-attention denoiser with an IP-Adapter loaded")
        return self.denoiser(x, tt, class_labels=labels).sample

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, Sequence[int]],
        num_inference_steps: int = 50,
        timesteps: Optional[Sequence[int]] = None,
        guidance_scale: float = 3.0,
        generator: Optional[Union[torch.Generator, list]] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        image_embeds: Optional[torch.Tensor] = None,
        num_images_per_prompt: int = 1,
    ):
        """Sample digits ``class_labels`` (an int, a digit string such as ``"3"`` or a list of them; each
        ``num_images_per_prompt`` times). ``image_embeds`` (B, D): image prompts for an IP-Adapter loaded into the
        denoiser; classifier-free guidance then gives the unconditional half zero embeddings (diffusers'
        negative image embedding) and the null label."""
        labels = _class_labels(class_labels, self.null_label, num_images_per_prompt)
        if image_embeds is not None and num_images_per_prompt > 1:
            image_embeds = image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        device = self._execution_device
        cfg = self.denoiser.config
        size = cfg.sample_size
        channels = cfg.in_channels
        dtype = self.denoiser.dtype
        labels_t = torch.tensor(labels, device=device, dtype=torch.long)
        if image_embeds is not None:
            image_embeds = image_embeds.to(device=device, dtype=dtype)
        if latents is None:
            latents = randn_tensor((len(labels), channels, size, size), generator=generator, device=device, dtype=dtype)
        x = latents * self.scheduler.init_noise_sigma
        ts = _set_timesteps(self.scheduler, num_inference_steps, timesteps, device)
        use_cfg = guidance_scale > 1.0
        null = torch.full_like(labels_t, self.null_label)
        step_kwargs = {}
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["eta"] = eta
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator
        for t in self.progress_bar(ts):
            xin = self.scheduler.scale_model_input(x, t)
            if use_cfg:
                emb = None if image_embeds is None else torch.cat([torch.zeros_like(image_embeds), image_embeds])
                eps = self.predict_noise(torch.cat([xin, xin]), t, torch.cat([null, labels_t]), emb)
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            else:
                eps = self.predict_noise(xin, t, labels_t, image_embeds)
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample
        images = _to_output((x + 1) / 2, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class ZooSRPipeline(_ZooPipelineIO, DiffusionPipeline):
    """Super-resolution by concatenation: ``[noisy residual, upsampled LR]`` -> epsilon.

    ``image``: low-resolution images in [0, 1], ``(B, 3, h, w)``; output ``(B, 3, s*h, s*w)``: the upsampled LR
    plus the sampled residual. ``upsampler``: a fitted :class:`LinearUpsampler` (zoo:sr), or None for bicubic.
    The scale ``s``, ``residual_scale`` and the degradation the model was trained on (``blur_sigma``:
    0 for box averaging, else a Gaussian blur of that sigma before decimation; see :meth:`degrade`)
    are stored in the pipeline's config.
    """

    model_cpu_offload_seq = "denoiser"
    _optional_components = ["upsampler"]

    def __init__(self, denoiser, scheduler, cond_encoder: LabelTokenEncoder, upsampler: Optional[LinearUpsampler] = None,
                 upscale: int = 2, residual_scale: float = 8.0, blur_sigma: float = 0.0):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler, cond_encoder=cond_encoder, upsampler=upsampler)
        self.register_to_config(upscale=upscale, residual_scale=residual_scale, blur_sigma=blur_sigma)

    def degrade(self, hr: torch.Tensor) -> torch.Tensor:
        """The low-resolution input this model expects of high-resolution images ``(B, 3, H, W)``."""
        from diffslim.zoo import data as zdata

        return zdata.downscale(hr, int(self.config.upscale), float(getattr(self.config, "blur_sigma", 0.0)))

    @staticmethod
    def bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
        """Bicubic upsampling of ``(B, C, h, w)`` images in [0, 1], clamped to [0, 1] (the SR baseline)."""
        return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)

    def upsample(self, lr: torch.Tensor, scale: Optional[int] = None) -> torch.Tensor:
        """The upsampled LR the denoiser is conditioned on and the residual is added to: the pipeline's
        ``upsampler`` when it has one, else bicubic."""
        scale = int(self.config.upscale) if scale is None else int(scale)
        if self.upsampler is not None:
            if int(self.upsampler.config.scale) != scale:
                raise ValueError(f"this pipeline's upsampler is {self.upsampler.config.scale}x, not {scale}x")
            return self.upsampler(lr.to(self.upsampler.weight.dtype)).to(lr.dtype)
        return self.bicubic(lr, scale)

    def predict_noise(self, x: torch.Tensor, t, cond_image: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, H, W) noisy residual, ``cond_image`` (B, 3, H, W) in [-1, 1] -> epsilon."""
        tt = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        ctx = self.cond_encoder(zeros).to(x.dtype)
        return self.denoiser(torch.cat([x, cond_image], dim=1), tt, encoder_hidden_states=ctx).sample

    @torch.no_grad()
    def __call__(
        self,
        image,
        num_inference_steps: int = 50,
        timesteps: Optional[Sequence[int]] = None,
        generator: Optional[Union[torch.Generator, list]] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        num_images_per_prompt: int = 1,
    ):
        """Upscale ``image``: low-resolution RGB images, a (B, 3, h, w) or (3, h, w) tensor in [0, 1] or PIL images
        (each ``num_images_per_prompt`` times)."""
        image = _lr_images(image)
        if num_images_per_prompt > 1:
            image = image.repeat_interleave(num_images_per_prompt, dim=0)
        device = self._execution_device
        dtype = self.denoiser.dtype
        scale = int(self.config.upscale)
        up = self.upsample(image.to(device=device, dtype=torch.float32), scale)
        cond = (up * 2 - 1).to(dtype)
        if latents is None:
            latents = randn_tensor(tuple(cond.shape), generator=generator, device=device, dtype=dtype)
        x = latents * self.scheduler.init_noise_sigma
        ts = _set_timesteps(self.scheduler, num_inference_steps, timesteps, device)
        step_kwargs = {}
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["eta"] = eta
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator
        for t in self.progress_bar(ts):
            eps = self.predict_noise(self.scheduler.scale_model_input(x, t), t, cond)
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample
        hr = up + x.float() / float(self.config.residual_scale) / 2
        images = _to_output(hr, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
