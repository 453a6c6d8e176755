"""DICOM wherever a volume is read: `prepare --data-dir` on series folders and zips, `predict` on a folder and its
zip (the same probabilities as the NIfTI of the same volume), the service's upload checks; bad input gets one clear
error naming the file, and no patient identifier reaches any message or output."""

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_series import PATIENT, write_scout, write_series
from pydicom.uid import RLELossless, generate_uid

from ctplatform.data import read_raw_volume
from ctplatform.data.errors import DataFormatError
from ctplatform.data.prepare import discover_tasks, run_prepare
from ctplatform.data.preprocess import PreprocessSettings, preprocess_raw_volume
from ctplatform.data.synthetic.anatomy import synthesize_scan
from ctplatform.labels import CLASS_NAMES, NUM_CLASSES

SPACING = (2.0, 0.75, 0.75)
SECRETS = [*PATIENT.values(), "Zyxwvut", "Qwertyuiop"]


def chest(seed: int, labels=None) -> np.ndarray:
    scan, _ = synthesize_scan(seed, seed, 0, (48, 40, 16), labels or [seed % 2] * NUM_CLASSES)
    return np.round(scan.transpose(2, 0, 1)).astype(np.float32)


def write_nifti(path: Path, hu: np.ndarray) -> Path:
    """The same volume as the series write_series makes: LPS rows/cols are RAS's reversed."""
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.int16), np.diag([-0.75, -0.75, 2.0, 1.0])), path)
    return path


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())
    return out


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret.lower() not in text.lower()


def labels_csv(path: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.integers(0, 2, (len(names), NUM_CLASSES)), columns=list(CLASS_NAMES))
    frame.insert(0, "VolumeName", names)
    frame.to_csv(path, index=False)


@pytest.mark.timeout(240)
def test_prepare_takes_series_folders_and_zips_keyed_by_their_names(tmp_path):
    dicom_dir, nifti_dir = tmp_path / "dicom", tmp_path / "nifti"
    (dicom_dir / "exports").mkdir(parents=True)
    nifti_dir.mkdir()
    names = []
    for k in range(4):
        hu = chest(k + 1)
        series = dicom_dir / f"case{k}" if k != 2 else dicom_dir / "site_a" / "patient_7" / "case2"  # anywhere
        write_series(series, hu, spacing=SPACING, compress=RLELossless if k == 1 else None, seed=k)
        if k % 2:
            zip_folder(series, dicom_dir / ("exports" if k == 3 else "") / f"case{k}.zip")
            for path in series.iterdir():
                path.unlink()
            series.rmdir()
            names.append(f"case{k}.zip")
        else:
            names.append(f"case{k}")
        write_nifti(nifti_dir / f"case{k}.nii.gz", hu)
    write_series(dicom_dir / "mr_case", chest(9), modality="MR")
    labels_csv(dicom_dir / "multi_abnormality_labels.csv", [*names, "mr_case"])
    labels_csv(nifti_dir / "multi_abnormality_labels.csv", [f"case{k}.nii.gz" for k in range(4)])
    settings = PreprocessSettings(image_size=32, num_slices=8)
    summary = run_prepare(dicom_dir, tmp_path / "cache_dicom", settings, executor="local", progress=False)
    run_prepare(nifti_dir, tmp_path / "cache_nifti", settings, executor="local", progress=False)
    assert summary["cached"] == 4 and summary["failed"] == 1
    failures = pd.read_csv(tmp_path / "cache_dicom" / "failures.csv")
    assert failures["VolumeName"].tolist() == ["mr_case"]
    records = {r["stem"]: r for r in pd.read_parquet(tmp_path / "cache_dicom" / "index.parquet").to_dict("records")}
    assert set(records) == {"case0", "case1", "case2", "case3"}
    assert "mr_case: modality MR: only CT series are read" in failures["reason"][0]
    index = pd.read_parquet(tmp_path / "cache_dicom" / "index.parquet")
    reference = pd.read_parquet(tmp_path / "cache_nifti" / "index.parquet").set_index("stem")
    assert sorted(index["stem"]) == [f"case{k}" for k in range(4)]
    for row in index.to_dict("records"):
        other = reference.loc[row["stem"]]
        np.testing.assert_array_equal(np.load(tmp_path / "cache_dicom" / row["file"]),
                                      np.load(tmp_path / "cache_nifti" / other["file"]))
        assert row["spacing_z"] == other["spacing_z"] == 2.0 and row["hu_source"] == "header"
    for path in (tmp_path / "cache_dicom").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".csv", ".parquet"):
            assert_no_secret(path.read_bytes().decode("latin-1"))
    shutil.copytree(dicom_dir / "site_a" / "patient_7" / "case2", dicom_dir / "exports" / "case2")  # two places
    with pytest.raises(DataFormatError, match=r"'case2' matches 2 paths \(exports/case2, site_a/patient_7/case2\)"):
        discover_tasks(dicom_dir)


def make_bundle(path: Path) -> Path:
    import torch

    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier("resnet50").eval()
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=32, num_slices=4).to_dict(), aggregation="mean")
    return export_bundle(path, model, spec)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ctplatform.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.timeout(300)
def test_predict_on_a_folder_its_zip_and_the_nifti_gives_identical_probabilities(tmp_path):
    hu = chest(3)
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "series_dir"
    write_series(folder, hu, spacing=SPACING, study_uid=study, series_uid=series)
    write_scout(folder, study_uid=study, series_uid=series)  # a note in the JSON output
    archive = zip_folder(folder, tmp_path / "series_zip.zip")
    nifti = write_nifti(tmp_path / "series_nii.nii.gz", hu)
    make_bundle(tmp_path / "bundle")
    out = run_cli("predict", "--checkpoint", tmp_path / "bundle", "--predict-type", "volumes", "--predict-input",
                  folder, archive, nifti, "--output", tmp_path / "pred.csv")
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "pred.csv")
    assert table["VolumeName"].tolist() == ["series_dir", "series_zip", "series_nii"]
    probabilities = table[list(CLASS_NAMES)].to_numpy()
    np.testing.assert_array_equal(probabilities[0], probabilities[1])
    np.testing.assert_array_equal(probabilities[0], probabilities[2])
    records = json.loads((tmp_path / "pred.json").read_text())
    assert any("localizer" in note for note in records[0]["notes"])
    assert_no_secret(out.stdout + out.stderr + (tmp_path / "pred.json").read_text())
    # bad input: one line naming the file, exit 2, nothing identifying
    paths = sorted(folder.glob("*.dcm"))
    paths[2].write_bytes(paths[2].read_bytes()[:-700])
    out = run_cli("predict", "--checkpoint", tmp_path / "bundle", "--predict-type", "volumes", "--predict-input",
                  folder)
    assert out.returncode == 2
    message = out.stderr.strip()
    assert "\n" not in message and message.startswith("ctplatform predict: error: corrupt file: ")
    assert f"{folder}/{paths[2].name}: unreadable pixel data" in message
    assert_no_secret(out.stdout + out.stderr)


@pytest.mark.timeout(120)
def test_service_upload_of_a_series_zip_and_its_refusals(tmp_path):
    from ctplatform.serve.inputs import InputError, ServeLimits, Upload, decode_volume

    hu = chest(2)
    write_series(tmp_path / "s", hu, spacing=SPACING)
    data = zip_folder(tmp_path / "s", tmp_path / "s.zip").read_bytes()
    volume = decode_volume(Upload("scan.zip", data), ServeLimits())
    nifti = read_raw_volume(write_nifti(tmp_path / "s.nii.gz", hu))
    assert volume.shape == nifti.shape and volume.spacing == pytest.approx(nifti.spacing)
    settings = PreprocessSettings(image_size=32, num_slices=4)
    for got, want in zip(volume.prepare(settings), preprocess_raw_volume(nifti, settings), strict=True):
        np.testing.assert_array_equal(got, want)  # the slices and positions the model gets
    with pytest.raises(InputError) as error:
        decode_volume(Upload("scan.zip", data), ServeLimits(max_series_files=10))
    assert error.value.status == 413 and "holds 16 files, above the limit of 10" in error.value.reason
    with pytest.raises(InputError) as error:
        decode_volume(Upload("scan.zip", data), ServeLimits(max_decompressed_bytes=20_000))
    assert error.value.status == 413 and "uncompressed bytes" in error.value.reason
    write_series(tmp_path / "mr", hu, modality="MR")
    mr = zip_folder(tmp_path / "mr", tmp_path / "mr.zip").read_bytes()
    with pytest.raises(InputError) as error:
        decode_volume(Upload("mr.zip", mr), ServeLimits())
    assert error.value.status == 422 and error.value.reason.startswith("mr.zip: modality MR")
    assert_no_secret(error.value.reason)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as out:
        out.writestr("../../etc/x.dcm", b"x")
    with pytest.raises(InputError) as error:
        decode_volume(Upload("evil.zip", evil.read_bytes()), ServeLimits())
    assert error.value.status == 415 and "points outside the archive" in error.value.reason


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input, and what its one-line error says (after the name)."""
    hu = chest(5)
    cases: dict[str, tuple[Path, str]] = {}
    write_series(root / "one_slice", hu[:1])
    cases["one-slice"] = (root / "one_slice", "unusable content: .*one_slice: the series has one slice")
    write_series(root / "mr", hu, modality="MR")
    cases["mr"] = (root / "mr", "unusable content: .*mr: modality MR: only CT series are read")
    paths = write_series(root / "no_pixels", hu)
    ds = pydicom.dcmread(paths[4])
    del ds.PixelData
    ds.save_as(paths[4])
    cases["no-pixels"] = (root / "no_pixels", rf"corrupt file: .*{paths[4].name}: a CT image without pixel data")
    paths = write_series(root / "truncated", hu)
    paths[0].write_bytes(paths[0].read_bytes()[:200])
    cases["truncated"] = (root / "truncated", rf"corrupt file: .*{paths[0].name}: .*truncated")
    with zipfile.ZipFile(root / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as out:
        for k in range(2):
            out.writestr(f"{k}.dcm", b"\0" * 1000)
    # what a bomb's directory declares: 2 x 4 GiB uncompressed (the central directory's size field, offset 24)
    data = bytearray((root / "bomb.zip").read_bytes())
    for start in [m.start() for m in re.finditer(b"PK\x01\x02", data)]:
        data[start + 24:start + 28] = (0xFFFFFFFE).to_bytes(4, "little")
    (root / "bomb.zip").write_bytes(bytes(data))
    cases["zip-bomb"] = (root / "bomb.zip", r"too large: .*bomb.zip: the archive declares 8,589,934,588 uncompressed")
    with zipfile.ZipFile(root / "traversal.zip", "w") as out:
        out.writestr("../../evil.dcm", b"x")
    cases["traversal"] = (root / "traversal.zip", "unsupported format: .*traversal.zip: member '../../evil.dcm' points")
    return cases


@pytest.mark.timeout(300)
def test_predict_refuses_each_bad_series_in_one_line_naming_it(tmp_path, bundle, capsys):
    from ctplatform.cli import main

    for case, (path, expected) in bad_inputs(tmp_path).items():
        status = main(["predict", "--checkpoint", str(bundle), "--predict-type", "volumes", "--predict-input",
                       str(path)])
        captured = capsys.readouterr()
        message = captured.err.strip()
        assert status == 2, (case, captured)
        assert "\n" not in message and message.startswith("ctplatform predict: error: "), (case, message)
        assert str(path) in message and re.search(expected, message), (case, message)
        assert_no_secret(captured.out + captured.err)
