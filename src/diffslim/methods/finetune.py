"""Fine-tuning a depth-skipped model (Kim and Cho, 2024) with the shared distillation trainer.

The student is the depth-skipped copy of the teacher's denoiser; the loss is the diffusion loss plus
distillation of the teacher's output and of the block features both models still have.
"""

from __future__ import annotations

from pathlib import Path

from diffslim.methods.depth_skip import depth_skip


def finetune_depth(pipe, depth: int, data: str, cfg, size=None) -> tuple[object, Path, object]:
    """Fine-tune ``pipe``'s denoiser pruned to ``depth`` on ``data`` ("zoo" or a folder, its images at ``size`` px,
    default the pipeline's own); returns
    ``(student, folder, result)`` where ``folder`` holds the trained student (EMA weights) as a diffusers model and
    ``result`` is the trainer's :class:`~diffslim.train.distill.DistillResult` (its final losses)."""
    from diffslim.models.load import denoiser_of
    from diffslim.train.data import make_dataset
    from diffslim.train.distill import distill

    teacher = denoiser_of(pipe)
    student = depth_skip(teacher, depth)
    res = distill(pipe, student, make_dataset(data, pipe, size), cfg, label="finetune")
    folder = Path(res.out_dir) / "student"
    return load_student(folder), folder, res


def load_student(folder) -> object:
    """Reload a trained student folder (safetensors) as its diffusers model class."""
    from diffslim.models.load import load

    return load(str(folder)).denoiser
