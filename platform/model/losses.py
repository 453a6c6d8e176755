"""Multi-label losses on logits (`--loss-type {focal,bce,asl}`), all accepting soft targets in ``[0, 1]``.

Soft targets come from CutMix/MixUp (``lam * y_a + (1 - lam) * y_b``). Every loss here is written as
``t * L_pos(p) + (1 - t) * L_neg(p)`` (or the equivalent), which for a mixed target is exactly the mixture of
the two samples' losses, and reduces to the usual definition for 0/1 targets. Losses are computed in float32
even when the logits are float16/bfloat16 (mixed precision).

* :class:`FocalLoss`: Lin et al. 2017, arXiv:1708.02002 (``torchvision.ops.sigmoid_focal_loss``).
* :class:`AsymmetricLoss`: Ridnik et al. 2021, arXiv:2009.14119.
* :class:`WeightedBCELoss`: BCE with per-class positive weights (:func:`class_pos_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from ctplatform.config.loss import LOSSES

POS_WEIGHT_MIN = 1.0
POS_WEIGHT_MAX = 100.0


def _prepare(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have one shape")
    logits = logits.float()
    return logits, targets.to(dtype=logits.dtype, device=logits.device)


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017), mean over all elements: ``torchvision.ops.sigmoid_focal_loss``.

    ``FL = alpha_t * (1 - p_t) ** gamma * BCE(x, t)``, with ``p_t = p t + (1 - p)(1 - t)`` and
    ``alpha_t = alpha t + (1 - alpha)(1 - t)``; ``alpha < 0`` disables the alpha weighting. The defaults
    (``alpha=0.85``, ``gamma=4``) weigh the rare positives of a multi-label CT finding up and easy negatives down.
    """

    def __init__(self, alpha: float = 0.85, gamma: float = 4.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if alpha > 1:
            raise ValueError(f"focal alpha must be <= 1 (negative disables it), got {alpha}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = _prepare(logits, targets)
        return sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="mean")

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL) for multi-label classification, mean over all elements.

    With ``p = sigmoid(x)`` and the shifted probability ``p_m = max(p - clip, 0)`` (paper eq. 5):

    ``L = -[ t (1 - p) ** gamma_pos log(p) + (1 - t) p_m ** gamma_neg log(1 - p_m) ]``  (paper eq. 7)

    Logarithms take their argument clamped to ``>= eps``, as the authors' reference implementation does. The
    reference returns the *sum* over elements; this returns the *mean* over ``B x C`` elements so the loss scale
    does not depend on batch size or class count and is comparable with the focal/BCE losses (multiply by
    ``B * C`` to get the paper's value). The focusing weights keep their gradient (the paper's formula;
    the reference code's optional ``disable_torch_grad_focal_loss`` is not reproduced).
    """

    def __init__(self, gamma_neg: float = 6.0, gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8) -> None:
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"ASL gammas must be >= 0, got gamma_neg={gamma_neg}, gamma_pos={gamma_pos}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"ASL clip must be in [0, 1), got {clip}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.eps = float(eps)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = _prepare(logits, targets)
        p = torch.sigmoid(logits)
        p_m = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = targets * (1 - p) ** self.gamma_pos * torch.log(p.clamp(min=self.eps))
        loss_neg = (1 - targets) * p_m**self.gamma_neg * torch.log((1 - p_m).clamp(min=self.eps))
        return -(loss_pos + loss_neg).mean()

    def extra_repr(self) -> str:
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}"


class WeightedBCELoss(nn.Module):
    """``binary_cross_entropy_with_logits`` with per-class ``pos_weight`` (shape ``(C,)``), mean reduction.

    ``pos_weight`` is a buffer, so it follows the module across devices and into ``state_dict``.
    ``pos_weight=None`` is plain BCE.
    """

    pos_weight: Tensor | None

    def __init__(self, pos_weight: Tensor | np.ndarray | Sequence[float] | None = None) -> None:
        super().__init__()
        if pos_weight is not None:
            if not isinstance(pos_weight, Tensor):
                pos_weight = torch.as_tensor(np.asarray(pos_weight, dtype=np.float32))
            pos_weight = pos_weight.detach().to(torch.float32)
            if pos_weight.dim() != 1:
                raise ValueError(f"pos_weight must have shape (C,), got {tuple(pos_weight.shape)}")
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = _prepare(logits, targets)
        pos_weight = self.pos_weight
        if pos_weight is not None:
            if pos_weight.numel() != logits.shape[-1]:
                raise ValueError(f"pos_weight has {pos_weight.numel()} classes, logits have {logits.shape[-1]}")
            pos_weight = pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="mean")


def class_pos_weights(
    labels: np.ndarray, min_weight: float = POS_WEIGHT_MIN, max_weight: float = POS_WEIGHT_MAX
) -> Tensor:
    """Per-class positive weights ``neg / pos`` from an ``(N, C)`` label matrix, clamped to ``[1, 100]``.

    ``pos`` is the column sum (soft labels count fractionally), ``neg = N - pos``. The clamp:

    * lower bound 1: a class with prevalence above 50% keeps plain BCE rather than having its positives
      down-weighted (the challenge metrics reward recall on every class);
    * upper bound 100: a class with a handful of positives (or none) in a small split cannot dominate the
      gradient or blow up the loss scale; a class with no positives gets 100 (its positive term is never used).

    Returns a float32 tensor of shape ``(C,)``.
    """
    arr = np.asarray(labels, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"labels must have shape (N, C), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("labels is empty: cannot compute class weights from zero samples")
    if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
        raise ValueError("labels must be in [0, 1] with no NaN")
    pos = arr.sum(axis=0)
    neg = arr.shape[0] - pos
    ratio = np.divide(neg, pos, out=np.full_like(pos, max_weight), where=pos > 0)
    return torch.as_tensor(np.clip(ratio, min_weight, max_weight), dtype=torch.float32)


def build_loss(
    loss_type: str,
    *,
    focal_alpha: float = 0.85,
    focal_gamma: float = 4.0,
    asl_gamma_neg: float = 6.0,
    asl_gamma_pos: float = 1.0,
    asl_clip: float = 0.05,
    pos_weight: Tensor | np.ndarray | Sequence[float] | None = None,
) -> nn.Module:
    """Build the training loss by `--loss-type` name (focal alpha 0.85, gamma 4; ASL gamma- 6, gamma+ 1, clip 0.05).

    ``pos_weight`` (see :func:`class_pos_weights`) applies to ``"bce"`` only (BCE with class weights); focal and
    ASL do their own re-weighting and ignore it.
    """
    if loss_type == "focal":
        return FocalLoss(alpha=focal_alpha, gamma=focal_gamma)
    if loss_type == "asl":
        return AsymmetricLoss(gamma_neg=asl_gamma_neg, gamma_pos=asl_gamma_pos, clip=asl_clip)
    if loss_type == "bce":
        return WeightedBCELoss(pos_weight)
    raise ValueError(f"unknown loss type {loss_type!r}: choose one of {', '.join(LOSSES)}")
