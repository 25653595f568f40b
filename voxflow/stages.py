"""Stage operations: what a worker does for one task, by stage name and task index.

A worker runs only operations it knows by name (`build_stage`). Each task is split into
`load` (read its input: I/O, prefetched while the previous task computes), `compute` (what it
writes, on its way to host memory) and `write` (the writes: behind the next task's compute).
All are idempotent: re-running a task writes the same bytes to the same places, so
at-least-once delivery is harmless.

Stages of a run: inference (crop mode: `InferenceStage`; overlap mode:
`OverlapInferenceStage`), then in overlap mode `BlendStage`, then with `segmentation:` its
four passes (`segmentation-label`, `-pairs`, `-merge`, `-relabel`: voxflow/segmentation.py),
then the downsample passes of the output (`downsample-N`) and of the segmentation layer
(`downsample-segmentation-N`, by mode).
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
from .segmentation import (STEPS, SegmentationStore, face_planes, foreground, label, merge,
                           neighbours, relabel, task_pairs, voxel_counts)
from .sharding import shard_grid
from .temporary import TemporaryStore, pack_key, partial_key, temporary_url
from .volume import Volume


class Stage(Protocol):
    name: str
    kind: str             # its worker group: inference | blend | segmentation | downsample

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


def to_output(values: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Final values (c, z, y, x: blended, normalised, masked) -> what the output layer
    stores: the `postprocess` ops in order, then the output dtype. The one place both
    happen, wherever a value becomes final (crop, overlap's exclusive box, the blends)."""
    for op in cfg.postprocess:
        values = op.apply(values)
    return to_output_dtype(values, cfg.output_dtype)


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
                                    cfg.inference.weighting, cfg.augment)
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
        return _task_box(self.grid, index, self.name)

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
    kind, _, rest = name.partition("-")
    if kind == "segmentation" and p.segmentation is not None and rest in STEPS:
        return p.segmentation.merge_grid if rest == "merge" else p.segmentation.grid
    passes = _downsample_passes(p, name)
    if passes is not None:
        return passes[int(name.rpartition("-")[2])].grid
    raise UnknownStage(f"unknown stage {name!r}: this run's stages are "
                       f"{', '.join(stage_names(p))}")


def _downsample_passes(p: Plan, name: str) -> Optional[tuple]:
    """The pyramid passes a `downsample-N` or `downsample-segmentation-N` name points into
    (None: no such stage)."""
    kind, _, rest = name.partition("-")
    layer, _, number = rest.rpartition("-")
    if kind != "downsample" or not number.isdigit():
        return None
    passes = p.downsample if layer == "" else p.segmentation.downsample \
        if layer == "segmentation" and p.segmentation is not None else ()
    return passes if int(number) < len(passes) else None


def stage_names(p: Plan) -> list[str]:
    """The run's stages, in the order they run (blend where chunks meet, and wherever the
    output is sharded in overlap mode: shards are assembled there; the segmentation's
    passes after blending, its pyramid after the output's)."""
    blend = ["blend"] if isinstance(p.grid, OverlapGrid) and (
        len(p.grid.bands) or p.shard_shapes is not None) else []
    seg = p.segmentation
    return (["inference", *blend] + ([f"segmentation-{s}" for s in STEPS] if seg else [])
            + [f"downsample-{i}" for i in range(len(p.downsample))]
            + [f"downsample-segmentation-{i}" for i in range(len(seg.downsample) if seg else 0)])


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
    if stage_kind(name) == "segmentation":
        return SEGMENTATION_STAGES[name.partition("-")[2]](p, run)
    rest = name.partition("-")[2]
    return DownsampleStage(p, int(rest.rpartition("-")[2]),
                           "segmentation" if "-" in rest else "output")


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
