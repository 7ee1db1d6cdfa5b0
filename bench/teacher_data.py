"""Distil on the teacher's own samples instead of its training data, and compare (a zoo model, where both exist).

For a user without the training set, ``distill --data PROMPTS.txt`` (and the bench's ``+kd`` on a text-to-image
pipeline without ``--data``) trains on images the full pipeline samples itself. This measures what that costs on a
class-conditional zoo model, whose digits are at hand: the teacher samples N images of the class labels 0-9 (cycled;
seeds apart from evaluation's), then the bench runs the same methods twice, on the zoo's digits and on those samples
(with ``--data FOLDER`` the layers are scored on the folder too), once per distillation seed, and reports PSNR, SSIM
and digit accuracy of each row against the full model on the same evaluation inputs.

    OMP_NUM_THREADS=2 .venv/bin/python bench/teacher_data.py zoo:digits-sd --methods layers:0.5,layers:0.5+kd \\
        --samples 1797 --seeds 0,1,2 --n 16 --out bench/results/teacher_data_digits-sd.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from diffslim import bench
from diffslim.cache import cache_root
from diffslim.evaluate import eval_set_for, finite, metrics_fn_for
from diffslim.models.load import load
from diffslim.sample import SampleSpec, write_samples
from kd_seeds import seed_means  # bench/, beside this script

METRICS = ("psnr", "ssim", "digit_accuracy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--methods", required=True)
    ap.add_argument("--samples", type=int, default=1797, help="teacher samples (the digits set has 1797 images)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--task-weight", type=float, default=1.0,
                    help="weight of the diffusion task loss in the distillation (the bench's --kd-task-weight)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds {args.seeds!r}: give integers, e.g. 0,1,2")
    loaded = load(args.model)
    if loaded.zoo is None or loaded.zoo.task != "class":
        sys.exit(f"error: {args.model}: give a class-conditional zoo model (its labels are the teacher's inputs)")
    steps = loaded.zoo.default_steps
    t0 = time.perf_counter()
    spec = SampleSpec([{"class_label": i % 10} for i in range(args.samples)],
                      [300_000 + i for i in range(args.samples)], num_inference_steps=steps, batch_size=256)
    folder = write_samples(loaded.pipe, spec, cache_root() / "teacher_data" / f"{loaded.zoo.name}_{args.samples}_{steps}",
                           progress=True)
    sampled_s = time.perf_counter() - t0
    print(f"{args.samples} teacher samples in {folder} ({sampled_s:.0f}s)", flush=True)
    es = eval_set_for(loaded, args.n)
    base_kd = dict(bench.DEFAULT_KD)
    results = {}
    for data in ("zoo", str(folder)):
        label = "zoo" if data == "zoo" else "teacher samples"
        for seed in seeds:
            bench.DEFAULT_KD = base_kd if seed == 0 else {**base_kd, "seed": seed}
            res = bench.run_bench(loaded, args.methods, es, default_steps=steps, batch_size=args.n,
                                  metrics_fn=metrics_fn_for(loaded, es), progress=False, data=data,
                                  task_weight=args.task_weight)
            results.setdefault(label, {})[seed] = {
                r["method"]: {k: finite(r[k]) for k in METRICS if k in r} | {"params": r["params"],
                                                                            "notes": r.get("notes", "")}
                for r in res.rows}
            print(f"{label}, seed {seed}: " + "; ".join(f"{m} {v['psnr']:.2f} dB" for m, v in
                                                        results[label][seed].items() if v.get("psnr") is not None),
                  flush=True)
    bench.DEFAULT_KD = base_kd
    summary = []
    for label, per_seed in results.items():
        for m in per_seed[seeds[0]]:
            summary.append({"data": label, "method": m, "params": per_seed[seeds[0]][m]["params"]}
                           | seed_means(per_seed, seeds, m, METRICS))
    out = {"command": "OMP_NUM_THREADS=2 .venv/bin/python bench/teacher_data.py " + " ".join(sys.argv[1:]),
           "model": args.model, "task_weight": args.task_weight, "samples": args.samples, "sample_steps": steps, "seeds": seeds, "n_eval": args.n,
           "seconds": time.perf_counter() - t0, "rows": summary, "per_seed": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in summary:
        print(f"{r['data']:>16} {r['method']:>16}: PSNR mean {r.get('psnr_mean', float('nan')):.2f} dB "
              f"({', '.join(f'{v:.2f}' for v in r.get('psnr', []))}), digit accuracy "
              f"{r.get('digit_accuracy_mean', float('nan')):.3f}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
