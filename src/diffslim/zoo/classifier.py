"""The digit classifier trained here on real 8x8 digits: grades digit samples and gives FID features."""

from __future__ import annotations

import torch
from torch import nn

from diffslim.zoo.registry import WEIGHTS_DIR

CLASSIFIER_PATH = WEIGHTS_DIR / "digit_classifier.safetensors"


class DigitClassifier(nn.Module):
    """``(B, 1, 8, 8)`` images in [0, 1] -> logits ``(B, 10)``; ``features`` gives ``(B, 64)``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.SiLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_digit_classifier(path=CLASSIFIER_PATH) -> DigitClassifier:
    """The trained classifier from safetensors (eval mode, CPU, float32)."""
    from safetensors.torch import load_file

    net = DigitClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval()
