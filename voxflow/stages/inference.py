"""The inference stage: the model over each task's box, patch by patch (SlidingWindow).
Crop mode writes each chunk's centre; overlap mode writes its exclusive box final and its
band parts as partial sums for the blend stage."""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ..grids import OverlapGrid
from ..geometry import Box
from ..inference import SlidingWindow
from ..inputs import read_input
from ..levels import apply_windows, source_sections
from ..mask import Skipped, apply_mask, uniform, unwrap
from ..models import Model, ModelOutputError, pick_device, to_host
from ..pipeline import Plan
from ..sharding import shard_grid
from ..temporary import TemporaryStore, pack_key, partial_key, temporary_url
from ..volume import Volume
from . import crop_read_box, task_box
from .output import to_output


def _host(data: Union[np.ndarray, Callable[[], np.ndarray]]) -> np.ndarray:
    """An array, or a pending device-to-host copy (`to_host`): the array."""
    return data() if callable(data) else data


def _forward(stage: str, index: int, box: Box, fn: Callable[[], Any]) -> Any:
    """Run a task's model work; a bad model output names the chunk. The model's own error
    keeps its type and text (the queue keys it by task index) and gets a note with the box,
    which the worker's log shows in its trace."""
    try:
        return fn()
    except ModelOutputError as exc:
        raise exc.on_chunk(stage, index, box) from None
    except Exception as exc:
        exc.add_note(f"while running the model on {stage} task {index}, box {box}")
        raise


class InferenceStage:
    """Crop mode: each task reads its chunk plus margin, runs SlidingWindow, crops, writes.
    With `normalize:` (run `run`), its input is mapped through its sections' windows."""

    name = kind = "inference"

    def __init__(self, p: Plan, model: Optional[Model] = None, run: Optional[str] = None):
        self.plan = p
        cfg = p.config
        self.model = model or Model(cfg.model, pick_device(cfg.inference.device),
                                    cfg.inference.batch_size)
        self.window = SlidingWindow(self.model, cfg.model.input_patch, cfg.model.output_patch,
                                    cfg.inference.patch_overlap, cfg.inference.batch_size,
                                    cfg.inference.weighting, cfg.augment)
        self._input = Volume(cfg.input, cfg.mip, fill_missing=cfg.input_missing == "zeros")
        self._output = Volume(cfg.output)
        if p.levels is not None:
            from .levels import levels_store
            self._levels = levels_store(p, run)

    def _read(self, box: Box) -> np.ndarray:
        """The input of `box`; with `normalize:`, each section through its window (the
        windows of the few slabs the box meets: O(1) small reads)."""
        pad = self.plan.config.inference.pad
        image = read_input(self._input, box, pad)
        if self.plan.levels is None:
            return image
        sections = source_sections(box, self.plan.input_bounds, pad)
        found = self._levels.windows(self.plan.levels.slab_range(int(sections.min()),
                                                                 int(sections.max()) + 1))
        return apply_windows(image, sections, found)

    def __len__(self) -> int:
        return len(self.plan.grid)

    def box(self, index: int) -> Box:
        return task_box(self.plan.grid, index, self.name)

    def read_box(self, index: int) -> Box:
        return crop_read_box(self.plan, index)

    def load(self, index: int) -> np.ndarray:
        return self._read(self.read_box(index))

    def compute(self, index: int, image: np.ndarray) -> Union[list, Skipped]:
        box, read, cfg = self.box(index), self.read_box(index), self.plan.config
        if cfg.skip_empty and uniform(image):
            zeros = np.zeros((cfg.output_channels, *reversed(box.shape)), cfg.output_dtype)
            return Skipped([(box, zeros)])
        result = _forward(self.name, index, box, lambda: self.window(image))  # read - margin
        origin = [a + m for a, m in zip(read.start, cfg.model.patch_margin)]
        crop = apply_mask(result[(slice(None), *box.zyx_slices(origin))], self.plan.tissue, box)
        return [(box, to_host(to_output(crop, cfg)))]

    def write(self, index: int, computed: Union[list, Skipped]) -> None:
        for box, data in unwrap(computed):
            self._output.write(box, _host(data))


def _divide(acc: torch.Tensor, sums: list[np.ndarray]) -> None:
    """acc (c, z, y, x) /= float32(z * y * x) of the 1D float64 weight sums, one z section
    at a time: the 3D sum (float64 on the way) is never held whole, on the host or device."""
    zy = torch.from_numpy(np.outer(sums[0], sums[1])).to(acc.device)
    x = torch.from_numpy(sums[2]).to(acc.device)
    for k in range(acc.shape[1]):
        acc[:, k] /= (zy[k][:, None] * x[None, :]).to(torch.float32)


class OverlapInferenceStage(InferenceStage):
    """Overlap mode: each task runs its block of the run's patch lattice, divides by the
    whole lattice's weight sum, writes its exclusive box final and its band parts as partial
    sums to temporary storage (one object per band cell: no read-modify-write)."""

    def __init__(self, p: Plan, run: str, model: Optional[Model] = None):
        super().__init__(p, model, run)
        self.grid: OverlapGrid = p.grid
        self.store = TemporaryStore(temporary_url(p.config, run))

    def __len__(self) -> int:
        return len(self.grid)

    def box(self, index: int) -> Box:
        return task_box(self.grid, index, self.name)

    def load(self, index: int) -> np.ndarray:
        return self._read(self.grid.read_box(index))

    @torch.inference_mode()
    def compute(self, index: int, image: np.ndarray) -> Union[tuple[str, list], Skipped]:
        """("pieces", [(box, cell, values)]): final values of the exclusive box (cell None)
        and partial sums of band cells; sharded, ("pack", ...) of pieces split by shard.
        Masked outside the tissue; zeros (partials too) for a skipped empty input."""
        cfg, extent = self.plan.config, self.grid.extent(index)
        empty = cfg.skip_empty and uniform(image)
        if empty:
            acc = torch.zeros((cfg.model.output_channels, *reversed(extent.shape)))
        else:
            acc = _forward(self.name, index, self.box(index), lambda: self.window.weighted_sum(
                image, self.grid.patch_starts(index)))
            _divide(acc, self.grid.weight_sums(index, cfg.inference.weighting))
            acc = apply_mask(acc, self.plan.tissue, extent)
        pieces = self._pieces(index, acc, extent.start)
        return Skipped(pieces) if empty else pieces

    def _pieces(self, index: int, acc: torch.Tensor, origin) -> tuple[str, list]:
        cfg = self.plan.config

        def values(box: Box, final: bool) -> Callable[[], np.ndarray]:
            part = acc[(slice(None), *box.zyx_slices(origin))]
            return to_host(to_output(part, cfg) if final else part)

        pieces = self.grid.pieces(index)
        if self.plan.shard_shapes is None:
            return "pieces", [(p.box, p.cell, values(p.box, p.cell is None)) for p in pieces]
        # sharded: no shard is this task's alone to write; every piece, split by shard and
        # grouped by shard, goes into one pack for the blend stage to assemble
        packed = []
        for shard in shard_grid(self.plan.input_bounds, self.plan.shard_shapes[0],
                                self.grid.box(index)):
            for piece in pieces:
                box = piece.box.intersect(shard)
                if not box.is_empty():
                    packed.append((box, piece.cell, values(box, piece.cell is None)))
        return "pack", packed

    def write(self, index: int, computed: Union[tuple[str, list], Skipped]) -> None:
        how, pieces = unwrap(computed)
        if how == "pack":
            self.store.put_pack(pack_key(index), [(b, c, _host(v)) for b, c, v in pieces])
            return
        for box, cell, data in pieces:
            if cell is None:
                self._output.write(box, _host(data))
            else:
                self.store.put(partial_key(cell, index), _host(data))
