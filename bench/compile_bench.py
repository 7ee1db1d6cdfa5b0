"""Do the compression methods' speedups survive torch.compile? (zoo models, inductor on the CPU)

Users who pay for GPU time compile their denoiser. A skip plan saves time by not running blocks at some
steps; compilation saves time by fusing what runs. This bench runs the same variants twice on the same inputs
in one process: eager, and with every variant's denoiser compiled by ``diffslim.compiling.compile_denoiser``
(inductor; a skip plan's or multi-depth schedule's per-step decisions stay eager and each unit module is
compiled on its own). Per variant it reports the eager and compiled wall time of sampling (after a warm-up
that compiles), the compile time, each one's speedup over the full model in the same mode, and how far the
compiled outputs are from the eager ones (PSNR; inductor reorders float arithmetic, so they are close, not
equal).

``--whole`` also times the obvious alternative for the first skip-plan variant: ``torch.compile`` of the
whole denoiser with the plan's hooks inside. Dynamo then guards on the step index, recompiles at each new
step until its recompile limit (8), and runs the rest eagerly; the JSON records how many graphs it compiled.

    OMP_NUM_THREADS=2 .venv/bin/python bench/compile_bench.py --model zoo:digits-dit \\
        --methods full,layers:0.5,dipgo:@bench/results/dipgo_digits-dit_recipe.json --whole \\
        --out bench/results/compile_digits-dit.json

Writes the JSON (with the command) and a bar chart of the speedups beside it (``.png``). Timings are from one process on a shared machine: compare the ratios
within one run, not the seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import diffslim
from diffslim.bench import METHODS, BenchContext, parse_methods, run_bench
from diffslim.evaluate import eval_set_for, metrics_fn_for
from diffslim.measure import quality
from diffslim.sample import SampleSpec, sample


def whole_model_compile(loaded, method: str, evalset, steps: int, batch_size: int) -> dict:
    """Time ``method`` (a skip-plan variant) with ``torch.compile`` of its whole denoiser, hooks inside."""
    import torch._dynamo

    base = SampleSpec(inputs=evalset.inputs, seeds=evalset.seeds, num_inference_steps=steps,
                      call_kwargs=dict(evalset.call_kwargs), batch_size=batch_size)
    ctx = BenchContext(loaded=loaded, base_spec=base, default_steps=steps)
    (name, arg), = parse_methods(method)
    variant = METHODS[name](arg, ctx)
    den = variant.pipe.denoiser
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        den.compile()
        t0 = time.perf_counter()
        sample(variant.pipe, variant.spec.replace(inputs=variant.spec.inputs[:batch_size],
                                                  seeds=variant.spec.seeds[:batch_size]), show_progress=False)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = sample(variant.pipe, variant.spec, show_progress=False)
        seconds = time.perf_counter() - t0
    finally:
        den._compiled_call_impl = None
        if variant.cleanup is not None:
            variant.cleanup()
    stats = torch._dynamo.utils.counters["stats"]
    return {"method": variant.method, "seconds": seconds, "compile_seconds": warm,
            "unique_graphs": int(stats["unique_graphs"]),
            "graph_breaks": int(sum(torch._dynamo.utils.counters["graph_break"].values())), "output": out}


def plot(result: dict, path: Path) -> None:
    """Grouped bars: each variant's speedup over the EAGER full model, eager and compiled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["method"].replace("dipgo:recipe", "dipgo (recipe)") for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.6))
    eager = [r["eager_speedup_vs_full"] for r in rows]
    comp = [r["compiled_speedup_vs_eager_full"] for r in rows]
    ax.bar([i - 0.2 for i in x], eager, 0.4, label="eager")
    ax.bar([i + 0.2 for i in x], comp, 0.4, label="compiled (inductor)")
    whole = result.get("whole_model_compile")
    if whole is not None:
        i = next(k for k, r in enumerate(rows) if r["method"] == whole["method"])
        ax.plot([i + 0.2], [rows[0]["eager_seconds"] / whole["seconds"]], "kx", ms=9,
                label="that plan, whole denoiser compiled")
    for i, (e, c) in enumerate(zip(eager, comp)):
        ax.text(i - 0.2, e, f"{e:.2f}", ha="center", va="bottom", fontsize=7)
        ax.text(i + 0.2, c, f"{c:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speedup over the eager full model")
    ax.set_title(f"{result['model']}: {result['n']} samples, {result['steps']} steps, {result['threads']} CPU threads",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zoo:digits-dit")
    ap.add_argument("--methods", default="full,layers:0.5,dipgo:@bench/results/dipgo_digits-dit_recipe.json")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant and mode; the best counts")
    ap.add_argument("--mode", default=None, help="torch.compile mode")
    ap.add_argument("--whole", action="store_true", help="also time a whole-denoiser compile of the first skip plan")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    t_start = time.time()
    loaded = diffslim.load(a.model)
    es = eval_set_for(loaded, a.n, seed=0)
    steps = a.steps or (loaded.zoo.default_steps if loaded.zoo else 50)
    metrics = metrics_fn_for(loaded, es)
    kw = dict(default_steps=steps, batch_size=a.batch_size, metrics_fn=metrics, progress=False, repeats=a.repeats)
    eager = run_bench(loaded, a.methods, es, **kw)
    compiled = run_bench(loaded, a.methods, es, compile={"mode": a.mode} if a.mode else {}, **kw)
    rows = []
    for e, c in zip(eager.rows, compiled.rows):
        out_e, out_c = eager.outputs[e["method"]], compiled.outputs[c["method"]]
        rows.append({
            "method": e["method"], "params": e["params"], "macs_ratio": e["macs_ratio"],
            "eager_seconds": e["seconds"], "compiled_seconds": c["seconds"], "compile_seconds": c["compile_seconds"],
            "compiled": c["compiled"], "compile_speedup": e["seconds"] / c["seconds"],
            "eager_speedup_vs_full": e["speedup"], "compiled_speedup_vs_full": c["speedup"],
            "compiled_speedup_vs_eager_full": eager.rows[0]["seconds"] / c["seconds"],
            "psnr_compiled_to_eager": float(quality.psnr(out_c, out_e).mean()),
            "max_abs_diff_compiled_to_eager": float((out_c - out_e).abs().max()),
            "eager": {k: e[k] for k in ("psnr", "ssim", "digit_accuracy", "psnr_gt") if k in e},
            "compiled_quality": {k: c[k] for k in ("psnr", "ssim", "digit_accuracy", "psnr_gt") if k in c},
        })
        print(f"{e['method']:40s} eager {e['seconds']:.3f}s  compiled {c['seconds']:.3f}s "
              f"(x{rows[-1]['compile_speedup']:.2f}, compile {c['compile_seconds']:.0f}s, {c['compiled']})  "
              f"vs full: eager x{e['speedup']:.2f} compiled x{c['speedup']:.2f}", flush=True)
    result = {"command": "OMP_NUM_THREADS=2 .venv/bin/python " + " ".join(sys.argv), "model": a.model,
              "n": a.n, "steps": steps, "batch_size": a.batch_size, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    if a.whole:
        plan_methods = [r for r in compiled.rows if r["compiled"] == "skip-plan units"]
        if plan_methods:
            m = plan_methods[0]["method"]
            spec = next(x for x in a.methods.split(",") if x.split(":")[0] == m.split(":")[0])
            w = whole_model_compile(loaded, spec, es, steps, a.batch_size)
            out_w = w.pop("output")
            e = next(r for r in rows if r["method"] == m)
            w.update({"regional_compiled_seconds": e["compiled_seconds"], "eager_seconds": e["eager_seconds"],
                      "psnr_to_eager": float(quality.psnr(out_w, eager.outputs[m]).mean())})
            result["whole_model_compile"] = w
            print(f"whole-model compile of {m}: {w['seconds']:.3f}s (regional {e['compiled_seconds']:.3f}s, eager "
                  f"{e['eager_seconds']:.3f}s), {w['unique_graphs']} graphs, {w['graph_breaks']} breaks, "
                  f"compile {w['compile_seconds']:.0f}s", flush=True)
    result["wall_seconds"] = time.time() - t_start
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=float))
    plot(result, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png').name} ({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
