"""Any timm architecture as a :class:`~ctplatform.model.backbones.Backbone` (MODELS stay torchvision's).

timm (Wightman, https://github.com/huggingface/pytorch-image-models) knows more than a thousand image models,
among them the foundation models that CT-RATE's best results start from (DINOv2, Oquab et al. 2023,
arXiv:2304.07193: ``vit_small_patch14_dinov2``, ``vit_base_patch14_dinov2``). Two kinds are wrapped:

* **Vision transformers** (a ``patch_embed`` and ``blocks``): ``forward`` returns one ``(B, D, 1, 1)`` map, the
  model's own pooled embedding (``forward_head(pre_logits=True)``: the class token for DINOv2). They are built with
  ``dynamic_img_size=True``, so the position embedding keeps its pretrained grid and is resized to the input's
  patch grid on the fly: any ``--image-size`` (a multiple of the patch size) works with any checkpoint. SE, CBAM and
  multi-scale fusion act on spatial stages, which a ViT's pooled token does not have: they are refused.
* **CNNs** with ``forward_intermediates`` (ConvNeXt, EfficientNetV2, timm's ResNets, ...): ``forward`` returns the
  last three stages' feature maps, as for the torchvision backbones, so SE/CBAM and multi-scale fusion apply.

The timm model is kept whole (without its classifier) as ``self.model``: state dict keys are timm's own with a
``model.`` prefix, so checkpoints written by timm load by name (:mod:`ctplatform.model.timm_weights`).
"""

from __future__ import annotations

import timm
from torch import Tensor, nn

from ctplatform.model.backbones import Backbone


def is_timm_model(name: str) -> bool:
    """True when timm knows ``name`` (an architecture, optionally with a pretrained tag: ``name.tag``)."""
    return bool(timm.is_model(name))


def _create(name: str) -> nn.Module:
    try:  # ViT-family models take dynamic_img_size; a CNN's constructor rejects the keyword
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=0)


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


class TimmViTBackbone(Backbone):
    """A timm vision transformer; ``forward`` returns its pooled embedding as a single ``(B, D, 1, 1)`` map."""

    is_vit = True

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.stage_channels = [int(model.num_features)]
        patch = getattr(model.patch_embed, "patch_size", (16, 16))
        self.out_strides = [int(patch[0]) if isinstance(patch, tuple | list) else int(patch)]
        self.head_prefixes = ()

    def forward(self, x: Tensor) -> list[Tensor]:
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return [pooled[:, :, None, None]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in the backward pass instead of storing its activations."""
        self.model.set_grad_checkpointing(enable)


class TimmCNNBackbone(Backbone):
    """A timm CNN; ``forward`` returns its last three stages' feature maps (``forward_intermediates``)."""

    is_vit = False

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"timm model {name} does not expose its stages (no forward_intermediates): pick another "
                             "architecture")
        info = model.feature_info[-3:]
        if len(info) < 3:
            raise ValueError(f"timm model {name} has fewer than three feature stages")
        self.name = name
        self.model = model
        self.stage_channels = [int(i["num_chs"]) for i in info]
        self.out_strides = [int(i["reduction"]) for i in info]
        self.head_prefixes = ()
        self._num_stages = len(model.feature_info)

    def forward(self, x: Tensor) -> list[Tensor]:
        n = self._num_stages
        return list(self.model.forward_intermediates(x, indices=[n - 3, n - 2, n - 1], intermediates_only=True))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def build_timm_backbone(name: str) -> Backbone:
    """The timm architecture ``name`` with random weights, wrapped as a Backbone (weights are loaded afterwards)."""
    if not is_timm_model(name):
        raise ValueError(f"unknown backbone {name!r}")
    model = _create(name)
    return TimmViTBackbone(model, name) if _is_vit(model) else TimmCNNBackbone(model, name)
