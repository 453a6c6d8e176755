"""RSS growth of the service's processes per volume request, at its DEFAULT caps, for the largest payload of each
format those caps accept: a `.nii.gz` and an `.mha` of 1024 x 1024 x 400 float32 voxels (1.6 GiB decompressed,
under the 2 GiB `--max-decompressed-mb`; 400 Mi voxels, the `--max-voxels` cap) and a `.zip` of a DICOM series of
1024 x 1024 int16 slices, as many as fit the 96 MiB `--max-body-mb` (~135; 400 by URI, which has no body cap).

Starts an embedded Ray and, for each payload, a fresh Serve application (a random-weight efficientnet_b0 bundle
at 224 px, 32 slices), warms it with a small volume, then sends the payload once (multipart, as a client does)
while sampling the RSS of the Serve proxy, the ingress replica and the model replica every 10 ms (psutil): the
table gives each one's RSS before, its peak growth during the request, the peak growth of its private part (RSS
less shared pages) and its growth after, and `serve peak +MiB`, the proxy's and the ingress's peak RSS growth
summed (the two processes an upload passes through). Serve passes the request's messages from the proxy to the
ingress through Ray's object store, a shared-memory region of the node: the pages of it a process touches count in
its RSS (as shared pages) but are the node's object store memory, bounded by Ray's `object_store_memory` and
reused by the next request, not the process's heap.

A body above the spool threshold (4 MiB) is written to a temporary file as it arrives and the readers take the
file, so what the ingress holds of the upload itself is Serve's copy of the request: Serve's replica fetches the
request's messages from the proxy as fast as they come and queues them, however fast the handler reads, and the
proxy holds what it has not yet handed over. That copy grows with the body, which is why the body cap is what it
is. Two figures separate it from the service's own share: `noise`, an upload of incompressible bytes the size of the
body cap that is received, spooled and parsed in full and then refused (415, not a volume), so its growth is the
transport's and the reading's, no decode; and, for each payload, the peak that the ingress's own reading
(`read_body` with its spool, the multipart parse, the decode estimate) holds, traced in this process with
tracemalloc.

`--by-uri` also sends each payload as the URI of an object on a moto S3 server on 127.0.0.1 (`POST
/v1/predict/object`): the ingress streams the object into its spool itself, so Serve holds no copy of it.

Payloads are written plane by plane (never a whole volume in this process): smooth anatomy, so the 1.6 GiB volumes
fit the body cap gzipped; the DICOM slices carry a fixed noise pattern of a few HU, as real CT does (a zip of
noiseless slices would expand beyond the 100x a series zip may).

    .venv/bin/python benchmarks/serve_memory.py                 # the default caps' largest payloads (minutes)
    .venv/bin/python benchmarks/serve_memory.py --shape 256 256 64   # a quick look
    .venv/bin/python benchmarks/serve_memory.py --by-uri --formats zip   # the zip uploaded and read by URI
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import moto_server, print_table, save
from serve_load import free_port, make_bundle

MiB = 1 << 20
SPACING = (0.7, 0.7, 1.0)  # (x, y, z) mm


def planes(shape, dtype, noise_hu=0, seed=0):
    """(rows, cols) planes of a chest-like volume, z = 0 first: body and lungs in the middle 80 % of the slices, with
    a fixed pattern of integer noise of +-`noise_hu`."""
    slices, rows, cols = shape
    y, x = np.ogrid[:rows, :cols]
    body = ((y - rows / 2) / (rows * 0.42)) ** 2 + ((x - cols / 2) / (cols * 0.45)) ** 2 < 1
    lungs = body & (np.abs(x - cols / 2) > cols * 0.05) & (np.abs(y - rows / 2) < rows * 0.22)
    chest = np.where(lungs, -850.0, np.where(body, 40.0, -1000.0))
    rng = np.random.default_rng(seed)
    noise = [rng.integers(-noise_hu, noise_hu + 1, (rows, cols)).astype(np.float64) for _ in range(4)]
    air = np.full((rows, cols), -1000.0)
    for k in range(slices):
        inside = 0.1 * slices <= k < 0.9 * slices
        yield ((chest if inside else air) + noise[k % 4]).astype(dtype)


def write_nifti_gz(path: Path, shape, dtype) -> Path:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((shape[2], shape[1], shape[0]))
    header.set_data_dtype(dtype)
    header.set_zooms(SPACING)
    header.set_qform(np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0]), code=1)
    header.set_sform(np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0]), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(header.binaryblock + b"\0" * 4)
        for plane in planes(shape, dtype):
            out.write(plane.tobytes())  # (rows, cols) C order: x fastest, as NIfTI stores a z plane
    return path


def write_mha(path: Path, shape, dtype) -> Path:
    element = {np.dtype(np.float32): "MET_FLOAT", np.dtype(np.int16): "MET_SHORT"}[np.dtype(dtype)]
    compressor = zlib.compressobj(1)
    data = path.with_suffix(".data")
    with open(data, "wb") as out:
        for plane in planes(shape, dtype):
            out.write(compressor.compress(plane.tobytes()))
        out.write(compressor.flush())
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = True\nCompressedDataSize = {data.stat().st_size}\n"
              f"TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = {SPACING[0]} {SPACING[1]} "
              f"{SPACING[2]}\nDimSize = {shape[2]} {shape[1]} {shape[0]}\nElementType = {element}\n"
              f"ElementDataFile = LOCAL\n").encode()
    with open(path, "wb") as out, open(data, "rb") as body:
        out.write(header)
        while chunk := body.read(64 * MiB):
            out.write(chunk)
    data.unlink()
    return path


def write_dicom_zip(path: Path, shape, max_bytes: int | None = None) -> Path:
    """A zip of `shape[0]` slices, or of as many as fit `max_bytes` (a slice's deflated size measured on a 10-slice
    zip, 8 of them chest; the air slices at either end are smaller)."""
    if max_bytes is not None:
        each = _dicom_zip(path, (10, *shape[1:]), uid="1.2.3").stat().st_size / 10
        shape = (min(shape[0], int(0.97 * max_bytes / each)), *shape[1:])
    return _dicom_zip(path, shape)


def _dicom_zip(path: Path, shape, uid: str | None = None) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    series, study = uid or generate_uid(), uid or generate_uid()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for k, plane in enumerate(planes(shape, np.float64, noise_hu=6)):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImagePositionPatient = [0.0, 0.0, k * SPACING[2]]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [SPACING[1], SPACING[0]]
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            ds.set_pixel_data((plane + 1024).astype(np.int16), "MONOCHROME2", 16)
            member = io.BytesIO()
            ds.save_as(member, enforce_file_format=True)
            archive.writestr(f"IM{k:05d}.dcm", member.getvalue())
    return path


def write_noise(path: Path, size_mib: int) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "wb") as out:
        for start in range(0, size_mib, 16):
            out.write(rng.bytes(min(16, size_mib - start) * MiB))
    return path


def own_read_peak(path: Path) -> float:
    """MiB the ingress's own reading of `path` sent as a multipart body holds at its peak (tracemalloc): the body
    read and spooled as Serve hands it over (64 KiB messages), its file part found, the decode estimated."""
    import asyncio
    import tracemalloc

    from ctplatform.data.decode_memory import decode_estimate
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.serve.body import Spool, read_body
    from ctplatform.serve.inputs import ServeLimits, single_upload, uploads_from_body

    limits = ServeLimits()
    head = (f'--B\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    async def messages():
        yield head
        with open(path, "rb") as source:
            while chunk := source.read(64 << 10):
                yield chunk
        yield b"\r\n--B--\r\n"

    spool = Spool(limits)
    tracemalloc.start()
    try:
        with asyncio.run(read_body(messages(), limits, spool=spool)) as body:
            upload = single_upload(uploads_from_body(body.content, "multipart/form-data; boundary=B", None, limits))
            decode_estimate(upload.content, upload.filename, PreprocessSettings(), limits.read_limits)
        return tracemalloc.get_traced_memory()[1] / MiB
    finally:
        tracemalloc.stop()
        spool.remove()


def serve_processes() -> dict[str, psutil.Process]:
    """The Serve proxy and the two replicas of this machine's embedded Ray, by their process titles."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        for role, marker in (("proxy", "ProxyActor"), ("ingress", ":Ingress"), ("model", ":ModelServer")):
            if marker in title and title.startswith("ray::"):
                found[role] = process
    return found


@contextlib.contextmanager
def object_store(paths: dict[str, Path]):
    """The payloads on a moto S3 server under s3://payloads/incoming/ (`--by-uri`); yields the environment that
    reaches it (set in this process too; the Ray workers get it through their runtime_env)."""
    from ctplatform import storage

    with moto_server() as env:
        os.environ.update(env)
        storage.filesystem("s3://payloads")[0].mkdir("payloads")
        for path in paths.values():
            storage.upload(path, f"s3://payloads/incoming/{path.name}")
        yield env


def measure(client: httpx.Client, processes: dict[str, psutil.Process], name: str, data: bytes | None) -> dict:
    """One request's memory growth per process: `data` uploaded, or (None) the object `name` read by URI. Per
    process: RSS, and its private part (RSS less the shared pages: the latter are mostly Ray's object store, a
    node-wide shared-memory region where Serve passes the request's messages between processes)."""

    def sizes(p: psutil.Process) -> tuple[int, int]:
        info = p.memory_info()
        return info.rss, info.rss - info.shared

    before = {role: sizes(p) for role, p in processes.items()}
    peak = dict(before)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for role, p in processes.items():
                peak[role] = tuple(map(max, peak[role], sizes(p)))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    if data is None:
        response = client.post("/v1/predict/object", json={"uri": f"s3://payloads/incoming/{name}"})
    else:
        response = client.post("/v1/predict/volume", files={"file": (name, data)})
    took = time.perf_counter() - started
    done.set()
    sampler.join()
    time.sleep(1.0)
    row = {"payload": name, "via": "URI" if data is None else "upload", "status": response.status_code, "s": took}
    for role, p in processes.items():
        row[f"{role} RSS MiB"] = before[role][0] / MiB
        row[f"{role} peak +MiB"] = (peak[role][0] - before[role][0]) / MiB
        row[f"{role} private peak +MiB"] = (peak[role][1] - before[role][1]) / MiB
        row[f"{role} after +MiB"] = (p.memory_info().rss - before[role][0]) / MiB
    if response.status_code != 200:
        row["reason"] = response.text[:120]
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(400, 1024, 1024), metavar=("SLICES", "ROWS", "COLS"))
    parser.add_argument("--formats", nargs="+", default=["nii.gz", "mha", "zip", "noise"],
                        choices=["nii.gz", "mha", "zip", "noise"])
    parser.add_argument("--noise-mib", type=int, default=None, help="size of the `noise` upload (default: the body "
                                                                    "cap less 1 MiB)")
    parser.add_argument("--by-uri", action="store_true", help="also send each payload as an object URI "
                        "(POST /v1/predict/object, the payloads on a moto S3 server on 127.0.0.1)")
    parser.add_argument("--json", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    from ctplatform.config.serve import ServeConfig
    from ctplatform.serve.app import build_app

    shape = tuple(args.shape)
    body_cap = ServeConfig.max_body_mb * MiB  # the default cap: the zip is written to fit it, less a MiB of framing
    noise_mib = args.noise_mib or int(ServeConfig.max_body_mb) - 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        print(f"writing payloads of {shape} voxels ...", flush=True)
        payloads = {"nii.gz": lambda: write_nifti_gz(tmp / "v.nii.gz", shape, np.float32),
                    "mha": lambda: write_mha(tmp / "v.mha", shape, np.float32),
                    "zip": lambda: write_dicom_zip(tmp / "s.zip", shape, None if args.by_uri else body_cap - MiB),
                    "noise": lambda: write_noise(tmp / "noise.bin", noise_mib)}
        paths = {fmt: payloads[fmt]() for fmt in args.formats}
        print({fmt: f"{path.stat().st_size / MiB:.1f} MiB" for fmt, path in paths.items()}, flush=True)
        own = {fmt: own_read_peak(path) for fmt, path in paths.items()}
        warm = write_nifti_gz(tmp / "warm.nii.gz", (48, 128, 128), np.int16).read_bytes()
        bundle = make_bundle(tmp / "bundle", "efficientnet_b0", 224, 32)
        port = free_port()
        env = stack.enter_context(object_store(paths)) if args.by_uri else {}
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env} if env else None)
        config = ServeConfig(bundle=str(bundle), api_key=None, port=port,
                             object_prefixes=["s3://payloads/incoming"] if env else [])
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                for fmt, path in paths.items():
                    for via in ("upload", "URI") if env else ("upload",):
                        # a fresh application per request measured: what an earlier request left in the allocator's
                        # arenas would otherwise hide part of this one's growth
                        serve.run(build_app(config), name="memory", route_prefix="/")
                        processes = serve_processes()
                        for _ in range(2):  # imports, torch's first forward, the allocator's first arenas
                            response = client.post("/v1/predict/volume", files={"file": ("warm.nii.gz", warm)})
                            assert response.status_code == 200
                        rows.append(measure(client, processes, path.name,
                                            path.read_bytes() if via == "upload" else None))
                        rows[-1]["MiB"] = path.stat().st_size / MiB
                        rows[-1]["serve peak +MiB"] = rows[-1]["ingress peak +MiB"] + rows[-1]["proxy peak +MiB"]
                        rows[-1]["own read peak MiB"] = own[fmt]
                        print(rows[-1], flush=True)
                        serve.delete("memory")
        finally:
            serve.shutdown()
            ray.shutdown()
    load = os.getloadavg()
    print_table(f"RSS growth per volume request at the default caps, {shape[0]} x {shape[1]} x {shape[2]} voxels "
                f"(load average {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f})", rows)
    save(args.json, "serve_memory", rows)
    return rows


if __name__ == "__main__":
    main()
