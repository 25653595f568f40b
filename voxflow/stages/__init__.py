"""Stages: what a worker does for one task, by stage name and task index.

A worker runs only operations it knows by name (`build_stage`). Each task is split into
`load` (read its input: I/O, prefetched while the previous task computes), `compute` (what it
writes, on its way to host memory) and `write` (the writes: behind the next task's compute).
All are idempotent: re-running a task writes the same bytes to the same places, so
at-least-once delivery is harmless.

A run's stages, in the order they run, one module each: with `normalize:` the levels
(`levels`, `levels-merge`: per-section histograms and windows; voxflow/levels.py), `inference` (crop mode
`InferenceStage`, overlap mode `OverlapInferenceStage`), `blend` (overlap mode; sharded:
`ShardBlendStage`), with `segmentation:` its four passes (`segmentation-label`, `-pairs`,
`-merge`, `-relabel`; the labelling itself is voxflow/segmentation.py), then the pyramids
(`downsample-N` of the output, `downsample-segmentation-N` of the segmentation layer, by
mode). This module is the registry — names, kinds, task grids, `build_stage` — and imports no
torch: the planner and the orchestrator's tasks (publish, scale, wait) use it without loading
the model's libraries; a stage's module is imported when a worker first builds it.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Union

from ..config import RunConfig
from ..geometry import Box
from ..grids import BandGrid, ChunkGrid, OverlapGrid
from ..pipeline import Plan, plan
from ..segmentation import STEPS
from ..sharding import shard_grid

if TYPE_CHECKING:
    from ..models import Model


class Stage(Protocol):
    name: str
    kind: str             # its worker group: levels | inference | blend | segmentation |
    #                       downsample

    def __len__(self) -> int: ...

    def box(self, index: int) -> Box: ...

    def load(self, index: int) -> Any: ...

    def compute(self, index: int, loaded: Any) -> Any: ...

    def write(self, index: int, computed: Any) -> None: ...


def run_task(stage: Stage, index: int) -> None:
    stage.write(index, stage.compute(index, stage.load(index)))


class UnknownStage(KeyError):
    """A stage name that is no operation of the run: a message names operations, it is
    never code."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown stage"


class TaskOutsidePlan(IndexError):
    """A task index that is not in its stage's grid."""


def task_box(grid, index: int, stage: str) -> Box:
    """`grid.box(index)`, refusing an index outside the stage's tasks by name."""
    if not 0 <= index < len(grid):
        raise TaskOutsidePlan(f"task index {index} is outside stage {stage}'s {len(grid)} "
                              "task(s) in the run's plan")
    return grid.box(index)


def crop_read_box(p: Plan, index: int) -> Box:
    """Crop mode: what inference task `index` reads — its chunk plus margin, grown to at least
    one input patch (the planner's cost model reads by the same rule)."""
    read = p.grid.read_box(index)
    short = [max(n - m, 0) for n, m in zip(p.config.model.input_patch, read.shape)]
    return Box([a - s // 2 for a, s in zip(read.start, short)],
               [b + s - s // 2 for b, s in zip(read.stop, short)])


def stage_grid(p: Plan, name: str) -> Union[ChunkGrid, OverlapGrid, BandGrid]:
    """The task grid of stage `name` (what is published, and what messages are checked
    against)."""
    if name == "inference":
        return p.grid
    if name in ("levels", "levels-merge") and p.levels is not None:
        return p.levels.grid if name == "levels" else p.levels.slabs
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
    """The run's stages, in the order they run (the levels first: inference applies them;
    blend where chunks meet, and wherever the output is sharded in overlap mode: shards are
    assembled there; the segmentation's passes after blending, its pyramid after the
    output's)."""
    blend = ["blend"] if isinstance(p.grid, OverlapGrid) and (
        len(p.grid.bands) or p.shard_shapes is not None) else []
    seg = p.segmentation
    levels = ["levels", "levels-merge"] if p.levels is not None else []
    return ([*levels, "inference", *blend]
            + ([f"segmentation-{s}" for s in STEPS] if seg else [])
            + [f"downsample-{i}" for i in range(len(p.downsample))]
            + [f"downsample-segmentation-{i}" for i in range(len(seg.downsample) if seg else 0)])


def stage_kind(name: str) -> str:
    return name.split("-", 1)[0]


def build_stage(p: Plan, name: str, run: str, model: Optional[Model] = None) -> Stage:
    """The operation for stage `name` of run `run`; unknown names are refused (a message is
    not code)."""
    stage_grid(p, name)
    kind, rest = stage_kind(name), name.partition("-")[2]
    if kind == "inference":
        from .inference import InferenceStage, OverlapInferenceStage
        if isinstance(p.grid, OverlapGrid):
            return OverlapInferenceStage(p, run, model)
        return InferenceStage(p, model, run)
    if kind == "levels":
        from .levels import LevelsMergeStage, LevelsStage
        return LevelsMergeStage(p, run) if rest == "merge" else LevelsStage(p, run)
    if kind == "blend":
        from .blend import BlendStage, ShardBlendStage
        return ShardBlendStage(p, run) if p.shard_shapes is not None else BlendStage(p, run)
    if kind == "segmentation":
        from .segmentation import SEGMENTATION_STAGES
        return SEGMENTATION_STAGES[rest](p, run)
    from .downsample import DownsampleStage
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
        from ..models import Model, pick_device
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
