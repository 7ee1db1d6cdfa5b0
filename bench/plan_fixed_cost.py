"""How much of a skip plan's sampling time no skipping can remove? (eager, zoo models)

A skip plan saves the time of the units it skips; what runs outside the units (embeddings, the output
layers, the pipeline's loop and scheduler, the plan's hooks) costs the same at every step. This times, on the
same inputs in one process, a plan recipe against two bounds of the same runtime: the keep-all plan (every unit
at every step) and the plan that runs nothing after step 0 (the fixed cost). The share ``fixed / plan`` is what
compiling the units cannot speed up (``bench/compile_bench.py`` compiles only the units).

    OMP_NUM_THREADS=2 .venv/bin/python bench/plan_fixed_cost.py --model zoo:digits-dit \\
        --recipe bench/results/dipgo_digits-dit_recipe.json --out bench/results/plan_fixed_cost_digits-dit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffslim
from diffslim.evaluate import eval_set_for
from diffslim.recipe import load_recipe
from diffslim.sample import SampleSpec, sample


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zoo:digits-dit")
    ap.add_argument("--recipe", type=Path, default=Path("bench/results/dipgo_digits-dit_recipe.json"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    rec = load_recipe(a.recipe).skip_plan
    plan = np.asarray(rec.plan, dtype=bool)
    loaded = diffslim.load(a.model)
    es = eval_set_for(loaded, a.n, seed=0)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=len(plan), call_kwargs=dict(es.call_kwargs),
                      batch_size=a.n)
    floor = np.zeros_like(plan)
    floor[0] = True
    times = {}
    for name, p in (("keep_all", np.ones_like(plan)), ("plan", plan), ("nothing_after_step_0", floor)):
        pipe = diffslim.load(a.model).pipe
        diffslim.apply(pipe, {"skip_plan": {"granularity": rec.granularity, "units": rec.units, "plan": p.tolist()}})
        sample(pipe, spec)  # warm-up
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            sample(pipe, spec)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    result = {"command": "OMP_NUM_THREADS=2 .venv/bin/python " + " ".join(sys.argv), "model": a.model,
              "recipe": str(a.recipe), "n": a.n, "steps": len(plan), "threads": torch.get_num_threads(),
              "unit_steps_run": float(plan.mean()), "seconds": times,
              "fixed_share_of_plan": times["nothing_after_step_0"] / times["plan"]}
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
