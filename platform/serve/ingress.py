"""The service's HTTP ingress: routes, API-key auth, request limits, and the CPU work before the model call.

::

    client --HTTP--> Serve proxy --> Ingress (FastAPI, CPU) -------------------handle--> ModelServer (GPU or CPU)
                                     auth, body cap, parsing, decompression,          @serve.batch: slices of
                                     slice selection and resizing (int16 HU),        concurrent requests in one
                                     key-slice thumbnails                            forward; aggregation and
                                                                                     calibration of the bundle

The ingress does everything that is CPU work (:mod:`.preprocessing`), so a GPU replica
(:mod:`.model_deployment`) only windows and runs the model. Overload is bounded at both hops:
`max_ongoing_requests` per replica plus `max_queued_requests` per caller; past them Serve answers 503 at once.
Every refusal is a 4xx/5xx with a reason; nothing a request sends can kill a replica.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures of the Serve ingress class at run
# time, and Serve rebuilds those signatures outside this module, where postponed (string) annotations no longer
# resolve (a `request: Request` parameter would turn into a required query parameter).
import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from ctplatform.data.decode_memory import decode_estimate
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.evaluation.decision import DECISION_THRESHOLD
from ctplatform.heap import trim_heap
from ctplatform.serve.auth import bearer, key_accepted
from ctplatform.serve.body import BUSY_RETRY_AFTER_S, Body, MemoryBudget, Reservation, Spool, read_body
from ctplatform.serve.inputs import (
    UPLOAD_TOO_LARGE,
    InputError,
    ServeLimits,
    Upload,
    check_content_length,
    decode_slices,
    single_upload,
    uploads_from_body,
)
from ctplatform.serve.model_deployment import replica_id
from ctplatform.serve.objects import (
    MAX_REQUEST_BYTES,
    OBJECT_REQUEST_TOO_LARGE,
    fetch_object,
    requested_uri,
    stat_object,
)
from ctplatform.serve.page import load_page
from ctplatform.serve.preprocessing import VolumeUpload, prepare_slices
from ctplatform.serve.responses import slices_response, volume_response
from ctplatform.serve.thumbnails import key_slice_thumbnails

logger = logging.getLogger("ray.serve")
# why a volume's decode can need more than the per-request limit, and what the operator can do about it
WHOLE_DECODE_HINT = ("; a NIfTI or MetaImage volume stored axially and a zipped single-frame axial DICOM series are "
                     "decoded a few slices at a time, other volumes whole (a non-axial one, an Enhanced CT file): the "
                     "service's operator can raise --max-request-decode-mb")


@dataclass(frozen=True)
class IngressOptions:
    """What an ingress replica is started with (only the API key's hash, never the key)."""

    limits: ServeLimits = field(default_factory=ServeLimits)
    api_key_sha256: str | None = None
    request_timeout_s: float = 60.0  # the ingress's own deadline (504); the proxy's request_timeout_s backs it up
    decode_workers: int = 2  # volumes decoded at once per ingress replica
    thumbnail_size: int = 128
    spool_dir: str | None = None  # where bodies above the spool threshold are written (default: the temp directory)
    object_prefixes: tuple[str, ...] = ()  # what /v1/predict/object may read (none: it answers 403)


api = FastAPI(
    title="ctplatform CT abnormality service",
    version="1",
    description=(
        "Chest-CT multi-abnormality classification (CT-RATE, VLM3D Task 2, 18 classes). POST a volume (.nii, "
        ".nii.gz, .mha, a .zip of one DICOM series) or .npy slices of Hounsfield units; get calibrated per-class "
        "probabilities, decisions at "
        f"p >= {DECISION_THRESHOLD}, the slices that drove each positive finding, and the model version. When the "
        "service has an API key, send it as `Authorization: Bearer <key>` on every /v1 route."
    ),
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed request (empty body, broken multipart, wrong number of files)"},
    401: {"description": "missing or wrong API key"},
    408: {"description": "the request body came too slowly (below the minimum rate after a grace period) or not "
                          "within the body timeout"},
    413: {"description": "body, declared voxels, declared image bytes, a volume's decode memory or slice count above "
                         "the service's limits"},
    415: {"description": "not a supported file format"},
    422: {"description": "unusable content: truncated, wrong dimensionality or dtype, NaN values or spacing, blank"},
    503: {"description": "overloaded, the replica holds its limit of uploads, or the model is not ready (see "
                          "Retry-After)"},
    504: {"description": "the request took longer than the service's timeout"},
}
_OBJECT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"description": "the URI is outside the prefixes this service reads (or it reads none)"},
    404: {"description": "no object at the URI"},
    409: {"description": "the object changed while it was read"},
    502: {"description": "the object store refused the service's request"},
}
_OBJECT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["uri"], "additionalProperties": False, "properties": {
        "uri": {"type": "string", "description": "s3:// or gs:// URI of one volume (.nii, .nii.gz, .mha, a .zip of "
                                                 "one DICOM series) under a prefix the service reads"}}}}}}}
_VOLUME_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "one .nii, .nii.gz or .mha volume, or a .zip of one DICOM CT series"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}
_SLICES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": ".npy files, each a 2-D HU slice (H, W) or a stack (N, H, W)"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}


@serve.deployment(name="Ingress", max_ongoing_requests=32, max_queued_requests=32,
                  graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=60.0)
@serve.ingress(api)
class Ingress:
    """HTTP ingress on CPU: authorisation, capped body reads, decoding and preprocessing, then the model call."""

    def __init__(self, model: DeploymentHandle, preprocess: dict, options: IngressOptions | None = None):
        self.model = model
        self.settings = PreprocessSettings.from_dict(preprocess)
        self.options = options or IngressOptions()
        self.pool = ThreadPoolExecutor(max(1, self.options.decode_workers), thread_name_prefix="decode")
        limits = self.options.limits
        self.bodies = MemoryBudget(limits.max_inflight_body_bytes)
        self.spool = Spool(limits, self.options.spool_dir)
        self.decodes = MemoryBudget(limits.max_inflight_decode_bytes, "bytes of volume decoding",
                                    per_request=limits.max_request_decode_bytes, per_request_hint=WHOLE_DECODE_HINT)
        self.responses: Counter[str] = Counter()
        self.page = load_page()

    def __del__(self):  # Serve's graceful shutdown of the replica
        spool = getattr(self, "spool", None)
        if spool is not None:
            spool.remove()

    # ------------------------------------------------------------------ helpers
    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if not key_accepted(credentials, self.options.api_key_sha256):
            self.responses["401"] += 1
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _cpu(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    async def _body(self, request: Request, reservation: Reservation, limits: ServeLimits | None = None,
                    too_large: str = UPLOAD_TOO_LARGE) -> Body:
        """The request's body (in memory, or spooled to disk above the threshold), capped by `limits` (default: the
        service's; past the cap, 413 ending with `too_large`): close it when done (`with`)."""
        limits = limits or self.options.limits
        declared = check_content_length(dict(request.headers), limits, too_large)
        body = await read_body(request.stream(), limits, reservation, declared, self.spool, too_large)
        if body.size > limits.spool_threshold_bytes:  # Serve's messages of it are freed now: give them back
            await asyncio.to_thread(trim_heap)
        return body

    async def _uploads(self, request: Request, body: Body, filename: str | None) -> list[Upload]:
        """The files of a complete body, windows of it (a multipart body is parsed off the event loop: reading a
        spooled body of hundreds of MB takes a while)."""
        return await asyncio.to_thread(uploads_from_body, body.content, request.headers.get("content-type"),
                                       filename, self.options.limits)

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
            retry = {"Retry-After": str(BUSY_RETRY_AFTER_S)} if exc.status == 503 else None
            raise HTTPException(exc.status, exc.reason, headers=retry) from None
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
        return HTMLResponse(self.page.html, headers=self.page.headers)

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
    async def model_info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> JSONResponse:
        self._authorize(credentials)
        info = await self._call("describe")
        info["limits"] = self.options.limits.to_dict()
        info["auth"] = "bearer" if self.options.api_key_sha256 else "none"
        return JSONResponse(info)

    @api.get("/v1/stats", summary="Observed batch sizes of a model replica and this ingress's response counts",
             responses={401: _ERRORS[401]})
    async def stats(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> JSONResponse:
        self._authorize(credentials)
        model = await self._call("get_stats")
        return JSONResponse({"model": model, "ingress": {"replica": replica_id(), "responses": dict(self.responses)}})

    @api.post("/v1/predict/volume", summary="Predict one volume (.nii, .nii.gz, .mha, DICOM .zip)",
              openapi_extra=_VOLUME_BODY, responses=_ERRORS)
    async def predict_volume(
        self,
        request: Request,
        thumbnails: bool = Query(False, description="add base64 PNG thumbnails of the key slices"),
        filename: str | None = Query(None, description="file name for a raw (non-multipart) body, e.g. scan.nii.gz"),
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> JSONResponse:
        self._authorize(credentials)
        return await self._guard(self._predict_volume(request, thumbnails, filename))

    @api.post("/v1/predict/slices", summary="Predict 2-D HU slices (.npy: (H, W) each, or (N, H, W) stacks)",
              openapi_extra=_SLICES_BODY, responses=_ERRORS)
    async def predict_slices(
        self,
        request: Request,
        filename: str | None = Query(None, description="file name for a raw (non-multipart) body"),
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> JSONResponse:
        self._authorize(credentials)
        return await self._guard(self._predict_slices(request, filename))

    @api.post("/v1/predict/object", summary="Predict one volume read from object storage by its URI (no upload)",
              openapi_extra=_OBJECT_BODY, responses=_OBJECT_ERRORS)
    async def predict_object(
        self,
        request: Request,
        thumbnails: bool = Query(False, description="add base64 PNG thumbnails of the key slices"),
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> JSONResponse:
        self._authorize(credentials)
        return await self._guard(self._predict_object(request, thumbnails))

    # ------------------------------------------------------------------ work
    async def _predict_volume(self, request: Request, thumbnails: bool, filename: str | None) -> dict:
        # the upload counts against the budgets until answered; a spooled body's file goes when the request does
        with Reservation(self.bodies) as reservation:
            started = time.perf_counter()
            with await self._body(request, reservation) as body:
                upload = single_upload(await self._uploads(request, body, filename))
                return await self._volume(upload, thumbnails, started)

    async def _predict_object(self, request: Request, thumbnails: bool) -> dict:
        limits = self.options.limits
        with Reservation(self.bodies) as reservation:
            started = time.perf_counter()
            # the request only names the object: a few hundred bytes of JSON
            with await self._body(request, reservation, replace(limits, max_body_bytes=MAX_REQUEST_BYTES),
                                  OBJECT_REQUEST_TOO_LARGE) as body:
                uri = requested_uri(body.content.read_bytes(), self.options.object_prefixes)
            stored = await asyncio.to_thread(stat_object, uri, limits)
            stop = threading.Event()
            with Body(limits.spool_threshold_bytes, self.spool, reservation) as fetched:
                fetched.expect(stored.size)  # the budgets are the event loop's: reserved here, before the fetch
                try:
                    await asyncio.to_thread(fetch_object, stored, fetched, stop)
                finally:
                    stop.set()  # a deadline or a client gone: the fetch ends at its next chunk
                upload = Upload(filename=stored.filename, content=fetched.content)
                return await self._volume(upload, thumbnails, started)

    async def _volume(self, upload: Upload, thumbnails: bool, started: float) -> dict:
        limits = self.options.limits
        # the decode's share of memory, from the header (microseconds; a zip's directory: tens of milliseconds, so
        # off the event loop, not in the decode pool), reserved before the decode waits for a decode worker and held
        # until the answer (the scanned volume is read again to prepare it); 503 when the decode budget is spent
        with Reservation(self.decodes) as decoding:
            decoding.grow_to(await asyncio.to_thread(decode_estimate, upload.content, upload.filename, self.settings,
                                                     limits.read_limits))
            try:
                volume = await self._cpu(VolumeUpload, upload, limits)
                decoded = time.perf_counter()
                reply, (prepared, positions) = await self._model_call_with_settings("predict_volume", volume.prepare)
                modelled = time.perf_counter()
            finally:  # the decode's working buffers are freed by now: give them back
                await asyncio.to_thread(trim_heap)
        result = volume_response(reply, volume, slices_used=len(positions))
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
        with Reservation(self.bodies) as reservation:
            with await self._body(request, reservation) as body:
                uploads = await self._uploads(request, body, filename)
                slices = await self._cpu(decode_slices, uploads, limits)
            reply, _ = await self._model_call_with_settings("predict_slices",
                                                            functools.partial(prepare_slices, slices))
            return slices_response(reply, slices)
