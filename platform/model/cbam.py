"""Convolutional Block Attention Module: channel attention, then spatial attention.

Woo, Park, Lee & Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018, arXiv:1807.06521.

* Channel attention (paper eq. 2): ``Mc = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one shared bottleneck
  MLP (reduction ``r``, ReLU).
* Spatial attention (paper eq. 3): ``Ms = sigmoid(conv7x7([mean_c(x); max_c(x)]))``.
* CBAM (paper eq. 1): ``x' = Mc(x) * x``, then ``x'' = Ms(x') * x'`` (sequential, channel first, as the paper
  found best).

The paper's formula is followed as written (a plain 7x7 conv before the sigmoid; the authors' code also adds a
BatchNorm there). The MLP uses 1x1 convolutions, as timm's ``cbam.py`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelAttention(nn.Module):
    """CBAM channel gate ``sigmoid(MLP(avg) + MLP(max))``, shape ``(B, C, 1, 1)``."""

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8) -> None:
        super().__init__()
        rd_channels = max(min_channels, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True),
        )

    def gate(self, x: Tensor) -> Tensor:
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class SpatialAttention(nn.Module):
    """CBAM spatial gate ``sigmoid(conv([mean_c; max_c]))``, shape ``(B, 1, H, W)``."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SpatialAttention kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def gate(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel attention followed by spatial attention; shape-preserving."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channels = channels
        self.channel = ChannelAttention(channels, reduction=reduction)
        self.spatial = SpatialAttention(kernel_size=kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))
