"""Batch augmentation on tensors, on any device (the GPU during training).

* :class:`BasicAugment` (the basic augmentation): per-sample random rotation, scale and translation in one
  affine warp (``F.affine_grid`` + ``F.grid_sample``), per-sample horizontal flip and per-sample
  brightness/contrast jitter.
* :func:`cutmix` (Yun et al. 2019, arXiv:1905.04899) and :func:`mixup` (Zhang et al. 2018, arXiv:1710.09412) mix
  images and multi-hot labels within a batch; :class:`AdvancedAugment` picks one of them per batch.

Randomness: every function takes an optional ``torch.Generator``. Random numbers are drawn on the generator's
device (the default RNG of the input's device without one) and moved to the input's device, so a seeded CPU
generator gives the same augmentation on CPU and GPU. Beta-distributed mixing ratios are drawn with NumPy from a
seed taken from the torch generator (torch's Beta sampler takes no generator).

Everything here always augments; the training step calls it on training batches only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` uniform [0, 1) float32 numbers on ``device``, drawn from ``generator`` on its own device."""
    source = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=source, dtype=torch.float32).to(device)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return low + (high - low) * _rand(n, generator, device)


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=source).to(device)


def _randint(high: int, generator: torch.Generator | None) -> int:
    """One integer in ``[0, high)``."""
    source = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, high, (1,), generator=generator, device=source).item())


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """One Beta(alpha, alpha) sample, reproducible from ``generator`` (or torch's global RNG)."""
    if alpha <= 0:
        raise ValueError(f"Beta concentration alpha must be > 0, got {alpha}")
    seed = _randint(2**62, generator)
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _check_batch(x: Tensor, y: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"images ({x.shape[0]}) and labels ({y.shape[0]}) must have one batch size")


class BasicAugment(nn.Module):
    """Per-sample geometric and intensity augmentation of a ``(B, C, H, W)`` batch.

    Args:
        rotation_deg: rotation angle drawn from ``U(-rotation_deg, rotation_deg)`` degrees.
        hflip_p: probability of a horizontal (left-right) flip.
        translate: shift drawn from ``U(-translate, translate)`` times the image width / height, per axis.
        scale: zoom factor drawn from ``U(*scale)``.
        intensity_jitter: contrast ``c ~ U(1 - j, 1 + j)`` and brightness ``b ~ U(-j, j)`` applied as
            ``(x - mean) * c + mean + b * std`` with the sample's own mean/std, so ``j`` is relative and works
            the same on ``[0, 1]`` or ImageNet-normalised inputs.
        padding_mode: ``grid_sample`` padding for pixels moved in from outside; ``"border"`` repeats the edge,
            which in a CT slice is air, where zero padding would paint the normalised mean (soft tissue) in.

    ``forward(x, generator=None)`` returns a new tensor with ``x``'s shape and dtype (the warp is computed in
    float32). The affine warp is skipped when rotation, translation and scale are all disabled.
    """

    def __init__(
        self,
        rotation_deg: float = 10.0,
        hflip_p: float = 0.5,
        translate: float = 0.05,
        scale: tuple[float, float] = (0.9, 1.1),
        intensity_jitter: float = 0.1,
        padding_mode: str = "border",
    ) -> None:
        super().__init__()
        if rotation_deg < 0 or translate < 0 or intensity_jitter < 0:
            raise ValueError("rotation_deg, translate and intensity_jitter must be >= 0")
        if not 0.0 <= hflip_p <= 1.0:
            raise ValueError(f"hflip_p must be in [0, 1], got {hflip_p}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"padding_mode must be zeros, border or reflection, got {padding_mode!r}")
        self.rotation_deg = float(rotation_deg)
        self.hflip_p = float(hflip_p)
        self.translate = float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.intensity_jitter = float(intensity_jitter)
        self.padding_mode = padding_mode

    def extra_repr(self) -> str:
        return (
            f"rotation_deg={self.rotation_deg}, hflip_p={self.hflip_p}, translate={self.translate}, "
            f"scale={self.scale}, intensity_jitter={self.intensity_jitter}, padding_mode={self.padding_mode!r}"
        )

    def _affine_theta(self, b: int, h: int, w: int, generator: torch.Generator | None, device) -> Tensor:
        """``(B, 2, 3)`` output->input maps in ``affine_grid``'s normalised coordinates."""
        angle = _uniform(b, -self.rotation_deg, self.rotation_deg, generator, device) * (math.pi / 180.0)
        zoom = _uniform(b, self.scale[0], self.scale[1], generator, device)
        # translation as a fraction of the image; normalised coordinates span 2 units per image side
        tx = _uniform(b, -self.translate, self.translate, generator, device) * 2.0
        ty = _uniform(b, -self.translate, self.translate, generator, device) * 2.0
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Forward map (pixel space): rotate by `angle`, zoom, shift. Its inverse in normalised coordinates,
        # where x is divided by W/2 and y by H/2 (so non-square images are not sheared):
        #   A = [[cos, sin*H/W], [-sin*W/H, cos]] / zoom,   input = A @ (output - t)
        a = torch.stack(
            [
                torch.stack([cos, sin * (h / w)], dim=-1),
                torch.stack([-sin * (w / h), cos], dim=-1),
            ],
            dim=-2,
        ) / zoom.view(b, 1, 1)
        t = torch.stack([tx, ty], dim=-1).unsqueeze(-1)
        return torch.cat([a, -(a @ t)], dim=-1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"BasicAugment expects (B, C, H, W), got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        device = x.device
        out = x.float()

        flip = _rand(b, generator, device) < self.hflip_p
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)

        if self.rotation_deg > 0 or self.translate > 0 or self.scale != (1.0, 1.0):
            theta = self._affine_theta(b, h, w, generator, device)
            grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
            out = F.grid_sample(out, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)

        if self.intensity_jitter > 0:
            j = self.intensity_jitter
            contrast = _uniform(b, 1.0 - j, 1.0 + j, generator, device).view(b, 1, 1, 1)
            brightness = _uniform(b, -j, j, generator, device).view(b, 1, 1, 1)
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            std = out.std(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * contrast + mean + brightness * std
        return out.to(x.dtype)


def cutmix(x: Tensor, y: Tensor, alpha: float = 1.0, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """CutMix a batch: paste one random box from a shuffled copy of the batch into every image.

    ``lam0 ~ Beta(alpha, alpha)`` sets the box size (area ``(1 - lam0) H W``, centre uniform, clipped at the
    image border). Labels are mixed with the *exact* kept-area fraction of the box actually pasted,
    ``lam = 1 - box_area / (H W)``: ``y_mixed = lam * y + (1 - lam) * y[perm]``. Returns new tensors; labels
    are returned as float.
    """
    _check_batch(x, y)
    b, _, h, w = x.shape
    lam0 = _beta(alpha, generator)
    perm = _randperm(b, generator, x.device)
    cut_ratio = math.sqrt(1.0 - lam0)
    cut_h, cut_w = int(h * cut_ratio), int(w * cut_ratio)
    cy, cx = _randint(h, generator), _randint(w, generator)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy - cut_h // 2 + cut_h, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx - cut_w // 2 + cut_w, w)
    box_area = max(y2 - y1, 0) * max(x2 - x1, 0)
    lam = 1.0 - box_area / float(h * w)

    x_mixed = x.clone()
    if box_area > 0:
        x_mixed[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    yf = y.float()
    return x_mixed, lam * yf + (1.0 - lam) * yf[perm]


def mixup(x: Tensor, y: Tensor, alpha: float = 0.4, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """MixUp a batch with a shuffled copy of itself: ``lam ~ Beta(alpha, alpha)``, one ``lam`` per batch.

    ``x_mixed = lam * x + (1 - lam) * x[perm]`` and ``y_mixed = lam * y + (1 - lam) * y[perm]`` (labels float).
    """
    _check_batch(x, y)
    lam = _beta(alpha, generator)
    perm = _randperm(x.shape[0], generator, x.device)
    yf = y.float()
    return lam * x + (1.0 - lam) * x[perm], lam * yf + (1.0 - lam) * yf[perm]


class AdvancedAugment(nn.Module):
    """The advanced augmentation (`--use-advanced-aug`): per batch, CutMix with probability ``cutmix_prob``, else MixUp.

    Every batch is mixed, by exactly one of the two: ``--cutmix-prob`` is the only knob the command line gives, and it
    reads as "the share of CutMix among mixed batches"; applying one mix per batch keeps each label a mix of
    exactly two samples with a known ratio. ``cutmix_prob=0`` is MixUp only, ``1`` is CutMix only.
    ``forward(x, y, generator=None) -> (x_mixed, y_mixed)``; apply :class:`BasicAugment` before it.
    """

    def __init__(self, cutmix_prob: float = 0.5, mixup_alpha: float = 0.4, cutmix_alpha: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= cutmix_prob <= 1.0:
            raise ValueError(f"cutmix_prob must be in [0, 1], got {cutmix_prob}")
        if mixup_alpha <= 0 or cutmix_alpha <= 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be > 0")
        self.cutmix_prob = float(cutmix_prob)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)

    def extra_repr(self) -> str:
        return f"cutmix_prob={self.cutmix_prob}, mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}"

    def forward(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        source = generator.device if generator is not None else torch.device("cpu")
        u = float(torch.rand((), generator=generator, device=source).item())
        if u < self.cutmix_prob:
            return cutmix(x, y, alpha=self.cutmix_alpha, generator=generator)
        return mixup(x, y, alpha=self.mixup_alpha, generator=generator)
