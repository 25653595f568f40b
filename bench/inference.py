"""Inference throughput on one chunk: bare forward, SlidingWindow, end-to-end crop mode.

All three work on the same chunk with the same model, in output voxels per second:
  forward      every patch of the chunk's lattice through the model, no blending
  window       SlidingWindow over the chunk's input (forward + weights + normalisation)
  end-to-end   one crop-mode inference task: read from a file:// layer, infer, crop, write
The ratios say what blending and I/O cost. Defaults suit a 2-core CPU; for a GPU:
  python bench/inference.py --patch 256 256 20 --overlap 64 64 4 --chunk 1024 1024 84 \
      --precision bf16 --device cuda
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from voxflow.config import parse_config
from voxflow.demo.run import HERE
from voxflow.geometry import Box
from voxflow.models import Model, pick_device
from voxflow.pipeline import create_layers, plan
from voxflow.stages import run_task
from voxflow.stages.inference import InferenceStage
from voxflow.volume import Volume


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def storage_chunk_for(chunk):
    """The largest of 64, 32, ... (x, y) and 16, 12, 8, 4, ... (z) dividing the chunk."""
    xy = [next(s for s in (128, 64, 32, 16, 8, 4, 2, 1) if c % s == 0) for c in chunk[:2]]
    z = next(s for s in (16, 12, 8, 4, 2, 1) if chunk[2] % s == 0)
    return [*xy, z]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 16])
    ap.add_argument("--overlap", type=int, nargs=3, default=[16, 16, 4])
    ap.add_argument("--chunk", type=int, nargs=3, default=[256, 256, 32])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--output-dtype", default="uint8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="voxflow-bench-"))
    margin = list(args.overlap)                       # default crop-mode margin for this model
    # The layer spans [-chunk, chunk + margin): [0, chunk) is one task aligned to the chunk
    # grid, and only its input, [-margin, chunk + margin), is written.
    read = Box([0, 0, 0], args.chunk).grow(margin)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, *reversed(read.shape)), dtype=np.uint8)
    vol = Volume.create(f"file://{tmp}/image", num_channels=1, dtype="uint8",
                        resolution=(8, 8, 40), voxel_offset=[-c for c in args.chunk],
                        size=[2 * c + m for c, m in zip(args.chunk, margin)],
                        chunk=storage_chunk_for(args.chunk))
    vol.write(read, image)
    cfg = parse_config({
        "input": f"file://{tmp}/image", "output": f"file://{tmp}/out",
        "bbox": {"start": [0, 0, 0], "stop": list(args.chunk)},
        "model": {"path": str(HERE / "rsunet.py"), "weights": str(HERE / "rsunet.safetensors"),
                  "input_patch": list(args.patch), "output_channels": 1,
                  "precision": args.precision},
        "inference": {"chunk": list(args.chunk), "patch_overlap": list(args.overlap),
                      "blend": "crop",
                      "batch_size": args.batch, "device": args.device},
        "storage_chunk": storage_chunk_for(args.chunk), "output_dtype": args.output_dtype,
        "downsample": {"mips": 0}})
    device = pick_device(args.device)
    model = Model(cfg.model, device)
    p = plan(cfg, model)
    create_layers(p)
    stage = InferenceStage(p, model)
    assert len(stage) == 1 and stage.read_box(0) == read
    window = stage.window
    chunk_input = model.normalize(image)
    starts = window.patches(chunk_input.shape[1:])
    pz, py, px = window.input_patch
    batches = [torch.stack([chunk_input[:, z:z + pz, y:y + py, x:x + px]
                            for z, y, x in starts[b:b + args.batch]])
               for b in range(0, len(starts), args.batch)]
    out_voxels = int(np.prod(args.chunk))

    def forward():
        for batch in batches:
            model(batch)

    def sliding_window():
        window(image)

    def end_to_end():
        run_task(stage, 0)

    end_to_end()                                      # warm-up: caches, allocator, lazy init
    t_fwd = timed(forward, device, args.repeat)
    t_win = timed(sliding_window, device, args.repeat)
    t_e2e = timed(end_to_end, device, args.repeat)
    fig = {
        "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, "
                   + (torch.cuda.get_device_name() if device.type == "cuda" else "CPU"),
        "torch": torch.__version__, "device": str(device), "precision": args.precision,
        "patch": args.patch, "overlap": args.overlap, "chunk": args.chunk, "batch": args.batch,
        "patches": len(starts),
        "forward_vox_per_s": out_voxels / t_fwd,
        "window_vox_per_s": out_voxels / t_win,
        "end_to_end_vox_per_s": out_voxels / t_e2e,
    }
    fig["window_over_forward"] = t_fwd / t_win
    fig["end_to_end_over_window"] = t_win / t_e2e
    print(f"machine     {fig['machine']}  torch {fig['torch']}  {device} {args.precision}")
    print(f"chunk {args.chunk}  patch {args.patch}  overlap {args.overlap}  "
          f"batch {args.batch}  ({len(starts)} patches)")
    for key, label in (("forward", "bare forward"), ("window", "SlidingWindow"),
                       ("end_to_end", "end to end")):
        print(f"{label:>14}: {fig[key + '_vox_per_s'] / 1e6:10.3f} Mvox/s")
    print(f"SlidingWindow / forward   = {fig['window_over_forward']:.3f}")
    print(f"end to end / SlidingWindow = {fig['end_to_end_over_window']:.3f}  (target >= 0.85)")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
