"""Preprocessing of uploads on the ingress's CPUs: decoded uploads become the int16 HU slices a model replica takes.

A volume is decoded once, in its stored values (`ctplatform.data.read_raw_volume` under the service's limits), and
prepared as `prepare` prepares the training cache (`preprocess_raw_volume`: only the slices the model takes are
converted to HU); .npy slices are resized (`resize_slices`). Preparation takes the settings of
the model replica that will answer: mid-rollout, a replica of another bundle version may ask for other ones, and
the upload is then prepared again with them.
"""

from __future__ import annotations

import numpy as np

from ctplatform.data import RawVolume
from ctplatform.data.preprocess import PreprocessSettings, preprocess_raw_volume, resize_slices
from ctplatform.serve.inputs import ServeLimits, SliceInput, Upload, decode_volume


class VolumeUpload:
    """A decoded volume upload: what the response reports about it, and its stored values until it is prepared."""

    def __init__(self, upload: Upload, limits: ServeLimits):
        volume = decode_volume(upload, limits)
        self.upload = upload
        self.limits = limits
        self.shape = list(volume.shape)
        self.spacing = list(map(float, volume.spacing))
        self.hu_source = volume.hu_source
        self.notes = list(volume.notes)
        self._volume: RawVolume | None = volume

    def prepare(self, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
        """(K, S, S) int16 HU slices and their positions in the volume.

        The volume (it can be GBs) is released once prepared; a rare second preparation (a model replica with other
        preprocessing, mid-rollout) decodes the upload again."""
        volume, self._volume = self._volume, None
        if volume is None:
            volume = decode_volume(self.upload, self.limits)
        return preprocess_raw_volume(volume, settings)

    def describe(self, slices_used: int) -> dict:
        return {"filename": self.upload.filename, "shape": self.shape, "spacing_mm": self.spacing,
                "hu_source": self.hu_source, "slices_used": slices_used}


def prepare_slices(slices: list[SliceInput], settings: PreprocessSettings) -> tuple[np.ndarray]:
    """Checked 2-D HU slices -> one (N, S, S) int16 array at the model's size."""
    size = settings.image_size
    return (np.concatenate([resize_slices(np.asarray(s.hu, np.float32)[None], size) for s in slices]),)
