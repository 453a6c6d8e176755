"""The command line's side of object storage: check every URI a command was given, before it starts anything, and
stage the small ones (a CSV, a bundle, a report folder) through local temporary copies.

Each path option says how it is treated (`option(path=...)` in `ctplatform.config.options`):
- "read": the file or folder is copied to a local temp folder and the command sees that copy;
- "write": the command writes into a local temp folder; when it succeeds, everything written there is uploaded
  beside the URI (so `--output s3://b/p.csv` also uploads the `p.json` written beside it);
- "uri": the command handles the URI itself (data sets, slice caches, run storage: too large to copy whole).
Nothing is left in the working directory: the temp folders are removed when the command ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctplatform import storage


def path_fields(config: Any) -> list[tuple[str, str, list[str]]]:
    """(field name, kind, the URIs it holds) for each path option of `config` that holds a URI."""
    found = []
    for item in dataclasses.fields(config):
        kind = item.metadata.get("path")
        value = getattr(config, item.name)
        if kind is None or value is None:
            continue
        values = list(value) if isinstance(value, list | tuple) else [value]
        uris = [v for v in values if storage.is_uri(v) and storage.scheme(v) != "file"]
        if uris:
            found.append((item.name, kind, uris))
    return found


def check_uris(config: Any) -> None:
    """One line (StorageError) for the first URI whose bucket is missing or whose credentials are refused."""
    for _, _, uris in path_fields(config):
        for uri in uris:
            storage.check_access(uri)


def _name_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or "root"


@contextlib.contextmanager
def staged(config: Any) -> Iterator[Any]:
    """`config` with every "read" URI replaced by a local copy and every "write" URI by a local temp path; the
    written files are uploaded when the block ends without an error."""
    check_uris(config)
    plan = [(name, kind, uris) for name, kind, uris in path_fields(config) if kind in ("read", "write")]
    if not plan:
        yield config
        return
    with tempfile.TemporaryDirectory(prefix="ctplatform-stage-") as temp:
        changes: dict[str, Any] = {}
        uploads: list[tuple[Path, str]] = []
        names: dict[str, str] = {}  # local copy -> the URI the user gave (for error messages)
        for number, (name, kind, _) in enumerate(plan):
            value = getattr(config, name)
            values = list(value) if isinstance(value, list | tuple) else [value]
            local_values = []
            for j, item in enumerate(values):
                if not (storage.is_uri(item) and storage.scheme(item) != "file"):
                    local_values.append(item)
                    continue
                folder = Path(temp, f"{number}-{j}")
                local = folder / _name_of(item)
                if kind == "read":
                    if not storage.exists(item):
                        raise FileNotFoundError(f"{item}: no such file or folder")
                    storage.download(item, local)
                else:
                    folder.mkdir(parents=True)
                    uploads.append((folder, item.rstrip("/").rsplit("/", 1)[0]))
                local_values.append(str(local))
                names[str(local)] = item
            changes[name] = local_values if isinstance(value, list | tuple) else local_values[0]
        try:
            yield dataclasses.replace(config, **changes)
        except (ValueError, FileNotFoundError) as exc:
            renamed = _named_by_uri(exc, names)
            if renamed is None:
                raise
            raise renamed from None
        for folder, parent in uploads:
            storage.upload(folder, parent)


def _named_by_uri(exc: Exception, names: dict[str, str]) -> Exception | None:
    """The same error naming the URIs the user gave instead of their temporary local copies (None: nothing to
    rename, or an error type this cannot rebuild)."""
    def rename(text: str) -> str:
        for local, uri in sorted(names.items(), key=lambda pair: -len(pair[0])):
            text = text.replace(local, uri)
        return text

    if not any(local in str(exc) for local in names):
        return None
    if hasattr(exc, "problem") and hasattr(exc, "path"):  # ctplatform.data.errors.DataFormatError and kin
        return type(exc)(rename(exc.path), rename(exc.problem), column=getattr(exc, "column", None),
                         row=getattr(exc, "row", None))
    if type(exc) in (ValueError, FileNotFoundError):
        return type(exc)(rename(str(exc)))
    return None
