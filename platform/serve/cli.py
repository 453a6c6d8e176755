"""`ctplatform serve`: deploy the HTTP service on the embedded local Ray or on a cluster (`--address`).

Importing this module is cheap: Ray, torch and the Serve app load when the command runs. The flags are generated
from :class:`ctplatform.config.serve.ServeConfig`.
"""

from __future__ import annotations

import ipaddress
import signal
import sys
import time

from ctplatform.config.serve import API_KEY_ENV, ServeConfig

DESCRIPTION = ("Deploy the HTTP service (FastAPI on Ray Serve): POST volumes or .npy slices, get calibrated "
               "per-class probabilities. Binds 127.0.0.1 unless --host says otherwise.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(config: ServeConfig) -> int:
    import ray
    from ray import serve

    from ctplatform import storage
    from ctplatform.model.bundle_check import check_bundle
    from ctplatform.ray_session import cluster_has_gpus, connect
    from ctplatform.serve.app import build_app
    from ctplatform.serve.bundles import bundle_version, chosen_bundle

    config = config.replace(api_key=config.api_key or None)  # an empty key, from the flag or the environment: none
    bundle = chosen_bundle(config.bundle)  # a URI: copied here
    is_uri = config.bundle is not None and storage.is_uri(config.bundle)  # the replicas copy a URI to their nodes
    config = config.replace(bundle=config.bundle if is_uri else str(bundle)).validate()
    checked = check_bundle(bundle)  # a bad bundle stops here, in seconds and before Ray starts, with one line (exit 2)
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
        app = build_app(config, checked)
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
