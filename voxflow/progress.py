"""What the operator console shows of a run: progress per stage with rate and ETA, the chunk
map, the plan's estimate, what was spent so far and the dead letters with their boxes.

Everything is read from the run's queue and the config it was registered with, so any
process that can open the queue (the Airflow API server, `voxflow status`) shows the same.
Queues keep no completion times, so a rate is what this process saw change between polls
(`RateMeter`); the console polls every few seconds.
"""
from __future__ import annotations

import json
import math
import time
from collections import OrderedDict, deque
from typing import Callable, Optional

import numpy as np

from .queues import DEAD, DONE, LEASED, PENDING, SKIPPED, STATE_NAMES, UNPUBLISHED, TaskQueue
from .segmentation import STEPS

_KIND_ORDER = {"levels": 0, "inference": 1, "blend": 2, "segmentation": 3, "downsample": 4}
# a map cell that stands for several tasks shows the least finished of them
_BY_RANK = np.array([DEAD, LEASED, PENDING, UNPUBLISHED, DONE, SKIPPED], np.uint8)  # rank -> code
_PRIORITY = np.argsort(_BY_RANK).astype(np.uint8)   # code -> rank (lower shows first)


def stage_order(name: str) -> tuple:
    """The order stages run in: levels, levels-merge, inference, blend, segmentation-label
    … -relabel, downsample-0, downsample-1, …, downsample-segmentation-0, …"""
    kind, _, rest = name.partition("-")
    layer, _, number = rest.rpartition("-")
    if kind == "segmentation" and rest in STEPS:
        step = STEPS.index(rest)
    else:
        step = (int(number) if number.isdigit() else 0) + (1 << 16 if layer else 0)
    return _KIND_ORDER.get(kind, len(_KIND_ORDER)), step, name


class RateMeter:
    """Tasks per second of each key, from the done counts seen in the last `window` seconds.
    Memory is bounded: at most `keys` keys (least recently used dropped), `samples` each."""

    def __init__(self, window: float = 120.0, keys: int = 1000, samples: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self.window, self.keys, self.samples, self.clock = window, keys, samples, clock
        self._seen: OrderedDict[str, deque] = OrderedDict()

    def rate(self, key: str, done: int) -> Optional[float]:
        """Record `done` now; the rate over the window, or None until two samples lie a
        second or more apart."""
        now = self.clock()
        seen = self._seen.pop(key, None) or deque(maxlen=self.samples)
        self._seen[key] = seen
        while len(self._seen) > self.keys:
            self._seen.popitem(last=False)
        if seen and done < seen[-1][1]:          # counts went back (retried dead tasks)
            seen.clear()
        seen.append((now, done))
        while len(seen) > 2 and now - seen[1][0] >= self.window:
            seen.popleft()
        (t0, d0), (t1, d1) = seen[0], seen[-1]
        return (d1 - d0) / (t1 - t0) if t1 - t0 >= 1.0 else None


def stage_rows(queue: TaskQueue, run: str, meter: RateMeter,
               planned: Optional[dict[str, int]] = None,
               masked: Optional[dict[str, int]] = None) -> list[dict]:
    """Per stage, in run order: tasks done / total / pending / leased / dead / skipped,
    percent, rate (tasks/s) and ETA (s). `planned`: each stage's task count from the plan
    (a stage not yet published shows 0 of its planned tasks), without the tasks outside
    the mask (`masked`, by stage): those are never published and count as skipped, as do
    the tasks the workers skipped as empty (which are also done)."""
    stats = queue.stats(run)
    names = sorted(set(stats) | set(planned or {}), key=stage_order)
    rows = []
    for name in names:
        s = stats.get(name)
        total = (planned or {}).get(name, s.total if s else 0)
        done = s.done if s else 0
        rate = meter.rate(f"{queue.url} {run} {name}", done)
        left = max(total - done - (s.dead if s else 0), 0)
        rows.append({"stage": name, "total": total, "published": s.total if s else 0,
                     "pending": s.pending if s else 0, "leased": s.leased if s else 0,
                     "done": done, "dead": s.dead if s else 0,
                     "skipped": (masked or {}).get(name, 0) + (s.skipped if s else 0),
                     "percent": 100.0 * done / total if total else 0.0, "rate": rate,
                     "eta_seconds": left / rate if rate and left else (0.0 if not left
                                                                        else None)})
    return rows


def overall(rows: list[dict]) -> dict:
    """The run's done / total over all its stages, and the ETA of the work left at each
    stage's rate (None while a stage with work left has no rate yet)."""
    total = sum(r["total"] for r in rows)
    done = sum(r["done"] for r in rows)
    etas = [r["eta_seconds"] for r in rows if r["total"] > r["done"] + r["dead"]]
    return {"done": done, "total": total, "percent": 100.0 * done / total if total else 0.0,
            "dead": sum(r["dead"] for r in rows),
            "eta_seconds": None if any(e is None for e in etas) else sum(etas)}


def _lattice(grid) -> Optional[tuple[int, int, int]]:
    """Tasks per axis of a grid whose index is x fastest over a full lattice."""
    from .grids import ChunkGrid, OverlapGrid
    if isinstance(grid, ChunkGrid):
        return tuple(grid.counts)
    if isinstance(grid, OverlapGrid):
        return tuple(ax.tasks for ax in grid.axes)
    return None


def _reduce(cells: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """(z, y, x) codes reduced by `factor` (x, y, z) per axis, each cell the least finished
    state of its block."""
    fx, fy, fz = factor
    z, y, x = cells.shape
    ranks = np.full((math.ceil(z / fz) * fz, math.ceil(y / fy) * fy, math.ceil(x / fx) * fx),
                    len(_BY_RANK) - 1, np.uint8)          # padding hides nothing
    ranks[:z, :y, :x] = _PRIORITY[cells]
    zz, yy, xx = (n // f for n, f in zip(ranks.shape, (fz, fy, fx)))
    ranks = ranks.reshape(zz, fz, yy, fy, xx, fx).min(axis=(1, 3, 5))
    return _BY_RANK[ranks]


def chunk_map(queue: TaskQueue, run: str, stage: str, grid,
              max_cells: int = 1 << 16, max_bands: int = 32,
              runs: Optional[np.ndarray] = None) -> dict:
    """The stage's tasks as x-y tiles per z band, each a state code (`STATE_NAMES`). A
    grid that is not a full lattice (blend bands) shows its tasks in index order, rows of
    `ceil(sqrt(n))`. Large grids are reduced: a cell is a block of tasks, shown in its least
    finished state (dead before leased before pending). `runs`: per task, whether the mask
    lets it run — the others are `skipped`, not `unpublished` (they never will be)."""
    n = len(grid)
    states = queue.task_states(run, stage, n)
    if runs is not None:
        states[~runs & (states == UNPUBLISHED)] = SKIPPED
    shape = _lattice(grid)
    if shape is None:
        side = max(1, math.ceil(math.sqrt(n)))
        padded = np.full(side * math.ceil(n / side), DONE, np.uint8)
        padded[:n] = states
        cells, shape = padded.reshape(1, -1, side), (side, math.ceil(n / side), 1)
    else:
        cells = states.reshape(shape[2], shape[1], shape[0])
    fz = math.ceil(shape[2] / max_bands)
    fxy = max(1, math.ceil(math.sqrt(shape[0] * shape[1] * math.ceil(shape[2] / fz)
                                     / max_cells)))
    block = (fxy, fxy, fz)
    if block != (1, 1, 1):
        cells = _reduce(cells, block)
    counts = np.bincount(states, minlength=len(STATE_NAMES))
    return {"stage": stage, "tasks": n, "lattice": _lattice(grid) is not None,
            "shape": list(shape), "block": list(block), "cells": list(cells.shape[::-1]),
            "states": list(STATE_NAMES),
            "counts": {name: int(c) for name, c in zip(STATE_NAMES, counts)},
            "bands": ["".join(map(str, band.ravel().tolist())) for band in cells]}


def run_config(queue: TaskQueue, run: str):
    """The config the run was registered with."""
    from .config import RunConfig
    return RunConfig.model_validate(json.loads(queue.run_params(run)))



def section_png(url: str, bbox, z: Optional[int] = None, max_side: int = 512) -> bytes:
    """A PNG of one z section of the layer at `url` over `bbox` (mip 0 voxels), at the
    finest mip whose section fits `max_side` pixels (else the coarsest): a preview that
    reads a few chunks, not the section at full resolution. The first channel; floats
    (probabilities) are shown over [0, 1], integers over their range."""
    import io

    from PIL import Image

    from .geometry import Box
    from .volume import Volume
    base = Volume(url)
    scales = base.info["scales"]
    z = (bbox.start[2] + bbox.stop[2]) // 2 if z is None else z
    for mip in range(len(scales)):
        factor = [r / r0 for r, r0 in zip(scales[mip]["resolution"], scales[0]["resolution"])]
        if max((bbox.stop[i] - bbox.start[i]) / factor[i] for i in (0, 1)) <= max_side:
            break
    vol = Volume(url, mip)
    start = [int(bbox.start[i] // factor[i]) for i in (0, 1)] + [int(z // factor[2])]
    stop = [max(start[i] + 1, math.ceil(bbox.stop[i] / factor[i])) for i in (0, 1)]
    image = vol.read(Box(start, stop + [start[2] + 1]))[0, 0]
    if image.dtype.kind == "f":
        pixels = (np.clip(np.nan_to_num(image), 0, 1) * 255).astype(np.uint8)
    elif image.dtype == np.uint8:
        pixels = image
    else:
        top = max(int(image.max()), 1)
        pixels = (image.astype(np.float64) * 255 / top).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
