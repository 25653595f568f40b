"""Per-section contrast (`normalize:`): global levels per z section, as igneous's luminance
levels and contrast correction do, so that no chunk boundary shows a seam.

Two passes (stages `levels`, `levels-merge`, voxflow/stages/levels.py). `levels`: each task
reads one xy block of a slab of z sections at `normalize.mip` (bounded memory: a block, never a
section) and stores its exact integer histogram per section. `levels-merge`: one task per slab
adds its blocks' histograms and stores the slab's windows, the data values at the
`clip_percent` ranks. An inference task reads the windows of the few slabs its read box meets,
and maps each section's values through an integer lookup table: the window onto the dtype's
full range, clipped outside it, rounded. A section scaled by an integer gain has its
percentiles scaled by the same gain (ranks of sorted data), so its table gives the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from .geometry import Box
from .grids import ChunkGrid
from .segmentation import pack_arrays, unpack_arrays

DTYPES = ("uint8", "uint16")      # exact histograms of at most 2^16 bins
SLAB_DEPTH = 64                   # z sections per slab (rounded up to the input's chunk z)
TASK_VOXELS = 1 << 26             # voxels a histogram task reads (64 MiB of uint8)
MERGE_BATCH = 64                  # histograms a merge task holds at once


@dataclass(frozen=True)
class LevelsPlan:
    """Where the levels are taken: `box` at input mip `mip` (the bbox's xy, every z section
    an inference task reads), histogram tasks `grid`, and `slabs` (one merge task and one
    windows object each; a slab is one z row of `grid`)."""

    mip: int
    box: Box
    grid: ChunkGrid
    slabs: ChunkGrid
    clip: tuple[Fraction, Fraction]
    bins: int
    chunk: tuple[int, int, int]         # the input's storage chunk at `mip`

    def slab_range(self, z0: int, z1: int) -> range:
        """Slabs holding sections [z0, z1), clipped to the levels' z range."""
        lo, hi = max(z0, self.box.start[2]), min(z1, self.box.stop[2])
        if hi <= lo:
            return range(0)
        g = self.slabs
        return range((lo - g.origin[2]) // g.chunk[2] - g.first[2],
                     (hi - 1 - g.origin[2]) // g.chunk[2] - g.first[2] + 1)

    def slab_tasks(self, slab: int) -> list[int]:
        """The histogram tasks of slab `slab` (a z row of `grid`)."""
        nx, ny, _ = self.grid.counts
        return [self.grid.index((x, y, slab)) for y in range(ny) for x in range(nx)]


def plan_levels(mip: int, box: Box, origin: Sequence[int], chunk: Sequence[int],
                clip: Sequence[float], dtype: str) -> LevelsPlan:
    """Tasks of about `TASK_VOXELS` on the input's chunk grid at `mip` (anchored at `origin`,
    the layer's voxel offset there: reads are whole chunks)."""
    depth = math.ceil(SLAB_DEPTH / chunk[2]) * chunk[2]
    side = max(1, math.isqrt(TASK_VOXELS // depth))
    xy = [max(c, side // c * c) for c in chunk[:2]]
    grid = ChunkGrid(box, (*xy, depth), origin=origin)
    slabs = ChunkGrid(box, (*box.shape[:2], depth), origin=(*box.start[:2], origin[2]))
    return LevelsPlan(mip, box, grid, slabs, tuple(Fraction(str(c)) for c in clip),
                      1 << (8 * np.dtype(dtype).itemsize), tuple(chunk))


def histograms(image: np.ndarray, bins: int) -> np.ndarray:
    """(z, bins) uint32 counts per z section of a (1, z, y, x) block (under 2^32 voxels)."""
    return np.stack([np.bincount(section.ravel(), minlength=bins).astype(np.uint32)
                     for section in image[0]])


def windows(hist: np.ndarray, clip: tuple[Fraction, Fraction]) -> np.ndarray:
    """(z, 2) int64 [lo, hi] per section: the sorted data's values at ranks floor(N * p/100)
    and ceil(N * q/100) - 1, exact integers (no interpolation); an empty section: [0, 0]."""
    out = np.zeros((len(hist), 2), np.int64)
    for k, h in enumerate(hist):
        cum = np.cumsum(h, dtype=np.int64)
        n = int(cum[-1])
        if n == 0:
            continue
        ranks = [math.floor(n * clip[0] / 100), max(0, math.ceil(n * clip[1] / 100) - 1)]
        out[k] = np.searchsorted(cum, np.minimum(ranks, n - 1), side="right")
    return out


def lookup_table(lo: int, hi: int, dtype: np.dtype) -> np.ndarray:
    """Value -> round((v - lo) / (hi - lo) * max), clipped to [0, max], in exact integers; a
    window of one value maps it and below to 0, above to max."""
    top = np.iinfo(dtype).max
    v = np.arange(top + 1, dtype=np.int64)
    if hi <= lo:
        return np.where(v > lo, top, 0).astype(dtype)
    width = hi - lo
    return np.clip((2 * (v - lo) * top + width) // (2 * width), 0, top).astype(dtype)


def source_sections(box: Box, bounds: Box, pad: str) -> np.ndarray:
    """The input section each z of a read of `box` holds: itself inside the bounds; outside,
    the section `Volume.read` mirrors there (pad zeros: any, zeros map to 0)."""
    inside = box.intersect(bounds)
    z = np.arange(inside.start[2], inside.stop[2])
    widths = (inside.start[2] - box.start[2], box.stop[2] - inside.stop[2])
    mode = "reflect" if pad == "mirror" and min(inside.shape) > 1 else "edge"
    return np.pad(z, widths, mode=mode)


def apply_windows(image: np.ndarray, sections: np.ndarray, found: dict[int, np.ndarray]
                  ) -> np.ndarray:
    """`image` (1, z, y, x) with section k mapped through the table of window
    `found[sections[k]]`."""
    out = np.empty_like(image)
    for k, z in enumerate(sections):
        lo, hi = found[int(z)]
        out[0, k] = lookup_table(int(lo), int(hi), image.dtype)[image[0, k]]
    return out


class LevelsStore:
    """A run's levels under `<temporary>/<run>/levels/`: each histogram task's counts, and
    each slab's windows (what inference reads: one small object per slab)."""

    def __init__(self, url: str):
        from .storage import Storage
        self.storage = Storage(url)

    def _arrays(self, key: str, data: Optional[bytes]) -> dict[str, np.ndarray]:
        if data is None:
            raise FileNotFoundError(f"levels {self.storage.url}/{key} are missing")
        return unpack_arrays(data)

    def put_histograms(self, task: int, hist: np.ndarray) -> None:
        self.storage.put(f"histograms/task-{task}", pack_arrays({"counts": hist}))

    def histogram_sum(self, tasks: Sequence[int]) -> np.ndarray:
        """The tasks' histograms added (int64), read in parallel, `MERGE_BATCH` at a time (a
        slab of a petavoxel section has ~10^4 blocks: memory stays bounded)."""
        total = 0
        for at in range(0, len(tasks), MERGE_BATCH):
            got = self.storage.get_many([f"histograms/task-{t}"
                                         for t in tasks[at:at + MERGE_BATCH]])
            total = total + sum(self._arrays(k, v)["counts"].astype(np.int64)
                                for k, v in got.items())
        return total

    def put_windows(self, slab: int, z0: int, found: np.ndarray) -> None:
        self.storage.put(f"windows/slab-{slab}", pack_arrays({"z0": np.array([z0]),
                                                               "windows": found}))

    def windows(self, slabs: Sequence[int]) -> dict[int, np.ndarray]:
        """Section -> [lo, hi] over the slabs given."""
        out = {}
        for slab in slabs:
            key = f"windows/slab-{slab}"
            arrays = self._arrays(key, self.storage.get(key))
            z0 = int(arrays["z0"][0])
            out.update({z0 + k: w for k, w in enumerate(arrays["windows"])})
        return out
