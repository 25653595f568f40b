"""Wall time of test-time augmentation: none, and 1, 2 and 4 transforms (2, 4, 16 orientations).

One synthetic EM volume (the demo's renderer), the demo RSUNet, overlap mode, every stage worked
by this process (local://0), no pyramid, on the CPU. Runs of `augment: []`, `[flip_x]`,
`[flip_x, flip_y]` and `[flip_x, flip_y, flip_z, transpose_xy]`, alternated `--repeats` times
(a fresh output each: nothing resumes). Reported per run: the forwards the bill plans (patches
x orientations), wall seconds (median over repeats), the inference stage's seconds and its
forwards per second — which should be about constant, i.e. the time about proportional to the
orientations — and the ratio of each run's wall time to the plain run's.

    .venv/bin/python bench/augment.py [--shape 192 192 32] [--repeats 2] [--json out.json]
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

import torch
import yaml

from voxflow.augment import orientations
from voxflow.config import load_config
from voxflow.cost import bill
from voxflow.demo.run import HERE, RESOLUTION
from voxflow.demo.synthetic import make_em_volume
from voxflow.pipeline import plan
from voxflow.runner import run
from voxflow.volume import Volume

INLINE = {"inference": "local://0", "blend": "local://0", "downsample": "local://0"}
AUGMENTS = {"none": [], "1": ["flip_x"], "2": ["flip_x", "flip_y"],
            "4": ["flip_x", "flip_y", "flip_z", "transpose_xy"]}


def config(tmp: Path, name: str, augment: list[str], args) -> Path:
    path = tmp / f"{name}.yaml"
    cfg = {"input": f"file://{tmp}/image", "output": f"file://{tmp}/{name}",
           "model": {"path": str(HERE / "rsunet.py"), "weights": str(HERE / "rsunet.safetensors"),
                     "input_patch": [64, 64, 16], "output_channels": 1},
           "inference": {"chunk": args.chunk, "patch_overlap": [16, 16, 4], "batch_size": 4,
                         "device": "cpu"},
           "augment": augment, "storage_chunk": [64, 64, 8], "downsample": {"mips": 0},
           "workers": INLINE, "queue": {"url": f"sqlite://{tmp}/queue.db"}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[192, 192, 32], help="x y z")
    ap.add_argument("--chunk", type=int, nargs=3, default=[128, 128, 32])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="voxflow-bench-augment-"))
    os.environ["VOXFLOW_HOME"] = str(tmp / "home")
    src = Volume.create(f"file://{tmp}/image", num_channels=1, dtype="uint8",
                        resolution=RESOLUTION, voxel_offset=(0, 0, 0), size=args.shape,
                        chunk=(64, 64, 16))
    src.write(src.bounds, make_em_volume(tuple(args.shape), seed=1).image[None])
    wall: dict[str, list[float]] = {k: [] for k in AUGMENTS}
    stage: dict[str, list[float]] = {k: [] for k in AUGMENTS}
    forwards: dict[str, int] = {}
    for repeat in range(args.repeats):
        for name, augment in AUGMENTS.items():
            cfg = load_config(config(tmp, f"{name}-{repeat}", augment, args))
            forwards[name] = bill(plan(cfg))["forwards"]
            t0 = time.perf_counter()
            summary = run(cfg)
            wall[name].append(time.perf_counter() - t0)
            stage[name].append(summary.stages[0].seconds)
    figs = {}
    for name, augment in AUGMENTS.items():
        s = statistics.median(stage[name])
        figs[name] = {"augment": augment, "orientations": len(orientations(augment)),
                      "forwards": forwards[name],
                      "wall seconds": [round(v, 2) for v in wall[name]],
                      "median wall seconds": round(statistics.median(wall[name]), 2),
                      "median inference stage seconds": round(s, 2),
                      "forwards per second (inference stage)": round(forwards[name] / s, 1)}
    base = figs["none"]["median wall seconds"]
    for f in figs.values():
        f["wall / plain"] = round(f["median wall seconds"] / base, 2)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{platform.python_version()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads",
              "shape": args.shape, "chunk": args.chunk, "runs": figs}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
