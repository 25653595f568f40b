"""Overlap mode's temporary data: what inference tasks leave for the blend stage.

Unsharded outputs: one `.npy` partial sum per (band cell, task) — a key only that task
writes, written whole and never modified, so readers need no locks. Sharded outputs: one
*pack* per inference task holding all its pieces, final values and partials, split on the
shard grid (docs/blending.md). Both live under `<output>.voxflow-tmp/<run>/` by default
(`inference.temporary`), through `Storage` (file://, gs://), whose requests `voxflow.retry`
retries: a put here completes or raises, and a task whose put raised is not acked.
"""
from __future__ import annotations

import io
import json
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import RunConfig
from .geometry import Box, Vec3, vec3
from .storage import Storage

TEMPORARY_SUFFIX = ".voxflow-tmp"
PACK_MAGIC = b"voxflow-pack-1\n"
PACK_PROBE = 1 << 16             # bytes read first: the header, for packs of ~500 pieces


def temporary_url(config: RunConfig, run: str) -> str:
    """Where run `run` keeps its partial sums: `inference.temporary`, by default beside the
    output layer (`<output>.voxflow-tmp`, so deleting the layer's folder keeps them apart
    from the data), then the run id."""
    root = config.inference.temporary or config.output + TEMPORARY_SUFFIX
    return f"{root.rstrip('/')}/{run}"


def pack_key(task: int) -> str:
    """The object holding all of inference task `task`'s pieces (sharded outputs)."""
    return f"task-{task}.pack"


def partial_key(cell: Sequence[int], task: int) -> str:
    """The object holding task `task`'s partial sum for `cell`: one writer per key."""
    return f"cell-{cell[0]}_{cell[1]}_{cell[2]}.task-{task}.npy"


class TemporaryStore:
    """A run's partial sums under one URL prefix (file://, gs://, ...), through `Storage`.

    Objects are written whole and never modified; a rewrite (a retried task) writes the same
    bytes, so readers need no locks.
    """

    def __init__(self, url: str):
        self.storage = Storage(url)
        self.url = self.storage.url

    def put(self, key: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array, dtype="<f4"), allow_pickle=False)
        self.storage.put(key, buf.getvalue())

    def get(self, key: str, shape: Sequence[int]) -> np.ndarray:
        data = self.storage.get(key)
        if data is None:
            raise FileNotFoundError(f"partial sum {self.url}/{key} is missing")
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.shape != tuple(shape):
            raise ValueError(f"partial sum {self.url}/{key} has shape {array.shape}, "
                             f"expected {tuple(shape)}")
        return array

    # -- packs: one object per inference task (sharded outputs) ---------------------------
    def put_pack(self, key: str, pieces: Sequence[tuple[Box, Optional[Vec3], np.ndarray]]
                 ) -> None:
        """All of a task's pieces in one object (one write per task however many shards it
        touches): a header naming each piece's box, band cell (None: final values) and byte
        range, then the zlib-compressed arrays in the order given — grouped by shard by the
        caller, so that a shard's pieces are one range read."""
        blobs, entries, at = [], [], 0
        for box, cell, array in pieces:
            blob = zlib.compress(np.ascontiguousarray(array).tobytes(), 1)
            entries.append({"box": [list(box.start), list(box.stop)],
                            "cell": None if cell is None else list(cell),
                            "dtype": array.dtype.str, "shape": list(array.shape),
                            "at": at, "size": len(blob)})
            blobs.append(blob)
            at += len(blob)
        header = json.dumps({"pieces": entries}, separators=(",", ":")).encode()
        self.storage.put(key, b"".join([PACK_MAGIC, len(header).to_bytes(8, "little"), header,
                                        *blobs]))

    def pack_pieces(self, key: str, within: Box) -> list[tuple[Box, Optional[Vec3],
                                                                np.ndarray]]:
        """The pieces of pack `key` that lie inside `within` (one shard): two or three range
        reads, never the whole pack."""
        head = self.storage.get_range(key, 0, PACK_PROBE)
        if head is None or not head.startswith(PACK_MAGIC):
            raise FileNotFoundError(f"pack {self.url}/{key} is missing or not a pack")
        start = len(PACK_MAGIC) + 8
        length = int.from_bytes(head[len(PACK_MAGIC):start], "little")
        if start + length > len(head):
            head += self.storage.get_range(key, len(head), start + length)
        base = start + length
        entries = [e for e in json.loads(head[start:base])["pieces"]
                   if within.contains(Box(*e["box"]))]
        if not entries:
            return []
        lo = min(e["at"] for e in entries)
        data = self.storage.get_range(key, base + lo,
                                      base + max(e["at"] + e["size"] for e in entries))
        return [(Box(*e["box"]), None if e["cell"] is None else vec3(e["cell"]),
                 np.frombuffer(zlib.decompress(data[e["at"] - lo:e["at"] - lo + e["size"]]),
                               e["dtype"]).reshape(e["shape"])) for e in entries]

    def delete_all(self) -> None:
        """Remove the run's temporary data (and, on a local disk, the emptied folders)."""
        self.storage.delete_prefix("")
        if self.url.startswith("file://"):
            parent = Path(self.url[len("file://"):]).parent
            if parent.name.endswith(TEMPORARY_SUFFIX):
                try:
                    parent.rmdir()                      # only when no other run keeps data
                except OSError:
                    pass
