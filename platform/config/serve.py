"""Serving configuration: every option of `ctplatform serve`, and the few set only by code or a Serve config file.

Field names are the command's flags with dashes turned into underscores (`--max-body-mb` -> `max_body_mb`), with
the same defaults and help text. `ctplatform.serve.app.build_app` takes one :class:`ServeConfig`; a Serve config
file's `args` are its fields by name.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ctplatform.config.options import option
from ctplatform.storage import is_uri, scheme, user_paths

API_KEY_ENV = "CTPLATFORM_API_KEY"
OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs")  # what /v1/predict/object may read: object stores only


def _api_key_from_environment() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def parse_replicas(value: str | int | list | tuple) -> int | tuple[int, int]:
    """'2' -> 2 (fixed); '1:4' or [1, 4] -> (1, 4) (autoscaling between them)."""
    try:
        if isinstance(value, list | tuple):
            low, high = (int(v) for v in value)
        elif isinstance(value, str) and ":" in value:
            low, high = (int(part) for part in value.split(":", 1))
        else:
            low = high = int(value)
        if not 1 <= low <= high:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"expected N or MIN:MAX replicas with 1 <= MIN <= MAX, got {value!r}") from None
    return (low, high) if low != high else low


@dataclass(repr=False)
class ServeTargetConfig:
    """Service: which bundle, where it listens, who may call it"""

    bundle: str | None = option(None, "model bundle folder (model.safetensors + metadata.json); default: the newest "
                                      "./runs/*/best/ (the latest sweep's best); a URI is copied to each node's "
                                      "local disk", path="uri")
    host: str = option("127.0.0.1", "address the HTTP proxy binds (default 127.0.0.1)")
    port: int = option(8000, "HTTP port (default 8000)")
    api_key: str | None = option(default_factory=_api_key_from_environment,
                                 help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: "
                                      f"${API_KEY_ENV})", secret=True)
    api_key_sha256: str | None = option(None, "SHA-256 (hex) of the API key, instead of the key itself: what a "
                                              "config file holds", cli=False)
    address: str | None = option(None, "Ray cluster address (e.g. ray://head:10001 or auto); default: an embedded "
                                       "local Ray")
    name: str = option("ctplatform", "Serve application name (default ctplatform); serving again under the same "
                                     "name is a rolling update")
    detach: bool = option(False, "with --address: deploy and return (the application keeps running on the cluster)")
    object_prefixes: list[str] = option(default_factory=list, help="object-store prefixes (s3://bucket/incoming/) "
                                        "whose volumes POST /v1/predict/object may read by URI; none (default): "
                                        "that route answers 403", metavar="URI", path="uri", parse=user_paths)


@dataclass(repr=False)
class ServeResourcesConfig:
    """Replicas and resources"""

    num_gpus: float | None = option(None, "GPUs per model replica, fractions allowed (default: 1 when a GPU is "
                                          "visible, else 0)")
    # a fixed count, (min, max) to autoscale, or None to leave them to Serve (a config file's deployments)
    model_replicas: int | tuple[int, int] | None = option(
        1, "model replicas: fixed N, or MIN:MAX to autoscale (default 1)", metavar="N|MIN:MAX", parse=parse_replicas)
    ingress_replicas: int | tuple[int, int] | None = option(
        1, "CPU ingress/preprocessing replicas (default 1)", metavar="N|MIN:MAX", parse=parse_replicas)
    model_cpus: float = option(1.0, "CPUs per model replica (default 1)")
    ingress_cpus: float = option(1.0, "CPUs per ingress replica (default 1)")
    torch_threads: int | None = option(None, "torch threads of a model replica (default: torch's)", cli=False)


@dataclass(repr=False)
class ServeLoadConfig:
    """Batching and load"""

    no_batching: bool = option(False, "forward each request alone (no @serve.batch)")
    max_batch_slices: int = option(64, "slices per forward pass (default 64)")
    batch_wait_ms: float = option(10.0, "how long a batch waits to fill (default 10 ms)")
    request_timeout: float = option(60.0, "seconds per request (default 60)")
    # Requests in an ingress replica, uploads still arriving included: many, since the heavy work within them is
    # bounded apart (decode_workers, the in-flight body budget), so slow uploads cannot take every slot.
    max_ongoing: int = option(32, "requests one ingress replica holds at once, uploads in progress included "
                                  "(default 32)")
    max_queued: int = option(32, "requests queued per caller before a fast 503 (default 32)")
    model_max_ongoing_requests: int = option(64, "requests one model replica works on at once", cli=False)
    model_max_queued_requests: int = option(256, "requests queued per caller of the model before a fast 503",
                                            cli=False)


@dataclass(repr=False)
class UploadLimitsConfig:
    """Upload limits"""

    max_body_mb: float = option(96, "request body cap in MiB (default 96; a larger volume is read by URI, POST "
                                     "/v1/predict/object)")
    max_object_mb: float = option(2048, "cap in MiB on an object read by URI (POST /v1/predict/object), streamed to "
                                        "disk by the service itself (default 2048)")
    max_voxels: int = option(1024 * 1024 * 400, "voxels a volume header may declare (default 1024*1024*400)")
    max_decompressed_mb: float = option(2048, "image bytes a volume header may declare, i.e. what is decompressed "
                                              "(default 2048 MiB)")
    decode_workers: int = option(2, "volumes decoded at once per ingress replica (default 2)")
    body_timeout: float = option(60.0, "seconds a client has to send its whole request body; 408 after (default 60)")
    min_body_rate_kib: float = option(64, "slowest average upload rate accepted after the first 5 s, KiB/s; a "
                                          "slower client gets 408 (default 64)")
    max_inflight_body_mb: float = option(2048, "MiB of request bodies one ingress replica holds in memory at once; "
                                               "beyond, 503 with Retry-After (default 2048)")
    spool_threshold_mb: float = option(4, "a request body above this many MiB is written to a temporary file as it "
                                          "arrives and read from there, not held in memory (default 4)")
    spool_dir: str | None = option(None, "node-local directory for those files (each ingress replica makes a "
                                         "private folder in it; not a RAM-backed tmpfs); default: the system's "
                                         "temporary directory")
    max_inflight_spool_mb: float = option(8192, "MiB of request bodies one ingress replica writes to disk at once; "
                                                "beyond, 503 with Retry-After (default 8192)")
    max_request_decode_mb: float = option(256, "MiB of volume decoding one request may hold, estimated from its "
                                               "header; beyond, 413 (default 256: every axial volume the other caps "
                                               "accept; most volumes read whole, non-axial or Enhanced CT, are "
                                               "refused)")
    max_inflight_decode_mb: float = option(2048, "MiB of volume decoding one ingress replica admits at once, the "
                                                 "requests' shares summed; beyond, 503 with Retry-After; at least "
                                                 "--max-request-decode-mb (default 2048)")
    max_files: int = option(64, "multipart parts per request", cli=False)
    max_slices: int = option(256, "2-D slices per /v1/predict/slices request", cli=False)
    max_slice_side: int = option(2048, "largest side of an uploaded slice in pixels", cli=False)
    min_slice_side: int = option(8, "smallest side of an uploaded slice in pixels", cli=False)
    thumbnail_size: int = option(128, "key-slice thumbnails' side in pixels", cli=False)


@dataclass(repr=False)
class ServeConfig(UploadLimitsConfig, ServeLoadConfig, ServeResourcesConfig, ServeTargetConfig):
    """Everything `ctplatform serve` and a Serve config file's `args` set."""

    def validate(self) -> ServeConfig:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be 1..65535, got {self.port}")
        if (self.num_gpus or 0) < 0 or self.model_cpus < 0 or self.ingress_cpus < 0:
            raise ValueError("num_gpus and CPU amounts must be >= 0")
        if self.max_batch_slices < 1 or self.batch_wait_ms < 0:
            raise ValueError("max_batch_slices must be >= 1 and batch_wait_ms >= 0")
        for name in ("model_replicas", "ingress_replicas"):
            replicas = getattr(self, name)
            if replicas is not None:
                low, high = (replicas, replicas) if isinstance(replicas, int) else replicas
                if not 1 <= low <= high:
                    raise ValueError(f"{name} must satisfy 1 <= min <= max, got {replicas}")
        for prefix in self.object_prefixes:
            if not is_uri(prefix) or scheme(prefix) not in OBJECT_SCHEMES or not prefix.split("://", 1)[1].strip("/"):
                raise ValueError(f"--object-prefixes: {prefix!r} is not an object-store URI "
                                 f"({', '.join(OBJECT_SCHEMES)})")
        if self.api_key is not None and self.api_key_sha256 is not None:
            raise ValueError("pass api_key or api_key_sha256, not both")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("an empty API key would let anyone in: omit it or pass a real key")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeConfig:
        """From field names (a Serve config file's `args`); a [min, max] list of replicas becomes a tuple."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown serve configuration keys: {', '.join(sorted(unknown))}")
        values = {k: parse_replicas(v) if k.endswith("_replicas") and v is not None else v for k, v in values.items()}
        return cls(**values)

    def replace(self, **changes: Any) -> ServeConfig:
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:  # the API key never reaches a log line
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if shown["api_key"] is not None:
            shown["api_key"] = "***"
        return f"ServeConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
