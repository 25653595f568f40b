"""Task grids: which box each task of a stage computes, by arithmetic (O(1) memory).

`ChunkGrid` cuts a bbox into aligned chunks (crop-mode inference, downsample passes,
segmentation passes, shards); `OverlapGrid` is overlap-mode inference and `BandGrid` its blend
tasks (docs/blending.md).

Seamless blending across chunks (`inference.blend: overlap`):

One patch lattice covers the run's bbox (anchored at its start, stride = patch - overlap, the
last patch snapped to the end). Per axis, tasks are blocks of consecutive lattice patches; a
3D task is a product of per-axis blocks, so every patch is computed by exactly one task.
Patch weights are separable, so the whole lattice's weight sum is an outer product of per-axis
sums: a task divides its own weighted sum by that global sum on its region, and the partial
results of the tasks that touch a voxel simply add up to its final value (no weight sums to
store).

Per axis the bbox is cut into intervals. An *exclusive* interval is touched by one task only;
that task writes its values there final at once. A *band* is a storage-aligned interval where
neighbouring tasks' regions meet (their patches overlap, or they share a storage chunk): each
task touching a band writes its float32 partial sum to temporary storage, one object per
(cell, task), a key no other task writes. Cells are products of per-axis intervals; every cell
that is not exclusive along all three axes is blended: its partials are added in a fixed order
and the cell's whole storage-aligned block is written. A blend task takes the (up to 7) such
cells around one corner where tasks meet. Cut points are chosen per axis near
even shares of the extent, at most `chunk` each, preferring cuts whose overlap zone fits in one
storage chunk (the narrowest band).
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from .geometry import Box, Vec3, ceil_div, vec3
from .lattice import PROFILES, Weighting, axis_lattice



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


@dataclass(frozen=True)
class Interval:
    """A piece of one axis, touched by tasks `first..last` (one task: exclusive)."""

    start: int
    stop: int
    first: int
    last: int

    @property
    def exclusive(self) -> bool:
        return self.first == self.last


@dataclass(frozen=True)
class AxisCut:
    """One axis of the run: the lattice, its blocks (tasks) and the intervals."""

    starts: tuple[int, ...]                  # patch output starts, absolute voxels
    patch: int
    blocks: tuple[int, ...]                  # first patch of each task, then len(starts)
    ranges: tuple[tuple[int, int], ...]      # each task's output extent inside the bbox
    intervals: tuple[Interval, ...]
    edges: tuple[int, ...]                   # interval starts, then the bbox's end
    units: tuple[tuple[int, int], ...]       # blend units: interval index ranges [a, b)

    @property
    def tasks(self) -> int:
        return len(self.ranges)

    def patches(self, task: int) -> tuple[int, ...]:
        return self.starts[self.blocks[task]:self.blocks[task + 1]]

    def extent(self, task: int) -> tuple[int, int]:
        """Output extent of the task's patches (outside the bbox too, for a short axis)."""
        own = self.patches(task)
        return own[0], own[-1] + self.patch

    def pieces(self, task: int) -> list[tuple[int, int, int]]:
        """(interval index, start, stop) of every interval the task's range touches."""
        a, b = self.ranges[task]
        first = bisect.bisect_right(self.edges, a) - 1
        out = []
        for i in range(first, len(self.intervals)):
            iv = self.intervals[i]
            if iv.start >= b:
                break
            out.append((i, max(a, iv.start), min(b, iv.stop)))
        return out

    def weight_sum(self, task: int, profile: np.ndarray) -> np.ndarray:
        """The whole lattice's 1D weight sum (float64) over the task's extent: its own patches
        and its neighbours' patches reaching in, added in lattice order."""
        a, b = self.extent(task)
        lo = bisect.bisect_right(self.starts, a - self.patch)
        hi = bisect.bisect_left(self.starts, b)
        acc = np.zeros(b - a)
        for s in self.starts[lo:hi]:
            lo_v, hi_v = max(s, a), min(s + self.patch, b)
            acc[lo_v - a:hi_v - a] += profile[lo_v - s:hi_v - s]
        return acc

    def partial_length(self, interval: int) -> int:
        """Voxels the tasks write for `interval` along this axis: one extent per task."""
        iv = self.intervals[interval]
        return sum(min(iv.stop, self.ranges[t][1]) - max(iv.start, self.ranges[t][0])
                   for t in range(iv.first, iv.last + 1))


def cut_axis(lo: int, hi: int, patch: int, overlap: int, chunk: int, origin: int,
             storage: int) -> AxisCut:
    """Cut `[lo, hi)` into tasks of whole patches, about `chunk` voxels each, and intervals.

    Storage chunks lie on `origin + k * storage`. Deterministic: every worker derives the same
    cut from the config.
    """
    stride = patch - overlap
    starts = axis_lattice(lo, hi, patch, stride)
    cuts = _choose_cuts(starts, patch, lo, hi, chunk, origin, storage, stride)
    blocks = (0, *cuts, len(starts))
    ranges = tuple((max(lo, starts[blocks[j]]), min(hi, starts[blocks[j + 1] - 1] + patch))
                   for j in range(len(blocks) - 1))
    bands: list[list[int]] = []
    for left, right in zip(ranges, ranges[1:]):
        a = max(lo, _floor_to(right[0], origin, storage))
        b = min(hi, _ceil_to(left[1], origin, storage))
        if a >= b:
            continue                       # the tasks meet on a storage-chunk face
        if bands and a < bands[-1][1]:
            bands[-1][1] = max(bands[-1][1], b)
        else:
            bands.append([a, b])
    edges = sorted({lo, hi, *itertools.chain.from_iterable(bands)})
    stops = [r[1] for r in ranges]
    begins = [r[0] for r in ranges]
    intervals = tuple(Interval(a, b, bisect.bisect_right(stops, a),
                               bisect.bisect_left(begins, b) - 1)
                      for a, b in zip(edges, edges[1:]))
    units: list[list[int]] = []              # an exclusive interval and the bands after it
    for i, iv in enumerate(intervals):
        if iv.exclusive or not units:
            units.append([i, i + 1])
        else:
            units[-1][1] = i + 1
    return AxisCut(starts, patch, blocks, ranges, intervals, tuple(edges),
                   tuple(map(tuple, units)))


def _choose_cuts(starts: Sequence[int], patch: int, lo: int, hi: int, chunk: int,
                 origin: int, storage: int, stride: int) -> list[int]:
    """First patches of tasks 1.. : near lo + q * length / tasks, the narrowest band first.

    A cut before patch k mixes the zone [starts[k], starts[k-1] + patch); its band is that
    zone rounded out to storage chunks. Candidates lie within max(stride, storage) of the
    target (never half a task), so tasks stay close to the nominal size.
    """
    length, n = hi - lo, len(starts)
    tasks = ceil_div(length, chunk)
    if n == 1 or tasks == 1:
        return []
    reach = max(1, min(length // (2 * tasks), max(stride, storage)))
    cuts: list[int] = []
    for q in range(1, tasks):
        target = lo + q * length // tasks
        best = None
        for k in range(max(1, (target - reach - patch - lo) // stride),
                       min(n, (target + reach - lo) // stride + 2)):
            mid2 = starts[k] + starts[k - 1] + patch           # twice the zone's centre
            if not -2 * reach <= mid2 - 2 * target < 2 * reach:
                continue
            width = _band_width(starts[k], starts[k - 1] + patch, origin, storage)
            key = (width, abs(mid2 - 2 * target), k)
            best = min(best, key) if best else key
        if best and (not cuts or best[2] > cuts[-1]):
            cuts.append(best[2])
    return cuts


def _floor_to(x: int, origin: int, storage: int) -> int:
    return origin + (x - origin) // storage * storage


def _ceil_to(x: int, origin: int, storage: int) -> int:
    return origin + ceil_div(x - origin, storage) * storage


def _band_width(a: int, b: int, origin: int, storage: int) -> int:
    """Width of the storage-aligned band around the zone [a, b) where two tasks meet (zero
    when they meet on a storage-chunk face)."""
    return max(0, _ceil_to(b, origin, storage) - _floor_to(a, origin, storage))


@dataclass(frozen=True)
class Piece:
    """Part of an inference task's region: final output (`cell` None) or a partial sum for
    the blend cell `cell` (interval indices x, y, z)."""

    box: Box
    cell: Optional[Vec3]


class OverlapGrid:
    """The inference tasks of overlap mode, lazily: index <-> region by arithmetic over the
    per-axis cuts (O(patches per axis) memory). Index order is x fastest, like `ChunkGrid`."""

    def __init__(self, bbox: Box, output_patch: Sequence[int], overlap: Sequence[int],
                 patch_margin: Sequence[int], chunk: Sequence[int],
                 storage_chunk: Sequence[int], origin: Sequence[int]):
        self.bbox = bbox
        self.patch_margin = vec3(patch_margin)
        self.axes = tuple(cut_axis(a, b, p, v, c, o, s) for a, b, p, v, c, o, s in zip(
            bbox.start, bbox.stop, output_patch, overlap, chunk, origin, storage_chunk))
        self.counts: Vec3 = vec3([ax.tasks for ax in self.axes])
        self.bands = BandGrid(self)

    def __len__(self) -> int:
        nx, ny, nz = self.counts
        return nx * ny * nz

    def position(self, index: int) -> Vec3:
        if not 0 <= index < len(self):
            raise IndexError(f"task index {index} outside [0, {len(self)})")
        nx, ny, _ = self.counts
        return (index % nx, (index // nx) % ny, index // (nx * ny))

    def index(self, position: Sequence[int]) -> int:
        nx, ny, _ = self.counts
        return position[0] + nx * (position[1] + ny * position[2])

    def box(self, index: int) -> Box:
        """The task's output region inside the bbox (the message's box)."""
        pos = self.position(index)
        return Box(*zip(*(ax.ranges[t] for ax, t in zip(self.axes, pos))))

    def extent(self, index: int) -> Box:
        """The output its patches cover (the bbox's outside too, for an axis shorter than a
        patch); the task's array covers this box."""
        pos = self.position(index)
        return Box(*zip(*(ax.extent(t) for ax, t in zip(self.axes, pos))))

    def read_box(self, index: int) -> Box:
        """The input the task reads: its patches' input patches."""
        return self.extent(index).grow(self.patch_margin)

    def patch_starts(self, index: int) -> list[list[int]]:
        """Output starts of the task's patches relative to `extent`, per axis z, y, x."""
        own = [ax.patches(t) for ax, t in zip(self.axes, self.position(index))]
        return [[s - starts[0] for s in starts] for starts in reversed(own)]

    def weight_sums(self, index: int, weighting: Weighting) -> list[np.ndarray]:
        """The run's whole-lattice weight sum over `extent`, as its 1D factors (z, y, x),
        float64: the 3D sum is z * y * x, in that order (as `SlidingWindow` computes it)."""
        pos = self.position(index)
        return [ax.weight_sum(t, PROFILES[weighting](ax.patch))
                for ax, t in zip(self.axes, pos)][::-1]

    def pieces(self, index: int) -> list[Piece]:
        """Where the task's values go: its exclusive box (final) and one partial per band
        cell it touches."""
        pos = self.position(index)
        per_axis = [ax.pieces(t) for ax, t in zip(self.axes, pos)]
        out = []
        for combo in itertools.product(*per_axis):
            box = Box([c[1] for c in combo], [c[2] for c in combo])
            final = all(ax.intervals[c[0]].exclusive for ax, c in zip(self.axes, combo))
            out.append(Piece(box, None if final else vec3([c[0] for c in combo])))
        return out

    def tasks_meeting(self, box: Box) -> list[int]:
        """The tasks whose regions meet `box`, in index order (a shard's contributors)."""
        per_axis = [[t for t, (a, b) in enumerate(ax.ranges) if a < hi and b > lo]
                    for ax, lo, hi in zip(self.axes, box.start, box.stop)]
        return [self.index((x, y, z)) for z in per_axis[2] for y in per_axis[1]
                for x in per_axis[0]]

    # -- sizes, for `voxflow plan` and the benchmark (per-axis sums multiply: O(tasks)) ----
    def read_voxels(self) -> int:
        return math.prod(sum(b - a + 2 * m for a, b in map(ax.extent, range(ax.tasks)))
                         for ax, m in zip(self.axes, self.patch_margin))

    def band_voxels(self) -> int:
        """Output voxels the blend stage writes."""
        exclusive = math.prod(sum(iv.stop - iv.start for iv in ax.intervals if iv.exclusive)
                              for ax in self.axes)
        return self.bbox.size - exclusive

    def temporary_voxels(self) -> int:
        """Voxels of all partial sums (times channels x 4 bytes: the temporary bytes)."""
        every = math.prod(sum(ax.partial_length(i) if not iv.exclusive else iv.stop - iv.start
                              for i, iv in enumerate(ax.intervals)) for ax in self.axes)
        return every - (self.bbox.size - self.band_voxels())

    def patch_count(self) -> int:
        return math.prod(len(ax.starts) for ax in self.axes)


class BandGrid:
    """The blend tasks, lazily. Per axis, intervals group into *units*: an exclusive interval
    and the bands after it, up to the next exclusive one. A blend task is a product of
    per-axis units that holds a band; it blends every cell of that product but the
    all-exclusive one (up to 7 cells), so there are about as many blend tasks as inference
    tasks, not seven times as many. Tasks are grouped by which axes' units hold a band (7
    groups), and an index maps to its units by arithmetic."""

    def __init__(self, grid: OverlapGrid):
        self.grid = grid
        kinds = [([u for u, (a, b) in enumerate(ax.units) if not _has_band(ax, a, b)],
                  [u for u, (a, b) in enumerate(ax.units) if _has_band(ax, a, b)])
                 for ax in grid.axes]
        self._groups = []
        for mask in range(1, 8):
            lists = [kinds[a][(mask >> a) & 1] for a in range(3)]
            count = len(lists[0]) * len(lists[1]) * len(lists[2])
            if count:
                self._groups.append((count, lists))
        self._len = sum(c for c, _ in self._groups)

    def __len__(self) -> int:
        return self._len

    def position(self, index: int) -> Vec3:
        """Unit indices (x, y, z) of blend task `index`."""
        if not 0 <= index < self._len:
            raise IndexError(f"blend task index {index} outside [0, {self._len})")
        for count, lists in self._groups:
            if index < count:
                nx, ny = len(lists[0]), len(lists[1])
                return (lists[0][index % nx], lists[1][(index // nx) % ny],
                        lists[2][index // (nx * ny)])
            index -= count
        raise AssertionError("unreachable")

    def box(self, index: int) -> Box:
        """The units' bounding box (the message's box); the task writes its cells only."""
        units = [ax.units[u] for ax, u in zip(self.grid.axes, self.position(index))]
        return Box([ax.intervals[a].start for ax, (a, _) in zip(self.grid.axes, units)],
                   [ax.intervals[b - 1].stop for ax, (_, b) in zip(self.grid.axes, units)])

    def cells(self, index: int) -> list[Vec3]:
        """The cells (interval indices x, y, z) blend task `index` writes."""
        axes = self.grid.axes
        ranges = [range(*ax.units[u]) for ax, u in zip(axes, self.position(index))]
        return [(x, y, z) for z in ranges[2] for y in ranges[1] for x in ranges[0]
                if not all(ax.intervals[i].exclusive for ax, i in zip(axes, (x, y, z)))]

    def cell_box(self, cell: Sequence[int]) -> Box:
        ivs = [ax.intervals[i] for ax, i in zip(self.grid.axes, cell)]
        return Box([iv.start for iv in ivs], [iv.stop for iv in ivs])

    def sources(self, cell: Sequence[int]) -> list[tuple[int, Box]]:
        """(inference task, the box of its partial) for `cell`, in task order: the fixed
        order the blend adds them in."""
        axes = self.grid.axes
        ivs = [ax.intervals[i] for ax, i in zip(axes, cell)]
        per_axis = [range(iv.first, iv.last + 1) for iv in ivs]
        out = []
        for pos in ((x, y, z) for z in per_axis[2] for y in per_axis[1] for x in per_axis[0]):
            box = Box([max(iv.start, ax.ranges[t][0]) for iv, ax, t in zip(ivs, axes, pos)],
                      [min(iv.stop, ax.ranges[t][1]) for iv, ax, t in zip(ivs, axes, pos)])
            out.append((self.grid.index(pos), box))
        return out


def _has_band(ax: AxisCut, first: int, stop: int) -> bool:
    return any(not ax.intervals[i].exclusive for i in range(first, stop))
