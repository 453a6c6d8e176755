"""Gated attention pooling of a bag of instances (Ilse, Tomczak & Welling 2018, "Attention-based Deep Multiple
Instance Learning", ICML, arXiv:1802.04712, eq. 9).

For instance embeddings ``h_k`` of one bag, the weight of instance ``k`` is

    a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )

The sigmoid gate lets the score be non-monotonic in ``h_k`` where ``tanh`` alone is nearly linear. With ``heads > 1``
there is one ``w`` per head (e.g. one per class: each finding gets its own distribution over slices); ``V`` and
``U`` are shared by all heads.

Bags of different sizes travel as a padded batch with a boolean mask: padded instances get a score of ``-inf``, so
their weight is exactly zero and the weights of the real instances of every bag sum to one.

One addition to the paper: the scoring MLP sees each embedding minus its bag's mean (over the real instances),
layer-normalised. CNN embeddings after global pooling share a large common component across the slices of a
volume; fed raw, it dominates ``V h`` and ``U h``, a few Adam steps saturate ``tanh``/``sigmoid`` for every
slice at once and the weights freeze at uniform. Scores only need how a slice differs from its volume, and the
pooled embedding still uses the raw ``h``. Permutation invariance and masking are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedAttentionPool(nn.Module):
    """Attention weights ``(B, K, heads)`` for instance embeddings ``(B, K, D)`` and a mask ``(B, K)``.

    Args:
        in_features: ``D``, the embedding size.
        hidden: ``L``, the width of the ``V`` and ``U`` projections (128 in the paper).
        heads: independent weight distributions per bag (1 = shared; the number of classes = per class).
    """

    def __init__(self, in_features: int, hidden: int = 128, heads: int = 1) -> None:
        super().__init__()
        if in_features < 1 or hidden < 1 or heads < 1:
            raise ValueError(f"in_features, hidden and heads must be >= 1, got {in_features}, {hidden}, {heads}")
        self.norm = nn.LayerNorm(in_features)
        self.attention_v = nn.Linear(in_features, hidden)
        self.attention_u = nn.Linear(in_features, hidden)
        self.attention_w = nn.Linear(hidden, heads)
        self.heads = heads

    def scores(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unnormalised scores ``(B, K, heads)`` (float32) of embeddings ``(B, K, D)``."""
        if mask is None:
            centre = h.mean(dim=1, keepdim=True)
        else:
            weight = mask.to(h.dtype).unsqueeze(-1)
            centre = (h * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True)
        x = self.norm(h - centre)
        gated = torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x))
        return self.attention_w(gated).float()

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        if h.dim() != 3:
            raise ValueError(f"expected instance embeddings (B, K, D), got shape {tuple(h.shape)}")
        if mask is not None:
            mask = mask.bool()
            if mask.shape != h.shape[:2]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match the bags {tuple(h.shape[:2])}")
            if not bool(mask.any(dim=1).all()):
                raise ValueError("every bag needs at least one unmasked instance")
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding may hold anything (inf, NaN): keep it out
        scores = self.scores(h, mask)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return torch.softmax(scores, dim=1)  # exp(-inf) = 0: padded instances get exactly zero weight
