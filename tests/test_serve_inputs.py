"""The service's upload parsing and validation, without Ray: caps, multipart, volumes, .npy slices, thumbnails,
bundle discovery, the CLI registration, the Serve config file and the serve layer's imports."""

import asyncio
import dataclasses
import gzip
import io
import json
import os
import pickle
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from ctplatform.serve.body import BodyBudget, BodyReservation, read_body
from ctplatform.serve.bundles import bundle_version, default_bundle_path, read_bundle_metadata
from ctplatform.serve.inputs import (
    InputError,
    ServeLimits,
    Upload,
    check_content_length,
    decode_slices,
    decode_volume,
    parse_multipart,
    read_npy,
    uploads_from_body,
)
from ctplatform.serve.thumbnails import png_gray8, slice_thumbnail

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ServeLimits(max_body_bytes=1 << 20, max_voxels=64 * 64 * 64, max_decompressed_bytes=64 * 64 * 64 * 2,
                     max_files=4, max_slices=8)


def chest(shape=(16, 32, 28), seed=0):
    """(slices, rows, cols) HU: air, an elliptic body with two lungs, noise."""
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    hu[body] = 40
    hu[body & (np.abs(x - shape[2] / 2) > 2) & (np.abs(y - shape[1] / 2) < shape[1] * 0.25)] = -850
    return hu + np.random.default_rng(seed).normal(0, 20, shape).astype(np.float32)


def nifti(hu_zyx, dtype=np.float32, zooms=None):
    img = nib.Nifti1Image(np.ascontiguousarray(hu_zyx.transpose(2, 1, 0)).astype(dtype), np.diag([0.7, 0.7, 2, 1.0]))
    if zooms is not None:
        img.header.set_zooms(zooms)
    return img.to_bytes()


def upload(data, name="v.nii.gz"):
    return Upload(name, data)


def status_of(fn, *args):
    with pytest.raises(InputError) as info:
        fn(*args)
    assert info.value.reason
    return info.value.status, info.value.reason


# ----------------------------------------------------------------------------------------------- body and multipart
def test_content_length_cap_is_checked_before_reading():
    assert check_content_length({"content-length": str(LIMITS.max_body_bytes)}, LIMITS) == LIMITS.max_body_bytes
    assert check_content_length({}, LIMITS) is None
    assert status_of(check_content_length, {"content-length": str(LIMITS.max_body_bytes + 1)}, LIMITS)[0] == 413
    assert status_of(check_content_length, {"content-length": "lots"}, LIMITS)[0] == 400


def test_streamed_body_stops_at_the_cap():
    pulled = []

    async def chunks():
        for _ in range(100):
            pulled.append(1)
            yield b"x" * (256 * 1024)

    with pytest.raises(InputError) as info:
        asyncio.run(read_body(chunks(), LIMITS))
    assert info.value.status == 413 and len(pulled) == 5  # 1 MiB cap: the 5th chunk passes it; nothing more is read

    async def small():
        yield b"ab"
        yield b"cd"

    assert asyncio.run(read_body(small(), LIMITS)) == b"abcd"


def trickle(pieces, pause_s):
    async def chunks():
        for piece in pieces:
            yield piece
            await asyncio.sleep(pause_s)
    return chunks()


def timed_status(coroutine):
    started = time.perf_counter()
    try:
        asyncio.run(coroutine)
    except InputError as exc:
        return exc.status, time.perf_counter() - started, exc.reason
    return 200, time.perf_counter() - started, ""


def test_a_client_below_the_minimum_rate_gets_408_after_the_grace_period():
    limits = dataclasses.replace(LIMITS, body_grace_s=0.5, min_body_rate=64 * 1024, body_timeout_s=30)
    status, took, reason = timed_status(read_body(trickle([b"x"] * 100, 0.2), limits))  # 5 bytes/s
    assert status == 408 and 0.5 <= took < 10 and "too slow" in reason, (status, took, reason)
    # a client that sends nothing at all is let go just as soon
    status, took, _ = timed_status(read_body(trickle([b"", b"x"], 60), limits))
    assert status == 408 and took < 10
    # above the rate, pauses and all, a body is read whole
    status, took, _ = timed_status(read_body(trickle([b"y" * 65536] * 6, 0.3), limits))
    assert status == 200


def test_a_body_that_never_ends_gets_408_at_the_body_timeout():
    limits = dataclasses.replace(LIMITS, body_grace_s=0.2, min_body_rate=1024, body_timeout_s=1.5,
                                 max_body_bytes=1 << 30, max_inflight_body_bytes=1 << 30)
    status, took, reason = timed_status(read_body(trickle([b"z" * 65536] * 1000, 0.05), limits))
    assert status == 408 and 1.5 <= took < 10 and "within 1.5 s" in reason


def test_the_body_budget_refuses_with_503_before_reading_and_is_given_back():
    budget = BodyBudget(1000)
    first = BodyReservation(budget)
    assert asyncio.run(read_body(trickle([b"a" * 600], 0), LIMITS, first, declared_length=600)) == b"a" * 600
    pulled = []

    async def chunks():
        pulled.append(1)
        yield b"b" * 500

    with pytest.raises(InputError) as refused:  # 600 + 500 > 1000: refused from Content-Length, nothing read
        asyncio.run(read_body(chunks(), LIMITS, BodyReservation(budget), declared_length=500))
    assert refused.value.status == 503 and pulled == [] and budget.held == 600
    chunked = BodyReservation(budget)  # no Content-Length: the reservation grows as the bytes arrive
    with pytest.raises(InputError, match="bytes of uploads in memory"):
        asyncio.run(read_body(trickle([b"c" * 300, b"c" * 300], 0), LIMITS, chunked))
    chunked.release()
    first.release()
    assert budget.held == 0
    assert asyncio.run(read_body(trickle([b"d" * 900], 0), LIMITS, BodyReservation(budget), 900)) == b"d" * 900


def multipart(parts, boundary="XyZ"):
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_files_in_order_fields_skipped_names_cleaned():
    body, ctype = multipart([("files", "../../etc/a.npy", b"A" * 10), ("note", None, b"hi"), ("files", "b.npy", b"BB")])
    uploads = uploads_from_body(body, ctype, None, LIMITS)
    assert [(u.filename, u.data) for u in uploads] == [("a.npy", b"A" * 10), ("b.npy", b"BB")]


@pytest.mark.parametrize("mutate, status", [
    (lambda b, c: (b[: len(b) // 2], c), 400),  # truncated: no closing boundary
    (lambda b, c: (b, "multipart/form-data"), 400),  # no boundary parameter
    (lambda b, c: (b"", c), 400),  # empty body
    (lambda b, c: (b, "application/x-www-form-urlencoded"), 415),
])
def test_multipart_errors(mutate, status):
    body, ctype = mutate(*multipart([("file", "v.nii.gz", b"x" * 100)]))
    assert status_of(uploads_from_body, body, ctype, None, LIMITS)[0] == status


def test_multipart_part_count_cap_and_no_file_part():
    body, ctype = multipart([("files", f"{i}.npy", b"x") for i in range(5)])
    assert status_of(parse_multipart, body, ctype, LIMITS)[0] == 413
    body, ctype = multipart([("note", None, b"hi")])
    assert status_of(uploads_from_body, body, ctype, None, LIMITS)[0] == 400


def test_raw_body_is_one_file():
    (only,) = uploads_from_body(b"data", "application/octet-stream", "dir/scan.nii.gz", LIMITS)
    assert only.filename == "scan.nii.gz" and only.data == b"data"


# ----------------------------------------------------------------------------------------------- volumes
def test_good_volumes_nii_gz_nii_mha(tmp_path):
    hu = chest()
    for data, name in ((gzip.compress(nifti(hu)), "a.nii.gz"), (nifti(hu, np.int16), "a.nii")):
        volume = decode_volume(upload(data, name), LIMITS)
        assert volume.hu.shape == hu.shape and volume.spacing == pytest.approx((2.0, 0.7, 0.7))
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((0.7, 0.7, 2.0))
    sitk.WriteImage(image, str(tmp_path / "a.mha"), useCompression=True)
    volume = decode_volume(upload((tmp_path / "a.mha").read_bytes(), "a.mha"), LIMITS)
    assert volume.hu.shape == hu.shape


def bomb(shape_xyz, dtype=np.int16, zeros=64 << 20):
    """A gzip member: a NIfTI header declaring `shape_xyz`, then `zeros` bytes of zeros (compresses ~1000:1)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape_xyz)
    header.set_data_dtype(dtype)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(header.binaryblock + b"\x00" * 4)]
    chunk = bytes(1 << 22)
    for _ in range(zeros // len(chunk)):
        parts.append(compressor.compress(chunk))
    return b"".join(parts) + compressor.flush()


def test_header_is_read_without_inflating_the_image():
    from ctplatform.data import read_header

    data = gzip.compress(nifti(chest(), np.int16))
    declared = read_header(data, name="a.nii.gz")
    assert declared.shape == (28, 32, 16) and declared.itemsize == 2 and declared.compressed
    data = bomb((512, 512, 256), zeros=256 << 20)  # inflates to 256 MiB
    started = time.perf_counter()
    declared = read_header(data, name="bomb.nii.gz")
    assert declared.shape == (512, 512, 256) and time.perf_counter() - started < 0.5


def test_gzip_bomb_refused_from_its_header_before_inflating():
    data = bomb((512, 512, 256))  # declares 64 Mi voxels; the limit is 256 Ki
    assert len(data) < 1 << 20
    started = time.perf_counter()
    status, reason = status_of(decode_volume, upload(data, "bomb.nii.gz"), LIMITS)
    assert status == 413 and "voxels" in reason and time.perf_counter() - started < 0.5


def test_decompressed_bytes_cap_separate_from_voxels():
    # 64^3 voxels is allowed, but as float64 they are 4x the 2-byte-per-voxel budget
    data = bomb((64, 64, 64), np.float64, zeros=1 << 22)
    status, reason = status_of(decode_volume, upload(data, "f64.nii.gz"), LIMITS)
    assert status == 413 and "bytes" in reason


def test_header_declaring_terabytes():
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    data = gzip.compress(header.binaryblock + b"\x00" * 4)
    assert status_of(decode_volume, upload(data, "huge.nii.gz"), LIMITS)[0] == 413


@pytest.mark.parametrize("make, status, match", [
    (lambda: gzip.compress(nifti(chest()))[:3000], 422, "truncated|corrupt"),
    (lambda: bomb((8, 8, 4), zeros=1 << 22), 422, "constant"),  # a bomb's tail is never inflated: 256 zero voxels
    (lambda: nifti(chest(), zooms=(np.nan, 0.7, 2.0)), 422, "spacing"),
    (lambda: nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)).to_bytes(), 422, "3 dimensions"),
    (lambda: nib.Nifti1Image(np.zeros((8, 8, 4), np.complex64), np.eye(4)).to_bytes(), 422, "voxel type"),
    (lambda: nifti(np.where(chest() > 0, np.nan, chest())), 422, "NaN"),
    (lambda: b"this is a text file, not a volume\n" * 3, 415, "not a NIfTI"),
    (lambda: b"", 400, "empty"),
    (lambda: (lambda b: (np.save(b, np.zeros((4, 8, 8))), b.getvalue())[1])(io.BytesIO()), 415, "npy"),
], ids=["truncated-gzip", "bomb-tail", "nan-spacing", "2d", "complex-dtype", "nan-values", "text", "empty", "npy"])
def test_bad_volumes(make, status, match):
    got, reason = status_of(decode_volume, upload(make(), "bad.nii.gz"), LIMITS)
    assert got == status and re.search(match, reason), reason


def test_unexpected_reader_failure_is_a_422(monkeypatch):
    import ctplatform.serve.inputs as inputs

    def boom(*args, **kwargs):
        raise IndexError("reader bug")

    monkeypatch.setattr(inputs, "read_volume", boom)
    status, reason = status_of(decode_volume, upload(gzip.compress(nifti(chest())), "a.nii.gz"), LIMITS)
    assert status == 422 and "IndexError" in reason


# ----------------------------------------------------------------------------------------------- .npy slices
def npy(array, **kwargs):
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def test_slices_2d_and_stacks():
    hu = chest()
    slices = decode_slices([Upload("a.npy", npy(hu[3].astype(np.int16))), Upload("s.npy", npy(hu[4:7]))], LIMITS)
    assert [s.name for s in slices] == ["a.npy", "s.npy[0]", "s.npy[1]", "s.npy[2]"]
    assert all(s.hu.dtype == np.float32 and s.hu.shape == hu.shape[1:] for s in slices)
    np.testing.assert_array_equal(slices[2].hu, hu[5])


def test_normalised_values_get_a_note():
    (item,) = decode_slices([Upload("n.npy", npy(np.random.default_rng(0).random((16, 16))))], LIMITS)
    assert "normalised" in item.notes[0]


@pytest.mark.parametrize("data, status, match", [
    (npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True), 422, "pickle"),
    (pickle.dumps(np.zeros((8, 8))), 415, "pickle"),
    (b"hello world, not numpy", 415, "not a .npy"),
    (npy(np.zeros((8, 8), bool)), 422, "dtype"),
    (npy(np.zeros((8, 8), np.complex64)), 422, "dtype"),
    (npy(np.zeros(64)), 422, "2-D"),
    (npy(np.zeros((2, 2, 8, 8))), 422, "2-D"),
    (npy(np.zeros((0, 8))), 422, "empty"),
    (npy(np.full((8, 8), np.nan)), 422, "NaN"),
    (npy(np.zeros((16, 16)))[:-10], 422, "truncated"),
    (npy(np.zeros((4, 4))), 422, "size"),
    (npy(np.zeros((9, 16, 16))), 413, "more than 8"),
    (b"", 400, "empty"),
], ids=["object-pickle", "raw-pickle", "text", "bool", "complex", "1d", "4d", "empty-array", "nan", "truncated",
        "too-small", "too-many", "empty-file"])
def test_bad_slices(data, status, match):
    got, reason = status_of(decode_slices, [Upload("bad.npy", data)], LIMITS)
    assert got == status and re.search(match, reason), reason


def test_npy_never_unpickles(monkeypatch):
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    with pytest.raises(InputError):
        read_npy(npy(np.array([object()], dtype=object), allow_pickle=True), "p.npy", LIMITS)


# ----------------------------------------------------------------------------------------------- thumbnails
def test_png_thumbnail_decodes_to_the_windowed_slice():
    from PIL import Image

    image = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    decoded = np.asarray(Image.open(io.BytesIO(png_gray8(image))))
    np.testing.assert_array_equal(decoded, image)
    url = slice_thumbnail(np.full((256, 256), -600, np.int16), size=64)
    assert url.startswith("data:image/png;base64,")
    import base64

    thumb = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert thumb.size == (64, 64) and np.asarray(thumb).mean() == pytest.approx(127.5, abs=1)  # lung window centre


# ----------------------------------------------------------------------------------------------- bundles, CLI, config
def make_bundle(path, image_size=32):
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.classifier import build_classifier

    model = build_classifier("efficientnet_b0", num_classes=18)
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=image_size, num_slices=4).to_dict())
    return export_bundle(path, model, spec)


def test_default_bundle_is_the_newest_best(tmp_path):
    with pytest.raises(FileNotFoundError, match="--bundle"):
        default_bundle_path(tmp_path / "runs")
    for name, age in (("old", 100), ("new", 0)):
        folder = tmp_path / "runs" / name / "best"
        folder.mkdir(parents=True)
        (folder / "metadata.json").write_text("{}")
        os.utime(folder / "metadata.json", (time.time() - age, time.time() - age))
    assert default_bundle_path(tmp_path / "runs") == tmp_path / "runs" / "new" / "best"


def test_bundle_metadata_and_version(tmp_path):
    from ctplatform.model.bundle import BundleError

    bundle = make_bundle(tmp_path / "b")
    assert read_bundle_metadata(bundle)["preprocess"]["image_size"] == 32
    version = bundle_version(bundle)
    assert version.startswith("sha256:") and version == bundle_version(bundle / "metadata.json")
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["class_names"] = meta["class_names"][::-1]
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="class_names differ"):
        read_bundle_metadata(bundle)
    with pytest.raises(BundleError, match="no such bundle"):
        read_bundle_metadata(tmp_path / "missing")


def test_cli_registers_serve_and_errors_without_a_bundle(tmp_path):
    from ctplatform.cli import main, parse_settings

    args = parse_settings(["serve", "--bundle", "b", "--model-replicas", "1:4", "--num-gpus", "0.5"])
    assert args.model_replicas == (1, 4) and args.num_gpus == 0.5 and args.host == "127.0.0.1" and args.port == 8000
    with pytest.raises(SystemExit):
        parse_settings(["serve", "--model-replicas", "4:1"])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["serve"]) == 2  # no ./runs/*/best: a clear error before Ray starts
    finally:
        os.chdir(cwd)


def test_api_key_from_environment(monkeypatch):
    from ctplatform.cli import parse_settings
    from ctplatform.config.cli_args import to_yaml

    monkeypatch.setenv("CTPLATFORM_API_KEY", "s3cret")
    assert parse_settings(["serve"]).api_key == "s3cret"
    assert parse_settings(["serve", "--api-key", "other"]).api_key == "other"
    assert "s3cret" not in to_yaml(parse_settings(["serve"]))  # --print-config never shows the key
    monkeypatch.delenv("CTPLATFORM_API_KEY")
    assert parse_settings(["serve"]).api_key is None


def test_serve_config_is_valid_and_builds(tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from ctplatform.serve.app import app_builder
    from ctplatform.serve.auth import hash_api_key

    config = yaml.safe_load((ROOT / "platform" / "serve" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app_config,) = config["applications"]
    assert app_config["import_path"] == "ctplatform.serve.app:app_builder"
    assert config["http_options"]["host"] == "127.0.0.1" and config["http_options"]["request_timeout_s"] > 0
    assert app_config["args"]["num_gpus"] > 0
    model_override = next(d for d in app_config["deployments"] if d["name"] == "ModelServer")
    assert model_override["autoscaling_config"]["max_replicas"] > 1 and model_override["max_queued_requests"] > 0
    args = {**app_config["args"], "bundle": str(make_bundle(tmp_path / "b"))}
    monkeypatch.setenv("CTPLATFORM_API_KEY", "k")
    app = app_builder(args)
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    options = ingress.init_args[2]
    assert options.api_key_sha256 == hash_api_key("k") and options.limits.max_voxels == 1024 * 1024 * 400
    model = ingress.init_args[0]._bound_deployment
    assert model.name == "ModelServer" and model.ray_actor_options["num_gpus"] == 0.5
    assert "num_replicas" not in model._deployment_config.user_configured_option_names  # the config's autoscaling
    assert {d["name"] for d in app_config["deployments"]} == {model.name, ingress.name}  # the overrides find them
    # a hash in the file is the key: the environment's key is not applied as well
    app = app_builder({**args, "api_key_sha256": hash_api_key("file-key").upper()})
    assert app._bound_deployment.init_args[2].api_key_sha256 == hash_api_key("file-key")
    with pytest.raises(ValueError, match="unknown serve configuration keys: limits"):
        app_builder({**args, "limits": {"max_voxels": 1}})


def test_build_app_settings(tmp_path):
    from ctplatform.config.serve import ServeConfig
    from ctplatform.serve.app import build_app

    bundle = str(make_bundle(tmp_path / "b"))
    app = build_app(ServeConfig(bundle=bundle, api_key="correct-horse-battery", num_gpus=0.25, model_replicas=(1, 3),
                                max_queued=5, max_body_mb=8, no_batching=True, batch_wait_ms=20))
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert model.ray_actor_options["num_gpus"] == 0.25
    assert model._deployment_config.autoscaling_config.max_replicas == 3
    assert ingress._deployment_config.max_queued_requests == 5 and ingress.num_replicas == 1
    assert "correct-horse-battery" not in repr(ingress.init_args)  # only the key's hash is in the deployment config
    assert ingress.init_args[2].limits.max_body_bytes == 8 << 20
    assert model.init_kwargs["batching"] is False and model.init_kwargs["batch_wait_timeout_s"] == 0.02
    with pytest.raises(ValueError, match="empty API key"):
        build_app(ServeConfig(bundle=bundle, api_key=" "))
    with pytest.raises(ValueError, match="1 <= min <= max"):
        build_app(ServeConfig(bundle=bundle, api_key=None, ingress_replicas=(3, 1)))


def test_serve_flags_are_generated_from_serve_config(monkeypatch):
    """One flag per ServeConfig field meant for the command line, named after it, and nothing else."""
    import argparse
    import dataclasses

    from ctplatform.cli import build_parser
    from ctplatform.config.serve import ServeConfig
    from ctplatform.serve.inputs import ServeLimits

    monkeypatch.delenv("CTPLATFORM_API_KEY", raising=False)
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {a.dest: a for a in subparsers.choices["serve"]._actions
             if a.dest not in ("help", "config", "print_config")}
    fields = {f.name: f for f in dataclasses.fields(ServeConfig) if f.metadata["cli"]}
    assert set(flags) == set(fields)
    for name, action in flags.items():
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert fields[name].metadata["help"] in action.help, name
    assert ServeLimits.from_config(ServeConfig()) == ServeLimits()  # the same limits whichever way the service starts
    monkeypatch.setenv("CTPLATFORM_API_KEY", "s3cret")
    config = ServeConfig()
    assert config.api_key == "s3cret" and "s3cret" not in repr(config)


def test_serve_command_builds_its_config_from_the_flags(monkeypatch):
    from ctplatform.cli import parse_settings

    monkeypatch.setenv("CTPLATFORM_API_KEY", "")  # set but empty: no key, as an empty --api-key
    config = parse_settings(["serve", "--bundle", "b", "--model-replicas", "1:4", "--no-batching",
                             "--max-body-mb", "8", "--max-ongoing", "3"])
    assert config.bundle == "b" and config.model_replicas == (1, 4) and config.no_batching
    assert config.max_body_mb == 8 and config.max_ongoing == 3 and config.api_key is None
    assert config.host == "127.0.0.1" and config.validate() is config


def test_serve_imports_no_training_tuning_or_lightning():
    code = ("import sys, ctplatform.serve.app, ctplatform.serve.cli, ctplatform.serve.inputs; "
            "bad = [m for m in sys.modules if m.startswith(('ctplatform.train', 'ctplatform.tune', 'ray.tune', "
            "'lightning', 'pytorch_lightning'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    code = ("import sys, ctplatform.serve.inputs, ctplatform.serve.thumbnails, ctplatform.serve.preprocessing, "
            "ctplatform.serve.responses, ctplatform.serve.page, ctplatform.config.serve; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def _bare_ingress(model, image_size=64):
    """The ingress class without Serve around it (its helpers are plain async methods)."""
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.serve.ingress import Ingress, IngressOptions

    cls = Ingress.func_or_class.__mro__[1]  # the class under @serve.ingress's wrapper
    ingress = cls.__new__(cls)
    cls.__init__(ingress, model, PreprocessSettings(image_size=image_size, num_slices=8).to_dict(), IngressOptions())
    return ingress


class _FakeModel:
    """A model handle whose replica prepares slices at `size` px (as one of the other version would, mid-rollout)."""

    def __init__(self, size):
        from ctplatform.data.preprocess import PreprocessSettings

        self.size, self.calls = size, []
        self.settings = PreprocessSettings(image_size=size, num_slices=8).to_dict()
        self.predict_volume = self

    def remote(self, *args):
        self.calls.append(args[-1]["image_size"])

        async def reply():
            if args[-1]["image_size"] != self.size:
                return {"status": "preprocess_mismatch", "preprocess": self.settings}
            return {"status": "ok", "model_version": "v"}

        return reply()


def test_ingress_prepares_again_for_a_model_replica_of_another_version():
    from fastapi import HTTPException

    model = _FakeModel(size=48)
    ingress = _bare_ingress(model)
    prepared = []
    reply, out = asyncio.run(ingress._model_call_with_settings(
        "predict_volume", lambda s: (prepared.append(s.image_size), s.image_size)))
    assert reply["status"] == "ok" and out[1] == 48
    assert model.calls == [64, 48] and prepared == [64, 48] and ingress.settings.image_size == 48
    assert ingress.responses["preprocess_retries"] == 1

    class Flapping(_FakeModel):  # always answers with the other size: give up with a 503, never loop
        def remote(self, *args):
            self.size = 64 if args[-1]["image_size"] == 48 else 48
            return super().remote(*args)

    ingress = _bare_ingress(Flapping(size=48))
    with pytest.raises(HTTPException) as info:
        asyncio.run(ingress._model_call_with_settings("predict_volume", lambda s: (s.image_size,)))
    assert info.value.status_code == 503


def test_ingress_error_mapping_and_deadline():
    from fastapi import HTTPException

    ingress = _bare_ingress(_FakeModel(size=64))

    async def refuse():
        raise InputError(415, "not a volume")

    async def crash():
        raise KeyError("bug")

    async def slow():
        await asyncio.sleep(5)

    object.__setattr__(ingress.options, "request_timeout_s", 0.2)
    for work, status in ((refuse, 415), (crash, 500), (slow, 504)):
        with pytest.raises(HTTPException) as info:
            asyncio.run(ingress._guard(work()))
        assert info.value.status_code == status and info.value.detail
    assert ingress.responses == {"415": 1, "500": 1, "504": 1}
