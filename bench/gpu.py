"""GPU throughput, one card, one run: bare forward, SlidingWindow, end to end, chunkflow-style.

All in output voxels per second, same model (an RSUNet of the demo's design, random
weights, widths 28-80: ~1.6 M parameters, the anchor's size), same chunk:
  forward        every patch of one chunk's lattice through the model (batched, no blending)
  window         SlidingWindow over one chunk already on the device (forward + weights +
                 normalisation, all on the device)
  end to end     `voxflow run` (crop mode, the pipelined worker in-process: read-ahead,
                 compute, write-behind) over `--tasks` chunks of a file:// layer, uint8
                 output: the inference stage's wall time
  chunkflow      chunkflow's way: fp32, batch 1, each patch's output copied to the host and
                 blended there with numpy
Targets (issue 12): end to end >= 0.9 x window; end to end >= 4 x chunkflow-style.
Run beside ../shared/anchors/gpu_anchor.py in one command so the ratios share a card:
  SKIP_COMPILE=1 BUDGET_S=200 python .anchors/gpu_anchor.py && python bench/gpu.py
Smoke test on a CPU: python bench/gpu.py --device cpu --patch 32 32 8 --chunk 64 64 16 \
  --overlap 8 8 2 --widths 4 8 --tasks 2 --precision fp32 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import storage_chunk_for, sync, timed  # noqa: E402  (bench/inference.py)

from voxflow.config import parse_config  # noqa: E402
from voxflow.demo.run import HERE  # noqa: E402
from voxflow.geometry import Box  # noqa: E402
from voxflow.lattice import patch_weights  # noqa: E402
from voxflow.models import Model, pick_device  # noqa: E402
from voxflow.runner import run  # noqa: E402
from voxflow.volume import Volume  # noqa: E402

MODEL = """import sys
sys.path.insert(0, {here!r})
import torch
from rsunet import RSUNet


def build_model():
    torch.manual_seed(0)
    return RSUNet(widths={widths!r})
"""


def chunkflow_style(model: Model, image: np.ndarray, window) -> float:
    """Seconds for one chunk the chunkflow way: batch 1, fp32, blend on the host."""
    x = model.normalize(image)
    oz, oy, ox = window.output_patch
    pz, py, px = window.input_patch
    weight = patch_weights(window.output_patch).astype(np.float32)
    out_shape = window.output_shape(x.shape[1:])
    t0 = time.perf_counter()
    acc = np.zeros((1, *out_shape), np.float32)
    norm = np.zeros(out_shape, np.float32)
    for z, y, xx in window.patches(x.shape[1:]):
        pred = model(x[None, :, z:z + pz, y:y + py, xx:xx + px])[0].cpu().numpy()
        acc[:, z:z + oz, y:y + oy, xx:xx + ox] += pred * weight
        norm[z:z + oz, y:y + oy, xx:xx + ox] += weight
    acc /= norm
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patch", type=int, nargs=3, default=[256, 256, 20])
    ap.add_argument("--overlap", type=int, nargs=3, default=[32, 32, 4])
    ap.add_argument("--chunk", type=int, nargs=3, default=[1024, 1024, 84])
    ap.add_argument("--tasks", type=int, default=4, help="chunks end to end (along x)")
    ap.add_argument("--widths", type=int, nargs="+", default=[28, 36, 48, 64, 80])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="voxflow-gpu-"))
    os.environ["VOXFLOW_HOME"] = str(tmp / "home")      # the run's queue and logs
    (tmp / "model.py").write_text(MODEL.format(here=str(HERE), widths=tuple(args.widths)))
    margin = list(args.overlap)
    bbox = Box([0, 0, 0], [args.chunk[0] * args.tasks, *args.chunk[1:]])
    read = bbox.grow(margin)
    rng = np.random.default_rng(0)
    vol = Volume.create(f"file://{tmp}/image", num_channels=1, dtype="uint8",
                        resolution=(8, 8, 40), voxel_offset=list(read.start), size=read.shape,
                        chunk=storage_chunk_for(args.chunk))
    vol.write(read, rng.integers(0, 256, (1, *reversed(read.shape)), dtype=np.uint8))
    raw = {"input": f"file://{tmp}/image", "output": f"file://{tmp}/out",
           "bbox": {"start": list(bbox.start), "stop": list(bbox.stop)},
           "model": {"path": str(tmp / "model.py"), "input_patch": list(args.patch),
                     "output_channels": 1, "precision": args.precision},
           "inference": {"chunk": list(args.chunk), "patch_overlap": list(args.overlap),
                         "blend": "crop", "batch_size": args.batch, "device": args.device},
           "storage_chunk": storage_chunk_for(args.chunk), "output_dtype": "uint8",
           "downsample": {"mips": 0}, "queue": {"url": f"sqlite://{tmp}/q.db"},
           "workers": {k: "local://0" for k in ("inference", "blend", "downsample")}}
    cfg = parse_config(raw)
    device = pick_device(args.device)
    model = Model(cfg.model, device, args.batch)
    from voxflow.inference import SlidingWindow
    window = SlidingWindow(model, args.patch, None, args.overlap, args.batch)
    one = Box([0, 0, 0], args.chunk).grow(margin)
    image = vol.read(one)
    x = model.normalize(image)
    starts = window.patches(x.shape[1:])
    pz, py, px = window.input_patch
    batches = [torch.stack([x[:, z:z + pz, y:y + py, xx:xx + px]
                            for z, y, xx in starts[b:b + args.batch]])
               for b in range(0, len(starts), args.batch)]
    chunk_vox = int(np.prod(args.chunk))
    window(x)                                           # warm-up
    t_fwd = timed(lambda: [model(b) for b in batches], device, args.repeat)
    t_win = timed(lambda: window(x), device, args.repeat)
    summary = run(cfg)
    t_e2e = summary.stages[0].seconds
    fp32 = Model(parse_config({**raw, "model": {**raw["model"], "precision": "fp32"}}).model,
                 device, 1)
    sync(device)
    t_cf = chunkflow_style(fp32, image, window)
    fig = {"machine": f"{platform.node()} {platform.machine()}, "
                      + (torch.cuda.get_device_name() if device.type == "cuda" else "CPU"),
           "torch": torch.__version__, "precision": args.precision, "patch": args.patch,
           "overlap": args.overlap, "chunk": args.chunk, "tasks": args.tasks,
           "batch": args.batch, "patches_per_chunk": len(starts),
           "parameters": sum(p.numel() for p in fp32._net.parameters()),
           "forward_mvox_s": chunk_vox / t_fwd / 1e6, "window_mvox_s": chunk_vox / t_win / 1e6,
           "end_to_end_mvox_s": chunk_vox * args.tasks / t_e2e / 1e6,
           "chunkflow_style_mvox_s": chunk_vox / t_cf / 1e6}
    fig["end_to_end_over_window"] = fig["end_to_end_mvox_s"] / fig["window_mvox_s"]
    fig["end_to_end_over_chunkflow"] = fig["end_to_end_mvox_s"] / fig["chunkflow_style_mvox_s"]
    print(f"{fig['machine']}  torch {fig['torch']}  {args.precision}  batch {args.batch}  "
          f"{fig['parameters'] / 1e6:.2f} M parameters")
    print(f"chunk {args.chunk} x {args.tasks}  patch {args.patch}  overlap {args.overlap}  "
          f"({len(starts)} patches per chunk)")
    for key, label in (("forward", "bare forward"), ("window", "SlidingWindow"),
                       ("end_to_end", "end to end"), ("chunkflow_style", "chunkflow-style")):
        print(f"{label:>16}: {fig[key + '_mvox_s']:10.3f} Mvox/s")
    print(f"end to end / SlidingWindow   = {fig['end_to_end_over_window']:.3f}  (target >= 0.9)")
    print(f"end to end / chunkflow-style = {fig['end_to_end_over_chunkflow']:.2f}  (target >= 4)")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
