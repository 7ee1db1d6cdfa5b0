"""Quality metrics: how far a compressed model's outputs are from reference outputs or from real data.

Images are float tensors ``(B, C, H, W)`` in [0, 1] throughout, ``C`` being 1 or 3.

Paired metrics (``psnr``, ``ssim``) compare each output with the reference output made from the same seed
and inputs. Distribution metrics (``FeatureFID``) compare sets. ``digit_accuracy`` grades class-conditional
digit samples with the zoo's classifier. ``compute_metrics`` runs whatever applies and says why the rest
did not run.

Nothing here downloads weights. The metrics that need pretrained networks (Inception FID, CLIP score,
LPIPS) are built by ``fid_inception``, ``clip_score_metric`` and ``lpips_metric`` from local files, and
raise ``MetricUnavailable`` when those files (or the packages that read them) are missing. A metric that
cannot run is reported as such, never as 0.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities.imports import (
    _TORCH_FIDELITY_AVAILABLE,
    _TORCHVISION_AVAILABLE,
    _TRANSFORMERS_GREATER_EQUAL_4_10,
)

PSNR_MAX_DB = 100.0
"""PSNR of identical images is infinite; it is reported as this cap so that means stay finite."""

SSIM_SIGMA = 1.5
"""The gaussian SSIM window's standard deviation of Wang et al. (2004), used on images at least 11 pixels."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True,
    "ssim": True,
    "digit_accuracy": True,
    "fid": False,
    "fid_inception": False,
    "clip_score": True,
    "lpips": False,
}
"""Direction of every metric this module can report, for tables and plots."""


class MetricUnavailable(Exception):
    """A metric cannot run here: its local weights or the package that reads them are missing.

    ``name`` is the metric, ``reason`` a one-line explanation that says what to pass or install.
    """

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"metric '{name}' is unavailable: {reason}")


@dataclass
class MetricReport:
    """Result of ``compute_metrics``: ``values`` maps metric name -> number; ``skipped`` maps name -> why not."""

    values: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Paired metrics


def _check_images(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) image tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")


def _check_pair(pred: Tensor, ref: Tensor) -> None:
    _check_images(pred, "pred")
    _check_images(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {tuple(pred.shape)} and {tuple(ref.shape)}")


def psnr(pred: Tensor, ref: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of each image, in dB, with data range 1.

    ``pred`` and ``ref``: ``(B, C, H, W)`` in [0, 1]. Returns ``(B,)``: ``10 * log10(1 / mse)`` per image (mse over
    C, H, W), capped at ``PSNR_MAX_DB`` so identical images give the cap instead of ``inf``.
    """
    _check_pair(pred, ref)
    values = peak_signal_noise_ratio(pred, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.clamp(max=PSNR_MAX_DB)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """The gaussian SSIM window ``(size, sigma)`` used for ``height x width`` images.

    The standard window is 11x11 with sigma 1.5. Smaller images (8x8 digits) get the largest odd size that
    fits, ``k <= min(H, W)``, with sigma ``(k - 1) / 7``: torchmetrics derives the gaussian window from sigma
    alone (size ``2 * int(3.5 * sigma + 0.5) + 1``, its ``kernel_size`` is ignored), so sigma is what sets the size.
    SSIM is then averaged over the ``(H - k + 1) x (W - k + 1)`` window positions that fit inside the image
    (8x8 -> a 7x7 window at 2x2 positions).
    """
    side = min(height, width)
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    if side >= 11:
        return 11, SSIM_SIGMA
    size = side if side % 2 == 1 else side - 1
    sigma = (size - 1) / 7
    assert 2 * int(3.5 * sigma + 0.5) + 1 == size  # what torchmetrics will build from sigma
    return size, sigma


def ssim(pred: Tensor, ref: Tensor) -> Tensor:
    """Structural similarity of each image (gaussian window, see ``ssim_window``), data range 1.

    ``pred`` and ``ref``: ``(B, C, H, W)`` in [0, 1], H and W at least 3. Returns ``(B,)``, the SSIM map averaged
    over channels and window positions; identical images give 1.
    """
    _check_pair(pred, ref)
    _, sigma = ssim_window(pred.shape[-2], pred.shape[-1])
    return structural_similarity_index_measure(
        pred, ref, gaussian_kernel=True, sigma=sigma, data_range=1.0, reduction="none"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Class-conditional accuracy


def digit_accuracy(images: Tensor, labels: Tensor | Sequence[int], classifier: Callable[[Tensor], Tensor]) -> float:
    """Share of samples that ``classifier`` labels as the digit they were generated for.

    ``images``: ``(B, 1, H, W)`` in [0, 1], resized to 8x8 (area interpolation) when they are not 8x8.
    ``labels``: ``(B,)`` requested digits. ``classifier``: ``(B, 1, 8, 8) -> (B, 10)`` logits, e.g.
    ``diffslim.zoo.classifier.DigitClassifier`` in eval mode. Returns a float in [0, 1].
    """
    _check_images(images, "images")
    if images.shape[1] != 1:
        raise ValueError(f"digit_accuracy expects 1-channel images (B, 1, H, W), got {tuple(images.shape)}")
    labels = torch.as_tensor(labels, device=images.device).long().reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[-2:] != (8, 8):
        images = F.interpolate(images, size=(8, 8), mode="area")
    with torch.no_grad():
        logits = classifier(images)
    return (logits.argmax(dim=-1) == labels.to(logits.device)).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# FID


class _PrecomputedFeatures(nn.Module):
    """Stands in for torchmetrics' feature network: FeatureFID hands it features, it returns them as float64."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features.double()


class FeatureFID:
    """Frechet distance between the feature distributions of real and generated images, any feature network.

    ``features``: a callable ``(B, C, H, W) -> (B, D)`` (e.g. ``DigitClassifier.features`` for digits, or the
    Inception network inside ``fid_inception``), called under ``torch.no_grad`` in chunks of ``batch_size``;
    pass networks in eval mode. Statistics are accumulated and the distance computed by torchmetrics'
    ``FrechetInceptionDistance`` in float64 (the features are extracted here and handed to it precomputed).

    Real statistics survive ``reset()``, so one set of real images serves many compressed variants.
    """

    def __init__(self, features: Callable[[Tensor], Tensor], *, batch_size: int = 256):
        self.features = features
        self.batch_size = batch_size
        self._fid: FrechetInceptionDistance | None = None

    @property
    def num_real(self) -> int:
        """Number of real images accumulated."""
        return 0 if self._fid is None else int(self._fid.real_features_num_samples)

    @property
    def num_generated(self) -> int:
        """Number of generated images accumulated."""
        return 0 if self._fid is None else int(self._fid.fake_features_num_samples)

    def _extract(self, images: Tensor) -> Tensor:
        chunks = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                feats = self.features(images[start : start + self.batch_size])
                if feats.dim() != 2:
                    raise ValueError(f"the FID feature network must return (B, D) features, got {tuple(feats.shape)}")
                chunks.append(feats.detach().to("cpu", torch.float64))
        return torch.cat(chunks)

    def update(self, images: Tensor, real: bool) -> None:
        """Add images ``(B, C, H, W)`` in [0, 1] to the real (``real=True``) or generated statistics."""
        _check_images(images, "images")
        feats = self._extract(images)
        if self._fid is None:
            self._fid = FrechetInceptionDistance(
                feature=_PrecomputedFeatures(feats.shape[1]), reset_real_features=False
            )
        elif feats.shape[1] != self._fid.inception.num_features:
            raise ValueError(f"features changed width: {feats.shape[1]} vs {self._fid.inception.num_features}")
        self._fid.update(feats, real=real)

    def compute(self) -> float:
        """FID between everything accumulated so far: ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2)``.

        Needs at least 2 real and 2 generated images.
        """
        if self.num_real < 2 or self.num_generated < 2:
            raise ValueError(
                f"FID needs at least 2 real and 2 generated images, has {self.num_real} and {self.num_generated}"
            )
        return float(self._fid.compute())

    def reset(self, *, real: bool = False) -> None:
        """Forget the generated statistics; also the real ones when ``real=True``."""
        if self._fid is None:
            return
        if real:
            self._fid = None
        else:
            self._fid.reset()


def _to_uint8_rgb(images: Tensor) -> Tensor:
    """``(B, 1|3, H, W)`` in [0, 1] -> ``(B, 3, H, W)`` uint8, what Inception and CLIP preprocessing expect."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def fid_inception(path: str | os.PathLike | None = None, *, batch_size: int = 64) -> FeatureFID:
    """Standard FID (Inception-v3 pool features, 2048-d) from local weights, as a ``FeatureFID``.

    ``path``: torch-fidelity's Inception weights file (``weights-inception-2015-12-05-6726825d.pth``, the
    ``pt_inception`` port of the TF FID network), read through torchmetrics' ``feature_extractor_weights_path``.
    Images ``(B, 1|3, H, W)`` in [0, 1] are turned into uint8 RGB and resized to 299 by the network.
    Raises ``MetricUnavailable`` when no path is given, the file is missing or torch-fidelity is not installed.
    """
    name = "fid_inception"
    if path is None:
        raise MetricUnavailable(
            name, "no local Inception weights; pass fid_inception(path=...) with torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth"
        )
    if not Path(path).is_file():
        raise MetricUnavailable(name, f"Inception weights file not found: {path}")
    if not _TORCH_FIDELITY_AVAILABLE:
        raise MetricUnavailable(
            name, "torch-fidelity is not installed (pip install torch-fidelity); it builds Inception"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
    )
    return FeatureFID(lambda images: net(_to_uint8_rgb(images)), batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP score and LPIPS over torchmetrics, local weights only

try:
    from torchmetrics.multimodal.clip_score import CLIPScore as _TorchmetricsCLIPScore
except ImportError:  # pragma: no cover - torchmetrics without its multimodal module
    _TorchmetricsCLIPScore = None


class _CLIPFeatures(nn.Module):
    """Gives torchmetrics the ``get_*_features -> Tensor`` it expects; transformers 5 returns model outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


if _TorchmetricsCLIPScore is not None:

    class PromptCLIPScore(_TorchmetricsCLIPScore):
        """torchmetrics' ``CLIPScore`` taking our images: ``update(images, prompts)``, ``compute() -> Tensor``.

        ``images``: ``(B, 1|3, H, W)`` in [0, 1] (converted to uint8 RGB for the CLIP processor, which would
        otherwise rescale [0, 1] floats a second time); ``prompts``: ``B`` strings. The score is
        ``max(100 * mean cosine(image, prompt), 0)``.
        """

        def update(self, images: Tensor, prompts: str | list[str]) -> None:  # type: ignore[override]
            _check_images(images, "images")
            super().update(_to_uint8_rgb(images), prompts)


def clip_score_metric(path: str | os.PathLike | None = None) -> PromptCLIPScore:
    """CLIP score (image-prompt agreement) with a CLIP model loaded from a local folder.

    ``path``: a folder holding a transformers ``CLIPModel`` and its ``CLIPProcessor`` (``save_pretrained``
    format, e.g. a snapshot of openai/clip-vit-base-patch16), loaded with ``local_files_only``. Returns a
    ``PromptCLIPScore``. Raises ``MetricUnavailable`` when no path is given, the folder has no
    ``config.json`` or transformers is missing.
    """
    name = "clip_score"
    if path is None:
        raise MetricUnavailable(
            name, "no local CLIP weights; pass clip_score_metric(path=...) with a folder saved by "
            "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained"
        )
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MetricUnavailable(name, f"no CLIP model folder (config.json) at {folder}")
    if _TorchmetricsCLIPScore is None or not _TRANSFORMERS_GREATER_EQUAL_4_10:
        raise MetricUnavailable(name, "transformers>=4.10 is not installed")
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        return _CLIPFeatures(model), processor

    # a callable is the one form torchmetrics accepts besides its list of hub names
    return PromptCLIPScore(model_name_or_path=load)


_LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def lpips_metric(path: str | os.PathLike | None = None, *, net_type: str = "alex"):
    """LPIPS distance with a local backbone checkpoint; returns torchmetrics' metric with ``normalize=True``.

    The returned metric's ``update(pred, ref)`` takes ``(B, 3, H, W)`` in [0, 1] and ``compute()`` gives the mean
    distance (lower is closer). torchmetrics ships LPIPS' linear layers, but builds the backbone with torchvision,
    which downloads ImageNet weights; ``path`` is that torchvision checkpoint file (for ``net_type="alex"``:
    ``alexnet-owt-7be5be79.pth``), served to torchvision from a temporary hub cache so nothing is downloaded.
    Raises ``MetricUnavailable`` when torchvision is not installed, no path is given or the file is missing.
    """
    name = "lpips"
    if net_type not in _LPIPS_BACKBONES:
        raise ValueError(f"net_type must be one of {sorted(_LPIPS_BACKBONES)}, got {net_type!r}")
    if not _TORCHVISION_AVAILABLE:
        raise MetricUnavailable(
            name, "torchvision is not installed; torchmetrics builds the LPIPS backbone with it "
            "(pip install torchvision, then pass lpips_metric(path=...) with the backbone checkpoint)"
        )
    import torchvision
    from torchmetrics.functional.image.lpips import _weight_map
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    backbone = _LPIPS_BACKBONES[net_type]
    url = getattr(torchvision.models, _weight_map[backbone]).DEFAULT.url
    filename = os.path.basename(urlparse(url).path)
    if path is None:
        raise MetricUnavailable(name, f"no local {backbone} weights; pass lpips_metric(path=...) with {filename}")
    if not Path(path).is_file():
        raise MetricUnavailable(name, f"{backbone} weights file not found: {path}")

    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        os.symlink(Path(path).resolve(), Path(hub) / "checkpoints" / filename)
        torch.hub.set_dir(hub)
        try:
            return LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True)
        finally:
            torch.hub.set_dir(previous)


# ---------------------------------------------------------------------------------------------------------------------
# What applies


def compute_metrics(
    outputs: Tensor,
    references: Tensor | None = None,
    *,
    labels: Tensor | Sequence[int] | None = None,
    classifier: Callable[[Tensor], Tensor] | None = None,
    real_images: Tensor | None = None,
    fid_features: Callable[[Tensor], Tensor] | FeatureFID | None = None,
    extra: Mapping[str, Callable[[Tensor, Tensor | None], float]] | None = None,
) -> MetricReport:
    """Every quality metric that the given inputs allow, and for the others the reason they did not run.

    - ``outputs``: ``(B, C, H, W)`` in [0, 1], the samples of the model under test.
    - ``references``: ``(B, C, H, W)``, reference outputs from the same seeds and inputs -> ``psnr``, ``ssim``
      (means over the batch; see ``psnr`` and ``ssim``).
    - ``labels`` ``(B,)`` and ``classifier`` ``(B, 1, 8, 8) -> (B, 10)`` -> ``digit_accuracy``.
    - ``fid_features`` and ``real_images`` ``(N, C, H, W)`` -> ``fid`` of outputs against real images.
      ``fid_features`` is a feature callable ``(B, C, H, W) -> (B, D)``, or a ``FeatureFID`` already holding real
      statistics (then leave ``real_images`` out; its generated statistics are reset first).
    - ``extra``: ``name -> fn(outputs, references) -> float`` for further metrics (e.g. LPIPS, CLIP score);
      one raising ``MetricUnavailable`` is reported as skipped.

    Returns ``MetricReport(values, skipped)``: each of psnr, ssim, digit_accuracy, fid and the extra names is in
    exactly one of the two dicts. Inconsistent inputs (shapes, counts) raise ``ValueError``.
    """
    _check_images(outputs, "outputs")
    report = MetricReport()

    if references is None:
        report.skipped["psnr"] = report.skipped["ssim"] = "no reference outputs given"
    else:
        report.values["psnr"] = psnr(outputs, references).mean().item()
        if min(outputs.shape[-2:]) < 3:
            report.skipped["ssim"] = f"images of {outputs.shape[-2]}x{outputs.shape[-1]} are too small (3x3 minimum)"
        else:
            report.values["ssim"] = ssim(outputs, references).mean().item()

    if labels is None or classifier is None:
        missing = " and ".join(n for n, v in (("labels", labels), ("classifier", classifier)) if v is None)
        report.skipped["digit_accuracy"] = f"no {missing} given"
    else:
        report.values["digit_accuracy"] = digit_accuracy(outputs, labels, classifier)

    _fid_into(report, outputs, fid_features, real_images)

    for name, fn in (extra or {}).items():
        try:
            report.values[name] = float(fn(outputs, references))
        except MetricUnavailable as err:
            report.skipped[name] = err.reason
    return report


def _fid_into(
    report: MetricReport,
    outputs: Tensor,
    fid_features: Callable[[Tensor], Tensor] | FeatureFID | None,
    real_images: Tensor | None,
) -> None:
    if fid_features is None:
        report.skipped["fid"] = "no FID feature network given"
        return
    if isinstance(fid_features, FeatureFID):
        if real_images is not None:
            raise ValueError("give real images either inside the FeatureFID or as real_images, not both")
        fid = fid_features
        fid.reset()
    else:
        if real_images is None:
            report.skipped["fid"] = "no real images given"
            return
        fid = FeatureFID(fid_features)
        if real_images.shape[0] >= 2:
            fid.update(real_images, real=True)
    if fid.num_real < 2 or outputs.shape[0] < 2:
        report.skipped["fid"] = (
            f"FID needs at least 2 real and 2 generated images, has {fid.num_real} and {outputs.shape[0]}"
        )
        return
    fid.update(outputs, real=False)
    report.values["fid"] = fid.compute()
