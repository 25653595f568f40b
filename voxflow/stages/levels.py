"""The levels stages of `normalize:` (the numpy side and why: voxflow/levels.py): `levels`
counts each xy block's per-section histograms, `levels-merge` adds a slab's blocks and keeps
its windows, beside the partial sums (`<temporary>/<run>/levels/`) until the run ends."""
from __future__ import annotations

import numpy as np

from ..geometry import Box
from ..inputs import read_input
from ..levels import LevelsStore, histograms, windows
from ..pipeline import Plan
from ..temporary import temporary_url
from ..volume import Volume
from . import stage_grid, task_box


def levels_store(p: Plan, run: str) -> LevelsStore:
    return LevelsStore(f"{temporary_url(p.config, run)}/levels")


class _Levels:
    kind = "levels"
    name = "levels"

    def __init__(self, p: Plan, run: str):
        self.plan, self.levels = p, p.levels
        self.grid = stage_grid(p, self.name)
        self.store = levels_store(p, run)

    def __len__(self) -> int:
        return len(self.grid)

    def box(self, index: int) -> Box:
        return task_box(self.grid, index, self.name)


class LevelsStage(_Levels):
    """Pass 1: one xy block of one slab, read at `normalize.mip`, counted per section."""

    def __init__(self, p: Plan, run: str):
        super().__init__(p, run)
        cfg = p.config
        self._input = Volume(cfg.input, self.levels.mip, fill_missing=cfg.input_missing == "zeros")

    def load(self, index: int) -> np.ndarray:
        return read_input(self._input, self.box(index), "zeros")     # inside the input

    def compute(self, index: int, image: np.ndarray) -> np.ndarray:
        return histograms(image, self.levels.bins)

    def write(self, index: int, hist: np.ndarray) -> None:
        self.store.put_histograms(index, hist)


class LevelsMergeStage(_Levels):
    """Pass 2: one slab's histograms added; its sections' windows, one object."""

    name = "levels-merge"

    def load(self, index: int) -> np.ndarray:
        self.box(index)
        return self.store.histogram_sum(self.levels.slab_tasks(index))

    def compute(self, index: int, hist: np.ndarray) -> np.ndarray:
        return windows(hist, self.levels.clip)

    def write(self, index: int, found: np.ndarray) -> None:
        self.store.put_windows(index, self.box(index).start[2], found)
