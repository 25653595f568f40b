"""The one retry policy of voxflow's storage I/O: every request to a bucket, whoever makes it
(`Storage` for the ledger and overlap partials, cloud-volume for layers).

What the libraries do on their own (google-cloud-storage 3.x, cloud-files 6.x) is two stacked
layers, neither visible in a log: google-cloud-storage retries 408/429/5xx, connection errors
and timeouts per request for up to 120 s (1 s doubling to 60 s, jittered), and cloud-files
wraps each of its GCS calls in tenacity — 7 attempts, up to 63 s of random exponential waits,
on *every* exception but NotFound (a 403 is retried too; a HEAD of a missing object fails
with an AttributeError that is retried 7 times). A request could hang ~15 minutes before a
task learned of it, and a listing (a generator) was not retried by cloud-files at all.

`install()` replaces both with this policy, at the one level where every GCS request passes
— the methods of cloud-files' `GoogleCloudStorageInterface` (their own bodies, tenacity
taken off) — and turns google-cloud-storage's per-call default retry off for the calls those
bodies make. So a request is retried only on a transient error (`transient`), with jittered
exponential backoff, while its time budget lasts; then `RetryBudgetExceeded` is raised, the
task fails and the queue retries it. Retrying per request (not per task) matters: a task
writes hundreds of chunks, and a 5% error rate would almost never let all of them through
in one go. Other cloud-files protocols (s3://, http://) keep their own retries; file:// has
none (a local disk's errors are not transient).

Settings (environment, read at each request, so operators and tests can change them):
`VOXFLOW_STORAGE_RETRY_SECONDS` (total budget per request from its first attempt, default
60), `VOXFLOW_STORAGE_RETRY_INITIAL` (first delay, 0.5), `VOXFLOW_STORAGE_RETRY_MAX` (longest
delay, 8). Each attempt is also bounded by google-cloud-storage's request timeout (60 s).

Every retry is counted (`retry_count`) and reported to the listeners (`add_listener`): the
worker logs each as a `storage_retry` event and the total in `worker_stopped`.
"""
from __future__ import annotations

import functools
import http.client
import inspect
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
Listener = Callable[..., None]
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_log = logging.getLogger("voxflow.retry")


class RetryBudgetExceeded(ConnectionError):
    """A storage request kept failing with transient errors until its budget was spent."""


@dataclass(frozen=True)
class RetryPolicy:
    budget: float = 60.0       # seconds from the first attempt; no attempt starts after it
    initial: float = 0.5       # the first delay's upper bound
    maximum: float = 8.0       # no delay is longer

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """The policy the environment sets (defaults where it says nothing)."""
        def seconds(name: str, default: float) -> float:
            text = os.environ.get(name)
            try:
                value = default if text is None else float(text)
            except ValueError:
                value = -1.0
            if not value >= 0:
                raise ValueError(f"{name}={text!r} is not a number of seconds >= 0")
            return value
        return cls(seconds("VOXFLOW_STORAGE_RETRY_SECONDS", cls.budget),
                   seconds("VOXFLOW_STORAGE_RETRY_INITIAL", cls.initial),
                   seconds("VOXFLOW_STORAGE_RETRY_MAX", cls.maximum))

    def delay(self, retry: int, rng: random.Random) -> float:
        """Before retry number `retry` (1, 2, ...): uniform in [cap/2, cap], cap = initial ·
        2^(retry-1) up to `maximum` — doubling like any backoff, jittered so that workers
        that failed together do not come back together, never a near-zero hot loop."""
        cap = min(self.maximum, self.initial * 2 ** (retry - 1))
        return rng.uniform(cap / 2, cap)

    def call(self, fn: Callable[[], T], op: str, target: str,
             sleep: Callable[[float], None] = time.sleep) -> T:
        """`fn()`, retried on transient errors while the budget lasts."""
        rng = random.Random()
        start = time.monotonic()
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as exc:
                if not transient(exc):
                    raise
                elapsed = time.monotonic() - start
                pause = self.delay(attempt, rng)
                if elapsed + pause > self.budget:
                    raise RetryBudgetExceeded(
                        f"{op} {target}: gave up after {attempt} attempts in {elapsed:.1f} s "
                        f"(storage retry budget {self.budget:g} s, "
                        f"VOXFLOW_STORAGE_RETRY_SECONDS): {_describe(exc)}") from exc
                _report(op=op, target=target, attempt=attempt, delay=round(pause, 3),
                        elapsed=round(elapsed, 3), error=_describe(exc))
                sleep(pause)
                attempt += 1


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _status(exc: BaseException):
    """The HTTP status an exception carries, if any (google-api-core, google-cloud-storage's
    InvalidResponse, requests)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) or getattr(response, "status", None)


def transient(exc: BaseException) -> bool:
    """Worth retrying: HTTP 408/429/5xx, a connection refused, reset or dropped, a timeout.
    Not: a missing object, a permission or request error, a budget already spent."""
    if isinstance(exc, RetryBudgetExceeded):
        return False
    status = _status(exc)
    if isinstance(status, int):
        return status in TRANSIENT_STATUS
    import requests
    import urllib3
    if isinstance(exc, (ConnectionError, TimeoutError, http.client.HTTPException,
                        requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
                        urllib3.exceptions.PoolError)):
        return True
    from google.auth.exceptions import TransportError
    return isinstance(exc, TransportError)        # credentials fetched over a broken network


# -- counting and listeners -------------------------------------------------------------
_lock = threading.Lock()
_count = 0
_listeners: list[Listener] = []


def _report(**fields) -> None:
    global _count
    fields["thread"] = threading.current_thread().name
    with _lock:
        _count += 1
        listeners = list(_listeners)
    if not listeners:
        _log.warning("storage retry: %s", fields)
    for listener in listeners:
        try:
            listener(**fields)
        except Exception:                        # a broken log must not break the I/O
            _log.exception("storage retry listener failed")


def retry_count() -> int:
    """Retries made in this process so far (all threads)."""
    with _lock:
        return _count


def add_listener(listener: Listener) -> None:
    """Call `listener(op=, target=, attempt=, delay=, elapsed=, error=, thread=)` before each
    retry in this process (from the thread that retries)."""
    with _lock:
        _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


# -- installing the policy into cloud-files and google-cloud-storage ---------------------
_GCS_METHODS = ("put_file", "copy_file", "get_file", "get_file_acl", "save_file", "head",
                "size", "exists", "files_exist", "delete_file", "delete_files",
                "subtree_size", "list_files")
_GOOGLE_CALLS = {"Blob": ("upload_from_string", "download_as_bytes", "download_to_filename",
                          "exists", "reload"),
                 "Bucket": ("get_blob", "delete_blob", "list_blobs", "copy_blob")}
_installed = False
_install_lock = threading.Lock()


def _target(iface, args: tuple, kwargs: dict) -> str:
    """The object (or listing prefix) a request is about, as a URL: what its log names."""
    path = getattr(iface, "_path", None)
    base = f"gs://{getattr(path, 'bucket', '?')}/{getattr(path, 'path', '')}".rstrip("/")
    key = args[0] if args else kwargs.get("file_path", kwargs.get("prefix"))
    return f"{base}/{key}" if isinstance(key, str) else base


def _wrap(name: str, inner: Callable) -> Callable:
    if inspect.isgeneratorfunction(inner):      # a listing: retried whole, then yielded
        @functools.wraps(inner)
        def listing(self, *args, **kwargs) -> Iterator:
            items = RetryPolicy.from_env().call(lambda: list(inner(self, *args, **kwargs)),
                                                name, _target(self, args, kwargs))
            yield from items
        listing._voxflow_retry = True
        return listing

    @functools.wraps(inner)
    def request(self, *args, **kwargs):
        return RetryPolicy.from_env().call(lambda: inner(self, *args, **kwargs), name,
                                           _target(self, args, kwargs))
    request._voxflow_retry = True
    return request


def _no_default_retry(fn: Callable) -> None:
    """Make `fn`'s `retry` parameter default to None (no google-cloud-storage retry)."""
    code = fn.__code__
    names = code.co_varnames[:code.co_argcount]
    if "retry" in names and fn.__defaults__:
        position = names.index("retry") - (len(names) - len(fn.__defaults__))
        if position >= 0:
            defaults = list(fn.__defaults__)
            defaults[position] = None
            fn.__defaults__ = tuple(defaults)
            return
    if fn.__kwdefaults__ and "retry" in fn.__kwdefaults__:
        fn.__kwdefaults__["retry"] = None
        return
    raise RuntimeError(f"{fn.__qualname__} has no `retry` default to turn off")


def install() -> None:
    """Put this policy in place of cloud-files' and google-cloud-storage's own retries for
    gs:// (idempotent; `voxflow.storage` and `voxflow.volume` call it on import)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from cloudfiles.interfaces import GoogleCloudStorageInterface as GCS
        from google.cloud import storage
        for name in _GCS_METHODS:
            method = GCS.__dict__.get(name)
            if method is None or getattr(method, "_voxflow_retry", False):
                continue
            setattr(GCS, name, _wrap(name, getattr(method, "__wrapped__", method)))
        for cls, names in _GOOGLE_CALLS.items():
            for name in names:
                _no_default_retry(getattr(getattr(storage, cls), name))
        _installed = True
