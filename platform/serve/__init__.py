"""HTTP serving of model bundles on Ray Serve (depends on data and model only).

- :mod:`ctplatform.serve.app`: :func:`~ctplatform.serve.app.build_app` (one
  :class:`~ctplatform.config.serve.ServeConfig` in, the application out) and `app_builder` for Serve config files.
- :mod:`ctplatform.serve.ingress`: the CPU `Ingress` deployment: routes, request limits, error mapping.
- :mod:`ctplatform.serve.auth`: the API-key check. :mod:`ctplatform.serve.page`: the web page and its CSP.
- :mod:`ctplatform.serve.preprocessing`: uploads -> the model's int16 HU slices (no Ray).
- :mod:`ctplatform.serve.responses`: the prediction routes' JSON bodies (no Ray).
- :mod:`ctplatform.serve.model_deployment`: the batching `ModelServer` deployment and its `BatchStats`.
- :mod:`ctplatform.serve.inputs`: request bodies (no Ray): caps, multipart, .npy slices, volume upload limits.
- :mod:`ctplatform.serve.bundles`, :mod:`ctplatform.serve.thumbnails`: which bundle to serve; key-slice PNGs.
- :mod:`ctplatform.serve.cli`: the `ctplatform serve` command; `serve_config.yaml` for `serve deploy`.

Ray is imported by `app`, `ingress` and `model_deployment` only.
"""
