"""HTTP serving of model bundles on Ray Serve (depends on data and model only; Ray is imported in `app` alone).

- :mod:`ctplatform.serve.inputs`: upload parsing and validation (no Ray): caps, volume and .npy checks.
- :mod:`ctplatform.serve.app`: the Serve deployments (CPU `Preprocessor` ingress, batching `ModelServer`) and
  :func:`~ctplatform.serve.app.build_app`.
- :mod:`ctplatform.serve.cli`: the `ctplatform serve` command; `serve_config.yaml` for `serve deploy`.
"""
