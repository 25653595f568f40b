import random
import tracemalloc

import numpy as np
import pytest

from voxflow.geometry import Box

from voxflow.grids import ChunkGrid


def test_box_basics():
    b = Box([1, 2, 3], [5, 7, 9])
    assert b.shape == (4, 5, 6) and b.size == 120
    assert b.grow([1, 1, 1]) == Box([0, 1, 2], [6, 8, 10])
    assert b.intersect(Box([3, 0, 0], [10, 4, 4])) == Box([3, 2, 3], [5, 4, 4])
    assert Box([0, 0, 0], [1, 5, 5]).intersect(Box([2, 0, 0], [3, 5, 5])).is_empty()
    assert b.contains(Box([2, 2, 3], [5, 6, 9])) and not b.contains(b.grow([1, 0, 0]))
    # (z, y, x) slices relative to an origin given in x, y, z
    assert b.zyx_slices([1, 1, 1]) == (slice(2, 8), slice(1, 6), slice(0, 4))
    with pytest.raises(ValueError):
        Box([0, 0], [1, 1])


def test_grid_tiles_bbox_once_and_aligns_to_storage_chunks():
    bbox = Box([13, 7, 3], [101, 70, 30])          # not aligned, not a multiple of the chunk
    grid = ChunkGrid(bbox, chunk=(32, 16, 8), margin=(4, 4, 2), origin=(5, 3, 1))
    cover = np.zeros(bbox.shape[::-1], dtype=np.int32)
    for i in range(len(grid)):
        box = grid.box(i)
        assert bbox.contains(box) and not box.is_empty()
        cover[box.zyx_slices(bbox.start)] += 1
        # every face not on the bbox boundary lies on the storage grid origin + k * chunk
        for a, b, lo, hi, o, c in zip(box.start, box.stop, bbox.start, bbox.stop,
                                      grid.origin, grid.chunk):
            assert a == lo or (a - o) % c == 0
            assert b == hi or (b - o) % c == 0
        assert grid.read_box(i) == box.grow((4, 4, 2))
        assert grid.index(grid.position(i)) == i
    assert cover.min() == 1 and cover.max() == 1
    assert len(grid) == np.prod(grid.counts)


def test_grid_index_out_of_range():
    grid = ChunkGrid(Box([0, 0, 0], [10, 10, 10]), (4, 4, 4))
    assert len(grid) == 27
    with pytest.raises(IndexError):
        grid.box(27)
    with pytest.raises(IndexError):
        grid.box(-1)


def test_ten_million_chunks_constant_memory():
    tracemalloc.start()
    grid = ChunkGrid(Box([0, 0, 0], [256 * 250, 256 * 200, 32 * 200]), (256, 256, 32),
                     margin=(16, 16, 4))
    n = len(grid)
    assert n == 10_000_000
    rng = random.Random(0)
    for i in [0, n - 1] + [rng.randrange(n) for _ in range(10_000)]:
        box = grid.box(i)
        assert box.shape == (256, 256, 32)
        assert grid.index(grid.position(i)) == i
    assert grid.box(n - 1).stop == grid.bbox.stop
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20      # 10^7 chunks planned and addressed in under 1 MiB
