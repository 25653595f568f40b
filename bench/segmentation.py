"""Segmentation stage throughput against cc3d on the whole array in memory (the limit).

One volume of smoothed noise (`--shape`, default 256³; 13% above the 0.5 threshold: a few
thousand blobs, many crossing task boxes), float32, written as the input of a run whose model
is the identity, so the output the segmentation reads is the noise itself. Measured, in one
sitting, alternated `--repeats` times:

- **cc3d whole**: threshold + cc3d.connected_components of the whole array in memory, one
  call: the limit (no I/O, no boxes, no merge);
- **passes in memory**: `segment_in_memory`, the stage's four passes over the same task
  boxes without storage (label, pairs, merge, relabel: cc3d runs twice per voxel);
- **stage**: the four `segmentation-*` stages of `voxflow run` (file:// layers, SQLite queue,
  one worker: the driver, local://0), from each stage's summary (publish, the tasks, the
  driver's 0.2 s polls); **stage, busy**: the same tasks' own seconds from the worker's log
  (`task_done`: compute + write; reads are prefetched beside them, not counted); its
  pyramid (`downsample-segmentation-*`) is reported apart.

Mvox/s = bbox voxels / seconds (of the median; the best run beside it). igneous is not
installed here (its CCL cannot be compared).

    .venv/bin/python bench/segmentation.py [--shape 256 256 256] [--chunk 128 128 64]
        [--connectivity 6] [--repeats 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cc3d
import numpy as np
import torch
import yaml
from scipy.ndimage import gaussian_filter

from voxflow.config import load_config
from voxflow.geometry import Box
from voxflow.grids import ChunkGrid
from voxflow.runner import run
from voxflow.segmentation import segment_in_memory
from voxflow.volume import Volume

INLINE = {k: "local://0" for k in ("inference", "blend", "segmentation", "downsample")}


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def blobs(shape_zyx, seed: int = 0) -> np.ndarray:
    field = gaussian_filter(np.random.default_rng(seed).random(shape_zyx, np.float32), 2.0)
    return np.clip(0.5 + (field - np.quantile(field, 0.87)) / (8 * field.std()), 0, 1
                   ).astype(np.float32)


def config(tmp: Path, name: str, args) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "input": f"file://{tmp}/img", "output": f"file://{tmp}/{name}-out",
        "model": {"path": str(tmp / "id.pt"), "input_patch": [64, 64, 16],
                  "output_channels": 1},
        "inference": {"chunk": args.chunk, "patch_overlap": [0, 0, 0], "blend": "crop"},
        "storage_chunk": [64, 64, 16], "downsample": {"mips": 1},
        "segmentation": {"output": f"file://{tmp}/{name}-seg", "threshold": 0.5,
                         "connectivity": args.connectivity, "chunk": args.chunk},
        "queue": {"url": f"sqlite://{tmp}/{name}.db"}, "workers": INLINE}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 256], help="x y z")
    ap.add_argument("--chunk", type=int, nargs=3, default=[128, 128, 64], help="task box")
    ap.add_argument("--connectivity", type=int, default=6, choices=(6, 18, 26))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    shape_zyx = tuple(reversed(args.shape))
    voxels = int(np.prod(args.shape))
    values = blobs(shape_zyx)
    grid = ChunkGrid(Box((0, 0, 0), args.shape), args.chunk)
    times: dict[str, list[float]] = {"cc3d whole": [], "passes in memory": [], "stage": [],
                                     "stage, busy": [], "pyramid": []}
    passes: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["VOXFLOW_HOME"] = str(tmp / "home")
        img = Volume.create(f"file://{tmp}/img", num_channels=1, dtype="float32",
                            resolution=(8, 8, 40), voxel_offset=(0, 0, 0), size=args.shape,
                            chunk=(64, 64, 16))
        img.write(img.bounds, values[None])
        torch.jit.script(Identity().eval()).save(str(tmp / "id.pt"))
        for r in range(args.repeats):
            t0 = time.perf_counter()
            whole, objects = cc3d.connected_components(values > 0.5, return_N=True,
                                                       connectivity=args.connectivity)
            times["cc3d whole"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mine = segment_in_memory(values, grid, 0.5, connectivity=args.connectivity)
            times["passes in memory"].append(time.perf_counter() - t0)
            assert mine.max() == objects
            summary = run(load_config(config(tmp, f"r{r}", args)))
            stages = {s.name: s.seconds for s in summary.stages}
            for name, s in stages.items():
                if name.startswith("segmentation-"):
                    passes.setdefault(name, []).append(s)
            times["stage"].append(sum(s for n, s in stages.items()
                                      if n.startswith("segmentation-")))
            times["pyramid"].append(sum(s for n, s in stages.items()
                                        if n.startswith("downsample-segmentation-")))
            events = [json.loads(line) for log in (tmp / "home" / "logs" / summary.run).glob(
                "*.log") for line in log.read_text().splitlines() if line.startswith("{")]
            times["stage, busy"].append(sum(e["seconds"] + e["write_seconds"] for e in events
                                            if e.get("event") == "task_done" and
                                            e.get("stage", "").startswith("segmentation-")))
    rows = {k: {"seconds": v, "median": statistics.median(v),
                "mvox_per_s": voxels / statistics.median(v) / 1e6,
                "best_mvox_per_s": voxels / min(v) / 1e6} for k, v in times.items()}
    report = {"shape": args.shape, "chunk": args.chunk, "tasks": len(grid),
              "connectivity": args.connectivity, "objects": int(objects),
              "foreground": float((values > 0.5).mean()), "rows": rows,
              "passes": {k: statistics.median(v) for k, v in passes.items()},
              "machine": {"nproc": os.cpu_count(), "cpu": platform.processor() or "?",
                          "load": os.getloadavg()}}
    print(f"{args.shape} float32, {len(grid)} task boxes of {args.chunk}, connectivity "
          f"{args.connectivity}, {objects} objects, {100 * report['foreground']:.0f}% "
          "foreground")
    print("| what | seconds | median | Mvox/s | best Mvox/s |\n|---|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {', '.join(f'{s:.2f}' for s in v['seconds'])} | {v['median']:.2f} | "
              f"{v['mvox_per_s']:.1f} | {v['best_mvox_per_s']:.1f} |")
    print("passes (median s):", ", ".join(f"{k} {v:.2f}" for k, v in report["passes"].items()))
    print(f"load average {report['machine']['load']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
