"""Payloads for the service's tests: synthetic chests as NIfTI/MetaImage/.npy bytes, hostile uploads (gzip bombs,
headers that lie), and random-weight bundles. Plain functions, no Ray."""

import gzip
import io
import zlib

import nibabel as nib
import numpy as np
import SimpleITK as sitk

MiB = 1 << 20


def chest(shape=(40, 64, 56), seed=0):
    """(slices, rows, cols) HU: air, an elliptic body with two lungs and bright nodules, noise: slices differ."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.42)) ** 2 < 1
    body &= (z > 3) & (z < shape[0] - 3)
    hu[body] = 40
    hu[body & (np.abs(x - shape[2] / 2) > 3) & (np.abs(y - shape[1] / 2) < shape[1] * 0.25)] = -850
    for _ in range(12):
        cz, cy, cx = rng.integers(4, shape[0] - 4), rng.integers(10, shape[1] - 10), rng.integers(10, shape[2] - 10)
        hu[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < rng.integers(4, 30)] = rng.uniform(-100, 900)
    return np.rint(hu + rng.normal(0, 25, shape)).astype(np.float32)


def nifti_gz(hu, zooms=None, dtype=np.int16):
    img = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(dtype), np.diag([-0.7, -0.7, 2, 1.0]))
    if zooms is not None:
        img.header.set_zooms(zooms)
    return gzip.compress(img.to_bytes(), compresslevel=1)


def mha_bytes(hu, tmp_path):
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((0.8, 0.8, 1.5))
    path = tmp_path / "scan.mha"
    sitk.WriteImage(image, str(path), useCompression=True)
    return path.read_bytes()


def npy(array, **kwargs):
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def gzip_bomb(shape_xyz, dtype=np.int16, zeros=48 * MiB):
    """A gzip member: a NIfTI header declaring `shape_xyz`, then `zeros` bytes of zeros (compresses ~1000:1)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape_xyz)
    header.set_data_dtype(dtype)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(header.binaryblock + b"\x00" * 4)]
    parts += [compressor.compress(bytes(4 * MiB)) for _ in range(zeros // (4 * MiB))]
    return b"".join(parts) + compressor.flush()


def terabyte_header():
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    return gzip.compress(header.binaryblock + b"\x00" * 4)


def vox_offset_bomb(offset=200 * MiB):
    """A small .nii.gz whose header puts an 8x8x4 image `offset` bytes in: zeros in between, ~1000x compressed."""
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 4))
    header.set_data_dtype(np.int16)
    header.set_data_offset(offset)
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [compressor.compress(header.binaryblock)]
    parts += [compressor.compress(bytes(4 * MiB)) for _ in range(offset // (4 * MiB))]
    return b"".join(parts) + compressor.flush()


def long_gzip_name(payload=None):
    """A gzip member with a 100 KiB FNAME field before a header that declares terabytes."""
    member = payload or terabyte_header()
    return member[:3] + bytes([member[3] | 0x08]) + member[4:10] + b"n" * (100 << 10) + b"\0" + member[10:]


def make_bundle(path, seed=0, image_size=64, num_slices=8, calibrated=True):
    """A random-weight efficientnet_b0 slice bundle; its head is scaled so probabilities differ between slices."""
    import torch

    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.calibration import Calibration
    from ctplatform.model.classifier import build_classifier

    torch.manual_seed(seed)
    model = build_classifier("efficientnet_b0", num_classes=18)
    with torch.no_grad():  # spread the random head's outputs so probabilities differ between slices and classes
        model.head.weight.mul_(60.0)
        model.head.bias.uniform_(-1.0, 1.0)
    calibration = Calibration(np.full(18, 1.3), np.linspace(-1.5, 1.5, 18)) if calibrated else None
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=image_size, num_slices=num_slices).to_dict(),
                     aggregation="topk", topk=3, calibration=calibration,
                     metrics={"macro": {"auroc": 0.5}}, source={"run_name": f"test-{seed}"})
    return export_bundle(path, model, spec)


def make_mil_bundle(path, seed=2, image_size=64):
    import torch

    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.calibration import Calibration
    from ctplatform.model.mil import build_mil_model

    torch.manual_seed(seed)
    model = build_mil_model("resnet50", mil_pooling="per-class", mil_hidden=32)
    with torch.no_grad():  # spread the random attention so slices get clearly different weights
        model.pool.attention_w.weight.mul_(30.0)
    spec = ModelSpec(architecture={"head": "attention-mil", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=image_size, num_slices=8).to_dict(),
                     calibration=Calibration(np.full(18, 1.0), np.linspace(-2.0, 2.0, 18)),
                     source={"run_name": "test-mil"})
    return export_bundle(path, model.eval(), spec)
