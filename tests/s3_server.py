"""A real S3-protocol server for the tests: moto in server mode on 127.0.0.1 and a free port, with credential
checking switched on (a wrong secret is refused, as a real store would).

`s3_server` (session) starts it once; `s3_bucket` (per test) makes a fresh bucket and sets the standard `AWS_*`
environment for the test, so every client (s3fs, pyarrow inside Ray, Ray's workers started by the test) finds the
endpoint and the credentials the way they would on a cluster.
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

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION)


def _create_user(endpoint: str) -> tuple[str, str]:
    """An IAM user allowed everything on S3 (made while moto still accepts any request)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
                       region_name=REGION)
    iam.create_user(UserName="tests")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="tests", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="tests")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="session")
def s3_server():
    port = free_port()
    with server_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                        "/moto-api/data.json", "moto server") as endpoint:
        access_key, secret_key = _create_user(endpoint)
        # From now on every request must be signed by a known key (moto's switch for IAM checking).
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).close()
        yield S3Server(endpoint, access_key, secret_key)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh, empty bucket as `s3://<name>`, with the AWS_* environment set for this test only."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"ct-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def ray_env(server: S3Server) -> dict[str, str]:
    """The same environment for processes the test starts itself (e.g. a `ctplatform` subprocess)."""
    return {**os.environ, **server.env()}
