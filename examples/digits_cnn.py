"""The small CNN of the digits sweeps: torch only, so the Ray-free fused-step benchmark can import it too."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, linear on the 8x8 digit images (flat 64-feature rows in)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))
