"""Plan and run a voxflow run: validate, create layers, then each stage's tasks.

`plan` does every check that needs I/O (reads only), so a bad run is refused before anything
is written. A `Stage` is a named list of tasks addressed by index; `run_task(i)` is idempotent
(re-running writes the same bytes to the same places), which is what the queue and workers of
later stages rely on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np
import torch

from .config import ConfigError, RunConfig
from .downsample import DownsamplePass, downsample, plan_downsample
from .geometry import Box, ChunkGrid
from .inference import SlidingWindow
from .models import Model, pick_device
from .volume import LayerNotFound, Volume


@dataclass(frozen=True)
class Plan:
    """Everything a run's stages need, computed without writing anything."""

    config: RunConfig
    bbox: Box                    # at the run's mip: input voxels == output mip-0 voxels
    input_bounds: Box
    input_channels: int
    input_dtype: str
    resolution: tuple[float, float, float]
    grid: ChunkGrid
    downsample: tuple[DownsamplePass, ...]

    @property
    def output_voxel_bytes(self) -> int:
        return self.config.model.output_channels * np.dtype(self.config.output_dtype).itemsize

    def stages(self) -> list[str]:
        return ["inference"] + [f"downsample-{i}" for i in range(len(self.downsample))]


def plan(config: RunConfig, model: Optional[Model] = None) -> Plan:
    """Check the run against its input layer and model; compute the chunk grids."""
    try:
        source = Volume(config.input)
    except LayerNotFound as exc:
        raise ConfigError("input", str(exc)) from None
    if config.mip >= source.num_mips:
        raise ConfigError("mip", f"{config.mip} is not a mip of the input (it has mips "
                          f"0..{source.num_mips - 1})")
    source = source.at_mip(config.mip)
    bounds = source.bounds
    bbox = Box(config.bbox.start, config.bbox.stop) if config.bbox else bounds
    if not bounds.contains(bbox):
        raise ConfigError("bbox", f"{bbox} is not inside the input's bounds {bounds} at mip "
                          f"{config.mip}")
    for axis, m, pm in zip("xyz", config.margin, config.model.patch_margin):
        if m < pm:
            raise ConfigError("inference.margin", f"{config.margin} is smaller than the "
                              f"model's patch margin {config.model.patch_margin} along {axis}")
    if model is None:
        model = Model(config.model, "cpu")
    model.check(source.num_channels)
    _check_existing_output(config, bounds, source.resolution)
    grid = ChunkGrid(bbox, config.inference.chunk, config.margin, origin=bounds.start)
    ds = config.downsample
    passes = plan_downsample(bounds, bbox, config.storage_chunk, ds.factor, ds.mips,
                             config.model.output_channels
                             * np.dtype(config.output_dtype).itemsize, ds.memory_target)
    return Plan(config, bbox, bounds, source.num_channels, str(source.dtype), source.resolution,
                grid, tuple(passes))


def _check_existing_output(config: RunConfig, bounds: Box, resolution) -> None:
    try:
        out = Volume(config.output)
    except LayerNotFound:
        return
    wanted = {"num_channels": config.model.output_channels, "dtype": config.output_dtype,
              "bounds": bounds, "resolution": tuple(resolution)}
    have = {"num_channels": out.num_channels, "dtype": str(out.dtype), "bounds": out.bounds,
            "resolution": out.resolution}
    for key, value in wanted.items():
        if have[key] != value:
            raise ConfigError("output", f"existing layer {config.output} has {key} "
                              f"{have[key]}, this run needs {value}")
    if any(c % s for c, s in zip(config.inference.chunk, out.chunk)):
        raise ConfigError("inference.chunk", f"{config.inference.chunk} is not a multiple of "
                          f"the existing output's storage chunk {list(out.chunk)}")


def create_layers(p: Plan) -> Volume:
    """Create the output layer (if missing) and its mip scales."""
    cfg = p.config
    if not Volume.exists(cfg.output):
        Volume.create(cfg.output, num_channels=cfg.model.output_channels,
                      dtype=cfg.output_dtype, resolution=p.resolution,
                      voxel_offset=p.input_bounds.start, size=p.input_bounds.shape,
                      chunk=cfg.storage_chunk)
    out = Volume(cfg.output)
    if cfg.downsample.mips:
        out.ensure_mips(cfg.downsample.factor, cfg.downsample.mips)
    return out


def to_output_dtype(prob: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 probabilities -> the output dtype, on the device (less to copy back)."""
    if dtype == "uint8":
        return (prob.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return prob.to(getattr(torch, dtype))


class Stage(Protocol):
    name: str

    def __len__(self) -> int: ...

    def run_task(self, index: int) -> None: ...


class InferenceStage:
    """Crop mode: each task reads its chunk plus margin, runs SlidingWindow, crops, writes."""

    name = "inference"

    def __init__(self, p: Plan, model: Optional[Model] = None):
        self.plan = p
        cfg = p.config
        self.model = model or Model(cfg.model, pick_device(cfg.inference.device))
        self.window = SlidingWindow(self.model, cfg.model.input_patch, cfg.model.output_patch,
                                    cfg.inference.patch_overlap, cfg.inference.batch_size,
                                    cfg.inference.weighting)
        self._input = Volume(cfg.input, cfg.mip)
        self._output: Optional[Volume] = None

    def __len__(self) -> int:
        return len(self.plan.grid)

    def read_box(self, index: int) -> Box:
        """The chunk plus margin, grown to at least one input patch."""
        read = self.plan.grid.read_box(index)
        short = [max(p - n, 0) for p, n in zip(self.plan.config.model.input_patch, read.shape)]
        return Box([a - s // 2 for a, s in zip(read.start, short)],
                   [b + s - s // 2 for b, s in zip(read.stop, short)])

    def run_task(self, index: int) -> None:
        if self._output is None:
            self._output = Volume(self.plan.config.output)
        box, read = self.plan.grid.box(index), self.read_box(index)
        image = self._input.read(read, pad=self.plan.config.inference.pad)
        result = self.window(image)                      # covers read minus the patch margin
        origin = [a + m for a, m in zip(read.start, self.plan.config.model.patch_margin)]
        crop = result[(slice(None), *box.zyx_slices(origin))]
        data = to_output_dtype(crop, self.plan.config.output_dtype).cpu().numpy()
        self._output.write(box, data)


class DownsampleStage:
    """One pass of the pyramid: read a source-mip box, write mips above it."""

    def __init__(self, p: Plan, number: int):
        self.plan = p
        self.name = f"downsample-{number}"
        self.pass_ = p.downsample[number]
        self._volumes: Optional[list[Volume]] = None

    def __len__(self) -> int:
        return len(self.pass_.grid)

    def run_task(self, index: int) -> None:
        cfg, ps = self.plan.config, self.pass_
        if self._volumes is None:
            self._volumes = [Volume(cfg.output, ps.source_mip + k) for k in range(ps.mips + 1)]
        box = ps.grid.box(index)
        image = self._volumes[0].read(box)
        seg = self._volumes[0].layer_type == "segmentation"
        for k, level in enumerate(downsample(image, cfg.downsample.factor, ps.mips, seg), 1):
            self._volumes[k].write(ps.target_box(box, cfg.downsample.factor, k), level)


class Reporter(Protocol):
    """Progress sink: the CLI draws bars, tests count."""

    def start(self, stage: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def finish(self) -> None: ...


@dataclass
class StageSummary:
    name: str
    tasks: int
    seconds: float


@dataclass
class RunSummary:
    output: str
    voxels: int
    stages: list[StageSummary] = field(default_factory=list)


def run(config: RunConfig, reporter: Optional[Reporter] = None) -> RunSummary:
    """Run every stage in this process, in order."""
    model = Model(config.model, pick_device(config.inference.device))
    p = plan(config, model)
    create_layers(p)
    stages: list[Stage] = [InferenceStage(p, model)]
    stages += [DownsampleStage(p, i) for i in range(len(p.downsample))]
    summary = RunSummary(config.output, p.bbox.size)
    for stage in stages:
        t0 = time.perf_counter()
        if reporter:
            reporter.start(stage.name, len(stage))
        for i in range(len(stage)):
            stage.run_task(i)
            if reporter:
                reporter.advance()
        if reporter:
            reporter.finish()
        summary.stages.append(StageSummary(stage.name, len(stage), time.perf_counter() - t0))
    return summary
