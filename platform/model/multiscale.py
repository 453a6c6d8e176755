"""Multi-scale feature fusion (`--use-multiscale`): several backbone stages into one feature vector.

Each stage map is projected by a 1x1 conv + BatchNorm + ReLU to ``out_channels``, global-average-pooled, and the
pooled vectors are concatenated: the output has ``len(stage_channels) * out_channels`` features.

Why pool-then-concatenate rather than resize-and-sum (FPN-style, Lin et al. 2017, arXiv:1612.03144):

* cost: summing needs every stage upsampled to the stride-8 grid, i.e. maps 16x the area of the stride-32 one
  per stage; pooling each stage first costs nothing extra in memory;
* the head is a linear classifier on a pooled vector anyway, so spatial alignment between stages buys nothing,
  while concatenation keeps each scale's evidence in its own coordinates (a small nodule's stride-8 response is
  not averaged away by large-structure stride-32 responses) and lets the linear head weight scales per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class MultiScaleFusion(nn.Module):
    """Project, pool and concatenate a list of stage feature maps.

    Args:
        stage_channels: channels of each input map, in the order ``forward`` receives them.
        out_channels: projection width per stage.

    Attributes:
        out_features: size of the fused vector, ``len(stage_channels) * out_channels``.
    """

    def __init__(self, stage_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        if not stage_channels or out_channels < 1:
            raise ValueError("MultiScaleFusion needs at least one stage and out_channels >= 1")
        self.stage_channels = list(stage_channels)
        self.projections = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )
            for c in self.stage_channels
        )
        self.out_features = len(self.stage_channels) * out_channels

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.projections):
            raise ValueError(f"MultiScaleFusion expects {len(self.projections)} feature maps, got {len(features)}")
        pooled = [proj(f).mean(dim=(2, 3)) for proj, f in zip(self.projections, features, strict=True)]
        return torch.cat(pooled, dim=1)
