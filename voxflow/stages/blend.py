"""The blend stage (overlap mode): where chunks meet, their partial sums added in task
order (fixed: a retry writes the same bits), the sum made final and written."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from ..geometry import Box
from ..grids import BandGrid, ChunkGrid
from ..pipeline import Plan
from ..temporary import TemporaryStore, pack_key, partial_key, temporary_url
from ..volume import Volume
from . import stage_grid, task_box
from .output import to_output


class _Blend:
    """What both blend stages share: a task grid, the run's temporary data, the output."""

    name = kind = "blend"

    def __init__(self, p: Plan, run: str, grid: Union[BandGrid, ChunkGrid]):
        self.plan, self.grid = p, grid
        self.store = TemporaryStore(temporary_url(p.config, run))
        self._output = Volume(p.config.output)

    def __len__(self) -> int:
        return len(self.grid)

    def box(self, index: int) -> Box:
        return task_box(self.grid, index, self.name)


class BlendStage(_Blend):
    """Overlap mode: a task blends up to 7 band cells; for each it adds the cell's partial
    sums in task order (fixed, so a retry writes the same bits), casts to the output dtype
    and writes the cell's whole storage-aligned block."""

    def __init__(self, p: Plan, run: str):
        super().__init__(p, run, p.grid.bands)
        self.bands: BandGrid = self.grid

    def load(self, index: int) -> list[tuple[Box, list[tuple[Box, np.ndarray]]]]:
        channels = self.plan.config.model.output_channels
        return [(self.bands.cell_box(cell),
                 [(box, self.store.get(partial_key(cell, task),
                                       (channels, *reversed(box.shape))))
                  for task, box in self.bands.sources(cell) if self.plan.runs(task)])
                for cell in self.bands.cells(index)]

    def compute(self, index: int, cells: list[tuple[Box, list[tuple[Box, np.ndarray]]]]
                ) -> list[tuple[Box, np.ndarray]]:
        cfg = self.plan.config
        out = []
        for box, parts in cells:
            acc = np.zeros((cfg.model.output_channels, *reversed(box.shape)), np.float32)
            for part_box, part in parts:
                acc[(slice(None), *part_box.zyx_slices(box.start))] += part
            out.append((box, to_output(torch.from_numpy(acc), cfg).numpy()))
        return out

    def write(self, index: int, computed: list[tuple[Box, np.ndarray]]) -> None:
        for box, data in computed:
            self._output.write(box, data)


class ShardBlendStage(_Blend):
    """Overlap mode, sharded output: a task assembles one whole shard from the packs of the
    inference tasks that meet it — their final values, and the band cells' partial sums
    added in task order (the unsharded blend's order, so the bytes are the same) — and
    writes the shard, once."""

    def __init__(self, p: Plan, run: str):
        super().__init__(p, run, stage_grid(p, "blend"))

    def load(self, index: int) -> list[list[tuple[Box, Optional[tuple], np.ndarray]]]:
        shard = self.box(index)
        return [self.store.pack_pieces(pack_key(task), shard)
                for task in self.plan.grid.tasks_meeting(shard) if self.plan.runs(task)]

    def compute(self, index: int, packs: list) -> np.ndarray:
        cfg, shard = self.plan.config, self.box(index)
        out = np.zeros((cfg.output_channels, *reversed(shard.shape)), cfg.output_dtype)
        sums: dict[tuple, tuple[Box, np.ndarray]] = {}
        for pieces in packs:                              # in task order
            for box, cell, values in pieces:
                if cell is None:
                    out[(slice(None), *box.zyx_slices(shard.start))] = values
                    continue
                if cell not in sums:
                    cbox = self.plan.grid.bands.cell_box(cell).intersect(shard)
                    sums[cell] = cbox, np.zeros((cfg.model.output_channels,
                                                 *reversed(cbox.shape)), np.float32)
                cbox, acc = sums[cell]
                acc[(slice(None), *box.zyx_slices(cbox.start))] += values
        for cbox, acc in sums.values():
            out[(slice(None), *cbox.zyx_slices(shard.start))] = to_output(
                torch.from_numpy(acc), cfg).numpy()
        return out

    def write(self, index: int, shard: np.ndarray) -> None:
        self._output.write(self.box(index), shard)
