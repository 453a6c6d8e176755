"""Attention-MIL volume classifier: a shared 2-D slice encoder, gated attention over the slices, 18 volume logits.

Multiple-instance learning (Ilse, Tomczak & Welling 2018, arXiv:1802.04712): a volume is a bag of K slices and
only the bag (volume) is labelled. The :class:`~ctplatform.model.classifier.SliceClassifier` embeds every slice
(any backbone, SE/CBAM attention, multi-scale fusion), :class:`~ctplatform.model.gated_attention.GatedAttentionPool`
weighs the slices, and the encoder's own linear head maps the pooled embedding to logits:

* ``pooling="per-class"``: one weight distribution per class; class ``c`` pools ``z_c = sum_k a_kc h_k`` and
  scores it with row ``c`` of the linear head.
* ``pooling="shared"``: one distribution for all classes; ``z = sum_k a_k h_k`` goes through the whole head.

The head is linear, so without dropout a volume logit is exactly the attention-weighted mean of the slice logits
(``encoder(x)``, the ``slice_logits`` of :meth:`AttentionMILClassifier.forward` with ``return_details``). Those
slice logits are what ``Predictor.slice_logits`` and single-slice prediction return for this head.

Input: windowed slices ``(B, K, 3, H, W)`` with an optional mask ``(B, K)`` (True = a real slice) for a padded batch
of volumes with different slice counts. Only the real slices go through the encoder (padding never touches
BatchNorm statistics) and padded slices get exactly zero weight. Memory: ``chunk_slices`` bounds the slices per
encoder call (in training, BatchNorm then normalises each chunk with its own statistics) and ``checkpointing``
recomputes encoder activations in the backward pass instead of storing them (activation memory of one chunk
instead of B*K slices; BatchNorm running statistics are then updated twice per step, by the forward and by the
recomputation).

Frozen encoder (``set_encoder_trainable(False)``): the encoder's body (backbone, SE/CBAM, fusion) is fixed and kept
in eval mode, so slice embeddings can be computed once and cached (:meth:`forward_features` trains the pooling and
the linear head on them); the bundle still holds the whole model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ctplatform.labels import NUM_CLASSES
from ctplatform.model.classifier import SliceClassifier, build_classifier
from ctplatform.model.gated_attention import GatedAttentionPool

POOLINGS: tuple[str, ...] = ("per-class", "shared")


class AttentionMILClassifier(nn.Module):
    """Volume classifier over a bag of slices.

    Args:
        encoder: the shared slice encoder; its ``head`` scores pooled (and single-slice) embeddings.
        pooling: ``"per-class"`` or ``"shared"`` attention.
        hidden: width of the gated attention's projections.
        checkpointing: gradient checkpointing of the encoder in training.
        chunk_slices: at most this many slices per encoder call (None: all slices of the batch at once).
    """

    def __init__(self, encoder: SliceClassifier, *, pooling: str = "per-class", hidden: int = 128,
                 checkpointing: bool = False, chunk_slices: int | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown MIL pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        if chunk_slices is not None and chunk_slices < 1:
            raise ValueError(f"chunk_slices must be >= 1, got {chunk_slices}")
        self.encoder = encoder
        self.pooling = pooling
        self.num_classes = encoder.num_classes
        self.pool = GatedAttentionPool(encoder.embed_dim, hidden, heads=self.num_classes if pooling == "per-class"
                                       else 1)
        self.checkpointing = bool(checkpointing)
        self.chunk_slices = chunk_slices
        self._encoder_frozen = False

    # ------------------------------------------------------------------ forward
    def embed_slices(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of windowed slices ``(N, 3, H, W)``, chunked and checkpointed as configured."""
        step = self.chunk_slices or max(1, len(x))
        use_checkpoint = self.checkpointing and self.training and torch.is_grad_enabled() and not self._encoder_frozen
        parts = []
        for start in range(0, len(x), step):
            # NHWC, like the encoder's weights (the training module and the Predictor keep the model channels_last)
            chunk = x[start : start + step].contiguous(memory_format=torch.channels_last)
            if use_checkpoint:
                parts.append(checkpoint(self.encoder.embed, chunk, use_reentrant=False))
            else:
                parts.append(self.encoder.embed(chunk))
        return torch.cat(parts) if parts else x.new_zeros((0, self.encoder.embed_dim))

    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Slice embeddings ``(B, K, D)`` of ``(B, K, 3, H, W)``; padded positions hold zeros."""
        if x.dim() != 5:
            raise ValueError(f"expected a batch of volumes (B, K, 3, H, W), got shape {tuple(x.shape)}")
        b, k = x.shape[:2]
        if mask is None or bool(mask.all()):
            return self.embed_slices(x.flatten(0, 1)).view(b, k, -1)
        embedded = self.embed_slices(x[mask])
        h = embedded.new_zeros((b, k, embedded.shape[-1]))
        h[mask] = embedded
        return h

    def forward_features(self, h: Tensor, mask: Tensor | None = None, return_details: bool = False):
        """Volume logits ``(B, C)`` from slice embeddings ``(B, K, D)`` (the frozen-encoder fast path).

        With ``return_details``: ``(logits, weights (B, K, C), slice_logits (B, K, C))``; weights are zero on
        padded slices and sum to one over each volume's real slices (the same for every class when shared).
        """
        if mask is not None:
            mask = mask.bool()
        weights = self.pool(h, mask)  # (B, K, heads)
        head = self.encoder.head
        if self.pooling == "per-class":
            pooled = torch.einsum("bkc,bkd->bcd", weights.to(h.dtype), h)  # (B, C, D)
            pooled = self.encoder.dropout(pooled)
            logits = (pooled * head.weight.to(pooled.dtype)).sum(-1) + head.bias.to(pooled.dtype)
        else:
            pooled = torch.einsum("bk,bkd->bd", weights[..., 0].to(h.dtype), h)
            logits = head(self.encoder.dropout(pooled))
            weights = weights.expand(-1, -1, self.num_classes)
        if not return_details:
            return logits
        return logits, weights, head(h)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_details: bool = False):
        """Volume logits ``(B, C)`` for windowed slices ``(B, K, 3, H, W)`` (see :meth:`forward_features`)."""
        return self.forward_features(self.encode(x, mask), mask, return_details=return_details)

    # ------------------------------------------------------------------ freezing
    def encoder_body(self) -> list[nn.Module]:
        """The encoder's modules before its linear head: what a frozen-encoder run fixes."""
        body: list[nn.Module] = [self.encoder.backbone, self.encoder.attention]
        if self.encoder.fusion is not None:
            body.append(self.encoder.fusion)
        return body

    def set_encoder_trainable(self, flag: bool) -> None:
        """Freeze (``False``) or unfreeze the encoder body; frozen, it stays in eval mode (BatchNorm statistics)."""
        self._encoder_frozen = not flag
        for module in self.encoder_body():
            for p in module.parameters():
                p.requires_grad_(flag)
        self.train(self.training)

    # Backbone freezing (`--freeze-backbone`, `--progressive-unfreeze`) acts on the encoder's backbone, as for the
    # slice head; the callback in ctplatform.train.finetune calls these.
    def backbone_parameters(self) -> list[nn.Parameter]:
        return self.encoder.backbone_parameters()

    @property
    def backbone_frozen(self) -> bool:
        return self.encoder.backbone_frozen

    def set_backbone_trainable(self, flag: bool) -> None:
        self.encoder.set_backbone_trainable(flag)

    def merge_lora(self) -> AttentionMILClassifier:
        """Fold the encoder's LoRA adapters into its weights (see :meth:`SliceClassifier.merge_lora`)."""
        self.encoder.merge_lora()
        return self

    def train(self, mode: bool = True) -> AttentionMILClassifier:
        super().train(mode)
        if mode and self._encoder_frozen:
            for module in self.encoder_body():
                module.eval()
        return self

    def architecture(self) -> dict[str, Any]:
        """Keyword arguments of :func:`build_mil_model` that rebuild this architecture (random weights)."""
        return {**self.encoder.architecture(), "mil_pooling": self.pooling,
                "mil_hidden": self.pool.attention_v.out_features}


def build_mil_model(
    model: str = "resnet50",
    weights: str | os.PathLike[str] = "none",
    use_attention: str = "none",
    use_multiscale: bool = False,
    num_classes: int = NUM_CLASSES,
    dropout: float = 0.2,
    mil_pooling: str = "per-class",
    mil_hidden: int = 128,
    checkpointing: bool = False,
    chunk_slices: int | None = None,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: str = "auto",
    grad_checkpoint: bool = False,
) -> AttentionMILClassifier:
    """Build an :class:`AttentionMILClassifier` from the same flags as the slice classifier plus the pooling options.

    ``weights`` initialises the encoder's backbone only; ``lora_*`` add LoRA adapters to it (see
    :func:`~ctplatform.model.classifier.build_classifier`). ``checkpointing``, ``grad_checkpoint`` and
    ``chunk_slices`` change memory, not the architecture (they are not part of
    :meth:`AttentionMILClassifier.architecture`).
    """
    if mil_pooling not in POOLINGS:  # validate before building a large backbone
        raise ValueError(f"unknown MIL pooling {mil_pooling!r}: choose one of {', '.join(POOLINGS)}")
    encoder = build_classifier(model, weights=weights, use_attention=use_attention, use_multiscale=use_multiscale,
                               num_classes=num_classes, dropout=dropout, lora_rank=lora_rank, lora_alpha=lora_alpha,
                               lora_dropout=lora_dropout, lora_targets=lora_targets, grad_checkpoint=grad_checkpoint)
    return AttentionMILClassifier(encoder, pooling=mil_pooling, hidden=mil_hidden, checkpointing=checkpointing,
                                  chunk_slices=chunk_slices)
