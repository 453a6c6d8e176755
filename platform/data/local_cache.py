"""A node-local copy of a slice cache kept in object storage: the first epoch streams each volume file from the
store as it is first read, later epochs read local disk.

Several training processes on one node share one copy (`$CTPLATFORM_CACHE_DIR`, default `~/.cache/ctplatform`,
one folder per cache URI): each file is downloaded under a temporary name and renamed into place, so a reader
sees a whole file or none, and two processes fetching the same file at once both end with the same bytes. The copy
is bounded: once it holds more than its limit, the least recently used files are deleted (a process that has one
memory-mapped keeps reading it; POSIX keeps the data until it is unmapped, and a later open fetches it again).

Volume files are immutable once listed in the index (prepare writes a volume before its record, and the index
lists recorded volumes only), so a local copy never goes stale; index.parquet and cache.json are fetched anew
each time the cache is opened.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ctplatform import storage

GIB = 1 << 30
# Check the bound after this share of the limit has been fetched by this process (a walk of the folder each time a
# file arrives would cost more than the file).
_CHECK_EVERY = 0.02
ALWAYS_FRESH = ("index.parquet", "cache.json")


def cache_home() -> Path:
    return Path(os.environ.get("CTPLATFORM_CACHE_DIR", "~/.cache/ctplatform")).expanduser()  # as storage's


class NodeLocalCache:
    """Files of `uri`, fetched to node-local disk on first use (picklable: DataLoader workers get their own)."""

    def __init__(self, uri: str, limit_gb: float = 50.0, home: str | Path | None = None):
        self.uri = uri
        self.limit_bytes = int(limit_gb * GIB)
        self.root = Path(home or cache_home()) / "slices" / hashlib.sha256(uri.encode()).hexdigest()[:20]
        self._fetched = 0

    def __getstate__(self):
        return {"uri": self.uri, "limit_bytes": self.limit_bytes, "root": self.root}

    def __setstate__(self, state):
        self.__dict__.update(state, _fetched=0)

    def fetch(self, relative: str) -> Path:
        """Download `relative` anew (whole, then renamed into place) and return its local path."""
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        download = target.with_name(f".{target.name}.{uuid.uuid4().hex}.download.part")
        try:
            fs, path = storage.filesystem(storage.join(self.uri, relative))
            fs.get_file(path, str(download))
            # Rewritten in one write (a volume file is a few MB) rather than kept as the client's 64 KiB writes:
            # the page cache then holds it in large folios, and later epochs' memory-mapped reads fault less
            # (measured here: 1.2x slower per slice from a file written in 64 KiB pieces; +2 ms per 3 MB file).
            # s3fs's own whole-object read (cat_file) would avoid the rewrite but downloads at half the speed.
            partial.write_bytes(download.read_bytes())
            os.replace(partial, target)
        finally:
            download.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
        self._fetched += target.stat().st_size
        if self._fetched > _CHECK_EVERY * self.limit_bytes:
            self._fetched = 0
            self.evict(keep=target)
        return target

    def path(self, relative: str) -> Path:
        """The local path of `relative`, fetched if this node has no copy yet."""
        target = self.root / relative
        if relative not in ALWAYS_FRESH:
            try:
                os.utime(target)  # marks it recently used; fails when there is no copy
                return target
            except FileNotFoundError:
                pass
        return self.fetch(relative)

    def prefetch(self, relatives: list[str], threads: int = 4) -> threading.Thread:
        """Fetch `relatives` in the background (in this order, `threads` downloads at once, stopping at the
        limit), so a first epoch finds most files already local instead of waiting for each one; a file a reader
        needs first is fetched by that reader (the rename makes a double fetch harmless)."""
        def run() -> None:
            budget = self.limit_bytes
            with ThreadPoolExecutor(threads) as pool:
                for size in pool.map(self._prefetch_one, relatives):
                    budget -= size
                    if budget <= 0:
                        break

        thread = threading.Thread(target=run, name="ctplatform-prefetch", daemon=True)
        thread.start()
        return thread

    def _prefetch_one(self, relative: str) -> int:
        target = self.root / relative
        try:
            return target.stat().st_size if target.exists() else self.fetch(relative).stat().st_size
        except Exception:  # only a missed head start: the reader that needs the file fetches it and reports errors
            return 0

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _files(self) -> list[Path]:
        found = []
        for folder, _, names in os.walk(self.root):
            found.extend(Path(folder, n) for n in names if not n.endswith(".part") and n not in ALWAYS_FRESH)
        return found

    def evict(self, keep: Path | None = None) -> int:
        """Delete the least recently used volume files until the copy fits its limit; returns the bytes freed."""
        entries = []
        for file in self._files():
            try:
                info = file.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            entries.append((info.st_mtime, info.st_size, file))
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, file in sorted(entries, key=lambda e: e[0]):
            if total - freed <= self.limit_bytes:
                break
            if file == keep:
                continue
            file.unlink(missing_ok=True)
            freed += size
        return freed
