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
    return task_eval_set(e.task, n, seed, sample_size=e.denoiser_config["sample_size"], eval_patch=eval_patch,
                         blur_sigma=float(e.pipeline_config.get("blur_sigma", 0.0)))


def pipeline_eval_set(pipe, n: int, seed: int = 0, eval_patch: int = 32) -> Optional[EvalSet]:
    """The eval set of a zoo-type pipeline loaded from any folder (None for other pipelines)."""
    from diffslim.zoo.pipelines import ZooClassPipeline, ZooSRPipeline

    if isinstance(pipe, ZooClassPipeline):
        return task_eval_set("class", n, seed, sample_size=pipe.denoiser.config.sample_size)
    if isinstance(pipe, ZooSRPipeline):
        return task_eval_set("sr", n, seed, eval_patch=eval_patch,
                             blur_sigma=float(getattr(pipe.config, "blur_sigma", 0.0)))
    return None


def task_eval_set(task: str, n: int, seed: int = 0, sample_size: int = 8, eval_patch: int = 32,
                  blur_sigma: float = 0.0) -> EvalSet:
    """Inputs of a zoo task: "class" (digits 0..9 in turn) or "sr" (held-out photo crops, 2x, degraded with
    ``blur_sigma`` as in ``diffslim.zoo.data.downscale``)."""
    seeds = [seed + i for i in range(n)]
    if task == "class":
        labels = [i % 10 for i in range(n)]
        real, _ = zdata.digits("test", size=sample_size)
        return EvalSet(inputs=[{"class_label": y} for y in labels], seeds=seeds, labels=labels, real_images=real)
    hr = zdata.photo_patches(zdata.SR_HELDOUT_PHOTOS, eval_patch, n, seed=1000 + seed, scales=(1.0, 0.5))
    # the held-out crops are fixed by ``seed``; the diffusion noise of sample i uses seeds[i]
    lr = zdata.downscale(hr, 2, blur_sigma)
    from diffslim.zoo.pipelines import ZooSRPipeline

    return EvalSet(inputs=[{"image": x} for x in lr], seeds=seeds, ground_truth=hr,
                   baseline=ZooSRPipeline.bicubic(lr, 2))


def image_prompt_eval_set(n: int, null_label: int, seed: int = 0, sample_size: int = 8) -> EvalSet:
    """``n`` image-prompt inputs of the digit models for an IP-Adapter whose image embedding is a digit's pixels:
    the null label and a held-out test digit of class ``i % 10`` (the first of its class, then the second, ...) as
    ``image_embeds``. ``labels``: the prompts' classes; ``real_images``: the prompt digits ``(N, 1, H, W)``."""
    real, classes = zdata.digits("test", size=sample_size)
    classes = torch.as_tensor(classes)
    labels = [i % 10 for i in range(n)]
    picked = [int(torch.nonzero(classes == y).flatten()[i // 10]) for i, y in enumerate(labels)]
    refs = real[picked]
    return EvalSet(inputs=[{"class_label": null_label, "image_embeds": r.flatten()} for r in refs],
                   seeds=[seed + i for i in range(n)], labels=labels, real_images=refs)
