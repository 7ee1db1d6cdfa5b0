"""Evaluation inputs and metrics for a loaded model: what ``evaluate``, ``bench`` and ``demo`` share."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch

from diffslim.errors import UserError

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red bicycle leaning against a brick wall",
    "a bowl of fruit on a wooden table, studio lighting",
    "a lighthouse on a cliff at sunset",
)


def eval_set_for(loaded, n: int, seed: int = 0, prompts_file: Optional[Path] = None, require_inputs: bool = True):
    """The evaluation inputs of ``loaded``: the zoo's fixed sets, or the pipeline's inputs from ``prompts_file``.

    ``prompts_file``: a ``.txt`` file, one prompt per line (class labels for class-conditional pipelines such as
    DiT's), a ``.jsonl`` file of pipeline inputs (``{"prompt": "make it red", "image": "cat.png"}``, image paths
    relative to the file: InstructPix2Pix, ControlNet, img2img, upscalers) or a folder of images (captions as
    prompts); its inputs are cycled to ``n``. Without one: a few default prompts, or class labels 0..9 in turn; a
    pipeline that samples from input images has no default and raises :class:`UserError` naming the format, unless
    ``require_inputs`` is False (callers that only want ``call_kwargs``). ``call_kwargs``: what every call needs
    (see :func:`call_settings`).
    """
    from diffslim.zoo.evalsets import pipeline_eval_set, zoo_eval_set

    zoo_like = zoo_eval_set(loaded.zoo.name, n, seed=seed) if loaded.zoo is not None else (
        pipeline_eval_set(loaded.pipe, n, seed=seed) if loaded.pipe is not None else None)
    if zoo_like is not None:
        if prompts_file is not None:
            raise UserError(f"{loaded.source} takes no prompts (its inputs are class labels or images): drop --prompts")
        return zoo_like
    if loaded.pipe is None:
        raise UserError(f"{loaded.source} is a lone model, not a pipeline; sampling needs a pipeline folder or zoo:NAME")
    pipe, seeds = loaded.pipe, [seed + i for i in range(n)]
    es = _eval_inputs(pipe, n, seed, seeds, prompts_file, require_inputs)
    es.call_kwargs.update(call_settings(pipe))
    return es


def sized(es, loaded, height: Optional[int], width: Optional[int], option: str = "--height/--width"):
    """``es`` with every call at ``height`` x ``width`` pixels (a command's ``--height``/``--width``; either alone
    keeps the pipeline's training size for the other): a 1024 px model benched at 512 px costs a quarter of the
    time. Resolution binning is turned off where the pipeline has it (it would move the size to the nearest one the
    model was trained at). A pipeline whose call takes no size (the zoo's, DiT's), or a size that is not a multiple
    of the pipeline's step, is refused in one line."""
    import inspect

    if height is None and width is None:
        return es
    pipe = loaded.pipe
    params = inspect.signature(pipe.__call__).parameters if pipe is not None else {}
    if "height" not in params or "width" not in params:
        raise UserError(f"{option}: {type(pipe).__name__ if pipe is not None else loaded.source} takes no height and "
                        "width (it samples at its model's own size); drop them")
    from diffslim.train.data import pipeline_image_size, size_multiple

    step = size_multiple(pipe)
    for what, v in (("height", height), ("width", width)):
        if v is not None and (v < step or v % step):
            raise UserError(f"--{what} {v}: {type(pipe).__name__} takes sizes in multiples of {step} px, e.g. "
                            f"{max(step, v // step * step)}")
    default = pipeline_image_size(pipe) if height is None or width is None else None
    es.call_kwargs.update(height=height or default, width=width or default)
    if "use_resolution_binning" in params:
        es.call_kwargs["use_resolution_binning"] = False
    return es


def call_settings(pipe) -> dict:
    """Settings every call of ``pipe`` needs: PixArt's resolution binning knows only its released sizes (a
    ``sample_size`` of 32, 64, 128 or 256 latents) and raises on any other, so such a pipeline samples unbinned."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    size = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "sample_size", None)
    if "use_resolution_binning" in params and size not in (32, 64, 128, 256):
        return {"use_resolution_binning": False}
    return {}


def _eval_inputs(pipe, n, seed, seeds, prompts_file, require_inputs):
    """:func:`eval_set_for`'s inputs of a pipeline that is not a zoo one."""
    import inspect

    from diffslim.zoo.evalsets import EvalSet

    if prompts_file is not None:
        from diffslim.train.data import pipeline_inputs

        p = Path(prompts_file)
        if not (p.is_file() or p.is_dir()):
            raise UserError(f"no prompts file at {p}; give a text file with one prompt per line (class labels for a "
                            "class-conditional pipeline) or a .jsonl file of pipeline inputs")
        pool = pipeline_inputs(pipe, str(p), seed, option="--prompts")
        return EvalSet(inputs=[dict(pool[i % len(pool)]) for i in range(n)], seeds=seeds)
    params = inspect.signature(pipe.__call__).parameters
    if "class_labels" in params:  # DiT: labels in turn, within the classes the model has
        classes = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "num_embeds_ada_norm", None)
        labels = [i % min(10, int(classes or 10)) for i in range(n)]
        return EvalSet(inputs=[{"class_label": y} for y in labels], seeds=seeds)
    from diffslim.train.data import needs_image

    if needs_image(pipe) and require_inputs:
        key = "image" if "image" in params else "control_image"  # the transformer ControlNets take no image
        raise UserError(f"{type(pipe).__name__} samples from input images and has no default inputs: give --prompts "
                        "inputs.jsonl, one JSON object of pipeline inputs per line, e.g. "
                        f"{{\"prompt\": \"make it red\", \"{key}\": \"photo.png\"}} (paths relative to the file)")
    return EvalSet(inputs=[{"prompt": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]} for i in range(n)], seeds=seeds)


def reference_images(evalset) -> dict:
    """What a report shows above the samples: the input images, where every input has one as a tensor (image to
    image, super-resolution, ControlNet: ``(N, C, h, w)`` in [0, 1]), and the ground truth where the task has one."""
    refs = {}
    images = [inp.get("image") for inp in evalset.inputs]
    if images and all(torch.is_tensor(x) and x.dim() == 3 for x in images) and len({x.shape for x in images}) == 1:
        refs["input"] = torch.stack(images).float().clamp(0, 1)
    if evalset.ground_truth is not None:
        refs["ground truth"] = evalset.ground_truth
    return refs


def metrics_fn_for(loaded, evalset, *, clip_path=None, lpips_path=None, inception_path=None
                   ) -> Callable[[torch.Tensor, Optional[torch.Tensor]], dict]:
    """``fn(outputs, reference) -> dict``: PSNR/SSIM against the reference outputs, plus the task's metrics.

    Digit models add ``digit_accuracy`` and ``fid`` (features of the zoo's digit classifier, against
    real held-out digits); super-resolution adds ``psnr_gt``/``ssim_gt`` against the ground truth.
    ``clip_score`` (prompts), ``lpips`` and Inception ``fid`` (against the reference outputs) run
    when local weights are given. A metric that cannot run is listed under ``skipped`` with the
    reason, never reported as zero.
    """
    from diffslim.measure import quality

    classifier = None
    fid = None
    if evalset.labels is not None:
        from diffslim.zoo.classifier import CLASSIFIER_PATH, load_digit_classifier

        if CLASSIFIER_PATH.exists():
            classifier = load_digit_classifier()
            if evalset.real_images is not None:
                fid = quality.FeatureFID(classifier.features)
                fid.update(evalset.real_images, real=True)
                with torch.no_grad():
                    fid_dim = classifier.features(evalset.real_images[:1]).shape[1]
    optional = {}
    prompts = [inp.get("prompt") for inp in evalset.inputs]
    for name, path, make in (("clip_score", clip_path, quality.clip_score_metric),
                             ("lpips", lpips_path, quality.lpips_metric),
                             ("fid_inception", inception_path, quality.fid_inception)):
        if path is None:
            continue
        try:
            optional[name] = make(path)
        except quality.MetricUnavailable as e:
            optional[name] = e

    def fn(outputs: torch.Tensor, reference: Optional[torch.Tensor]) -> dict:
        row: dict = {}
        skipped: dict = {}
        if reference is not None:
            row["psnr"] = float(quality.psnr(outputs, reference).mean())
            row["ssim"] = float(quality.ssim(outputs, reference).mean())
        if evalset.labels is not None:
            if classifier is None:
                skipped["digit_accuracy"] = "digit classifier weights missing; run `diffslim zoo-train classifier`"
            else:
                row["digit_accuracy"] = quality.digit_accuracy(outputs, torch.tensor(evalset.labels), classifier)
            if fid is not None and len(outputs) <= fid_dim:
                # fewer samples than features: a singular covariance, and a distance that mostly measures n
                skipped["fid"] = (f"needs more samples than its {fid_dim} classifier features (n >= {fid_dim + 1}), "
                                  f"got {len(outputs)}")
            elif fid is not None:
                fid.reset(real=False)
                fid.update(outputs, real=False)
                row["fid"] = fid.compute()
        if evalset.ground_truth is not None:
            row["psnr_gt"] = float(quality.psnr(outputs, evalset.ground_truth).mean())
            row["ssim_gt"] = float(quality.ssim(outputs, evalset.ground_truth).mean())
        for name, metric in optional.items():
            if isinstance(metric, Exception):
                skipped[name] = str(metric)
                continue
            try:
                if name == "clip_score":
                    if any(p is None for p in prompts):
                        skipped[name] = "needs a prompt per input"
                        continue
                    metric.reset()
                    metric.update(outputs, prompts)
                    row[name] = float(metric.compute())
                elif name == "lpips":
                    if reference is None:
                        skipped[name] = "needs reference outputs"
                        continue
                    metric.reset()
                    # torchmetrics' LPIPS is built with normalize=True: inputs in [0, 1], 3 channels
                    metric.update(outputs.expand(-1, 3, -1, -1), reference.expand(-1, 3, -1, -1))
                    row[name] = float(metric.compute())
                else:
                    if reference is None:
                        skipped[name] = "needs reference outputs"
                        continue
                    metric.reset(real=True)
                    metric.update(reference, real=True)
                    metric.update(outputs, real=False)
                    row[name] = metric.compute()
            except quality.MetricUnavailable as e:
                skipped[name] = str(e)
        if skipped:
            row["skipped"] = skipped
        return row

    return fn


def finite(v):
    """JSON-safe number: inf/nan become None."""
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return None
    return v
