"""Levels stage Mvox/s (`cost.throughput.levels`) and what applying the windows adds to an
inference task's load.

A uint8 (or uint16) layer of random values on file://, the real `levels` and `levels-merge`
stages run task by task in this process (read, count, write), then `apply_windows` over one
inference-sized read box. Reported: voxels, seconds and Mvox/s of each.

    .venv/bin/python bench/normalize.py [--shape 2048 2048 64] [--dtype uint8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from voxflow.config import parse_config
from voxflow.geometry import Box
from voxflow.levels import apply_windows, source_sections
from voxflow.pipeline import plan
from voxflow.stages import build_stage, run_task
from voxflow.volume import Volume


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[2048, 2048, 64], help="x y z")
    ap.add_argument("--dtype", default="uint8", choices=["uint8", "uint16"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        x, y, z = args.shape
        url = f"file://{tmp}/img"
        vol = Volume.create(url, num_channels=1, dtype=args.dtype, resolution=(8, 8, 40),
                            voxel_offset=(0, 0, 0), size=(x, y, z), chunk=(256, 256, 16))
        top = np.iinfo(args.dtype).max
        vol.write(vol.bounds, np.random.default_rng(0).integers(
            0, top, (1, z, y, x), dtype=args.dtype))
        Path(tmp, "model.py").write_text("import torch\nbuild_model = lambda: "
                                         "torch.nn.Conv3d(1, 1, 1)\n")
        config = parse_config({
            "input": url, "output": f"file://{tmp}/out", "normalize": {},
            "model": {"path": f"{tmp}/model.py", "input_patch": [64, 64, 8],
                      "output_channels": 1}})
        p = plan(config, check_model=False)
        result = {"shape": args.shape, "dtype": args.dtype, "cpus": os.cpu_count(),
                  "machine": platform.machine(), "levels_tasks": len(p.levels.grid)}
        t0 = time.perf_counter()
        for name in ("levels", "levels-merge"):
            stage = build_stage(p, name, "bench")
            for i in range(len(stage)):
                run_task(stage, i)
        took = time.perf_counter() - t0
        result.update(levels_seconds=took, levels_mvox_s=p.levels.box.size / took / 1e6)
        box = Box((0, 0, 0), (min(x, 1024), min(y, 1024), z))
        image = vol.read(box)
        found = stage.store.windows(p.levels.slab_range(0, z))
        t0 = time.perf_counter()
        apply_windows(image, source_sections(box, vol.bounds, "zeros"), found)
        took = time.perf_counter() - t0
        result.update(apply_seconds=took, apply_mvox_s=box.size / took / 1e6)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
