"""Objects and dollars per output teravoxel, as `voxflow plan` counts them, checked on runs.

1. A small run per mode (crop, overlap) and layout (unsharded, sharded) with the README's example geometry scaled down (3
   channels uint8, storage chunk 64x64x8, 3 mips; a pointwise model, so the CPU stages'
   time is what is measured): the objects it writes under the output layer and the
   temporary folder (`keep_temporary`) are counted and compared with the plan's count, and
   the blend and downsample workers' throughput is read from their logs (worker-seconds
   from `worker_started` to `worker_stopped`, one worker each), the figures behind
   `cost.throughput.blend` and `.downsample`.
2. The README's example config ("Running your own volume": chunk 1536x1536x192, patch
   256x256x20, overlap 64x64x4, 3 channels uint8, 3 mips) planned over one output
   teravoxel (an `info` of 16384 x 16384 x 3725 voxels, no data) in each mode and layout:
   objects per
   output teravoxel, and dollars per output teravoxel on an L4 Spot and an H100 Spot
   inference group at the throughputs given (default: 77 and 149 Mvox/s, issue 11's
   1.6 M-parameter RSUNet), with 16 GPU and 32 CPU workers (the README's Google Cloud
   example), which sets how long the partial sums are kept.
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
import torch

TERAVOXEL = (16384, 16384, 3725)           # 0.99999 x 10^12 voxels
README = {"model": {"input_patch": [256, 256, 20], "output_channels": 3, "precision": "bf16"},
          "inference": {"chunk": [1536, 1536, 192], "patch_overlap": [64, 64, 4]},
          "output_dtype": "uint8", "downsample": {"mips": 3, "factor": [2, 2, 1]},
          "workers": {"inference": "local://16", "blend": "local://32",
                      "downsample": "local://32"}}
GROUPS = {"L4 Spot (g2-standard-8)": 0.34, "H100 Spot (a3-highgpu-1g)": 2.72}


class Pointwise3(torch.nn.Module):
    """1x1x1 conv to 3 channels + sigmoid: next to no compute, so the run is I/O-bound."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def files(path: Path) -> int:
    return sum(len(f) for _, _, f in os.walk(path)) if path.exists() else 0


def small_run(root: Path, mode: str, sharding: str) -> dict:
    from voxflow import cost
    from voxflow.pipeline import plan
    from voxflow.runner import run
    from voxflow.volume import Volume
    from voxflow.config import parse_config
    name = f"out-{mode}-{sharding}"
    data = {"input": str(root / "img"), "output": str(root / name), "sharding": sharding,
            "model": {"path": str(root / "m.pt"), "input_patch": [64, 64, 8],
                      "output_channels": 3},
            "inference": {"chunk": [256, 256, 32], "patch_overlap": [16, 16, 2],
                          "blend": mode, "keep_temporary": True},
            "output_dtype": "uint8", "downsample": {"mips": 3, "factor": [2, 2, 1]},
            "queue": f"sqlite://{root}/q.db",
            "workers": {"inference": "local://0", "blend": "local://0",
                        "downsample": "local://0"}}
    config = parse_config(data)
    planned = cost.bill(plan(config))
    # the same config over a teravoxel: the plan's extrapolation
    tera = cost.bill(plan(parse_config({**data, "input": str(root / "tera"),
                                        "output": str(root / f"tera-{name}")})))
    t0 = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - t0
    out = Volume(config.output)
    written = [files(root / name / s["key"]) for s in out.info["scales"]]
    temporary = files(root / f"{name}.voxflow-tmp")
    worked = cost.worker_sessions(Path(os.environ["VOXFLOW_HOME"]) / "logs" / summary.run)
    p = plan(config, check_model=False)
    fig = {"mode": mode, "sharding": sharding, "voxels": p.bbox.size, "seconds": wall,
           "written": written, "temporary": temporary,
           "planned": planned["objects_written"]["output"],
           "planned_temporary": planned["objects_written"]["temporary"],
           "per_tvox_measured": (sum(written) + temporary) / p.bbox.size * 1e12,
           "per_tvox_extrapolated": (sum(tera["objects_written"]["output"])
                                     + tera["objects_written"]["temporary"])
           / np.prod(TERAVOXEL) * 1e12,
           "downsample_vox_per_s": sum(ps.grid.bbox.size for ps in p.downsample)
           / worked["downsample"]["seconds"]}         # a worker's whole time, idle tail too
    if mode == "overlap":
        blended = p.bbox.size if sharding == "on" else p.grid.band_voxels()
        fig["blend_vox_per_s"] = blended / worked["blend"]["seconds"]
    return fig


def teravoxel_bill(root: Path, mode: str, sharding: str, throughput: float,
                   gpu_hour: float) -> dict:
    from voxflow import cost
    from voxflow.config import parse_config
    from voxflow.pipeline import plan
    data = {**README, "input": str(root / "tera"), "sharding": sharding,
            "output": str(root / f"tera-out-{mode}-{sharding}"),
            "model": {**README["model"], "path": str(root / "m3.pt")},
            "inference": {**README["inference"], "blend": mode},
            "cost": {"throughput": {"inference": throughput},
                     "prices": {"gpu_hour": gpu_hour}}}
    config = parse_config(data)
    b = cost.bill(plan(config))
    tera = np.prod(TERAVOXEL) / 1e12
    per = lambda n: n / tera                                       # noqa: E731
    return {"objects_per_tvox": {"output": per(sum(b["objects_written"]["output"])),
                                 "mip0": per(b["objects_written"]["output"][0]),
                                 "temporary": per(b["objects_written"]["temporary"]),
                                 "queue": per(b["objects_written"]["queue"])},
            "reads_per_tvox": per(sum(b["objects_read"].values())),
            "gpu_hours_per_tvox": per(b["worker_hours"]["inference"]),
            "dollars_per_tvox": b["dollars"]["per_output_teravoxel"],
            "dollars": {k: per(v) for k, v in b["dollars"].items()
                        if k not in ("total", "per_output_teravoxel")},
            "temporary_hours": b["temporary_hours"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[768, 768, 96],
                    help="small run's volume, x y z")
    ap.add_argument("--l4", type=float, default=77e6, help="L4 throughput, vox/s")
    ap.add_argument("--h100", type=float, default=149e6, help="H100 throughput, vox/s")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="voxflow-bench-cost-"))
    os.environ["VOXFLOW_HOME"] = str(root / "home")
    from voxflow.volume import Volume
    x, y, z = args.shape
    img = (np.random.default_rng(0).random((1, z, y, x)) * 255).astype(np.uint8)
    Volume.create(f"file://{root}/img", num_channels=1, dtype="uint8", resolution=(8, 8, 40),
                  voxel_offset=(0, 0, 0), size=args.shape, chunk=(64, 64, 8)).write(
        Volume(f"file://{root}/img").bounds, img)
    Volume.create(f"file://{root}/tera", num_channels=1, dtype="uint8", resolution=(8, 8, 40),
                  voxel_offset=(0, 0, 0), size=TERAVOXEL, chunk=(256, 256, 32))
    torch.jit.script(Pointwise3().eval()).save(str(root / "m.pt"))
    torch.jit.script(Pointwise3().eval()).save(str(root / "m3.pt"))
    figs = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "small": [], "teravoxel": {}}
    for mode, sharding in [(m, sh) for sh in ("off", "on") for m in ("crop", "overlap")]:
        s = small_run(root, mode, sharding)
        figs["small"].append(s)
        print(f"small {mode} sharding {sharding}: {s['voxels']} voxels in {s['seconds']:.1f} s; objects written "
              f"by mip {s['written']} (plan {s['planned']}), temporary {s['temporary']} "
              f"(plan {s['planned_temporary']}): {s['per_tvox_measured']:,.0f} objects per "
              f"output Tvox, {s['per_tvox_extrapolated']:,.0f} planned for a teravoxel of "
              f"this config; downsample "
              f"{s['downsample_vox_per_s'] / 1e6:.2f} Mvox/s"
              + (f", blend {s['blend_vox_per_s'] / 1e6:.2f} Mvox/s"
                 if "blend_vox_per_s" in s else ""))
        for (group, price), thr in zip(GROUPS.items(), (args.l4, args.h100)):
            t = teravoxel_bill(root, mode, sharding, thr, price)
            figs["teravoxel"][f"{mode} sharding {sharding} {group}"] = t
            o = t["objects_per_tvox"]
            print(f"teravoxel {mode:>7} sharding {sharding:<3} {group:<26} {thr / 1e6:.0f} Mvox/s: objects written "
                  f"per output Tvox {o['output']:,.0f} output ({o['mip0']:,.0f} at mip 0) + "
                  f"{o['temporary']:,.0f} temporary + {o['queue']:,.0f} queue; "
                  f"{t['gpu_hours_per_tvox']:.2f} GPU-h; ${t['dollars_per_tvox']:,.2f} per "
                  f"output Tvox ({', '.join(f'{k} {v:,.2f}' for k, v in t['dollars'].items())})")
    if args.json:
        args.json.write_text(json.dumps(figs, indent=2))


if __name__ == "__main__":
    main()
