"""Volume -> training slices: the one preprocessing shared by `prepare`, `predict` and the HTTP service.

Slices are chosen within the body (K evenly spaced, or every k-th), padded to square with air and resized to the
training size, and kept as int16 HU. Windowing (HU -> network input) happens later, on the GPU, in
:func:`ctplatform.model.windows.hu_to_input`, so one cache serves every window setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ctplatform.data import RawVolume
from ctplatform.data.hounsfield import HU_MIN

SELECTIONS = ("even", "stride")


@dataclass(frozen=True)
class PreprocessSettings:
    image_size: int = 224
    selection: str = "even"  # "even": num_slices evenly spaced within the body; "stride": every stride-th
    num_slices: int = 32
    stride: int = 4
    body_threshold_hu: float = -500.0  # above this is body (soft tissue, bone); below is air/lung
    body_min_fraction: float = 0.05  # a slice is "within the body" when this much of it is body

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"invalid slice selection {self.selection!r}: choose one of {', '.join(SELECTIONS)}")
        if self.image_size < 8 or self.num_slices < 1 or self.stride < 1:
            raise ValueError("image_size must be >= 8, num_slices and stride >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessSettings:
        return cls(**values)


def body_extent(hu: np.ndarray, settings: PreprocessSettings, step: int | None = None) -> tuple[int, int]:
    """First and last slice index (inclusive) whose body fraction reaches the threshold; whole volume if none."""
    if step is None:
        step = max(1, min(hu.shape[1], hu.shape[2]) // 64)  # a 64x64 sample per slice is plenty for a fraction
    fractions = (hu[:, ::step, ::step] > settings.body_threshold_hu).mean(axis=(1, 2))
    inside = np.flatnonzero(fractions >= settings.body_min_fraction)
    if inside.size == 0:
        return 0, hu.shape[0] - 1
    return int(inside[0]), int(inside[-1])


def select_slices(hu: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Indices (ascending, int64) of the slices to keep."""
    first, last = body_extent(hu, settings)
    return slice_positions(first, last, settings)


def slice_positions(first: int, last: int, settings: PreprocessSettings) -> np.ndarray:
    if settings.selection == "stride":
        return np.arange(first, last + 1, settings.stride, dtype=np.int64)
    # Evenly spaced centres of K equal bins: never the very first/last body slice, which are often partial.
    k = settings.num_slices
    centres = first + (np.arange(k) + 0.5) * (last - first + 1) / k
    return np.clip(np.floor(centres), first, last).astype(np.int64)


def resize_slices(slices: np.ndarray, size: int) -> np.ndarray:
    """(K, H, W) HU -> (K, size, size) int16 HU: pad to square with air, then antialiased bilinear resize."""
    k, h, w = slices.shape
    side = max(h, w)
    if h != w:
        padded = np.full((k, side, side), HU_MIN, dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        padded[:, top : top + h, left : left + w] = slices
        slices = padded
    tensor = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).unsqueeze(1)
    if side != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
    # Bilinear (antialiased or not) weights are non-negative and sum to one: outputs stay within the input's
    # [HU_MIN, HU_MAX] range, so rounding is all the int16 cast needs.
    out = tensor.squeeze(1).numpy()
    np.rint(out, out=out)
    return out.astype(np.int16)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside the block (process-wide: for a job that owns its process).

    In-process `prepare` runs one volume at a time on one core, as each Ray worker does (Ray sets its workers'
    OMP_NUM_THREADS to their CPUs): a second resize thread contending for a shared core made the resize ~3x slower
    (7 vs 21 ms for 32 slices 256² -> 224² on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def preprocess_volume(hu: np.ndarray, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (slices, rows, cols) -> (int16 slices (K, S, S), slice positions (K,))."""
    positions = select_slices(hu, settings)
    return resize_slices(hu[positions], settings.image_size), positions


def preprocess_raw_volume(volume: RawVolume, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
    """Same result as `preprocess_volume(volume.hu(), ...)`, converting only the kept slices to HU.

    Slice selection looks at a 4x-strided in-plane sample, as `body_extent` does on a full volume of <= 256 px: the
    reader's checks' sample where the steps allow (`RawVolume.hu_sample` keeps it), not a second conversion."""
    step = max(1, min(volume.shape[1], volume.shape[2]) // 64)
    sample = volume.hu_sample(step)
    first, last = body_extent(sample, settings, step=1)
    positions = slice_positions(first, last, settings)
    return resize_slices(volume.hu(positions), settings.image_size), positions
