"""The test service: a real Serve application (a random-weight efficientnet_b0 bundle at 64 px, 8 slices, and a
second bundle for rolling updates) on a local Ray, over real HTTP on 127.0.0.1. Test modules wrap
`running_service` in a module-scoped fixture; run them with the Ray lock held."""

import contextlib

import httpx
from local_server import free_port
from serve_payloads import MiB, chest, make_bundle, nifti_gz

KEY = "test-key-5f1c"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP = "ctplatform"


def app_options():
    """ServeConfig fields of the test service (a float32 128 x 128 x 96 volume is the most it decompresses; a body
    above 1 MiB is spooled to disk; uploads up to 8 MiB, objects read by URI up to 12 MiB)."""
    return dict(api_key=KEY, model_cpus=0.5, ingress_cpus=0.5, max_batch_slices=32, batch_wait_ms=50.0,
                request_timeout=30.0, max_ongoing=16, max_queued=4, max_body_mb=8, max_object_mb=12,
                max_voxels=128 * 128 * 96,
                max_decompressed_mb=128 * 128 * 96 * 4 / MiB, max_slices=64, spool_threshold_mb=1)


def app_config(bundle, **changes):
    from ctplatform.config.serve import ServeConfig

    return ServeConfig(bundle=str(bundle), **{**app_options(), **changes})


@contextlib.contextmanager
def running_service(root, env: dict | None = None, **changes):
    """Start the service with bundles `a` and `b` under `root`; yields what the tests use; shuts everything down.
    `env`: environment variables of every Ray worker (e.g. the S3 test server's credentials); `changes`: ServeConfig
    fields besides `app_options()`."""
    import ray
    from ray import serve

    from ctplatform.serve.app import build_app
    from ctplatform.serve.bundles import bundle_version

    # b also prepares slices differently (48 px): mid-rollout, an ingress of one version meets a model replica of
    # the other, which the service must absorb without failing the request
    bundles = {"a": make_bundle(root / "a", seed=0), "b": make_bundle(root / "b", seed=1, image_size=48)}
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        serve.run(build_app(app_config(bundles["a"], spool_dir=str(root / "spool"), **changes)), name=APP,
                  route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield {"client": client, "port": port, "url": f"http://127.0.0.1:{port}", "bundles": bundles,
                   "versions": {k: bundle_version(v) for k, v in bundles.items()}, "root": root,
                   "spool": root / "spool"}
    finally:
        serve.shutdown()
        ray.shutdown()


def post_volume(client, data, name="scan.nii.gz", headers=AUTH, **params):
    return client.post("/v1/predict/volume", files={"file": (name, data)}, headers=headers, params=params)


def assert_good_request_works(client):
    response = post_volume(client, nifti_gz(chest(seed=3)))
    assert response.status_code == 200, response.text
