"""Mip pyramids with tinybrain: averaging for images and probabilities, mode for labels.

Tasks are planned like igneous does: a task at source mip s covers `storage_chunk * factor^m`
voxels, with m as large as the memory target allows, so each task writes whole storage chunks
at every mip it makes. Pyramids deeper than one task can hold are built in several passes.
Geometry follows cloud-volume's `add_scale`: mip k has voxel offset floor(offset / f^k) and
size ceil(size / f^k).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import tinybrain

from .geometry import Box, Vec3, ceil_div, vec3

from .grids import ChunkGrid


def mip_bounds(bounds0: Box, factor: Sequence[int], mip: int) -> Box:
    """Bounds of mip `mip` of a layer whose mip 0 has `bounds0` (as cloud-volume computes)."""
    scale = [f ** mip for f in factor]
    start = [a // s for a, s in zip(bounds0.start, scale)]
    return Box.from_shape(start, [ceil_div(n, s) for n, s in zip(bounds0.shape, scale)])


def to_mip(box: Box, bounds0: Box, factor: Sequence[int], mip: int) -> Box:
    """The mip-`mip` box covering mip-0 `box` (outward rounding, relative to the offset)."""
    scale = [f ** mip for f in factor]
    off = mip_bounds(bounds0, factor, mip).start
    return Box([o + (a - a0) // s for o, a, a0, s in zip(off, box.start, bounds0.start, scale)],
               [o + ceil_div(b - a0, s) for o, b, a0, s in
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
        return Box.from_shape(start, [ceil_div(n, s) for n, s in zip(source_box.shape, scale)])


def plan_downsample(bounds0: Box, region0: Box, chunk: Sequence[int], factor: Sequence[int],
                    mips: int, voxel_bytes: int, memory_target: int,
                    shard_shapes: Optional[Sequence[Sequence[int]]] = None
                    ) -> list[DownsamplePass]:
    """Passes that build mips 1..`mips` over `region0` (mip-0 voxels) within memory_target.

    `voxel_bytes` is channels x bytes per voxel; a task holds its input and (in tinybrain)
    a float copy, so about 2.5x its input bytes. Unsharded, a task covers storage chunks
    times factor^m, m as large as memory allows. Sharded (`shard_shapes`: voxels per shard
    at each mip), a task makes whole shards at every mip it writes, so it is a shard of its
    top mip times factor^m: with shards of about the same voxels at every mip that is 4^m
    shards of its source mip (2x2x1), and m is usually smaller than unsharded — fewer mips
    per pass, each pass rounding once, as igneous's sharded pyramids do.
    """
    chunk, factor = vec3(chunk), vec3(factor)
    passes, source = [], 0
    while source < mips:
        if shard_shapes is None:
            m = 1
            while m < mips - source and \
                    _task_bytes(chunk, factor, m + 1, voxel_bytes) <= memory_target:
                m += 1
            shape = [c * f ** m for c, f in zip(chunk, factor)]
        else:
            m, shape = 1, _shard_task(shard_shapes, factor, source, 1)
            need = _task_bytes(shape, (1, 1, 1), 0, voxel_bytes)
            if need > memory_target:
                from .config import ConfigError
                raise ConfigError("downsample.memory_target", f"{memory_target} bytes cannot "
                                  f"hold a downsample task of the sharded output: one shard "
                                  f"of mip {source + 1} needs {shape} voxels of mip {source}, "
                                  f"about {int(need)} bytes")
            while m < mips - source and _task_bytes(
                    _shard_task(shard_shapes, factor, source, m + 1), (1, 1, 1), 0,
                    voxel_bytes) <= memory_target:
                m += 1
            shape = _shard_task(shard_shapes, factor, source, m)
        bounds = mip_bounds(bounds0, factor, source)
        region = to_mip(region0, bounds0, factor, source)
        off = bounds.start
        snapped = Box([o + (a - o) // s * s for o, a, s in zip(off, region.start, shape)],
                      [o + ceil_div(b - o, s) * s for o, b, s in zip(off, region.stop, shape)])
        grid = ChunkGrid(snapped.intersect(bounds), shape, origin=off)
        passes.append(DownsamplePass(source, m, grid))
        source += m
    return passes


def _shard_task(shard_shapes: Sequence[Sequence[int]], factor: Vec3, source: int,
                m: int) -> list[int]:
    """The mip-`source` task shape that makes whole shards at mips source+1 .. source+m:
    shard shapes are storage chunks times powers of two, so the largest of shard_k * f^k is
    a multiple of every one."""
    return [max(shard_shapes[source + k][a] * factor[a] ** k for k in range(1, m + 1))
            for a in range(3)]


def _task_bytes(chunk, factor, m, voxel_bytes) -> float:
    return float(np.prod([c * f ** m for c, f in zip(chunk, factor)])) * voxel_bytes * 2.5


def downsample(image: np.ndarray, factor: Sequence[int], mips: int,
               segmentation: bool = False) -> list[np.ndarray]:
    """Mips 1..`mips` of a (c, z, y, x) array: averaging, or mode when `segmentation`.

    Averages come from one tinybrain call, as igneous makes a task's mips: tinybrain sums
    across levels and rounds each mip once (uint8: the floor of its block's mean); rounding
    at every level drifted up to 2 grey levels by mip 3. tinybrain 1.7's 2x2 kernel
    mishandles odd x/y extents, which tasks have only at the layer's far edge; there the
    input is first extended as if every level replicated its last voxel (`_tail_index`), so
    the tail does not depend on how the pyramid is split into passes.
    """
    factor = vec3(factor)
    img = np.asfortranarray(image.transpose(3, 2, 1, 0))  # x, y, z, c
    if segmentation:
        return _mode_pyramid(img, factor, mips)
    shape = img.shape[:3]
    index = [_tail_index(n, f, mips) for n, f in zip(shape, factor)]
    if any(len(i) > n for i, n in zip(index, shape)):
        img = np.asfortranarray(img[np.ix_(*index, np.arange(img.shape[3]))])
    if img.dtype == np.float16:               # tinybrain 1.7's 1-mip kernel has no float16
        img = img.astype(np.float32, order="F")
    levels = tinybrain.downsample_with_averaging(img, factor, num_mips=mips)
    crops = [tuple(slice(ceil_div(n, f ** k)) for n, f in zip(shape, factor))
             for k in range(1, mips + 1)]
    return [np.ascontiguousarray(level[crop].transpose(3, 2, 1, 0)).astype(image.dtype,
                                                                           copy=False)
            for level, crop in zip(levels, crops)]


def _tail_index(n: int, f: int, mips: int) -> np.ndarray:
    """Mip-0 indices along one axis that make every level's extent a multiple of f: where
    level j's is not, its last voxel is repeated, i.e. the last f^j mip-0 voxels. Block sums
    then equal those of edge replication at every level, exactly (padding mip 0 alone once
    would weigh the last mip-0 voxel more, wherever a higher level's extent is odd)."""
    index = np.arange(n)
    for j in range(mips):
        slab = f ** j
        index = np.concatenate([index] + [index[-slab:]] * (-(len(index) // slab) % f))
    return index


def _mode_pyramid(img: np.ndarray, factor: Vec3, mips: int) -> list[np.ndarray]:
    """Modes of an (x, y, z, c) array one level at a time (a mode of modes either way:
    tinybrain's multi-mip call recurses too); an extent of 1 is edge-padded to a 2x2 block,
    odd ones are left to tinybrain's mode kernel."""
    out = []
    for _ in range(mips):
        pad = [(0, 1 if f == 2 and n == 1 else 0) for n, f in zip(img.shape[:3], factor)]
        if any(p[1] for p in pad):
            img = np.asfortranarray(np.pad(img, pad + [(0, 0)], mode="edge"))
        img = tinybrain.downsample_segmentation(img, factor, num_mips=1)[0]
        out.append(np.ascontiguousarray(img.transpose(3, 2, 1, 0)))
    return out
