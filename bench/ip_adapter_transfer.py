"""Does an IP-Adapter trained on the original model still steer the pruned model? (zoo:digits-sd)

The IP-Adapter (diffusers' layout: an image projection to 4 tokens, and ``to_k_ip``/``to_v_ip`` beside every
cross-attention layer) is trained on the full zoo:digits-sd only, with its U-Net frozen, to draw the digit of a
*reference image*: the label is always the null label, and the image prompt is the raw pixels (64 values) of
another training digit of the same class, so the adapter must carry the class, not copy the image (10 % of the
prompts are zeroed, for classifier-free guidance). Then every bench model (built by the bench's own builders, so
``layers:0.5+kd`` and ``depth:7+ft`` are its cached distilled / fine-tuned students) loads the original file as it
is (the pruned classes renumber it, :mod:`diffslim.models.adapters`) and samples the evaluation inputs: the null
label and a held-out test digit as the image prompt (10 per class). What it reports per model:

- ``prompt_acc``: the share of samples the zoo's digit classifier reads as the reference digit's class;
- ``psnr_to_full_ip``: PSNR against the full model with the IP-Adapter on the same inputs;
- ``ip_processors``: the cross-attention layers that carry IP weights (the rest were removed).

The full model without the IP-Adapter (null label, no image prompt) gives the chance baseline.

    OMP_NUM_THREADS=2 .venv/bin/python bench/ip_adapter_transfer.py --out bench/results/ip_adapter_transfer_digits-sd.json

Writes the JSON (with the command), the IP-Adapter file (diffusers' safetensors layout) and a grid of samples.
"""

from __future__ import annotations

import argparse
import copy
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
from diffslim.train.distill import noising_for
from diffslim.zoo.classifier import load_digit_classifier
from diffslim.zoo.evalsets import image_prompt_eval_set

EMBED = 64  # the image prompt: an 8x8 digit's pixels
TOKENS = 4  # image tokens, as the original IP-Adapter


def initial_state(unet, seed: int) -> dict:
    """An untrained IP-Adapter of ``unet`` in diffusers' nested layout: a random image projection, and ``to_k_ip``
    / ``to_v_ip`` started from each cross-attention layer's own ``to_k`` / ``to_v`` (as the IP-Adapter paper does)."""
    from diffusers.models.embeddings import ImageProjection

    torch.manual_seed(seed)
    c = unet.config.cross_attention_dim
    proj = ImageProjection(cross_attention_dim=c, image_embed_dim=EMBED, num_image_text_embeds=TOKENS)
    image_proj = {k.replace("image_embeds", "proj"): v.detach().clone() for k, v in proj.state_dict().items()}
    ip = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        ip[f"{i}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        ip[f"{i}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    return {"image_proj": image_proj, "ip_adapter": ip}


def state_of(unet) -> dict:
    """The IP-Adapter loaded into ``unet``, back in the file layout (the inverse of diffusers' loader)."""
    layer = unet.encoder_hid_proj.image_projection_layers[0]
    image_proj = {k.replace("image_embeds", "proj"): v.detach().clone() for k, v in layer.state_dict().items()}
    ip = {}
    for i, proc in enumerate(unet.attn_processors.values()):
        if hasattr(proc, "to_k_ip"):
            ip[f"{i}.to_k_ip.weight"] = proc.to_k_ip[0].weight.detach().clone()
            ip[f"{i}.to_v_ip.weight"] = proc.to_v_ip[0].weight.detach().clone()
    return {"image_proj": image_proj, "ip_adapter": ip}


def train_ip_adapter(steps: int, batch: int, lr: float, seed: int) -> tuple[dict, list[float]]:
    pipe = diffslim.load("zoo:digits-sd").pipe
    unet = pipe.denoiser
    unet.requires_grad_(False)
    unet._load_ip_adapter_weights([initial_state(unet, seed)], low_cpu_mem_usage=False)
    params = list(unet.encoder_hid_proj.parameters())
    params += [p for proc in unet.attn_processors.values() if hasattr(proc, "to_k_ip") for p in proc.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = ZooDigits("train")
    images, labels = data.images, torch.as_tensor(data.labels)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(10)]
    noising = noising_for(pipe)
    g = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x0 = images[idx] * 2 - 1
        ref = torch.stack([by_class[int(y)][torch.randint(0, len(by_class[int(y)]), (1,), generator=g)][0]
                           for y in labels[idx]])
        emb = images[ref].flatten(1)
        emb = torch.where((torch.rand(batch, 1, generator=g) < 0.1), torch.zeros_like(emb), emb)
        ctx = pipe.cond_encoder(torch.full((batch,), pipe.null_label, dtype=torch.long))
        t = noising.timesteps(batch, g)
        noise = torch.randn(x0.shape, generator=g)
        xt, target = noising.noisy(x0, noise, t)
        eps = unet(xt, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [emb[:, None]]}).sample
        loss = torch.nn.functional.mse_loss(eps, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"ip-adapter step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", flush=True)
    unet.eval()
    return state_of(unet), losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/ip_adapter_transfer_digits-sd.json"))
    ap.add_argument("--steps", type=int, default=1000, help="IP-Adapter training steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n", type=int, default=100, help="evaluation inputs (10 per class), 50 DDIM steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="full,layers:0.3,layers:0.5,layers:0.5+kd,depth:9,depth:7,depth:7+ft",
                    help="bench methods whose models get the IP-Adapter (full first: the reference)")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    state, losses = train_ip_adapter(args.steps, args.batch, args.lr, args.seed)
    from safetensors.torch import save_file

    ip_path = args.out.with_suffix(".ip_adapter.safetensors")
    save_file({f"{part}.{k}": v.contiguous() for part in state for k, v in state[part].items()}, str(ip_path))
    train_s = time.time() - t0

    classifier = load_digit_classifier()
    null = diffslim.load("zoo:digits-sd").pipe.null_label
    es = image_prompt_eval_set(args.n, null)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=50, batch_size=50)
    labels_t = torch.tensor(es.labels)
    rows, outputs = [], {}
    plain = sample_with_adapters("zoo:digits-sd", "full",
                                 SampleSpec([{"class_label": null}] * args.n, list(range(args.n)),
                                            num_inference_steps=50, batch_size=50))["full"]
    rows.append({"model": "full", "ip_adapter": False, "params": plain["params"],
                 "prompt_acc": quality.digit_accuracy(plain["outputs"], labels_t, classifier)})
    print(json.dumps(rows[-1]), flush=True)
    for method, r in sample_with_adapters("zoo:digits-sd", args.methods, spec, ip_adapter=copy.deepcopy(state)).items():
        out = outputs[method] = r.pop("outputs")
        row = {"model": method, "ip_adapter": True, **r, "prompt_acc": quality.digit_accuracy(out, labels_t, classifier)}
        if method != "full":
            row["psnr_to_full_ip"] = float(quality.psnr(out, outputs["full"]).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)

    from diffslim.report import image_grid

    grid = torch.cat([es.real_images[:10], plain["outputs"][:10]] + [outputs[m][:10] for m in outputs])
    image_grid(grid, nrow=10, upscale=4).save(args.out.with_suffix(".png"))
    result = {"command": "OMP_NUM_THREADS=2 .venv/bin/python bench/ip_adapter_transfer.py " + " ".join(argv or sys.argv[1:]),
              "args": {k: str(v) for k, v in vars(args).items()}, "train_seconds": round(train_s, 1),
              "loss_first_last_50": [sum(losses[:50]) / min(50, len(losses)), sum(losses[-50:]) / min(50, len(losses))],
              "rows": rows, "seconds": round(time.time() - t0, 1),
              "grid": args.out.with_suffix(".png").name + " (rows: the reference digits, the full model without the "
                      "IP-Adapter, then each model with it; first 10 inputs)"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
