"""Batch augmentation: exact CutMix/MixUp label mixing, determinism, flips, identity settings."""

from __future__ import annotations

import pytest
import torch

from ctplatform.model.augment import AdvancedAugment, BasicAugment, cutmix, mixup

B, C, H, W = 6, 3, 32, 40


def constant_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i (all channels); label i is one-hot e_i, so mixes can be read back."""
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, C, H, W).contiguous()
    y = torch.eye(B)
    return x, y


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_label_equals_pasted_area_fraction(seed: int) -> None:
    x, y = constant_batch()
    xm, ym = cutmix(x, y, alpha=1.0, generator=torch.Generator().manual_seed(seed))
    assert xm.shape == x.shape and ym.shape == y.shape
    torch.testing.assert_close(ym.sum(dim=1), torch.ones(B))
    boxes = set()
    for i in range(B):
        img = xm[i]
        kept = (img == i).float().mean().item()  # fraction of pixels still from image i
        # the label keeps exactly the kept-area fraction (also when nothing, or image i itself, was pasted)
        assert ym[i, i].item() == pytest.approx(kept, abs=1e-6)
        donors = img[img != i].unique()
        assert donors.numel() <= 1  # one donor image
        if donors.numel() == 1:
            assert ym[i, int(donors.item())].item() == pytest.approx(1.0 - kept, abs=1e-6)
            pasted = img[0] != i
            assert torch.equal(pasted.unsqueeze(0).expand(C, H, W), img != i)  # same box in every channel
            rows, cols = pasted.any(dim=1).nonzero(), pasted.any(dim=0).nonzero()
            box = (rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1)
            assert pasted.sum().item() == (box[1] - box[0]) * (box[3] - box[2])  # a full rectangle
            boxes.add(box)
    assert len(boxes) <= 1  # one box for the whole batch


def test_cutmix_pastes_a_nontrivial_box_for_some_seed() -> None:
    x, y = constant_batch()
    fractions = []
    for seed in range(20):
        xm, _ = cutmix(x, y, generator=torch.Generator().manual_seed(seed))
        fractions.append((xm != x).float().mean().item())
    assert max(fractions) > 0.05 and min(fractions) < 0.95


@pytest.mark.parametrize("seed", range(4))
def test_mixup_mixes_images_and_labels_with_one_lambda(seed: int) -> None:
    x, y = constant_batch()
    xm, ym = mixup(x, y, alpha=0.4, generator=torch.Generator().manual_seed(seed))
    lambdas = []
    for i in range(B):
        partners = [j for j in range(B) if j != i and ym[i, j] > 0]
        if not partners:  # paired with itself (or lam = 1)
            torch.testing.assert_close(xm[i], x[i])
            continue
        (j,) = partners
        lam = ym[i, i].item()
        lambdas.append(lam)
        assert ym[i, j].item() == pytest.approx(1 - lam, abs=1e-6)
        torch.testing.assert_close(xm[i], lam * x[i] + (1 - lam) * x[j])
    assert lambdas and max(lambdas) - min(lambdas) < 1e-6


def test_mix_functions_are_deterministic_and_validate() -> None:
    x, y = torch.randn(4, 3, 8, 8), (torch.rand(4, 18) < 0.3).float()
    for fn in (cutmix, mixup):
        a = fn(x, y, generator=torch.Generator().manual_seed(5))
        b = fn(x, y, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        with pytest.raises(ValueError, match="alpha"):
            fn(x, y, alpha=0.0)
        with pytest.raises(ValueError, match="batch size"):
            fn(x, y[:3])


def test_advanced_augment_picks_cutmix_or_mixup() -> None:
    x, y = constant_batch()
    only_cutmix = AdvancedAugment(cutmix_prob=1.0)
    only_mixup = AdvancedAugment(cutmix_prob=0.0)
    for seed in range(5):
        xc, _ = only_cutmix(x, y, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(xc, xc.round())  # cut-and-paste keeps the integer constants
        xm, ym = only_mixup(x, y, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(xm.mean(dim=(1, 2, 3)), ym @ torch.arange(B, dtype=torch.float32), atol=1e-5)
    with pytest.raises(ValueError, match="cutmix_prob"):
        AdvancedAugment(cutmix_prob=1.5)


def test_basic_augment_is_deterministic_with_a_seeded_generator() -> None:
    x = torch.randn(4, 3, 32, 32)
    aug = BasicAugment()
    a = aug(x, generator=torch.Generator().manual_seed(0))
    b = aug(x, generator=torch.Generator().manual_seed(0))
    c = aug(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)


def test_basic_augment_hflip_flips_and_identity_settings_are_lossless() -> None:
    x = torch.randn(3, 3, 16, 24)
    identity = dict(rotation_deg=0, translate=0, scale=(1.0, 1.0), intensity_jitter=0)
    flipped = BasicAugment(hflip_p=1.0, **identity)(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flipped, x.flip(-1))
    kept = BasicAugment(hflip_p=0.0, **identity)(x)
    assert torch.equal(kept, x)


def test_basic_augment_flips_per_sample() -> None:
    x = torch.randn(64, 1, 4, 4)
    identity = dict(rotation_deg=0, translate=0, scale=(1.0, 1.0), intensity_jitter=0)
    out = BasicAugment(hflip_p=0.5, **identity)(x, generator=torch.Generator().manual_seed(3))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_basic_augment_affine_is_a_rotation_about_the_centre() -> None:
    """A pure scale of 1 with 0 translation and a tiny rotation moves pixels only slightly; the centre stays."""
    _, xx = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    ramp = (xx / 32.0).view(1, 1, 33, 33)
    aug = BasicAugment(rotation_deg=10, hflip_p=0, translate=0, scale=(1.0, 1.0), intensity_jitter=0)
    out = aug(ramp, generator=torch.Generator().manual_seed(0))
    assert out[0, 0, 16, 16].item() == pytest.approx(0.5, abs=1e-5)  # the centre is fixed
    assert (out - ramp).abs().max().item() < 0.25  # at most 10 degrees of turn


def test_basic_augment_jitter_changes_contrast_per_sample_only() -> None:
    x = torch.randn(4, 3, 16, 16)
    aug = BasicAugment(rotation_deg=0, hflip_p=0, translate=0, scale=(1.0, 1.0), intensity_jitter=0.1)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    for i in range(4):  # an affine intensity map per sample: correlation with the input stays 1
        corr = torch.corrcoef(torch.stack([x[i].flatten(), out[i].flatten()]))[0, 1]
        assert corr.item() == pytest.approx(1.0, abs=1e-5)
    ratio = out.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert ((ratio > 0.89) & (ratio < 1.11)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augmentation_on_gpu_matches_cpu_with_a_cpu_generator() -> None:
    x, y = torch.randn(8, 3, 64, 64), (torch.rand(8, 18) < 0.3).float()
    aug = BasicAugment()
    cpu = aug(x, generator=torch.Generator().manual_seed(0))
    gpu = aug(x.cuda(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    half = aug(x.cuda().half(), generator=torch.Generator().manual_seed(0))
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    cuda_gen = aug(x.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    assert cuda_gen.shape == x.shape
    for fn in (cutmix, mixup):
        xc, yc = fn(x, y, generator=torch.Generator().manual_seed(1))
        xg, yg = fn(x.cuda(), y.cuda(), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(xg.cpu(), xc)
        torch.testing.assert_close(yg.cpu(), yc)
    xa, ya = AdvancedAugment()(x.cuda(), y.cuda(), generator=torch.Generator(device="cuda").manual_seed(2))
    assert xa.is_cuda and ya.is_cuda
