"""Is the best gamma the same before and after depth-skip? (Kim and Cho report it nearly is.)

    .venv/bin/python bench/gamma_vs_depth.py zoo:digits-sd --steps 10 --depths 13,9,7 [--n 16]

For each depth, gamma is searched (greedy and bounded) for the depth-skipped model against its own
50-step outputs on the same calibration inputs; the table prints each depth's best gamma and PSNR.
"""

import argparse
import json
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--depths", default="13,9,7")
    ap.add_argument("--n", type=int, default=16)
    a = ap.parse_args()
    print("| depth | greedy gamma | greedy PSNR | bounded gamma | bounded PSNR |")
    for d in [int(x) for x in a.depths.split(",")]:
        cmd = [sys.executable, "-m", "diffslim.cli", "timesteps", a.model, "--steps", str(a.steps), "--n", str(a.n),
               "--method", "both", "--json"]
        from diffslim.methods.depth_skip import max_depth
        from diffslim.models.load import load

        if d < max_depth(load(a.model).denoiser):
            cmd += ["--depth", str(d)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        g, b = r["methods"]["greedy"], r["methods"]["bounded"]
        print(f"| {d} | {g['gamma']:.3f} | {g['psnr']:.2f} | {b['gamma']:.3f} | {b['psnr']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
