"""Stage operations: what a worker does for one task, by stage name and task index.

A worker runs only operations it knows by name (`build_stage`). Each task is split into
`load` (read its input: I/O, prefetched while the previous task computes), `compute` (what it
writes, on its way to host memory) and `write` (the writes: behind the next task's compute).
All are idempotent: re-running a task writes the same bytes to the same places, so
at-least-once delivery is harmless.

Stages of a run: inference (crop mode: `InferenceStage`; overlap mode:
`OverlapInferenceStage`), then in overlap mode `BlendStage`, then the downsample passes.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Protocol, Union

import numpy as np
import torch

from .blend import BandGrid, OverlapGrid
from .downsample import downsample
from .geometry import Box, ChunkGrid
from .inference import SlidingWindow
from .inputs import CorruptChunk, read_input  # noqa: F401 (CorruptChunk: re-exported)
from .mask import Skipped, apply_mask, uniform, unwrap
from .models import Model, ModelOutputError, pick_device, to_host
from .config import RunConfig
from .pipeline import Plan, plan
from .sharding import shard_grid
from .temporary import TemporaryStore, pack_key, partial_key, temporary_url
from .volume import Volume


class Stage(Protocol):
    name: str
    kind: str             # which worker group serves it: "inference" | "blend" | "downsample"

    def __len__(self) -> int: ...

    def box(self, index: int) -> Box: ...

    def load(self, index: int) -> Any: ...

    def compute(self, index: int, loaded: Any) -> Any: ...

    def write(self, index: int, computed: Any) -> None: ...


def run_task(stage: Stage, index: int) -> None:
    stage.write(index, stage.compute(index, stage.load(index)))


def _host(data: Union[np.ndarray, Callable[[], np.ndarray]]) -> np.ndarray:
    """An array, or a pending device-to-host copy (`to_host`): the array."""
    return data() if callable(data) else data


class UnknownStage(KeyError):
    """A stage name that is no operation of the run: a message names operations, it is
    never code."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown stage"


class TaskOutsidePlan(IndexError):
    """A task index that is not in its stage's grid."""


def _task_box(grid, index: int, stage: str) -> Box:
    """`grid.box(index)`, refusing an index outside the stage's tasks by name."""
    if not 0 <= index < len(grid):
        raise TaskOutsidePlan(f"task index {index} is outside stage {stage}'s {len(grid)} "
                              "task(s) in the run's plan")
    return grid.box(index)


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


def to_output_dtype(prob: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 probabilities -> the output dtype, on the device (less to copy back)."""
    if dtype == "uint8":
        return (prob.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return prob.to(getattr(torch, dtype))


class InferenceStage:
    """Crop mode: each task reads its chunk plus margin, runs SlidingWindow, crops, writes."""

    name = kind = "inference"

    def __init__(self, p: Plan, model: Optional[Model] = None):
        self.plan = p
        cfg = p.config
        self.model = model or Model(cfg.model, pick_device(cfg.inference.device),
                                    cfg.inference.batch_size)
        self.window = SlidingWindow(self.model, cfg.model.input_patch, cfg.model.output_patch,
                                    cfg.inference.patch_overlap, cfg.inference.batch_size,
                                    cfg.inference.weighting)
        self._input = Volume(cfg.input, cfg.mip, fill_missing=cfg.input_missing == "zeros")
        self._output = Volume(cfg.output)

    def __len__(self) -> int:
        return len(self.plan.grid)

    def box(self, index: int) -> Box:
        return _task_box(self.plan.grid, index, self.name)

    def read_box(self, index: int) -> Box:
        """The chunk plus margin, grown to at least one input patch."""
        read = self.plan.grid.read_box(index)
        short = [max(p - n, 0) for p, n in zip(self.plan.config.model.input_patch, read.shape)]
        return Box([a - s // 2 for a, s in zip(read.start, short)],
                   [b + s - s // 2 for b, s in zip(read.stop, short)])

    def load(self, index: int) -> np.ndarray:
        return read_input(self._input, self.read_box(index), self.plan.config.inference.pad)

    def compute(self, index: int, image: np.ndarray) -> Union[list, Skipped]:
        box, read, cfg = self.box(index), self.read_box(index), self.plan.config
        if cfg.skip_empty and uniform(image):
            zeros = np.zeros((cfg.model.output_channels, *reversed(box.shape)), cfg.output_dtype)
            return Skipped([(box, zeros)])
        result = _forward(self.name, index, box, lambda: self.window(image))  # read - margin
        origin = [a + m for a, m in zip(read.start, cfg.model.patch_margin)]
        crop = apply_mask(result[(slice(None), *box.zyx_slices(origin))], self.plan.tissue, box)
        return [(box, to_host(to_output_dtype(crop, cfg.output_dtype)))]

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
        super().__init__(p, model)
        self.grid: OverlapGrid = p.grid
        self.store = TemporaryStore(temporary_url(p.config, run))

    def __len__(self) -> int:
        return len(self.grid)

    def box(self, index: int) -> Box:
        return _task_box(self.grid, index, self.name)

    def load(self, index: int) -> np.ndarray:
        return read_input(self._input, self.grid.read_box(index),
                           self.plan.config.inference.pad)

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
            return to_host(to_output_dtype(part, cfg.output_dtype) if final else part)

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
        return _task_box(self.grid, index, self.name)


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
        channels, dtype = self.plan.config.model.output_channels, self.plan.config.output_dtype
        out = []
        for box, parts in cells:
            acc = np.zeros((channels, *reversed(box.shape)), np.float32)
            for part_box, part in parts:
                acc[(slice(None), *part_box.zyx_slices(box.start))] += part
            out.append((box, to_output_dtype(torch.from_numpy(acc), dtype).numpy()))
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
        out = np.zeros((cfg.model.output_channels, *reversed(shard.shape)), cfg.output_dtype)
        sums: dict[tuple, tuple[Box, np.ndarray]] = {}
        for pieces in packs:                              # in task order
            for box, cell, values in pieces:
                if cell is None:
                    out[(slice(None), *box.zyx_slices(shard.start))] = values
                    continue
                if cell not in sums:
                    cbox = self.plan.grid.bands.cell_box(cell).intersect(shard)
                    sums[cell] = cbox, np.zeros((out.shape[0], *reversed(cbox.shape)),
                                                np.float32)
                cbox, acc = sums[cell]
                acc[(slice(None), *box.zyx_slices(cbox.start))] += values
        for cbox, acc in sums.values():
            out[(slice(None), *cbox.zyx_slices(shard.start))] = to_output_dtype(
                torch.from_numpy(acc), cfg.output_dtype).numpy()
        return out

    def write(self, index: int, shard: np.ndarray) -> None:
        self._output.write(self.box(index), shard)


class DownsampleStage:
    """One pass of the pyramid: read a source-mip box, write the mips above it."""

    kind = "downsample"

    def __init__(self, p: Plan, number: int):
        self.plan = p
        self.name = f"downsample-{number}"
        self.pass_ = p.downsample[number]
        url = p.config.output
        self._volumes = [Volume(url, self.pass_.source_mip + k) for k in range(self.pass_.mips + 1)]

    def __len__(self) -> int:
        return len(self.pass_.grid)

    def box(self, index: int) -> Box:
        return _task_box(self.pass_.grid, index, self.name)

    def load(self, index: int) -> np.ndarray:
        return self._volumes[0].read(self.box(index))

    def compute(self, index: int, image: np.ndarray) -> list[np.ndarray]:
        seg = self._volumes[0].layer_type == "segmentation"
        return downsample(image, self.plan.config.downsample.factor, self.pass_.mips, seg)

    def write(self, index: int, levels: list[np.ndarray]) -> None:
        factor = self.plan.config.downsample.factor
        for k, level in enumerate(levels, 1):
            self._volumes[k].write(self.pass_.target_box(self.box(index), factor, k), level)


def stage_grid(p: Plan, name: str) -> Union[ChunkGrid, OverlapGrid, BandGrid]:
    """The task grid of stage `name` (what is published, and what messages are checked
    against)."""
    if name == "inference":
        return p.grid
    if name == "blend" and isinstance(p.grid, OverlapGrid):
        if p.shard_shapes is not None:                  # one task per shard of the bbox
            return shard_grid(p.input_bounds, p.shard_shapes[0], p.bbox)
        return p.grid.bands
    kind, _, number = name.partition("-")
    if kind == "downsample" and number.isdigit() and int(number) < len(p.downsample):
        return p.downsample[int(number)].grid
    raise UnknownStage(f"unknown stage {name!r}: this run's stages are "
                       f"{', '.join(stage_names(p))}")


def stage_names(p: Plan) -> list[str]:
    """The run's stages, in the order they run (blend where chunks meet, and wherever the
    output is sharded in overlap mode: shards are assembled there)."""
    blend = ["blend"] if isinstance(p.grid, OverlapGrid) and (
        len(p.grid.bands) or p.shard_shapes is not None) else []
    return ["inference", *blend] + [f"downsample-{i}" for i in range(len(p.downsample))]


def stage_kind(name: str) -> str:
    return name.split("-", 1)[0]


def build_stage(p: Plan, name: str, run: str, model: Optional[Model] = None) -> Stage:
    """The operation for stage `name` of run `run`; unknown names are refused (a message is
    not code)."""
    stage_grid(p, name)
    if name == "inference":
        if isinstance(p.grid, OverlapGrid):
            return OverlapInferenceStage(p, run, model)
        return InferenceStage(p, model)
    if name == "blend":
        return ShardBlendStage(p, run) if p.shard_shapes is not None else BlendStage(p, run)
    return DownsampleStage(p, int(name.partition("-")[2]))


class ModelChanged(RuntimeError):
    """The model file is not the one the run was planned with."""


class StageCache:
    """Builds a run's stages from the parameters stored with the run, once per run.

    The model is loaded (once, on the worker's device) when the run's first inference task
    arrives, and refused unless its digest is the one the run was planned with: a model file
    overwritten mid-run would otherwise mix two models in one output. Keeps the most recent
    runs only (a worker serving many runs must not keep every model).
    """

    def __init__(self, queue, keep: int = 2, log: Optional[Callable[..., None]] = None):
        self._queue = queue
        self.log = log
        self._keep = keep
        self._runs: dict[str, tuple[Plan, dict[str, Stage]]] = {}
        self._lock = threading.Lock()

    def __call__(self, run: str, name: str) -> Stage:
        with self._lock:
            if run not in self._runs:
                config = RunConfig.model_validate_json(self._queue.run_params(run))
                self._runs[run] = (plan(config, check_model=False), {})
                while len(self._runs) > self._keep:
                    self._runs.pop(next(iter(self._runs)))
            p, stages = self._runs[run]
            if name not in stages:
                model = self._model(run, p) if stage_kind(name) == "inference" else None
                stages[name] = build_stage(p, name, run, model)
            return stages[name]

    def _model(self, run: str, p: Plan) -> Model:
        config = p.config
        model = Model(config.model, pick_device(config.inference.device),
                      config.inference.batch_size)
        state = self._queue.run_state(run)
        planned = (state.meta if state else {}).get("model_digest")
        if planned and model.digest != planned:
            raise ModelChanged(f"model.path: {config.model.path} changed since run {run} was "
                               f"planned (planned {planned[:19]}, found {model.digest[:19]}): "
                               "run again, which starts a new run for the new model")
        seconds = model.warm_up(p.input_channels)
        if self.log:
            self.log("model_loaded", run=run, digest=model.digest, device=str(model.device),
                      warm_up_seconds=round(seconds, 3), compile_seconds=model.compile_seconds)
        return model
