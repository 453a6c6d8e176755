"""The demo's last step: serve a bundle on the running Ray, POST one volume over HTTP on loopback, stop serving."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

DEMO_APP = "ctplatform-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask_once(bundle: str | Path, volume: str | Path, *, port: int | None = None,
                       timeout_s: float = 300.0, quiet: bool = False, stop_serve: bool = True) -> dict:
    """Deploy `bundle` (small CPU shares, so it fits beside a finished sweep), predict `volume` through the real
    HTTP API, stop serving it (`quiet`: without Serve's INFO lines); returns the URL, the HTTP status, the
    round-trip time and the JSON answer.

    `stop_serve=False` deletes only the application and leaves Serve's controller and proxy to the caller's
    `ray.shutdown()` (an embedded Ray about to stop): `serve.shutdown()` makes Ray print a raylet line about the
    controller's retried shutdown task, which is how Serve stops its controller, not a fault."""
    import ray
    from ray import serve

    from ctplatform.config.serve import ServeConfig
    from ctplatform.ray_session import connect, shutdown_if
    from ctplatform.serve.app import build_app

    started_ray = connect(quiet=True) if not ray.is_initialized() else False
    port = port or _free_port()
    serve_log = logging.getLogger("ray.serve")
    level = serve_log.level
    if quiet:  # Serve's INFO lines on starting, deploying and stopping; its warnings and errors still show
        serve_log.setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": timeout_s})
        config = ServeConfig(bundle=str(bundle), api_key=None, model_cpus=0.5, ingress_cpus=0.5,
                             request_timeout=timeout_s)
        serve.run(build_app(config), name=DEMO_APP, route_prefix="/")
        path = Path(volume)
        url = f"http://127.0.0.1:{port}/v1/predict/volume?" + urllib.parse.urlencode({"filename": path.name})
        request = urllib.request.Request(url, data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, answer = response.status, json.loads(response.read())
        return {"url": f"http://127.0.0.1:{port}/", "status": status,
                "round_trip_ms": round(1000 * (time.perf_counter() - began), 1), "response": answer}
    finally:
        if stop_serve:
            serve.shutdown()
        else:
            serve.delete(DEMO_APP)
        serve_log.setLevel(level)
        shutdown_if(started_ray)
