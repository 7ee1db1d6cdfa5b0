"""What a stock-exportable layer selection costs on U-Nets: held-out output loss of the output-loss criterion's
choice with and without `--stock` (pairs in line in the down and up blocks, the whole mid block), and BK-SDM's.

    OMP_NUM_THREADS=2 .venv/bin/python bench/stock_selection.py --models zoo:digits-sd,zoo:sr \
        --ratios 0.3,0.5 --out bench/results/stock_selection.json

Scores on 32 calibration triples (seed 0), judges every choice on 64 other triples (seed 1), as the layer-pruning
bench does. Writes one JSON with a row per model and ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diffslim
from diffslim.errors import UserError
from diffslim.methods import layer_prune as lp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="zoo:digits-sd,zoo:sr")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--out", type=Path, default=Path("bench/results/stock_selection.json"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for model in a.models.split(","):
        loaded = diffslim.load(model)
        unet = loaded.denoiser
        calib = lp.calibration(loaded.pipe, n=32, seed=0)
        held = lp.calibration(loaded.pipe, n=64, seed=1)
        ref = held.run(unet)
        names = lp.candidate_names(unet)
        layers = lp.candidates(unet, names=names)
        total = sum(p.numel() for p in unet.parameters())
        t0 = time.perf_counter()
        scores = lp.score_layers(unet, layers, "output-loss", calib)
        by_name = {l.name: l for l in layers}

        def judge(removed):
            return {"held_out_loss": lp.output_loss(unet, held, removed, reference=ref),
                    "params_removed": sum(by_name[n].params if n in by_name else 0 for n in removed) / total,
                    "layers": len(removed), "stock": lp._stock_describes(unet, removed)}

        for ratio in map(float, a.ratios.split(",")):
            row = {"model": model, "ratio": ratio, "free": judge(lp.select(layers, scores, ratio, total))}
            try:
                row["stock"] = judge(lp.stock_select(unet, layers, scores, ratio, total))
            except UserError as e:
                row["stock"] = {"error": str(e)}
            rows.append(row)
            print(json.dumps(row))
        for v in ("base", "small"):
            bk = lp.bk_sdm_layers(unet, v)
            pruned = lp.prune_layers(unet, bk)
            removed_share = 1 - sum(p.numel() for p in pruned.parameters()) / total
            rows.append({"model": model, "bk-sdm": v, "held_out_loss": lp.output_loss(unet, held, bk, reference=ref),
                         "params_removed": removed_share})
            print(json.dumps(rows[-1]))
        print(f"{model}: scored in {time.perf_counter() - t0:.0f}s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": "bench/stock_selection.py " + " ".join(argv or []), "rows": rows},
                                indent=1))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
