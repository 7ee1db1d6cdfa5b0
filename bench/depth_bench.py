"""Depth-skip on the zoo: size, MACs, measured speedup and quality at every depth (README figures).

    .venv/bin/python bench/depth_bench.py zoo:digits-sd [--n 50] [--ft 7,9] [--out bench/results]

``--ft`` adds ``depth:N+ft`` rows: the depth-N model after the default short fine-tune (cached).

One bench run: every depth and the full model sample the same inputs and seeds in one process, so
speedups are ratios of wall times measured side by side.
"""

import argparse
import json
from pathlib import Path

from diffslim.bench import run_bench
from diffslim.evaluate import eval_set_for, finite, metrics_fn_for
from diffslim.methods.depth_skip import max_depth
from diffslim.models.load import load
from diffslim.report import Report, add_bench_section


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ft", default="", help="depths to also bench after the default fine-tune, e.g. 7,9")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    loaded = load(a.model)
    full = max_depth(loaded.denoiser)
    methods = ",".join(f"depth:{d}" for d in range(full - 1, 0, -1))
    methods += "".join(f",depth:{int(d)}+ft" for d in a.ft.split(",") if d.strip())
    es = eval_set_for(loaded, a.n)
    res = run_bench(loaded, methods, es, default_steps=a.steps, batch_size=a.n, repeats=a.repeats,
                    metrics_fn=metrics_fn_for(loaded, es))
    rows = [{k: finite(v) for k, v in r.items()} for r in res.rows]
    out = Path(a.out) / f"depth_{a.model.replace(':', '_')}"
    rep = Report(f"depth-skip on {a.model}")
    add_bench_section(rep, a.model, rows, res.outputs)
    rep.write(out)
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    keys = ("method", "params", "macs_ratio", "speedup", "psnr", "ssim", "digit_accuracy", "psnr_gt", "ssim_gt")
    print("| " + " | ".join(k for k in keys if k in rows[0]) + " |")
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys if k in rows[0]) + " |")


if __name__ == "__main__":
    main()
