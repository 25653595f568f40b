"""The downsample stage: one pass of a pyramid (averaging, or mode for a segmentation)."""
from __future__ import annotations

import numpy as np

from ..downsample import downsample
from ..geometry import Box
from ..pipeline import Plan
from ..volume import Volume
from . import task_box


class DownsampleStage:
    """One pass of a pyramid (the output's, or with `layer="segmentation"` the segmentation
    layer's, by mode): read a source-mip box, write the mips above it."""

    kind = "downsample"

    def __init__(self, p: Plan, number: int, layer: str = "output"):
        self.plan = p
        seg = layer == "segmentation"
        self.name = f"downsample-segmentation-{number}" if seg else f"downsample-{number}"
        self.pass_ = (p.segmentation.downsample if seg else p.downsample)[number]
        url = p.config.segmentation.output if seg else p.config.output
        self._volumes = [Volume(url, self.pass_.source_mip + k) for k in range(self.pass_.mips + 1)]

    def __len__(self) -> int:
        return len(self.pass_.grid)

    def box(self, index: int) -> Box:
        return task_box(self.pass_.grid, index, self.name)

    def load(self, index: int) -> np.ndarray:
        return self._volumes[0].read(self.box(index))

    def compute(self, index: int, image: np.ndarray) -> list[np.ndarray]:
        seg = self._volumes[0].layer_type == "segmentation"
        return downsample(image, self.plan.config.downsample.factor, self.pass_.mips, seg)

    def write(self, index: int, levels: list[np.ndarray]) -> None:
        factor = self.plan.config.downsample.factor
        for k, level in enumerate(levels, 1):
            self._volumes[k].write(self.pass_.target_box(self.box(index), factor, k), level)
