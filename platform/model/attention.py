"""Build a feature-map attention layer by name (`--use-attention {none,se,cbam}`).

The classifier applies the layer to the backbone's output feature map(s): to the last stage, or to each fused
stage when multi-scale fusion is on. See :mod:`ctplatform.model.se` and :mod:`ctplatform.model.cbam`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ctplatform.model.cbam import CBAM
from ctplatform.model.se import SqueezeExcite

_FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda channels: nn.Identity(),
    "se": lambda channels: SqueezeExcite(channels),
    "cbam": lambda channels: CBAM(channels),
}
ATTENTIONS: tuple[str, ...] = tuple(_FACTORIES)


def build_attention(name: str, channels: int) -> nn.Module:
    """A shape-preserving attention module for ``channels``-channel feature maps (``nn.Identity`` for "none")."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}: choose one of {', '.join(ATTENTIONS)}") from None
    return factory(channels)
