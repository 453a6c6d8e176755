"""CT-RATE data layer: readers, synthetic data, slice cache and datasets. Runs without Ray.

The volume reader chain (:mod:`ctplatform.data.readers`) is used through the names exported here::

    from ctplatform.data import ReadLimits, read_volume

They load on first use, so importing a light submodule (`ctplatform.data.errors` for the command line) does not
import nibabel and pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "read_volume": "chain",
    "read_raw_volume": "chain",
    "read_header": "chain",
    "ReadLimits": "base",
    "VolumeHeader": "base",
    "Volume": "volume",
    "RawVolume": "volume",
}
__all__ = ["RawVolume", "ReadLimits", "Volume", "VolumeHeader", "read_header", "read_raw_volume", "read_volume"]

if TYPE_CHECKING:
    from ctplatform.data.readers.base import ReadLimits, VolumeHeader
    from ctplatform.data.readers.chain import read_header, read_raw_volume, read_volume
    from ctplatform.data.readers.volume import RawVolume, Volume


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"ctplatform.data.readers.{module}"), name)
