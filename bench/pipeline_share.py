"""Where does an SD-1.5 sampling run spend its time, before and after compressing the U-Net? (random weights)

Builds a Stable Diffusion 1.5-shaped pipeline with random weights (SD-1.5's U-Net from its config, its VAE and
its CLIP ViT-L/14 text encoder from their published sizes, a stand-in tokenizer that still pads to 77 tokens):
speed does not depend on the values. Times each component of whole sampling runs
(``diffslim.measure.profile.time_components``, the tool behind ``diffslim profile MODEL --pipeline``) for the full
U-Net, BK-SDM Tiny and a DeepCache plan, in one process. The denoiser's share bounds what compressing it alone can
give: at most ``1 / (1 - share)``.

    OMP_NUM_THREADS=2 .venv/bin/python bench/pipeline_share.py --size 256 --steps 10 \\
        --out bench/results/pipeline_share_sd15_cpu.json

On a GPU: ``--device cuda --dtype float16 --size 512 --steps 25 --batch 4``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def sd15_pipeline(device: str, dtype: str):
    """A StableDiffusionPipeline of SD-1.5's shapes with random weights on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffslim.models.load import load, resolve_device, resolve_dtype

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    unet = load("src/diffslim/configs/sd15-unet", device=dev, dtype=dt, random_weights=True).denoiser
    with torch.device(dev):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=4, sample_size=512).to(dt)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768)).to(dt)
    folder = Path(tempfile.mkdtemp())  # a stand-in vocabulary: the encoder still sees 77 tokens per prompt
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, **{c + "</w>": 3 + i for i, c in
                                                                 enumerate("abcdefghijklmnopqrstuvwxyz")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image size in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="prompts per pipeline call")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--deepcache", type=int, default=3, help="DeepCache interval of the plan variant")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    from diffslim.measure.profile import time_components
    from diffslim.methods.layer_prune import bk_sdm_layers, prune_layers
    from diffslim.methods.skip_plan import apply_skip_plan, deepcache_plan, plan_units, remove_skip_plan

    pipe = sd15_pipeline(a.device, a.dtype)
    pipe.set_progress_bar_config(disable=True)
    full_unet = pipe.unet

    def run():
        g = [torch.Generator("cpu").manual_seed(i) for i in range(a.batch)]
        pipe(["a photo of a cat"] * a.batch, height=a.size, width=a.size, num_inference_steps=a.steps,
             guidance_scale=7.5, generator=g, output_type="np")

    rows = []
    for name in ("full", "bk-sdm:tiny", f"deepcache:{a.deepcache}"):
        pipe.unet = full_unet
        units = None
        if name == "bk-sdm:tiny":
            pipe.unet = prune_layers(full_unet, bk_sdm_layers(full_unet, "tiny"))
        elif name.startswith("deepcache"):
            units = plan_units(full_unet, "fine")
            apply_skip_plan(full_unet, deepcache_plan(units, a.steps, a.deepcache), units)
        run()  # warm-up
        with time_components(pipe) as tc:
            run()
        if units is not None:
            remove_skip_plan(full_unet)
        comps = tc.rows(denoiser="unet")
        share = next(r["share"] for r in comps if r["denoiser"])
        rows.append({"variant": name, "total_s": tc.total, "components": comps, "unet_share": share,
                     "max_speedup_from_the_unet": 1 / (1 - share)})
        print(f"{name:>12}: {tc.total:7.2f} s; " + ", ".join(f"{r['component']} {100 * r['share']:.1f}%"
                                                             for r in comps))
    full = rows[0]["total_s"]
    for r in rows:
        r["speedup"] = full / r["total_s"]
    result = {"command": "OMP_NUM_THREADS=%s .venv/bin/python " % torch.get_num_threads() + " ".join(sys.argv),
              "size": a.size, "steps": a.steps, "batch": a.batch, "device": a.device, "dtype": a.dtype,
              "guidance_scale": 7.5, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
