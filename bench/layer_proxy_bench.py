"""Is the output loss a good proxy for what users see? Layer sets at a pruning ratio, judged both ways.

    OMP_NUM_THREADS=1 .venv/bin/python bench/layer_proxy_bench.py [--models zoo:digits-dit,zoo:digits-sd]
        [--ratios 0.5] [--n-sets 24] [--max-sets 64] [--n-eval 16] [--out bench/results]

Per model and ratio, in one process:
1. the candidate sets: every set of layers whose removed params reach the ratio with no layer to spare (where
   there are at most 16 candidates; a random ``--max-sets`` of them where there are more), else ``--n-sets`` random such sets (layers added in random order until the
   ratio is reached); plus the set each criterion picks (output-loss, output-loss-pairs, similarity, taylor,
   magnitude, greedy), scored on 32 calibration triples (seed 0) as ``layer_prune_bench.py`` does;
2. each set's output loss on 32 held-out triples (seed 1) and the quality of ``--n-eval`` sampled outputs of the
   pruned pipeline against the full one's (PSNR, SSIM and, for the digit models, digit accuracy), at the zoo's
   default sampling steps, before any retraining;
3. the Spearman rank correlation of output loss and PSNR over all sets, and where each criterion's set ranks;
4. each set's output loss in each fifth of the schedule's timesteps (160 more held-out triples, seed 3) and its
   Spearman correlation with PSNR: where along the schedule the output loss tells the sets apart.

Writes ``OUT/layer_proxy_<model>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from diffslim.bench import _with_denoiser
from diffslim.evaluate import eval_set_for, finite, metrics_fn_for
from diffslim.methods import layer_prune as lp
from diffslim.models.load import load
from diffslim.report import slug
from diffslim.sample import SampleSpec, sample


def _minimal_sets(layers, target, n_sets, seed, max_sets=64):
    """Sets whose params reach ``target`` and would not without any one of their layers: all of them for at most
    16 layers (a random ``max_sets`` of them where there are more), else ``n_sets`` random ones."""
    cost = {l.name: l.params for l in layers}
    names = [l.name for l in layers]

    def minimal(s):
        c = sum(cost[n] for n in s)
        return c >= target and all(c - cost[n] < target for n in s)

    rng = random.Random(seed)
    if len(names) <= 16:
        every = [list(s) for k in range(1, len(names) + 1) for s in itertools.combinations(names, k) if minimal(s)]
        # a 12-block DiT has 792 such sets at 0.5: a seeded sample of max_sets of them, in their enumeration order
        return every if len(every) <= max_sets else [every[i] for i in sorted(rng.sample(range(len(every)), max_sets))]
    out, seen = [], set()
    for _ in range(50 * n_sets):
        order = rng.sample(names, len(names))
        s, c = [], 0
        for n in order:
            if c >= target:
                break
            s.append(n)
            c += cost[n]
        key = frozenset(s)
        if key not in seen:
            seen.add(key)
            out.append(sorted(s, key=names.index))
        if len(out) == n_sets:
            break
    return out


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def bench_model(model: str, ratios, n_sets: int, n_eval: int, max_sets: int = 64) -> dict:
    loaded = load(model)
    d = loaded.denoiser
    total = sum(p.numel() for p in d.parameters())
    calib = lp.calibration(loaded.pipe, n=32, seed=0)
    held = lp.calibration(loaded.pipe, n=32, seed=1)
    ref_c, ref_h = calib.run(d), held.run(d)
    # where along the schedule the error of a set lies: 160 more held-out triples, split in 5 bins of timesteps
    bins = lp.calibration(loaded.pipe, n=160, seed=3)
    ref_b, t_b = bins.run(d), bins.t.float()
    edges = torch.linspace(float(t_b.min()), float(t_b.max()) + 1e-3, 6)
    in_bin = [(t_b >= a) & (t_b < b) for a, b in zip(edges[:-1], edges[1:])]
    layers = lp.candidates(d)
    single = lp.score_layers(d, layers, "output-loss", calib, reference=ref_c)
    inter = lp.pair_interactions(d, layers, calib, single, reference=ref_c)
    scores = {c: lp.score_layers(d, layers, c, calib) for c in ("similarity", "taylor", "magnitude")}
    order = lp.greedy_order(d, layers, calib, lp.target_of(total, max(ratios)), reference=ref_c)
    es = eval_set_for(loaded, n_eval)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=loaded.zoo.default_steps if loaded.zoo else 50,
                      call_kwargs=dict(es.call_kwargs), batch_size=n_eval)
    metrics = metrics_fn_for(loaded, es)
    full = sample(loaded.pipe, spec)
    out = {"model": model, "n_candidates": len(layers), "n_eval": n_eval,
           "sampling_steps": spec.num_inference_steps, "ratios": []}
    for r in ratios:
        target = lp.target_of(total, r)
        picks = {"output-loss": lp.select(layers, single, r, total),
                 "output-loss-pairs": lp.pairs_select(d, layers, calib, single, inter, r, total, reference=ref_c)[0],
                 "greedy": lp.greedy_select(order, layers, r, total)}
        picks.update({c: lp.select(layers, s, r, total) for c, s in scores.items()})
        sets = _minimal_sets(layers, target, n_sets, seed=0, max_sets=max_sets)
        keyed = {frozenset(s): s for s in sets}
        for s in picks.values():
            keyed.setdefault(frozenset(s), s)
        rows = []
        t0 = time.perf_counter()
        for key, s in keyed.items():
            pruned = lp.prune_layers(d, s)
            imgs = sample(_with_denoiser(loaded.pipe, pruned), spec)
            m = {k: finite(v) for k, v in metrics(imgs, full).items() if k != "fid"}
            with lp.layers_removed(d, s):
                err = (bins.run(d) - ref_b).pow(2).flatten(1).mean(1)
            rows.append({"removed": s, "output_loss": lp.output_loss(d, held, s, ref_h),
                         "output_loss_by_timestep": [float(err[m].mean()) for m in in_bin],
                         "share": sum(l.params for l in layers if l.name in key) / total, **m,
                         "picked_by": [c for c, p in picks.items() if frozenset(p) == key]})
        loss = [x["output_loss"] for x in rows]
        psnr = [x["psnr"] for x in rows]
        by_psnr = sorted(range(len(rows)), key=lambda i: -psnr[i])
        rank = {i: k + 1 for k, i in enumerate(by_psnr)}
        by_bin = [_spearman([x["output_loss_by_timestep"][k] for x in rows], psnr) for k in range(5)]
        res = {"ratio": r, "n_sets": len(rows), "spearman_loss_psnr": _spearman(loss, psnr),
               "spearman_by_timestep_bin": by_bin,
               "seconds": time.perf_counter() - t0, "sets": rows,
               "criteria": {c: {"output_loss": rows[i]["output_loss"], "psnr": rows[i]["psnr"],
                                "psnr_rank": rank[i]}
                            for i, x in enumerate(rows) for c in x["picked_by"]}}
        out["ratios"].append(res)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="zoo:digits-dit,zoo:digits-sd")
    ap.add_argument("--ratios", default="0.5")
    ap.add_argument("--n-sets", type=int, default=24, help="random sets per ratio, for models of over 16 layers")
    ap.add_argument("--max-sets", type=int, default=64,
                    help="models of at most 16 layers: every minimal set, or this many of them at random where more")
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    ratios = [float(x) for x in a.ratios.split(",")]
    for model in a.models.split(","):
        t0 = time.perf_counter()
        res = bench_model(model, ratios, a.n_sets, a.n_eval, a.max_sets)
        res["command"] = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
                          f"bench/layer_proxy_bench.py --models {model} --ratios {a.ratios} --n-sets {a.n_sets} "
                          f"--max-sets {a.max_sets} --n-eval {a.n_eval}")
        res["seconds"] = time.perf_counter() - t0
        path = Path(a.out) / f"layer_proxy_{slug(model)}.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"== {model} ({res['seconds']:.0f}s) -> {path}")
        for row in res["ratios"]:
            print(f"ratio {row['ratio']}: {row['n_sets']} sets, Spearman(output loss, PSNR) = "
                  f"{row['spearman_loss_psnr']:.3f}; of each fifth of the schedule (low noise first): "
                  + " ".join(f"{v:.3f}" for v in row["spearman_by_timestep_bin"]))
            for c, v in sorted(row["criteria"].items(), key=lambda kv: kv[1]["psnr_rank"]):
                print(f"  {c:18s} output loss {v['output_loss']:.4g}  PSNR {v['psnr']:.2f} dB  "
                      f"(rank {v['psnr_rank']} of {row['n_sets']})")
            best = max(row["sets"], key=lambda x: x["psnr"])
            print(f"  best set by PSNR: {best['psnr']:.2f} dB, output loss {best['output_loss']:.4g}, "
                  f"removed {best['removed']}")


if __name__ == "__main__":
    main()
