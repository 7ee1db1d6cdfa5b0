"""Fixed evaluation inputs of the zoo models: what ``evaluate``, ``bench`` and the gates sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from diffslim.zoo import data as zdata
from diffslim.zoo.registry import zoo_entry


@dataclass
class EvalSet:
    """Inputs (one dict per sample, see ``diffslim.sample``), one seed each, and what grading needs.

    ``labels``: requested digits (class tasks); ``ground_truth``: ``(N, C, H, W)`` target images
    (super-resolution); ``real_images``: real data for distribution metrics such as FID.
    """

    inputs: list[dict]
    seeds: list[int]
    labels: Optional[list[int]] = None
    ground_truth: Optional[torch.Tensor] = None
    real_images: Optional[torch.Tensor] = None
    call_kwargs: dict = field(default_factory=dict)
    baseline: Optional[torch.Tensor] = None  # e.g. bicubic upsampling for SR


def zoo_eval_set(name: str, n: int, seed: int = 0, eval_patch: int = 32) -> EvalSet:
    """``n`` evaluation inputs of zoo model ``name`` (labels cycle 0..9; SR crops come from held-out photos)."""
    e = zoo_entry(name)
    seeds = [seed + i for i in range(n)]
    if e.task == "class":
        labels = [i % 10 for i in range(n)]
        real, _ = zdata.digits("test", size=e.denoiser_config["sample_size"])
        return EvalSet(inputs=[{"class_label": y} for y in labels], seeds=seeds, labels=labels, real_images=real)
    hr = zdata.photo_patches(zdata.SR_HELDOUT_PHOTOS, eval_patch, n, seed=1000 + seed, scales=(1.0, 0.5))
    lr = zdata.downscale(hr, 2)
    from diffslim.zoo.pipelines import ZooSRPipeline

    return EvalSet(inputs=[{"image": x} for x in lr], seeds=seeds, ground_truth=hr,
                   baseline=ZooSRPipeline.upsample(lr, 2))
