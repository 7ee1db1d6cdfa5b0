"""Every layer-pruning criterion on one model, side by side: what ``bench/layer_prune_bench.py`` and the demo report show.

:func:`compare_criteria` scores the candidate layers by each one-shot criterion on calibration triples, selects at
each ratio by each, and judges every selection by its output loss on *held-out* triples (other samples, noise and
timesteps), with the iterative greedy order, the second-order ``output-loss-pairs`` selection, BK-SDM at its own
ratios (U-Nets) and the additivity of the single losses over random layer sets.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from torch import nn

from diffslim.errors import UserError
from diffslim.methods import layer_prune as lp

ONE_SHOT = ("output-loss", "magnitude", "taylor", "similarity", "random")


def _share(layers, names, total, by: str = "params") -> float:
    p = {l.name: (l.params if by == "params" else l.macs) for l in layers}
    return sum(p[n] for n in names) / total


def compare_criteria(d: nn.Module, calib: lp.Calibration, held: lp.Calibration, ratios: Sequence[float] = (0.3, 0.5, 0.7),
                     random_seeds: Sequence[int] = (0, 1, 2), greedy: bool = True, pairs: bool = True,
                     n_sets: int = 32, progress: bool = False, by: str = "params", max_params: Optional[float] = None,
                     macs_inputs: Optional[tuple[tuple, dict]] = None) -> dict:
    """Criteria of denoiser ``d`` compared at ``ratios`` (share of params removed; with ``by="macs"``, share of the
    MACs of one denoiser call on ``macs_inputs``, e.g. :func:`diffslim.sample.first_denoiser_call`, else on dummy
    inputs at the config's size).

    Returns ``{"params", "n_candidates", "candidate_params_share", "scores", "score_seconds", "interactions",
    "greedy_order", "ratios", "bk_sdm", "stock", "additivity"}`` (``stock``: on U-Nets, the output-loss choice among
    the removals a stock config describes at each ratio, its held-out loss and share, or why none reaches it). Each row of ``ratios`` holds each criterion's held-out
    output loss (``random``: the mean over ``random_seeds``, each also as ``random#S``), the share it removes
    (``<criterion>_share``), the layers it removes (``<criterion>_removed``) and whether output-loss (``output_loss_best_one_shot``) and output-loss-pairs
    (``pairs_best_one_shot``) are strictly below every other one-shot criterion (Taylor is left out on a
    calibration without a target, :func:`~diffslim.methods.layer_prune.sampling_calibration`). ``greedy`` (iterative
    re-scoring) and ``pairs`` (n(n-1)/2 calibration runs) can be left out on large models.

    By MACs, each row also holds ``<criterion>_macs_share``, and each BK-SDM row the share of the MACs BK-SDM removes
    (``macs_ratio``) and the output-loss selection at BK-SDM's MACs with at most BK-SDM's share of the params removed
    (``output_loss_at_macs``, and with ``pairs`` ``output_loss_pairs_at_macs``): the two compared at equal cost and
    size. ``max_params``: with ``by="macs"``, every selection removes at most that share of the params (greedy has
    no cap and must be off; the stock rows are left out); a cap no set of layers meets at some ratio is refused
    before any scoring (:class:`~diffslim.methods.layer_prune.SelectionUnreachable`).
    """
    if by not in ("params", "macs"):
        raise UserError(f"--by {by!r}: accepted params, macs")
    for r in ratios:
        lp.check_ratio(r)
    if max_params is not None:
        lp.check_max_params(max_params)
        if by != "macs":
            raise UserError("a cap on the params removed (--max-params) applies to a comparison by MACs (--by macs)")
        if greedy:
            raise UserError("the greedy re-scoring has no cap on the params removed: leave it out (--no-greedy) "
                            "with --max-params")
    total = sum(p.numel() for p in d.parameters())
    sel_total, an = total, None
    if by == "macs":
        from diffslim.models.anatomy import anatomy

        an = anatomy(d, **({"inputs": macs_inputs} if macs_inputs is not None else {}))
        layers = lp.candidates(d, module_macs=an.module_macs, names=lp.candidate_names(d))
        sel_total = an.macs
    else:
        layers = lp.candidates(d)
    cap = None if max_params is None else (max_params, total)
    if cap is not None:  # an unreachable cap is refused before any scoring
        zero = dict.fromkeys((l.name for l in layers), 0.0)
        for r in ratios:
            lp.select(layers, zero, r, sel_total, by, cap)
    ref_c, ref_h = calib.run(d), held.run(d)
    out = {"params": total, "by": by, "max_params": max_params, "n_candidates": len(layers),
           "candidate_params_share": sum(l.params for l in layers) / total}
    if an is not None:
        out["macs"] = an.macs

    scores, timing = {}, {}
    for crit in ONE_SHOT:
        if crit == "taylor" and calib.target is None:  # sampling calibration: no diffusion loss to take gradients of
            continue
        for s in (random_seeds if crit == "random" else (0,)):
            t0 = time.perf_counter()
            key = crit if crit != "random" else f"random#{s}"
            scores[key] = lp.score_layers(d, layers, crit, calib, seed=s, reference=ref_c, progress=progress)
            timing[key] = time.perf_counter() - t0
    single = scores["output-loss"]
    inter = None
    if pairs:
        t0 = time.perf_counter()
        inter = lp.pair_interactions(d, layers, calib, single, by=by, reference=ref_c, progress=progress)
        timing["output-loss-pairs (the pairs only)"] = time.perf_counter() - t0
        out["interactions"] = [{"layers": list(k), "interaction": v} for k, v in inter.items()]
    order = None
    if greedy:
        t0 = time.perf_counter()
        order = lp.greedy_order(d, layers, calib, lp.target_of(sel_total, max(ratios)), by, reference=ref_c,
                                progress=progress)
        timing[f"greedy (up to {max(ratios):g})"] = time.perf_counter() - t0
        out["greedy_order"] = order
    out["score_seconds"] = timing
    out["scores"] = {k: v for k, v in scores.items() if not k.startswith("random#")}

    def put(row, key, names):  # a selection's held-out loss, the shares it removes, and its layers
        row[key] = lp.output_loss(d, held, names, ref_h)
        row[f"{key}_share"] = _share(layers, names, total)
        if by == "macs":
            row[f"{key}_macs_share"] = _share(layers, names, sel_total, "macs")
        row[f"{key}_removed"] = names

    rows = []
    for r in ratios:
        row = {"ratio": r}
        for key, sc in scores.items():
            names = lp.select(layers, sc, r, sel_total, by, cap)
            put(row, key, names)
            if key == "output-loss":
                row["output-loss_calib"] = lp.output_loss(d, calib, names, ref_c)
        row["random"] = sum(row[f"random#{s}"] for s in random_seeds) / len(random_seeds)
        if inter is not None:
            q, check = lp.pairs_select(d, layers, calib, single, inter, r, sel_total, by, reference=ref_c,
                                       max_params=cap)
            put(row, "output-loss-pairs", q)
            row["output-loss-pairs_check"] = check
            row["second-order (unchecked)"] = lp.output_loss(d, held, check["second_order"]["removed"], ref_h)
        if order is not None:
            put(row, "greedy", lp.greedy_select(order, layers, r, sel_total, by))
        others = [k for k in ("magnitude", "taylor", "similarity", "random") if k in row]
        for key, flag in (("output-loss", "output_loss_best_one_shot"), ("output-loss-pairs", "pairs_best_one_shot")):
            if key in row:
                row[flag] = all(row[key] < row[k] for k in others) and all(
                    row[key] < row[f"random#{s}"] for s in random_seeds)
        rows.append(row)
    out["ratios"] = rows

    bk = []  # BK-SDM against the output-loss selections at BK-SDM's own ratio (by MACs: its MACs and params)
    if lp.is_unet(d):
        for v in lp.BK_SDM:
            names = lp.bk_sdm_layers(d, v)
            pruned = lp.prune_layers(d, names)
            kept = sum(p.numel() for p in pruned.parameters())
            ratio = 1 - kept / total
            ol = lp.select(layers, single, ratio, total)
            row = {"variant": f"bk-sdm-{v}", "ratio": ratio, "removed": names,
                   "bk_sdm_loss": float((held.run(pruned) - ref_h).pow(2).mean()),
                   "output_loss_at_ratio": lp.output_loss(d, held, ol, ref_h),
                   "output_loss_share": _share(layers, ol, total)}
            if inter is not None:
                q, _ = lp.pairs_select(d, layers, calib, single, inter, ratio, total, reference=ref_c)
                row["output_loss_pairs_at_ratio"] = lp.output_loss(d, held, q, ref_h)
            if by == "macs":
                from diffslim.models.anatomy import anatomy

                macs_kept = anatomy(pruned, **({"inputs": macs_inputs} if macs_inputs is not None else {})).macs
                row["macs_ratio"] = 1 - macs_kept / sel_total
                # the least-loss set that removes at least BK-SDM's MACs and at most its params (half a unit of slack
                # each way so that the float shares round to BK-SDM's own integers)
                at = ((sel_total - macs_kept - 0.5) / sel_total, ((total - kept) + 0.5) / total)
                try:
                    m = lp.select(layers, single, at[0], sel_total, "macs", (at[1], total))
                except lp.SelectionUnreachable as e:
                    row["output_loss_at_macs"] = None
                    row["at_macs_unreachable"] = str(e)
                else:
                    row["output_loss_at_macs"] = lp.output_loss(d, held, m, ref_h)
                    row["output_loss_at_macs_removed"] = m
                    row["output_loss_at_macs_share"] = _share(layers, m, total)
                    row["output_loss_at_macs_macs_share"] = _share(layers, m, sel_total, "macs")
                    if inter is not None:
                        q, _ = lp.pairs_select(d, layers, calib, single, inter, at[0], sel_total, "macs",
                                               reference=ref_c, max_params=(at[1], total))
                        row["output_loss_pairs_at_macs"] = lp.output_loss(d, held, q, ref_h)
                        row["output_loss_pairs_at_macs_removed"] = q
                        row["output_loss_pairs_at_macs_share"] = _share(layers, q, total)
            bk.append(row)
    out["bk_sdm"] = bk

    stock = []  # U-Nets: what a selection a stock config describes (layer-prune --stock) costs at each ratio
    if lp.is_unet(d) and cap is None:
        for r in ratios:
            try:
                names = lp.stock_select(d, layers, single, r, sel_total, by)
            except lp.StockUnreachable as e:
                stock.append({"ratio": r, "unreachable": str(e)})
                continue
            stock.append({"ratio": r, "loss": lp.output_loss(d, held, names, ref_h), "share": _share(layers, names, total),
                          "removed": names, **({"macs_share": _share(layers, names, sel_total, "macs")}
                                               if by == "macs" else {})})
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
