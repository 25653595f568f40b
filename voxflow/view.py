"""`voxflow view`: serve local precomputed layers to Neuroglancer, on 127.0.0.1 only.

Neuroglancer reads `precomputed://http://...` sources; a `file://` layer needs a small HTTP
server that answers with CORS headers, byte ranges (a sharded layer is read as ranges of its
shard files: index, minishard index, chunk) and, for layers written by other tools, serves
cloud-volume's `.gz` chunks with `Content-Encoding: gzip`. Remote layers (`gs://`) are linked
directly.
"""
from __future__ import annotations

import json
import re
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"


class _LayerHandler(SimpleHTTPRequestHandler):
    """Static files from `layers` (name -> folder), `.gz` siblings sent gzip-encoded."""

    def __init__(self, *args, layers: dict[str, Path], **kwargs):
        self.layers = layers
        super().__init__(*args, **kwargs)

    def _resolve(self) -> tuple[Path | None, bool]:
        parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/", 1)
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

    def _answer(self, body: bool) -> None:
        path, gzipped = self._resolve()
        if path is None:
            self.send_error(404)
            return
        data = path.read_bytes()
        span = _byte_range(self.headers.get("Range"), len(data)) if not gzipped else None
        if span == "unsatisfiable":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            return
        if span:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {span[0]}-{span[1] - 1}/{len(data)}")
            data = data[span[0]:span[1]]
        else:
            self.send_response(200)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length")
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


def neuroglancer_link(sources: dict[str, str]) -> str:
    """A Neuroglancer URL showing each `name -> precomputed source` as a layer."""
    state = {"layers": [{"type": "image", "source": f"precomputed://{src}", "name": name}
                        for name, src in sources.items()],
             "layout": "xy"}
    return NEUROGLANCER + "#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")))


def make_server(paths: Sequence[str], port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """A server for the local layers among `paths` (bound to 127.0.0.1) and the viewer link."""
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
        sources[name] = ""          # filled in once the port is known; keeps argument order
    server = ThreadingHTTPServer(("127.0.0.1", port), partial(_LayerHandler, layers=layers))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    for name in layers:
        sources[name] = f"{base}/{name}"
    return server, neuroglancer_link(sources)
