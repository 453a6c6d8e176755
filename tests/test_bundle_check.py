"""A bundle is checked before anything deploys it: every way of tampering with one is refused with one line that
names the file and the problem, in about a second, and `ctplatform serve` stops on it before Ray starts."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.model.bundle import BundleError, ModelSpec, export_bundle, load_bundle
from ctplatform.model.bundle_check import check_bundle
from ctplatform.model.calibration import Calibration
from ctplatform.model.classifier import build_classifier


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_classifier("efficientnet_b0", use_attention="se")
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=32, num_slices=4).to_dict(), aggregation="topk", topk=2,
                     calibration=Calibration(np.full(18, 1.2), np.zeros(18), "test"))
    return export_bundle(tmp_path_factory.mktemp("bundle") / "good", model.eval(), spec)


def tampered(good: Path, where: Path, change) -> Path:
    copy = where / "bundle"
    shutil.copytree(good, copy)
    change(copy)
    return copy


def edit_metadata(edit):
    def change(folder: Path) -> None:
        metadata = json.loads((folder / "metadata.json").read_text())
        edit(metadata)
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return change


def reshape_one_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in sorted(tensors) if k.endswith("weight") and tensors[k].ndim == 4)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, folder / "model.safetensors")


def drop_one_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, folder / "model.safetensors")


def corrupt_header(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"{" * 32  # the JSON header after its 8-byte length
    (folder / "model.safetensors").write_bytes(bytes(data))


def truncate_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def swap_two_classes(m):
    m["class_names"][0], m["class_names"][1] = m["class_names"][1], m["class_names"][0]


TAMPERINGS = {
    "corrupt safetensors header": (corrupt_header, "model.safetensors", "unreadable weights"),
    "truncated weights": (truncate_weights, "model.safetensors", "unreadable weights"),
    "a tensor of another shape": (reshape_one_tensor, "model.safetensors", "has shape"),
    "a missing tensor": (drop_one_tensor, "model.safetensors", "1 missing"),
    "class list reordered": (edit_metadata(swap_two_classes), "metadata.json", "class_names differ"),
    "class list short": (edit_metadata(lambda m: m["class_names"].pop()), "metadata.json", "class_names differ"),
    "missing key": (edit_metadata(lambda m: m.pop("aggregation")), "metadata.json", "'aggregation' is a required"),
    "another architecture": (edit_metadata(lambda m: m["architecture"].update(model="resnet50")), "model.safetensors",
                             "do not fit the architecture"),
    "unknown architecture": (edit_metadata(lambda m: m["architecture"].update(model="alexnet")), "metadata.json",
                             "architecture cannot be built"),
    "wrong type": (edit_metadata(lambda m: m["aggregation"].update(topk="3")), "metadata.json", "$.aggregation.topk"),
    "calibration of 17 classes": (edit_metadata(lambda m: m["calibration"]["slope"].pop()), "metadata.json",
                                  "$.calibration"),
    "a newer format": (edit_metadata(lambda m: m.update(format_version=2)), "metadata.json", "newer than"),
    "not JSON": (lambda f: (f / "metadata.json").write_text("{'format': "), "metadata.json", "unreadable JSON"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "bundle", "no model.safetensors"),
}


def test_good_bundles_pass_and_say_what_they_hold(good_bundle, tmp_path):
    summary = check_bundle(good_bundle)
    assert (summary.model, summary.head, summary.calibrated) == ("efficientnet_b0", "slice", True)
    state = build_classifier("efficientnet_b0", use_attention="se").state_dict()
    assert summary.tensors == len(state) and summary.parameters == sum(t.numel() for t in state.values())
    assert check_bundle(good_bundle / "metadata.json") == summary
    from compat_bundles import build_bundle  # bundles written by the previous release still pass

    for name in ("slice", "mil"):
        assert check_bundle(build_bundle(name, tmp_path)).head == {"slice": "slice", "mil": "attention-mil"}[name]


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_a_tampered_bundle_is_refused_with_one_line_naming_the_file(good_bundle, tmp_path, case):
    change, file_named, reason = TAMPERINGS[case]
    bundle = tampered(good_bundle, tmp_path, change)
    started = time.perf_counter()
    with pytest.raises(BundleError) as refused:
        check_bundle(bundle)
    assert time.perf_counter() - started < 10
    message = str(refused.value)
    assert "\n" not in message and reason in message, message
    assert message.startswith(str(bundle / file_named) if file_named != "bundle" else str(bundle)), message
    with pytest.raises(BundleError):  # loading goes through the same check
        load_bundle(bundle)


@pytest.mark.timeout(120)
def test_serve_with_a_tampered_bundle_exits_2_before_ray_starts(good_bundle, tmp_path):
    bundle = tampered(good_bundle, tmp_path, edit_metadata(swap_two_classes))
    exe = Path(sys.executable).with_name("ctplatform")
    started = time.perf_counter()
    out = subprocess.run([str(exe), "serve", "--bundle", str(bundle), "--port", "18765"], capture_output=True,
                         text=True, timeout=60)
    elapsed = time.perf_counter() - started
    print(f"serve with a tampered bundle: exit {out.returncode} after {elapsed:.1f} s")
    assert out.returncode == 2 and elapsed < 30
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "class_names differ" in lines[0] and str(bundle) in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "Ray" not in out.stdout + out.stderr  # nothing was started


def test_an_oversized_metadata_file_is_refused_before_it_is_parsed(good_bundle, tmp_path):
    bundle = tampered(good_bundle, tmp_path, lambda f: (f / "metadata.json").write_text(
        json.dumps({"format": "ctplatform-bundle", "pad": "x" * (2 << 20)})))
    with pytest.raises(BundleError, match="more than a bundle's metadata can be"):
        check_bundle(bundle)


def test_bundle_check_command(good_bundle, tmp_path):
    exe = Path(sys.executable).with_name("ctplatform")
    good = subprocess.run([str(exe), "bundle", "check", str(good_bundle)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and good.stdout.startswith(f"{good_bundle.resolve()}: ok: efficientnet_b0"), good
    bad_bundle = tampered(good_bundle, tmp_path, truncate_weights)
    bad = subprocess.run([str(exe), "bundle", "check", str(bad_bundle)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "", bad
    assert bad.stderr.count("\n") == 1 and f"{bad_bundle / 'model.safetensors'}: unreadable weights" in bad.stderr
