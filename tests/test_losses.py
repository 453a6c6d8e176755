"""Losses against independent references: float64 focal and ASL formulas from the papers, torchvision's focal loss,
torch's BCE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from ctplatform.model.losses import (
    AsymmetricLoss,
    FocalLoss,
    WeightedBCELoss,
    build_loss,
    class_pos_weights,
)


def random_batch(seed: int, soft: bool = False, shape=(16, 18)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    targets = torch.rand(shape, generator=g) if soft else (torch.rand(shape, generator=g) < 0.3).float()
    return logits, targets


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(("alpha", "gamma"), [(0.85, 4.0), (0.25, 2.0), (0.5, 0.0), (-1.0, 1.5)])
def test_focal_matches_torchvision(alpha: float, gamma: float, soft: bool) -> None:
    logits, targets = random_batch(seed=int(gamma * 10) + soft, soft=soft)
    ours = FocalLoss(alpha=alpha, gamma=gamma)(logits, targets)
    reference = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6, rel=1e-6)


def focal_reference(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> float:
    """Lin et al. 2017 eq. 5 for (soft) targets in float64 NumPy, elementwise, then the mean over elements."""
    x = logits.double().numpy()
    t = targets.double().numpy()
    p = 1.0 / (1.0 + np.exp(-x))
    ce = -(t * np.log(p) + (1.0 - t) * np.log1p(-p))
    p_t = p * t + (1.0 - p) * (1.0 - t)
    alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t) if alpha >= 0 else 1.0
    return float(np.mean(alpha_t * (1.0 - p_t) ** gamma * ce))


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(("alpha", "gamma"), [(0.85, 4.0), (0.25, 2.0), (0.5, 0.0), (-1.0, 1.5)])
def test_focal_matches_float64_paper_formula(alpha: float, gamma: float, soft: bool) -> None:
    logits, targets = random_batch(seed=int(gamma * 10) + soft, soft=soft)
    ours = FocalLoss(alpha=alpha, gamma=gamma)(logits, targets)
    assert ours.item() == pytest.approx(focal_reference(logits, targets, alpha, gamma), rel=1e-5, abs=1e-7)


def test_focal_defaults_are_alpha_085_gamma_4() -> None:
    assert (FocalLoss().alpha, FocalLoss().gamma) == (0.85, 4.0)
    built = build_loss("focal")
    assert isinstance(built, FocalLoss) and (built.alpha, built.gamma) == (0.85, 4.0)


def asl_reference(logits: torch.Tensor, targets: torch.Tensor, gamma_neg, gamma_pos, clip, eps=1e-8) -> float:
    """Ridnik et al. 2021 eq. 5-7 in float64 NumPy, elementwise, then the mean over elements."""
    x = logits.double().numpy()
    y = targets.double().numpy()
    p = 1.0 / (1.0 + np.exp(-x))
    p_m = np.maximum(p - clip, 0.0)  # probability shifting of negatives
    l_plus = (1.0 - p) ** gamma_pos * np.log(np.maximum(p, eps))
    l_minus = p_m**gamma_neg * np.log(np.maximum(1.0 - p_m, eps))
    return float(np.mean(-y * l_plus - (1.0 - y) * l_minus))


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(("gamma_neg", "gamma_pos", "clip"), [(6, 1, 0.05), (4, 0, 0.0), (2, 1, 0.2), (0, 0, 0)])
def test_asl_matches_float64_paper_formula(gamma_neg, gamma_pos, clip, soft: bool) -> None:
    logits, targets = random_batch(seed=gamma_neg + soft, soft=soft)
    ours = AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)(logits, targets)
    assert ours.item() == pytest.approx(asl_reference(logits, targets, gamma_neg, gamma_pos, clip), rel=1e-5)


def test_asl_without_focusing_or_clip_is_bce() -> None:
    logits, targets = random_batch(seed=3)
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(logits, targets)
    torch.testing.assert_close(asl, F.binary_cross_entropy_with_logits(logits, targets), atol=1e-5, rtol=1e-5)


def test_asl_ignores_easy_negatives_below_the_clip() -> None:
    loss = AsymmetricLoss(clip=0.05)
    logits = torch.full((1, 3), -4.0)  # p = 0.018 < clip
    assert loss(logits, torch.zeros(1, 3)).item() == 0.0


@pytest.mark.parametrize("soft", [False, True])
def test_weighted_bce_matches_torch(soft: bool) -> None:
    logits, targets = random_batch(seed=7, soft=soft)
    pos_weight = torch.linspace(1.0, 20.0, 18)
    ours = WeightedBCELoss(pos_weight)(logits, targets)
    reference = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
    torch.testing.assert_close(ours, reference)
    plain = WeightedBCELoss()(logits, targets)
    torch.testing.assert_close(plain, F.binary_cross_entropy_with_logits(logits, targets))


def test_losses_accept_half_precision_logits_and_stay_differentiable() -> None:
    logits, targets = random_batch(seed=9)
    for loss_type in ("focal", "bce", "asl"):
        x = logits.clone().to(torch.bfloat16).requires_grad_(True)
        value = build_loss(loss_type)(x, targets)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        value.backward()
        assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_class_pos_weights_hand_case() -> None:
    labels = np.array(
        [
            [1, 0, 1, 0],
            [0, 0, 1, 0],
            [0, 0, 1, 0],
            [0, 0, 0, 1],
        ]
    )
    # class 0: 3 neg / 1 pos = 3; class 1: no positives -> 100; class 2: 1/3 -> clamped to 1; class 3: 3
    weights = class_pos_weights(labels)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.tensor([3.0, 100.0, 1.0, 3.0]))
    many = np.zeros((1000, 1))
    many[0, 0] = 1  # 999 / 1 -> clamped to 100
    assert class_pos_weights(many).item() == 100.0
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        class_pos_weights(np.zeros(5))


def test_build_loss_by_name() -> None:
    assert isinstance(build_loss("focal", focal_alpha=0.25, focal_gamma=2), FocalLoss)
    asl = build_loss("asl", asl_gamma_neg=4, asl_gamma_pos=0, asl_clip=0.1)
    assert isinstance(asl, AsymmetricLoss) and (asl.gamma_neg, asl.gamma_pos, asl.clip) == (4, 0, 0.1)
    bce = build_loss("bce", pos_weight=np.array([2.0, 3.0]))
    assert isinstance(bce, WeightedBCELoss)
    torch.testing.assert_close(bce.pos_weight, torch.tensor([2.0, 3.0]))
    assert "pos_weight" in bce.state_dict()
    with pytest.raises(ValueError, match="focal, bce, asl"):
        build_loss("hinge")
