"""Load test of the HTTP service on loopback: requests/s and p50/p95/p99 latency, batching on and off.

Starts an embedded Ray and the Serve application (a given bundle, or a random-weight one built here), then for
each batching mode drives C concurrent clients for D seconds per workload:

- slices:  one .npy slice per request (POST /v1/predict/slices)
- volumes: one .nii.gz volume per request (POST /v1/predict/volume)

and compares the served slice throughput with the model's in-process forward throughput on the same prepared
slices (`Predictor.slice_logits`, same torch threads): the ratio is what serving costs (HTTP, parsing,
decompression, preprocessing, Ray hops) or gains (batching). For volumes an in-process end-to-end figure
(read_volume + preprocess + forward, one volume at a time) is printed too.

Wall-clock ratios are only fair on an otherwise idle machine. So the CPU time of every server-side process (the
Ray processes this script started: proxy, replicas, controller, raylet; the load generator excluded) is measured
too, and its CPU cost per served slice is compared with the in-process forward's CPU cost per slice: a figure
that other load on a shared machine barely moves.

    .venv/bin/python benchmarks/serve_load.py                    # random efficientnet_b0 bundle, CPU
    .venv/bin/python benchmarks/serve_load.py --bundle runs/x/best --num-gpus 1 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import os
import platform as stdlib_platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
from _common import save


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(out: Path, model_name: str, image_size: int, num_slices: int) -> Path:
    import torch

    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier(model_name, num_classes=18)
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=image_size, num_slices=num_slices).to_dict())
    return export_bundle(out, model, spec)


def synthetic_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(slices, rows, cols) HU with a body, lungs and noise (what the reader and slice selection expect)."""
    rng = np.random.default_rng(seed)
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    hu = np.full(shape, -1000.0, np.float32)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.42)) ** 2 < 1
    body = np.broadcast_to(body, shape)
    hu[body] = 40
    lung = body & np.broadcast_to((np.abs(x - shape[2] / 2) > shape[2] * 0.05) & (np.abs(y - shape[1] / 2) <
                                                                                  shape[1] * 0.25), shape)
    hu[lung] = -850
    return np.rint(hu + rng.normal(0, 20, shape).astype(np.float32))


def nifti_gz(hu: np.ndarray) -> bytes:
    image = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16), np.diag([0.7, 0.7, 1.5, 1]))
    return gzip.compress(image.to_bytes(), compresslevel=6)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


async def drive(url: str, route: str, payloads: list[tuple[str, str, bytes]], clients: int, duration: float,
                headers: dict) -> dict:
    """`clients` concurrent loops POSTing payloads round-robin for `duration` seconds."""
    latencies: list[float] = []
    errors: dict[int | str, int] = {}
    deadline = time.perf_counter() + duration
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        async def loop(k: int):
            i = k
            while time.perf_counter() < deadline:
                field, name, data = payloads[i % len(payloads)]
                started = time.perf_counter()
                try:
                    response = await client.post(route, files={field: (name, data)}, headers=headers)
                    status: int | str = response.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[status] = errors.get(status, 0) + 1
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    ms = sorted(1000 * t for t in latencies)

    def pct(q):
        return ms[min(len(ms) - 1, round(q / 100 * (len(ms) - 1)))] if ms else float("nan")

    return {"ok": len(ms), "errors": errors, "rps": len(ms) / elapsed, "p50": pct(50), "p95": pct(95), "p99": pct(99),
            "mean": statistics.fmean(ms) if ms else float("nan")}


def batch_delta(before: dict, after: dict) -> dict:
    """Batch statistics of the forwards between two /v1/stats snapshots."""
    def diff(key):
        return {int(k): v - before[key].get(k, 0) for k, v in after[key].items() if v - before[key].get(k, 0) > 0}

    requests, slices = diff("requests_per_batch"), diff("slices_per_batch")
    batches = sum(requests.values())
    return {"batches": batches, "max_requests_per_batch": max(requests, default=0),
            "mean_slices_per_batch": sum(k * v for k, v in slices.items()) / batches if batches else 0.0}


def server_cpu_seconds() -> float:
    """User + system CPU seconds of this process's descendants (the embedded Ray: every server-side process),
    read from /proc (Linux); NaN elsewhere."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])  # after "pid (comm)": state, ppid, ...; utime and stime are fields 14, 15
        cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks
    if not parents:
        return float("nan")
    me, total = os.getpid(), 0.0
    for pid in cpu:
        ancestor = parents.get(pid)
        while ancestor and ancestor != me:
            ancestor = parents.get(ancestor)
        if ancestor == me:
            total += cpu[pid]
    return total


def in_process_baseline(bundle: Path, slices: np.ndarray, volume_bytes: bytes, batch: int, seconds: float) -> dict:
    from ctplatform.data import read_volume
    from ctplatform.evaluation.predictor import Predictor

    predictor = Predictor.from_path(bundle, device="cuda" if _cuda() else "cpu", batch_size=batch)
    predictor.slice_logits(slices[:2])  # warm-up
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        predictor.slice_logits(slices)
        done += len(slices)
    forward = done / (time.perf_counter() - started)
    cpu_per_slice = (time.process_time() - cpu) / done
    volumes, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or volumes == 0:
        volume = read_volume(volume_bytes, name="v.nii.gz")
        predictor.predict_volume(volume.hu, volume.notes)
        volumes += 1
    return {"forward_slices_per_s": forward, "forward_cpu_s_per_slice": cpu_per_slice,
            "end_to_end_volumes_per_s": volumes / (time.perf_counter() - started)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle to serve (default: a random-weight one built here)")
    parser.add_argument("--model", default="efficientnet_b0", help="architecture of the built bundle")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-slices", type=int, default=16, help="K slices per volume of the built bundle")
    parser.add_argument("--volume-shape", default="96x256x256", help="SLICESxROWSxCOLS of the test volumes")
    parser.add_argument("--slice-side", type=int, default=256, help="side of the .npy test slices")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per workload and mode")
    parser.add_argument("--max-batch-slices", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the model replica and the baseline (default 1: robust on a shared "
                             "machine; use the core count on a dedicated one)")
    parser.add_argument("--workloads", default="slices,volumes")
    parser.add_argument("--modes", default="on,off", help="batching modes to run")
    parser.add_argument("--json", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import ray
    from ray import serve

    from ctplatform.config.serve import ServeConfig
    from ctplatform.data import read_volume
    from ctplatform.data.preprocess import PreprocessSettings, preprocess_volume
    from ctplatform.model.bundle_check import check_bundle
    from ctplatform.serve.app import build_app

    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    bundle = Path(args.bundle) if args.bundle else make_bundle(Path(tmp.name) / "bundle", args.model,
                                                               args.image_size, args.num_slices)
    settings = PreprocessSettings.from_dict(check_bundle(bundle).metadata["preprocess"])
    shape = tuple(int(v) for v in args.volume_shape.lower().split("x"))
    volumes = [nifti_gz(synthetic_volume(shape, seed)) for seed in range(4)]
    slice_inputs = [npy_bytes(synthetic_volume((1, args.slice_side, args.slice_side), seed)[0].astype(np.int16))
                    for seed in range(8)]
    prepared, _ = preprocess_volume(read_volume(volumes[0], name="v.nii.gz").hu, settings)
    baseline_slices = np.concatenate([prepared] * max(1, 64 // len(prepared)))
    print(f"baseline: in-process forward on {len(baseline_slices)} prepared slices ...", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    baselines = [in_process_baseline(bundle, baseline_slices, volumes[0], args.max_batch_slices,
                                     min(args.duration, 10.0))]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
    cpus = max(1.0, (os.cpu_count() or 2) / 2)
    rows = []
    try:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            app = build_app(ServeConfig(
                bundle=str(bundle), api_key=None, num_gpus=args.num_gpus, no_batching=mode != "on", model_cpus=cpus,
                ingress_cpus=cpus, max_batch_slices=args.max_batch_slices, batch_wait_ms=args.batch_wait_ms,
                torch_threads=args.threads, request_timeout=240, max_ongoing=max(8, args.clients),
                max_queued=4 * args.clients, max_body_mb=1024))
            serve.run(app, name="bench", route_prefix="/")
            for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
                if workload == "slices":
                    route = "/v1/predict/slices"
                    payloads = [("files", f"{i}.npy", d) for i, d in enumerate(slice_inputs)]
                else:
                    route = "/v1/predict/volume"
                    payloads = [("file", f"{i}.nii.gz", d) for i, d in enumerate(volumes)]
                asyncio.run(drive(url, route, payloads[:2], min(2, args.clients), 2.0, {}))  # warm-up
                print(f"batching {mode}: {workload} ...", file=sys.stderr, flush=True)
                before = httpx.get(f"{url}/v1/stats", timeout=30).json()["model"]
                cpu_before = server_cpu_seconds()
                result = asyncio.run(drive(url, route, payloads, args.clients, args.duration, {}))
                cpu_used = server_cpu_seconds() - cpu_before
                stats = batch_delta(before, httpx.get(f"{url}/v1/stats", timeout=30).json()["model"])
                per_request = 1 if workload == "slices" else settings.num_slices
                served = result["rps"] * per_request
                rows.append({"workload": workload, "batching": mode, **result, "slices_per_s": served,
                             "cpu_ms_per_slice": 1000 * cpu_used / max(1, result["ok"] * per_request),
                             "mean_batch": stats["mean_slices_per_batch"],
                             "max_requests": stats["max_requests_per_batch"]})
    finally:
        serve.shutdown()
        ray.shutdown()
    # measured again after the served runs: on a shared machine the two bracket what the model could do meanwhile
    baselines.append(in_process_baseline(bundle, baseline_slices, volumes[0], args.max_batch_slices,
                                         min(args.duration, 10.0)))
    tmp.cleanup()
    baseline = {k: statistics.fmean(b[k] for b in baselines) for k in baselines[0]}
    for r in rows:
        r["ratio"] = r["slices_per_s"] / baseline["forward_slices_per_s"]
        r["cpu_ratio"] = 1000 * baseline["forward_cpu_s_per_slice"] / r["cpu_ms_per_slice"]

    device = torch.cuda.get_device_name(0) if _cuda() and args.num_gpus > 0 else "CPU"
    print(f"\nmachine: {os.cpu_count()} CPU cores ({stdlib_platform.processor() or stdlib_platform.machine()}), "
          f"model on {device}; torch threads {args.threads}; clients {args.clients}; {args.duration:g} s per run")
    print(f"model: {args.model if not args.bundle else bundle} at {settings.image_size} px, K={settings.num_slices}; "
          f"volumes {args.volume_shape} int16 .nii.gz ({len(volumes[0]) / 1e6:.1f} MB); slices "
          f"{args.slice_side}x{args.slice_side} int16 .npy; max_batch_slices {args.max_batch_slices}, wait "
          f"{args.batch_wait_ms:g} ms")
    bracket = " / ".join(f"{b['forward_slices_per_s']:.1f}" for b in baselines)
    print(f"in-process forward: {baseline['forward_slices_per_s']:.1f} slices/s (before/after the served runs: "
          f"{bracket}), {1000 * baseline['forward_cpu_s_per_slice']:.1f} CPU ms/slice; in-process end-to-end volume "
          f"(read + preprocess + forward, one at a time): {baseline['end_to_end_volumes_per_s']:.2f} volumes/s; "
          f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end\n")
    print("| workload | batching | req/s | slices/s | slices/s vs in-process forward | p50 ms | p95 ms | p99 ms | "
          "server CPU ms/slice | CPU efficiency vs in-process forward | mean slices/forward | max requests/forward "
          "| errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['batching']} | {r['rps']:.2f} | {r['slices_per_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['cpu_ms_per_slice']:.0f} | "
              f"{r['cpu_ratio']:.2f}x | "
              f"{r['mean_batch']:.1f} | {r['max_requests']} | {r['errors'] or 0} |")
    save(args.json, "serve_load", [{"workload": "in-process baseline", **baseline}, *rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
