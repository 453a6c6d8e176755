"""torchvision CNN backbones that return multi-scale feature maps.

:func:`build_backbone` wraps torchvision's ResNet-50/101 (He et al. 2016, arXiv:1512.03385) and EfficientNet-B0
(Tan & Le 2019, arXiv:1905.11946) without their classification heads. ``forward`` returns the feature maps of the
last three stages, at strides 8, 16 and 32:

* resnet50 / resnet101: ``layer2``, ``layer3``, ``layer4`` (512, 1024, 2048 channels);
* efficientnet_b0: ``features[3]``, ``features[5]``, ``features[8]`` (40, 112, 1280 channels; ``features[8]`` is
  the final 1x1 conv whose output torchvision's own classifier pools).

Submodules keep torchvision's attribute names, so a backbone's ``state_dict`` keys are exactly the torchvision
model's keys minus the head (``fc.*`` / ``classifier.*``). That is what makes ``weights=PATH`` accept either.

Weights: ``"none"`` (random init), ``"imagenet"`` (torchvision's ``DEFAULT`` weights, read from the torch hub cache
or downloaded into it; :class:`WeightsUnavailableError` when neither works), or a path to a state dict.

Any other name timm knows (``vit_small_patch14_dinov2``, ``convnext_tiny``, ...) is built by
:mod:`ctplatform.model.timm_backbones` through the same :func:`build_backbone`; its weights come from local files
only (:mod:`ctplatform.model.timm_weights`).
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable (offline machine, failed download)."""


@dataclass(frozen=True)
class _Spec:
    constructor: Callable[..., nn.Module]
    weights_enum: Any  # torchvision WeightsEnum class
    head_prefixes: tuple[str, ...]


_SPECS: dict[str, _Spec] = {
    "resnet50": _Spec(torchvision.models.resnet50, torchvision.models.ResNet50_Weights, ("fc.",)),
    "resnet101": _Spec(torchvision.models.resnet101, torchvision.models.ResNet101_Weights, ("fc.",)),
    "efficientnet_b0": _Spec(
        torchvision.models.efficientnet_b0, torchvision.models.EfficientNet_B0_Weights, ("classifier.",)
    ),
}
BACKBONES: tuple[str, ...] = tuple(_SPECS)


class Backbone(nn.Module):
    """A headless CNN whose ``forward(x)`` returns ``[stride-8, stride-16, stride-32]`` feature maps.

    Attributes:
        name: the torchvision architecture name.
        stage_channels: channels of each returned feature map, in order.
        out_strides: stride of each returned feature map, in order.
        head_prefixes: ``state_dict`` key prefixes of the torchvision head that this backbone drops.
    """

    name: str
    stage_channels: list[int]
    out_strides: list[int]
    head_prefixes: tuple[str, ...]
    is_vit: bool = False  # a vision transformer: one pooled embedding, no spatial stages (no SE/CBAM/multi-scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's blocks in the backward pass (timm backbones; see ``--grad-checkpoint``)."""
        raise ValueError(f"--grad-checkpoint (per block) is for timm backbones, not torchvision's {self.name}: use "
                         "--mil-grad-checkpoint (the whole slice encoder) with the attention-mil head")

    def stem_and_stages(self) -> list[nn.Module]:
        """The backbone's blocks from input to output (stem first): the unit of (progressive) freezing.

        Every backbone parameter belongs to exactly one of these modules.
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class ResNetBackbone(Backbone):
    """torchvision ResNet without ``avgpool``/``fc``; returns ``layer2``, ``layer3``, ``layer4`` outputs."""

    def __init__(self, model: torchvision.models.ResNet, name: str, head_prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.name = name
        self.head_prefixes = head_prefixes
        self.conv1, self.bn1, self.relu, self.maxpool = model.conv1, model.bn1, model.relu, model.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = model.layer1, model.layer2, model.layer3, model.layer4
        self.stage_channels = [_out_channels(m) for m in (self.layer2, self.layer3, self.layer4)]
        self.out_strides = [8, 16, 32]

    def stem_and_stages(self) -> list[nn.Module]:
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c2, c3, c4]


class EfficientNetBackbone(Backbone):
    """torchvision EfficientNet ``features`` (no ``avgpool``/``classifier``); returns blocks 3, 5 and 8."""

    OUT_INDICES = (3, 5, 8)  # strides 8, 16, 32 for efficientnet_b0

    def __init__(self, model: torchvision.models.EfficientNet, name: str, head_prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.name = name
        self.head_prefixes = head_prefixes
        self.features = model.features
        self.stage_channels = [_out_channels(self.features[i]) for i in self.OUT_INDICES]
        self.out_strides = [8, 16, 32]

    def stem_and_stages(self) -> list[nn.Module]:
        return list(self.features)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.OUT_INDICES:
                outs.append(x)
        return outs


def _out_channels(module: nn.Module) -> int:
    """Output channels of a block: those of its last conv layer."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def build_backbone(name: str, weights: str | os.PathLike[str] = "none") -> Backbone:
    """Build a headless multi-scale backbone by name.

    Args:
        name: one of :data:`BACKBONES`.
        weights: ``"none"``, ``"imagenet"`` or a path to a state dict (torchvision model keys or backbone keys;
            see :func:`load_backbone_weights`).

    Raises:
        ValueError: unknown ``name``.
        WeightsUnavailableError: ``"imagenet"`` weights are not cached and cannot be downloaded.
        FileNotFoundError / ValueError: a weights path that is missing, unreadable or does not match.
    """
    return build_backbone_reporting(name, weights)[0]


def build_backbone_reporting(name: str, weights: str | os.PathLike[str] = "none") -> tuple[Backbone, str | None]:
    """:func:`build_backbone`, plus the one-line report of how a timm checkpoint fitted (None otherwise)."""
    if name not in _SPECS:
        from ctplatform.model.timm_backbones import build_timm_backbone, is_timm_model

        if not is_timm_model(name):
            raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)} or any architecture "
                             "timm knows (e.g. vit_small_patch14_dinov2, convnext_tiny; `timm.list_models()`)")
        backbone = build_timm_backbone(name)
        if str(weights) == "none":
            return backbone, None
        from ctplatform.model.timm_weights import load_timm_weights, pretrained_file

        where = pretrained_file(name) if str(weights) == "imagenet" else weights
        return backbone, load_timm_weights(backbone.model, where).line()
    spec = _SPECS[name]
    model = spec.constructor(weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(name, spec))
    wrapper = ResNetBackbone if isinstance(model, torchvision.models.ResNet) else EfficientNetBackbone
    backbone = wrapper(model, name, spec.head_prefixes)
    if weights not in ("none", "imagenet"):
        load_backbone_weights(backbone, weights)
    return backbone, None


def check_weights(name: str, weights: str | os.PathLike[str]) -> str | None:
    """Raise here, in the calling process, what :func:`build_backbone` would raise inside every training worker
    (weights not cached and offline, a missing or unreadable file, keys of another model), before any starts.
    A timm checkpoint's one-line load report (missing/unexpected keys) is printed and returned."""
    if str(weights) == "none":
        return None
    report = build_backbone_reporting(name, weights)[1]
    if report is not None:
        print(report, file=sys.stderr, flush=True)
    return report


def imagenet_cache_path(name: str) -> Path:
    """Where torch hub keeps (or would download) the ImageNet weights of backbone ``name``."""
    url = _SPECS[name].weights_enum.DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _imagenet_state_dict(name: str, spec: _Spec) -> dict[str, Tensor]:
    url = spec.weights_enum.DEFAULT.url
    cached = imagenet_cache_path(name)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError/HTTPError are OSErrors; a bad hash is a RuntimeError
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} are not available: {cached} is not in the torch hub cache and "
            f"downloading {url} failed ({type(exc).__name__}: {exc}). This machine is offline or the download "
            f"failed. Copy that file to {cached}, or use `--weights none` (random init) or `--weights PATH` "
            f"(a local state dict)."
        ) from exc


def load_backbone_weights(backbone: Backbone, path: str | os.PathLike[str]) -> None:
    """Load a state dict file into ``backbone`` (strict), with errors that name the file.

    Accepted keys: the torchvision model's (its head, ``fc.*``/``classifier.*``, is dropped), the backbone's own,
    or a :class:`~ctplatform.model.classifier.SliceClassifier`'s (only ``backbone.*`` keys are used). A
    ``module.`` prefix (DDP) is stripped and a top-level ``{"state_dict": ...}`` wrapper is unwrapped. The file is
    read with ``torch.load(..., weights_only=True)``: no code in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (expected `--weights none|imagenet|PATH`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"could not read weights file {path} as a torch state dict: {exc}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")

    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(backbone.head_prefixes)}

    expected = set(backbone.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not match backbone {backbone.name}: {len(missing)} missing keys "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} (was it saved from another architecture?)"
        )
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"weights file {path} does not match backbone {backbone.name}: {exc}") from exc
