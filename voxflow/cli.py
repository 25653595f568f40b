"""The `voxflow` command: validate, plan, run, demo."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

from .config import ConfigError, load_config


class TqdmReporter:
    """One progress bar per stage: done / total, rate, ETA."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = None

    def start(self, stage: str, total: int) -> None:
        from tqdm import tqdm
        self._bar = tqdm(total=total, desc=f"{stage:>12}", unit="task", disable=not self.enabled,
                         file=sys.stderr, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def finish(self) -> None:
        self._bar.close()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _plan_report(p) -> dict:
    cfg = p.config
    # read boxes differ only at the edges: estimate from a sample (exact for small grids)
    sample = _sample(len(p.grid))
    read_voxels = sum(p.grid.read_box(i).size for i in sample) / len(sample) * len(p.grid)
    in_voxel_bytes = p.input_channels * np.dtype(p.input_dtype).itemsize
    stages = [{"stage": "inference", "tasks": len(p.grid),
               "voxels": p.bbox.size, "bytes_read": int(read_voxels * in_voxel_bytes),
               "bytes_written": p.bbox.size * p.output_voxel_bytes}]
    for i, ps in enumerate(p.downsample):
        vox = ps.grid.bbox.size
        written = sum(vox // (cfg.downsample.factor[0] * cfg.downsample.factor[1]
                              * cfg.downsample.factor[2]) ** k for k in range(1, ps.mips + 1))
        stages.append({"stage": f"downsample-{i}", "tasks": len(ps.grid),
                       "mips": [ps.source_mip + 1, ps.source_mip + ps.mips],
                       "voxels": vox, "bytes_read": vox * p.output_voxel_bytes,
                       "bytes_written": written * p.output_voxel_bytes})
    return {"input": cfg.input, "output": cfg.output, "mip": cfg.mip,
            "bbox": {"start": list(p.bbox.start), "stop": list(p.bbox.stop)},
            "chunk_grid": list(p.grid.counts), "stages": stages}


def _sample(n: int, k: int = 4096) -> range:
    return range(0, n, max(1, n // k))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="voxflow", description="ConvNet inference over "
                                     "large 3D images, chunk by chunk.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("validate", "check a run config (reads the input, loads the model)"),
                       ("plan", "show task counts, voxels and bytes per stage"),
                       ("run", "run all stages in this process")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="run config (YAML)")
        if name == "plan":
            cmd.add_argument("--json", action="store_true", help="print JSON")
        if name == "run":
            cmd.add_argument("--quiet", action="store_true", help="no progress bars")
    demo = sub.add_parser("demo", help="synthetic EM volume -> boundary map + pyramid + PNG")
    demo.add_argument("--dir", default="demo-output", help="where to write (default: "
                      "./demo-output)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("config-doc", help="print the run-config reference (Markdown)")
    view = sub.add_parser("view", help="serve layers to Neuroglancer on 127.0.0.1")
    view.add_argument("layers", nargs="+", help="precomputed layers (local paths or URLs)")
    view.add_argument("--port", type=int, default=1337)
    args = parser.parse_args(argv)

    from . import pipeline
    try:
        if args.command == "demo":
            from .demo.run import run_demo
            run_demo(args.dir, reporter=TqdmReporter(not args.quiet))
            return 0
        if args.command == "config-doc":
            from .configdoc import config_reference
            print(config_reference(), end="")
            return 0
        if args.command == "view":
            from .view import make_server
            server, link = make_server(args.layers, args.port)
            print(f"serving on http://127.0.0.1:{server.server_address[1]} (Ctrl-C stops)")
            print(f"open in a browser on this machine:\n{link}")
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
            return 0
        config = load_config(args.config)
        if args.command == "validate":
            pipeline.plan(config)
            print(f"ok: {args.config}")
        elif args.command == "plan":
            report = _plan_report(pipeline.plan(config))
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                _print_plan(report)
        elif args.command == "run":
            summary = pipeline.run(config, TqdmReporter(not args.quiet))
            for s in summary.stages:
                print(f"{s.name}: {s.tasks} tasks in {s.seconds:.1f} s")
            print(f"done: {summary.voxels} voxels -> {summary.output}")
    except ConfigError as exc:
        print(f"voxflow: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_plan(report: dict) -> None:
    print(f"input   {report['input']} (mip {report['mip']})")
    print(f"output  {report['output']}")
    print(f"bbox    {report['bbox']['start']} .. {report['bbox']['stop']}, "
          f"chunk grid {report['chunk_grid']}")
    for s in report["stages"]:
        extra = f"  mips {s['mips'][0]}..{s['mips'][1]}" if "mips" in s else ""
        print(f"{s['stage']:>14}: {s['tasks']:>9} tasks  {s['voxels']:>14} voxels  "
              f"read {_human_bytes(s['bytes_read']):>10}  "
              f"write {_human_bytes(s['bytes_written']):>10}{extra}")


if __name__ == "__main__":
    sys.exit(main())
