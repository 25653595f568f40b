"""Skipping work: a tissue mask (`mask:`) and empty inputs (`skip_empty:`).

The mask is read once, at plan, at its own (coarse) mip over the run's bbox, and mapped onto
the run's voxels nearest-neighbour: run voxel v (resolution r) takes mask voxel
floor((v + 1/2) * r / r_mask), in exact integers. From it plan knows, per inference task,
whether the task's box meets tissue (a summed-area table: O(1) per task, one vectorised pass
per grid); tasks that do not are never published. Tasks that run multiply their output by
the upsampled mask before the output dtype, so the output outside the mask is 0 and, since
every task whose box holds a tissue voxel runs, blending stays exact wherever the mask is
nonzero (docs/blending.md).

`skip_empty`: a task whose input is all one value skips the model and writes zeros (its
partial sums too, in overlap mode: the blend stage never meets a missing partial); the
worker acks it as skipped (`Skipped`).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional, Sequence

import numpy as np

from .geometry import Box


class MaskCoverageError(ValueError):
    """The mask layer does not cover what the run's bbox maps to."""


class _Axis:
    """Run voxel -> mask voxel along one axis: floor((2v + 1) * num / (2 * den))."""

    def __init__(self, run_resolution: float, mask_resolution: float):
        ratio = Fraction(run_resolution) / Fraction(mask_resolution)
        self.num, self.den = ratio.numerator, ratio.denominator

    def __call__(self, v: Any) -> Any:
        return ((2 * v + 1) * self.num) // (2 * self.den)

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """The mask voxels run voxels [lo, hi) map to, as a half-open range (monotone)."""
        return self(lo), self(hi - 1) + 1


class TissueMap:
    """The mask over the bbox (bool, z y x) and which tasks of a grid meet tissue."""

    def __init__(self, volume, bbox: Box, resolution: Sequence[float], grid):
        """`volume`: the mask layer opened at its mip (missing chunks read as no tissue);
        `resolution`: the run's. Raises MaskCoverageError if the layer's bounds do not
        hold the mask box the bbox maps to."""
        self.axes = [_Axis(r, rm) for r, rm in zip(resolution, volume.resolution)]
        spans = [ax.span(a, b) for ax, a, b in zip(self.axes, bbox.start, bbox.stop)]
        self.box = Box([s[0] for s in spans], [s[1] for s in spans])   # mask voxels
        if not volume.bounds.contains(self.box):
            raise MaskCoverageError(f"covers {volume.bounds} at its mip {volume.mip}; the "
                                    f"bbox {bbox} needs {self.box}")
        self.tissue = np.asarray(volume.read(self.box) != 0).any(axis=0)    # (z, y, x)
        sums = np.pad(self.tissue.astype(np.int64).cumsum(0).cumsum(1).cumsum(2),
                      ((1, 0), (1, 0), (1, 0)))        # a summed-area table: O(1) per box
        self.tasks = self._task_tissue(grid, sums)     # flat, task index order (x fastest)
        self.masked = int(self.tasks.size - np.count_nonzero(self.tasks))   # not published

    def runs(self, index: int) -> bool:
        return bool(self.tasks[index])

    def _bounds(self, axis: int, ranges: list[tuple[int, int]]) -> tuple[np.ndarray, ...]:
        """Per task along `axis`, its mask span relative to `self.box`, clipped."""
        ax, origin = self.axes[axis], self.box.start[axis]
        n = self.tissue.shape[2 - axis]
        lo = np.array([ax(a) for a, _ in ranges], np.int64) - origin
        hi = np.array([ax(b - 1) + 1 for _, b in ranges], np.int64) - origin
        return np.clip(lo, 0, n), np.clip(hi, 0, n)

    def _task_tissue(self, grid, s: np.ndarray) -> np.ndarray:
        (x0, x1), (y0, y1), (z0, z1) = (self._bounds(a, r) for a, r in
                                        enumerate(_axis_ranges(grid)))
        z0, z1 = z0[:, None, None], z1[:, None, None]
        y0, y1 = y0[None, :, None], y1[None, :, None]
        x0, x1 = x0[None, None, :], x1[None, None, :]
        count = (s[z1, y1, x1] - s[z0, y1, x1] - s[z1, y0, x1] - s[z1, y1, x0]
                 + s[z0, y0, x1] + s[z0, y1, x0] + s[z1, y0, x0] - s[z0, y0, x0])
        return (count > 0).ravel()

    def upsampled(self, box: Box) -> np.ndarray:
        """The mask at the run's voxels of `box` (z, y, x, bool); False outside the bbox's
        mask box (voxels a task computes beyond the bbox are never written)."""
        index = [self.axes[axis](np.arange(box.start[axis], box.stop[axis], dtype=np.int64))
                 - self.box.start[axis] for axis in (2, 1, 0)]
        inside = [(m >= 0) & (m < n) for m, n in zip(index, self.tissue.shape)]
        picked = self.tissue[np.ix_(*(np.clip(m, 0, n - 1) for m, n in
                                      zip(index, self.tissue.shape)))]
        return picked & inside[0][:, None, None] & inside[1][None, :, None] \
            & inside[2][None, None, :]

    def masked_sum(self, per_axis: Sequence[Sequence[float]]) -> float:
        """Sum over the tasks that run of the product of per-axis terms (x, y, z lists, one
        value per task position): e.g. patches per task, so the bill prices only these."""
        px, py, pz = (np.asarray(t, np.float64) for t in per_axis)
        grid = self.tasks.reshape(len(pz), len(py), len(px)).astype(np.float64)
        return float(np.einsum("zyx,z,y,x->", grid, pz, py, px))


def _axis_ranges(grid) -> list[list[tuple[int, int]]]:
    """Per axis x, y, z, the range of the task boxes along it (a grid's boxes are their
    products: ChunkGrid and OverlapGrid alike)."""
    out = []
    for axis in range(3):
        pos, ranges = [0, 0, 0], []
        for t in range(grid.counts[axis]):
            pos[axis] = t
            box = grid.box(grid.index(pos))
            ranges.append((box.start[axis], box.stop[axis]))
        out.append(ranges)
    return out


def uniform(image: np.ndarray) -> bool:
    """Whether a task's input is all one value (`skip_empty`)."""
    return image.size == 0 or bool(image.min() == image.max())


class Skipped:
    """A task's result computed without the model (its input was all one value): written
    like any other, and acked as skipped (`TaskQueue.ack(..., skipped=True)`)."""

    skipped = True

    def __init__(self, value: Any):
        self.value = value


def unwrap(computed: Any) -> Any:
    return computed.value if isinstance(computed, Skipped) else computed


def apply_mask(values, tissue: Optional[TissueMap], box: Box):
    """values (c, z, y, x, a torch tensor over `box`) times the upsampled mask: 0 outside
    the tissue, unchanged inside (multiplying by 1 keeps every bit)."""
    if tissue is None:
        return values
    import torch
    mask = torch.from_numpy(tissue.upsampled(box)).to(values.device)
    return values * mask.to(values.dtype)
