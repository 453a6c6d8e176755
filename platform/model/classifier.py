"""The slice classifier: backbone -> attention -> (multi-scale fusion | global average pool) -> dropout -> linear.

Input is the already-windowed float tensor ``(B, 3, H, W)`` (see :func:`ctplatform.model.windows.hu_to_input`);
output is one logit per class. :meth:`SliceClassifier.embed` gives the pooled features before dropout and the
linear layer, for volume-level heads (attention MIL) built on top of slice embeddings.

Freezing: :meth:`SliceClassifier.set_backbone_trainable` toggles ``requires_grad`` of backbone parameters only
(attention, fusion and head always train). While the backbone is frozen, its BatchNorm layers are also kept in
eval mode: :meth:`SliceClassifier.train` is overridden to put them back in eval after every ``train()`` call
(PyTorch and Lightning switch modes through ``Module.train``), so a frozen backbone normalises with its stored
running statistics and does not update them.

LoRA (``lora_rank > 0``, :mod:`ctplatform.model.lora`): the backbone's own weights are always frozen (its
BatchNorm layers, if any, stay in eval mode) and its *adapters* are what "the backbone" means for freezing:
``--freeze-backbone`` keeps them fixed, ``--progressive-unfreeze`` starts training them at ``--unfreeze-epoch``.
:meth:`SliceClassifier.merge_lora` folds them into the weights (export), leaving a plain classifier.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ctplatform.labels import NUM_CLASSES
from ctplatform.model.attention import ATTENTIONS, build_attention
from ctplatform.model.backbones import Backbone, build_backbone
from ctplatform.model.lora import LoraSettings, apply_lora, has_lora, lora_parameters, merge_lora
from ctplatform.model.multiscale import MultiScaleFusion


class SliceClassifier(nn.Module):
    """Multi-label slice classifier around a :class:`~ctplatform.model.backbones.Backbone`.

    Args:
        backbone: a backbone returning ``[stride-8, stride-16, stride-32]`` feature maps.
        use_attention: ``"none"``, ``"se"`` or ``"cbam"``; applied to every feature map the head uses.
        use_multiscale: fuse the last three stages (:class:`MultiScaleFusion`) instead of pooling the last one.
        num_classes: number of logits.
        dropout: dropout probability before the linear layer.
        fusion_channels: projection width per stage when ``use_multiscale``.

    Attributes:
        embed_dim: size of :meth:`embed`'s output.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        use_attention: str = "none",
        use_multiscale: bool = False,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.2,
        fusion_channels: int = 256,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backbone.is_vit and (use_attention != "none" or use_multiscale):
            raise ValueError(f"{backbone.name} is a vision transformer: --use-attention se/cbam and --use-multiscale "
                             "act on a CNN's spatial stages, which it does not have (use --use-attention none, no "
                             "--use-multiscale)")
        self.backbone = backbone
        self.use_multiscale = bool(use_multiscale)
        self.use_attention = use_attention
        used_channels = backbone.stage_channels if self.use_multiscale else backbone.stage_channels[-1:]
        self.attention = nn.ModuleList(build_attention(use_attention, c) for c in used_channels)
        if self.use_multiscale:
            self.fusion: MultiScaleFusion | None = MultiScaleFusion(used_channels, fusion_channels)
            self.embed_dim = self.fusion.out_features
        else:
            self.fusion = None
            self.embed_dim = used_channels[0]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.embed_dim, num_classes)
        self.num_classes = num_classes
        self._backbone_frozen = False
        self.lora: LoraSettings | None = None

    # --- LoRA -----------------------------------------------------------------------------------------------
    def add_lora(self, settings: LoraSettings) -> list[str]:
        """Inject LoRA adapters into the backbone (its own weights freeze); returns the adapted module names."""
        if has_lora(self.backbone):
            raise ValueError("the backbone already has LoRA adapters")
        names = apply_lora(self.backbone, settings, self.backbone.is_vit)
        self.lora = settings
        self.train(self.training)
        return names

    def merge_lora(self) -> SliceClassifier:
        """Fold the adapters into the backbone's weights: afterwards a plain classifier (its state dict keys are
        those of the same architecture without LoRA)."""
        if self.lora is not None:
            merge_lora(self.backbone)
            self.lora = None
            self.set_backbone_trainable(not self._backbone_frozen)
        return self

    def embed(self, x: Tensor) -> Tensor:
        """Pooled features before dropout and the linear layer, ``(B, embed_dim)``."""
        features = self.backbone(x)
        if self.fusion is None:
            return self.attention[0](features[-1]).mean(dim=(2, 3))
        attended = [att(f) for att, f in zip(self.attention, features, strict=True)]
        return self.fusion(attended)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` for a windowed input ``(B, 3, H, W)``."""
        return self.head(self.dropout(self.embed(x)))

    # --- freezing -------------------------------------------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's trainable parameters (never attention, fusion or head): its LoRA adapters if it has them."""
        if self.lora is not None:
            return lora_parameters(self.backbone)
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything that is not the backbone: attention, fusion and the linear head."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def set_backbone_trainable(self, flag: bool) -> None:
        """Freeze (``False``) or unfreeze (``True``) the backbone; frozen BatchNorm layers stay in eval mode."""
        self._backbone_frozen = not flag
        trainable = {id(p) for p in self.backbone_parameters()}
        for p in self.backbone.parameters():
            p.requires_grad_(flag and id(p) in trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> SliceClassifier:
        super().train(mode)
        if mode and (self._backbone_frozen or self.lora is not None):
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def architecture(self) -> dict[str, Any]:
        """Keyword arguments of :func:`build_classifier` that rebuild this architecture (random weights)."""
        return {
            "model": self.backbone.name,
            "weights": "none",
            "use_attention": self.use_attention,
            "use_multiscale": self.use_multiscale,
            "num_classes": self.num_classes,
            "dropout": self.dropout.p,
            **({"lora_rank": self.lora.rank, "lora_alpha": self.lora.alpha, "lora_targets": self.lora.targets}
               if self.lora is not None else {}),
        }


def build_classifier(
    model: str = "resnet50",
    weights: str | os.PathLike[str] = "none",
    use_attention: str = "none",
    use_multiscale: bool = False,
    num_classes: int = NUM_CLASSES,
    dropout: float = 0.2,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: str = "auto",
    grad_checkpoint: bool = False,
) -> SliceClassifier:
    """Build a :class:`SliceClassifier` from the `--model`, `--use-attention` and `--use-multiscale` flags.

    ``weights`` initialises the backbone only (see :func:`~ctplatform.model.backbones.build_backbone`), before any
    LoRA adapters (``lora_rank > 0``) are added. ``grad_checkpoint`` recomputes a timm backbone's blocks in the
    backward pass (memory, not architecture).
    """
    if use_attention not in ATTENTIONS:  # validate before building a large backbone
        raise ValueError(f"unknown attention {use_attention!r}: choose one of {', '.join(ATTENTIONS)}")
    lora = LoraSettings(lora_rank, lora_alpha, lora_dropout, lora_targets)
    classifier = SliceClassifier(
        build_backbone(model, weights=weights),
        use_attention=use_attention,
        use_multiscale=use_multiscale,
        num_classes=num_classes,
        dropout=dropout,
    )
    if lora.enabled:
        classifier.add_lora(lora)
    if grad_checkpoint:
        classifier.backbone.set_grad_checkpointing(True)
    return classifier
