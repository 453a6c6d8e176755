"""Preprocessing of uploads on the ingress's CPUs: decoded uploads become the int16 HU slices a model replica takes.

A volume is checked once (`decode_volume`: NIfTI and MetaImage a plane at a time, a DICOM `.zip` a member at a time)
and prepared as `prepare` prepares the training cache (the same slices as `preprocess_raw_volume`); .npy slices are
resized (`resize_slices`). Preparation takes the settings of the model replica that will answer: mid-rollout, a
replica of another bundle version may ask for other ones, and the upload is then prepared again with them.
"""

from __future__ import annotations

import numpy as np

from ctplatform.data.preprocess import PreprocessSettings, resize_slices
from ctplatform.serve.inputs import ServeLimits, SliceInput, Upload, as_input_errors, decode_volume


class VolumeUpload:
    """A checked volume upload: what the response reports about it, and how to prepare it."""

    def __init__(self, upload: Upload, limits: ServeLimits):
        self.upload = upload
        self.volume = decode_volume(upload, limits)
        self.shape = list(self.volume.shape)
        self.spacing = list(map(float, self.volume.spacing))
        self.hu_source = self.volume.hu_source
        self.notes = list(self.volume.notes)

    def prepare(self, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
        """(K, S, S) int16 HU slices and their positions in the volume (a scanned volume is read again, keeping only
        those slices)."""
        return as_input_errors(self.upload.filename, self.volume.prepare, settings)

    def describe(self, slices_used: int) -> dict:
        return {"filename": self.upload.filename, "shape": self.shape, "spacing_mm": self.spacing,
                "hu_source": self.hu_source, "slices_used": slices_used}


def prepare_slices(slices: list[SliceInput], settings: PreprocessSettings) -> tuple[np.ndarray]:
    """Checked 2-D HU slices -> one (N, S, S) int16 array at the model's size."""
    size = settings.image_size
    return (np.concatenate([resize_slices(np.asarray(s.hu, np.float32)[None], size) for s in slices]),)
