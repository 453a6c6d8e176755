"""A real GCS-protocol server for the tests: `gcp-storage-emulator` (Google Cloud Storage's JSON API, in memory) on
127.0.0.1 and a free port.

`gcs_server` (session) starts it once; `gcs_bucket` (per test) makes a fresh bucket through the JSON API itself and
sets `STORAGE_EMULATOR_HOST` for the test, the variable Google's clients (and gcsfs) read for an emulator, so the
platform reaches it exactly as a user pointing it at an emulator would. The emulator checks no credentials.

`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` is deliberately left alone: `ctplatform.storage` itself must avoid gcsfs's gRPC
bucket-type lookup against an emulator (it hangs 60 s per bucket there), and the tests' time limits would show it.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
from local_server import free_port, server_process


@dataclass(frozen=True)
class GCSServer:
    endpoint: str

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=ctplatform-tests",
                                         data=json.dumps({"name": name}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()

    def object_names(self, bucket: str) -> list[str]:
        """Every object's name in `bucket`, read through the JSON API (independent of gcsfs), sorted."""
        names: list[str] = []
        token = ""
        while True:
            url = f"{self.endpoint}/storage/v1/b/{bucket}/o" + (f"?pageToken={token}" if token else "")
            with urllib.request.urlopen(url, timeout=10) as answer:
                page = json.load(answer)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)


@pytest.fixture(scope="session")
def gcs_server():
    port = free_port()
    with server_process([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port",
                         str(port), "--in-memory"], port, "/storage/v1/b?project=ctplatform-tests",
                        "gcp-storage-emulator") as endpoint:
        yield GCSServer(endpoint)


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch) -> str:
    """A fresh, empty bucket as `gs://<name>`, with STORAGE_EMULATOR_HOST set for this test only (and no Google
    credentials file, as on a machine without a Google account)."""
    for name, value in gcs_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    bucket = f"ct-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(bucket)
    return f"gs://{bucket}"


def gcs_env(server: GCSServer) -> dict[str, str]:
    """The same environment for processes the test starts itself (e.g. a `ctplatform` subprocess)."""
    return {**{k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}, **server.env()}
