"""Training of the reference zoo models (and the digit classifier that grades them).

One visible Accelerate loop (prepare, step, log, checkpoint, resume), as in Accelerate's examples.
Run ``python -m diffslim.train.zoo NAME --out DIR`` (or ``diffslim zoo-train NAME``); it checkpoints
every ``--checkpoint-every`` steps under ``DIR/checkpoints`` and resumes from the newest one.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from diffslim import launch
from diffslim.errors import Interrupted
from diffslim.train.stop import StopOnSignal, say
from diffslim.zoo import data as zdata
from diffslim.zoo.registry import SD_DDIM_CONFIG, SD_NOISE_SCHEDULE, zoo_entry


def build_pipeline(name: str, dtype=torch.float32, **pipeline_config):
    """A freshly initialised (random-weight) zoo pipeline of the registry's architecture.

    ``pipeline_config`` overrides the registry's pipeline arguments (e.g. SR's ``blur_sigma``)."""
    import diffusers
    from diffusers import DDIMScheduler

    from diffslim.zoo.pipelines import LabelTokenEncoder, LinearUpsampler, ZooClassPipeline, ZooSRPipeline

    e = zoo_entry(name)
    denoiser = getattr(diffusers, e.denoiser_class)(**e.denoiser_config)
    cond = LabelTokenEncoder(**e.cond_config) if e.cond_config else None
    sched = DDIMScheduler(**SD_DDIM_CONFIG)
    if e.task == "sr":
        config = {**e.pipeline_config, **pipeline_config}
        # an identity (= bicubic) upsampler until ``fit_upsampler`` replaces it
        ups = LinearUpsampler(scale=config["upscale"], **e.upsampler) if e.upsampler is not None else None
        return ZooSRPipeline(denoiser=denoiser, scheduler=sched, cond_encoder=cond, upsampler=ups, **config)
    return ZooClassPipeline(denoiser=denoiser, scheduler=sched, cond_encoder=cond)


def fit_upsampler(blur_sigma: float, scale: int = 2, kernel_size: int = 9, n: int = 3000, patch: int = 32,
                  seed: int = 0, ridge: float = 1e-4):
    """The least-squares ``LinearUpsampler`` for SR with the degradation ``downscale(., scale, blur_sigma)``.

    Fitted in closed form (normal equations, one per output phase, a small ridge) on ``n`` training crops of
    ``patch`` pixels; deterministic in ``seed``. Held-out photos are never seen."""
    from diffslim.zoo.pipelines import LinearUpsampler

    ups = LinearUpsampler(scale=scale, kernel_size=kernel_size)
    hr = zdata.photo_patches(zdata.SR_TRAIN_PHOTOS, patch, n, seed=seed)
    k2 = kernel_size * kernel_size
    xtx = torch.zeros(scale * scale, k2 + 1, k2 + 1, dtype=torch.float64)
    xty = torch.zeros(scale * scale, k2 + 1, dtype=torch.float64)
    for chunk in hr.split(250):
        up = F.interpolate(zdata.downscale(chunk, scale, blur_sigma), scale_factor=scale, mode="bicubic",
                           align_corners=False)
        b, c, h, w = up.shape
        cols = F.unfold(F.pad(up.reshape(b * c, 1, h, w), (kernel_size // 2,) * 4, mode="reflect"), kernel_size)
        cols = cols.view(b * c, k2, h, w)  # every pixel's neighbourhood
        target = chunk.reshape(b * c, h, w)
        for py in range(scale):
            for px in range(scale):
                x = cols[:, :, py::scale, px::scale].permute(0, 2, 3, 1).reshape(-1, k2).double()
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
                y = target[:, py::scale, px::scale].reshape(-1).double()
                xtx[py * scale + px] += x.T @ x
                xty[py * scale + px] += x.T @ y
    eye = torch.eye(k2 + 1, dtype=torch.float64) * ridge * xtx.diagonal(dim1=1, dim2=2).mean()
    sol = torch.linalg.solve(xtx + eye, xty.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ups.weight.copy_(sol[:, :k2].view(scale * scale, 1, kernel_size, kernel_size).float())
        ups.bias.copy_(sol[:, k2].float())
    return ups


class _Trainable(torch.nn.Module):
    """The trained parts of a zoo pipeline, as one module for Accelerate: its forward is the denoiser's prediction,
    so that under several processes the call goes through DDP, which averages the gradients."""

    def __init__(self, pipe):
        super().__init__()
        self.denoiser = pipe.denoiser
        self.cond_encoder = pipe.cond_encoder

    def forward(self, xt: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cond_img: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The noise prediction ``(B, C, H, W)`` for noised ``xt`` at timesteps ``t`` ``(B,)``: of class ``labels``
        ``(B,)`` (the class models), or of the upsampled low-resolution ``cond_img`` ``(B, C, H, W)`` (SR)."""
        if cond_img is not None:
            ctx = self.cond_encoder(torch.zeros(xt.shape[0], dtype=torch.long, device=xt.device))
            return self.denoiser(torch.cat([xt, cond_img], 1), t, encoder_hidden_states=ctx).sample
        if self.cond_encoder is not None:
            return self.denoiser(xt, t, encoder_hidden_states=self.cond_encoder(labels)).sample
        return self.denoiser(xt, t, class_labels=labels).sample


def _batch(name: str, step: int, batch_size: int, pool, num_train_timesteps: int, rank: int = 0, world: int = 1):
    """Process ``rank``'s share of the training batch of ``step``: the step's ``batch_size * world`` examples, their
    noise and timesteps are drawn in one go, deterministic in (seed, step), and each process takes its
    ``batch_size`` in order. So a resumed run sees the same data, and ``world`` processes train on the batches one
    process with ``world`` times the batch size does (the draws of one process are those of earlier versions)."""
    g = torch.Generator().manual_seed(10_000 + step)
    e = zoo_entry(name)
    n = batch_size * world
    labels = drop = None
    if e.task == "class":
        x, y = pool
        idx = torch.randint(len(y), (n,), generator=g)
        x0 = x[idx] * 2 - 1
        labels = y[idx].clone()
        drop = torch.rand(n, generator=g) < 0.1  # classifier-free guidance dropout
    else:
        x0 = pool[torch.randint(len(pool), (n,), generator=g)]  # the HR crops; the target is their residual
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, num_train_timesteps, (n,), generator=g)
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    return tuple(None if v is None else v[mine] for v in (x0, labels, drop, noise, t))


def _loss(name, model, unwrapped, pipe, sched, batch, residual_scale):
    """The diffusion loss of ``batch``; ``model`` is what Accelerate prepared (its forward the prediction),
    ``unwrapped`` the module under it, for its config."""
    e = zoo_entry(name)
    x_or_hr, labels, drop, noise, t = batch
    if e.task == "class":
        if unwrapped.cond_encoder is not None:
            null = unwrapped.cond_encoder.config.num_labels
        else:
            null = unwrapped.denoiser.config.num_embeds_ada_norm
        labels = torch.where(drop, torch.full_like(labels, null), labels)
        pred = model(sched.add_noise(x_or_hr, noise, t), t, labels=labels)
    else:
        up = pipe.upsample(pipe.degrade(x_or_hr), 2)
        x0 = (x_or_hr - up) * 2 * residual_scale
        pred = model(sched.add_noise(x0, noise, t), t, cond_img=up * 2 - 1)
    return F.mse_loss(pred.float(), noise)


def train(name: str, out: Path, steps: int, batch_size: int, lr: float, checkpoint_every: int,
          ema_decay: float = 0.999, seed: int = 0, log_every: int = 50,
          pipeline_config: Optional[dict] = None) -> Path:
    """Train zoo model ``name`` for ``steps`` steps; write the pipeline folder ``out/pipeline``.

    ``pipeline_config``: overrides of the registry's pipeline arguments (SR: ``blur_sigma``), kept in
    ``out/pipeline_config.json`` so that a resumed run and its exports use the same ones."""
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    # without CUDA, the processes of `accelerate launch` train together over gloo (accelerate's MULTI_CPU)
    accelerator = launch.accelerator()
    set_seed(seed)
    out = Path(out)
    ckpt_root = out / "checkpoints"
    # every process checks a resume against the run's records; the first one writes them
    write = accelerator.is_main_process
    pipeline_config = _run_pipeline_config(out, pipeline_config, zoo_entry(name).pipeline_config, write=write)
    planned = _check_run_settings(out, {"batch_size": batch_size, "lr": lr, "seed": seed, "ema_decay": ema_decay,
                                        "num_processes": accelerator.num_processes}, steps, write=write)
    pipe = build_pipeline(name, **pipeline_config)
    upsampler = fitted_upsampler(name, pipeline_config)  # closed form, deterministic: refitted on resume
    if upsampler is not None:  # the training's copy where the model trains; the exports take ``upsampler``
        pipe.register_modules(upsampler=copy.deepcopy(upsampler).to(accelerator.device))
    model = _Trainable(pipe)
    # DiT's label embedding drops labels itself in training mode; we drop them explicitly instead.
    ema = copy.deepcopy(model).requires_grad_(False).to(accelerator.device)
    sched = DDPMScheduler(**SD_NOISE_SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model, opt, lr_sched = accelerator.prepare(model, opt, lr_sched)
    accelerator.register_for_checkpointing(ema)
    if accelerator.process_index > 0:  # what a model draws itself (DiT's label embeddings drop labels in training
        torch.manual_seed(seed + 7919 * accelerator.process_index)  # mode) differs between the processes' shares

    e = zoo_entry(name)
    if e.task == "class":
        pool = zdata.digits("all", size=e.denoiser_config["sample_size"])
    else:
        pool = zdata.photo_patches(zdata.SR_TRAIN_PHOTOS, e.denoiser_config["sample_size"], 20000, seed=seed)
    residual_scale = float(pipe.config.get("residual_scale", 1.0)) if e.task == "sr" else 1.0

    start = 0
    ckpts = _checkpoints(ckpt_root)
    if ckpts:
        accelerator.load_state(str(ckpts[-1]))
        start = int(ckpts[-1].name.split("_")[1])
        if start > steps:  # it would export the longer run's weights as this one's
            from diffslim.errors import UserError

            raise UserError(f"{out} holds a run trained to step {start}, past --steps {steps}: give --steps {start} "
                            "or more to go on from it, or another --out")
        say(accelerator, f"resumed from {ckpts[-1]} at step {start}"
            + (f"; the run was planned for {planned} steps, this one for {steps}: the learning-rate schedule "
               "(warm-up, then cosine decay to --steps) changes from here" if planned not in (None, steps) else ""))
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.csv"
    kept = []  # on a resume, the rows up to the checkpoint (rows a stopped run logged after it are dropped)
    if start > 0 and log_path.is_file():
        kept = [r for r in log_path.read_text().splitlines()[1:]
                if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= start]
    accelerator.wait_for_everyone()  # every process has read the log before the main one rewrites it
    log = open(log_path if accelerator.is_main_process else os.devnull, "w")
    log.write("step,loss,lr,seconds\n" + "".join(r + "\n" for r in kept))
    unwrapped = accelerator.unwrap_model(model)
    # the log's window and clock go on from the checkpoint: a resumed run logs the rows an uninterrupted one would
    done = json.loads((ckpts[-1] / "complete.json").read_text()) if ckpts and (ckpts[-1] / "complete.json").is_file() \
        else {}
    running, window = float(done.get("running", 0.0)), int(done.get("window", 0))
    t0 = time.time() - float(done.get("seconds", 0.0))
    with StopOnSignal(f"zoo-train {name}") as stop:  # Ctrl-C or SIGTERM: a checkpoint at this step
        for step in range(start, steps):
            model.train()
            batch = _batch(name, step, batch_size, pool, sched.config.num_train_timesteps,
                           accelerator.process_index, accelerator.num_processes)
            batch = tuple(None if v is None else v.to(accelerator.device) for v in batch)  # drawn on the CPU
            loss = _loss(name, model, unwrapped, pipe, sched, batch, residual_scale)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                d = min(ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), unwrapped.parameters()):
                    pe.lerp_(pm.detach(), 1 - d)
            running += accelerator.reduce(loss.detach(), "mean").item()  # every process: the whole batch's
            window += 1
            if (step + 1) % log_every == 0:  # the mean over the window's steps
                log.write(f"{step + 1},{running / window:.5f},{lr_sched.get_last_lr()[0]:.2e},{time.time() - t0:.1f}\n")
                log.flush()
                accelerator.print(f"step {step + 1}/{steps} loss {running / window:.4f} ({time.time() - t0:.0f}s)")
                running, window = 0.0, 0
            stopped = stop.requested(accelerator) and step + 1 < steps
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps or stopped:
                path = ckpt_root / f"step_{step + 1}"
                accelerator.save_state(str(path))
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:  # written last: a checkpoint without it is never resumed from
                    (path / "complete.json").write_text(json.dumps({"step": step + 1, "running": running,
                                                                    "window": window,
                                                                    "seconds": time.time() - t0}))
                    cut = []
                    for old in _checkpoints(ckpt_root, cut)[:-2] + [p for p in cut if int(p.name[5:]) < step + 1]:
                        shutil.rmtree(old)
                if accelerator.is_main_process:  # one writer: processes writing one folder at once corrupt it
                    export(name, ema, out / "pipeline", pipeline_config, upsampler)
                accelerator.wait_for_everyone()
            if stopped:
                log.close()
                raise Interrupted(f"zoo-train {name}", stop.signum, step + 1, steps, ckpt_root / f"step_{step + 1}")
    return out / "pipeline"


def _checkpoints(root: Path, cut: Optional[list] = None) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first. A checkpoint is complete once ``complete.json`` is
    written after it; one from before that marker, once accelerate wrote the EMA (its last file). A
    checkpoint cut short (a killed process, a full disk) is left out with a warning: resuming goes back to the one
    before it, rather than failing to load. ``cut``: a list that receives the incomplete ones."""
    if not root.is_dir():
        return []
    done, cut = [], ([] if cut is None else cut)
    for p in root.glob("step_*"):
        if not p.name[5:].isdigit():
            continue
        (done if (p / "complete.json").is_file() or (p / "custom_checkpoint_0.pkl").is_file() else cut).append(p)
    done.sort(key=lambda p: int(p.name[5:]))
    newest = int(done[-1].name[5:]) if done else -1
    for p in cut:
        if int(p.name[5:]) > newest:
            logging.getLogger(__name__).warning("ignoring %s: the checkpoint was not completed", p)
    return done


def _check_run_settings(out: Path, settings: dict, steps: Optional[int] = None, write: bool = True) -> Optional[int]:
    """Record the settings that shape run ``out``'s training on its first start; a resume must keep them (only
    ``--steps`` and ``--checkpoint-every`` may change). Runs started before the record are not checked. Returns the
    steps the run's last start planned (its LR schedule's length; None if not recorded) and records ``steps``
    (``write``: False checks without writing, for the other processes of a launch)."""
    from diffslim.errors import UserError

    path = out / "train_settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        diff = [k for k in settings if k in saved and saved[k] != settings[k]]
        if diff:
            raise UserError(f"{out} was started with " + ", ".join(f"{k}={saved[k]}" for k in diff) + "; this run has "
                            + ", ".join(f"{k}={settings[k]}" for k in diff)
                            + ": resume it with the same settings, or use another --out")
        planned = saved.get("steps")
        if steps is not None and planned != steps and write:
            _write_settings(path, {**saved, "steps": steps})
        return planned
    if any(out.glob("checkpoints/step_*")):
        return None  # a run from before the record: nothing to compare with
    if write:
        out.mkdir(parents=True, exist_ok=True)
        _write_settings(path, {**settings, **({} if steps is None else {"steps": steps})})
    return None


def _write_settings(path: Path, settings: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # the other processes read it meanwhile: rename is atomic
    tmp.write_text(json.dumps(settings))
    tmp.replace(path)


def _run_pipeline_config(out: Path, given: Optional[dict], defaults: Optional[dict] = None, write: bool = True) -> dict:
    """The pipeline overrides of run ``out``: saved on its first start (``write``), and a resume must not change
    them (giving the value it ran with, the zoo's ``defaults`` included, is no change)."""
    from diffslim.errors import UserError

    path = out / "pipeline_config.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    given = dict(given or {})
    if saved is not None:
        ran = {**(defaults or {}), **saved}
        diff = [k for k in given if given[k] != ran.get(k)]
        if diff:
            raise UserError(f"{out} was started with " + ", ".join(
                f"{k}={ran.get(k)}" + ("" if k in saved else " (the default)") for k in diff)
                + "; this run has " + ", ".join(f"{k}={given[k]}" for k in diff)
                + ": resume it with the same, or use another --out")
        return saved
    if write:
        out.mkdir(parents=True, exist_ok=True)
        _write_settings(path, given)
    return given


def fitted_upsampler(name: str, pipeline_config: Optional[dict] = None):
    """The fitted ``LinearUpsampler`` of zoo model ``name`` under ``pipeline_config`` (None if it has none)."""
    e = zoo_entry(name)
    if e.upsampler is None:
        return None
    config = {**e.pipeline_config, **(pipeline_config or {})}
    key = (float(config.get("blur_sigma", 0.0)), int(config["upscale"]), tuple(sorted(e.upsampler.items())))
    return copy.deepcopy(_fitted(*key))


@functools.lru_cache(maxsize=4)
def _fitted(blur_sigma: float, scale: int, upsampler_args: tuple):
    return fit_upsampler(blur_sigma, scale=scale, **dict(upsampler_args))


def export(name: str, trained: torch.nn.Module, folder: Path, pipeline_config: Optional[dict] = None,
           upsampler=None) -> None:
    """Write the EMA weights as an fp16 safetensors diffusers pipeline folder (a fitted upsampler in fp32:
    ``upsampler``, or fitted here)."""
    pipe = build_pipeline(name, **(pipeline_config or {}))
    pipe.denoiser.load_state_dict(trained.denoiser.state_dict())
    if pipe.cond_encoder is not None:
        pipe.cond_encoder.load_state_dict(trained.cond_encoder.state_dict())
    pipe.to(torch.float16)
    if getattr(pipe, "upsampler", None) is not None:  # SR only; the class pipelines have none
        pipe.register_modules(upsampler=upsampler if upsampler is not None else fitted_upsampler(name, pipeline_config))
    from diffslim.zoo.pipelines import save_zoo_pipeline

    save_zoo_pipeline(pipe, folder)


def export_checkpoint(name: str, run_dir: Path, folder: Path) -> Path:
    """Export the EMA weights of the newest checkpoint in ``run_dir/checkpoints`` to ``folder``."""
    run_dir = Path(run_dir)
    ckpts = _checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints under {run_dir / 'checkpoints'}")
    config = _run_pipeline_config(run_dir, None)
    pipe = build_pipeline(name, **config)
    ema = _Trainable(pipe)
    # our own training checkpoint (accelerate's custom state); weights_only refuses arbitrary objects
    ema.load_state_dict(torch.load(ckpts[-1] / "custom_checkpoint_0.pkl", weights_only=True))
    export(name, ema, folder, config)
    return ckpts[-1]


def train_classifier(out: Path, steps: int = 1500, seed: int = 0) -> dict:
    """Train the digit classifier (8x8 real digits) used for digit accuracy and FID features."""
    from safetensors.torch import save_file

    from diffslim.zoo.classifier import DigitClassifier

    torch.manual_seed(seed)
    xtr, ytr = zdata.digits("train", size=8)
    xte, yte = zdata.digits("test", size=8)
    net = DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(ytr), (128,), generator=g)
        x = xtr[idx]
        # small shifts and noise: generated digits are not pixel-perfect copies of the data
        shift = torch.randint(-1, 2, (2,), generator=g)
        x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        loss = F.cross_entropy(net(x), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "digit_classifier.safetensors"))
    (out / "digit_classifier.json").write_text(json.dumps({"test_accuracy": acc, "steps": steps, "seed": seed}))
    return {"test_accuracy": acc}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name", help="zoo model name, or 'classifier'")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blur-sigma", type=float, default=None, help="sr: Gaussian blur before decimation (0: box)")
    a = p.parse_args(argv)
    if a.name == "classifier":
        print(train_classifier(a.out, seed=a.seed))
        return
    try:
        train(a.name, a.out, a.steps, a.batch_size, a.lr, a.checkpoint_every, seed=a.seed,
              pipeline_config=None if a.blur_sigma is None else {"blur_sigma": a.blur_sigma})
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
