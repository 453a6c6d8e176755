"""Squeeze-and-Excitation channel attention.

Hu, Shen, Albanie, Sun & Wu, "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507.

The "squeeze" global-average-pools each channel; the "excitation" is a bottleneck MLP (reduction ratio ``r``,
ReLU, sigmoid) that outputs one gate in ``(0, 1)`` per channel; the input is rescaled channel-wise by its gate.
The MLP is written with 1x1 convolutions (as in timm's ``SEModule``) so it works on ``(B, C, 1, 1)`` tensors and
keeps ``channels_last`` inputs in that format.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SqueezeExcite(nn.Module):
    """SE block: ``x * sigmoid(W2 relu(W1 avgpool(x)))``, shape-preserving.

    Args:
        channels: input (and output) channels.
        reduction: the paper's ratio ``r`` (16 in the paper).
        min_channels: lower bound on the bottleneck width, so narrow stages keep a useful MLP.
    """

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"SqueezeExcite needs channels >= 1 and reduction >= 1, got {channels}, {reduction}")
        self.channels = channels
        rd_channels = max(min_channels, channels // reduction)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def gate(self, x: Tensor) -> Tensor:
        """Per-channel gates in ``(0, 1)``, shape ``(B, C, 1, 1)``."""
        s = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(self.act(self.fc1(s))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)
