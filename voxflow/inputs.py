"""Reading a task's input: a chunk that cannot be decoded is named, not just reported."""
from __future__ import annotations

import numpy as np

from .geometry import Box
from .retry import transient
from .volume import MissingChunk, Volume


class CorruptChunk(ValueError):
    """A chunk file of the input that exists but cannot be decoded (truncated, garbage)."""


def read_input(volume: Volume, box: Box, pad: str) -> np.ndarray:
    """`volume.read`, naming the chunk file when one cannot be decoded. cloud-volume's own
    error names no file; on that (rare) path each storage chunk the read meets is read on its
    own to find it. A missing chunk already names itself, and a storage error that is not
    the data's (a retry budget spent, a connection lost) is not a corrupt chunk: it fails
    the task as it is, and the queue retries it."""
    try:
        return volume.read(box, pad=pad)
    except (MissingChunk, ConnectionError, TimeoutError):
        raise
    except Exception as exc:
        if transient(exc):
            raise
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    raise CorruptChunk(f"{_undecodable_chunk(volume, box)} of the input cannot be decoded "
                       f"(reading {box}): {error}")


def _undecodable_chunk(volume: Volume, box: Box) -> str:
    inside, bounds = box.intersect(volume.bounds), volume.bounds
    chunk, origin = volume.chunk, bounds.start
    first = [o + (a - o) // c * c for a, o, c in zip(inside.start, origin, chunk)]
    for z in range(first[2], inside.stop[2], chunk[2]):
        for y in range(first[1], inside.stop[1], chunk[1]):
            for x in range(first[0], inside.stop[0], chunk[0]):
                cbox = Box((x, y, z), (x + chunk[0], y + chunk[1], z + chunk[2])
                           ).intersect(bounds)
                try:
                    volume.read(cbox)
                except Exception:
                    if volume.shard_shape is not None:
                        return f"chunk {cbox} of {volume.url}/{volume.key} (sharded)"
                    name = "_".join(f"{a}-{b}" for a, b in zip(cbox.start, cbox.stop))
                    return f"chunk {volume.url}/{volume.key}/{name}"
    return f"a chunk of {volume.url}/{volume.key}"
