"""The reference zoo's quality gates, checked on a small sample of the shipped weights.

The full-size measurements (more samples) are in bench/zoo_gates.py and the README.
"""

import pytest
import torch

from diffslim.measure import quality
from diffslim.models.load import load
from diffslim.sample import SampleSpec, sample
from diffslim.zoo.classifier import load_digit_classifier
from diffslim.zoo.evalsets import zoo_eval_set
from diffslim.zoo.registry import ZOO


def _run(name, n):
    loaded = load(f"zoo:{name}")
    es = zoo_eval_set(name, n, seed=0)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=50, batch_size=n)
    assert type(loaded.pipe.scheduler).__name__ == "DDIMScheduler"
    return es, sample(loaded.pipe, spec)


@pytest.mark.parametrize("name", ["digits-sd", "digits-dit"])
def test_digit_models_draw_the_requested_digit(name):
    es, out = _run(name, 60)
    acc = quality.digit_accuracy(out, torch.tensor(es.labels), load_digit_classifier())
    assert acc >= 0.9, f"{name}: {acc:.3f} of 50-step DDIM samples classified as the requested digit"


@pytest.mark.xfail(strict=True, reason=(
    "known open gate: the CPU-trained zoo:sr samples detail nearly uncorrelated with the truth (bench/zoo_gates.py: "
    "PSNR 32.1 vs bicubic 35.1 dB on 64 held-out crops); strict, so the day it passes this marker must go"))
def test_sr_beats_bicubic_on_held_out_photos():
    es, out = _run("sr", 16)
    gt, bic = es.ground_truth, es.baseline
    assert float(quality.psnr(out, gt).mean()) > float(quality.psnr(bic, gt).mean())
    assert float(quality.ssim(out, gt).mean()) > float(quality.ssim(bic, gt).mean())


def test_classifier_is_accurate_on_real_held_out_digits():
    from diffslim.zoo import data

    x, y = data.digits("test", size=8)
    acc = quality.digit_accuracy(x, y, load_digit_classifier())
    assert acc >= 0.95


def test_zoo_weights_are_small_safetensors():
    from diffslim.zoo.registry import WEIGHTS_DIR

    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert all(p.suffix in (".safetensors", ".json") for p in files), files
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    for name in ZOO:
        assert (ZOO[name].folder / "model_index.json").exists(), name
