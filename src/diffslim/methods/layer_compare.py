"""Every layer-pruning criterion on one model, side by side: what ``bench/layer_prune_bench.py`` and the demo report show.

:func:`compare_criteria` scores the candidate layers by each one-shot criterion on calibration triples, selects at
each ratio by each, and judges every selection by its output loss on *held-out* triples (other samples, noise and
timesteps), with the iterative greedy order, the second-order ``output-loss-pairs`` selection, BK-SDM at its own
ratios (U-Nets) and the additivity of the single losses over random layer sets.
"""

from __future__ import annotations

import time
from typing import Sequence

from torch import nn

from diffslim.methods import layer_prune as lp

ONE_SHOT = ("output-loss", "magnitude", "taylor", "similarity", "random")


def _share(layers, names, total) -> float:
    p = {l.name: l.params for l in layers}
    return sum(p[n] for n in names) / total


def compare_criteria(d: nn.Module, calib: lp.Calibration, held: lp.Calibration, ratios: Sequence[float] = (0.3, 0.5, 0.7),
                     random_seeds: Sequence[int] = (0, 1, 2), greedy: bool = True, pairs: bool = True,
                     n_sets: int = 32, progress: bool = False) -> dict:
    """Criteria of denoiser ``d`` compared at ``ratios`` (share of params removed).

    Returns ``{"params", "n_candidates", "candidate_params_share", "scores", "score_seconds", "interactions",
    "greedy_order", "ratios", "bk_sdm", "stock", "additivity"}`` (``stock``: on U-Nets, the output-loss choice among
    the removals a stock config describes at each ratio, its held-out loss and share, or why none reaches it). Each row of ``ratios`` holds each criterion's held-out
    output loss (``random``: the mean over ``random_seeds``, each also as ``random#S``), the share it removes
    (``<criterion>_share``), the layers it removes (``<criterion>_removed``) and whether output-loss (``output_loss_best_one_shot``) and output-loss-pairs
    (``pairs_best_one_shot``) are strictly below every other one-shot criterion. ``greedy`` (iterative
    re-scoring) and ``pairs`` (n(n-1)/2 calibration runs) can be left out on large models.
    """
    total = sum(p.numel() for p in d.parameters())
    ref_c, ref_h = calib.run(d), held.run(d)
    layers = lp.candidates(d)
    out = {"params": total, "n_candidates": len(layers),
           "candidate_params_share": sum(l.params for l in layers) / total}

    scores, timing = {}, {}
    for crit in ONE_SHOT:
        for s in (random_seeds if crit == "random" else (0,)):
            t0 = time.perf_counter()
            key = crit if crit != "random" else f"random#{s}"
            scores[key] = lp.score_layers(d, layers, crit, calib, seed=s, reference=ref_c)
            timing[key] = time.perf_counter() - t0
    single = scores["output-loss"]
    inter = None
    if pairs:
        t0 = time.perf_counter()
        inter = lp.pair_interactions(d, layers, calib, single, reference=ref_c, progress=progress)
        timing["output-loss-pairs (the pairs only)"] = time.perf_counter() - t0
        out["interactions"] = [{"layers": list(k), "interaction": v} for k, v in inter.items()]
    order = None
    if greedy:
        t0 = time.perf_counter()
        order = lp.greedy_order(d, layers, calib, lp.target_of(total, max(ratios)), reference=ref_c)
        timing[f"greedy (up to {max(ratios):g})"] = time.perf_counter() - t0
        out["greedy_order"] = order
    out["score_seconds"] = timing
    out["scores"] = {k: v for k, v in scores.items() if not k.startswith("random#")}

    rows = []
    for r in ratios:
        row = {"ratio": r}
        for key, sc in scores.items():
            names = lp.select(layers, sc, r, total)
            row[key] = lp.output_loss(d, held, names, ref_h)
            row[f"{key}_share"] = _share(layers, names, total)
            row[f"{key}_removed"] = names
            if key == "output-loss":
                row["output-loss_calib"] = lp.output_loss(d, calib, names, ref_c)
        row["random"] = sum(row[f"random#{s}"] for s in random_seeds) / len(random_seeds)
        if inter is not None:
            q, check = lp.pairs_select(d, layers, calib, single, inter, r, total, reference=ref_c)
            row["output-loss-pairs"] = lp.output_loss(d, held, q, ref_h)
            row["output-loss-pairs_share"] = _share(layers, q, total)
            row["output-loss-pairs_removed"] = q
            row["output-loss-pairs_check"] = check
            row["second-order (unchecked)"] = lp.output_loss(d, held, check["second_order"]["removed"], ref_h)
        if order is not None:
            g = lp.greedy_select(order, layers, r, total)
            row["greedy"] = lp.output_loss(d, held, g, ref_h)
            row["greedy_share"] = _share(layers, g, total)
            row["greedy_removed"] = g
        others = ("magnitude", "taylor", "similarity", "random")
        for key, flag in (("output-loss", "output_loss_best_one_shot"), ("output-loss-pairs", "pairs_best_one_shot")):
            if key in row:
                row[flag] = all(row[key] < row[k] for k in others) and all(
                    row[key] < row[f"random#{s}"] for s in random_seeds)
        rows.append(row)
    out["ratios"] = rows

    bk = []  # BK-SDM against the output-loss selections at BK-SDM's own ratio
    if lp.is_unet(d):
        for v in lp.BK_SDM:
            names = lp.bk_sdm_layers(d, v)
            pruned = lp.prune_layers(d, names)
            ratio = 1 - sum(p.numel() for p in pruned.parameters()) / total
            ol = lp.select(layers, single, ratio, total)
            row = {"variant": f"bk-sdm-{v}", "ratio": ratio, "removed": names,
                   "bk_sdm_loss": float((held.run(pruned) - ref_h).pow(2).mean()),
                   "output_loss_at_ratio": lp.output_loss(d, held, ol, ref_h),
                   "output_loss_share": _share(layers, ol, total)}
            if inter is not None:
                q, _ = lp.pairs_select(d, layers, calib, single, inter, ratio, total, reference=ref_c)
                row["output_loss_pairs_at_ratio"] = lp.output_loss(d, held, q, ref_h)
            bk.append(row)
    out["bk_sdm"] = bk

    stock = []  # U-Nets: what a selection a stock config describes (layer-prune --stock) costs at each ratio
    if lp.is_unet(d):
        for r in ratios:
            try:
                names = lp.stock_select(d, layers, single, r, total)
            except lp.StockUnreachable as e:
                stock.append({"ratio": r, "unreachable": str(e)})
                continue
            stock.append({"ratio": r, "loss": lp.output_loss(d, held, names, ref_h), "share": _share(layers, names, total),
                          "removed": names})
    out["stock"] = stock

    add = lp.additivity(d, layers, calib, single, n_sets=n_sets, seed=0, reference=ref_c)
    if inter is not None:
        add["second_order"] = [lp.predicted_loss(st, single, inter) for st in add["sets"]]
        add["pearson_second_order"] = lp.pearson(add["second_order"], add["measured"])
    out["additivity"] = add
    return out


def curves_of(result: dict) -> dict:
    """``{criterion: [(ratio, held-out output loss), ...]}`` of a :func:`compare_criteria` result, for
    :func:`diffslim.report.output_loss_figure`."""
    keys = [k for k in ("output-loss", "output-loss-pairs", "magnitude", "taylor", "similarity", "random", "greedy")
            if k in result["ratios"][0]]
    return {k: [(row["ratio"], row[k]) for row in result["ratios"]] for k in keys}
