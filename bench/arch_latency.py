"""Do the structural methods' MACs savings become wall-time savings on a real architecture? (random weights)

Builds a config-only model (SD-1.5's U-Net, DiT-XL/2, PixArt, ...) with random weights (speed does not depend on
the values; ``diffslim.load(..., random_weights=True)``), derives the structural variants from it (BK-SDM Base /
Small / Tiny and depth skipping on U-Nets, layer pruning of transformer blocks) and times one denoiser call of
each, interleaved round by round in one process, so that every ratio compares calls made under the same load.
Writes a JSON and a scatter plot of the speedup against the MACs saved.

    OMP_NUM_THREADS=2 .venv/bin/python bench/arch_latency.py --config src/diffslim/configs/sd15-unet \\
        --height 256 --width 256 --out bench/results/arch_latency_sd15_cpu.json

On a GPU: ``--device cuda --dtype float16 --height 512 --width 512 --batch 4``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def variants_of(den, spec: str):
    """``[(name, denoiser)]`` for the comma-separated ``spec``: full, bk-sdm:V, depth:N, layers:R (R of the params,
    a random selection among the transformer blocks or layers, seed 0)."""
    from diffslim.methods.depth_skip import depth_skip
    from diffslim.methods.layer_prune import bk_sdm_layers, candidates, prune_layers, score_layers, select

    out = []
    for item in spec.split(","):
        name, _, arg = item.partition(":")
        if name == "full":
            out.append((item, den))
        elif name == "bk-sdm":
            out.append((item, prune_layers(den, bk_sdm_layers(den, arg))))
        elif name == "depth":
            out.append((item, depth_skip(den, int(arg))))
        elif name == "layers":
            layers = candidates(den)
            total = sum(p.numel() for p in den.parameters())
            chosen = select(layers, score_layers(den, layers, "random", seed=0), float(arg), total)
            out.append((item, prune_layers(den, chosen)))
        else:
            raise SystemExit(f"unknown variant {item!r}; accepted: full, bk-sdm:base|small|tiny, depth:N, layers:R")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="src/diffslim/configs/sd15-unet", help="a config-only model folder")
    ap.add_argument("--variants", default=None, help="default: full,bk-sdm:base,bk-sdm:small,bk-sdm:tiny and "
                                                     "three depths for a U-Net; full,layers:0.3,layers:0.5 else")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=5, help="timed calls of each variant, interleaved")
    ap.add_argument("--compile", action="store_true", help="torch.compile (inductor) each variant first")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON only (no PNG beside it)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    from diffslim.models.macs import default_inputs
    from diffslim.measure.profile import profile_denoiser, timed_call
    from diffslim.methods.depth_skip import max_depth
    from diffslim.methods.layer_prune import is_unet
    from diffslim.models.load import load

    loaded = load(a.config, device=a.device, dtype=a.dtype, random_weights=True)
    den = loaded.denoiser
    spec = a.variants
    if spec is None:
        if is_unet(den):
            n = max_depth(den)
            spec = f"full,bk-sdm:base,bk-sdm:small,bk-sdm:tiny,depth:{n - 2},depth:{n - 4},depth:{n - 6}"
        else:
            spec = "full,layers:0.3,layers:0.5"
    variants = variants_of(den, spec)
    rows, calls = [], []
    for name, v in variants:
        p = profile_denoiser(loaded, v, a.height, a.width, timing=False)
        rows.append({"variant": name, "params": p["params"], "macs": p["macs"]})
        args, kwargs = default_inputs(v, height=p["sample_size"][0], width=p["sample_size"][1], batch=a.batch)
        fn = torch.compile(v) if a.compile else v
        calls.append((fn, args, kwargs))
    def once(fn, args, kwargs) -> float:
        return timed_call(fn, args, kwargs, torch.device(a.device))

    times = [[] for _ in calls]
    with torch.no_grad():
        first = [once(*c) for c in calls]  # warm-up (and compilation)
        for _ in range(a.rounds):
            for i, c in enumerate(calls):
                times[i].append(once(*c))
    full = rows[0]
    t_full = statistics.median(times[0])
    for r, t, f in zip(rows, times, first):
        med = statistics.median(t)
        r.update(first_call_s=f, latency_s=med, latencies_s=t, params_ratio=r["params"] / full["params"],
                 macs_ratio=r["macs"] / full["macs"], speedup=t_full / med)
    result = {"command": "OMP_NUM_THREADS=%s .venv/bin/python " % torch.get_num_threads() + " ".join(sys.argv),
              "config": a.config, "class": type(den).__name__, "input": p["sample_size"], "batch": a.batch,
              "device": a.device, "dtype": a.dtype, "compiled": a.compile, "threads": torch.get_num_threads(),
              "rounds": a.rounds, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    if not a.no_plot:
        _figure(result).savefig(a.out.with_suffix(".png"), dpi=110, bbox_inches="tight")
    for r in rows:
        print(f"{r['variant']:>14}: params {r['params_ratio']:.3f}, MACs {r['macs_ratio']:.3f}, "
              f"{r['latency_s'] * 1e3:8.1f} ms, speedup {r['speedup']:.2f} (ideal {1 / r['macs_ratio']:.2f})")
    return 0


def _figure(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    xs = [1 / r["macs_ratio"] for r in result["rows"]]
    ys = [r["speedup"] for r in result["rows"]]
    top = max(xs + ys) * 1.08
    ax.plot([1, top], [1, top], color="0.7", ls="--", lw=1, label="speedup = MACs saved")
    ax.scatter(xs, ys, color="C0", zorder=3)
    for r, x, y in zip(result["rows"], xs, ys):
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("full MACs / variant MACs")
    ax.set_ylabel("measured speedup of one denoiser call")
    h, w = result["input"]
    ax.set_title(f"{Path(result['config']).name}: {h}x{w} latents, batch {result['batch']}, "
                 f"{result['device']} {result['dtype']}" + (" compiled" if result["compiled"] else ""), fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
