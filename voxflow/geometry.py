"""Voxel geometry: half-open boxes (the task grids are voxflow/grids.py).

Everything here is in voxels, x, y, z order (as people type it and as cloud-volume and
Neuroglancer show it). Arrays are (c, z, y, x); `Box.zyx_slices` is the bridge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
