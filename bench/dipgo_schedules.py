"""DiP-GO training schedules on a zoo model at R = 0.8, several seeds each, and whole-step plans for reference.

    OMP_NUM_THREADS=1 python bench/dipgo_schedules.py train digits-dit '[{"anneal": 30}, {"anneal": 30, "select": 8}]' --seeds 0,1,2
    OMP_NUM_THREADS=1 python bench/dipgo_schedules.py whole-steps digits-sd

``train``: each JSON object overrides the bench's short run without its refinements (30 pruner steps, batch 2,
lr 2e-3, the paper's keep-all start; ``{}`` is the paper's schedule); one pruner per seed, its plan scored by
PSNR against the full model's 50-step outputs on the bench's 16 evaluation inputs. ``whole-steps``: plans that
run 10 whole steps of the 50 (step 0 and 9 more) at a few spacings; on a U-Net an idle step reuses the last
output, so such a plan is DDIM on a subset of the 50-step grid. Both print one line per result and append
them to bench/results/dipgo_schedules.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dipgo_bench import STEPS, _quiet

RESULTS = Path(__file__).resolve().parent / "results"
BASE = dict(iters=30, batch_size=2, lr=2e-3, gradient_checkpointing=False)


def _setup(name: str):
    from diffslim.evaluate import eval_set_for
    from diffslim.methods.dipgo import plan_psnr_fn
    from diffslim.methods.skip_plan import plan_units_at
    from diffslim.models.load import load
    from diffslim.sample import SampleSpec, sample

    loaded = load(f"zoo:{name}")
    loaded.pipe.set_progress_bar_config(disable=True)
    es = eval_set_for(loaded, 16, seed=0)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=STEPS, batch_size=16)
    units = plan_units_at(loaded.pipe, spec, "fine")
    ref = sample(loaded.pipe, spec, show_progress=False)
    return loaded, units, plan_psnr_fn(loaded.pipe, spec, ref, units)


def _record(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(RESULTS / "dipgo_schedules.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def train(name: str, configs: list, seeds: list) -> None:
    from diffslim.methods.dipgo import DipgoConfig, train_dipgo

    loaded, units, score = _setup(name)
    for over in configs:
        res = []
        for sd in seeds:
            cfg = DipgoConfig(ratio=0.8, num_inference_steps=STEPS, progress=False, **{**BASE, "seed": sd, **over})
            t = time.perf_counter()
            r = train_dipgo(loaded.pipe, cfg, units)
            res.append(round(score(r.plan), 2))
            _record({"model": name, "config": over, "seed": sd, "psnr": res[-1], "macs_ratio": round(r.macs_ratio, 4),
                     "seconds": round(time.perf_counter() - t)})
        _record({"model": name, "config": over, "seeds": seeds, "psnr": res, "mean": round(float(np.mean(res)), 2)})


def whole_steps(name: str) -> None:
    from diffslim.methods.skip_plan import plan_macs_ratio

    _, units, score = _setup(name)
    grid = np.linspace(0, 1, 10)[1:]
    spacings = {
        "even (the warm start's prior)": list(range(0, STEPS, STEPS // 10)),
        "even, ending at the last step": list(np.round(np.linspace(0, STEPS - 1, 10)).astype(int)),
        "denser late": [0] + list(np.round((STEPS - 1) * (1 - (1 - grid) ** 1.5)).astype(int)),
        "denser early": [0] + list(np.round((STEPS - 1) * grid ** 1.5).astype(int)),
    }
    for label, rows in spacings.items():
        plan = np.zeros((STEPS, len(units)), dtype=bool)
        plan[sorted({int(r) for r in rows})] = True
        _record({"model": name, "whole_steps": label, "steps": sorted({int(r) for r in rows}),
                 "macs_ratio": round(plan_macs_ratio(plan, units), 4), "psnr": round(score(plan), 2)})


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("model")
    t.add_argument("configs", help="JSON list of DipgoConfig overrides")
    t.add_argument("--seeds", default="0,1,2")
    w = sub.add_parser("whole-steps")
    w.add_argument("model")
    a = ap.parse_args()
    _quiet()
    if a.cmd == "train":
        train(a.model, json.loads(a.configs), [int(s) for s in a.seeds.split(",")])
    else:
        whole_steps(a.model)


if __name__ == "__main__":
    main()
