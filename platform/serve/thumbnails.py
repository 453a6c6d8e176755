"""Small grayscale PNG thumbnails of key slices, returned inline (base64) so the service keeps no per-user state.

A thumbnail is the prepared slice the model saw (int16 HU), shown in the lung window and shrunk to at most
`size` pixels per side. The PNG writer is the few lines of the format an 8-bit grayscale image needs (no
imaging library).
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

from ctplatform.data.preprocess import resize_slices

LUNG_WINDOW_HU = (-1350.0, 150.0)  # width 1500, level -600: the window radiologists read chest CT in


def png_gray8(image: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes (8-bit grayscale, no interlace)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    height, width = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))  # filter type 0 on every row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def slice_thumbnail(hu_slice: np.ndarray, size: int = 128, window: tuple[float, float] = LUNG_WINDOW_HU) -> str:
    """One (S, S) HU slice -> `data:image/png;base64,...` at most `size` pixels per side."""
    hu = np.asarray(hu_slice, dtype=np.float32)
    if max(hu.shape) > size:
        hu = resize_slices(hu[None], size)[0].astype(np.float32)
    low, high = window
    gray = np.clip((hu - low) / (high - low), 0.0, 1.0) * 255.0
    return "data:image/png;base64," + base64.b64encode(png_gray8(np.rint(gray).astype(np.uint8))).decode("ascii")


def key_slice_thumbnails(prepared: np.ndarray, positions: np.ndarray, wanted: list[int], size: int = 128) -> dict:
    """Thumbnails of the prepared slices at source positions `wanted`, keyed by position (as a string)."""
    index_of = {int(p): k for k, p in enumerate(np.asarray(positions).tolist())}
    return {str(p): slice_thumbnail(prepared[index_of[p]], size) for p in sorted(set(wanted)) if p in index_of}
