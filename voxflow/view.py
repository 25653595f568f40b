"""`voxflow view`: serve local precomputed layers to Neuroglancer, on 127.0.0.1 only.

Neuroglancer reads `precomputed://http://...` sources; a `file://` layer needs a small HTTP
server that answers with CORS headers, byte ranges (a sharded layer is read as ranges of its
shard files: index, minishard index, chunk) and, for layers written by other tools, serves
cloud-volume's `.gz` chunks with `Content-Encoding: gzip`. Remote layers (`gs://`) are linked
directly.

Any web page open in the user's browser can send requests to 127.0.0.1, so the server lets
only the viewer read (docs/security.md): paths start with a token that only the link holds —
an HMAC of the layers' folders under a key in `$VOXFLOW_HOME/view.key` (0600), so the link of
the same layers is the same every time (`view_link`: the Airflow finalize task and the
console show it before anyone starts the server; it works once `voxflow view` serves them);
CORS is granted to the Neuroglancer origin the link opens (and `origins` given), and a request from any other origin is refused (403); a Host header that is not this server's
address is refused too (DNS rebinding: a page whose name resolves to 127.0.0.1).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Sequence

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL, as a browser sends it in `Origin`."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class _LayerHandler(SimpleHTTPRequestHandler):
    """Static files from `layers` (name -> folder) under /TOKEN/, `.gz` siblings sent
    gzip-encoded; only to allowed origins and this server's own Host."""

    def __init__(self, *args, layers: dict[str, Path], token: str, origins: frozenset[str],
                 **kwargs):
        self.layers, self.token, self.origins = layers, token, origins
        super().__init__(*args, **kwargs)

    def _allowed(self) -> bool:
        """The Host is this server (not a rebound name) and the Origin, if any, allowed."""
        port = self.server.server_address[1]
        if self.headers.get("Host") not in (f"127.0.0.1:{port}", f"localhost:{port}"):
            return False
        origin = self.headers.get("Origin")
        return origin is None or origin in self.origins

    def _cors(self) -> None:
        origin = self.headers.get("Origin")
        if origin is not None:                   # _allowed: one of self.origins
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length")
        self.send_header("Vary", "Origin")

    def _resolve(self) -> tuple[Path | None, bool]:
        token, _, rest = urllib.parse.urlsplit(self.path).path.strip("/").partition("/")
        if not secrets.compare_digest(token, self.token):
            return None, False
        parts = rest.split("/", 1)
        root = self.layers.get(parts[0])
        if root is None or len(parts) < 2:
            return None, False
        target = (root / parts[1]).resolve()
        if root not in target.parents:
            return None, False
        if target.is_file():
            return target, False
        gz = target.with_name(target.name + ".gz")
        return (gz, True) if gz.is_file() else (None, False)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_OPTIONS(self) -> None:  # noqa: N802 (a CORS preflight: ranged reads send one)
        if not self._allowed() or self.headers.get("Origin") is None:
            self.send_error(403)
            return
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _answer(self, body: bool) -> None:
        if not self._allowed():
            self.send_error(403)
            return
        path, gzipped = self._resolve()
        if path is None:
            self.send_error(404)
            return
        data = path.read_bytes()
        span = _byte_range(self.headers.get("Range"), len(data)) if not gzipped else None
        if span == "unsatisfiable":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self._cors()
            self.end_headers()
            return
        if span:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {span[0]}-{span[1] - 1}/{len(data)}")
            data = data[span[0]:span[1]]
        else:
            self.send_response(200)
        self._cors()
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/json" if path.name == "info"
                         else "application/octet-stream")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def _byte_range(header: str | None, size: int):
    """[start, stop) of a single `Range: bytes=...` header; None for none (or one this
    server does not serve: several ranges), "unsatisfiable" past the end."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not m or not (m[1] or m[2]):
        return None
    if m[1]:
        start, stop = int(m[1]), min(size, int(m[2]) + 1) if m[2] else size
    else:
        start, stop = max(0, size - int(m[2])), size
    return (start, stop) if start < stop else "unsatisfiable"


def neuroglancer_link(sources: dict[str, str], center: Optional[Sequence[float]] = None,
                      resolution: Optional[Sequence[float]] = None) -> str:
    """A Neuroglancer URL showing each `name -> precomputed source` as a layer; with
    `center` (voxels, x y z) and `resolution` (nm per voxel) the view opens there."""
    state: dict = {"layers": [{"type": "image", "source": f"precomputed://{src}",
                               "name": name} for name, src in sources.items()],
                   "layout": "xy"}
    if center is not None and resolution is not None:
        state["dimensions"] = {a: [r * 1e-9, "m"] for a, r in zip("xyz", resolution)}
        state["position"] = [float(c) for c in center]
    return NEUROGLANCER + "#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")))


DEFAULT_PORT = 1337


def _view_key() -> bytes:
    """This user's key for view tokens, made on first use (readable by the user only)."""
    from .config import voxflow_home
    path = voxflow_home() / "view.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _layers(paths: Sequence[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """The local layers among `paths` by name, and every layer's source in argument order
    (local ones filled in once the server's base URL is known)."""
    layers: dict[str, Path] = {}
    sources: dict[str, str] = {}
    for p in paths:
        if "://" in p and not p.startswith("file://"):
            sources[p.rstrip("/").rsplit("/", 1)[-1]] = p
            continue
        folder = Path(p.removeprefix("file://")).resolve()
        if not (folder / "info").is_file():
            raise FileNotFoundError(f"no precomputed layer at {folder}")
        name = folder.name
        while name in layers:
            name += "_"
        layers[name] = folder
        sources[name] = ""
    return layers, sources


def view_token(folders: Sequence[Path]) -> str:
    """The path token of a server for these folders: unguessable without this user's key,
    the same for the same layers."""
    message = "\0".join(str(Path(f).resolve()) for f in folders).encode()
    return hmac.new(_view_key(), message, hashlib.sha256).hexdigest()[:32]


def _link(layers: dict[str, Path], sources: dict[str, str], port: int, token: str,
          **view) -> str:
    base = f"http://127.0.0.1:{port}/{token}"
    return neuroglancer_link({name: f"{base}/{name}" if name in layers else src
                              for name, src in sources.items()}, **view)


def view_link(paths: Sequence[str], port: int = DEFAULT_PORT,
              center: Optional[Sequence[float]] = None,
              resolution: Optional[Sequence[float]] = None) -> str:
    """The Neuroglancer link `voxflow view PATHS --port PORT` prints (without serving);
    `center`/`resolution` as in `neuroglancer_link`."""
    layers, sources = _layers(paths)
    return _link(layers, sources, port, view_token(list(layers.values())), center=center,
                 resolution=resolution)


def make_server(paths: Sequence[str], port: int = 0, origins: Sequence[str] = ()
                ) -> tuple[ThreadingHTTPServer, str]:
    """A server for the local layers among `paths` (bound to 127.0.0.1) and the viewer link,
    which holds the server's path token (`view_token`). CORS is granted to the Neuroglancer
    the link opens and to `origins` (e.g. a self-hosted Neuroglancer,
    `https://ng.example.org`)."""
    layers, sources = _layers(paths)
    token = view_token(list(layers.values()))
    allowed = frozenset([origin_of(NEUROGLANCER), *(origin_of(o) for o in origins)])
    server = ThreadingHTTPServer(("127.0.0.1", port), partial(
        _LayerHandler, layers=layers, token=token, origins=allowed))
    return server, _link(layers, sources, server.server_address[1], token)
