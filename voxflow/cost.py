"""What a run costs: objects, bytes, messages, worker-hours and dollars, before and after.

`bill(plan)` is what `voxflow plan` prints and the Airflow plan task returns. At petavoxel
scale object operations and messages cost as much as GPUs, so every count here is exact and
O(tasks per axis): the lazy grids' boxes are products of per-axis ranges, so a sum over all
boxes of a product of per-axis terms is a product of per-axis sums (`_product_sum`). Nothing
iterates over storage chunks (~10^10 for a petavoxel) or tasks (~10^9).

The bill is priced as the run would run on Google Cloud — gs:// layers, a Pub/Sub queue with
its ledger in Cloud Storage, Spot VM groups — at `cost.prices`, whatever backends this config
names: it is what the run costs there. Compute comes from `cost.throughput` (voxels per
second per worker; `voxflow bench-model` measures the inference figure). After a run,
`spent` reads what was actually used: the local workers' JSON logs and the files written.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .augment import orientations
from .temporary import temporary_url
from .config import RunConfig, voxflow_home
from .downsample import mip_bounds
from .geometry import Box, ceil_div
from .grids import ChunkGrid, OverlapGrid
from .lattice import lattice_size
from .messages import encode
from .pipeline import Plan
from .segmentation import directions
from .stages import crop_read_box, stage_grid, stage_kind, stage_names

Ranges = list[list[tuple[int, int]]]   # per axis x, y, z: the ranges of a product set of boxes
GIB, TIB = 1 << 30, 1 << 40
HOURS_PER_MONTH = 730
NPY_HEADER = 128                        # bytes before a partial sum's array (.npy v1)
PUBSUB_REQUEST_MIN = 1000               # billed bytes per publish or pull request, at least
PUBSUB_MESSAGE_EXTRA = 20 + 16          # billed per message: timestamp, message id
# The Pub/Sub queue's ledger (voxflow/queues/ledger.py), per task delivered once: writes = its
# lease record, its journal entry and its done marker; reads = the done marker and task state
# when pulled, the lease when acked (deletes are free). Not counted: a lease extension (one
# read and one write every lease/3 s of work) and the heartbeat's compaction and polls (list
# calls of 1000 journal entries each).
LEDGER_WRITES, LEDGER_READS = 3, 3


# -- per-axis arithmetic --------------------------------------------------------------------
def _axis_chunks(a: int, b: int, origin: int, size: int) -> int:
    """Grid cells `origin + k * size` that [a, b) meets."""
    return ceil_div(b - origin, size) - (a - origin) // size if b > a else 0


def chunks_in(box: Box, origin, size) -> int:
    """Storage chunks (or shards) of a grid anchored at `origin` that `box` meets."""
    return math.prod(_axis_chunks(a, b, o, s)
                     for a, b, o, s in zip(box.start, box.stop, origin, size))


def _rounded(box: Box, bounds: Box, size) -> Box:
    """`box` grown to whole grid cells, clipped at the layer's bounds (what is stored)."""
    return Box([o + (a - o) // s * s for a, o, s in zip(box.start, bounds.start, size)],
               [o + ceil_div(b - o, s) * s for b, o, s in
                zip(box.stop, bounds.start, size)]).intersect(bounds)


def _product_sum(ranges: Ranges, term: Callable[[int, int, int], int]) -> int:
    """The sum over every box of the product set of `term(axis, a, b)` over its axes."""
    return math.prod(sum(term(axis, a, b) for a, b in rs) for axis, rs in enumerate(ranges))


def _axis_ranges(grid, box_of: Callable[[int], Box]) -> Ranges:
    """Per axis, the ranges `box_of(task)` spans as the task's position moves along it (a
    grid's task boxes, read boxes, ... are products of these)."""
    out = []
    for axis in range(3):
        pos = [0, 0, 0]
        ranges = []
        for t in range(grid.counts[axis]):
            pos[axis] = t
            box = box_of(grid.index(pos))
            ranges.append((box.start[axis], box.stop[axis]))
        out.append(ranges)
    return out


def _read_ranges(p: Plan) -> Ranges:
    reader = p.grid.read_box if isinstance(p.grid, OverlapGrid) else partial(crop_read_box, p)
    return _axis_ranges(p.grid, reader)


def read_voxels(p: Plan) -> int:
    """Voxels the inference tasks read (their read boxes, padding outside the input too)."""
    return _product_sum(_read_ranges(p), lambda x, a, b: b - a)


# -- objects (one function per concern: sharding changes these, and only these) -----------
def _pyramid(p: Plan, layer: str) -> tuple[tuple, Optional[tuple], int]:
    """(downsample passes, shard shapes per mip or None, bytes per voxel) of the output
    layer or (`layer="segmentation"`) the segmentation layer."""
    if layer == "segmentation":
        seg = p.segmentation
        return seg.downsample, seg.shard_shapes, np.dtype(p.config.segmentation.dtype).itemsize
    return p.downsample, p.shard_shapes, p.output_voxel_bytes


def _written_regions(p: Plan, layer: str = "output") -> list[tuple[Box, Box]]:
    """Per mip: (the region written, the mip's bounds). Mip 0 is the bbox; a
    downsample pass writes its tasks' target boxes, which tile one box per mip."""
    factor = p.config.downsample.factor
    out = [(p.bbox, p.input_bounds)]
    for ps in _pyramid(p, layer)[0]:
        for k in range(1, ps.mips + 1):
            out.append((ps.target_box(ps.grid.bbox, factor, k),
                        mip_bounds(p.input_bounds, factor, ps.source_mip + k)))
    return out


def _cells(p: Plan, layer: str = "output") -> list:
    """Per mip, the unit written as one object: the storage chunk, or the shard."""
    return list(_pyramid(p, layer)[1]
                or [p.config.storage_chunk] * (p.config.downsample.mips + 1))


def output_objects(p: Plan, layer: str = "output") -> list[int]:
    """Objects written per mip of the output (or segmentation) layer. Unsharded: one per
    storage chunk the written region meets (a chunk clipped at the layer's end is one
    object; every chunk is written by one task, once). Sharded: one per shard
    (`voxflow.sharding`: a shard is written whole)."""
    if layer == "segmentation" and p.segmentation is None:
        return []
    return [chunks_in(region, bounds.start, shape)
            for (region, bounds), shape in zip(_written_regions(p, layer), _cells(p, layer))]


def output_bytes(p: Plan, layer: str = "output") -> list[int]:
    """Uncompressed bytes stored per output mip (whole chunks, clipped at the bounds; gzip
    on gs:// makes the objects smaller by a factor that depends on the data)."""
    if layer == "segmentation" and p.segmentation is None:
        return []
    voxel_bytes = _pyramid(p, layer)[2]
    return [_rounded(region, bounds, shape).size * voxel_bytes
            for (region, bounds), shape in zip(_written_regions(p, layer), _cells(p, layer))]


def temporary_objects(p: Plan) -> int:
    """Overlap mode's partial sums: one object per (band cell, task touching it), i.e. per
    axis the (interval, task) pairs, multiplied, less the all-exclusive cells (final values,
    written to the output). Sharded: one pack per inference task. Crop mode: none."""
    if not isinstance(p.grid, OverlapGrid):
        return 0
    if p.shard_shapes is not None:
        return len(p.grid)
    axes = p.grid.axes
    pairs = math.prod(sum(iv.last - iv.first + 1 for iv in ax.intervals) for ax in axes)
    final = math.prod(sum(iv.exclusive for iv in ax.intervals) for ax in axes)
    return pairs - final


def temporary_reads(p: Plan) -> int:
    """Temporary objects read. Unsharded: each partial once. Sharded: a shard's blend task
    reads, from each pack of a task that meets the shard, its header and the shard's byte
    range (`TemporaryStore.pack_pieces`; a third read only for headers past 64 KiB): per
    axis the (shard, task) pairs that meet, multiplied, times two."""
    if not isinstance(p.grid, OverlapGrid) or p.shard_shapes is None:
        return temporary_objects(p)
    shape, bounds = p.shard_shapes[0], p.input_bounds
    pairs = 1
    for x, ax in enumerate(p.grid.axes):
        o, s, a, b = bounds.start[x], shape[x], p.bbox.start[x], p.bbox.stop[x]
        edges = range(o + (a - o) // s * s, b, s)
        pairs *= sum(sum(1 for lo, hi in ax.ranges if lo < e + s and hi > e) for e in edges)
    return 2 * pairs


def temporary_bytes(p: Plan) -> int:
    """Temporary bytes, uncompressed: the band cells' float32 partials; sharded, also every
    other voxel's final value in the output dtype (packs carry the whole output)."""
    if not isinstance(p.grid, OverlapGrid):
        return 0
    partials = p.grid.temporary_voxels() * p.config.model.output_channels * 4
    if p.shard_shapes is not None:
        return partials + (p.bbox.size - p.grid.band_voxels()) * p.output_voxel_bytes
    return partials + NPY_HEADER * temporary_objects(p)


def input_reads(p: Plan, input_chunk) -> int:
    """Input chunks the inference tasks read: every chunk each read box meets inside the
    input (what lies outside is padding, not read)."""
    lo, hi, o = p.input_bounds.start, p.input_bounds.stop, p.input_bounds.start
    return _product_sum(_read_ranges(p), lambda x, a, b: _axis_chunks(
        max(a, lo[x]), min(b, hi[x]), o[x], input_chunk[x]))


def _read_unit(p: Plan, ps, shards: Optional[tuple]) -> list[int]:
    """What one read of a downsample task's source fetches: a shard when the tasks cover
    whole source shards (`Volume` then GETs each shard once), else a storage chunk."""
    if shards is not None and not any(
            t % s for t, s in zip(ps.grid.chunk, shards[ps.source_mip])):
        return list(shards[ps.source_mip])
    return list(p.config.storage_chunk)


def output_reads(p: Plan, layer: str = "output") -> int:
    """Objects read of the output (or segmentation) layer: the downsample tasks' sources
    (whole shards, or chunks), and the chunks a mip-0 write
    covers only in part (cloud-volume reads them, paints and rewrites them: only where the
    bbox is not on the storage-chunk grid). A write is aligned when it starts and stops on
    the grid (stopping at the layer's end counts); otherwise the chunks it meets but does not
    cover by cloud-volume's rule (the layer's end is no grid line there) are read."""
    if layer == "segmentation" and p.segmentation is None:
        return 0
    passes, shards, _ = _pyramid(p, layer)
    size, bounds = p.config.storage_chunk, p.input_bounds
    reads = sum(chunks_in(ps.grid.bbox, mip_bounds(bounds, p.config.downsample.factor,
                                                   ps.source_mip).start,
                          _read_unit(p, ps, shards))
                for ps in passes)
    if shards is not None:               # shards the bbox cuts are read, merged, rewritten
        size = shards[0]
        writes = [[(a, b)] for a, b in zip(p.bbox.start, p.bbox.stop)]
    elif layer == "segmentation":                       # a relabel task's box is one write
        writes = _axis_ranges(p.segmentation.grid, p.segmentation.grid.box)
    elif isinstance(p.grid, OverlapGrid):               # every cell is one write
        writes = [[(iv.start, iv.stop) for iv in ax.intervals] for ax in p.grid.axes]
    else:
        writes = _axis_ranges(p.grid, p.grid.box)
    o, end = bounds.start, bounds.stop

    def met(x, a, b):
        return _axis_chunks(a, b, o[x], size[x])

    def core(x, a, b):
        return max(0, (b - o[x]) // size[x] - ceil_div(a - o[x], size[x]))

    def aligned(x, a, b):
        return (a - o[x]) % size[x] == 0 and ((b - o[x]) % size[x] == 0 or b == end[x])

    return reads + (_product_sum(writes, met) - _product_sum(writes, core)
                    - _product_sum(writes, lambda x, a, b: aligned(x, a, b) * met(x, a, b))
                    + _product_sum(writes, lambda x, a, b: aligned(x, a, b) * core(x, a, b)))


def segmentation_objects(p: Plan) -> dict[str, int]:
    """The segmentation passes' objects besides its layer's: temporary ones written (per
    task a faces and a pairs object; the merge's offsets, table and summary) and read (a
    pairs task reads its own faces and each forward neighbour's; the merge every pairs
    object; a relabel task two ranges of the table), and the output's objects the label
    and relabel passes read (their boxes lie on the storage grid: each chunk once per pass;
    a sharded output's shards, when the boxes are whole shards; a task whose box has no
    labels reads one range fewer: not counted)."""
    seg = p.segmentation
    if seg is None:
        return {"temporary_written": 0, "temporary_read": 0, "output_read": 0}
    grid, o, size = seg.grid, p.input_bounds.start, p.config.storage_chunk
    if p.shard_shapes is not None and not any(c % s for c, s in zip(grid.chunk,
                                                                     p.shard_shapes[0])):
        size = p.shard_shapes[0]
    tasks = len(grid)
    faces = tasks + sum(math.prod(max(0, n - abs(k)) for n, k in zip(grid.counts, d))
                        for d in directions(p.config.segmentation.connectivity))
    chunks = _product_sum(_axis_ranges(grid, grid.box),
                          lambda x, a, b: _axis_chunks(a, b, o[x], size[x]))
    return {"temporary_written": 2 * tasks + 3, "temporary_read": faces + tasks + 2 * tasks,
            "output_read": 2 * chunks}


def segmentation_temporary_bytes(p: Plan) -> int:
    """The face planes the label pass stores, uncompressed (their labels' counts, the pairs
    and the table depend on the data: not counted)."""
    if p.segmentation is None:
        return 0
    per_axis = [(len(r), sum(b - a for a, b in r))          # (tasks, voxels) along each axis
                for r in _axis_ranges(p.segmentation.grid, p.segmentation.grid.box)]
    planes = sum(math.prod(per_axis[x][x != normal] for x in range(3)) for normal in range(3))
    return 2 * planes * 4                                  # two faces per axis, uint32


def levels_objects(p: Plan) -> dict[str, int]:
    """The levels stages' objects (`normalize:`): written, a histogram per levels task and
    windows per slab; read, each histogram once (its slab's merge) and by every inference
    task that runs the windows of each slab its read meets inside the input; and the input's
    chunks at `normalize.mip` the levels tasks read (tasks on the chunk grid: each once)."""
    lv = p.levels
    if lv is None:
        return {"temporary_written": 0, "temporary_read": 0, "input_read": 0}
    lo, hi = p.input_bounds.start[2], p.input_bounds.stop[2]
    per_axis = [[1] * n for n in p.grid.counts[:2]] + [
        [len(lv.slab_range(max(a, lo), min(b, hi))) for a, b in _read_ranges(p)[2]]]
    reads = math.prod(sum(t) for t in per_axis) if p.tissue is None \
        else round(p.tissue.masked_sum(per_axis))
    chunks = _product_sum(_axis_ranges(lv.grid, lv.grid.box), lambda x, a, b: _axis_chunks(
        a, b, lv.grid.origin[x], lv.chunk[x]))
    return {"temporary_written": len(lv.grid) + len(lv.slabs),
            "temporary_read": len(lv.grid) + reads, "input_read": chunks}


def levels_bytes(p: Plan) -> int:
    """The histograms, uncompressed (bins per section of each task's box) and windows."""
    if p.levels is None:
        return 0
    sections = p.levels.box.shape[2]
    return len(p.levels.grid) // len(p.levels.slabs) * sections * p.levels.bins * 4 \
        + sections * 16


# -- compute ---------------------------------------------------------------------------------
def _lattice(cfg: RunConfig):
    m = cfg.model
    return zip(m.output_patch, cfg.inference.patch_overlap, m.patch_margin)


def chunk_patches(cfg: RunConfig) -> int:
    """Patches of one whole crop-mode chunk (inference.chunk plus the margin): the unit
    `cost.throughput.inference` is measured on."""
    return math.prod(lattice_size(c + 2 * mg - 2 * pm, op, op - ov) for c, mg, (op, ov, pm)
                     in zip(cfg.inference.chunk, cfg.margin, _lattice(cfg)))


def inference_patches(p: Plan) -> int:
    """Patches the run's inference tasks evaluate: overlap mode's one lattice, or each crop
    chunk's own lattice over its read box; with a mask, only the tasks that meet tissue
    (a sum over the mask's task booleans of per-axis products)."""
    if isinstance(p.grid, OverlapGrid):
        if p.tissue is None:
            return p.grid.patch_count()
        per_axis = [[len(ax.patches(t)) for t in range(ax.tasks)] for ax in p.grid.axes]
    else:
        lat = list(_lattice(p.config))
        per_axis = [[lattice_size(b - a - 2 * lat[x][2], lat[x][0], lat[x][0] - lat[x][1])
                     for a, b in rs] for x, rs in enumerate(_read_ranges(p))]
        if p.tissue is None:
            return math.prod(sum(t) for t in per_axis)
    return round(p.tissue.masked_sum(per_axis))


def inference_forwards(p: Plan) -> int:
    """Patches through the model: each patch once per `augment` orientation."""
    return inference_patches(p) * len(orientations(p.config.augment))


def worker_seconds(p: Plan) -> dict[str, float]:
    """Worker-seconds per kind of group at `cost.throughput` (a task's read, compute and
    write; start-up and idle workers not counted). The inference figure is per plain patch
    (`measure_inference` runs no augment), so `augment` multiplies it by its orientations."""
    cfg = p.config
    thr = cfg.cost.throughput
    per_patch = math.prod(cfg.inference.chunk) / chunk_patches(cfg) / thr.inference
    out = {"inference": inference_forwards(p) * per_patch}
    if isinstance(p.grid, OverlapGrid) and "blend" in stage_names(p):
        blended = p.bbox.size if p.shard_shapes is not None else p.grid.band_voxels()
        out["blend"] = blended / thr.blend
    if p.levels is not None:               # the histograms' reads (the merge is small)
        out["levels"] = p.levels.box.size / thr.levels
    if p.segmentation is not None:         # all four passes, priced by the bbox's voxels
        out["segmentation"] = p.bbox.size / thr.segmentation
    pyramids = p.downsample + (p.segmentation.downsample if p.segmentation else ())
    if pyramids:                           # (the segmentation's by mode: as if averaging)
        out["downsample"] = sum(ps.grid.bbox.size for ps in pyramids) / thr.downsample
    return out


def hourly_price(cfg: RunConfig, kind: str) -> float:
    """A worker-hour of `kind`: GPU VMs serve inference unless its gce group has no GPU."""
    gce = cfg.workers.inference.gce
    gpu = kind == "inference" and (gce is None or gce.accelerator_type is not None)
    return cfg.cost.prices.gpu_hour if gpu else cfg.cost.prices.cpu_hour


# -- the bill --------------------------------------------------------------------------------
def _messages(p: Plan) -> tuple[dict[str, int], int]:
    """Tasks per stage, and the Pub/Sub bytes billed for them: each message published (in
    batches) and delivered once to a worker's pull of one message (a request: at least
    1000 bytes). Sizes are the stage's longest message (its last: the largest index)."""
    run = p.config.output.rstrip("/").rsplit("/", 1)[-1] + "-" + "0" * 10
    tasks, billed = {}, 0
    for name in stage_names(p):
        grid = stage_grid(p, name)
        n = len(grid)
        tasks[name] = n - (p.masked if name == "inference" else 0)    # masked: not published
        attrs = {"run": run, "stage": name, "kind": stage_kind(name), "index": str(n - 1)}
        size = (len(encode(run, name, n - 1, grid.box(n - 1))) + PUBSUB_MESSAGE_EXTRA
                + sum(len(k) + len(v) for k, v in attrs.items()))
        billed += tasks[name] * (size + max(PUBSUB_REQUEST_MIN, size))
    return tasks, billed


def bill(p: Plan, input_chunk=None) -> dict:
    """The run's bill: what it uses and what that costs at `cost.prices`. `input_chunk` is
    the input's storage chunk at the run's mip (read from its `info` if not given)."""
    cfg = p.config
    prices = cfg.cost.prices
    if input_chunk is None:
        from .volume import Volume
        input_chunk = Volume(cfg.input, cfg.mip).chunk
    tasks, pubsub_bytes = _messages(p)
    n_tasks = sum(tasks.values())
    seconds = worker_seconds(p)
    hours = {k: s / 3600 for k, s in seconds.items()}
    seg, lv = segmentation_objects(p), levels_objects(p)
    temp_objects = temporary_objects(p) + seg["temporary_written"] + lv["temporary_written"]
    temp_bytes = temporary_bytes(p) + segmentation_temporary_bytes(p) + levels_bytes(p)
    written = {"output": output_objects(p), "segmentation": output_objects(p, "segmentation"),
               "temporary": temp_objects, "queue": LEDGER_WRITES * n_tasks}
    read = {"input": input_reads(p, input_chunk) + lv["input_read"],
            "output": output_reads(p) + seg["output_read"],
            "segmentation": output_reads(p, "segmentation"),
            "temporary": temporary_reads(p) + seg["temporary_read"] + lv["temporary_read"],
            "queue": LEDGER_READS * n_tasks}
    stored, stored_seg = output_bytes(p), output_bytes(p, "segmentation")
    # partial sums wait from the first inference task to the last blend task, at most: the
    # two stages' worker-hours over their groups' most workers
    held = sum(hours.get(k, 0.0) / max(1, getattr(cfg.workers, k).max)
               for k in ("levels", "inference", "blend", "segmentation")) if temp_bytes else 0.0
    writes = sum(written["output"]) + sum(written["segmentation"]) + temp_objects \
        + written["queue"]
    reads = sum(read.values())
    dollars = {f"{k}_workers": h * hourly_price(cfg, k) for k, h in hours.items()}
    dollars.update({
        "object_writes": writes / 1000 * prices.class_a_per_1000,
        "object_reads": reads / 1000 * prices.class_b_per_1000,
        "pubsub": pubsub_bytes / TIB * prices.pubsub_tib,
        "temporary_storage": temp_bytes / GIB * held / HOURS_PER_MONTH
        * prices.storage_gb_month})
    total = sum(dollars.values())
    teravoxels = p.bbox.size / 1e12
    return {
        "prices_date": prices.date, "tasks": tasks,
        "skipped": {"inference": p.masked},          # outside the mask: not in tasks or hours
        "worker_hours": hours,
        "throughput": cfg.cost.throughput.model_dump(),
        "patches": inference_patches(p),
        "forwards": inference_forwards(p),               # patches x augment's orientations
        "objects_written": written, "objects_read": read,
        "bytes_stored": {"output": stored, "segmentation": stored_seg, "temporary": temp_bytes},
        "temporary_hours": held,
        "messages": {"count": n_tasks, "billed_bytes": pubsub_bytes},
        "dollars": {**dollars, "total": total, "per_output_teravoxel": total / teravoxels,
                    "output_storage_per_month": (sum(stored) + sum(stored_seg)) / GIB
                    * prices.storage_gb_month},
    }


# -- what a run spent --------------------------------------------------------------------------
def _log_events(path: Path):
    """The JSON events of one worker log (other lines, a library's stderr, skipped)."""
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event and "ts" in event:
            yield event


def worker_sessions(log_dir: Path) -> dict[str, dict]:
    """Per kind: worker-seconds (each `worker_started` to its `worker_stopped`, or to the
    last line of a worker that was killed), how many worker sessions, and busy seconds (the
    `task_done` events' compute)."""
    out: dict[str, dict] = {}

    def kind_of(name: str) -> dict:
        return out.setdefault(name, {"seconds": 0.0, "sessions": 0, "busy_seconds": 0.0})

    for path in sorted(log_dir.glob("*.log")) if log_dir.is_dir() else ():
        session = None                                  # [kind, first ts, last ts]
        for event in _log_events(path):
            if event["event"] == "worker_started":
                if session:
                    kind_of(session[0])["seconds"] += session[2] - session[1]
                kinds = event.get("kinds") or ["all"]
                session = ["+".join(kinds), event["ts"], event["ts"]]
                kind_of(session[0])["sessions"] += 1
            elif session:
                session[2] = event["ts"]
            if event["event"] == "task_done":
                kind_of(stage_kind(event.get("stage", "")))["busy_seconds"] += \
                    event.get("seconds", 0.0)
            if event["event"] == "worker_stopped" and session:
                kind_of(session[0])["seconds"] += session[2] - session[1]
                session = None
        if session:
            kind_of(session[0])["seconds"] += session[2] - session[1]
    return out


def _count_files(url: str) -> Optional[int]:
    """Files under a file:// prefix (None elsewhere: listing gs:// costs class A calls)."""
    if not url.startswith("file://"):
        return None
    return sum(len(files) for _, _, files in os.walk(url[len("file://"):]))


def _reported_sessions(config: RunConfig, run: str) -> list[dict]:
    """The sessions workers reported to the run's queue (`Worker`), read-only."""
    from .queues import open_queue
    try:
        queue = open_queue(config.queue.url, readonly=True)
    except FileNotFoundError:
        return []
    try:
        return queue.sessions(run)
    finally:
        queue.close()


def _remote_hours(config: RunConfig, kind: str, group: str, reported: list[dict]) -> dict:
    """Worker-hours of a group voxflow cannot watch, from its workers' own reports: per
    worker (a VM's name on gce) from the first session's start — its machine's boot on gce,
    which is what a VM is billed from — to the last session's stop."""
    mine = [r for r in reported if r["kind"] in (kind, "all") or kind in r["kind"].split("+")]
    if not mine:
        return {"measured": False, "note": f"{group}: no worker reported a session"}
    by_worker: dict[str, list[dict]] = {}
    for r in mine:
        by_worker.setdefault(r["worker"], []).append(r)
    def start(r: dict) -> float:                     # a VM's bill runs from its boot
        return r[r.get("billed_from") or ("booted" if "gce://" in group else "started")]
    seconds = sum(max(r["stopped"] for r in rs) - min(map(start, rs))
                  for rs in by_worker.values())
    return {"measured": True, "hours": seconds / 3600,
            "busy_hours": sum(r["busy_seconds"] for r in mine) / 3600,
            "workers": len(by_worker), "dollars": seconds / 3600 * hourly_price(config, kind),
            "note": f"{group}: from the workers' session reports"
                    + (" (each VM from its boot)" if "gce://" in group else "")}


def spent(config: RunConfig, run: str, log_dir: Optional[Path] = None) -> dict:
    """What run `run` used, where it can be measured: worker-hours of local groups from the
    workers' JSON logs, of gce and external groups from the sessions their workers report to
    the queue (a gce VM from its boot),
    and the objects a file:// output and temporary folder hold (count before the temporary
    data is deleted). Dollars price the measured hours as `bill` does."""
    from .volume import Volume
    sessions = worker_sessions(log_dir or voxflow_home() / "logs" / run)
    workers = {}
    reported: Optional[list[dict]] = None
    for kind in ("levels", "inference", "blend", "segmentation", "downsample"):
        urls = getattr(config.workers, kind).urls
        group = " + ".join(urls)
        if not all(u.startswith("local://") for u in urls):   # (a hybrid's local workers
                                                              # report sessions too)
            if reported is None:
                reported = _reported_sessions(config, run)
            workers[kind] = _remote_hours(config, kind, group, reported)
        elif kind in sessions:
            s = sessions[kind]
            workers[kind] = {"measured": True, "hours": s["seconds"] / 3600,
                             "busy_hours": s["busy_seconds"] / 3600,
                             "workers": s["sessions"],
                             "dollars": s["seconds"] / 3600 * hourly_price(config, kind)}
    objects = None
    if config.output.startswith("file://") and Volume.exists(config.output):
        info = Volume(config.output).info
        root = config.output.rstrip("/")
        objects = {"output": [_count_files(f"{root}/{s['key']}") or 0
                              for s in info["scales"][:config.downsample.mips + 1]],
                   "temporary": _count_files(temporary_url(config, run))}
        seg = config.segmentation
        if seg is not None and seg.output.startswith("file://") and Volume.exists(seg.output):
            root = seg.output.rstrip("/")
            objects["segmentation"] = [_count_files(f"{root}/{s['key']}") or 0 for s in
                                       Volume(seg.output).info["scales"]
                                       [:config.downsample.mips + 1]]
    return {"workers": workers, "objects_written": objects, "measured_at": time.time()}


# -- `voxflow bench-model` --------------------------------------------------------------------
def measure_inference(config: RunConfig, seconds: float = 20.0) -> dict:
    """Inference throughput of one worker on this machine's device, in `cost.throughput.
    inference`'s unit: SlidingWindow (forward, weighting, accumulation) over the chunk of
    the real input nearest the bbox centre, one row of patches at a time until `seconds`
    have passed (after one warm-up batch), converted from patches per second with a whole
    chunk's patch count. Without `augment`: the figure is per forward of one patch, and the
    bill multiplies the patches by the orientations."""
    import torch

    from .inference import SlidingWindow
    from .models import Model, pick_device
    from .pipeline import plan
    from .volume import Volume
    p = plan(config)
    model = Model(config.model, pick_device(config.inference.device), config.inference.batch_size)
    warm_up = model.warm_up(p.input_channels)
    grid = ChunkGrid(p.bbox, config.inference.chunk, config.margin, origin=p.input_bounds.start)
    index = grid.index([n // 2 for n in grid.counts])
    read = crop_read_box(replace(p, grid=grid), index)
    inf = config.inference
    window = SlidingWindow(model, config.model.input_patch, config.model.output_patch,
                           inf.patch_overlap, inf.batch_size, inf.weighting)
    source = Volume(config.input, config.mip, fill_missing=config.input_missing == "zeros")
    x = model.normalize(source.read(read, pad=inf.pad))
    starts = window.starts(window.output_shape(x.shape[1:]))
    depth = window.input_patch[0]

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    window.weighted_sum(x[:, starts[0][0]:starts[0][0] + depth],
                        [[0], starts[1][:1], starts[2][:model.batch_size]])
    sync()
    done, t0 = 0, time.perf_counter()
    for z in starts[0]:
        window.weighted_sum(x[:, z:z + depth], [[0], starts[1], starts[2]])
        done += len(starts[1]) * len(starts[2])
        sync()
        if time.perf_counter() - t0 >= seconds:
            break
    took = time.perf_counter() - t0
    per_second = done / took
    return {"throughput": per_second * math.prod(inf.chunk) / chunk_patches(config),
            "patches": done, "seconds": took, "patches_per_second": per_second,
            "chunk_patches": chunk_patches(config), "device": str(model.device),
            "precision": config.model.precision if model.device.type == "cuda" else "fp32",
            "warm_up_seconds": warm_up, "compile_seconds": model.compile_seconds,
            "batch_size": model.batch_size,
            "read_box": [list(read.start), list(read.stop)],
            "input_dtype": str(np.dtype(source.dtype))}
