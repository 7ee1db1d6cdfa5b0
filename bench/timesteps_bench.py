"""Few-step schedules on the zoo: gamma (searched) against uniform, Karras and AYS at 5, 10 and 20 steps.

    .venv/bin/python bench/timesteps_bench.py zoo:digits-sd [--n 50] [--out bench/results]
    .venv/bin/python bench/timesteps_bench.py zoo:digits-sd --kinds dpm,xue --tag solver

Every DDIM schedule samples the same inputs and seeds with the same (non-uniform) DDIM sampler; quality
is PSNR/SSIM against the 50-step DDIM outputs. Gamma is searched on separate calibration seeds.
``dpm``/``xue`` rows sample with DPM-Solver++ (2M): diffusers' default spacing against the solver-aware
time steps of Xue et al. (CVPR 2024), which need no sampling.
"""

import argparse
import json
from pathlib import Path

from diffslim.bench import run_bench
from diffslim.evaluate import eval_set_for, finite, metrics_fn_for
from diffslim.models.load import load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", default="5,10,20")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--kinds", default="steps,uniform,karras,ays,gamma",
                    help="bench method names to run at each step count (also: dpm, xue)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    a = ap.parse_args()
    loaded = load(a.model)
    es = eval_set_for(loaded, a.n)
    methods = []
    for n in [int(s) for s in a.steps.split(",")]:
        methods += [f"{kind}:{n}" for kind in a.kinds.split(",")]
    res = run_bench(loaded, ",".join(methods), es, default_steps=50, batch_size=a.n,
                    metrics_fn=metrics_fn_for(loaded, es))
    rows = [{k: finite(v) for k, v in r.items()} for r in res.rows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"timesteps{'_' + a.tag if a.tag else ''}_{a.model.replace(':', '_')}.json").write_text(json.dumps(rows, indent=2))
    print("| method | psnr | ssim | task | notes |")
    for r in rows:
        task = r.get("digit_accuracy", r.get("psnr_gt"))
        print(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {task:.4g} | {r.get('notes', '')} |")


if __name__ == "__main__":
    main()
