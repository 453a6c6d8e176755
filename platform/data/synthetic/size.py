"""Volume sizes of the synthetic data set: (rows, cols, slices), parsed from ``ROWSxCOLSxSLICES`` and checked."""

from __future__ import annotations

import re

MIN_SIZE = (16, 16, 8)


def parse_size(text: str) -> tuple[int, int, int]:
    """Parse ``"ROWSxCOLSxSLICES"`` (e.g. ``"64x64x48"``) into a tuple of three ints."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"size must look like ROWSxCOLSxSLICES, e.g. 64x64x48; got {text!r}")
    size = tuple(int(g) for g in match.groups())
    check_size(size)
    return size  # type: ignore[return-value]


def check_size(size: tuple[int, ...]) -> tuple[int, int, int]:
    """`size` as three ints, or ValueError when it is not three whole numbers within MIN_SIZE..1024."""
    if len(size) != 3 or any(int(s) != s for s in size):
        raise ValueError(f"size must be three ints (rows, cols, slices); got {size!r}")
    if any(s < m for s, m in zip(size, MIN_SIZE, strict=True)) or any(s > 1024 for s in size):
        raise ValueError(f"size {size} outside {MIN_SIZE}..(1024, 1024, 1024) (rows, cols, slices)")
    return tuple(int(s) for s in size)  # type: ignore[return-value]
