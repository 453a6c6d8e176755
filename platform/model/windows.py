"""Hounsfield units -> network input: CT intensity windows, then ImageNet normalisation.

A window (width W, level L) keeps HU in ``[L - W/2, L + W/2]`` and maps it linearly to ``[0, 1]`` (values outside
are clipped). ``"three"`` stacks the lung, mediastinum and bone windows as the three input channels; ``"single"``
uses one wide window ``[-1000, 1000]`` replicated to three channels. The ``[0, 1]`` channels are then normalised
with the ImageNet mean/std that torchvision's pretrained backbones expect.

Everything runs on torch tensors, so a batch of raw HU slices can be windowed on the GPU. :func:`window_table`
returns the exact recipe as JSON-serialisable data for a model bundle's metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Window:
    """One CT display window, in Hounsfield units."""

    name: str
    width: float
    level: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0


# The window table recorded in model bundles. Keys are the `--input-windows` choices (config.INPUT_WINDOWS).
WINDOWS: dict[str, tuple[Window, ...]] = {
    "three": (
        Window("lung", width=1500.0, level=-600.0),  # [-1350, 150]
        Window("mediastinum", width=400.0, level=40.0),  # [-160, 240]
        Window("bone", width=1800.0, level=400.0),  # [-500, 1300]
    ),
    "single": (Window("wide", width=2000.0, level=0.0),),  # [-1000, 1000], replicated to 3 channels
}
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INPUT_CHANNELS = 3


def _windows(mode: str) -> tuple[Window, ...]:
    try:
        return WINDOWS[mode]
    except KeyError:
        raise ValueError(f"unknown input window mode {mode!r}: choose one of {', '.join(WINDOWS)}") from None


def window_table(mode: str) -> dict[str, Any]:
    """The preprocessing recipe of ``mode`` as plain data (for a bundle's ``metadata.json``)."""
    windows = _windows(mode)
    return {
        "mode": mode,
        "windows": [{**asdict(w), "low": w.low, "high": w.high} for w in windows],
        "replicate_to_channels": INPUT_CHANNELS,
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }


def hu_to_input(hu: Tensor, mode: str = "three") -> Tensor:
    """Window a batch of HU slices into a normalised float32 network input.

    Args:
        hu: ``(B, H, W)`` or ``(B, 1, H, W)`` tensor of Hounsfield units, any integer or floating dtype, any device.
        mode: ``"three"`` (lung / mediastinum / bone channels) or ``"single"`` (one ``[-1000, 1000]`` window
            replicated to three channels).

    Returns:
        ``(B, 3, H, W)`` float32 tensor on ``hu``'s device: each window clipped and scaled to ``[0, 1]``, then
        ``(x - IMAGENET_MEAN[c]) / IMAGENET_STD[c]`` per channel.
    """
    windows = _windows(mode)
    if not isinstance(hu, Tensor):
        raise TypeError(f"hu_to_input expects a torch.Tensor, got {type(hu).__name__}")
    if hu.dtype == torch.bool or hu.is_complex():
        raise TypeError(f"hu_to_input expects integer or floating HU values, got dtype {hu.dtype}")
    if hu.dim() == 3:
        hu = hu.unsqueeze(1)
    elif not (hu.dim() == 4 and hu.shape[1] == 1):
        raise ValueError(f"hu_to_input expects (B, H, W) or (B, 1, H, W), got shape {tuple(hu.shape)}")

    x = hu.to(torch.float32)
    device = x.device
    low = torch.tensor([w.low for w in windows], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    width = torch.tensor([w.width for w in windows], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    x = ((x - low) / width).clamp_(0.0, 1.0)  # broadcasts (B, 1, H, W) to (B, n_windows, H, W)
    if x.shape[1] != INPUT_CHANNELS:
        x = x.expand(-1, INPUT_CHANNELS, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (x - mean) / std
