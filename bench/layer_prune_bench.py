"""Layer pruning (LAPTOP-Diff) on the zoo: criteria, BK-SDM, additivity, normalized vs plain distillation.

    OMP_NUM_THREADS=1 .venv/bin/python bench/layer_prune_bench.py [--models zoo:digits-sd,zoo:sr,zoo:digits-dit]
        [--n-calib 32] [--kd-steps 200] [--kd-seeds 0,1] [--out bench/results]

Per model, in one process:
1. scores of every candidate layer by each one-shot criterion on ``n_calib`` calibration triples
   (seed 0), the interactions of every pair of layers (output-loss-pairs, the second-order output loss)
   and the iterative greedy order;
2. at ratios 0.3, 0.5, 0.7 (share of the denoiser's params removed): each criterion's knapsack
   selection and its output loss on HELD-OUT triples (seed 1: other samples, noise and timesteps);
   random is the mean over 3 seeds; BK-SDM base/small/tiny (U-Nets) against the output-loss
   selection at BK-SDM's own ratio;
3. additivity: measured L(S) vs sum L_i for random sets S, Pearson r;
4. the output-loss selection at ratio 0.5 distilled ``kd_steps`` steps with the normalized and the
   plain feature loss (same data, seed, steps, lr; once per seed of ``--kd-seeds``): PSNR/SSIM of
   sampled outputs vs the full model before and after, and each matched block's plain and normalized
   feature term (how the feature loss splits over the blocks).

Writes ``OUT/layer_prune_<model><--suffix>.json`` and PNG figures (``OUT/layer_prune_figures/``).
"""

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from diffslim.bench import _with_denoiser
from diffslim.evaluate import eval_set_for, finite, metrics_fn_for
from diffslim.methods import layer_prune as lp
from diffslim.methods.layer_compare import compare_criteria, curves_of
from diffslim.models.load import load
from diffslim.report import slug as model_slug
from diffslim.report import additivity_figure, image_grid, loss_balance_figure, output_loss_figure
from diffslim.sample import SampleSpec, sample
from diffslim.train.distill import DistillConfig

RATIOS = (0.3, 0.5, 0.7)


def bench_model(model: str, n_calib: int, kd_steps: int, n_eval: int, figs: Path, seed_random=(0, 1, 2),
                kd_seeds=(0,), kd_modes=("normalized", "plain"), normalized_lambda_feat="1.0", kd_ratio=0.5,
                lambda_task=1.0, feat_norm="batch") -> dict:
    t_start = time.perf_counter()
    loaded = load(model)
    d = loaded.denoiser
    calib = lp.calibration(loaded.pipe, n=n_calib, seed=0)
    held = lp.calibration(loaded.pipe, n=n_calib, seed=1)
    out = {"model": model, "n_calib": n_calib,
           **compare_criteria(d, calib, held, RATIOS, random_seeds=seed_random, progress=True)}
    layers, total, bk, add = lp.candidates(d), out["params"], out["bk_sdm"], out["additivity"]
    slug = model_slug(model)
    additivity_figure(add["summed"], add["measured"], add["pearson"], model, add["second_order"],
                      add["pearson_second_order"]).savefig(
        figs / f"additivity_{slug}.png", dpi=110, bbox_inches="tight")
    output_loss_figure(curves_of(out), model, {b["variant"]: (b["ratio"], b["bk_sdm_loss"]) for b in bk}).savefig(
        figs / f"output_loss_{slug}.png", dpi=110, bbox_inches="tight")

    # 4. normalized vs plain distillation of the output-loss selection at kd_ratio (0.5)
    if kd_steps > 0:
        out["distill"] = distill_compare(loaded, layers, out["scores"]["output-loss"], total, kd_steps, n_eval, figs,
                                         slug if kd_ratio == 0.5 else f"{slug}_r{kd_ratio:g}", ratio=kd_ratio,
                                         seeds=kd_seeds, modes=kd_modes, normalized_lambda_feat=normalized_lambda_feat,
                                         lambda_task=lambda_task, feat_norm=feat_norm)
    out["seconds"] = time.perf_counter() - t_start
    return out


def feature_terms(teacher, student, calib) -> dict:
    """Per matched block: the plain feature term mean((F_T - F_S)^2) and the normalized one (divided by
    mean(F_T^2)) on the calibration triples: how the feature loss splits over the blocks."""
    from diffslim.train.distill import add_feature_taps, remove_feature_taps, select_features

    feats = select_features(teacher, student, "auto")
    ft, fs = {}, {}
    add_feature_taps(teacher, list(feats.values()), ft, keys=list(feats))
    add_feature_taps(student, list(feats), fs)
    try:
        calib.run(teacher)
        calib.run(student)
    finally:
        remove_feature_taps(teacher, list(feats.values()))
        remove_feature_taps(student, list(feats))
    out = {}
    for k in feats:
        plain = float((ft[k] - fs[k]).pow(2).mean())
        norm = float(ft[k].pow(2).mean())
        out[k] = {"plain": plain, "normalized": plain / (norm + 1e-6), "teacher_mean_square": norm}
    return out


def distill_compare(loaded, layers, scores, total, steps, n_eval, figs, slug, ratio=0.5, seeds=(0,),
                    modes=("normalized", "plain"), normalized_lambda_feat="1.0", lambda_task=1.0, feat_norm="batch"):
    """Distil the output-loss selection at ``ratio`` per seed and mode. ``normalized_lambda_feat``: the feature
    weight of the normalized runs (1 as the plain runs; another value, e.g. the plain-to-normalized ratio of
    the feature terms before training, compares the two at the same total feature weight; ``"auto"``: the
    trainer's ``match_plain_weight``, that ratio measured by each run on its first batches)."""
    auto = str(normalized_lambda_feat) == "auto"
    lam = 1.0 if auto else float(normalized_lambda_feat)
    d = loaded.denoiser
    names = lp.select(layers, scores, ratio, total)
    es = eval_set_for(loaded, n_eval)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=loaded.zoo.default_steps,
                      call_kwargs=dict(es.call_kwargs), batch_size=n_eval)
    metrics = metrics_fn_for(loaded, es)
    ref = sample(loaded.pipe, spec)
    res = {"ratio": ratio, "removed": names, "steps": steps, "sampling_steps": spec.num_inference_steps,
           "n_eval": n_eval}
    pruned = lp.prune_layers(d, names)
    calib = lp.calibration(loaded.pipe, n=32, seed=2)
    res["denoiser_seconds"] = {}
    for label, m in (("full", d), ("pruned", pruned)):  # 32 triples per call, best of 5 after a warm-up
        calib.run(m)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            calib.run(m)
            best = min(best, time.perf_counter() - t0)
        res["denoiser_seconds"][label] = best
    before = sample(_with_denoiser(loaded.pipe, pruned), spec)
    res["before"] = {k: finite(v) for k, v in metrics(before, ref).items()}
    one = lp.Calibration(calib.xt, calib.t, calib.cond, calib.target, calib.predict, batch_size=len(calib))
    res["feature_terms_before"] = feature_terms(d, pruned, one)
    grids = {"full": ref, "pruned": before}
    logs, weights = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for mode in modes:
                run = f"{mode}" if seed == seeds[0] else f"{mode}#seed{seed}"
                student = lp.prune_layers(d, names)
                cfg = DistillConfig(steps=steps, batch_size=32, lr=2e-4, out=Path(tmp) / run, checkpoint_every=steps,
                                    log_every=10, normalized=mode == "normalized", progress=False, seed=seed,
                                    lambda_feat=lam if mode == "normalized" else 1.0,
                                    match_plain_weight=auto and mode == "normalized", lambda_task=lambda_task,
                                    feat_norm=feat_norm if mode == "normalized" else "batch")
                t0 = time.perf_counter()
                r = lp.distill_pruned(loaded.pipe, student, cfg)
                secs = time.perf_counter() - t0
                trained = load(str(Path(tmp) / run / "student")).denoiser
                after = sample(_with_denoiser(loaded.pipe, trained), spec)
                res[run] = {**{k: finite(v) for k, v in metrics(after, ref).items()},
                            "final_losses": r.final_losses, "seconds": secs, "seed": seed, "feat_scale": r.feat_scale,
                            "feature_terms_after": feature_terms(d, trained, one),
                            "features": json.loads((Path(tmp) / run / "distill.json").read_text())["features"]}
                if seed == seeds[0]:
                    grids[f"+kd {mode}"] = after
                    logs[mode] = (Path(tmp) / run / "train_log.csv").read_text()
                    weights[mode] = {"feat": cfg.lambda_feat * r.feat_scale}  # the log holds the unweighted term
        for mode, text in logs.items():
            (figs / f"train_log_{slug}_{mode}.csv").write_text(text)
        loss_balance_figure({m: figs / f"train_log_{slug}_{m}.csv" for m in logs}, weights,
                            title=f"{slug}: loss-term shares during distillation").savefig(
            figs / f"loss_balance_{slug}.png", dpi=110, bbox_inches="tight")
        feature_balance_figure(res["feature_terms_before"], slug).savefig(
            figs / f"feature_terms_{slug}.png", dpi=110, bbox_inches="tight")
    k = min(16, n_eval)
    up = max(1, 64 // ref.shape[-1])
    for label, imgs in grids.items():
        image_grid(imgs[:k], nrow=8, upscale=up).save(figs / f"grid_{slug}_{label.replace(' ', '_').replace('+', '')}.png")
    res["normalized_lambda_feat"] = normalized_lambda_feat
    res["feat_norm"] = feat_norm
    for mode in modes:
        runs = [v for k, v in res.items() if k.split("#")[0] == mode and isinstance(v, dict)]
        res[f"{mode}_mean_psnr"] = sum(v["psnr"] for v in runs) / len(runs)
    if len(modes) == 2:
        res["normalized_beats_plain_psnr"] = res["normalized_mean_psnr"] > res["plain_mean_psnr"]
    return res


def feature_balance_figure(terms: dict, title: str):
    """Each matched block's share of the feature loss, plain vs normalized (the untrained pruned student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(terms)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(names), 3.4))
    for j, mode in enumerate(("plain", "normalized")):
        tot = sum(terms[n][mode] for n in names) or 1.0
        ax.bar([i + (j - 0.5) * 0.38 for i in range(len(names))], [terms[n][mode] / tot for n in names],
               width=0.38, label=mode)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of the feature loss")
    ax.set_title(f"{title}: feature terms per block (pruned, before KD)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="zoo:digits-sd,zoo:sr,zoo:digits-dit")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--kd-steps", type=int, default=200)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--kd-seeds", default="0,1", help="seeds of the distillation runs (each mode runs once per seed)")
    ap.add_argument("--kd-modes", default="normalized,plain", help="distillation modes to run")
    ap.add_argument("--normalized-lambda-feat", default="1.0",
                    help="feature weight of the normalized runs (the plain runs keep 1), or 'auto': each normalized "
                         "run scales its feature term to start at the plain sum's total (match_plain_weight)")
    ap.add_argument("--kd-ratio", type=float, default=0.5, help="pruning ratio of the distilled model")
    ap.add_argument("--lambda-task", type=float, default=1.0,
                    help="weight of the diffusion task loss in the distillations (0: distil only)")
    ap.add_argument("--feat-norm", default="batch", choices=("batch", "sample"),
                    help="normalized runs: divide by the teacher's feature norm over the batch or per sample")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--suffix", default="", help="written to layer_prune_<model><suffix>.json")
    a = ap.parse_args()
    out = Path(a.out)
    figs = out / "layer_prune_figures"
    figs.mkdir(parents=True, exist_ok=True)
    for model in a.models.split(","):
        t0 = time.perf_counter()
        seeds = tuple(int(x) for x in a.kd_seeds.split(","))
        modes = tuple(a.kd_modes.split(","))
        res = bench_model(model, a.n_calib, a.kd_steps, a.n_eval, figs, kd_seeds=seeds, kd_modes=modes,
                          normalized_lambda_feat=a.normalized_lambda_feat, kd_ratio=a.kd_ratio,
                          lambda_task=a.lambda_task, feat_norm=a.feat_norm)
        res["command"] = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
                          f"bench/layer_prune_bench.py --models {model} --n-calib {a.n_calib} --kd-steps {a.kd_steps} "
                          f"--n-eval {a.n_eval} --kd-seeds {a.kd_seeds} --kd-modes {a.kd_modes} "
                          f"--normalized-lambda-feat {a.normalized_lambda_feat} --kd-ratio {a.kd_ratio:g}"
                          + (f" --lambda-task {a.lambda_task:g}" if a.lambda_task != 1.0 else "")
                          + (f" --feat-norm {a.feat_norm}" if a.feat_norm != "batch" else "")
                          + (f" --suffix {a.suffix}" if a.suffix else ""))
        path = out / f"layer_prune_{model_slug(model)}{a.suffix}.json"
        path.write_text(json.dumps(res, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
        print(f"== {model} ({time.perf_counter() - t0:.0f}s) -> {path}")
        keys = ("output-loss", "output-loss-pairs", "second-order (unchecked)", "magnitude", "taylor", "similarity",
                "random", "greedy")
        print("| ratio | " + " | ".join(keys) + " |")
        for r in res["ratios"]:
            print(f"| {r['ratio']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
        for b in res["bk_sdm"]:
            print(f"{b['variant']}: ratio {b['ratio']:.3f}, BK-SDM {b['bk_sdm_loss']:.4g} vs output-loss "
                  f"{b['output_loss_at_ratio']:.4g}, output-loss-pairs {b['output_loss_pairs_at_ratio']:.4g}")
        print(f"additivity Pearson r = {res['additivity']['pearson']:.3f} (second order: "
              f"{res['additivity']['pearson_second_order']:.3f})")
        if "distill" in res:
            dd = res["distill"]
            print("distill psnr before {:.2f}, ".format(dd["before"].get("psnr", float("nan")))
                  + ", ".join(f"{m} {dd[m + '_mean_psnr']:.2f}" for m in modes) + " (mean over kd seeds)")


if __name__ == "__main__":
    main()
