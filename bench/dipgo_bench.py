"""DiP-GO learned block skipping vs DeepCache, fewer steps, random search, GA and diffusers' caches.

    OMP_NUM_THREADS=1 python bench/dipgo_bench.py [--models digits-sd,digits-dit,sr] [--n 16] [--ablation] [--no-warm]

Writes bench/results/dipgo_<model>.json (rows: macs_ratio, speedup, psnr, ssim, task metrics; DiP-GO
training seconds in the notes), dipgo_<model>_plan.png (heatmap), dipgo_<model>_pareto.png,
dipgo_<model>_recipe.json (the learned plan), dipgo_transfer.json (the digits-sd plan run with other
schedulers by step index) and, with --ablation, dipgo_ablation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = {"digits-sd": 0.8, "digits-dit": 0.8, "sr": 0.6}
STEPS = 50


def _quiet():
    import logging
    import warnings

    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _steps_at_budget(ratio: float) -> int:
    """The most steps within ``1 - ratio`` of the full run's MACs (floor, with a guard: 50 * (1 - 0.8) is
    9.999999999999998 in floating point, and the fair baseline at R = 0.8 is 10 steps, not 9)."""
    return max(1, int(STEPS * (1 - ratio) + 1e-9))


def _deepcache_at_budget(units, ratio):
    """The DeepCache setting (interval K, branch 0) with the most MACs that stays within ``1 - ratio``."""
    from diffslim.methods.skip_plan import deepcache_plan, plan_macs_ratio

    best = None
    for k in range(2, STEPS + 1):
        r = plan_macs_ratio(deepcache_plan(units, STEPS, k, 0), units)
        if r <= 1 - ratio + 1e-9:
            best = (k, 0, r)
            break
    return best


def bench_model(name: str, n: int, batch: int, warm: bool = True) -> dict:
    from diffslim.bench import run_bench
    from diffslim.evaluate import eval_set_for, finite, metrics_fn_for
    from diffslim.methods.skip_plan import effective_plan, plan_macs_ratio, plan_units_at
    from diffslim.models.load import load
    from diffslim.recipe import Recipe, SkipPlan
    from diffslim.report import pareto_figure, plan_heatmap
    from diffslim.sample import SampleSpec

    ratio = RATIOS[name]
    loaded = load(f"zoo:{name}")
    loaded.pipe.set_progress_bar_config(disable=True)
    es = eval_set_for(loaded, n, seed=0)
    # MACs of the units measured on the call the evaluation inputs make (zoo:sr works at their size)
    units = plan_units_at(loaded.pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=STEPS), "fine")
    steps_n = _steps_at_budget(ratio)
    methods = [f"dipgo:{ratio}"] + ([f"dipgo:{ratio}:steps"] if warm else []) + [
        f"steps:{steps_n}", f"random:{ratio}", f"ga:{ratio}"]
    skipped = {}
    if units.family != "transformer":
        dc = _deepcache_at_budget(units, ratio)
        if dc is None:
            skipped["deepcache"] = f"no DeepCache interval reaches MACs <= {1 - ratio:g} at {STEPS} steps"
        else:
            methods.insert(1, f"deepcache:{dc[0]}:{dc[1]}")
    else:
        dc = None
        methods += ["fbcache", "fastercache", "taylorseer", "magcache", "pab"]
        skipped["deepcache"] = "DeepCache caches a U-Net's deep branch; a DiT has no skip branches"
    t0 = time.perf_counter()
    # the learned plan (trained here, or the cached run the bench row below reuses): recipe, heatmap
    from diffslim.bench import BenchContext, _default_dipgo
    from diffslim.methods.dipgo import plan_from_scores

    ctx = BenchContext(loaded=loaded, base_spec=SampleSpec(es.inputs, es.seeds, num_inference_steps=STEPS),
                       default_steps=STEPS)
    plan, _, notes, train_s = _default_dipgo(ctx, ratio)
    if dc is not None and dc[2] < 1 - ratio - 1e-6:
        # DeepCache's best setting within the budget uses fewer MACs than the budget: the same pruner's scores
        # post-processed to DeepCache's own MACs, and fewer steps there, compare them at equal MACs
        root = Path(notes.rsplit("cached at ", 1)[1])
        at_dc = plan_from_scores(np.load(root / "scores.npy"), units, 1 - dc[2])
        path = RESULTS / f"dipgo_{name}_recipe_at_deepcache_budget.json"
        Recipe(model=f"zoo:{name}", description=f"DiP-GO plan of the R={ratio} pruner, post-processed to DeepCache "
                                                f"{dc[0]}:{dc[1]}'s MACs ({dc[2]:.4f})",
               skip_plan=SkipPlan(granularity="fine", units=list(units.names), plan=at_dc.tolist(),
                                  provenance={"method": "dipgo", "ratio": ratio, "post_processed_ratio": 1 - dc[2],
                                              "macs_ratio": plan_macs_ratio(at_dc, units)})).save(path)
        methods.insert(2, f"dipgo:@{path}")
        if max(1, int(STEPS * dc[2] + 1e-9)) != steps_n:
            methods.insert(3, f"steps:{max(1, int(STEPS * dc[2] + 1e-9))}")
    res = run_bench(loaded, "full," + ",".join(methods), es, default_steps=STEPS, batch_size=batch,
                    metrics_fn=metrics_fn_for(loaded, es), progress=False)
    rows = [{k: finite(v) for k, v in r.items()} for r in res.rows]
    for r in rows:  # the only recipe row is the pruner's plan at DeepCache's MACs
        if r["method"] == "dipgo:recipe":
            r["method"] = f"dipgo:{ratio} at deepcache MACs"
    Recipe(model=f"zoo:{name}", description=f"DiP-GO plan, R={ratio}",
           skip_plan=SkipPlan(granularity="fine", units=list(units.names), plan=plan.tolist(),
                              provenance={"method": "dipgo", "ratio": ratio, "train_seconds": round(train_s, 1),
                                          "macs_ratio": plan_macs_ratio(plan, units)})
           ).save(RESULTS / f"dipgo_{name}_recipe.json")
    plan_heatmap(plan, units.names, f"zoo:{name} DiP-GO plan R={ratio} (grey: kept but idle)",
                 effective=effective_plan(plan, units)).savefig(RESULTS / f"dipgo_{name}_plan.png", dpi=110)
    pareto_figure(rows, "psnr", f"zoo:{name}: PSNR vs the full model, {n} inputs").savefig(
        RESULTS / f"dipgo_{name}_pareto.png", dpi=110)
    out = {"model": f"zoo:{name}", "ratio": ratio, "n": n, "steps": STEPS, "dipgo_train_seconds": train_s,
           "rows": rows, "not_applicable": skipped, "seconds": time.perf_counter() - t0,
           "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/dipgo_bench.py --models "
                      f"{name} --n {n} --batch {batch}" + ("" if warm else " --no-warm")}
    (RESULTS / f"dipgo_{name}.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def transfer(n: int, batch: int) -> dict:
    """The digits-sd plan (learned with DDIM) run with other schedulers by step index."""
    from diffslim.bench import run_bench
    from diffslim.evaluate import eval_set_for, finite, metrics_fn_for
    from diffslim.models.load import load

    loaded = load("zoo:digits-sd")
    loaded.pipe.set_progress_bar_config(disable=True)
    es = eval_set_for(loaded, n, seed=0)
    recipe = RESULTS / "dipgo_digits-sd_recipe.json"
    out = {}
    for sched in ("ddim", "dpm++", "euler", "plms"):
        res = run_bench(loaded, f"full,dipgo:@{recipe},steps:10", es, default_steps=STEPS, scheduler=sched,
                        batch_size=batch, metrics_fn=metrics_fn_for(loaded, es), progress=False)
        out[sched] = [{k: finite(v) for k, v in r.items() if k in ("method", "macs_ratio", "speedup", "psnr", "ssim",
                                                                   "digit_accuracy")} for r in res.rows]
    (RESULTS / "dipgo_transfer.json").write_text(json.dumps(out, indent=2))
    return out


# --ablation-settings key: (label in the JSON, DipgoConfig overrides)
ABLATIONS = {"sa": ("unrolled+SA", {}), "no-sa": ("unrolled, no SA", {"self_attention": False}),
             "local": ("local (L2C)+SA", {"objective": "local"})}


def ablation(n: int, iters: int, seeds=(0,), model: str = "digits-sd", labels=tuple(ABLATIONS)) -> dict:
    """``model`` at its bench ratio (digits-sd: R=0.8): self-attention on/off, unrolled vs Learning-to-Cache
    local objective (``labels``: keys of ``ABLATIONS``), one pruner per seed (pruners vary by seed by a few dB, so each
    setting's mean over ``seeds`` is what compares). Writes dipgo_ablation.json (digits-sd) or
    dipgo_ablation_<model>.json."""
    from diffslim.bench import DEFAULT_DIPGO, calibration_spec  # noqa: F401
    from diffslim.methods.dipgo import DipgoConfig, plan_psnr_fn, train_dipgo
    from diffslim.methods.skip_plan import plan_units_at
    from diffslim.models.load import load
    from diffslim.sample import SampleSpec, sample
    from diffslim.evaluate import eval_set_for

    loaded = load(f"zoo:{model}")
    loaded.pipe.set_progress_bar_config(disable=True)
    es = eval_set_for(loaded, n, seed=0)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=STEPS, batch_size=n)
    units = plan_units_at(loaded.pipe, spec, "fine")
    ref = sample(loaded.pipe, spec, show_progress=False)
    score = plan_psnr_fn(loaded.pipe, spec, ref, units)
    out = {"model": model, "ratio": RATIOS[model], "iters": iters, "seeds": list(seeds), "n": n}
    path = RESULTS / ("dipgo_ablation.json" if model == "digits-sd" else f"dipgo_ablation_{model}.json")
    # no restarts; the floor reaches the target at the last step
    settings = dict(DEFAULT_DIPGO, iters=iters, anneal=iters, restarts=1)
    for key in labels:
        label, over = ABLATIONS[key]
        runs = {}
        for seed in seeds:
            cfg = DipgoConfig(ratio=RATIOS[model], num_inference_steps=STEPS, progress=False, seed=seed,
                              **{**settings, **over})
            r = train_dipgo(loaded.pipe, cfg, units)
            runs[seed] = {"psnr": score(r.plan), "macs_ratio": r.macs_ratio, "train_seconds": r.seconds,
                          "final_kept_macs": r.log[-1]["kept_macs"], "final_consistency": r.log[-1]["consistency"]}
            print(label, seed, runs[seed], flush=True)
        out[label] = {"mean_psnr": float(np.mean([v["psnr"] for v in runs.values()])), "runs": runs}
        path.write_text(json.dumps(out, indent=2))
    return out


def timing(models, n: int, repeats: int = 5) -> dict:
    """Wall time of the whole sampling run, interleaved and best of ``repeats``: no plan, the keep-all
    plan (hook overhead), the learned plan, and ``steps:N`` at about the same MACs."""
    from diffslim.evaluate import eval_set_for
    from diffslim.methods.skip_plan import apply_skip_plan, full_plan, plan_macs_ratio, plan_units_at, remove_skip_plan
    from diffslim.models.load import load
    from diffslim.recipe import load_recipe
    from diffslim.sample import SampleSpec, _call_kwargs

    path = RESULTS / "dipgo_timing.json"
    out = json.loads(path.read_text()) if path.exists() else {}  # other models' and batch sizes' entries kept
    for name in models:
        loaded = load(f"zoo:{name}")
        pipe, den = loaded.pipe, loaded.denoiser
        pipe.set_progress_bar_config(disable=True)
        # the evaluation inputs of the quality bench (zoo:sr: its 16x16 crops), so that the speedup is
        # compared with the MACs reduction of the same calls
        es = eval_set_for(loaded, n, seed=0)
        units = plan_units_at(pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=STEPS), "fine")
        plan = np.asarray(load_recipe(RESULTS / f"dipgo_{name}_recipe.json").skip_plan.plan, dtype=bool)
        steps_n = _steps_at_budget(RATIOS[name])
        kw = {**_call_kwargs(pipe, es.inputs), **es.call_kwargs}

        bare = dataclasses.replace(units, stem=(), stem_macs=0, tail=())

        def run(steps, p=None, u=units):
            if p is not None:
                apply_skip_plan(den, p, u)
            try:
                t0 = time.perf_counter()
                pipe(**kw, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
                return time.perf_counter() - t0
            finally:
                if p is not None:
                    remove_skip_plan(den)

        variants = {"full": (STEPS, None), "keep-all plan": (STEPS, full_plan(STEPS, len(units))),
                    "dipgo plan": (STEPS, plan), f"steps:{steps_n}": (steps_n, None)}
        if units.stem or units.tail:  # the same plan with the patch embedding and final norm run at every call
            variants["dipgo plan, stem and tail always run"] = (STEPS, plan)
        best = {k: float("inf") for k in variants}
        run(STEPS)  # warm-up
        for _ in range(repeats):
            for k, (st, p) in variants.items():
                best[k] = min(best[k], run(st, p, bare if "always run" in k else units))
        r = plan_macs_ratio(plan, units)
        key = name if n == 16 else f"{name}@n{n}"
        out[key] = {"seconds": best, "plan_macs_ratio_denoiser": r,
                     "speedup_dipgo": best["full"] / best["dipgo plan"], "ideal_speedup": 1 / r,
                     "speedup_over_ideal": best["full"] / best["dipgo plan"] * r,
                     "hook_overhead": best["keep-all plan"] / best["full"] - 1, "batch": n, "repeats": repeats}
        if bare != units:
            out[key]["speedup_over_ideal_stem_and_tail_always_run"] = (
                best["full"] / best["dipgo plan, stem and tail always run"] * plan_macs_ratio(plan, bare))
        print(name, n, out[key], flush=True)
        path.write_text(json.dumps(out, indent=2))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits-sd,digits-dit,sr")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--transfer", action="store_true")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--ablation-iters", type=int, default=24)
    ap.add_argument("--ablation-seeds", default="0,1,2", help="--ablation: one pruner per seed and setting")
    ap.add_argument("--ablation-model", default="digits-sd", choices=sorted(RATIOS))
    ap.add_argument("--ablation-settings", default=",".join(ABLATIONS),
                    help=f"--ablation: comma-separated, of: {', '.join(ABLATIONS)}")
    ap.add_argument("--timing", action="store_true", help="only the interleaved wall-time comparison")
    ap.add_argument("--repeats", type=int, default=10, help="--timing: best of this many interleaved runs")
    ap.add_argument("--no-warm", action="store_true", help="leave out the warm-started DiP-GO row (dipgo:R:steps)")
    a = ap.parse_args()
    _quiet()
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.timing:
        timing([m for m in a.models.split(",") if m], a.n, repeats=a.repeats)
        return
    for m in [m for m in a.models.split(",") if m]:
        out = bench_model(m, a.n, a.batch, warm=not a.no_warm)
        for r in out["rows"]:
            print(m, r["method"], f"macs {r['macs_ratio']:.3f}", f"speedup {r['speedup']:.2f}",
                  f"psnr {r.get('psnr')}", flush=True)
    if a.transfer:
        print(json.dumps(transfer(a.n, a.batch), indent=1), flush=True)
    if a.ablation:
        labels = [x for x in a.ablation_settings.split(",") if x]
        bad = [x for x in labels if x not in ABLATIONS]
        if bad:
            ap.error(f"--ablation-settings: unknown {', '.join(bad)}; accepted: {', '.join(ABLATIONS)}")
        ablation(a.n, a.ablation_iters, [int(x) for x in a.ablation_seeds.split(",")], a.ablation_model, labels)


if __name__ == "__main__":
    main()
