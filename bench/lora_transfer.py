"""Does a LoRA trained on the original model still work on the pruned model? (zoo:digits-sd)

The LoRA teaches zoo:digits-sd to draw every digit mirrored (left-right), trained on the full model only, on
the mirrored training digits with the zoo's own task (diffusion loss, CFG label dropout). Then each pruned
model (built by the bench's own builders, so ``layers:0.5+kd`` and ``depth:7+ft`` are the bench's cached
distilled / fine-tuned students, whose kept weights differ from the LoRA's base) gets that LoRA adapted by
``diffslim.lora.adapt_lora`` (the removed layers' LoRA dropped), and samples the same inputs with and without it. What it reports per model:

- ``mirrored_acc``: the share of samples that the zoo's digit classifier reads as the requested digit after
  mirroring them back: the LoRA's effect (the full model without the LoRA scores what symmetric digits give);
- ``plain_acc``: the same without mirroring back (the LoRA should push it down);
- ``psnr_to_full_lora``: PSNR of the pruned model + LoRA against the full model + LoRA, beside
  ``psnr_to_full``: the pruned model without LoRA against the full model without it (what pruning costs anyway);
- the LoRA modules kept and dropped.

    OMP_NUM_THREADS=2 .venv/bin/python bench/lora_transfer.py --out bench/results/lora_transfer_digits-sd.json

Writes the JSON (with the command), the LoRA file and a grid of samples (rows: models, with and without LoRA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import diffslim
from diffslim.bench import sample_with_adapters
from diffslim.measure import quality
from diffslim.sample import SampleSpec
from diffslim.train.data import ZooDigits
from diffslim.train.distill import noising_for, task_for
from diffslim.zoo.classifier import load_digit_classifier
from diffslim.zoo.evalsets import zoo_eval_set

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]


def train_lora(steps: int, batch: int, lr: float, rank: int, seed: int) -> tuple[dict, list[float]]:
    """A LoRA of zoo:digits-sd's U-Net that mirrors its digits; returns its PEFT state dict and the loss curve."""
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = diffslim.load("zoo:digits-sd").pipe
    unet = pipe.denoiser
    unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = ZooDigits("train")
    images = data.images.flip(-1)  # the new style: every digit mirrored left-right
    labels = torch.as_tensor(data.labels)
    task, noising = task_for(pipe), noising_for(pipe)
    g = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x0, cond = task.encode({"image": images[idx], "label": labels[idx]}, g, "cpu")
        t = noising.timesteps(batch, g)
        noise = torch.randn(x0.shape, generator=g)
        xt, target = noising.noisy(x0, noise, t)
        loss = torch.nn.functional.mse_loss(task.predict(unet, xt, t, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"lora step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", flush=True)
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    return sd, losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/lora_transfer_digits-sd.json"))
    ap.add_argument("--steps", type=int, default=600, help="LoRA training steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n", type=int, default=100, help="evaluation inputs (labels cycle 0-9), 50 DDIM steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="full,layers:0.3,layers:0.5,layers:0.5+kd,depth:9,depth:7,depth:7+ft",
                    help="bench methods whose models get the LoRA (full first: the reference)")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sd, losses = train_lora(args.steps, args.batch, args.lr, args.rank, args.seed)
    lora_path = args.out.with_suffix(".lora.safetensors")
    from safetensors.torch import save_file

    save_file({f"denoiser.{k}": v.contiguous() for k, v in sd.items()}, str(lora_path))
    train_s = time.time() - t0

    classifier = load_digit_classifier()
    es = zoo_eval_set("digits-sd", args.n, seed=0)
    labels = torch.tensor(es.labels)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=50, call_kwargs=es.call_kwargs, batch_size=50)
    outputs, rows = {}, []
    for with_lora in (False, True):
        for method, r in sample_with_adapters("zoo:digits-sd", args.methods, spec, lora=sd if with_lora else None).items():
            out = outputs[(method, with_lora)] = r.pop("outputs")
            row = {"model": method, "lora": with_lora, **r,
                   "plain_acc": quality.digit_accuracy(out, labels, classifier),
                   "mirrored_acc": quality.digit_accuracy(out.flip(-1), labels, classifier)}
            if method != "full":
                ref = outputs[("full", with_lora)]
                row["psnr_to_full_lora" if with_lora else "psnr_to_full"] = float(quality.psnr(out, ref).mean())
            rows.append(row)
            print(json.dumps(row), flush=True)

    from diffslim.report import image_grid

    grid = torch.cat([outputs[(m, lo)][:10] for m in args.methods.split(",") for lo in (False, True)])
    image_grid(grid, nrow=10, upscale=4).save(args.out.with_suffix(".png"))
    result = {"command": "OMP_NUM_THREADS=2 .venv/bin/python bench/lora_transfer.py " + " ".join(argv or sys.argv[1:]),
              "args": {k: str(v) for k, v in vars(args).items()}, "lora_targets": TARGETS,
              "lora_train_seconds": round(train_s, 1), "lora_loss_first_last_50": [
                  sum(losses[:50]) / min(50, len(losses)), sum(losses[-50:]) / min(50, len(losses))],
              "rows": rows, "seconds": round(time.time() - t0, 1),
              "grid": args.out.with_suffix(".png").name + " (rows: each model without, then with the LoRA; "
                      "first 10 inputs)"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
