"""A small object store over one URL prefix: `file://`, `gs://` (or any cloud-files protocol).

Used by the run ledger and by overlap mode's temporary partial sums. Keys are relative to the
prefix, with '/' separators; objects are stored as given (never compressed).

- Reads, writes and listings go through cloud-files, which handles `file://`, `gs://` and
  credentials the way cloud-volume does. A missing object reads as None: that is the existence
  test (cloud-files' `exists` on gs:// uses the JSON batch API, see below).
- A write is atomic: a reader sees the old object or the whole new one. GCS gives that; on a
  local disk the bytes go to a hidden temporary file in the same folder that is then renamed
  over the key (cloud-files would write the key in place).
- Deletes on gs:// use the GCS JSON *batch* API through cloud-files (up to 100 deletes per
  request). A GCS emulator (`STORAGE_EMULATOR_HOST` set, e.g. fake-gcs-server) has no batch
  API, so there objects are deleted one request each, in a thread pool.
- `delete_prefix` on a local disk also removes the folders it empties under the prefix (the
  prefix's own folder included), so a deleted run leaves no empty tree behind.
- Every request to a bucket is retried on transient errors by `voxflow.retry`'s one policy
  (jittered backoff, a time budget, then `RetryBudgetExceeded`), installed on import here.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional

from cloudfiles import CloudFiles

from . import retry
from .geometry import ceil_div

retry.install()

THREADS = 16
_TMP_SUFFIX = ".voxflow-put"
# cloud-files lists local files without these endings (it treats them as compressed copies)
_COMPRESSED = (".gz", ".br", ".zstd", ".xz", ".bz2")


def normalize_url(url: str) -> str:
    """`file://` + absolute path for a local path; no trailing slash."""
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        path = os.path.abspath(os.path.expanduser(path))
        return "file://" + (path.rstrip("/") or "/")
    return url.rstrip("/")


def _check_key(key: str, *, prefix: bool = False) -> str:
    """Keys are relative '/'-separated paths without empty, '.' or '..' parts (a key may not
    climb out of the prefix) and without a compression ending (cloud-files would list
    `x.gz` on a local disk as `x`). A prefix may be empty or end with '/'."""
    if not isinstance(key, str):
        raise TypeError(f"storage key must be a string, not {type(key).__name__}")
    if prefix and key == "":
        return key
    parts = (key[:-1] if prefix and key.endswith("/") else key).split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"bad storage key {key!r}: use a relative path with '/' separators")
    if not prefix and key.endswith(_COMPRESSED):
        raise ValueError(f"bad storage key {key!r}: it ends like a compressed file")
    return key


def file_digest(url: str) -> Optional[str]:
    """`Storage.digest` of one file named by its URL or local path (None when missing)."""
    url = normalize_url(url)
    folder, name = url.rsplit("/", 1)
    return Storage(folder).digest(name)


class Storage:
    """Objects under one URL prefix: file://, gs:// (or any cloud-files protocol).

    `url` is normalised (plain local paths become `file://` URLs) and has no trailing slash.
    On gs:// `delete` and `delete_prefix` use GCS batch requests, except against an emulator
    (`STORAGE_EMULATOR_HOST` set: fake-gcs-server has no batch API), where they delete object
    by object in a thread pool.
    """

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.protocol = self.url.split("://", 1)[0]
        self._files = CloudFiles(self.url, progress=False)
        self._root = Path(self.url[len("file://"):]) if self.protocol == "file" else None

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # -- write ---------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        _check_key(key)
        if self._root is None:
            self._files.put(key, bytes(data), content_type="application/octet-stream",
                            compress=None)
            return
        path = self._root / key
        for attempt in range(3):          # a concurrent delete_prefix may remove the folder
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, path)
                finally:
                    if tmp.exists():
                        tmp.unlink(missing_ok=True)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Write many objects in parallel (a key given twice: ValueError, nothing written)."""
        items = list(items)
        keys = [_check_key(k) for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError("put_many got the same key more than once")
        self._parallel(lambda kv: self.put(*kv), items)

    # -- read ----------------------------------------------------------------------------
    def get(self, key: str) -> Optional[bytes]:
        """The object's bytes; None when it does not exist."""
        _check_key(key)
        if self._root is not None and (self._root / key).is_dir():
            return None
        return self._files.get(key)

    def get_range(self, key: str, start: int, stop: int) -> Optional[bytes]:
        """Bytes [start, stop) of an object (fewer at its end); None when it is missing."""
        _check_key(key)
        if self._root is not None:
            try:
                with open(self._root / key, "rb") as f:
                    f.seek(start)
                    return f.read(stop - start)
            except FileNotFoundError:
                return None
        return self._files.get({"path": key, "start": start, "end": stop})

    def digest(self, key: str) -> Optional[str]:
        """What the object's content is, cheaply: sha256 of a local file; the object's MD5
        (else CRC32C) from its metadata on a bucket — no download. None when missing."""
        _check_key(key)
        if self._root is not None:
            path = self._root / key
            if not path.is_file():
                return None
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return "sha256:" + h.hexdigest()
        try:
            head = self._files.head(key)
        except AttributeError:
            # cloud-files' GCS head of a missing object reads attributes of None
            if self._files.size(key) is None:
                return None
            raise
        if not head:
            return None
        for field, name in (("Content-Md5", "md5"), ("Content-Crc32c", "crc32c"),
                            ("ETag", "etag")):
            if head.get(field):
                return f"{name}:{head[field]}"
        return f"size:{head.get('Content-Length')}:{head.get('Last-Modified')}"

    def get_many(self, keys: Iterable[str]) -> dict[str, Optional[bytes]]:
        """key -> bytes (None when missing), read in parallel."""
        keys = list(dict.fromkeys(keys))
        for k in keys:
            _check_key(k)
        return dict(zip(keys, self._parallel(self.get, keys)))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys (relative to `url`) that start with `prefix` (a string prefix, like GCS's:
        "run-1/" is a folder, "run-1" also matches "run-10/..."), recursively, any order."""
        _check_key(prefix, prefix=True)
        for key in self._files.list(prefix):
            if self._root is not None and key.endswith(_TMP_SUFFIX) \
                    and posixpath.basename(key).startswith("."):
                continue                   # a write in flight (or one a crash left)
            yield key

    # -- delete --------------------------------------------------------------------------
    def delete(self, keys: Iterable[str]) -> None:
        """Delete the objects; missing keys are fine."""
        keys = list(dict.fromkeys(keys))
        for k in keys:
            _check_key(k)
        if not keys:
            return
        if self._root is not None:
            for k in keys:
                try:
                    os.remove(self._root / k)
                except (FileNotFoundError, IsADirectoryError):
                    pass
        elif self.protocol == "gs" and os.environ.get("STORAGE_EMULATOR_HOST"):
            self._parallel(self._delete_one, keys)
        else:
            self._files.delete(keys)       # batch requests on gs:// (and s3://)

    def _delete_one(self, key: str) -> None:
        """One object, one request (cloud-files' single-file call; it ignores NotFound)."""
        with self._files._get_connection() as conn:
            conn.delete_file(key)

    def delete_prefix(self, prefix: str = "") -> int:
        """Delete every object whose key starts with `prefix`; return how many there were.
        On a local disk the folders this empties are removed too."""
        keys = list(self.list(prefix))
        self.delete(keys)
        if self._root is not None:
            self._remove_empty_folders(prefix)
        return len(keys)

    def _remove_empty_folders(self, prefix: str) -> None:
        """Bottom-up, every folder under the prefix (the root itself when prefix is ""):
        stale temporary files of crashed writes go, then the folder if it is empty."""
        top = self._root / posixpath.dirname(prefix)
        if not top.is_dir():
            return
        for folder, _, files in os.walk(top, topdown=False):
            rel = Path(folder).relative_to(self._root).as_posix()
            rel = "" if rel == "." else rel + "/"
            if not rel.startswith(prefix):
                continue
            for name in files:
                if name.startswith(".") and name.endswith(_TMP_SUFFIX) \
                        and (rel + name).startswith(prefix):
                    Path(folder, name).unlink(missing_ok=True)
            try:
                os.rmdir(folder)
            except OSError:
                pass                       # not empty (other keys, a concurrent write)

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _parallel(fn, items: list) -> list:
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(THREADS, len(items))) as pool:
            return list(pool.map(fn, items))


class RequestCounter:
    """Counts the requests made through one `Storage` as GCS bills them: a GET or PUT per
    key, a list call per 1000 keys listed (a page). How the benchmarks and tests show that a
    poll costs O(1) calls; it wraps the instance's methods, so use it on a storage of its own."""

    def __init__(self, storage: "Storage"):
        self.count = 0
        self._lock = threading.Lock()
        get, put, list_ = storage.get, storage.put, storage.list

        def listed(prefix: str = "") -> Iterator[str]:
            keys = list(list_(prefix))
            self._add(max(1, ceil_div(len(keys), 1000)))
            return iter(keys)
        storage.get = lambda key: self._add(1) or get(key)
        storage.put = lambda key, data: self._add(1) or put(key, data)
        storage.list = listed

    def _add(self, n: int) -> None:
        with self._lock:
            self.count += n
