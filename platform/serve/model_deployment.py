"""The batching model deployment: a replica holds one bundle's model and forwards prepared slices in batches.

It receives int16 HU slices already selected and resized by the ingress, so a GPU replica only windows and runs
the model (plus the microseconds of slice->volume aggregation and calibration, kept beside the weights so a
prediction and its `model_version` always come from one bundle, even mid-rollout). `@serve.batch` puts the slices
of concurrent requests into one forward; :class:`BatchStats` records the batch sizes it achieved. Predictions
are :class:`ctplatform.evaluation.predictor.Predictor`'s: it turns the batched logits into probabilities.
"""

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from ctplatform.evaluation.decision import DECISION_THRESHOLD
from ctplatform.serve.bundles import bundle_version, chosen_bundle, preprocess_fingerprint

logger = logging.getLogger("ray.serve")


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


def replica_id() -> str:
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

        from ctplatform.evaluation.predictor import Predictor
        from ctplatform.model.bundle import load_checked_bundle
        from ctplatform.model.bundle_check import check_bundle

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        # a URI: this node's copy of it; the files this replica reads are checked (they may not be the driver's)
        checked = check_bundle(chosen_bundle(bundle_path))
        model, spec = load_checked_bundle(checked)
        self.predictor = Predictor(model, spec, device=self.device, batch_size=max_batch_slices)
        self.metadata = checked.metadata
        self.version = bundle_version(checked.folder)
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
        mismatch = self._mismatch(preprocess)
        if mismatch:
            return mismatch
        if self.predictor.is_mil:  # the attention head needs the whole volume: not batched across requests
            start = time.perf_counter()
            prediction = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.predictor.predict_prepared, slices, positions)
            self.stats.record(1, len(slices), time.perf_counter() - start)
        else:
            prediction = self.predictor.volume_from_slice_logits(await self._logits(slices), positions)
        return {"status": "ok", "model_version": self.version, "prediction": prediction}

    async def predict_slices(self, slices: np.ndarray, preprocess: dict) -> dict:
        """Resized (N, S, S) int16 HU slices -> raw and calibrated (N, C) probabilities, as Predictor.predict_slices."""
        mismatch = self._mismatch(preprocess)
        if mismatch:
            return mismatch
        raw, calibrated = self.predictor.slices_from_logits(await self._logits(slices))
        return {"status": "ok", "model_version": self.version, "raw": raw, "calibrated": calibrated}

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
        return {"replica": replica_id(), "model_version": self.version, "device": self.device,
                "batching": self.batching, **self.stats.to_dict()}

    def check_health(self) -> None:
        if self._failure:
            raise RuntimeError(self._failure)
