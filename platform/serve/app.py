"""Ray Serve application: a CPU ingress that reads and prepares uploads, a model deployment that batches slices.

::

    client --HTTP--> Serve proxy --> Preprocessor (FastAPI ingress, CPU) --handle--> ModelServer (GPU or CPU)
                                     auth, body cap, parsing, decompression,          @serve.batch: slices of
                                     slice selection and resizing (int16 HU),        concurrent requests in one
                                     key-slice thumbnails                            forward; aggregation and
                                                                                     calibration of the bundle

The ingress does everything that is CPU work, so a GPU replica only windows and runs the model (plus the
microseconds of slice->volume aggregation and calibration, kept beside the weights so a prediction and its
`model_version` always come from one bundle, even mid-rollout). Overload is bounded at both hops:
`max_ongoing_requests` per replica plus `max_queued_requests` per caller; past them Serve answers 503 at once.

Predictions equal :class:`ctplatform.model.inference.Predictor`'s: the ingress calls the same `read_volume`,
`preprocess_volume` and `resize_slices`; the model server the same `Predictor.slice_logits`, aggregation and
calibration.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures of the Serve ingress class at run
# time, and Serve rebuilds those signatures outside this module, where postponed (string) annotations no longer
# resolve (a `request: Request` parameter would turn into a required query parameter).
import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from ctplatform.data.preprocess import PreprocessSettings, preprocess_volume, resize_slices
from ctplatform.labels import CLASS_NAMES
from ctplatform.serve.bundles import bundle_version, preprocess_fingerprint, read_bundle_metadata, resolve_bundle_dir
from ctplatform.serve.inputs import (
    InputError,
    ServeLimits,
    check_content_length,
    decode_slices,
    decode_volume,
    read_body_capped,
    single_upload,
    uploads_from_body,
)
from ctplatform.serve.thumbnails import key_slice_thumbnails

APP_NAME = "ctplatform"
API_KEY_ENV = "CTPLATFORM_API_KEY"
DECISION_THRESHOLD = 0.5
logger = logging.getLogger("ray.serve")


def hash_api_key(key: str) -> str:
    """SHA-256 of an API key: the deployment config (visible in Serve's state) holds this, never the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class IngressOptions:
    limits: ServeLimits = field(default_factory=ServeLimits)
    api_key_sha256: str | None = None
    request_timeout_s: float = 60.0  # the ingress's own deadline (504); the proxy's request_timeout_s backs it up
    decode_workers: int = 2  # volumes decoded at once per ingress replica (each may hold ~GB while decoding)
    thumbnail_size: int = 128


# ================================================================================================= model server
class BatchStats:
    """Observed batch sizes of one model replica (requests and slices per forward)."""

    def __init__(self) -> None:
        self.batches = 0
        self.requests: Counter[int] = Counter()
        self.slices: Counter[int] = Counter()
        self.forward_seconds = 0.0

    def record(self, requests: int, slices: int, seconds: float) -> None:
        self.batches += 1
        self.requests[requests] += 1
        self.slices[slices] += 1
        self.forward_seconds += seconds

    def to_dict(self) -> dict:
        total_requests = sum(k * v for k, v in self.requests.items())
        total_slices = sum(k * v for k, v in self.slices.items())
        return {
            "batches": self.batches,
            "requests_per_batch": {str(k): v for k, v in sorted(self.requests.items())},
            "slices_per_batch": {str(k): v for k, v in sorted(self.slices.items())},
            "max_requests_per_batch": max(self.requests, default=0),
            "mean_requests_per_batch": total_requests / self.batches if self.batches else 0.0,
            "mean_slices_per_batch": total_slices / self.batches if self.batches else 0.0,
            "forward_seconds": round(self.forward_seconds, 4),
        }


def _total_slices(chunks: list[np.ndarray]) -> int:
    return sum(len(chunk) for chunk in chunks)


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (unit use)
        return "local"


@serve.deployment(name="ModelServer", max_ongoing_requests=64, max_queued_requests=256,
                  graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=60.0,
                  health_check_period_s=10.0, health_check_timeout_s=30.0)
class ModelServer:
    """Runs the model: windows int16 HU slices and forwards them, batching slices across concurrent requests.

    `max_batch_slices` bounds the slices in one forward (a volume's slices are split into chunks of at most that
    many, so one large volume never blocks the batcher and concurrent small requests ride along). With
    `batching=False` each request is forwarded alone, in arrival order (the benchmark's baseline).
    """

    def __init__(self, bundle_path: str, max_batch_slices: int = 64, batch_wait_timeout_s: float = 0.01,
                 batching: bool = True, torch_threads: int | None = None):
        import ray
        import torch

        from ctplatform.model.inference import Predictor

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.from_path(bundle_path, device=self.device, batch_size=max_batch_slices)
        self.metadata = read_bundle_metadata(bundle_path)
        self.version = bundle_version(bundle_path)
        self.preprocess = preprocess_fingerprint(self.predictor.spec.preprocess)
        self.batching = bool(batching)
        self.max_batch_slices = int(max_batch_slices)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self._batched_forward.set_max_batch_size(self.max_batch_slices)
        self._batched_forward.set_batch_wait_timeout_s(self.batch_wait_timeout_s)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="forward")  # one forward at a time, in order
        self.stats = BatchStats()
        self._failure: str | None = None
        size = self.predictor.settings.image_size
        self.predictor.slice_logits(np.full((1, size, size), -1000, np.int16))  # warm-up: first request pays nothing
        logger.info("ModelServer %s ready on %s (batching=%s, max_batch_slices=%d)", self.version, self.device,
                    self.batching, self.max_batch_slices)

    # ------------------------------------------------------------------ forward
    def _forward_blocking(self, slices: np.ndarray) -> np.ndarray:
        try:
            return self.predictor.slice_logits(slices)
        except RuntimeError as exc:
            if "CUDA" in str(exc) or "cuda" in str(exc):
                self._failure = f"device error: {exc}"  # check_health fails: Serve replaces this replica
            raise

    async def _forward(self, slices: np.ndarray, requests: int) -> np.ndarray:
        start = time.perf_counter()
        logits = await asyncio.get_running_loop().run_in_executor(self._pool, self._forward_blocking, slices)
        self.stats.record(requests, len(slices), time.perf_counter() - start)
        return logits

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_total_slices)
    async def _batched_forward(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(chunk) for chunk in chunks]
        logits = await self._forward(np.concatenate(chunks), requests=len(chunks))
        return np.split(logits, np.cumsum(sizes)[:-1])

    async def _logits(self, slices: np.ndarray) -> np.ndarray:
        size = self.predictor.settings.image_size
        if slices.ndim != 3 or slices.shape[1:] != (size, size) or len(slices) == 0:
            raise ValueError(f"expected prepared slices (K, {size}, {size}), got {slices.shape}")
        if not self.batching:
            return await self._forward(slices, requests=1)
        step = self.max_batch_slices
        chunks = [slices[i : i + step] for i in range(0, len(slices), step)]
        parts = await asyncio.gather(*(self._batched_forward(chunk) for chunk in chunks))
        return np.concatenate(parts)

    def _mismatch(self, preprocess: dict) -> dict | None:
        if preprocess_fingerprint(preprocess) == self.preprocess:
            return None
        return {"status": "preprocess_mismatch", "preprocess": self.preprocess, "model_version": self.version}

    # ------------------------------------------------------------------ calls from the ingress
    async def predict_volume(self, slices: np.ndarray, positions: np.ndarray, preprocess: dict) -> dict:
        """Prepared (K, S, S) int16 HU slices of one volume -> VolumePrediction (as Predictor.predict_prepared)."""
        from ctplatform.model.aggregate import aggregate_slices
        from ctplatform.model.inference import VolumePrediction

        mismatch = self._mismatch(preprocess)
        if mismatch:
            return mismatch
        if self.predictor.is_mil:  # the attention head needs the whole volume: not batched across requests
            start = time.perf_counter()
            prediction = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.predictor.predict_prepared, slices, positions)
            self.stats.record(1, len(slices), time.perf_counter() - start)
        else:
            slice_probs = 1.0 / (1.0 + np.exp(-(await self._logits(slices))))
            spec = self.predictor.spec
            raw = aggregate_slices(slice_probs, spec.aggregation, spec.topk)
            prediction = VolumePrediction(
                probabilities=self.predictor.calibrate(raw[None])[0],
                raw_probabilities=raw,
                slice_probabilities=slice_probs,
                slice_positions=np.asarray(positions),
            )
        return {"status": "ok", "model_version": self.version, "prediction": prediction}

    async def predict_slices(self, slices: np.ndarray, preprocess: dict) -> dict:
        """Resized (N, S, S) int16 HU slices -> raw and calibrated (N, C) probabilities, as Predictor.predict_slices."""
        mismatch = self._mismatch(preprocess)
        if mismatch:
            return mismatch
        raw = 1.0 / (1.0 + np.exp(-(await self._logits(slices))))
        return {"status": "ok", "model_version": self.version, "raw": raw, "calibrated": self.predictor.calibrate(raw)}

    def describe(self) -> dict:
        meta = self.metadata
        return {
            "model_version": self.version,
            "class_names": meta["class_names"],
            "decision_threshold": DECISION_THRESHOLD,
            "calibration": meta.get("calibration"),
            "metrics": meta.get("metrics", {}),
            "preprocess": meta["preprocess"],
            "input": meta.get("input"),
            "aggregation": meta.get("aggregation"),
            "architecture": meta.get("architecture"),
            "versions": meta.get("versions"),
            "source": meta.get("source"),
            "created": meta.get("created"),
            "serving": {"device": self.device, "batching": self.batching, "max_batch_slices": self.max_batch_slices,
                        "batch_wait_timeout_s": self.batch_wait_timeout_s,
                        "mil_head": bool(self.predictor.is_mil)},
        }

    def ready(self) -> dict:
        return {"model_version": self.version, "device": self.device}

    def get_stats(self) -> dict:
        return {"replica": _replica_id(), "model_version": self.version, "device": self.device,
                "batching": self.batching, **self.stats.to_dict()}

    def check_health(self) -> None:
        if self._failure:
            raise RuntimeError(self._failure)


# ================================================================================================= ingress
api = FastAPI(
    title="ctplatform CT abnormality service",
    version="1",
    description=(
        "Chest-CT multi-abnormality classification (CT-RATE, VLM3D Task 2, 18 classes). POST a volume (.nii, "
        ".nii.gz, .mha) or .npy slices of Hounsfield units; get calibrated per-class probabilities, decisions at "
        f"p >= {DECISION_THRESHOLD}, the slices that drove each positive finding, and the model version. When the "
        "service has an API key, send it as `Authorization: Bearer <key>` on every /v1 route."
    ),
)
_bearer = HTTPBearer(auto_error=False, description="the service's API key (when it was started with one)")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed request (empty body, broken multipart, wrong number of files)"},
    401: {"description": "missing or wrong API key"},
    413: {"description": "body, declared voxels, declared image bytes or slice count above the service's limits"},
    415: {"description": "not a supported file format"},
    422: {"description": "unusable content: truncated, wrong dimensionality or dtype, NaN values or spacing, blank"},
    503: {"description": "overloaded (retry after a moment) or the model is not ready"},
    504: {"description": "the request took longer than the service's timeout"},
}
_VOLUME_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "one .nii, .nii.gz or .mha volume"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}
_SLICES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": ".npy files, each a 2-D HU slice (H, W) or a stack (N, H, W)"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}


def _load_page() -> tuple[str, str]:
    """The web page and a Content-Security-Policy that allows exactly its inline script and style."""
    page = resources.files("ctplatform.serve").joinpath("page.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
    return page, csp


@serve.deployment(name="Preprocessor", max_ongoing_requests=8, max_queued_requests=32,
                  graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=60.0)
@serve.ingress(api)
class Preprocessor:
    """HTTP ingress on CPU: authorisation, capped body reads, decoding and preprocessing, then the model call."""

    def __init__(self, model: DeploymentHandle, preprocess: dict, options: IngressOptions | None = None):
        self.model = model
        self.settings = PreprocessSettings.from_dict(preprocess)
        self.options = options or IngressOptions()
        self.pool = ThreadPoolExecutor(max(1, self.options.decode_workers), thread_name_prefix="decode")
        self.responses: Counter[str] = Counter()
        self.page, self.csp = _load_page()

    # ------------------------------------------------------------------ helpers
    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        expected = self.options.api_key_sha256
        if expected is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not given or not hmac.compare_digest(hash_api_key(given), expected):
            self.responses["401"] += 1
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _cpu(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    async def _body(self, request: Request) -> bytes:
        check_content_length(dict(request.headers), self.options.limits)
        return await read_body_capped(request.stream(), self.options.limits)

    async def _call(self, method: str, *args) -> dict:
        try:
            return await getattr(self.model, method).remote(*args)
        except BackPressureError:
            raise HTTPException(503, "the model is overloaded: retry in a moment",
                                headers={"Retry-After": "1"}) from None
        except DeploymentUnavailableError:
            raise HTTPException(503, "the model is not available yet: retry in a moment",
                                headers={"Retry-After": "5"}) from None
        except RayActorError:  # the replica died under this request; Serve is replacing it
            raise HTTPException(503, "the model replica restarted: retry in a moment",
                                headers={"Retry-After": "5"}) from None

    async def _guard(self, work) -> JSONResponse:
        """Deadline and error mapping: every refusal is a 4xx/5xx with a reason; nothing escapes to kill a replica."""
        try:
            async with asyncio.timeout(self.options.request_timeout_s):
                result = await work
        except InputError as exc:
            self.responses[str(exc.status)] += 1
            raise HTTPException(exc.status, exc.reason) from None
        except TimeoutError:
            self.responses["504"] += 1
            raise HTTPException(504, f"the request took longer than {self.options.request_timeout_s:g} s") from None
        except HTTPException as exc:
            self.responses[str(exc.status_code)] += 1
            raise
        except Exception:
            self.responses["500"] += 1
            logger.exception("prediction failed")
            raise HTTPException(500, "internal error while predicting (logged on the server)") from None
        self.responses["200"] += 1
        return JSONResponse(result)

    async def _model_call_with_settings(self, method: str, prepare, *extra) -> tuple[dict, Any]:
        """Prepare with the ingress's settings and call the model; if the model replica serves a bundle with other
        preprocessing (mid-rollout), prepare again with its settings, once."""
        settings = self.settings
        for _attempt in range(2):
            prepared = await self._cpu(prepare, settings)
            reply = await self._call(method, *prepared, *extra, settings.to_dict())
            if reply.get("status") == "ok":
                if settings != self.settings:
                    self.settings = settings
                return reply, prepared
            settings = PreprocessSettings.from_dict(reply["preprocess"])
            self.responses["preprocess_retries"] += 1
        raise HTTPException(503, "the model is being updated: retry in a moment", headers={"Retry-After": "2"})

    # ------------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(self) -> HTMLResponse:
        return HTMLResponse(self.page, headers={"Content-Security-Policy": self.csp, "Referrer-Policy": "no-referrer",
                                                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    @api.get("/healthz", summary="Liveness: the ingress replica answers")
    def healthz(self) -> dict:
        return {"status": "alive"}

    @api.get("/readyz", summary="Readiness: the model deployment answers (503 until it does)")
    async def readyz(self) -> JSONResponse:
        try:
            async with asyncio.timeout(5.0):
                info = await self.model.ready.remote()
        except Exception as exc:
            return JSONResponse({"status": "not ready", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready", **info})

    @api.get("/v1/model", summary="Model information: classes, calibration, metrics, preprocessing, limits",
             responses={401: _ERRORS[401]})
    async def model_info(self, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> JSONResponse:
        self._authorize(credentials)
        info = await self._call("describe")
        info["limits"] = self.options.limits.to_dict()
        info["auth"] = "bearer" if self.options.api_key_sha256 else "none"
        return JSONResponse(info)

    @api.get("/v1/stats", summary="Observed batch sizes of a model replica and this ingress's response counts",
             responses={401: _ERRORS[401]})
    async def stats(self, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> JSONResponse:
        self._authorize(credentials)
        model = await self._call("get_stats")
        return JSONResponse({"model": model, "ingress": {"replica": _replica_id(), "responses": dict(self.responses)}})

    @api.post("/v1/predict/volume", summary="Predict one volume (.nii, .nii.gz, .mha)", openapi_extra=_VOLUME_BODY,
              responses=_ERRORS)
    async def predict_volume(
        self,
        request: Request,
        thumbnails: bool = Query(False, description="add base64 PNG thumbnails of the key slices"),
        filename: str | None = Query(None, description="file name for a raw (non-multipart) body, e.g. scan.nii.gz"),
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> JSONResponse:
        self._authorize(credentials)
        return await self._guard(self._predict_volume(request, thumbnails, filename))

    @api.post("/v1/predict/slices", summary="Predict 2-D HU slices (.npy: (H, W) each, or (N, H, W) stacks)",
              openapi_extra=_SLICES_BODY, responses=_ERRORS)
    async def predict_slices(
        self,
        request: Request,
        filename: str | None = Query(None, description="file name for a raw (non-multipart) body"),
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> JSONResponse:
        self._authorize(credentials)
        return await self._guard(self._predict_slices(request, filename))

    # ------------------------------------------------------------------ work
    async def _predict_volume(self, request: Request, thumbnails: bool, filename: str | None) -> dict:
        started = time.perf_counter()
        limits = self.options.limits
        body = await self._body(request)
        upload = single_upload(uploads_from_body(body, request.headers.get("content-type"), filename, limits))
        del body
        volume = await self._cpu(decode_volume, upload, limits)
        decoded = time.perf_counter()
        shape, spacing, source, notes = list(volume.hu.shape), list(map(float, volume.spacing)), volume.hu_source, \
            list(volume.notes)
        held = {"hu": volume.hu}
        del volume

        def prepare(settings: PreprocessSettings):
            # The HU volume is released once prepared (it can be GBs); a rare second preparation (a model replica
            # with other preprocessing, mid-rollout) decodes the upload again.
            hu = held.pop("hu", None)
            if hu is None:
                hu = decode_volume(upload, limits).hu
            return preprocess_volume(hu, settings)

        reply, (prepared, positions) = await self._model_call_with_settings("predict_volume", prepare)
        modelled = time.perf_counter()
        prediction = reply["prediction"]
        prediction.notes = notes
        result = {"model_version": reply["model_version"], **prediction.to_dict()}
        result["findings"] = sorted(
            ({"class": name, "probability": result["probabilities"][name], "key_slices": result["key_slices"][name]}
             for name in result["key_slices"]), key=lambda f: -f["probability"])
        if "slice_attention" in result:  # attention-MIL: the weight of each key slice for its finding
            where = {int(p): k for k, p in enumerate(result["slice_positions"])}
            for finding in result["findings"]:
                weights = result["slice_attention"][finding["class"]]
                finding["key_slice_attention"] = [weights[where[p]] for p in finding["key_slices"]]
        result["volume"] = {"filename": upload.filename, "shape": shape, "spacing_mm": spacing, "hu_source": source,
                            "slices_used": len(positions)}
        result["decision_threshold"] = DECISION_THRESHOLD
        if thumbnails:
            wanted = [p for positions_ in result["key_slices"].values() for p in positions_]
            result["thumbnails"] = await self._cpu(key_slice_thumbnails, prepared, positions, wanted,
                                                   self.options.thumbnail_size)
        result["timing_ms"] = {"read": round(1000 * (decoded - started), 1),
                               "preprocess_and_model": round(1000 * (modelled - decoded), 1),
                               "total": round(1000 * (time.perf_counter() - started), 1)}
        return result

    async def _predict_slices(self, request: Request, filename: str | None) -> dict:
        limits = self.options.limits
        body = await self._body(request)
        uploads = uploads_from_body(body, request.headers.get("content-type"), filename, limits)
        del body
        slices = await self._cpu(decode_slices, uploads, limits)

        def prepare(settings: PreprocessSettings):
            size = settings.image_size
            return (np.concatenate([resize_slices(np.asarray(s.hu, np.float32)[None], size) for s in slices]),)

        reply, _ = await self._model_call_with_settings("predict_slices", prepare)
        raw, calibrated = reply["raw"], reply["calibrated"]
        out = []
        for k, item in enumerate(slices):
            decisions = calibrated[k] >= DECISION_THRESHOLD
            out.append({
                "name": item.name,
                "shape": list(item.hu.shape),
                "probabilities": dict(zip(CLASS_NAMES, map(float, calibrated[k]), strict=True)),
                "raw_probabilities": dict(zip(CLASS_NAMES, map(float, raw[k]), strict=True)),
                "decisions": dict(zip(CLASS_NAMES, map(bool, decisions), strict=True)),
                "positive": [name for name, d in zip(CLASS_NAMES, decisions, strict=True) if d],
                "notes": item.notes,
            })
        return {"model_version": reply["model_version"], "decision_threshold": DECISION_THRESHOLD, "slices": out}


# ================================================================================================= building
def _replicas(options: dict, replicas: int | tuple[int, int] | None, target_ongoing: float) -> dict:
    """A fixed count, or (min, max) for autoscaling; None leaves both to Serve (and to a config file's overrides)."""
    if replicas is None:
        return options
    low, high = (replicas, replicas) if isinstance(replicas, int) else replicas
    if not 1 <= low <= high:
        raise ValueError(f"replicas must satisfy 1 <= min <= max, got {replicas}")
    if low == high:
        return {**options, "num_replicas": low}
    return {**options, "autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                              "target_ongoing_requests": target_ongoing,
                                              "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}}


def build_app(
    bundle_path: str | os.PathLike,
    api_key: str | None = None,
    num_gpus: float = 0,
    *,
    api_key_sha256: str | None = None,
    limits: ServeLimits | None = None,
    request_timeout_s: float = 60.0,
    batching: bool = True,
    max_batch_slices: int = 64,
    batch_wait_timeout_s: float = 0.01,
    model_replicas: int | tuple[int, int] | None = 1,
    ingress_replicas: int | tuple[int, int] | None = 1,
    model_cpus: float = 1.0,
    ingress_cpus: float = 1.0,
    model_max_ongoing_requests: int = 64,
    model_max_queued_requests: int = 256,
    ingress_max_ongoing_requests: int = 8,
    ingress_max_queued_requests: int = 32,
    decode_workers: int = 2,
    torch_threads: int | None = None,
    thumbnail_size: int = 128,
) -> serve.Application:
    """The Serve application for one bundle: `serve.run(build_app(...), name=APP_NAME)`.

    A `(min, max)` replica pair turns on autoscaling; `num_gpus` (fractions allowed) is per model replica. Running
    it again under the same application name with another bundle is a rolling update.
    """
    bundle = resolve_bundle_dir(bundle_path)
    metadata = read_bundle_metadata(bundle)
    if num_gpus < 0 or model_cpus < 0 or ingress_cpus < 0:
        raise ValueError("num_gpus and CPU amounts must be >= 0")
    if max_batch_slices < 1 or batch_wait_timeout_s < 0:
        raise ValueError("max_batch_slices must be >= 1 and batch_wait_timeout_s >= 0")
    if api_key is not None and api_key_sha256 is not None:
        raise ValueError("pass api_key or api_key_sha256, not both")
    if api_key is not None and not api_key.strip():
        raise ValueError("an empty API key would let anyone in: omit it or pass a real key")
    key_hash = hash_api_key(api_key) if api_key else (api_key_sha256.lower() if api_key_sha256 else None)
    options = IngressOptions(limits=limits or ServeLimits(), api_key_sha256=key_hash,
                             request_timeout_s=request_timeout_s, decode_workers=decode_workers,
                             thumbnail_size=thumbnail_size)
    model_options = _replicas(
        {"ray_actor_options": {"num_cpus": model_cpus, "num_gpus": num_gpus},
         "max_ongoing_requests": model_max_ongoing_requests, "max_queued_requests": model_max_queued_requests,
         "graceful_shutdown_timeout_s": request_timeout_s},
        model_replicas, target_ongoing=max(2.0, model_max_ongoing_requests / 4))
    ingress_options = _replicas(
        {"ray_actor_options": {"num_cpus": ingress_cpus},
         "max_ongoing_requests": ingress_max_ongoing_requests, "max_queued_requests": ingress_max_queued_requests,
         "graceful_shutdown_timeout_s": request_timeout_s},
        ingress_replicas, target_ongoing=max(1.0, ingress_max_ongoing_requests / 2))
    model = ModelServer.options(**model_options).bind(
        str(bundle), max_batch_slices=max_batch_slices, batch_wait_timeout_s=batch_wait_timeout_s,
        batching=batching, torch_threads=torch_threads)
    return Preprocessor.options(**ingress_options).bind(model, metadata["preprocess"], options)


def app_builder(args: dict) -> serve.Application:
    """Application builder for `serve deploy` / `serve run` config files (see serve_config.yaml).

    `args` takes build_app's keyword arguments plus `bundle` (required) and `limits` (a dict of ServeLimits
    fields). Without `api_key`/`api_key_sha256`, the key is read from $CTPLATFORM_API_KEY where the app is built.
    """
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("serve config: applications[].args.bundle (the model bundle folder) is required")
    bundle = args.pop("bundle")
    if "limits" in args:
        args["limits"] = ServeLimits(**args["limits"])
    for key in ("model_replicas", "ingress_replicas"):
        value = args.setdefault(key, None)  # None: the config's deployments[].autoscaling_config decides
        if isinstance(value, list):
            args[key] = tuple(value)
    if "api_key" not in args and "api_key_sha256" not in args and os.environ.get(API_KEY_ENV):
        args["api_key"] = os.environ[API_KEY_ENV]
    return build_app(bundle, **args)

