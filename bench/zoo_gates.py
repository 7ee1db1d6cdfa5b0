"""Measure the zoo's quality gates on larger samples than the tests use (numbers for the README).

    .venv/bin/python bench/zoo_gates.py [--n-digits 500] [--n-sr 64] [--models digits-sd,digits-dit,sr] [--json out.json]

With ``--json``, the measured models' entries replace theirs in that file and the others are kept.
"""

import argparse
import json
import time

import torch

from diffslim.measure import quality
from diffslim.models.load import load
from diffslim.sample import SampleSpec, sample
from diffslim.zoo.classifier import load_digit_classifier
from diffslim.zoo.evalsets import zoo_eval_set


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-digits", type=int, default=500)
    ap.add_argument("--n-sr", type=int, default=64)
    ap.add_argument("--models", default="digits-sd,digits-dit,sr")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    clf = load_digit_classifier()
    res = {}
    for name, n in (("digits-sd", a.n_digits), ("digits-dit", a.n_digits), ("sr", a.n_sr)):
        if name not in a.models.split(","):
            continue
        loaded = load(f"zoo:{name}")
        es = zoo_eval_set(name, n, seed=0)
        t0 = time.perf_counter()
        out = sample(loaded.pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=50, batch_size=100),
                     show_progress=True, description=name)
        r = {"n": n, "steps": 50, "scheduler": type(loaded.pipe.scheduler).__name__,
             "seconds": round(time.perf_counter() - t0, 1)}
        if es.labels is not None:
            r["digit_accuracy"] = quality.digit_accuracy(out, torch.tensor(es.labels), clf)
            r["gate"] = "digit_accuracy >= 0.90"
            r["passes"] = r["digit_accuracy"] >= 0.9
        else:
            gt, bic = es.ground_truth, es.baseline
            r.update(psnr=float(quality.psnr(out, gt).mean()), ssim=float(quality.ssim(out, gt).mean()),
                     bicubic_psnr=float(quality.psnr(bic, gt).mean()), bicubic_ssim=float(quality.ssim(bic, gt).mean()))
            r["gate"] = "psnr and ssim above bicubic on held-out photos"
            r["passes"] = r["psnr"] > r["bicubic_psnr"] and r["ssim"] > r["bicubic_ssim"]
            if getattr(loaded.pipe, "upsampler", None) is not None:  # the base the sampled residual is added to
                base = loaded.pipe.upsample(torch.stack([i["image"] for i in es.inputs]))
                r.update(upsampler_psnr=float(quality.psnr(base, gt).mean()),
                         upsampler_ssim=float(quality.ssim(base, gt).mean()))
        res[name] = r
        print(name, json.dumps(r))
    x, y = __import__("diffslim.zoo.data", fromlist=["digits"]).digits("test", size=8)
    res["classifier_test_accuracy"] = quality.digit_accuracy(x, y, clf)
    print("classifier on real held-out digits:", res["classifier_test_accuracy"])
    if a.json:
        from pathlib import Path

        old = json.loads(Path(a.json).read_text()) if Path(a.json).exists() else {}
        Path(a.json).write_text(json.dumps({**old, **res}, indent=2))


if __name__ == "__main__":
    main()
