"""Plan a run and create its layers: everything before the first task.

`plan` does every check that needs I/O (reads only), so a bad run is refused before anything
is written; `create_layers` then writes the output's `info`. Stages (`voxflow.stages`) and
the driver (`voxflow.runner`) build on the `Plan`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from .config import ConfigError, RunConfig
from .downsample import DownsamplePass, mip_bounds, plan_downsample
from .geometry import Box, Vec3
from .grids import ChunkGrid, OverlapGrid
from .levels import DTYPES, LevelsPlan, plan_levels
from .mask import MaskCoverageError, TissueMap
from .sharding import shard_shape, sharding_spec, spec_bytes
from .volume import LayerNotFound, Volume

if TYPE_CHECKING:                          # torch: only where a model is loaded
    from .models import Model


@dataclass(frozen=True)
class SegmentationPlan:
    """The segmentation stage (`segmentation:`): the boxes of its label, pairs and relabel
    tasks, and the passes of its layer's pyramid."""

    grid: ChunkGrid
    downsample: tuple[DownsamplePass, ...]
    shard_shapes: Optional[tuple[Vec3, ...]] = None   # per mip; None: unsharded
    shard_bytes: Optional[int] = None

    @property
    def merge_grid(self) -> ChunkGrid:
        """The merge pass: one task over the whole bbox."""
        bbox = self.grid.bbox
        return ChunkGrid(bbox, bbox.shape, origin=bbox.start)


@dataclass(frozen=True)
class Plan:
    """Everything a run's stages need, computed without writing anything."""

    config: RunConfig
    bbox: Box                    # at the run's mip: input voxels == output mip-0 voxels
    input_bounds: Box
    input_channels: int
    input_dtype: str
    resolution: tuple[float, float, float]
    grid: Union[ChunkGrid, OverlapGrid]   # inference tasks: crop chunks, or overlap blocks
    downsample: tuple[DownsamplePass, ...]
    shard_shapes: Optional[tuple[Vec3, ...]] = None   # per output mip; None: unsharded
    shard_bytes: Optional[int] = None                 # a full shard's, uncompressed
    tissue: Optional[TissueMap] = None                # `mask:`; None: every task runs
    segmentation: Optional[SegmentationPlan] = None   # `segmentation:`
    levels: Optional[LevelsPlan] = None               # `normalize:`

    def runs(self, index: int) -> bool:
        """Whether inference task `index` meets tissue (is published and run)."""
        return self.tissue is None or self.tissue.runs(index)

    @property
    def masked(self) -> int:
        """Inference tasks outside the mask: never published, counted as skipped."""
        return self.tissue.masked if self.tissue is not None else 0

    @property
    def output_voxel_bytes(self) -> int:
        """Bytes of an output voxel: the channels after `postprocess`, in the output dtype."""
        return self.config.output_channels * np.dtype(self.config.output_dtype).itemsize


def plan(config: RunConfig, model: Optional[Model] = None, check_model: bool = True) -> Plan:
    """Check the run against its input layer and model; compute the chunk grids.

    Workers of a validated run skip the model check unless they run the model anyway.
    """
    source = open_layer(config.input, "input")
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
    if model is not None or check_model:
        eager = config.model.model_copy(update={"compile": False})   # a check: no compile
        if model is None:
            from .models import Model
            model = Model(eager, "cpu")
        model.check(source.num_channels)
    voxel_bytes = config.output_channels * np.dtype(config.output_dtype).itemsize
    crop = config.inference.chunk if config.inference.blend == "crop" else None
    shards, shard_bytes = _shard_shapes(config, config.output, bounds, voxel_bytes, crop)
    _check_existing_output(config, bounds, source.resolution, shards)
    inf = config.inference
    if inf.blend == "overlap":
        grid = OverlapGrid(bbox, config.model.output_patch, inf.patch_overlap,
                           config.model.patch_margin, inf.chunk, config.storage_chunk,
                           origin=bounds.start)
    else:
        grid = ChunkGrid(bbox, inf.chunk, config.margin, origin=bounds.start)
    ds = config.downsample
    passes = plan_downsample(bounds, bbox, config.storage_chunk, ds.factor, ds.mips,
                             voxel_bytes, ds.memory_target, shards)
    tissue = _tissue(config, bbox, source.resolution, grid) if config.mask else None
    seg = _segmentation(config, bounds, bbox, source.resolution) if config.segmentation \
        else None
    p = Plan(config, bbox, bounds, source.num_channels, str(source.dtype), source.resolution,
             grid, tuple(passes), shards, shard_bytes, tissue, seg)
    return replace(p, levels=_levels(p, source)) if config.normalize else p


def _levels(p: Plan, source: Volume) -> LevelsPlan:
    """Where `normalize`'s histograms are taken: the bbox's xy at `normalize.mip`, every z
    section an inference task reads (context included) inside the input. Refuses a dtype
    without exact histograms, and a mip that merges or shifts z sections."""
    from .stages import crop_read_box                    # (stages import this module)
    norm = p.config.normalize
    if p.input_dtype not in DTYPES or p.input_channels != 1:
        raise ConfigError("normalize", f"needs a one-channel {' or '.join(DTYPES)} input "
                          f"(exact histograms); {p.config.input} is {p.input_channels}-channel "
                          f"{p.input_dtype}")
    mip = p.config.mip if norm.mip is None else norm.mip
    layer = open_layer(p.config.input, "input")
    if mip >= layer.num_mips:
        raise ConfigError("normalize.mip", f"{mip} is not a mip of the input (it has mips "
                          f"0..{layer.num_mips - 1})")
    coarse = layer.at_mip(mip)
    if (coarse.resolution[2], coarse.bounds.start[2], coarse.bounds.stop[2]) != \
            (source.resolution[2], source.bounds.start[2], source.bounds.stop[2]):
        raise ConfigError("normalize.mip", f"{mip}: its z sections (resolution "
                          f"{coarse.resolution[2]}, bounds {coarse.bounds}) are not the run's "
                          f"(resolution {source.resolution[2]}, bounds {source.bounds})")
    read = p.grid.read_box if isinstance(p.grid, OverlapGrid) else \
        (lambda i: crop_read_box(p, i))
    z0 = max(read(0).start[2], p.input_bounds.start[2])
    z1 = min(read(len(p.grid) - 1).stop[2], p.input_bounds.stop[2])
    scale = [Fraction(r) / Fraction(rc) for r, rc in zip(source.resolution, coarse.resolution)]
    box = Box([math.floor(a * f) for a, f in zip(p.bbox.start[:2], scale)] + [z0],
              [math.ceil(b * f) for b, f in zip(p.bbox.stop[:2], scale)] + [z1]
              ).intersect(coarse.bounds)
    return plan_levels(mip, box, coarse.bounds.start, coarse.chunk, norm.clip_percent,
                       p.input_dtype)


def _segmentation(config: RunConfig, bounds: Box, bbox: Box, resolution) -> SegmentationPlan:
    """The segmentation stage's tasks: boxes of `segmentation.chunk` on the storage grid
    (sharded: on the shard grid, so each shard has one writer), and its layer's pyramid."""
    seg, ds = config.segmentation, config.downsample
    channels = config.output_channels                  # the output layer's, after postprocess
    if seg.channel >= channels:
        raise ConfigError("segmentation.channel", f"{seg.channel} is not a channel of the "
                          f"output (it has channels 0..{channels - 1})")
    itemsize = np.dtype(seg.dtype).itemsize
    shards, shard_bytes = _shard_shapes(config, seg.output, bounds, itemsize, seg.chunk)
    try:
        layer = open_layer(seg.output, "segmentation.output")
    except LayerNotFound:
        layer = None
    if layer is not None:
        _same_layer("segmentation.output", layer, {
            "layer_type": "segmentation", "num_channels": 1, "dtype": seg.dtype,
            "bounds": bounds, "resolution": tuple(resolution), "chunk": config.storage_chunk,
            "shard_shape": shards[0] if shards else None})
    passes = plan_downsample(bounds, bbox, config.storage_chunk, ds.factor, ds.mips, itemsize,
                             ds.memory_target, shards)
    return SegmentationPlan(ChunkGrid(bbox, seg.chunk, origin=bounds.start), tuple(passes),
                            shards, shard_bytes)


def _same_layer(field: str, layer: Volume, wanted: dict) -> None:
    """Refuse an existing layer that differs from what the run would create, naming `field`."""
    for key, value in wanted.items():
        have = getattr(layer, key)
        have = str(have) if key == "dtype" else list(have) if key == "chunk" else have
        if have != value:
            raise ConfigError(field, f"existing layer {layer.url} has {key} {have}, this run "
                              f"needs {value}")


def _tissue(config: RunConfig, bbox: Box, resolution, grid) -> TissueMap:
    """Read the mask (once, at its mip) and find the tasks that meet tissue; a mask that is
    missing, lacks the mip or does not cover the bbox is refused naming the field."""
    mask = open_layer(config.mask.layer, "mask.layer")
    if config.mask.mip >= mask.num_mips:
        raise ConfigError("mask.mip", f"{config.mask.mip} is not a mip of the mask layer "
                          f"{config.mask.layer} (it has mips 0..{mask.num_mips - 1})")
    try:
        return TissueMap(mask.at_mip(config.mask.mip), bbox, resolution, grid)
    except MaskCoverageError as exc:
        raise ConfigError("mask.layer", f"{config.mask.layer} {exc}") from None


def open_layer(url: str, field: str) -> Volume:
    """`Volume(url)`, or a `ConfigError` naming `field` and saying why it cannot be read: no
    layer, an `info` that is not JSON or not a precomputed info, no credentials. LayerNotFound
    passes through for an output (or segmentation) layer that is simply not there yet."""
    _check_google_credentials(url, field)
    try:
        return Volume(url)
    except LayerNotFound:
        if field in ("output", "segmentation.output"):
            raise
        raise ConfigError(field, f"no precomputed layer at {url}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(field, f"the info of {url} is not valid JSON "
                          f"({type(exc).__name__}: {exc})") from None
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ConfigError(field, f"the info of {url} is not a precomputed info "
                          f"({type(exc).__name__}: {exc})") from None
    except Exception as exc:
        if type(exc).__name__ == "DefaultCredentialsError":
            raise _no_credentials(url, field, exc) from None
        raise ConfigError(field, f"cannot open {url}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None


def _no_credentials(url: str, field: str, exc: BaseException) -> ConfigError:
    return ConfigError(field, f"cannot open {url}: no Google credentials "
                       f"({type(exc).__name__}: {exc}): set GOOGLE_APPLICATION_CREDENTIALS to a "
                       "service account key, run `gcloud auth application-default login`, or "
                       "use the workers' service account")


def _check_google_credentials(url: str, field: str) -> None:
    """Refuse a gs:// layer at once when no credentials can be found where cloud-files
    looks (its secrets folder, then Google's default credentials): cloud-files would retry
    for ~20 s before failing with the same error. An emulator needs none."""
    if not url.removeprefix("precomputed://").startswith("gs://") or \
            os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    from cloudfiles.secrets import secretpath
    bucket = url.removeprefix("precomputed://").removeprefix("gs://").split("/", 1)[0]
    if any(os.path.exists(secretpath(name)) for name in (f"{bucket}-google-secret.json",
                                                          "google-secret.json")):
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    try:
        google.auth.default()
    except DefaultCredentialsError as exc:
        raise _no_credentials(url, field, exc) from None


def _shard_shapes(config: RunConfig, url: str, bounds: Box, voxel_bytes: int,
                  divides: Optional[Sequence[int]] = None
                  ) -> tuple[Optional[tuple[Vec3, ...]], Optional[int]]:
    """The shard shape at every mip of the layer at `url` (the output, or the segmentation)
    and a full shard's bytes, or (None, None) when it is not sharded. The shard shape
    divides `divides` (crop mode's and the segmentation's task chunk: a task writes whole
    shards); every mip holds as many chunks per shard as mip 0."""
    if not uses_sharding(config, url):
        return None, None
    factor, chunk = config.downsample.factor, config.storage_chunk
    spec0 = sharding_spec(bounds.shape, chunk, voxel_bytes, config.shard_bytes, divides)
    shard_bytes = spec_bytes(spec0, chunk, voxel_bytes)
    shapes = []
    for m in range(config.downsample.mips + 1):
        size = mip_bounds(bounds, factor, m).shape
        shapes.append(shard_shape(sharding_spec(size, chunk, voxel_bytes, shard_bytes),
                                  size, chunk))
    return tuple(shapes), shard_bytes


def uses_sharding(config: RunConfig, url: Optional[str] = None) -> bool:
    """`sharding: auto` shards gs:// layers (the output, or `url`), where object operations
    are billed."""
    return config.sharding == "on" or (config.sharding == "auto"
                                       and (url or config.output).startswith("gs://"))


def _check_existing_output(config: RunConfig, bounds: Box, resolution,
                           shards: Optional[tuple[Vec3, ...]]) -> None:
    try:
        out = open_layer(config.output, "output")
    except LayerNotFound:
        return
    wanted = {"num_channels": config.output_channels, "dtype": config.output_dtype,
              "bounds": bounds, "resolution": tuple(resolution)}
    have = {"num_channels": out.num_channels, "dtype": str(out.dtype), "bounds": out.bounds,
            "resolution": out.resolution}
    for key, value in wanted.items():
        if have[key] != value:
            raise ConfigError("output", f"existing layer {config.output} has {key} "
                              f"{have[key]}, this run needs {value}")
    if config.inference.blend == "overlap" and list(out.chunk) != config.storage_chunk:
        raise ConfigError("storage_chunk", f"{config.storage_chunk} differs from the existing "
                          f"output's storage chunk {list(out.chunk)} (overlap mode blends "
                          "whole storage chunks)")
    if any(c % s for c, s in zip(config.inference.chunk, out.chunk)):
        raise ConfigError("inference.chunk", f"{config.inference.chunk} is not a multiple of "
                          f"the existing output's storage chunk {list(out.chunk)}")
    if (out.shard_shape is not None) != (shards is not None):
        have = "sharded" if out.shard_shape is not None else "unsharded"
        raise ConfigError("sharding", f"{config.sharding} does not fit the existing output "
                          f"{config.output}, which is {have}")
    if shards is not None and out.shard_shape != shards[0]:
        raise ConfigError("shard_bytes", f"{config.shard_bytes} makes shards of "
                          f"{list(shards[0])} voxels; the existing output's are "
                          f"{list(out.shard_shape)}")


def create_layers(p: Plan) -> bool:
    """Create the output layer and the segmentation layer (if missing) and their mip
    scales; True if either was created."""
    cfg = p.config
    created = not Volume.exists(cfg.output)
    if created:
        Volume.create(cfg.output, num_channels=cfg.output_channels,
                      dtype=cfg.output_dtype, resolution=p.resolution,
                      voxel_offset=p.input_bounds.start, size=p.input_bounds.shape,
                      chunk=cfg.storage_chunk, shard_bytes=p.shard_bytes)
    if cfg.downsample.mips:
        Volume(cfg.output).ensure_mips(cfg.downsample.factor, cfg.downsample.mips)
    if p.segmentation is not None:
        seg = cfg.segmentation
        if not Volume.exists(seg.output):
            created = True                # its tasks' done records describe no layer
            Volume.create(seg.output, num_channels=1, dtype=seg.dtype,
                          resolution=p.resolution, voxel_offset=p.input_bounds.start,
                          size=p.input_bounds.shape, chunk=cfg.storage_chunk,
                          layer_type="segmentation", shard_bytes=p.segmentation.shard_bytes)
        if cfg.downsample.mips:
            Volume(seg.output).ensure_mips(cfg.downsample.factor, cfg.downsample.mips)
    return created


