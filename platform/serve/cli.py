"""`ctplatform serve`: deploy the HTTP service on the embedded local Ray or on a cluster (`--address`).

Importing this module is cheap (argparse only): Ray, torch and the Serve app load when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import signal
import sys
import time

from ctplatform.config.serve import API_KEY_ENV, ServeConfig


def _replicas(text: str) -> int | tuple[int, int]:
    """'2' -> 2 (fixed); '1:4' -> (1, 4) (autoscaling between them)."""
    try:
        if ":" in text:
            low, high = (int(part) for part in text.split(":", 1))
            if not 1 <= low <= high:
                raise ValueError
            return (low, high) if low != high else low
        value = int(text)
        if value < 1:
            raise ValueError
        return value
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX replicas with 1 <= MIN <= MAX, got {text!r}") from None


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `serve` subcommand on the top-level parser's subparsers."""
    serve = subparsers.add_parser(
        "serve", help="serve a model bundle over HTTP (Ray Serve; OpenAPI docs at /docs)",
        description="Deploy the HTTP service (FastAPI on Ray Serve): POST volumes or .npy slices, get calibrated "
                    "per-class probabilities. Binds 127.0.0.1 unless --host says otherwise.")
    serve.add_argument("--bundle", default=None,
                       help="model bundle folder (model.safetensors + metadata.json); default: the newest "
                            "./runs/*/best/ (the latest sweep's best)")
    serve.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV})")
    serve.add_argument("--address", default=None,
                       help="Ray cluster address (e.g. ray://head:10001 or auto); default: an embedded local Ray")
    serve.add_argument("--name", default="ctplatform", help="Serve application name (default ctplatform); "
                                                            "serving again under the same name is a rolling update")
    serve.add_argument("--num-gpus", type=float, default=None,
                       help="GPUs per model replica, fractions allowed (default: 1 when a GPU is visible, else 0)")
    serve.add_argument("--model-replicas", type=_replicas, default=1, metavar="N|MIN:MAX",
                       help="model replicas: fixed N, or MIN:MAX to autoscale (default 1)")
    serve.add_argument("--ingress-replicas", type=_replicas, default=1, metavar="N|MIN:MAX",
                       help="CPU ingress/preprocessing replicas (default 1)")
    serve.add_argument("--model-cpus", type=float, default=1.0, help="CPUs per model replica (default 1)")
    serve.add_argument("--ingress-cpus", type=float, default=1.0, help="CPUs per ingress replica (default 1)")
    serve.add_argument("--no-batching", action="store_true", help="forward each request alone (no @serve.batch)")
    serve.add_argument("--max-batch-slices", type=int, default=64, help="slices per forward pass (default 64)")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0,
                       help="how long a batch waits to fill (default 10 ms)")
    serve.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (default 60)")
    serve.add_argument("--max-ongoing", type=int, default=8,
                       help="requests one ingress replica works on at once (default 8)")
    serve.add_argument("--max-queued", type=int, default=32,
                       help="requests queued per caller before a fast 503 (default 32)")
    serve.add_argument("--max-body-mb", type=float, default=512, help="request body cap in MiB (default 512)")
    serve.add_argument("--max-voxels", type=int, default=1024 * 1024 * 400,
                       help="voxels a volume header may declare (default 1024*1024*400)")
    serve.add_argument("--max-decompressed-mb", type=float, default=2048,
                       help="image bytes a volume header may declare, i.e. what is decompressed (default 2048 MiB)")
    serve.add_argument("--decode-workers", type=int, default=2,
                       help="volumes decoded at once per ingress replica (default 2)")
    serve.add_argument("--detach", action="store_true",
                       help="with --address: deploy and return (the application keeps running on the cluster)")
    serve.set_defaults(func=cmd_serve)
    return serve


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The parsed `serve` flags as a ServeConfig (an empty key, from the flag or the environment, means none)."""
    config = ServeConfig.from_dict({f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)
                                    if f.metadata["cli"]})
    return config.replace(api_key=config.api_key or None)


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from ctplatform.ray_session import cluster_has_gpus, connect
    from ctplatform.serve.app import build_app
    from ctplatform.serve.bundles import bundle_version, default_bundle_path, resolve_bundle_dir

    config = serve_config_from_args(args)
    bundle = resolve_bundle_dir(config.bundle) if config.bundle else default_bundle_path()
    config = config.replace(bundle=str(bundle)).validate()
    if not _is_loopback(config.host) and not config.api_key:
        print(f"warning: serving on {config.host} without an API key: anyone who can reach this port can use the "
              f"model (set --api-key or ${API_KEY_ENV}, and put TLS in front)", file=sys.stderr)

    # An embedded local Ray (never a leftover `ray start` cluster joined silently; dashboard on 127.0.0.1) or the
    # cluster at --address.
    connect(config.address)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # after Ray's start-up, which installs its own handler
    deployed = detached = False
    try:
        if config.num_gpus is None:
            config = config.replace(num_gpus=1.0 if cluster_has_gpus() else 0.0)
        app = build_app(config)
        # Cluster-wide proxy settings; on a cluster where Serve already runs they stay as they are (Serve warns).
        serve.start(http_options={"host": config.host, "port": config.port,
                                  "request_timeout_s": config.request_timeout + 30.0})
        serve.run(app, name=config.name, route_prefix="/")
        deployed = True
        url = f"http://{config.host}:{config.port}/"
        print(f"serving {bundle} (model {bundle_version(bundle)}, {config.num_gpus:g} GPU per model replica) at "
              f"{url}  API docs: {url}docs  auth: {'bearer key' if config.api_key else 'none'}", flush=True)
        if config.address and config.detach:
            detached = True
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the service", file=sys.stderr)
    finally:
        if not config.address:
            serve.shutdown()  # the embedded Ray goes with this process anyway
        elif deployed and not detached:
            serve.delete(config.name)  # attached to a cluster: stopping the command stops this application
        ray.shutdown()
    return 0
