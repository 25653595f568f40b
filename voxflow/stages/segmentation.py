"""The segmentation stage's four passes over the (blended) output: label, pairs, merge,
relabel (the labelling and union-find: voxflow/segmentation.py; why four: docs/segmentation.md)."""
from __future__ import annotations

import numpy as np

from ..geometry import Box
from ..pipeline import Plan
from ..segmentation import (SegmentationStore, face_planes, foreground, label, merge,
                            neighbours, relabel, task_pairs, voxel_counts)
from ..temporary import temporary_url
from ..volume import Volume
from . import stage_grid, task_box


class _Segmentation:
    """What the segmentation passes share: a task grid, the run's segmentation objects
    (beside the partial sums: `<temporary>/<run>/segmentation/`), and how a box is labelled
    — the same in the label and relabel passes, so no provisional volume is stored."""

    kind = "segmentation"
    step = ""

    def __init__(self, p: Plan, run: str):
        self.plan, self.seg = p, p.config.segmentation
        self.name = f"segmentation-{self.step}"
        self.grid = stage_grid(p, self.name)
        self.store = SegmentationStore(f"{temporary_url(p.config, run)}/segmentation")
        self._output = Volume(p.config.output)

    def __len__(self) -> int:
        return len(self.grid)

    def box(self, index: int) -> Box:
        return task_box(self.grid, index, self.name)

    def _labels(self, index: int, values: np.ndarray) -> tuple[np.ndarray, int]:
        fg = foreground(values[self.seg.channel], self.seg.threshold, self.seg.invert)
        if self.plan.tissue is not None:                # no objects outside the mask
            fg &= self.plan.tissue.upsampled(self.box(index))
        return label(fg, self.seg.connectivity)


class SegmentLabelStage(_Segmentation):
    """Pass 1: label the box; keep its face planes and its labels' voxel counts."""

    step = "label"

    def load(self, index: int) -> np.ndarray:
        return self._output.read(self.box(index))

    def compute(self, index: int, values: np.ndarray) -> tuple[np.ndarray, dict]:
        labels, n = self._labels(index, values)
        return voxel_counts(labels, n), face_planes(labels)

    def write(self, index: int, computed: tuple[np.ndarray, dict]) -> None:
        self.store.put_faces(index, *computed)


class SegmentPairsStage(_Segmentation):
    """Pass 2: the label pairs that touch across the box's boundary with each forward
    neighbour (faces, edges, corners, as the connectivity reaches)."""

    step = "pairs"

    def load(self, index: int) -> tuple:
        return self.store.faces(index), [(d, u, self.store.faces(u)[1]) for d, u in
                                         neighbours(self.grid, index, self.seg.connectivity)]

    def compute(self, index: int, loaded: tuple) -> tuple[np.ndarray, list]:
        (counts, planes), others = loaded
        return counts, task_pairs(planes, others, self.seg.connectivity)

    def write(self, index: int, computed: tuple[np.ndarray, list]) -> None:
        self.store.put_pairs(index, *computed)


class SegmentMergeStage(_Segmentation):
    """Pass 3 (one task): union-find over every pair, min_size, the final ids' table."""

    step = "merge"

    def load(self, index: int) -> tuple[list, list]:
        return self.store.all_pairs(len(self.plan.segmentation.grid))

    def compute(self, index: int, loaded: tuple[list, list]) -> tuple:
        return merge(*loaded, self.seg.min_size, self.seg.dtype)

    def write(self, index: int, computed: tuple) -> None:
        self.store.put_table(*computed)


class SegmentRelabelStage(_Segmentation):
    """Pass 4: label the box again, map its labels to final ids, write the layer."""

    step = "relabel"

    def __init__(self, p: Plan, run: str):
        super().__init__(p, run)
        self._layer = Volume(self.seg.output)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._output.read(self.box(index)), self.store.table_slice(index, self.seg.dtype)

    def compute(self, index: int, loaded: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        values, table = loaded
        labels, n = self._labels(index, values)
        if n != len(table):
            raise RuntimeError(f"{self.name} task {index}: box {self.box(index)} has {n} "
                               f"labels now, {len(table)} when it was labelled (the output "
                               "changed since): run again")
        return relabel(labels, table)[None]

    def write(self, index: int, ids: np.ndarray) -> None:
        self._layer.write(self.box(index), ids)


SEGMENTATION_STAGES = {s.step: s for s in (SegmentLabelStage, SegmentPairsStage,
                                           SegmentMergeStage, SegmentRelabelStage)}
