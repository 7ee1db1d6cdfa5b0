"""Which teacher feature a pruned transformer's kept block should match (zoo:digits-dit at 0.5 of params).

The output-loss selection at 0.5 removes blocks 1, 3, 4 and 5. Matched by index, student block 2 is pulled
towards teacher block 2's output, although in the student that output goes straight to the final layer, where
the teacher's block 5 output goes. Matched by stream position (the trainer's default since session 7), each
kept block is matched with the teacher block whose output reaches the same place. Both matchings, normalized
and plain, for each seed; PSNR/SSIM of 32 samples against the full model's.

    OMP_NUM_THREADS=1 python bench/layer_kd_matching.py --steps 200 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from diffslim.bench import _with_denoiser
from diffslim.evaluate import eval_set_for, metrics_fn_for
from diffslim.methods import layer_prune as lp
from diffslim.models.load import load
from diffslim.sample import SampleSpec, sample
from diffslim.train.distill import DistillConfig

REMOVED = [f"transformer_blocks.{i}" for i in (1, 3, 4, 5)]
MATCHINGS = {"index": {"transformer_blocks.0": "transformer_blocks.0", "transformer_blocks.2": "transformer_blocks.2"},
             "stream": "auto"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="bench/results/layer_kd_matching_digits-dit.json")
    a = ap.parse_args()
    loaded = load("zoo:digits-dit")
    es = eval_set_for(loaded, 32)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=loaded.zoo.default_steps,
                      call_kwargs=dict(es.call_kwargs), batch_size=32)
    metrics = metrics_fn_for(loaded, es)
    ref = sample(loaded.pipe, spec)
    out = {"removed": REMOVED, "steps": a.steps, "runs": {}}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for label, feats in MATCHINGS.items():
            for mode in ("normalized", "plain"):
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = DistillConfig(steps=a.steps, batch_size=32, lr=2e-4, out=Path(tmp), checkpoint_every=a.steps,
                                        log_every=10, normalized=mode == "normalized", progress=False, seed=seed,
                                        features=feats)
                    t0 = time.perf_counter()
                    r = lp.distill_pruned(loaded.pipe, lp.prune_layers(loaded.denoiser, REMOVED), cfg)
                    student = load(str(Path(tmp) / "student")).denoiser
                    m = metrics(sample(_with_denoiser(loaded.pipe, student), spec), ref)
                key = f"{label}/{mode}/seed{seed}"
                out["runs"][key] = {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]), "final_losses": r.final_losses,
                                    "seconds": time.perf_counter() - t0}
                print(key, round(out["runs"][key]["psnr"], 2), round(out["runs"][key]["ssim"], 4), flush=True)
                Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
