"""Model components: HU windows, backbones and weights, SE/CBAM, multi-scale fusion, the slice classifier."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from ctplatform.model.attention import ATTENTIONS, build_attention
from ctplatform.model.backbones import (
    BACKBONES,
    WeightsUnavailableError,
    build_backbone,
    imagenet_cache_path,
)
from ctplatform.model.cbam import CBAM
from ctplatform.model.classifier import SliceClassifier, build_classifier
from ctplatform.model.multiscale import MultiScaleFusion
from ctplatform.model.se import SqueezeExcite
from ctplatform.model.windows import IMAGENET_MEAN, IMAGENET_STD, WINDOWS, hu_to_input, window_table

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# --- windows ---------------------------------------------------------------------------------------------------
def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_three_windows_on_known_hu_values() -> None:
    # lung [-1350, 150], mediastinum [-160, 240], bone [-500, 1300]
    hu = torch.tensor([[[-2000, -1000, -600, 40, 400, 3000]]], dtype=torch.int16)  # (1, 1, 6)
    x = hu_to_input(hu, "three")
    assert x.shape == (1, 3, 1, 6) and x.dtype == torch.float32
    expected = torch.tensor(
        [
            [0.0, 350 / 1500, 750 / 1500, 1390 / 1500, 1.0, 1.0],  # lung
            [0.0, 0.0, 0.0, 0.5, 1.0, 1.0],  # mediastinum
            [0.0, 0.0, 0.0, 540 / 1800, 900 / 1800, 1.0],  # bone
        ]
    ).view(1, 3, 1, 6)
    torch.testing.assert_close(unnormalise(x), expected, atol=1e-6, rtol=0)
    # the normalisation itself: window value 0.5 -> (0.5 - mean) / std
    mid = hu_to_input(torch.tensor([[[-600.0]], [[40.0]], [[400.0]]]), "three")  # (3, 1, 1) -> (3, 3, 1, 1)
    for i in range(3):
        assert mid[i, i, 0, 0].item() == pytest.approx((0.5 - IMAGENET_MEAN[i]) / IMAGENET_STD[i], abs=1e-6)


def test_single_window_is_replicated_and_accepts_float_and_b1hw() -> None:
    hu = torch.tensor([-1500.0, -1000.0, 0.0, 500.0, 1000.0, 2000.0], dtype=torch.float64).view(1, 1, 2, 3)
    x = hu_to_input(hu, "single")
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    expected = torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    torch.testing.assert_close(unnormalise(x), expected, atol=1e-6, rtol=0)


def test_windows_reject_bad_input_and_table_is_json() -> None:
    with pytest.raises(ValueError, match="choose one of three, single"):
        hu_to_input(torch.zeros(1, 4, 4), "soft")
    with pytest.raises(ValueError, match="shape"):
        hu_to_input(torch.zeros(1, 2, 4, 4), "three")
    table = json.loads(json.dumps(window_table("three")))
    assert [w["name"] for w in table["windows"]] == ["lung", "mediastinum", "bone"]
    assert table["windows"][0]["low"] == -1350 and table["windows"][0]["high"] == 150
    assert WINDOWS["single"][0].low == -1000 and WINDOWS["single"][0].high == 1000


# --- attention layers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ATTENTIONS)
def test_attention_preserves_shape(name: str) -> None:
    layer = build_attention(name, 32)
    x = torch.randn(2, 32, 5, 7)
    assert layer(x).shape == x.shape


def test_se_gate_in_open_unit_interval_and_scales_channels() -> None:
    torch.manual_seed(0)
    se = SqueezeExcite(32)
    x = torch.randn(2, 32, 6, 6)
    gate = se.gate(x)
    assert gate.shape == (2, 32, 1, 1)
    assert (gate > 0).all() and (gate < 1).all()
    torch.testing.assert_close(se(x), x * gate)


def test_cbam_is_channel_then_spatial() -> None:
    torch.manual_seed(0)
    cbam = CBAM(16)
    x = torch.randn(2, 16, 8, 8)
    x1 = x * cbam.channel.gate(x)
    spatial = cbam.spatial.gate(x1)
    assert spatial.shape == (2, 1, 8, 8)
    torch.testing.assert_close(cbam(x), x1 * spatial)


def test_multiscale_fusion_concatenates_pooled_projections() -> None:
    fusion = MultiScaleFusion([8, 16, 32], out_channels=4)
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 2, 2)]
    assert fusion(feats).shape == (2, 12) == (2, fusion.out_features)
    with pytest.raises(ValueError, match="3 feature maps"):
        fusion(feats[:2])


# --- backbones and weights -------------------------------------------------------------------------------------
def test_efficientnet_stages_have_strides_8_16_32() -> None:
    backbone = build_backbone("efficientnet_b0").eval()
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == backbone.stage_channels == [40, 112, 1280]
    assert [64 // f.shape[-1] for f in feats] == backbone.out_strides == [8, 16, 32]
    owned = {id(p) for m in backbone.stem_and_stages() for p in m.parameters()}
    assert owned == {id(p) for p in backbone.parameters()}


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet50, resnet101, efficientnet_b0 or any architecture timm knows"):
        build_backbone("vit_b_16")  # torchvision's name for a ViT, unknown to timm
    with pytest.raises(ValueError, match="none, se, cbam"):
        build_attention("eca", 8)
    with pytest.raises(ValueError, match="none, se, cbam"):
        build_classifier("efficientnet_b0", use_attention="eca")
    with pytest.raises(ValueError, match="resnet50, resnet101, efficientnet_b0"):
        build_classifier("densenet_not_a_model")


def test_imagenet_weights_unavailable_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst, *args, **kwargs):  # the network, not the unit under test
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("resnet50", weights="imagenet")
    message = str(info.value)
    assert str(imagenet_cache_path("resnet50")) in message and str(tmp_path) in message
    assert "offline" in message and "--weights none" in message and "--weights PATH" in message


def test_imagenet_weights_read_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    """A file already in the torch hub cache is used without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    reference = torchvision.models.efficientnet_b0(weights=None)
    cached = imagenet_cache_path("efficientnet_b0")
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    backbone = build_backbone("efficientnet_b0", weights="imagenet")
    torch.testing.assert_close(backbone.features[0][0].weight, reference.features[0][0].weight)


@pytest.mark.parametrize("key_style", ["torchvision", "backbone", "classifier"])
def test_weights_path_round_trip(tmp_path, key_style: str) -> None:
    torch.manual_seed(1)
    if key_style == "torchvision":
        source = torchvision.models.efficientnet_b0(weights=None)  # full model, with its classifier keys
        expected = source.features
    elif key_style == "backbone":
        source = build_backbone("efficientnet_b0")
        expected = source.features
    else:
        source = build_classifier("efficientnet_b0", use_attention="se")
        expected = source.backbone.features
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("efficientnet_b0", weights=str(path))
    for (name, a), b in zip(expected.state_dict().items(), loaded.features.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_weights_path_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        build_backbone("efficientnet_b0", weights=str(missing))
    wrong = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(ValueError, match=r"resnet\.pt.*does not match backbone efficientnet_b0"):
        build_backbone("efficientnet_b0", weights=str(wrong))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt"):
        build_backbone("efficientnet_b0", weights=str(garbage))


# --- classifier ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_multiscale", [False, True])
@pytest.mark.parametrize("use_attention", ATTENTIONS)
@pytest.mark.parametrize("model", BACKBONES)
def test_classifier_output_shapes(model: str, use_attention: str, use_multiscale: bool) -> None:
    torch.manual_seed(0)
    clf = build_classifier(model, use_attention=use_attention, use_multiscale=use_multiscale, num_classes=18)
    clf.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = clf(x)
        emb = clf.embed(x)
    assert logits.shape == (2, 18) and torch.isfinite(logits).all()
    assert emb.shape == (2, clf.embed_dim)
    # eval mode: dropout is off, so forward is exactly head(embed)
    torch.testing.assert_close(logits, clf.head(emb))


def test_classifier_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    clf = build_classifier("efficientnet_b0", use_attention="cbam", use_multiscale=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = clf(x)
        clf = clf.to(memory_format=torch.channels_last)
        out = clf(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_classifier_trains_one_step() -> None:
    torch.manual_seed(0)
    clf = build_classifier("efficientnet_b0", use_attention="se", num_classes=4).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    loss = nn.functional.binary_cross_entropy_with_logits(clf(x), y)
    loss.backward()
    assert all(p.grad is not None for p in clf.parameters())


def test_set_backbone_trainable_only_touches_the_backbone() -> None:
    clf = build_classifier("efficientnet_b0", use_attention="cbam", use_multiscale=True)
    backbone_ids = {id(p) for p in clf.backbone_parameters()}
    assert backbone_ids == {id(p) for p in clf.backbone.parameters()}
    rest = [p for p in clf.parameters() if id(p) not in backbone_ids]
    assert rest and {id(p) for p in rest} == {id(p) for p in clf.head_parameters()}

    clf.set_backbone_trainable(False)
    assert clf.backbone_frozen
    assert not any(p.requires_grad for p in clf.backbone_parameters())
    assert all(p.requires_grad for p in rest)

    # frozen BatchNorm layers stay in eval mode through train() and keep their running statistics
    clf.train()
    bns = [m for m in clf.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert any(m.training for m in clf.fusion.modules() if isinstance(m, nn.BatchNorm2d))
    before = bns[0].running_mean.clone()
    clf(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(bns[0].running_mean, before)

    clf.set_backbone_trainable(True)
    assert all(p.requires_grad for p in clf.parameters())
    assert all(m.training for m in bns)
    clf.eval()
    assert not any(m.training for m in clf.modules())


def test_architecture_rebuilds_the_same_model() -> None:
    clf = build_classifier("efficientnet_b0", use_attention="se", use_multiscale=True, num_classes=5, dropout=0.3)
    arch = clf.architecture()
    assert json.loads(json.dumps(arch)) == arch
    rebuilt = build_classifier(**arch)
    rebuilt.load_state_dict(clf.state_dict())
    assert isinstance(rebuilt, SliceClassifier) and rebuilt.num_classes == 5 and rebuilt.dropout.p == 0.3


# --- GPU (run with -m gpu) -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", BACKBONES)
def test_classifier_bf16_channels_last_step_on_gpu(model: str) -> None:
    from ctplatform.model.losses import build_loss

    torch.manual_seed(0)
    hu = torch.randint(-1024, 2000, (8, 128, 128), dtype=torch.int16)
    x_cpu = hu_to_input(hu, "three")
    x = hu_to_input(hu.cuda(), "three")
    torch.testing.assert_close(x.cpu(), x_cpu)
    x = x.contiguous(memory_format=torch.channels_last)
    clf = build_classifier(model, use_attention="cbam", use_multiscale=True).cuda()
    clf = clf.to(memory_format=torch.channels_last).train()
    clf.set_backbone_trainable(False)
    clf.set_backbone_trainable(True)
    y = (torch.rand(8, 18, device="cuda") < 0.3).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = clf(x)
        loss = build_loss("asl")(logits, y)
    assert logits.shape == (8, 18) and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in clf.parameters() if p.grad is not None)
