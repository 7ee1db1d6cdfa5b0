"""The reference zoo: small models trained here, shipped as diffusers pipeline folders.

A leaf module: it knows names, folders and the architecture configs, nothing about loading or training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

# Stable Diffusion's training noise schedule, shared by every zoo model so that what we learn on
# them (step counts, schedules, skip plans) transfers to real SD-family models.
SD_NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="epsilon",
)
# Stable Diffusion's DDIM inference config (leading spacing, steps_offset 1, no clipping).
SD_DDIM_CONFIG = dict(SD_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                      timestep_spacing="leading")

_SD_LAYOUT = dict(
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    task: str  # "class" (class-conditional generation) or "sr" (super-resolution)
    description: str
    denoiser_class: str
    denoiser_config: dict = field(default_factory=dict)
    cond_config: dict | None = None
    pipeline_config: dict = field(default_factory=dict)  # extra pipeline arguments (e.g. SR's residual_scale)
    upsampler: dict | None = None  # SR: LinearUpsampler arguments (fitted before training), None for bicubic
    default_steps: int = 50

    @property
    def folder(self) -> Path:
        return WEIGHTS_DIR / self.name


ZOO: dict[str, ZooEntry] = {
    "digits-sd": ZooEntry(
        name="digits-sd",
        task="class",
        description="miniature Stable Diffusion U-Net (SD layout, cross-attention on label tokens, CFG), 8x8 digits",
        denoiser_class="UNet2DConditionModel",
        denoiser_config=dict(_SD_LAYOUT, sample_size=8, in_channels=1, out_channels=1,
                             block_out_channels=(32, 64, 64, 64)),
        cond_config=dict(num_labels=10, dim=32, num_tokens=2),
    ),
    "digits-dit": ZooEntry(
        name="digits-dit",
        task="class",
        description="class-conditional DiT (adaLN-zero), 8x8 digits, patch 2",
        denoiser_class="DiTTransformer2DModel",
        denoiser_config=dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
                             num_layers=6, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                             norm_num_groups=1),
    ),
    "sr": ZooEntry(
        name="sr",
        task="sr",
        description="2x super-resolution of the BD degradation (Gaussian blur sigma 1.6, decimation), SD-layout "
                    "U-Net, a fitted linear upsampling of the LR concatenated to the noisy input; samples the "
                    "residual over it",
        denoiser_class="UNet2DConditionModel",
        denoiser_config=dict(_SD_LAYOUT, sample_size=16, in_channels=6, out_channels=3,
                             block_out_channels=(32, 32, 64, 64)),
        cond_config=dict(num_labels=1, dim=32, num_tokens=2),
        pipeline_config=dict(upscale=2, residual_scale=8.0, blur_sigma=1.6),
        upsampler=dict(kernel_size=9),
    ),
}


def zoo_entry(name: str) -> ZooEntry:
    """The entry for ``name``; raises ``KeyError`` with the known names."""
    if name not in ZOO:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name]
