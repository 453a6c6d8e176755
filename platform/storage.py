"""One helper for every path a user gives: a local folder or file, or an object-store URI (`s3://`, `gs://`, any
fsspec URL).

Why one place: `Path("s3://b/x")` silently becomes the local `s3:/b/x`, so a URI handed to pathlib writes a stray
local folder and reports success. Every path option of the command line is parsed by :func:`user_path` and every
read or write of a URI goes through the functions here (fsspec underneath).

Credentials and endpoint come from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for S3-compatible stores such as MinIO, Ceph, R2;
`GOOGLE_APPLICATION_CREDENTIALS` for gs://, and `STORAGE_EMULATOR_HOST` for a local GCS emulator). The endpoint is
passed to s3fs explicitly, as not every client version reads `AWS_ENDPOINT_URL` itself.

Writes of one object are whole or nothing: an object store publishes an object only when its upload completes
(a multipart upload too), and a local file is written to a temp file and renamed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

_URI = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>.*)$")
# S3's bucket naming rules (the common subset; a name outside them can never exist, so say so at once).
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Google Cloud Storage's: 3 to 63 characters (up to 222 when dotted, each dot-separated part at most 63), lowercase
# letters, digits, hyphens, underscores and dots, starting and ending with a letter or digit.
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class StorageError(ValueError):
    """A path or URI that cannot be used: the message is one line naming the location and the problem."""


def is_uri(text: str | os.PathLike) -> bool:
    """True for `scheme://...` (object stores, file://); False for local paths."""
    return isinstance(text, str) and _URI.match(text) is not None


def scheme(uri: str) -> str:
    match = _URI.match(uri)
    return match["scheme"].lower() if match else "file"


def user_path(text: str) -> str:
    """Parse a path option: a local path stays as given; a URI is checked for a known scheme and a valid bucket name
    (no network access: reachability is :func:`check_access`'s job, before a command starts)."""
    text = str(text)
    if not is_uri(text):
        return text
    kind = scheme(text)
    import fsspec

    if kind not in fsspec.available_protocols():
        raise StorageError(f"{text}: unknown storage scheme {kind!r}")
    if kind in ("s3", "s3a"):
        bucket = _URI.match(text)["rest"].split("/", 1)[0]
        if not _S3_BUCKET.match(bucket):
            raise StorageError(f"{text}: invalid S3 bucket name {bucket!r} (3 to 63 lowercase letters, digits, dots, "
                               "hyphens)")
    if kind in ("gs", "gcs"):
        bucket = _URI.match(text)["rest"].split("/", 1)[0]
        if not _GCS_BUCKET.match(bucket) or max(map(len, bucket.split("."))) > 63:
            raise StorageError(f"{text}: invalid GCS bucket name {bucket!r} (3 to 63 lowercase letters, digits, "
                               "hyphens, underscores, dots)")
    return text.rstrip("/") if text.rstrip("/") != f"{kind}:/" else text


def user_paths(values) -> list[str]:
    """:func:`user_path` for a list option (`--predict-input A B`)."""
    return [user_path(v) for v in (values if isinstance(values, list | tuple) else [values])]


def filesystem(location: str):
    """(fsspec filesystem, the path within it) for a local path or a URI."""
    import fsspec

    if not is_uri(location):
        return fsspec.filesystem("file"), str(Path(location).resolve())
    kind = scheme(location)
    if kind in ("gs", "gcs"):
        return _gcs_filesystem(location)
    options: dict = {}
    if kind in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        # Credentials given in the environment are passed on explicitly: fsspec reuses a filesystem built with the
        # same arguments, and one built under other credentials must not be reused. Without them, boto's own chain
        # (instance profile, IRSA web identity) applies.
        for name, variable in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                               ("token", "AWS_SESSION_TOKEN")):
            if os.environ.get(variable):
                options[name] = os.environ[variable]
        # No listing cache: several processes write the same prefix, and a stale listing would hide their objects.
        options["use_listings_cache"] = False
    fs, path = fsspec.core.url_to_fs(location, **options)
    return fs, path


def _gcs_filesystem(location: str):
    """gcsfs for a gs:// URI. Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, else Google's default chain (workload
    identity, the node's service account). With `STORAGE_EMULATOR_HOST` set (a local GCS emulator) and no
    credentials file, requests go unsigned (`token="anon"`): an emulator checks none, and the default chain would
    first probe the cloud metadata server. Against an emulator the JSON-API client is used directly: the gcsfs
    default (its "extended" file system) first asks Google's gRPC storage-control API for each bucket's type, which
    an emulator does not serve (60 s of retries per bucket)."""
    try:
        import gcsfs.core
    except ImportError:
        raise StorageError(f"{location}: gs:// paths need gcsfs: pip install 'ctplatform[gcs]'") from None
    import fsspec

    # No listing cache: several processes write the same prefix, and a stale listing would hide their objects.
    options: dict = {"use_listings_cache": False}
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        if not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            options["token"] = "anon"
        fs = gcsfs.core.GCSFileSystem(**options)
        return fs, fs._strip_protocol(location)
    return fsspec.core.url_to_fs(location, **options)


def absolute(location: str) -> str:
    """A URI as given; a local path made absolute (Ray workers run in other directories)."""
    return location if is_uri(location) else str(Path(location).resolve())


def local_work_dir(kind: str, location: str, name: str) -> Path:
    """A node-local folder for the files a command writes before they are uploaded to `location` (a URI): under
    `$CTPLATFORM_CACHE_DIR` (default ~/.cache/ctplatform), never the working directory; the same URI and name give
    the same folder, so a rerun on this node finds what it left."""
    import hashlib

    home = Path(os.environ.get("CTPLATFORM_CACHE_DIR", "~/.cache/ctplatform")).expanduser()
    return home / kind / hashlib.sha256(location.encode()).hexdigest()[:12] / name


def with_scheme(path: str, uri: str) -> str:
    """`path` as a URI of `uri`'s store: Ray reports checkpoint paths without their scheme (`bucket/run/...`)."""
    if is_uri(path) or not is_uri(uri):
        return path
    return f"{scheme(uri)}://{path if scheme(uri) != 'file' else '/' + path.lstrip('/')}"


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a URI or a local path (a URI keeps its scheme)."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.exists(path)


def is_file(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.isfile(path)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    return fs.cat_file(path)


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str, data: bytes, *, keep_cached: bool = True) -> str:
    """Write one file or object whole (see the module note); `keep_cached=False`: a local file's pages leave the
    page cache once on disk (`atomic.write_atomic`)."""
    if not is_uri(location):
        from ctplatform.atomic import write_bytes_atomic

        write_bytes_atomic(location, data, keep_cached=keep_cached)
        return location
    fs, path = filesystem(location)
    fs.pipe_file(path, data)
    return location


def remove(location: str) -> None:
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(location: str) -> list[str]:
    """Every file below `location`, as paths relative to it, sorted (directory markers left out)."""
    fs, root = filesystem(location)
    if not fs.exists(root):
        return []
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    return sorted(p[len(root) + 1:] for p, info in found.items()
                  if info.get("type") != "directory" and not p.endswith("/") and p != root)


def download(location: str, target: str | Path) -> Path:
    """Copy a file or a folder (every file below it) at `location` to the local `target`; each file lands whole
    (temp name, then rename), so a reader of `target` never sees half a file."""
    target = Path(target)
    fs, path = filesystem(location)
    if fs.isfile(path):
        _get_file(fs, path, target)
        return target
    for relative in list_files(location):
        _get_file(fs, f"{path.rstrip('/')}/{relative}", target / relative)
    return target


def _get_file(fs, path: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        fs.get_file(path, str(partial))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def local_copy(location: str) -> Path:
    """A node-local copy of the file or folder at a URI (a local path is returned as it is), made once per version:
    the copy's folder is named by the objects' names, sizes and ETags (or modification times), so several
    processes on one node share one copy and a changed object gets a new one. The copy appears by one rename."""
    import hashlib
    import json
    import tempfile

    if not is_uri(location):
        return Path(location)
    fs, root = filesystem(location)
    root = root.rstrip("/")
    single = fs.isfile(root)
    found = {root: fs.info(root)} if single else fs.find(root, detail=True)
    files = {p: i for p, i in found.items() if i.get("type") != "directory" and not p.endswith("/")}
    if not files:
        raise FileNotFoundError(f"{location}: no such file or folder")
    signature = json.dumps(sorted((p, i.get("size"), str(_version_of(i))) for p, i in files.items()))
    folder = local_work_dir("copies", location, hashlib.sha256(signature.encode()).hexdigest()[:16])
    name = root.rsplit("/", 1)[-1]
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
        try:
            for path in files:
                target = partial / name if single else partial / name / path[len(root) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(path, str(target))
            with contextlib.suppress(OSError):  # OSError: another process made the same copy first
                os.rename(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder / name


def _version_of(info: dict):
    """What changes when an object is rewritten: its ETag (s3fs `ETag`, gcsfs `etag`; GCS also numbers each write,
    `generation`), else its modification time."""
    return (info.get("ETag") or info.get("etag") or info.get("generation") or info.get("mtime")
            or info.get("LastModified"))


def upload(source: str | Path, location: str) -> list[str]:
    """Copy a local file, or every file below a local folder, to `location`; returns the locations written."""
    source = Path(source)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    written = []
    for file in files:
        target = location if file == source else join(location, file.relative_to(source).as_posix())
        if is_uri(target):
            fs, path = filesystem(target)
            fs.put_file(str(file), path)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        written.append(target)
    return written


def check_access(location: str) -> None:
    """Stop with one line when a URI's bucket is missing or the credentials are refused (local paths: nothing to
    check here; commands report missing local files themselves). Called before any command starts Ray."""
    if not is_uri(location) or scheme(location) == "file":
        return
    if scheme(location) in ("gs", "gcs"):
        _check_google_credentials_file(location)
    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        with _quiet("gcsfs"):  # gcsfs logs a refused request with its traceback; the one line below says it all
            fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StorageError(f"{location}: bucket {bucket!r} does not exist") from None
    except PermissionError as exc:
        raise StorageError(f"{location}: access denied ({_reason(exc)}); {_credentials_hint(location)}") from None
    except OSError as exc:
        if str(exc).startswith("Forbidden"):  # gcsfs reports HTTP 403 as a plain OSError
            raise StorageError(f"{location}: access denied ({_reason(exc)}); {_credentials_hint(location)}") from None
        raise StorageError(f"{location}: storage not reachable ({_reason(exc)})") from None
    except Exception as exc:
        # gcsfs raises its own HttpError (not an OSError) for HTTP 401: no or unusable credentials
        if getattr(exc, "code", None) in (401, 403):
            raise StorageError(f"{location}: access denied ({_reason(exc)}); {_credentials_hint(location)}") \
                from None
        raise


def _check_google_credentials_file(location: str) -> None:
    """A `GOOGLE_APPLICATION_CREDENTIALS` file that is missing or unreadable is an error here: gcsfs would go on
    without credentials (anonymous requests), and the command would fail later, or read a public bucket, unsigned."""
    credentials = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not credentials:
        return
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError:
        return  # gcsfs (which brings google-auth) is missing: filesystem() says so
    try:
        google.auth.load_credentials_from_file(credentials)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise StorageError(f"{location}: GOOGLE_APPLICATION_CREDENTIALS={credentials} is not a usable credentials "
                           f"file ({_reason(exc)})") from None


@contextlib.contextmanager
def _quiet(logger_name: str):
    import logging

    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _credentials_hint(location: str) -> str:
    if scheme(location) in ("gs", "gcs"):
        return "check GOOGLE_APPLICATION_CREDENTIALS (or the node's service account)"
    return "check the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the node's role)"


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
