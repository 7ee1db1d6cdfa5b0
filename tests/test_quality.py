"""Quality metrics: exact relations for PSNR/SSIM, FID against a direct computation, offline weight handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from diffslim.measure.quality import (
    PSNR_MAX_DB,
    FeatureFID,
    MetricReport,
    MetricUnavailable,
    clip_score_metric,
    compute_metrics,
    digit_accuracy,
    fid_inception,
    lpips_metric,
    psnr,
    ssim,
    ssim_window,
)
from diffslim.zoo.classifier import DigitClassifier


def _images(shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- PSNR / SSIM ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (2, 3, 32, 32)])
def test_psnr_of_identical_images_is_the_cap(shape):
    x = _images(shape)
    assert torch.equal(psnr(x, x), torch.full((shape[0],), PSNR_MAX_DB))


def test_psnr_matches_known_mse():
    ref = torch.full((3, 1, 8, 8), 0.5, dtype=torch.float64)
    step = torch.tensor([0.25, 0.125, 0.01], dtype=torch.float64).view(3, 1, 1, 1)
    pred = ref + step
    mse = ((pred - ref) ** 2).mean(dim=(1, 2, 3))
    expected = 10 * torch.log10(1 / mse)
    # torchmetrics turns ln into log10 with a float32 constant: equal to ~1e-7 relative
    torch.testing.assert_close(psnr(pred, ref), expected, rtol=1e-6, atol=0)
    assert psnr(pred, ref)[0].item() == pytest.approx(10 * math.log10(16), rel=1e-6)


def test_psnr_is_per_image():
    ref = _images((2, 3, 32, 32))
    pred = ref.clone()
    pred[1] = (pred[1] + 0.1).clamp(0, 1)
    values = psnr(pred, ref)
    assert values.shape == (2,)
    assert values[0] == PSNR_MAX_DB and values[1] < 40


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (2, 3, 32, 32)])
def test_ssim_of_identical_images_is_one_and_drops_with_noise(shape):
    x = _images(shape)
    torch.testing.assert_close(ssim(x, x), torch.ones(shape[0]), rtol=0, atol=1e-6)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    light = ssim((x + 0.05 * noise).clamp(0, 1), x)
    heavy = ssim((x + 0.3 * noise).clamp(0, 1), x)
    assert light.shape == (shape[0],)
    assert torch.all(light < 1) and torch.all(heavy < light)


def test_ssim_window_fits_small_images():
    assert ssim_window(8, 8) == (7, pytest.approx(6 / 7))
    assert ssim_window(5, 9)[0] == 5
    assert ssim_window(32, 32) == (11, 1.5)
    with pytest.raises(ValueError):
        ssim_window(2, 8)


def test_paired_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8))


# --- FID --------------------------------------------------------------------------------------------------------------


def _linear_features(dim=6, seed=0):
    weight = torch.randn(64, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda images: images.reshape(images.shape[0], -1).double() @ weight


def _numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_of_a_set_with_itself_is_zero():
    x = _images((200, 1, 8, 8))
    fid = FeatureFID(_linear_features())
    fid.update(x, real=True)
    fid.update(x, real=False)
    assert abs(fid.compute()) < 1e-6


def test_fid_matches_numpy_and_grows_with_shift():
    features = _linear_features()
    real, fake = _images((300, 1, 8, 8), seed=0), _images((250, 1, 8, 8), seed=1)
    fid = FeatureFID(features, batch_size=64)
    fid.update(real[:100], real=True)
    fid.update(real[100:], real=True)
    fid.update(fake, real=False)
    expected = _numpy_fid(features(real).numpy(), features(fake).numpy())
    assert fid.compute() == pytest.approx(expected, rel=1e-6)

    values = []
    for shift in (0.0, 0.05, 0.2):
        fid.reset()  # keeps the real statistics
        fid.update(fake + shift, real=False)
        values.append(fid.compute())
    assert fid.num_real == 300 and fid.num_generated == 250
    assert values[0] < values[1] < values[2]


def test_fid_with_digit_classifier_features():
    torch.manual_seed(0)
    net = DigitClassifier().eval()
    x = _images((64, 1, 8, 8))
    fid = FeatureFID(net.features)
    fid.update(x, real=True)
    fid.update(x, real=False)
    same = fid.compute()
    fid.reset()
    fid.update((x * 0.3).clamp(0, 1), real=False)
    assert abs(same) < 1e-4 < fid.compute()


def test_fid_needs_two_samples_each():
    fid = FeatureFID(_linear_features())
    fid.update(_images((5, 1, 8, 8)), real=True)
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute()


# --- digit accuracy ---------------------------------------------------------------------------------------------------


class _StubClassifier(torch.nn.Module):
    """Predicts the digit written in pixel (0, 0) as value / 10: outputs fully under the test's control."""

    def __init__(self):
        super().__init__()
        self.seen_shape = None

    def forward(self, x):
        self.seen_shape = tuple(x.shape)
        digit = (x[:, 0, 0, 0] * 10).round().long().clamp(0, 9)
        return torch.nn.functional.one_hot(digit, 10).float()


def test_digit_accuracy_counts_matches():
    images = torch.zeros(4, 1, 8, 8)
    images[:, 0, 0, 0] = torch.tensor([0.3, 0.5, 0.7, 0.1])
    stub = _StubClassifier()
    assert digit_accuracy(images, torch.tensor([3, 5, 7, 1]), stub) == 1.0
    assert digit_accuracy(images, [3, 5, 0, 0], stub) == 0.5


def test_digit_accuracy_resizes_with_area_interpolation():
    images = torch.zeros(2, 1, 16, 16)
    images[0, 0, :2, :2] = 0.4  # a 2x2 block averages to one 8x8 pixel of 0.4
    images[1, 0, :2, :2] = 0.2
    stub = _StubClassifier()
    assert digit_accuracy(images, [4, 2], stub) == 1.0
    assert stub.seen_shape == (2, 1, 8, 8)


def test_digit_accuracy_with_random_classifier_is_a_share():
    torch.manual_seed(0)
    value = digit_accuracy(_images((16, 1, 8, 8)), torch.arange(16) % 10, DigitClassifier().eval())
    assert 0.0 <= value <= 1.0


# --- weights that are not here ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, name", [(fid_inception, "fid_inception"), (clip_score_metric, "clip_score"), (lpips_metric, "lpips")]
)
def test_missing_weights_raise_metric_unavailable(build, name, tmp_path):
    for path in (None, tmp_path / "missing"):
        with pytest.raises(MetricUnavailable) as info:
            build(path)
        assert info.value.name == name
        assert name in str(info.value)


def test_clip_score_from_a_local_folder(tmp_path):
    """A tiny random CLIP saved to disk loads offline and scores like a direct computation."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=52, eos_token_id=53),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path)
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    images_proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=images_proc, tokenizer=tokenizer).save_pretrained(tmp_path)

    metric = clip_score_metric(tmp_path)
    images, prompts = _images((2, 1, 16, 16)), ["a cat", "dog"]
    metric.update(images, prompts)
    score = metric.compute()

    model = CLIPModel.from_pretrained(tmp_path).eval()
    processor = CLIPProcessor.from_pretrained(tmp_path)
    rgb = (images.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    with torch.no_grad():
        pixels = processor(images=list(rgb), return_tensors="pt")["pixel_values"]
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        img = model.get_image_features(pixels).pooler_output
        txt = model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(score, torch.clamp(100 * cos.mean(), min=0), rtol=1e-5, atol=1e-4)


# --- compute_metrics --------------------------------------------------------------------------------------------------


def test_compute_metrics_reports_what_ran_and_why_not():
    refs = _images((8, 1, 8, 8))
    outs = (refs + 0.05).clamp(0, 1)
    report = compute_metrics(outs)
    assert isinstance(report, MetricReport) and report.values == {}
    assert set(report.skipped) == {"psnr", "ssim", "digit_accuracy", "fid"}

    def unavailable(outputs, references):
        raise MetricUnavailable("lpips", "no weights")

    images = torch.zeros(8, 1, 8, 8)
    images[:, 0, 0, 0] = 0.2
    report = compute_metrics(
        images,
        images,
        labels=[2] * 6 + [3] * 2,
        classifier=_StubClassifier(),
        real_images=_images((40, 1, 8, 8), seed=3),
        fid_features=_linear_features(),
        extra={"lpips": unavailable, "mean": lambda o, r: o.mean()},
    )
    assert report.values["psnr"] == PSNR_MAX_DB
    assert report.values["ssim"] == pytest.approx(1.0)
    assert report.values["digit_accuracy"] == 0.75
    assert report.values["fid"] > 0
    assert report.values["mean"] == pytest.approx(0.2 / 64)
    assert report.skipped == {"lpips": "no weights"}


def test_compute_metrics_reuses_real_statistics():
    features = _linear_features()
    real, outs = _images((50, 1, 8, 8), seed=0), _images((30, 1, 8, 8), seed=1)
    cached = FeatureFID(features)
    cached.update(real, real=True)
    first = compute_metrics(outs, fid_features=cached).values["fid"]
    again = compute_metrics(outs, fid_features=cached).values["fid"]
    fresh = compute_metrics(outs, real_images=real, fid_features=features).values["fid"]
    assert first == pytest.approx(again, rel=1e-9) and first == pytest.approx(fresh, rel=1e-9)
    with pytest.raises(ValueError, match="not both"):
        compute_metrics(outs, real_images=real, fid_features=cached)
    assert "fid" in compute_metrics(outs, fid_features=features).skipped
