"""Soak: many small tasks through the real SQLite queue and `Worker` while workers are SIGKILLed.

The driver (this process) registers a run, publishes `--tasks` messages (bodies streamed from
a lazy `ChunkGrid`), keeps `--workers` worker processes alive and SIGKILLs a random one every
`--kill-every` seconds (jittered ×0.5–1.5), starting a replacement at once. It heart-beats the
run like `voxflow run` does and samples VmRSS, VmHWM and RssAnon of itself and every worker
twice a second.

A worker is `voxflow.worker.Worker` on `SQLiteQueue` — pull with a lease, lease extension,
the load/compute/write-behind pipeline, ack after the write, `RunWatch` — over a trivial stage
(`Tally`) whose write appends the task index to the worker's execution file with one
O_APPEND `write(2)`, so a record survives a SIGKILL landing right after it. The only thing
not real is the work: no model, no volume.

Checked at the end (exit 1 if any fails):
  exactly once   the queue file read directly: one row per task, every row done, the
                 queue's own done counter equal to those rows; pending = leased = dead = 0
  no lost work   every done task has at least one execution record (none acked unwritten)
  memory flat    peak RSS and peak RssAnon in the last quarter of the run ≤ `--rss-ratio`
                 × the first quarter's, for the driver and the workers (max over the live
                 ones), and the longest-lived worker's RSS; the run counted from 10% done,
                 since a worker's RSS climbs while it imports (~35 → 48 MiB here)
Duplicated work (a worker killed after its write but before its ack, or a lease that
expired while its holder was killed) is allowed by at-least-once delivery: counted, reported.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from voxflow.geometry import Box

from voxflow.grids import ChunkGrid  # noqa: E402
from voxflow.messages import encode  # noqa: E402
from voxflow.queues import DEAD, DONE, LEASED, PENDING  # noqa: E402
from voxflow.queues.sqlite import SQLiteQueue  # noqa: E402

RUN, STAGE, KIND = "soak", "soak", "soak"
CHUNK = (64, 64, 16)


def grid_for(tasks: int) -> ChunkGrid:
    """100 × 100 × ceil(tasks / 10^4) chunks; the first `tasks` of them are the tasks."""
    nz = -(-tasks // 10_000)
    return ChunkGrid(Box([0, 0, 0], [100 * CHUNK[0], 100 * CHUNK[1], nz * CHUNK[2]]), CHUNK)


class Tally:
    """The trivial stage: the index passes through load and compute; write records it."""

    def __init__(self, tasks: int, record: Path):
        self.grid = grid_for(tasks)
        self.tasks = tasks
        self.fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def box(self, index: int) -> Box:
        if not 0 <= index < self.tasks:
            raise IndexError(f"task {index} is not in the plan")
        return self.grid.box(index)

    def load(self, index: int) -> int:
        return index

    def compute(self, index: int, loaded: int) -> int:
        return loaded

    def write(self, index: int, computed: int) -> None:
        os.write(self.fd, b"%d\n" % computed)


def worker_main(url: str, worker_id: str, tasks: int, root: Path, lease: float) -> None:
    """(A worker process.) Serve the soak run until it ends; the log goes to stderr."""
    from voxflow.worker import Worker, stop_on_signals
    stage = Tally(tasks, root / "executions" / f"{worker_id}.txt")

    def stages(run: str, name: str) -> Tally:
        if (run, name) != (RUN, STAGE):
            raise KeyError(f"no stage {name!r} in run {run!r}")
        return stage

    worker = Worker(SQLiteQueue(url, lease_seconds=lease), stages, [KIND], worker_id, lease,
                    runs=[RUN])
    stop_on_signals(worker.stop)
    worker.run()
    sys.stderr.flush()
    os._exit(0)


def proc_status(pid: int | str) -> Optional[tuple[int, int, int]]:
    """(VmRSS, VmHWM, RssAnon) in KiB, or None once the process is gone. RssAnon is the
    private memory a leak would grow; VmRSS also counts the queue's shared WAL index."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return tuple(int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM", "RssAnon"))
    except KeyError:                                       # a zombie has no memory lines
        return None


class Pool:
    """The worker processes: started with a fresh id each, SIGKILLed by the driver."""

    def __init__(self, url: str, tasks: int, root: Path, lease: float):
        self.url, self.tasks, self.root, self.lease = url, tasks, root, lease
        self.live: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.exited: dict[str, int] = {}                   # exited by themselves: id -> code
        self.count = 0

    def spawn(self) -> str:
        worker_id = f"w{self.count:03d}"
        self.count += 1
        log = open(self.root / "logs" / f"{worker_id}.log", "ab")
        self.live[worker_id] = subprocess.Popen(
            [sys.executable, __file__, "--worker", self.url, worker_id, str(self.tasks),
             str(self.root), str(self.lease)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.started[worker_id] = time.monotonic()
        return worker_id

    def kill(self, worker_id: str) -> None:
        proc = self.live.pop(worker_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def reap(self) -> list[str]:
        """Workers that exited on their own since the last call."""
        gone = [w for w, p in self.live.items() if p.poll() is not None]
        for w in gone:
            self.exited[w] = self.live.pop(w).returncode
        return gone


def _quarters(samples: list[tuple[float, int]], t0: float, t1: float) -> tuple[int, int]:
    """Peak value in the first and in the last quarter of [t0, t1]."""
    q = (t1 - t0) / 4
    first = [v for t, v in samples if t <= t0 + q]
    last = [v for t, v in samples if t >= t1 - q]
    return max(first, default=0), max(last, default=0)


def read_ledger(path: Path, tasks: int) -> tuple[dict, tuple, dict, np.ndarray]:
    """The queue file read directly, not through the queue's counters: rows per state,
    (distinct indices, rows), tasks per attempt count, and which tasks are done."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = dict(db.execute("SELECT state, COUNT(*) FROM tasks WHERE run = ? "
                               "GROUP BY state", (RUN,)).fetchall())
        distinct = db.execute("SELECT COUNT(DISTINCT idx), COUNT(*) FROM tasks WHERE run = ?",
                              (RUN,)).fetchone()
        attempts = dict(db.execute("SELECT attempts, COUNT(*) FROM tasks WHERE run = ? "
                                   "GROUP BY attempts", (RUN,)).fetchall())
        done = np.zeros(tasks, bool)
        done[[i for (i,) in db.execute("SELECT idx FROM tasks WHERE run = ? AND state = ?",
                                       (RUN, DONE))]] = True
    finally:
        db.close()
    return rows, distinct, attempts, done


def count_records(root: Path, tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per task: how often it was written (execution files) and acked (`task_done` logged
    after the ack; a kill in between loses the line, never adds one)."""
    executions = np.zeros(tasks, np.int64)
    for f in (root / "executions").glob("*.txt"):
        idx = np.array(f.read_bytes().split(), np.int64)
        if len(idx):
            executions += np.bincount(idx, minlength=tasks)
    acks = np.zeros(tasks, np.int64)
    for f in (root / "logs").glob("*.log"):
        for line in f.read_text().splitlines():
            if '"task_done"' in line:
                acks[json.loads(line)["index"]] += 1
    return executions, acks


def soak(tasks: int, workers: int, kill_every: float, lease: float, seed: int, root: Path,
         timeout: float, rss_ratio: float) -> dict:
    """Run the soak in `root`; the figures, with `ok` and the failed checks."""
    for sub in ("logs", "executions"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'queue.db'}"
    queue = SQLiteQueue(url, lease_seconds=lease, max_attempts=3)
    queue.register_run(RUN, json.dumps({"soak": tasks}), meta={"driver_timeout": 60})
    grid = grid_for(tasks)
    t = time.monotonic()
    published = queue.publish(RUN, STAGE, KIND,
                              ((i, encode(RUN, STAGE, i, grid.box(i))) for i in range(tasks)))
    publish_s = time.monotonic() - t

    rng = random.Random(seed)
    pool = Pool(url, tasks, root, lease)
    driver_rss: list[tuple[float, int]] = []
    worker_rss: list[tuple[float, int]] = []
    driver_anon: list[tuple[float, int]] = []
    worker_anon: list[tuple[float, int]] = []
    per_worker: dict[str, list[tuple[float, int]]] = {}
    worker_hwm: dict[str, int] = {}
    kills, unexpected = 0, []
    warm: Optional[float] = None       # 10% done: the workers' imports are behind them
    t0 = time.monotonic()
    try:
        for _ in range(workers):
            pool.spawn()
        next_kill = t0 + kill_every * rng.uniform(0.5, 1.5)
        next_beat = next_sample = t0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                me = proc_status("self")
                driver_rss.append((now, me[0]))
                driver_anon.append((now, me[2]))
                for w, p in list(pool.live.items()):
                    st = proc_status(p.pid)
                    if st:
                        worker_rss.append((now, st[0]))
                        worker_anon.append((now, st[2]))
                        per_worker.setdefault(w, []).append((now, st[0]))
                        worker_hwm[w] = max(worker_hwm.get(w, 0), st[1])
                next_sample = now + 0.5
            if now >= next_beat:
                queue.heartbeat(RUN)
                stats = queue.stats(RUN)[STAGE]
                if warm is None and stats.done >= tasks // 10:
                    warm = now
                if stats.pending + stats.leased == 0:
                    break
                if now - t0 > timeout:
                    raise SystemExit(f"soak did not drain in {timeout:.0f} s: {stats}")
                next_beat = now + 1.0
            if now >= next_kill:
                if pool.live:
                    pool.kill(rng.choice(sorted(pool.live)))
                    kills += 1
                next_kill = now + kill_every * rng.uniform(0.5, 1.5)
            unexpected += pool.reap()
            while len(pool.live) < workers:
                pool.spawn()
            time.sleep(0.05)
    except BaseException:                                  # a timeout, Ctrl-C: none left
        for w in sorted(pool.live):
            pool.kill(w)
        raise
    t1 = time.monotonic()
    me = proc_status("self")
    driver_hwm = me[1]
    queue.end_run(RUN, "succeeded")
    deadline = time.monotonic() + 20                     # RunWatch: they leave within ~2 s
    while pool.live and time.monotonic() < deadline:
        pool.reap()
        time.sleep(0.1)
    stragglers = sorted(pool.live)
    for w in stragglers:
        pool.kill(w)
    counters = queue.stats(RUN)[STAGE]
    queue.close()

    rows, distinct, attempts, done_mask = read_ledger(root / "queue.db", tasks)
    executions, ack_counts = count_records(root, tasks)

    span = t1 - t0
    warm = warm or t0
    d1, d4 = _quarters(driver_rss, warm, t1)
    w1, w4 = _quarters(worker_rss, warm, t1)
    da1, da4 = _quarters(driver_anon, warm, t1)
    wa1, wa4 = _quarters(worker_anon, warm, t1)
    longest = max(per_worker, key=lambda w: per_worker[w][-1][0] - pool.started[w],
                 default=None)                          # the longest-lived worker
    o = [(t, v) for t, v in per_worker.get(longest, []) if t >= warm]
    o1, o4 = _quarters(o, o[0][0], o[-1][0]) if len(o) > 1 else (0, 0)
    done_rows = rows.get(DONE, 0)
    fig = {
        "tasks": tasks, "published": published, "publish_s": round(publish_s, 2),
        "workers": workers, "kill_every_s": kill_every, "lease_s": lease,
        "seconds": round(span, 1), "memory_window_s": round(t1 - warm, 1),
        "tasks_per_s": round(tasks / span),
        "kills": kills, "workers_started": pool.count, "exited_unexpectedly": len(unexpected),
        "stragglers": len(stragglers),
        "rows": distinct[1], "distinct_rows": distinct[0],
        "done_rows": done_rows, "done_counter": counters.done,
        "pending": rows.get(PENDING, 0), "leased": rows.get(LEASED, 0),
        "dead": rows.get(DEAD, 0), "lost": tasks - done_rows,
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "executions": int(executions.sum()),
        "done_unexecuted": int((done_mask & (executions == 0)).sum()),
        "executed_twice_or_more": int((executions > 1).sum()),
        "acks_logged": int(ack_counts.sum()),
        "acked_twice_or_more": int((ack_counts > 1).sum()),
        "ack_not_logged": int((ack_counts == 0).sum()),
        "driver_rss_mib": [round(d1 / 1024, 1), round(d4 / 1024, 1)],
        "driver_hwm_mib": round(driver_hwm / 1024, 1),
        "worker_rss_mib": [round(w1 / 1024, 1), round(w4 / 1024, 1)],
        "driver_anon_mib": [round(da1 / 1024, 1), round(da4 / 1024, 1)],
        "worker_anon_mib": [round(wa1 / 1024, 1), round(wa4 / 1024, 1)],
        "worker_hwm_max_mib": round(max(worker_hwm.values(), default=0) / 1024, 1),
        "longest_worker": longest,
        "longest_worker_life_s": round(per_worker[longest][-1][0] - pool.started[longest], 1)
        if longest else 0,
        "longest_worker_rss_mib": [round(o1 / 1024, 1), round(o4 / 1024, 1)],
    }
    failed = []
    if not (published == distinct[0] == distinct[1] == tasks == done_rows == counters.done):
        failed.append("exactly once: rows, done rows and the done counter must all equal tasks")
    if fig["pending"] or fig["leased"] or fig["dead"] or fig["lost"]:
        failed.append("0 pending, leased, dead and lost")
    if fig["done_unexecuted"]:
        failed.append("every done task executed at least once")
    if any(b > rss_ratio * a for a, b in ((d1, d4), (w1, w4), (da1, da4), (wa1, wa4)))\
            or (o1 and o4 > rss_ratio * o1):
        failed.append(f"peak RSS flat (last quarter ≤ {rss_ratio} × first)")
    if unexpected:
        failed.append(f"workers exited on their own: {unexpected}")
    fig["failed"] = failed
    fig["ok"] = not failed
    return fig


def table(fig: dict) -> str:
    """The figures as a Markdown table (what bench/RESULTS.md records)."""
    rows = [
        ("tasks / workers / kills (workers started)",
         f"{fig['tasks']:,} / {fig['workers']} / {fig['kills']} ({fig['workers_started']})"),
        ("drain time, rate", f"{fig['seconds']} s, {fig['tasks_per_s']:,} tasks/s "
                             f"(publish {fig['publish_s']} s)"),
        ("rows / done rows / done counter",
         f"{fig['rows']:,} / {fig['done_rows']:,} / {fig['done_counter']:,}"),
        ("pending / leased / dead / lost",
         f"{fig['pending']} / {fig['leased']} / {fig['dead']} / {fig['lost']}"),
        ("attempts (tasks per attempt count)", ", ".join(f"{k}: {v:,}"
                                                         for k, v in fig["attempts"].items())),
        ("executions (tasks executed ≥ 2)",
         f"{fig['executions']:,} ({fig['executed_twice_or_more']})"),
        ("task_done logged (tasks ≥ 2 / none)",
         f"{fig['acks_logged']:,} ({fig['acked_twice_or_more']} / {fig['ack_not_logged']})"),
        ("memory window (from 10% done)", f"{fig['memory_window_s']} s"),
        ("driver peak RSS Q1 → Q4 (VmHWM)",
         f"{fig['driver_rss_mib'][0]} → {fig['driver_rss_mib'][1]} MiB "
         f"({fig['driver_hwm_mib']} MiB)"),
        ("workers peak RSS Q1 → Q4 (max VmHWM)",
         f"{fig['worker_rss_mib'][0]} → {fig['worker_rss_mib'][1]} MiB "
         f"({fig['worker_hwm_max_mib']} MiB)"),
        ("private memory (RssAnon) Q1 → Q4: driver, workers",
         f"{fig['driver_anon_mib'][0]} → {fig['driver_anon_mib'][1]} MiB, "
         f"{fig['worker_anon_mib'][0]} → {fig['worker_anon_mib'][1]} MiB"),
        (f"longest-lived worker ({fig['longest_worker_life_s']} s) peak RSS Q1 → Q4",
         f"{fig['longest_worker_rss_mib'][0]} → {fig['longest_worker_rss_mib'][1]} MiB"),
        ("checks", "all passed" if fig["ok"] else "; ".join(fig["failed"])),
    ]
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills")
    p.add_argument("--lease", type=float, default=3.0, help="lease seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--rss-ratio", type=float, default=1.10)
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        url, worker_id, tasks, root, lease = args.worker
        worker_main(url, worker_id, int(tasks), Path(root), float(lease))
    with tempfile.TemporaryDirectory(prefix="voxflow-soak-") as tmp:
        root = args.dir or Path(tmp)
        fig = soak(args.tasks, args.workers, args.kill_every, args.lease, args.seed, root,
                   args.timeout, args.rss_ratio)
    print(table(fig))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1))
    return 0 if fig["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
