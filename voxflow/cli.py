"""The `voxflow` command: validate, plan, run, demo, and the references (config-doc, ops)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

from .config import ConfigError
from .pipeline_file import load_pipeline


class TqdmReporter:
    """One progress bar per stage: done / total, failed, rate, ETA."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = None

    def begin(self, run: str, queue: str) -> None:
        print(f"run {run} (queue {queue}; `voxflow status {run}` shows it)", file=sys.stderr)

    def start(self, stage: str, total: int, skipped: int) -> None:
        from tqdm import tqdm
        self._bar = tqdm(total=total, initial=skipped, desc=f"{stage:>12}", unit="task",
                         disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)
        self._resumed, self._skipped = skipped, 0
        self._bar.set_postfix(failed=0, resumed=skipped, skipped=0)

    def skip(self, count: int) -> None:
        """Tasks not run: outside the mask, or empty inputs the workers skipped."""
        self._skipped = count

    def update(self, done: int, dead: int) -> None:
        if done != self._bar.n:
            self._bar.set_postfix(failed=dead, resumed=self._resumed, skipped=self._skipped,
                                  refresh=False)
            self._bar.update(done - self._bar.n)

    def finish(self) -> None:
        self._bar.close()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _plan_report(p) -> dict:
    """Tasks, voxels and bytes per stage, and the bill (`voxflow.cost`): all exact, by
    per-axis arithmetic over the lazy grids (a petavoxel plans in well under a second)."""
    from .grids import OverlapGrid
    from .cost import bill, read_voxels
    cfg = p.config
    in_voxel_bytes = p.input_channels * np.dtype(p.input_dtype).itemsize
    out_bytes = p.bbox.size * p.output_voxel_bytes
    stages = [{"stage": "inference", "tasks": len(p.grid) - p.masked, "skipped": p.masked,
               "voxels": p.bbox.size,
               "bytes_read": read_voxels(p) * in_voxel_bytes, "bytes_written": out_bytes}]
    blend = {"mode": "crop"}
    if isinstance(p.grid, OverlapGrid):
        band = p.grid.band_voxels()
        temp = p.grid.temporary_voxels() * cfg.model.output_channels * 4     # float32
        stages[0].update(patches=p.grid.patch_count(), bytes_temporary=temp,
                         bytes_written=(p.bbox.size - band) * p.output_voxel_bytes + temp)
        if len(p.grid.bands):
            stages.append({"stage": "blend", "tasks": len(p.grid.bands), "voxels": band,
                           "bytes_read": temp, "bytes_written": band * p.output_voxel_bytes})
        blend = {"mode": "overlap", "temporary_bytes": temp, "output_bytes": out_bytes,
                 "temporary_ratio": round(temp / out_bytes, 4)}
    seg = p.segmentation
    if seg is not None:
        from .stages import stage_grid
        out_read = p.bbox.size * p.output_voxel_bytes
        ids = p.bbox.size * np.dtype(cfg.segmentation.dtype).itemsize
        for name, read, written in (("label", out_read, 0), ("pairs", 0, 0), ("merge", 0, 0),
                                    ("relabel", out_read, ids)):
            stages.append({"stage": f"segmentation-{name}",
                           "tasks": len(stage_grid(p, f"segmentation-{name}")),
                           "voxels": p.bbox.size, "bytes_read": read, "bytes_written": written})
    pyramids = [("downsample", ps, p.output_voxel_bytes) for ps in p.downsample]
    if seg is not None:
        pyramids += [("downsample-segmentation", ps, np.dtype(cfg.segmentation.dtype).itemsize)
                     for ps in seg.downsample]
    numbers: dict[str, int] = {}
    for prefix, ps, voxel_bytes in pyramids:
        vox = ps.grid.bbox.size
        written = sum(vox // (cfg.downsample.factor[0] * cfg.downsample.factor[1]
                              * cfg.downsample.factor[2]) ** k for k in range(1, ps.mips + 1))
        i = numbers[prefix] = numbers.get(prefix, -1) + 1
        stages.append({"stage": f"{prefix}-{i}", "tasks": len(ps.grid),
                       "mips": [ps.source_mip + 1, ps.source_mip + ps.mips],
                       "voxels": vox, "bytes_read": vox * voxel_bytes,
                       "bytes_written": written * voxel_bytes})
    return {"input": cfg.input, "output": cfg.output, "mip": cfg.mip,
            "bbox": {"start": list(p.bbox.start), "stop": list(p.bbox.stop)},
            "chunk_grid": list(p.grid.counts), "blend": blend, "stages": stages,
            "bill": bill(p)}


def entry() -> None:
    """The `voxflow` command: `main`, then exit without the interpreter's teardown (with
    torch and cloud-volume loaded it takes 0.5-1.5 s, a third of a small run)."""
    import os
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="voxflow", description="ConvNet inference over "
                                     "large 3D images, chunk by chunk.")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check run configs or pipeline files (reads "
                              "the input, loads the model)")
    validate.add_argument("configs", nargs="+", metavar="config",
                          help="run config or pipeline file (YAML), e.g. dags/pipelines/*.yaml")
    for name, text in (("plan", "show tasks, voxels, bytes, objects and the bill per stage"),
                       ("run", "run all stages in this process"),
                       ("bench-model", "measure the model's inference throughput on one "
                        "chunk of the input, on this machine's device")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="run config or pipeline file (YAML)")
        if name in ("plan", "bench-model"):
            cmd.add_argument("--json", action="store_true", help="print JSON")
        if name == "bench-model":
            cmd.add_argument("--seconds", type=float, default=20.0,
                             help="time to spend computing patches (default 20)")
        if name == "run":
            cmd.add_argument("--quiet", action="store_true", help="no progress bars")
            cmd.add_argument("--run-id", help="default: the output's name and a digest of "
                             "what determines its bytes — model file, input, parameters — so "
                             "the same content resumes")
    demo = sub.add_parser("demo", help="synthetic EM volume -> boundary map + pyramid + PNG")
    demo.add_argument("--dir", default="demo-output", help="where to write (default: "
                      "./demo-output)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("config-doc", help="print the run-config reference (Markdown)")
    ops = sub.add_parser("ops", help="list the chunk operations a run can compose (mask, "
                         "augment, postprocess ops, segmentation, ...) with their parameters")
    ops.add_argument("--markdown", action="store_true", help="print docs/ops.md instead")
    worker = sub.add_parser("worker", help="serve a queue's tasks until stopped or idle")
    worker.add_argument("queue", help="queue URL, e.g. sqlite:///path/queue.db")
    worker.add_argument("--kind", "--stage", action="append", dest="kinds",
                        help="serve only this kind of stage (inference, blend, segmentation, "
                        "downsample; downsample-1 means downsample); repeatable; default: all")
    worker.add_argument("--worker-id")
    worker.add_argument("--lease-seconds", type=float, default=60.0)
    worker.add_argument("--exit-when-idle", type=float, metavar="SECONDS")
    worker.add_argument("--threads", type=int, help="torch threads")
    worker.add_argument("--no-prefetch", action="store_true")
    worker.add_argument("--run", action="append", dest="runs", metavar="RUN",
                        help="serve only this run (repeatable); the worker exits once every "
                        "named run has ended or its driver went quiet")
    worker.add_argument("--leave-group", action="store_true",
                        help="on a Compute Engine VM: leave its managed instance group when "
                        "the named runs have ended (the group shrinks to zero by itself)")
    for name, text in (("status", "a run's tasks per stage, and its dead letters"),
                       ("retry-dead", "give a run's dead tasks new attempts")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run", help="run id (printed by voxflow run)")
        cmd.add_argument("--queue", help="queue URL (default: the embedded queue)")
    view = sub.add_parser("view", help="serve layers to Neuroglancer on 127.0.0.1")
    view.add_argument("layers", nargs="+", help="precomputed layers (local paths or URLs)")
    view.add_argument("--port", type=int, default=1337, help="default 1337: the port of the "
                      "links the Airflow UI shows")
    args = parser.parse_args(argv)

    if args.command in ("worker", "run", "demo", "bench-model"):     # they run the model
        from .worker import keep_freed_memory
        keep_freed_memory()
    try:
        if args.command == "demo":
            from .demo.run import run_demo
            run_demo(args.dir, reporter=TqdmReporter(not args.quiet))
            return 0
        if args.command == "config-doc":
            from .configdoc import config_reference
            print(config_reference(), end="")
            return 0
        if args.command == "ops":
            from .ops import ops_markdown, ops_text
            print(ops_markdown() if args.markdown else ops_text(), end="")
            return 0
        if args.command == "worker":
            return _worker(args)
        if args.command in ("status", "retry-dead"):
            return _status(args)
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
        if args.command == "validate":
            return _validate(args.configs)
        config = load_pipeline(args.config)[1]
        if args.command == "plan":
            from .pipeline import plan
            report = _plan_report(plan(config))
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                _print_plan(report)
        elif args.command == "bench-model":
            _bench_model(config, args)
        elif args.command == "run":
            return _run(config, args)
    except ConfigError as exc:
        print(f"voxflow: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(config, args) -> int:
    """`voxflow run`. A local inference group starts before anything heavy is imported, so
    its workers' start (imports, torch) overlaps the driver's (imports, plan): a small
    run's start-up is about one process start, not two in a row. A run that fails to plan
    stops them again."""
    from .groups import open_stage_group
    from .identity import run_identity
    started, run_id = {}, args.run_id
    if all(u.startswith("local://") for u in config.workers.inference.urls):
        try:
            run_id = run_id or run_identity(config).run_id(config.output)
        except Exception:              # plan says what is wrong, naming the field
            pass
        else:
            group = open_stage_group(config, "inference", run_id)
            if group is not None:
                group.resize(max(1, config.workers.inference.min), set())
                started["inference"] = group
    try:
        from .runner import RunFailed, run
        try:
            summary = run(config, TqdmReporter(not args.quiet), run_id, started=started)
        except RunFailed as exc:
            print(f"voxflow: error: {exc}", file=sys.stderr)
            return 1
    finally:
        for group in started.values():            # not taken over by a stage
            group.close()
    for s in summary.stages:
        skipped = f", {s.masked} outside the mask" if s.masked else ""
        skipped += f", {s.empty} skipped as empty" if s.empty else ""
        print(f"{s.name}: {s.tasks} tasks ({s.skipped} already done{skipped}) in "
              f"{s.seconds:.1f} s")
    print(f"done: {summary.voxels} voxels -> {summary.output} (model {summary.model_digest})")
    print("\n".join(spent_lines(summary.spent, summary.bill)))
    return 0


def _bench_model(config, args) -> None:
    from .cost import measure_inference
    m = measure_inference(config, args.seconds)
    if args.json:
        print(json.dumps(m, indent=2))
        return
    print(f"inference throughput: {m['throughput'] / 1e6:.4g} Mvox/s per worker "
          f"({m['patches']} patches in {m['seconds']:.1f} s on {m['device']}, "
          f"{m['precision']}; a whole chunk is {m['chunk_patches']} patches)")
    if m["compile_seconds"] is not None:
        print(f"compile: {m['compile_seconds']:.1f} s (first forward; not in the throughput)")
    print(f"put it in the config:  cost: {{throughput: {{inference: {m['throughput']:.4g}}}}}")


def _validate(paths: Sequence[str]) -> int:
    """Each file on its own: one bad file is reported and the others still checked."""
    from .pipeline import plan
    bad = 0
    for path in paths:
        try:
            plan(load_pipeline(path)[1])
            print(f"ok: {path}")
        except ConfigError as exc:
            where = f"{path}: " if len(paths) > 1 else ""
            print(f"voxflow: error: {where}{exc}", file=sys.stderr)
            bad += 1
    return 2 if bad else 0


def _worker(args) -> int:
    """A worker process: SIGTERM/SIGINT release the held leases and exit within a second."""
    import os

    from .queues import open_queue
    from .stages import StageCache
    from .worker import Worker, stop_on_signals
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    queue = open_queue(args.queue, lease_seconds=args.lease_seconds)
    from .stages import stage_kind
    kinds = sorted({stage_kind(k) for k in args.kinds}) if args.kinds else None
    stages = StageCache(queue)
    worker = Worker(queue, stages, kinds, args.worker_id, args.lease_seconds,
                    prefetch=not args.no_prefetch, runs=args.runs, on_vm=args.leave_group)
    stages.log = worker.log                     # model_loaded: warm-up and compile times
    stop_on_signals(worker.stop)
    worker.run(args.exit_when_idle)
    code = 0
    if args.leave_group and worker.runs_ended():
        # its run is over: the VM leaves its group (which shrinks to zero by itself); if it
        # cannot, exit non-zero so that systemd starts the worker again and it tries again
        from .groups.gce import leave_group
        try:
            code = 0 if leave_group() else 1
        except Exception as exc:
            worker.log("leave_group_failed", "error", error=str(exc))
            code = 1
    sys.stderr.flush()
    os._exit(code)       # do not wait for a compute thread that a stop left running


def _status(args) -> int:
    from .config import QueueConfig
    from .queues import open_queue
    queue = open_queue(args.queue or QueueConfig().url)
    if args.command == "retry-dead":
        print(f"{queue.retry_dead(args.run)} dead task(s) of {args.run} are pending again; "
              "run the config again to process them")
        return 0
    stats = queue.stats(args.run)
    state = queue.run_state(args.run)
    if not stats and state is None:
        print(f"voxflow: error: run: no run {args.run!r} in {queue.url}", file=sys.stderr)
        return 2
    if state is not None:
        print(f"run {args.run}: {state.state}, model {state.meta.get('model_digest', '?')}")
    from .progress import stage_order
    width = max(14, *map(len, stats or [""]))
    print(f"{'stage':>{width}} {'total':>9} {'pending':>9} {'leased':>9} {'done':>9} "
          f"{'dead':>9} {'skipped':>9}")
    for name in sorted(stats, key=stage_order):    # skipped: done without running (empty)
        s = stats[name]
        print(f"{name:>{width}} {s.total:>9} {s.pending:>9} {s.leased:>9} {s.done:>9} "
              f"{s.dead:>9} {s.skipped:>9}")
    for d in queue.dead_letters(args.run, limit=20):
        print(f"dead: {d.stage} #{d.index} after {d.attempts} attempt(s): {d.headline}")
    return 0


def _print_plan(report: dict) -> None:
    print(f"input   {report['input']} (mip {report['mip']})")
    print(f"output  {report['output']}")
    print(f"bbox    {report['bbox']['start']} .. {report['bbox']['stop']}, "
          f"chunk grid {report['chunk_grid']}")
    blend = report["blend"]
    if blend["mode"] == "overlap":
        print(f"blend   overlap: temporary {_human_bytes(blend['temporary_bytes'])}, "
              f"{100 * blend['temporary_ratio']:.1f}% of the output's "
              f"{_human_bytes(blend['output_bytes'])}")
    else:
        print("blend   crop")
    width = max(14, *(len(s["stage"]) for s in report["stages"]))
    for s in report["stages"]:
        extra = f"  mips {s['mips'][0]}..{s['mips'][1]}" if "mips" in s else ""
        if s.get("skipped"):
            extra += f"  ({s['skipped']} tasks outside the mask skipped)"
        print(f"{s['stage']:>{width}}: {s['tasks']:>9} tasks  {s['voxels']:>14} voxels  "
              f"read {_human_bytes(s['bytes_read']):>10}  "
              f"write {_human_bytes(s['bytes_written']):>10}{extra}")
    print("\n".join(bill_lines(report["bill"])))


def bill_lines(b: dict) -> list[str]:
    """The bill (`voxflow.cost.bill`) as text: what `voxflow plan` prints and the Airflow plan
    task logs."""
    d, w, r = b["dollars"], b["objects_written"], b["objects_read"]
    lines = [f"cost    as on Google Cloud (Spot VMs, Cloud Storage, Pub/Sub) at cost.prices of "
             f"{b['prices_date']}"]
    if b.get("skipped", {}).get("inference"):
        lines.append(f"{'skipped':>14}: {b['skipped']['inference']:>14,} inference tasks "
                     "outside the mask (not in the tasks, worker-hours or messages below)")
    for kind, hours in b["worker_hours"].items():
        unit = "GPU" if kind == "inference" else "CPU"
        lines.append(f"{kind:>14}: {hours:>14,.1f} {unit} worker-hours at "
                     f"{b['throughput'][kind] / 1e6:g} Mvox/s per worker  "
                     f"${d[kind + '_workers']:,.2f}")
    mips = ", ".join(f"{n:,}" for n in w["output"])
    seg = w.get("segmentation") or []
    seg_w = f"; segmentation by mip {', '.join(f'{n:,}' for n in seg)}" if seg else ""
    seg_r = f"; segmentation {r['segmentation']:,}" if seg else ""
    stored = b["bytes_stored"]
    seg_s = f", segmentation {_human_bytes(sum(stored['segmentation']))}" if seg else ""
    lines += [
        f"{'writes':>14}: {sum(w['output']) + sum(seg) + w['temporary'] + w['queue']:>14,} "
        f"objects (output by mip {mips}{seg_w}; temporary {w['temporary']:,}; queue "
        f"{w['queue']:,})  ${d['object_writes']:,.2f}",
        f"{'reads':>14}: {sum(r.values()):>14,} objects (input {r['input']:,}; output "
        f"{r['output']:,}{seg_r}; temporary {r['temporary']:,}; queue {r['queue']:,})  "
        f"${d['object_reads']:,.2f}",
        f"{'messages':>14}: {b['messages']['count']:>14,} Pub/Sub messages, "
        f"{_human_bytes(b['messages']['billed_bytes'])} billed  ${d['pubsub']:,.2f}",
        f"{'stored':>14}: output {_human_bytes(sum(stored['output']))}{seg_s} "
        f"(${d['output_storage_per_month']:,.2f} per month kept); temporary "
        f"{_human_bytes(b['bytes_stored']['temporary'])} for about "
        f"{b['temporary_hours']:,.0f} h  ${d['temporary_storage']:,.2f}",
        f"{'total':>14}: ${d['total']:,.2f} (${d['per_output_teravoxel']:,.2f} per output "
        "teravoxel), then the output's storage"]
    return lines


def spent_lines(spent: dict, bill: dict) -> list[str]:
    """What a run used (`voxflow.cost.spent`) beside what plan estimated."""
    lines = []
    for kind, w in spent["workers"].items():
        planned = bill["worker_hours"].get(kind)
        if planned is None and not w.get("measured"):
            continue
        est = f" (plan: {planned:.4g} h)" if planned is not None else ""
        if w.get("measured"):
            lines.append(f"spent   {kind}: {w['hours']:.4g} worker-hours in {w['workers']} "
                         f"worker(s), {w['busy_hours']:.4g} h busy, "
                         f"${w['dollars']:.4g}{est}")
        else:
            lines.append(f"spent   {kind}: not measured ({w['note']}){est}")
    objects, planned = spent["objects_written"], bill["objects_written"]
    if objects is None:
        lines.append("spent   objects: not counted (listing a gs:// output costs class A "
                     f"operations; plan: output {sum(planned['output']):,}, temporary "
                     f"{planned['temporary']:,})")
    else:
        seg = (f", segmentation {sum(objects['segmentation']):,} (plan "
               f"{sum(planned['segmentation']):,})" if "segmentation" in objects else "")
        lines.append(f"spent   objects: output {sum(objects['output']):,} (plan "
                     f"{sum(planned['output']):,}), temporary {objects['temporary']:,} "
                     f"(plan {planned['temporary']:,}){seg}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
