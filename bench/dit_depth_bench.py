"""Is the first-order output loss's loss on zoo:digits-dit a matter of depth? A deeper digits DiT, trained the same way.

    OMP_NUM_THREADS=1 .venv/bin/python -u bench/dit_depth_bench.py --out ~/.cache/diffslim/dit_depth [--layers 12]
        [--width-heads 4 --head-dim 24] [--steps 4000]

zoo:digits-dit has 6 transformer blocks; DiT-XL/2 and PixArt have 28. At ratio 0.5 the 6-block model loses four
of its six blocks, and its single-layer output losses add up poorly (Pearson r = 0.83, against 0.92-0.98 on the
U-Nets), which is where the paper's one-shot criterion loses to feature similarity. This script trains a variant
with more, narrower blocks (default: 12 blocks of width 96, about the same parameters and training compute as
the 6 blocks of width 128) on the same data, schedule, steps, batch, learning rate and seed as
``diffslim zoo-train digits-dit --steps 4000 --lr 5e-4`` (the zoo model's own run), and writes its pipeline folder ``OUT/pipeline``. The variant is registered
for this process only (``digits-dit-d<L>``): it is a bench model, not part of the zoo.

It checkpoints every 250 steps under ``OUT/checkpoints`` and resumes from the newest one. Then run the same
comparisons as on the zoo models on the folder:

    OMP_NUM_THREADS=1 .venv/bin/python bench/layer_prune_bench.py --models OUT/pipeline --kd-steps 0 --suffix _d12
    OMP_NUM_THREADS=1 .venv/bin/python bench/layer_proxy_bench.py --models OUT/pipeline --ratios 0.3,0.5,0.7
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from diffslim.train import zoo as zoo_train
from diffslim.zoo.registry import ZOO


def register_variant(layers: int, heads: int, head_dim: int) -> str:
    """Register ``digits-dit-d<layers>`` (digits-dit with another depth and width) for this process; its name."""
    base = ZOO["digits-dit"]
    name = f"digits-dit-d{layers}"
    ZOO[name] = replace(base, name=name, description=f"{base.description}; {layers} blocks of width {heads * head_dim}",
                        denoiser_config={**base.denoiser_config, "num_layers": layers,
                                         "num_attention_heads": heads, "attention_head_dim": head_dim})
    return name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=24)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    a = p.parse_args(argv)
    name = register_variant(a.layers, a.heads, a.head_dim)
    folder = zoo_train.train(name, a.out, a.steps, a.batch_size, a.lr, checkpoint_every=250)
    print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
