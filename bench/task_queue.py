"""Task-queue throughput: publish, pull + ack with worker processes, publish memory.

Measures `voxflow.queues.sqlite.SQLiteQueue` on a fresh queue file in a temp dir:
  publish   --tasks messages for one run/stage, bodies streamed from a lazy ChunkGrid
            (`messages.encode` of `grid.box(i)`), in a fresh subprocess; messages/s
  single    --workers processes, each with its own queue, pull 1 / ack 1 (how a worker
            works) until the queue is empty; total messages/s. Runs on --single-tasks
            messages (fewer than --tasks by default: it is the slow mode)
  batched   the same with pull --batch / ack_many on --tasks messages
  memory    peak RSS of the publish subprocess for each --rss-tasks count (ru_maxrss in
            the child); streaming publish should not grow with the task count
Every pull mode checks that stats() ends at done == tasks and nothing else, and that the
union of the indices the workers acked has no repeats and covers every task.
"""
from __future__ import annotations

import argparse
import json
import os
import multiprocessing as mp
import platform
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np

from voxflow.geometry import Box

from voxflow.grids import ChunkGrid
from voxflow.messages import encode
from voxflow.queues.sqlite import SQLiteQueue

RUN, STAGE, KIND = "bench", "inference", "inference"
CHUNK = (64, 64, 16)
TARGETS = {"publish": 50_000, "pull_ack": 5_000, "rss_ratio": 1.25}


def grid_for(tasks: int) -> ChunkGrid:
    """100 × 100 × ceil(tasks / 10^4) chunks (10^6 tasks: 100^3), last ones clipped."""
    nz = -(-tasks // 10_000)
    return ChunkGrid(Box([0, 0, 0], [100 * CHUNK[0] - 5, 100 * CHUNK[1] - 5, nz * CHUNK[2] - 3]),
                     CHUNK)


def messages(tasks: int):
    """The first `tasks` (index, body) messages of `grid_for(tasks)`, generated lazily."""
    grid = grid_for(tasks)
    return ((i, encode(RUN, STAGE, i, grid.box(i))) for i in range(tasks))


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux


def publish_child(tasks: int, path: str) -> None:
    """(In a fresh process.) Publish `tasks` messages into `path`; print figures as JSON."""
    gen_n = min(tasks, 100_000)
    t0 = time.perf_counter()
    for _ in messages(gen_n):
        pass
    gen_s = time.perf_counter() - t0
    rss_before = maxrss_kib()
    q = SQLiteQueue(f"sqlite:///{path}")
    q.register_run(RUN, json.dumps({"bench": "queue", "tasks": tasks}))
    t0 = time.perf_counter()
    added = q.publish(RUN, STAGE, KIND, messages(tasks))
    seconds = time.perf_counter() - t0
    q.close()
    print(json.dumps({"tasks": tasks, "added": added, "seconds": seconds,
                      "rate": tasks / seconds, "generate_rate": gen_n / gen_s,
                      "rss_before_kib": rss_before, "rss_peak_kib": maxrss_kib()}))


def publish(tasks: int, path: Path) -> dict:
    """Run `publish_child` in a fresh interpreter and return its figures."""
    out = subprocess.run([sys.executable, __file__, "--publish-child", str(tasks), str(path)],
                         check=True, capture_output=True, text=True)
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    if fig["added"] != tasks:
        raise SystemExit(f"publish added {fig['added']} of {tasks} messages")
    return fig


def consume(url: str, worker: str, batch: int, ready, out) -> None:
    """(A worker process.) Pull and ack until the queue is empty; report what was acked."""
    q = SQLiteQueue(url)
    indices = array("q")
    stamps, counts = array("d"), array("l")               # after each ack: time, how many
    t_pull = t_ack = longest = 0.0
    mismatched = 0
    ready.wait()
    while True:
        a = time.monotonic()
        leases = q.pull([KIND], batch, worker)
        b = time.monotonic()
        if not leases:
            break
        for lease in leases:
            indices.append(lease.index)
            mismatched += f'"index":{lease.index},' not in lease.body
        if batch == 1:
            q.ack(leases[0])
        else:
            q.ack_many(leases)
        c = time.monotonic()
        t_pull += b - a
        t_ack += c - b
        longest = max(longest, b - a, c - b)
        stamps.append(c)
        counts.append(len(leases))
    end = time.monotonic()
    q.close()
    out.put({"worker": worker, "indices": indices.tobytes(), "stamps": stamps.tobytes(),
             "counts": counts.tobytes(), "pull_s": t_pull, "ack_s": t_ack, "longest_s": longest, "end": end,
             "mismatched": mismatched})


def drain(path: Path, tasks: int, workers: int, batch: int) -> dict:
    """Pull + ack every message of `path` with `workers` processes; figures and checks."""
    url = f"sqlite:///{path}"
    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=consume, args=(url, f"bench-{i}", batch, ready, out))
             for i in range(workers)]
    for p in procs:
        p.start()
    ready.wait()                                          # every worker has opened the queue
    t0 = time.monotonic()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
    seconds = max(r["end"] for r in results) - t0
    idx = np.concatenate([np.frombuffer(r["indices"], np.int64) for r in results])
    unique = np.unique(idx)
    q = SQLiteQueue(url)
    st = q.stats(RUN)[STAGE]
    q.close()
    # Throughput in the first and last tenth of the messages (does it slow as rows finish?).
    stamps = np.concatenate([np.frombuffer(r["stamps"], np.float64) for r in results])
    counts = np.concatenate([np.frombuffer(r["counts"], np.int64) for r in results])
    order = np.argsort(stamps)
    done = np.cumsum(counts[order])
    t10 = stamps[order][np.searchsorted(done, 0.1 * tasks)]
    t90 = stamps[order][np.searchsorted(done, 0.9 * tasks)]
    per_worker = [len(r["indices"]) // 8 for r in results]
    busy = sum(r["pull_s"] + r["ack_s"] for r in results)
    return {
        "tasks": tasks, "workers": workers, "batch": batch, "seconds": seconds,
        "rate": tasks / seconds,
        "rate_first_10pct": 0.1 * tasks / (t10 - t0),
        "rate_last_10pct": 0.1 * tasks / (t0 + seconds - t90),
        "pull_share": sum(r["pull_s"] for r in results) / busy,
        "per_worker": per_worker,
        "longest_call_ms": 1e3 * max(r["longest_s"] for r in results),
        "stats": {"pending": st.pending, "leased": st.leased, "done": st.done, "dead": st.dead},
        "acked": int(idx.size), "unique": int(unique.size),
        "in_range": bool(unique.size == 0 or (unique[0] >= 0 and unique[-1] < tasks)),
        "mismatched_bodies": sum(r["mismatched"] for r in results),
        "exactly_once": bool(st.done == tasks and st.pending == st.leased == st.dead == 0
                             and idx.size == tasks and unique.size == tasks
                             and unique[0] == 0 and unique[-1] == tasks - 1
                             and not any(r["mismatched"] for r in results)),
    }


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="pull size of the batched mode")
    ap.add_argument("--single-tasks", type=int, default=100_000,
                    help="messages for the pull 1 / ack 1 mode (at most --tasks)")
    ap.add_argument("--rss-tasks", type=int, nargs=2, default=[100_000, 1_000_000],
                    help="task counts whose publish peak RSS is compared")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--publish-child", nargs=2, metavar=("TASKS", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publish_child:
        publish_child(int(args.publish_child[0]), args.publish_child[1])
        return

    single_tasks = min(args.single_tasks, args.tasks)
    tmp = Path(tempfile.mkdtemp(prefix="voxflow-queue-bench-"))
    fresh: dict[int, Path] = {}                           # published, not yet drained

    def published(n: int, name: str) -> tuple[dict, Path]:
        path = tmp / f"{name}-{n}.db"
        fig = publish(n, path)
        fresh[n] = path
        return fig, path

    def take(n: int) -> Path:
        return fresh.pop(n) if n in fresh else published(n, "q")[1]

    fig = {"machine": machine(), "targets": TARGETS, "args": {
        "tasks": args.tasks, "workers": args.workers, "batch": args.batch,
        "single_tasks": single_tasks, "rss_tasks": args.rss_tasks}}
    print(f"machine  {fig['machine']['platform']}, {fig['machine']['cpus']} CPUs, "
          f"{fig['machine']['memory_gib']} GiB, Python {fig['machine']['python']}, "
          f"SQLite {fig['machine']['sqlite']}")
    print(f"tmp      {tmp}", flush=True)

    pub, main_path = published(args.tasks, "q")
    fig["publish"] = pub
    print(f"publish  {args.tasks} messages: {pub['seconds']:.1f} s", flush=True)
    rss = {}
    for n in args.rss_tasks:
        rss[n] = pub if n == args.tasks else published(n, "rss")[0]
        print(f"rss      publish {n}: peak {rss[n]['rss_peak_kib'] / 1024:.1f} MiB", flush=True)
    for n in list(fresh):
        if n not in (args.tasks, single_tasks):
            fresh.pop(n).unlink()
    small, large = args.rss_tasks
    fig["rss"] = {"tasks": [small, large],
                  "peak_mib": [rss[n]["rss_peak_kib"] / 1024 for n in (small, large)],
                  "before_publish_mib": [rss[n]["rss_before_kib"] / 1024 for n in (small, large)],
                  "growth_mib": [(rss[n]["rss_peak_kib"] - rss[n]["rss_before_kib"]) / 1024
                                 for n in (small, large)],
                  "ratio": rss[large]["rss_peak_kib"] / rss[small]["rss_peak_kib"]}

    runs = [("single", single_tasks, 1), ("batched", args.tasks, args.batch)]
    for name, n, batch in runs:
        path = main_path if name == "batched" else take(n)
        if name == "single" and path == main_path:        # single_tasks == tasks: own copy
            path = published(n, "single")[1]
            fresh.pop(n, None)
        fig[name] = drain(path, n, args.workers, batch)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        r = fig[name]
        print(f"{name:8} {n} messages, {args.workers} workers, pull {batch}: "
              f"{r['seconds']:.1f} s, exactly once: {r['exactly_once']}", flush=True)
    for path in fresh.values():
        path.unlink(missing_ok=True)
    try:
        tmp.rmdir()
    except OSError:
        pass

    def row(name, value, unit, target, met):
        print(f"| {name:<42} | {value:>17} | {unit:<6} | {target:<10} | {met:<4} |")

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    s, b = fig["single"], fig["batched"]
    print()
    row("figure", "value", "unit", "target", "met")
    print("|" + "|".join("-" * w for w in (44, 19, 8, 12, 6)) + "|")
    row(f"publish {args.tasks}", f"{pub['rate']:,.0f}", "msg/s", f">= {TARGETS['publish']:,}",
        yes(pub["rate"] >= TARGETS["publish"]))
    row("  (body generation alone)", f"{pub['generate_rate']:,.0f}", "msg/s", "", "")
    row(f"pull 1 / ack 1, {s['tasks']}, {s['workers']} workers", f"{s['rate']:,.0f}", "msg/s",
        f">= {TARGETS['pull_ack']:,}", yes(s["rate"] >= TARGETS["pull_ack"]))
    row(f"pull {b['batch']} / ack_many, {b['tasks']}, {b['workers']} workers",
        f"{b['rate']:,.0f}", "msg/s", f">= {TARGETS['pull_ack']:,}",
        yes(b["rate"] >= TARGETS["pull_ack"]))
    for r, label in ((s, "pull 1"), (b, f"pull {b['batch']}")):
        row(f"  {label}: first / last 10% of messages",
            f"{r['rate_first_10pct']:,.0f} / {r['rate_last_10pct']:,.0f}", "msg/s", "", "")
        row(f"  {label}: time in pull (vs ack)", f"{100 * r['pull_share']:.0f}%", "", "", "")
        row(f"  {label}: longest pull or ack call", f"{r['longest_call_ms']:.0f}", "ms", "", "")
        row(f"  {label}: messages per worker", " ".join(map(str, r["per_worker"])), "", "", "")
        row(f"  {label}: exactly once (stats, indices)", str(r["exactly_once"]), "", "True",
            yes(r["exactly_once"]))
    ra = fig["rss"]
    row(f"publish peak RSS {small} / {large}",
        f"{ra['peak_mib'][0]:.1f} / {ra['peak_mib'][1]:.1f}", "MiB", "", "")
    row("  growth above the import baseline", f"{ra['growth_mib'][0]:.1f} / "
        f"{ra['growth_mib'][1]:.1f}", "MiB", "", "")
    row(f"  ratio {large} / {small}", f"{ra['ratio']:.3f}", "", f"<= {TARGETS['rss_ratio']}",
        yes(ra["ratio"] <= TARGETS["rss_ratio"]))
    if single_tasks < args.tasks:
        print(f"\npull 1 / ack 1 ran on {single_tasks} messages (--single-tasks), not {args.tasks}.")
    for name in ("single", "batched"):
        r = fig[name]
        if not r["exactly_once"]:
            print(f"{name}: stats {r['stats']}, acked {r['acked']}, distinct {r['unique']}, "
                  f"in range {r['in_range']}, mismatched bodies {r['mismatched_bodies']}")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))
    if not (s["exactly_once"] and b["exactly_once"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
