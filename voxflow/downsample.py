"""Mip pyramids with tinybrain: averaging for images and probabilities, mode for labels.

Tasks are planned like igneous does: a task at source mip s covers `storage_chunk * factor^m`
voxels, with m as large as the memory target allows, so each task writes whole storage chunks
at every mip it makes. Pyramids deeper than one task can hold are built in several passes.
Geometry follows cloud-volume's `add_scale`: mip k has voxel offset floor(offset / f^k) and
size ceil(size / f^k).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tinybrain

from .geometry import Box, ChunkGrid, vec3


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def mip_bounds(bounds0: Box, factor: Sequence[int], mip: int) -> Box:
    """Bounds of mip `mip` of a layer whose mip 0 has `bounds0` (as cloud-volume computes)."""
    scale = [f ** mip for f in factor]
    start = [a // s for a, s in zip(bounds0.start, scale)]
    return Box.from_shape(start, [_ceil_div(n, s) for n, s in zip(bounds0.shape, scale)])


def to_mip(box: Box, bounds0: Box, factor: Sequence[int], mip: int) -> Box:
    """The mip-`mip` box covering mip-0 `box` (outward rounding, relative to the offset)."""
    scale = [f ** mip for f in factor]
    off = mip_bounds(bounds0, factor, mip).start
    return Box([o + (a - a0) // s for o, a, a0, s in zip(off, box.start, bounds0.start, scale)],
               [o + _ceil_div(b - a0, s) for o, b, a0, s in
                zip(off, box.stop, bounds0.start, scale)])


@dataclass(frozen=True)
class DownsamplePass:
    """Tasks reading `source_mip` and writing mips source_mip+1 .. source_mip+mips."""

    source_mip: int
    mips: int
    grid: ChunkGrid

    def target_box(self, source_box: Box, factor: Sequence[int], k: int) -> Box:
        """Where the k-th mip made from `source_box` lands (k = 1 .. mips)."""
        scale = [f ** k for f in factor]
        origin_t = [a // s for a, s in zip(self.grid.origin, scale)]
        start = [o + (a - g) // s for o, a, g, s in
                 zip(origin_t, source_box.start, self.grid.origin, scale)]
        return Box.from_shape(start, [_ceil_div(n, s) for n, s in zip(source_box.shape, scale)])


def plan_downsample(bounds0: Box, region0: Box, chunk: Sequence[int], factor: Sequence[int],
                    mips: int, voxel_bytes: int, memory_target: int) -> list[DownsamplePass]:
    """Passes that build mips 1..`mips` over `region0` (mip-0 voxels) within memory_target.

    `voxel_bytes` is channels x bytes per voxel; a task holds its input and (in tinybrain)
    a float copy, so about 2.5x its input bytes.
    """
    chunk, factor = vec3(chunk), vec3(factor)
    passes, source = [], 0
    while source < mips:
        m = 1
        while m < mips - source and _task_bytes(chunk, factor, m + 1, voxel_bytes) <= memory_target:
            m += 1
        shape = [c * f ** m for c, f in zip(chunk, factor)]
        bounds = mip_bounds(bounds0, factor, source)
        region = to_mip(region0, bounds0, factor, source)
        off = bounds.start
        snapped = Box([o + (a - o) // s * s for o, a, s in zip(off, region.start, shape)],
                      [o + _ceil_div(b - o, s) * s for o, b, s in zip(off, region.stop, shape)])
        grid = ChunkGrid(snapped.intersect(bounds), shape, origin=off)
        passes.append(DownsamplePass(source, m, grid))
        source += m
    return passes


def _task_bytes(chunk, factor, m, voxel_bytes) -> float:
    return float(np.prod([c * f ** m for c, f in zip(chunk, factor)])) * voxel_bytes * 2.5


def downsample(image: np.ndarray, factor: Sequence[int], mips: int,
               segmentation: bool = False) -> list[np.ndarray]:
    """Mips 1..`mips` of a (c, z, y, x) array: averaging, or mode when `segmentation`.

    One level at a time, so a task's result never depends on where the task ends. An odd
    extent's last voxel is averaged with itself (edge replication): tinybrain 1.7's 2x2
    averaging mishandles odd x/y extents, and the replicated average is what an odd tail
    means anyway.
    """
    factor = vec3(factor)
    img = np.asfortranarray(image.transpose(3, 2, 1, 0))  # x, y, z, c
    out = []
    for _ in range(mips):
        pad = [(0, n % 2 if f == 2 and (not segmentation or n == 1) else 0)
               for n, f in zip(img.shape[:3], factor)] + [(0, 0)]
        if any(p[1] for p in pad):
            img = np.asfortranarray(np.pad(img, pad, mode="edge"))
        if segmentation:
            img = tinybrain.downsample_segmentation(img, factor, num_mips=1)[0]
        else:
            img = tinybrain.downsample_with_averaging(img, factor, num_mips=1)[0]
        out.append(np.ascontiguousarray(img.transpose(3, 2, 1, 0)))
    return out
