"""Image data that installed packages ship: scikit-learn's digits, scikit-image's photos and faces.

Everything here is deterministic: the same call returns the same tensors on every machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# scikit-image photos bundled with the wheel (no download). The last two are held out from SR training.
SR_TRAIN_PHOTOS = (
    "astronaut", "camera", "coins", "moon", "brick", "grass", "gravel", "rocket",
    "immunohistochemistry", "hubble_deep_field", "retina", "cat", "clock", "page", "text",
)
SR_HELDOUT_PHOTOS = ("chelsea", "coffee")


def digits(split: str = "all", size: int = 16):
    """scikit-learn's 8x8 digits, bilinearly upsampled to ``size`` x ``size``.

    Returns ``(images, labels)``: images ``(N, 1, size, size)`` float32 in [0, 1]; labels ``(N,)`` int64.
    ``split``: "all", "train" (first 80% of a fixed permutation) or "test" (the other 20%).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    if split == "train":
        idx = perm[:n_train]
    elif split == "test":
        idx = perm[n_train:]
    elif split == "all":
        idx = torch.arange(len(y))
    else:
        raise ValueError(f"split {split!r} is not one of 'all', 'train', 'test'")
    return x[idx], y[idx]


def photo(name: str) -> torch.Tensor:
    """One scikit-image photo as ``(3, H, W)`` float32 in [0, 1] (grey photos repeated to RGB)."""
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    a = a.astype(np.float32) / 255.0
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    a = a[..., :3]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


def _shrink(img: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return img
    h, w = img.shape[-2:]
    return F.interpolate(img[None], size=(max(1, round(h * factor)), max(1, round(w * factor))),
                         mode="area")[0].clamp(0, 1)


def photo_patches(names, patch: int, count: int, seed: int, scales=(1.0, 0.5, 0.25)) -> torch.Tensor:
    """Random ``patch`` x ``patch`` crops of the named photos at several zoom levels.

    Returns ``(count, 3, patch, patch)`` float32 in [0, 1]; the same seed gives the same crops.
    """
    g = torch.Generator().manual_seed(seed)
    pyramids = []
    for n in names:
        img = photo(n)
        for s in scales:
            im = _shrink(img, s)
            if min(im.shape[-2:]) >= patch:
                pyramids.append(im)
    out = torch.empty(count, 3, patch, patch)
    for i in range(count):
        im = pyramids[int(torch.randint(len(pyramids), (1,), generator=g))]
        h, w = im.shape[-2:]
        y = int(torch.randint(h - patch + 1, (1,), generator=g))
        x = int(torch.randint(w - patch + 1, (1,), generator=g))
        crop = im[:, y:y + patch, x:x + patch]
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(-1)
        out[i] = crop
    return out


# The "BD" degradation of the SR literature (Zhang et al., SRMD, CVPR 2018; RDN): a Gaussian blur of sigma
# 1.6, then keep every second pixel. zoo:sr is trained on it (sigma 0 gives box averaging, the degradation
# of the first zoo:sr, on which bicubic is within 0.5 dB of the best linear estimate: see the README).
SR_BLUR_SIGMA = 1.6


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images, truncated at 3 sigma, reflect padding."""
    if sigma <= 0:
        return img
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = img.shape[1]
    x = F.pad(img, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def downscale(hr: torch.Tensor, factor: int, sigma: float = 0.0) -> torch.Tensor:
    """The LR input of SR: ``(B, C, H, W)`` -> ``(B, C, H/factor, W/factor)``.

    ``sigma=0``: box-filter averaging (zoo:sr's degradation); else a Gaussian blur of ``sigma`` then decimation.
    """
    if sigma <= 0:
        return F.avg_pool2d(hr, factor)
    return gaussian_blur(hr, sigma)[..., ::factor, ::factor].contiguous()
