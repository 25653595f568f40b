"""Worker pipeline: end-to-end time against its parts (issue 12's CPU proxy for GPU speed).

A worker runs each task as load (read the input; prefetched one task ahead), compute, and
write (write-behind, one task behind), each on its own thread (`voxflow.worker.Worker.run`).
If the pipeline works, a stage takes about as long as its slowest part, not the sum.

A GPU holds no CPU while it computes. The stand-in accelerator here does the same: a .py
model whose forward sleeps (input voxels) / R seconds (time.sleep releases the GIL) and then
applies a fixed pointwise map to 3 channels, sigmoid(w x + b) by broadcasting — not a 1x1x1
Conv3d, which on torch's CPU build is ~35x slower (0.26 s against 0.008 s for a batch of 4
patches of 128x128x32) and would make this a CPU benchmark. R is set per mode so that the
accelerator is as fast as the writer: its sleeps together last as long as the stage's write
alone (measured first, on a layer of its own), or R is given with --rate. Compute alone is
then that plus the CPU part a GPU would run on the device (SlidingWindow's patch copies,
the pointwise map, weighting, normalisation, uint8 conversion), which on this CPU can exceed
the file:// write itself. torch runs 1 intra-op thread by default (--torch-threads): a
thread driving a GPU holds about one core, and two OpenMP threads on a shared 2-core VM
stall on each other.

Per blend mode (crop, overlap), on one uint8 file:// input layer (a synthetic EM tile,
tiled), 3-channel uint8 output, each part --repeat times (default 2; the fastest counts):
  read      sum of stage.load over every task, one after another
  compute   sum of stage.compute over every task, inputs preloaded: the sleeps + the CPU
            part (printed: compute - sleeps)
  write     sum of stage.write of the precomputed outputs, to a fresh output layer
            (overlap mode: the exclusive region and the float32 partial sums of the bands)
  end2end   a real Worker over a real SQLite queue in this process, as `local://0` runs
            one: register the run (layers + run), publish the inference stage, the stage
            built by `StageCache` (plan + model load, and one warm-up compute, timed apart:
            per-run costs), then `Worker.run(exit_when_idle=0)` until every task is acked;
            a fresh output layer and run each time
Ratios: end2end / max(read, compute, write) (target <= 1.2) and end2end / sum. CPU seconds
(process CPU time, all threads; system time apart) and minor page faults of every part: on
a CPU-only machine reads and writes of file:// layers are CPU work, so (read + compute +
write CPU seconds) / cores is a floor for end2end whatever the pipeline does. Inside the
pipeline each phase is timed again (wall seconds, and its own thread's CPU seconds).
glibc keeps freed memory (`voxflow.worker.keep_freed_memory`, as `voxflow worker` and
`voxflow run` apply it; --glibc-default leaves malloc as it is, where big per-batch tensors
are faulted in afresh every batch: the page-fault figures); --gzip writes the output chunks gzipped, as on
gs:// (cloud-volume's level 9), on file://: a write-bound stage like a GPU worker's.

Then the write path's encoding on one core: raw (cloud-volume's Fortran-order copy, what a
file:// chunk costs: voxflow writes file:// chunks uncompressed), gzip through libdeflate at
levels 1, 6, 9 (what cloud-files uses when `deflate` is installed; cloud-volume gzips gs://
chunks and shards at level 9), stdlib zlib at 1, 6, 9, zstd and brotli (content encodings
cloud-files knows, not ones the format's readers expect) and JPEG (a precomputed encoding,
lossy), on storage chunks of the computed crop-mode output, in MB/s of raw bytes, against
a memcpy.

Defaults: the issue's >= 1024x1024x128 volume, chunk 256x256x64, storage chunk 64x64x16,
patch 128x128x32, overlap 16x16x4: about 2 minutes on a 2-core VM. Quick: --size 512 512 64.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

RATE_ENV = "VOXFLOW_BENCH_RATE"
MODEL = '''
import os
import time

import torch


class StandIn(torch.nn.Module):
    """A stand-in accelerator: sleeps (input voxels) / rate seconds, holding no CPU and not
    the GIL, as a GPU would; then a fixed pointwise map to 3 channels, sigmoid(w x + b),
    steep enough to saturate like a boundary map (dark membranes -> 1, cytoplasm -> 0)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor([-24.0, -24.0, -32.0]).view(1, 3, 1, 1, 1))
        self.register_buffer("b", torch.tensor([7.2, 7.68, 8.96]).view(1, 3, 1, 1, 1))

    def forward(self, x):
        time.sleep(x.numel() / float(os.environ.get("%s") or "inf"))
        return torch.sigmoid(x * self.w + self.b)
''' % RATE_ENV


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_input(root: Path, size: list[int]) -> str:
    """A uint8 layer of `size` (x y z): a 256x256x32 synthetic EM tile repeated (generating
    EM at this size would take minutes), so chunks compress like EM, not like noise."""
    from voxflow.demo.synthetic import make_em_volume
    from voxflow.geometry import Box
    from voxflow.volume import Volume
    tile_shape = [min(256, size[0]), min(256, size[1]), min(32, size[2])]
    tile = make_em_volume(tuple(tile_shape), seed=3).image             # z, y, x
    reps = [-(-n // t) for n, t in zip(reversed(size), tile.shape)]
    url = f"file://{root}/image"
    vol = Volume.create(url, num_channels=1, dtype="uint8", resolution=(8, 8, 40),
                        voxel_offset=(0, 0, 0), size=size, chunk=(64, 64, 16))
    x, y, z = size
    block = np.tile(tile, (1, reps[1], reps[2]))[:, :y, :x]
    for z0 in range(0, z, 32):                           # a slab at a time: bounded memory
        z1 = min(z0 + 32, z)
        zs = np.arange(z0, z1) % tile.shape[0]
        vol.write(Box((0, 0, z0), (x, y, z1)), np.ascontiguousarray(block[zs])[None])
    return url


def emulate_gs_gzip() -> None:
    """--gzip: output chunks gzip-compressed as on gs:// (cloud-volume's default for raw
    chunks: gzip, level 9 whatever `compress_level` says) although the layers are file://:
    the write path's encoding CPU without a network. Patches `voxflow.volume._open` in this
    process only (voxflow itself writes file:// chunks uncompressed)."""
    import voxflow.volume as volume
    plain = volume._open

    def _open(url, mip, fill_missing=True):
        cv = plain(url, mip, fill_missing)
        cv.config.compress = None                 # cloud-volume's default: gzip for raw
        return cv
    volume._open = _open


def config(root: Path, args, mode: str, output: str):
    from voxflow.config import parse_config
    return parse_config({
        "input": f"file://{root}/image", "output": f"file://{root}/{output}",
        "model": {"path": str(root / "standin.py"), "input_patch": list(args.patch),
                  "output_channels": 3},
        "inference": {"chunk": list(args.chunk), "patch_overlap": list(args.overlap),
                      "blend": mode, "batch_size": args.batch, "device": "cpu"},
        "storage_chunk": list(args.storage_chunk), "output_dtype": "uint8",
        "downsample": {"mips": 0},
        "queue": {"url": f"sqlite://{root}/queue.db", "lease_seconds": 120},
        "workers": {"inference": "local://0", "blend": "local://0",
                    "downsample": "local://0"}})


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class Clock:
    """Wall, process CPU (user + system) and system seconds, and minor page faults, since it
    was made."""

    def __init__(self):
        self.t, self.times = time.perf_counter(), os.times()
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def read(self) -> dict:
        now = os.times()
        user, system = now.user - self.times.user, now.system - self.times.system
        return {"seconds": time.perf_counter() - self.t, "cpu_seconds": user + system,
                "system_seconds": system,
                "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults}


def each(fn, n: int) -> tuple[dict, list]:
    """fn(i) for every task, one after another: (`Clock` figures, results)."""
    out, clock = [], Clock()
    for i in range(n):
        out.append(fn(i))
    return clock.read(), out


def patch_count(stage, index: int, image_shape) -> int:
    """Patches the model runs for one task (what the stand-in sleeps for)."""
    from voxflow.grids import OverlapGrid
    if isinstance(getattr(stage, "grid", None), OverlapGrid):
        return int(np.prod([len(s) for s in stage.grid.patch_starts(index)]))
    return len(stage.window.patches(image_shape[1:]))


class Phases:
    """Wraps a stage's load/compute/write (instance attributes shadow the methods): each
    call's start, end and its thread's CPU seconds. Timing only; the stage is unchanged."""

    def __init__(self, stage):
        self.calls: dict[str, list[tuple[float, float, float]]] = {
            "load": [], "compute": [], "write": []}
        self._lock = threading.Lock()
        for phase in self.calls:
            setattr(stage, phase, self._wrap(phase, getattr(stage, phase)))

    def _wrap(self, phase, fn):
        def timed(*a):
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*a)
            finally:
                t1, c1 = time.perf_counter(), time.thread_time()
                with self._lock:
                    self.calls[phase].append((t0, t1, c1 - c0))
        return timed

    def summary(self) -> dict:
        return {phase: {"calls": len(c), "seconds": sum(b - a for a, b, _ in c),
                        "thread_cpu_seconds": sum(x for _, _, x in c)}
                for phase, c in self.calls.items()}


def timed_queue(queue) -> dict:
    """Time the queue calls the worker's main thread makes (instance attributes)."""
    spent: dict[str, list[float]] = {}
    for name in ("pull", "ack", "extend", "run_state"):
        fn = getattr(queue, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent.setdefault(_name, []).append(time.perf_counter() - t0)
        setattr(queue, name, timed)
    return spent


def fastest(samples: list[dict]) -> dict:
    """The repeat with the least wall time (others' load on a shared machine only adds),
    with every repeat's seconds."""
    best = dict(min(samples, key=lambda f: f["seconds"]))
    best["all_seconds"] = [round(f["seconds"], 3) for f in samples]
    return best


def remove_layer(root: Path, name: str) -> int:
    """Delete an output layer and its temporary folder; returns the bytes they held."""
    held = du(root / name) + du(root / f"{name}.voxflow-tmp")
    shutil.rmtree(root / name, ignore_errors=True)
    shutil.rmtree(root / f"{name}.voxflow-tmp", ignore_errors=True)
    return held


def parts(root: Path, args, mode: str) -> tuple[dict, list]:
    """read, compute and write alone (each `--repeat` times: the fastest counts); returns
    figures and a few output storage chunks."""
    from voxflow.models import Model
    from voxflow.pipeline import create_layers, plan
    from voxflow.stages import build_stage
    os.environ[RATE_ENV] = "inf"
    cfg = config(root, args, mode, f"{mode}-probe")
    p = plan(cfg)                                     # checks the model (no sleep: rate inf)
    create_layers(p)
    model = Model(cfg.model, "cpu")
    stage = build_stage(p, "inference", f"{mode}-probe", model)
    n = len(stage)
    stage.compute(0, stage.load(0))                   # warm-up: allocator, lazy init, caches
    reads = []
    for _ in range(args.repeat):
        loaded = None
        fig, loaded = each(stage.load, n)
        reads.append(fig)
    patches = sum(patch_count(stage, i, loaded[i].shape) for i in range(n))
    first, outputs = each(lambda i: stage.compute(i, loaded[i]), n)   # rate inf: no sleep
    patch_voxels = int(np.prod(args.patch))
    if args.rate:
        rate = args.rate
    else:   # the accelerator as fast as the writer: asleep as long as a write alone takes
        probe, _ = each(lambda i: stage.write(i, outputs[i]), n)
        rate = patches * patch_voxels / probe["seconds"]
    remove_layer(root, f"{mode}-probe")
    os.environ[RATE_ENV] = repr(rate)
    computes = []
    for _ in range(args.repeat):
        outputs = None
        gc.collect()
        fig, outputs = each(lambda i: stage.compute(i, loaded[i]), n)
        computes.append(fig)
    del loaded
    gc.collect()
    writes = []
    for r in range(args.repeat):                      # each to a fresh layer
        wcfg = config(root, args, mode, f"{mode}-write{r}")
        wp = plan(wcfg, check_model=False)
        create_layers(wp)
        wstage = build_stage(wp, "inference", f"{mode}-write{r}", model)
        fig, _ = each(lambda i: wstage.write(i, outputs[i]), n)
        fig["bytes"] = remove_layer(root, f"{mode}-write{r}")
        writes.append(fig)
    sample = codec_sample(outputs, args) if mode == "crop" else []
    del outputs
    gc.collect()
    compute = fastest(computes)
    compute["first_pass_no_sleep"] = first            # the calibration pass, at rate inf
    fig = {"tasks": n, "patches": patches, "rate_vox_per_s": rate,
           "sleep_seconds": patches * patch_voxels / rate, "output_vox": p.bbox.size,
           "read": fastest(reads), "compute": compute, "write": fastest(writes)}
    return fig, sample


def end_to_end(root: Path, args, mode: str, repeat: int) -> dict:
    from voxflow.queues import open_queue
    from voxflow.runner import publish_stage, queue_options, register
    from voxflow.pipeline import plan
    from voxflow.stages import StageCache
    from voxflow.worker import JsonLog, Worker
    name = f"{mode}-e2e{repeat}"
    cfg = config(root, args, mode, name)
    run_id = f"bench-{name}"
    t0 = time.perf_counter()
    p = plan(cfg)
    register(cfg, p, run_id)                           # output layer + the run in the queue
    queue = open_queue(cfg.queue.url, **queue_options(cfg))
    publish_stage(queue, run_id, p, "inference")
    t_publish = time.perf_counter() - t0
    cache = StageCache(queue)
    t0 = time.perf_counter()
    stage = cache(run_id, "inference")                 # plan from the queue + model load
    rate, os.environ[RATE_ENV] = os.environ[RATE_ENV], "inf"
    stage.compute(0, stage.load(0))                    # warm-up, as the parts had (no write)
    os.environ[RATE_ENV] = rate
    t_setup = time.perf_counter() - t0
    phases = Phases(stage)
    spent = timed_queue(queue)
    log = open(root / f"worker-{name}.log", "w")
    worker = Worker(queue, cache, ["inference"], worker_id=run_id, runs=[run_id],
                    log=JsonLog(run_id, log))
    gc.collect()
    clock = Clock()
    done = worker.run(exit_when_idle=0)
    e2e = clock.read()
    worker.shutdown()
    log.close()
    stats = queue.stats(run_id)["inference"]
    if done != len(stage) or stats.done != stats.total or stats.dead:
        raise RuntimeError(f"{mode}: the worker did {done} of {len(stage)} tasks ({stats})")
    queue.end_run(run_id, "succeeded")
    queue.close()
    written = remove_layer(root, name)
    return {**e2e, "publish_seconds": t_publish, "setup_seconds": t_setup, "bytes": written,
            "inside": phases.summary(),
            "first_load_seconds": min(phases.calls["load"])[1] - clock.t,
            "queue_seconds": {k: sum(v) for k, v in spent.items()},
            "queue_calls": {k: len(v) for k, v in spent.items()}}


def codec_sample(outputs: list, args) -> list[np.ndarray]:
    """Storage chunks of the computed crop-mode output from the middle task, as cloud-volume
    slices them for upload: (x, y, z, c) views of the transposed task array."""
    box, data = outputs[len(outputs) // 2][0]
    data = data() if callable(data) else data          # (c, z, y, x)
    sx, sy, sz = args.storage_chunk
    img = data.transpose(3, 2, 1, 0)
    out = []
    for z in range(0, img.shape[2] - sz + 1, sz):
        for y in range(0, img.shape[1] - sy + 1, sy):
            for x in range(0, img.shape[0] - sx + 1, sx):
                out.append(img[x:x + sx, y:y + sy, z:z + sz])
                if len(out) == args.codec_chunks:
                    return out
    return out


def codecs(sample: list[np.ndarray], repeat: int = 3) -> dict:
    """MB/s (of raw bytes) on one core, and compression ratio, per encoding."""
    import deflate
    import zstandard
    import brotli
    from cloudvolume import chunks
    raw = [chunks.encode(c, "raw") for c in sample]
    nbytes = sum(len(b) for b in raw)

    def rate(fn, inputs):
        best, size = float("inf"), 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            size = sum(len(fn(b)) for b in inputs)
            best = min(best, time.perf_counter() - t0)
        return {"MB_per_s": nbytes / best / 1e6, "ratio": nbytes / size}

    cases = {"memcpy": (lambda b: bytearray(b), raw),
             "raw encode (cloud-volume, F-order copy)": (lambda c: chunks.encode(c, "raw"),
                                                          sample)}
    for level in (1, 6, 9):
        cases[f"gzip {level} (libdeflate)"] = (
            lambda b, lv=level: bytes(deflate.gzip_compress(b, lv)), raw)
    for level in (1, 6, 9):
        cases[f"gzip {level} (stdlib zlib)"] = (lambda b, lv=level: zlib.compress(b, lv), raw)
    for level in (1, 3):
        cases[f"zstd {level}"] = (
            lambda b, lv=level: zstandard.ZstdCompressor(level=lv).compress(b), raw)
    cases["brotli 1"] = (lambda b: brotli.compress(b, quality=1), raw)
    cases["brotli 5 (cloud-files default)"] = (lambda b: brotli.compress(b, quality=5), raw)
    cases["jpeg q85 (lossy; precomputed encoding)"] = (lambda c: chunks.encode(c, "jpeg"),
                                                        sample)
    out = {}
    for name, (fn, inputs) in cases.items():
        try:
            out[name] = rate(fn, inputs)
        except Exception as exc:                       # a codec this install lacks
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    out["_bytes"] = nbytes
    out["_chunks"] = len(sample)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, nargs=3, default=[1024, 1024, 128], help="x y z")
    ap.add_argument("--chunk", type=int, nargs=3, default=[256, 256, 64])
    ap.add_argument("--storage-chunk", type=int, nargs=3, default=[64, 64, 16])
    ap.add_argument("--patch", type=int, nargs=3, default=[128, 128, 32])
    ap.add_argument("--overlap", type=int, nargs=3, default=[16, 16, 4])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rate", type=float, help="stand-in accelerator: input voxels per "
                    "second (default: set per mode so compute alone ~ write alone)")
    ap.add_argument("--modes", nargs="+", default=["crop", "overlap"],
                    choices=["crop", "overlap"])
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (default 1: a thread driving a GPU holds "
                    "about one core; 0: torch's default, one per core)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's malloc as it is, without the `keep_freed_memory` "
                    "that `voxflow worker` and `voxflow run` apply (the before)")
    ap.add_argument("--gzip", action="store_true",
                    help="write output chunks gzipped, as on gs:// (emulated on file://)")
    ap.add_argument("--codec-chunks", type=int, default=32,
                    help="storage chunks the codec timings encode")
    ap.add_argument("--repeat", type=int, default=2, help="times each part and end2end "
                    "run; the fastest counts (others' load only adds)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    kept = False
    if not args.glibc_default:               # as `voxflow worker` / `voxflow run` start
        from voxflow.worker import keep_freed_memory
        kept = keep_freed_memory()

    import torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)      # the worker's threads use this too
    if args.gzip:
        emulate_gs_gzip()
    root = Path(tempfile.mkdtemp(prefix="voxflow-bench-pipeline-"))
    os.environ["VOXFLOW_HOME"] = str(root / "home")
    (root / "standin.py").write_text(MODEL)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    make_input(root, args.size)
    figs = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {cpu_model()}",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "size": args.size, "chunk": args.chunk, "storage_chunk": args.storage_chunk,
            "patch": args.patch, "overlap": args.overlap, "batch": args.batch,
            "output_chunks": "gzip (gs:// emulated)" if args.gzip else "raw (file://)",
            "keep_freed_memory": kept,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "repeat": args.repeat,
            "modes": {}}
    print(f"machine {figs['machine']}; torch {torch.__version__}, "
          f"{figs['torch_threads']} threads; best of {args.repeat}; glibc "
          + ("keeps freed memory (keep_freed_memory)" if kept else "malloc as it is")
          + (f", env {figs['malloc_env']}" if figs["malloc_env"] else ""))
    print(f"volume {args.size}, chunk {args.chunk}, storage chunk {args.storage_chunk}, "
          f"patch {args.patch}, overlap {args.overlap}, batch {args.batch}; uint8 in, "
          f"3 x uint8 out, file://, output chunks {figs['output_chunks']}")
    sample = []
    try:
        for mode in args.modes:
            fig, s = parts(root, args, mode)
            sample = sample or s
            fig["end_to_end"] = fastest([end_to_end(root, args, mode, r)
                                         for r in range(args.repeat)])
            secs = {k: fig[k]["seconds"] for k in ("read", "compute", "write")}
            e2e = fig["end_to_end"]["seconds"]
            cpu_sum = sum(fig[k]["cpu_seconds"] for k in ("read", "compute", "write"))
            fig["over_max"] = e2e / max(secs.values())
            fig["over_sum"] = e2e / sum(secs.values())
            fig["cpu_floor_seconds"] = cpu_sum / (os.cpu_count() or 1)
            figs["modes"][mode] = fig
            print_mode(mode, fig)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if sample:
        figs["codecs"] = codecs(sample)
        print_codecs(figs["codecs"])
    figs["seconds"] = time.perf_counter() - t_start
    figs["loadavg_before_after"] = [load0, os.getloadavg()]
    print(f"total {figs['seconds']:.0f} s; load average before {load0[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figs, indent=2))


def print_mode(mode: str, fig: dict) -> None:
    e, vox, inside = fig["end_to_end"], fig["output_vox"], fig["end_to_end"]["inside"]
    print(f"\n{mode}: {fig['tasks']} tasks, {fig['patches']} patches; stand-in "
          f"{fig['rate_vox_per_s'] / 1e6:.1f} Mvox/s of input, asleep "
          f"{fig['sleep_seconds']:.2f} s in all")
    print(f"  {'':<9} {'seconds':>8} {'CPU s':>7} {'(sys)':>6} {'out Mvox/s':>10} | "
          f"{'in pipeline s':>13} {'thread CPU s':>12}   every repeat's s")
    for part, phase in (("read", "load"), ("compute", "compute"), ("write", "write")):
        f, i = fig[part], inside[phase]
        print(f"  {part:<9} {f['seconds']:8.2f} {f['cpu_seconds']:7.2f} "
              f"{f['system_seconds']:6.2f} {vox / f['seconds'] / 1e6:10.2f} | "
              f"{i['seconds']:13.2f} {i['thread_cpu_seconds']:12.2f}   {f['all_seconds']}")
    print(f"  {'end2end':<9} {e['seconds']:8.2f} {e['cpu_seconds']:7.2f} "
          f"{e['system_seconds']:6.2f} {vox / e['seconds'] / 1e6:10.2f} | "
          f"{'':>26}   {e['all_seconds']}")
    print(f"  compute = {fig['sleep_seconds']:.2f} s asleep + "
          f"{fig['compute']['seconds'] - fig['sleep_seconds']:.2f} s CPU part; minor page "
          f"faults: read {fig['read']['page_faults']}, compute {fig['compute']['page_faults']}"
          f", write {fig['write']['page_faults']}, end2end {e['page_faults']}")
    print(f"  not in end2end: register + publish {e['publish_seconds']:.2f} s, stage setup "
          f"{e['setup_seconds']:.2f} s; in it: first load {e['first_load_seconds']:.2f} s, "
          f"queue calls {sum(e['queue_seconds'].values()):.2f} s")
    print(f"  end2end / max(read, compute, write) = {fig['over_max']:.2f} (target <= 1.2); "
          f"end2end / sum = {fig['over_sum']:.2f}; CPU floor (CPU s / cores) "
          f"{fig['cpu_floor_seconds']:.2f} s = {fig['cpu_floor_seconds'] / max(fig[k]['seconds'] for k in ('read', 'compute', 'write')):.2f} x max")


def print_codecs(c: dict) -> None:
    print(f"\nwrite path, one core: {c['_chunks']} storage chunks of the crop output, "
          f"{c['_bytes'] / 1e6:.1f} MB raw")
    for name, f in c.items():
        if name.startswith("_"):
            continue
        if "error" in f:
            print(f"  {name:<42} {f['error']}")
        else:
            print(f"  {name:<42} {f['MB_per_s']:8.1f} MB/s   ratio {f['ratio']:5.2f}   "
                  f"{300 / f['MB_per_s']:6.2f} cores per 100 Mvox/s of 3 x uint8")


if __name__ == "__main__":
    main()
