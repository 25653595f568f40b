"""Cost of `blend: overlap` against `blend: crop` on the same volume and model.

Three runs over one synthetic EM volume with the demo RSUNet, every stage worked by this
process (local://0), no pyramid:
  crop      chunkflow-style: each chunk runs its own lattice over chunk + margin, crops
  overlap   one lattice over the bbox, partial sums where chunks meet, blend stage
  one pass  overlap mode with one chunk covering the whole bbox: the seamless reference
Reported per mode: patches evaluated (compute), wall time per stage, bytes written (output
layer on disk, and the temporary partial sums, measured with keep_temporary), the temporary
bytes' ratio to the output's (as `voxflow plan` computes it, and as measured), and how far the
result is from one pass away from the volume's faces: max |difference|, mean |difference| at
chunk boundaries and elsewhere, and a seam score (mean |difference| between neighbouring x/y
planes at chunk boundaries over that elsewhere; 1: no seam). Last, the temporary-bytes ratio
at the default chunk and storage chunk for two model patches (plan arithmetic only).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from voxflow.grids import OverlapGrid
from voxflow.temporary import temporary_url
from voxflow.config import load_config
from voxflow.demo.run import HERE, RESOLUTION
from voxflow.demo.synthetic import make_em_volume
from voxflow.geometry import Box
from voxflow.lattice import lattice_size
from voxflow.pipeline import plan
from voxflow.runner import run
from voxflow.volume import Volume

INLINE = {"inference": "local://0", "blend": "local://0", "downsample": "local://0"}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def crop_patches(p) -> int:
    """Patches crop mode evaluates: each chunk's own lattice over its read box."""
    cfg = p.config
    op = cfg.model.output_patch
    stride = [o - v for o, v in zip(op, cfg.inference.patch_overlap)]
    total = 0
    for i in range(len(p.grid)):
        shape = p.grid.read_box(i).shape
        short = [max(ip - n, 0) for ip, n in zip(cfg.model.input_patch, shape)]
        out = [n + s - 2 * m for n, s, m in zip(shape, short, cfg.model.patch_margin)]
        total += int(np.prod([lattice_size(n, o, s) for n, o, s in zip(out, op, stride)]))
    return total


def seam_score(prob: np.ndarray, planes: dict[int, list[int]]) -> float:
    """Mean |difference| of neighbouring planes at `planes` (axis -> i: planes i-1, i) over
    the mean elsewhere, x and y together; 1.0: no seam."""
    ratios = []
    for axis, idx in planes.items():
        other = tuple(a for a in range(3) if a != axis)
        diff = np.abs(np.diff(prob, axis=axis)).mean(axis=other)
        at = [i - 1 for i in idx if 0 < i < len(diff) + 1]
        ratios.append(diff[at].mean() / np.delete(diff, at).mean())
    return float(np.mean(ratios))


def default_size_ratios() -> dict:
    """Temporary bytes / output bytes at the default chunk and storage chunk (4 and 16
    chunks per axis; the ratio grows towards its interior value with more chunks)."""
    from voxflow.config import parse_config
    out = {}
    for patch, overlap in (((256, 256, 20), (64, 64, 4)), ((64, 64, 16), (16, 16, 4))):
        cfg = parse_config({"input": "gs://b/in", "output": "gs://b/out", "model": {
            "path": "m.pt", "input_patch": list(patch), "output_channels": 1},
            "inference": {"patch_overlap": list(overlap)}})
        for n in (4, 16):
            bbox = Box.from_shape((0, 0, 0), [n * c for c in cfg.inference.chunk])
            grid = OverlapGrid(bbox, patch, overlap, (0, 0, 0), cfg.inference.chunk,
                               cfg.storage_chunk, (0, 0, 0))
            key = f"patch {patch} overlap {overlap}, {n}^3 chunks of {cfg.inference.chunk}, " \
                  f"storage {cfg.storage_chunk}"
            r = grid.temporary_voxels() / bbox.size
            out[key] = {"float32 output": round(r, 4), "uint8 output": round(4 * r, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[384, 384, 64], help="x y z")
    ap.add_argument("--chunk", type=int, nargs=3, default=[192, 192, 32])
    ap.add_argument("--storage-chunk", type=int, nargs=3, default=[64, 64, 8])
    ap.add_argument("--overlap", type=int, nargs=3, default=[16, 16, 4])
    ap.add_argument("--output-dtype", default="float32")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="voxflow-bench-blend-"))
    os.environ["VOXFLOW_HOME"] = str(tmp / "home")
    image = make_em_volume(tuple(args.shape), seed=1).image
    src = Volume.create(f"file://{tmp}/image", num_channels=1, dtype="uint8",
                        resolution=RESOLUTION, voxel_offset=(0, 0, 0), size=args.shape,
                        chunk=(64, 64, 16))
    src.write(src.bounds, image[None])
    whole = [s * -(-n // s) for n, s in zip(args.shape, args.storage_chunk)]
    modes = {"crop": ("crop", args.chunk), "overlap": ("overlap", args.chunk),
             "one pass": ("overlap", whole)}
    figs, outputs = {}, {}
    for name, (blend, chunk) in modes.items():
        out = name.replace(" ", "-")
        path = tmp / f"{out}.yaml"
        path.write_text(yaml.safe_dump({
            "input": f"file://{tmp}/image", "output": f"file://{tmp}/{out}",
            "model": {"path": str(HERE / "rsunet.py"), "weights": str(HERE / "rsunet.safetensors"),
                      "input_patch": [64, 64, 16], "output_channels": 1},
            "inference": {"chunk": chunk, "patch_overlap": args.overlap, "batch_size": 4,
                          "blend": blend, "keep_temporary": True},
            "storage_chunk": args.storage_chunk, "output_dtype": args.output_dtype,
            "downsample": {"mips": 0}, "workers": INLINE}, sort_keys=False))
        cfg = load_config(path)
        p = plan(cfg)
        t0 = time.perf_counter()
        summary = run(cfg, run_id=out)
        wall = time.perf_counter() - t0
        temp_dir = Path(temporary_url(cfg, out)[len("file://"):])
        temp = du(temp_dir)
        shutil.rmtree(temp_dir.parent, ignore_errors=True)
        out_bytes = p.bbox.size * p.output_voxel_bytes
        overlap = isinstance(p.grid, OverlapGrid)
        figs[name] = {
            "tasks": {s.name: s.tasks for s in summary.stages},
            "seconds": {s.name: round(s.seconds, 2) for s in summary.stages},
            "wall_seconds": round(wall, 2),
            "patches": p.grid.patch_count() if overlap else crop_patches(p),
            "output_bytes_on_disk": du(tmp / out),
            "temporary_bytes_on_disk": temp,
            "temporary_ratio_planned": round(p.grid.temporary_voxels() * 4 / out_bytes, 4)
            if overlap else 0.0,
            "temporary_ratio_measured": round(temp / out_bytes, 4),
        }
        vol = Volume(f"file://{tmp}/{out}")
        outputs[name] = vol.read(vol.bounds)[0].astype(np.float64)        # z, y, x
        if name == "crop":
            faces = {axis: list(range(c, n, c)) for axis, c, n in
                     ((2, args.chunk[0], args.shape[0]), (1, args.chunk[1], args.shape[1]))}
        if name == "overlap":
            meet = {2: p.grid.axes[0], 1: p.grid.axes[1]}
            zones = {axis: sorted({i for (_, b), (a, _) in zip(ax.ranges, ax.ranges[1:])
                                   for i in range(a, b + 1)}) for axis, ax in meet.items()}
    ref = outputs["one pass"]
    # away from the volume's faces (crop mode reads zero padding there, one pass does not)
    inner = tuple(slice(min(p, n // 4), n - min(p, n // 4))
                  for p, n in zip((16, 64, 64), ref.shape))
    for name in ("crop", "overlap"):
        planes = faces if name == "crop" else zones
        diff = np.abs(outputs[name] - ref)
        at = np.zeros(ref.shape, bool)
        for axis, idx in planes.items():
            sl = [slice(None)] * 3
            sl[axis] = [i for j in idx for i in (j - 1, j)]
            at[tuple(sl)] = True
        d, a = diff[inner], at[inner]
        figs[name]["max_abs_diff_vs_one_pass"] = float(d.max())
        figs[name]["mean_abs_diff_vs_one_pass_at_chunk_boundaries"] = float(d[a].mean())
        figs[name]["mean_abs_diff_vs_one_pass_elsewhere"] = float(d[~a].mean())
        figs[name]["seam_score"] = round(seam_score(outputs[name], planes), 3)
        figs[name]["seam_score_one_pass_same_planes"] = round(seam_score(ref, planes), 3)
    figs["default sizes (plan only)"] = default_size_ratios()
    result = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "shape": args.shape, "chunk": args.chunk,
        "storage_chunk": args.storage_chunk, "patch": [64, 64, 16], "overlap": args.overlap,
        "output_dtype": args.output_dtype, "modes": figs}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
