"""API-key authentication of the /v1 routes: `Authorization: Bearer <key>`, compared by SHA-256 in constant time.

The deployment's configuration (visible in Serve's state) holds only the key's hash, never the key.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="the service's API key (when it was started with one)")


def hash_api_key(key: str) -> str:
    """SHA-256 (hex) of an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def expected_key_hash(api_key: str | None, api_key_sha256: str | None) -> str | None:
    """The hash requests are checked against: of the key, or the given hash; None when the service has no key."""
    if api_key:
        return hash_api_key(api_key)
    return api_key_sha256.lower() if api_key_sha256 else None


def key_accepted(credentials: HTTPAuthorizationCredentials | None, expected_sha256: str | None) -> bool:
    """Whether a request's bearer credentials pass: always without a configured key, else the key's hash must match."""
    if expected_sha256 is None:
        return True
    given = credentials.credentials if credentials is not None else ""
    return bool(given) and hmac.compare_digest(hash_api_key(given), expected_sha256)
