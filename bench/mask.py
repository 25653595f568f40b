"""Wall time the tissue mask saves on a volume that is 60% empty.

One synthetic EM volume (the demo's renderer) whose x >= 40% of the width is resin (the
input there is 0, as an unimaged region reads), the demo RSUNet, every stage worked by this
process (local://0), no pyramid. Two runs, same machine, one sitting, alternated `--repeats`
times: without a mask, and with `mask:` (a layer of twice the voxel size in x and y,
nonzero on the tissue's 40%, written by hand like a lab's tissue mask). Reported: tasks run and skipped, wall seconds of
each run (the median over repeats), the ratio masked / unmasked, and the bill's estimate of
the inference worker-hours (which should fall by the same share).

    .venv/bin/python bench/mask.py [--shape 384 384 64] [--blend overlap] [--json out.json]
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

import numpy as np
import torch
import yaml

from voxflow.config import load_config
from voxflow.cost import bill
from voxflow.demo.run import HERE, RESOLUTION
from voxflow.demo.synthetic import make_em_volume
from voxflow.pipeline import plan
from voxflow.runner import run
from voxflow.volume import Volume

INLINE = {"inference": "local://0", "blend": "local://0", "downsample": "local://0"}
EMPTY = 0.6                     # share of the volume (along x) that is resin


def make_layers(tmp: Path, shape: list[int]) -> None:
    """The input (EM where x < 40% of the width, 0 beyond) and its coarse tissue mask."""
    image = make_em_volume(tuple(shape), seed=1).image
    tissue_x = int(round(shape[0] * (1 - EMPTY)))
    image[..., tissue_x:] = 0
    src = Volume.create(f"file://{tmp}/image", num_channels=1, dtype="uint8",
                        resolution=RESOLUTION, voxel_offset=(0, 0, 0), size=shape,
                        chunk=(64, 64, 16))
    src.write(src.bounds, image[None])
    coarse = [-(-shape[0] // 2), -(-shape[1] // 2), shape[2]]
    mask = Volume.create(f"file://{tmp}/mask", num_channels=1, dtype="uint8",
                         resolution=(RESOLUTION[0] * 2, RESOLUTION[1] * 2, RESOLUTION[2]),
                         voxel_offset=(0, 0, 0), size=coarse, chunk=(64, 64, 16))
    data = np.zeros((1, coarse[2], coarse[1], coarse[0]), np.uint8)
    data[..., :-(-tissue_x // 2)] = 1
    mask.write(mask.bounds, data)


def config(tmp: Path, name: str, args, masked: bool) -> Path:
    path = tmp / f"{name}.yaml"
    cfg = {"input": f"file://{tmp}/image", "output": f"file://{tmp}/{name}",
           "model": {"path": str(HERE / "rsunet.py"), "weights": str(HERE / "rsunet.safetensors"),
                     "input_patch": [64, 64, 16], "output_channels": 1},
           "inference": {"chunk": args.chunk, "patch_overlap": [16, 16, 4], "batch_size": 4,
                         "blend": args.blend},
           "storage_chunk": [64, 64, 8], "downsample": {"mips": 0}, "workers": INLINE,
           "queue": {"url": f"sqlite://{tmp}/queue.db"}}
    if masked:
        cfg["mask"] = {"layer": f"file://{tmp}/mask", "mip": 0}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[384, 384, 64], help="x y z")
    ap.add_argument("--chunk", type=int, nargs=3, default=[64, 64, 32])
    ap.add_argument("--blend", default="overlap", choices=["overlap", "crop"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="voxflow-bench-mask-"))
    os.environ["VOXFLOW_HOME"] = str(tmp / "home")
    make_layers(tmp, args.shape)
    seconds: dict[str, list[float]] = {"unmasked": [], "masked": []}
    figs: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name in ("unmasked", "masked"):
            out = f"{name}-{repeat}"                  # a fresh output: nothing to resume
            cfg = load_config(config(tmp, out, args, name == "masked"))
            p = plan(cfg)
            t0 = time.perf_counter()
            summary = run(cfg)
            seconds[name].append(time.perf_counter() - t0)
            inference = summary.stages[0]
            figs[name] = {"tasks run": inference.tasks, "tasks skipped": inference.masked,
                          "stage seconds": {s.name: round(s.seconds, 2)
                                            for s in summary.stages},
                          "planned inference worker-hours": round(
                              bill(p)["worker_hours"]["inference"], 6)}
    for name, values in seconds.items():
        figs[name]["wall seconds"] = [round(s, 2) for s in values]
        figs[name]["median wall seconds"] = round(statistics.median(values), 2)
    ratio = figs["masked"]["median wall seconds"] / figs["unmasked"]["median wall seconds"]
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{platform.python_version()}, torch {torch.__version__}",
              "shape": args.shape, "chunk": args.chunk, "blend": args.blend,
              "empty share": EMPTY, "runs": figs, "masked / unmasked wall": round(ratio, 3),
              "planned hours ratio": round(
                  figs["masked"]["planned inference worker-hours"]
                  / figs["unmasked"]["planned inference worker-hours"], 3)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
