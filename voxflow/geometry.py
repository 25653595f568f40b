"""Voxel geometry: half-open boxes and the lazy chunk grid.

Everything here is in voxels, x, y, z order (as people type it and as cloud-volume and
Neuroglancer show it). Arrays are (c, z, y, x); `Box.zyx_slices` is the bridge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

Vec3 = tuple[int, int, int]


def vec3(values: Sequence[int]) -> Vec3:
    """A 3-tuple of ints, refusing anything else (why: boxes must never silently broadcast)."""
    if len(values) != 3:
        raise ValueError(f"expected 3 values (x, y, z), got {list(values)}")
    return (int(values[0]), int(values[1]), int(values[2]))


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) in integers (floats lose exactness on large voxel counts)."""
    return -(-a // b)


@dataclass(frozen=True)
class Box:
    """A half-open voxel box `[start, stop)` in x, y, z."""

    start: Vec3
    stop: Vec3

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", vec3(self.start))
        object.__setattr__(self, "stop", vec3(self.stop))

    @classmethod
    def from_shape(cls, start: Sequence[int], shape: Sequence[int]) -> "Box":
        return cls(start, [s + n for s, n in zip(start, shape)])

    @property
    def shape(self) -> Vec3:
        return vec3([b - a for a, b in zip(self.start, self.stop)])

    @property
    def size(self) -> int:
        x, y, z = self.shape
        return max(x, 0) * max(y, 0) * max(z, 0)

    def is_empty(self) -> bool:
        return any(n <= 0 for n in self.shape)

    def grow(self, margin: Sequence[int]) -> "Box":
        """The box grown by `margin` on every side (shrunk when negative)."""
        return Box([a - m for a, m in zip(self.start, margin)],
                   [b + m for b, m in zip(self.stop, margin)])

    def translate(self, offset: Sequence[int]) -> "Box":
        return Box([a + o for a, o in zip(self.start, offset)],
                   [b + o for b, o in zip(self.stop, offset)])

    def intersect(self, other: "Box") -> "Box":
        return Box([max(a, b) for a, b in zip(self.start, other.start)],
                   [min(a, b) for a, b in zip(self.stop, other.stop)])

    def contains(self, other: "Box") -> bool:
        return all(a <= b for a, b in zip(self.start, other.start)) and all(
            a >= b for a, b in zip(self.stop, other.stop))

    def zyx_slices(self, origin: Sequence[int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
        """Slices into a (z, y, x) array whose voxel (0, 0, 0) sits at `origin` (x, y, z)."""
        return tuple(slice(a - o, b - o) for a, b, o in
                     zip(reversed(self.start), reversed(self.stop), reversed(vec3(origin))))

    def __str__(self) -> str:
        return f"[{','.join(map(str, self.start))} : {','.join(map(str, self.stop))})"


@dataclass(frozen=True)
class ChunkGrid:
    """A lazy grid of chunks covering `bbox`: task index <-> box by arithmetic, O(1) memory.

    Chunk starts lie on `origin + k * chunk` (origin: the storage-chunk grid's anchor, usually
    the layer's voxel offset), so every interior chunk is aligned to storage chunks; the first
    and last chunks along an axis are clipped to the bbox. Index order is x fastest, then y,
    then z, so consecutive tasks touch neighbouring data.
    """

    bbox: Box
    chunk: Vec3
    margin: Vec3 = (0, 0, 0)
    origin: Vec3 = (0, 0, 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk", vec3(self.chunk))
        object.__setattr__(self, "margin", vec3(self.margin))
        object.__setattr__(self, "origin", vec3(self.origin))
        if any(c <= 0 for c in self.chunk):
            raise ValueError(f"chunk must be positive, got {list(self.chunk)}")
        if self.bbox.is_empty():
            raise ValueError(f"bbox {self.bbox} is empty")
        # derived once: box(i) is on the publish hot path (10^7 calls for a large run)
        first = vec3([(s - o) // c for s, o, c in zip(self.bbox.start, self.origin, self.chunk)])
        counts = vec3([ceil_div(b - o, c) - f for b, o, c, f in
                       zip(self.bbox.stop, self.origin, self.chunk, first)])
        object.__setattr__(self, "first", first)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "_len", counts[0] * counts[1] * counts[2])

    first: Vec3 = field(init=False, repr=False, compare=False)    # grid cell of bbox.start
    counts: Vec3 = field(init=False, repr=False, compare=False)   # chunks along x, y, z

    def __len__(self) -> int:
        return self._len

    def position(self, index: int) -> Vec3:
        """Grid position (ix, iy, iz) of task `index`."""
        if not 0 <= index < self._len:
            raise IndexError(f"task index {index} outside [0, {self._len})")
        nx, ny, _ = self.counts
        return (index % nx, (index // nx) % ny, index // (nx * ny))

    def index(self, position: Sequence[int]) -> int:
        nx, ny, nz = self.counts
        ix, iy, iz = vec3(position)
        if not (0 <= ix < nx and 0 <= iy < ny and 0 <= iz < nz):
            raise IndexError(f"grid position {list(position)} outside {list(self.counts)}")
        return ix + nx * (iy + ny * iz)

    def box(self, index: int) -> Box:
        """The output box of task `index` (clipped to the bbox)."""
        pos = self.position(index)
        start = [o + (f + p) * c for o, f, p, c in zip(self.origin, self.first, pos, self.chunk)]
        return Box(start, [s + c for s, c in zip(start, self.chunk)]).intersect(self.bbox)

    def read_box(self, index: int) -> Box:
        """The box a task reads: its output box plus the context margin."""
        return self.box(index).grow(self.margin)

    def __iter__(self) -> Iterator[Box]:
        return (self.box(i) for i in range(len(self)))
