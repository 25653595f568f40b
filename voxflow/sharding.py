"""Sharded precomputed layers: one object per shard of many storage chunks.

At petavoxel scale object operations cost as much as GPUs: one object per 64×64×8 storage
chunk is 3×10^7 objects per output teravoxel, about $150 of writes. The neuroglancer
precomputed *sharded* format (what H01 and MICrONS are published in) packs the chunks of a
power-of-two block of the chunk grid into one shard file with a minishard index, readable
by cloud-volume, tensorstore and Neuroglancer alike.

Choices:
- **Shard size**: a shard holds a power-of-two number of storage chunks, as many as fit
  `shard_bytes` uncompressed (64 MiB by default: about 6×10^4 shards per output teravoxel
  of 3-channel uint8). The same rule at every mip keeps the shard's voxel shape about
  constant, so the pyramid adds a third of mip 0's objects, not as many again.
- **Who writes a shard**: one task, whole (a shard is one object; two tasks writing parts
  of one would race). So the tasks that write a sharded layer partition its shards:
  crop-mode chunks lie on the shard grid, overlap mode assembles shards in its blend stage
  (docs/blending.md), a downsample task makes whole shards. Only a shard the run's bbox
  cuts is merged with what the layer holds outside the bbox (its one writer reads it first),
  as unsharded writes merge a partly covered chunk.
- **Encoding**: cloud-volume's (`make_shard`), the library voxflow already reads and writes
  every layer with and the one igneous builds its shards with; tensorstore reads them in the
  tests as an independent check. Chunks are gzip-compressed inside the shard
  (`data_encoding`), minishard indices too; the shard file itself is stored as is, so
  readers can fetch byte ranges.
- **Which chunks a shard holds** is the format's: the compressed Morton code of the chunk's
  grid position, whose low `preshift_bits + minishard_bits` bits select the chunk within its
  shard. cloud-volume's `image_shard_shape_from_spec` turns the bits into the shard's shape
  for the layer's grid, and everything here derives from that one function.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .geometry import Box, Vec3, ceil_div, vec3

from .grids import ChunkGrid

SHARD_BYTES = 64 << 20          # uncompressed bytes a shard aims for
MINISHARD_CHUNKS = 1024         # chunks per minishard index at most (keeps it a few KiB)


def sharding_spec(size: Sequence[int], chunk: Sequence[int], voxel_bytes: int,
                  shard_bytes: int = SHARD_BYTES,
                  divides: Optional[Sequence[int]] = None) -> dict:
    """The `sharding` entry of a scale of `size` voxels in `chunk`-sized storage chunks:
    as many chunks per shard as fit `shard_bytes`, fewer if the shard shape must divide
    `divides` (crop mode's task chunk: each task then writes whole shards)."""
    grid = [ceil_div(n, c) for n, c in zip(size, chunk)]
    max_bits = sum(max(0, math.ceil(math.log2(g))) for g in grid)
    per_chunk = math.prod(chunk) * voxel_bytes
    bits = min(max(0, int(math.log2(max(1, shard_bytes // per_chunk)))), max_bits)
    while True:
        minishard = max(0, bits - int(math.log2(MINISHARD_CHUNKS)))
        spec = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity",
                "preshift_bits": bits - minishard, "minishard_bits": minishard,
                "shard_bits": max_bits - bits, "minishard_index_encoding": "gzip",
                "data_encoding": "gzip"}
        if bits == 0 or divides is None or not any(
                d % s for d, s in zip(divides, shard_shape(spec, size, chunk))):
            return spec
        bits -= 1


def spec_bytes(spec: dict, chunk: Sequence[int], voxel_bytes: int) -> int:
    """The uncompressed bytes of a full shard of `spec`: what makes every other mip's spec
    hold as many chunks (`sharding_spec(..., spec_bytes(mip 0's spec))`)."""
    return math.prod(chunk) * voxel_bytes << spec["preshift_bits"] + spec["minishard_bits"]


def shard_shape(spec: dict, size: Sequence[int], chunk: Sequence[int]) -> Vec3:
    """Voxels per shard along x, y, z (the format's block of the chunk grid)."""
    from cloudvolume.datasource.precomputed.sharding import image_shard_shape_from_spec
    return vec3([int(n) for n in image_shard_shape_from_spec(spec, list(size), list(chunk))])


def shard_grid(bounds: Box, shape: Sequence[int], region: Optional[Box] = None) -> ChunkGrid:
    """The shards of a layer with `bounds` (anchored at its voxel offset) that meet
    `region` (default: all of them), each clipped to the bounds."""
    return ChunkGrid((region or bounds).intersect(bounds), shape, origin=bounds.start)


def shards_meeting(bounds: Box, shape: Sequence[int], box: Box) -> list[Box]:
    """The whole shards (clipped to the layer's bounds) that `box` meets."""
    grid = shard_grid(bounds, shape, box)
    return [Box.from_shape([o + (f + p) * s for o, f, p, s in
                            zip(grid.origin, grid.first, grid.position(i), shape)],
                           shape).intersect(bounds) for i in range(len(grid))]
