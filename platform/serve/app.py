"""The Serve application builder: one :class:`~ctplatform.config.serve.ServeConfig` in, the bound application out.

The application is the CPU :class:`~ctplatform.serve.ingress.Ingress` (routes, auth, limits, preprocessing of
uploads) in front of the batching :class:`~ctplatform.serve.model_deployment.ModelServer`. `build_app` serves
code and the `serve` command; `app_builder` is the entry point of Serve config files (`serve_config.yaml`).
"""

from __future__ import annotations

from ray import serve

from ctplatform import storage
from ctplatform.config.serve import ServeConfig
from ctplatform.model.bundle_check import BundleSummary, check_bundle
from ctplatform.serve.auth import expected_key_hash
from ctplatform.serve.bundles import chosen_bundle
from ctplatform.serve.ingress import Ingress, IngressOptions
from ctplatform.serve.inputs import ServeLimits
from ctplatform.serve.model_deployment import ModelServer

APP_NAME = "ctplatform"
# Seconds a client refused for overload is told to wait (`Retry-After` on Serve's own 503 when the ingress queue is
# full; the ingress's 503s for a busy or restarting model carry theirs).
OVERLOAD_RETRY_AFTER_S = 1.0


def _replicas(options: dict, replicas: int | tuple[int, int] | None, target_ongoing: float) -> dict:
    """A fixed count, or (min, max) for autoscaling; None leaves both to Serve (and to a config file's overrides)."""
    if replicas is None:
        return options
    low, high = (replicas, replicas) if isinstance(replicas, int) else replicas
    if low == high:
        return {**options, "num_replicas": low}
    return {**options, "autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                              "target_ongoing_requests": target_ongoing,
                                              "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}}


def build_app(config: ServeConfig, checked: BundleSummary | None = None) -> serve.Application:
    """The Serve application for `config.bundle`: `serve.run(build_app(config), name=APP_NAME)`.

    A `(min, max)` replica pair turns on autoscaling; `num_gpus` (fractions allowed) is per model replica, and
    None means none here (the `serve` command first resolves it from the cluster). Running it again under the same
    application name with another bundle is a rolling update. Where and how to run it (`host`, `port`,
    `address`, `name`, `detach`) is the caller's business.
    """
    config.validate()
    bundle = chosen_bundle(config.bundle)
    if checked is None or checked.folder != bundle:
        checked = check_bundle(bundle)  # nothing is deployed from a bundle that would fail in a replica
    options = IngressOptions(limits=ServeLimits.from_config(config),
                             api_key_sha256=expected_key_hash(config.api_key, config.api_key_sha256),
                             request_timeout_s=config.request_timeout, decode_workers=config.decode_workers,
                             thumbnail_size=config.thumbnail_size, spool_dir=config.spool_dir,
                             object_prefixes=tuple(config.object_prefixes))
    model_options = _replicas(
        {"ray_actor_options": {"num_cpus": config.model_cpus, "num_gpus": config.num_gpus or 0.0},
         "max_ongoing_requests": config.model_max_ongoing_requests,
         "max_queued_requests": config.model_max_queued_requests,
         "graceful_shutdown_timeout_s": config.request_timeout},
        config.model_replicas, target_ongoing=max(2.0, config.model_max_ongoing_requests / 4))
    ingress_options = _replicas(
        {"ray_actor_options": {"num_cpus": config.ingress_cpus},
         "max_ongoing_requests": config.max_ongoing, "max_queued_requests": config.max_queued,
         "backpressure_config": {"retry_after_s": OVERLOAD_RETRY_AFTER_S},
         "graceful_shutdown_timeout_s": config.request_timeout},
        config.ingress_replicas, target_ongoing=max(1.0, config.max_ongoing / 2))
    # A URI goes to the replicas as it is: each copies it to its own node (a local path exists on this node only).
    source = config.bundle if config.bundle and storage.is_uri(config.bundle) else str(bundle)
    model = ModelServer.options(**model_options).bind(
        source, max_batch_slices=config.max_batch_slices, batch_wait_timeout_s=config.batch_wait_ms / 1000.0,
        batching=not config.no_batching, torch_threads=config.torch_threads)
    return Ingress.options(**ingress_options).bind(model, checked.metadata["preprocess"], options)


def app_builder(args: dict) -> serve.Application:
    """Application builder for `serve deploy` / `serve run` config files (see serve_config.yaml).

    `args` are :class:`ServeConfig` fields by name; `bundle` is required. Replica counts left out are Serve's (the
    file's deployments[].autoscaling_config decides). Without `api_key` or `api_key_sha256`, the key is read from
    $CTPLATFORM_API_KEY where the application is built.
    """
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("serve config: applications[].args.bundle (the model bundle folder) is required")
    for key in ("model_replicas", "ingress_replicas"):
        args.setdefault(key, None)
    if "api_key_sha256" in args:
        args.setdefault("api_key", None)  # the file's hash is the key: the environment's is not applied as well
    return build_app(ServeConfig.from_dict(args))
