"""Multi-depth against single depth (Kim and Cho's ablation): for each quality threshold, the shallowest
single depth and the cheapest two-range depth schedule, with their run MACs relative to the full model.

    .venv/bin/python bench/multi_depth_bench.py zoo:digits-sd --thresholds 30,38 [--n 16] [--out bench/results]

Calibration inputs use seeds apart from the evaluation seeds; quality is PSNR against the model's own
50-step outputs on them (what the search optimises). Writes ``multi_depth_<model>.json``.
"""

import argparse
import json
import time
from pathlib import Path

from diffslim.apply import denoiser_attr
from diffslim.evaluate import eval_set_for
from diffslim.methods.depth_search import search_depth, search_multi_depth
from diffslim.models.load import load
from diffslim.sample import SampleSpec, sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--thresholds", default="30,38")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--split", type=int, default=None)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    loaded = load(a.model)
    es = eval_set_for(loaded, a.n, seed=10_000)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=50, call_kwargs=es.call_kwargs, batch_size=a.n)
    ref = sample(loaded.pipe, spec)
    attr = denoiser_attr(loaded.pipe)
    rows = []
    for thr in [float(t) for t in a.thresholds.split(",")]:
        t0 = time.perf_counter()
        single = search_depth(loaded.pipe, attr, spec, ref, thr)
        multi = search_multi_depth(loaded.pipe, attr, spec, ref, thr, a.split)
        m = multi.depth_macs
        row = {"threshold": thr, "single_depth": single.depth, "single_psnr": single.evaluations.get(single.depth),
               "single_macs_ratio": m[single.depth] / m[single.full_depth],
               "multi_depth_high": multi.depth_high, "multi_depth_low": multi.depth_low, "split": multi.split,
               "multi_psnr": multi.evaluations.get((multi.depth_high, multi.depth_low)),
               "multi_macs_ratio": multi.macs_ratio, "multi_runs": multi.sampling_runs,
               "single_runs": single.sampling_runs, "seconds": time.perf_counter() - t0,
               "multi": multi.to_json()}
        rows.append(row)
        print(f"| {thr:g} | {row['single_depth']} | {row['single_macs_ratio']:.3f} | "
              f"{row['multi_depth_high']}/{row['multi_depth_low']} (t>={row['split']}) | "
              f"{row['multi_macs_ratio']:.3f} | {row['multi_runs']} |", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"multi_depth_{a.model.replace(':', '_')}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
