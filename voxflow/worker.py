"""`Worker`: pull a task, keep its lease alive, run the stage's operation, ack.

The main thread only controls: it pulls, extends leases, watches for a stop, and acks or
nacks. A task is a pipeline of three threads: reading the next task's input (prefetch, one
task ahead, building its stage first — the run's plan, and the model on the run's first
inference task), computing, and writing the previous task's output (write-behind, one task
behind), so on a fast accelerator neither reads nor writes leave it idle. Memory stays
bounded: at most one task in each phase, and a computed task waits for the writer (holding
up the next compute) rather than queueing. A task is acked only once all its writes
succeeded; a failed write fails the task (retried). A stop (SIGTERM on a Spot VM) is acted
on within a fraction of a second even in the middle of a long forward pass or a model load:
leases not being written are released at once, a write in flight gets `WRITE_GRACE_SECONDS`
to finish (then acked) or is released too; a half-done task is simply redone elsewhere (tasks are idempotent).
The same holds when the run itself ends (cancelled, failed, its driver gone quiet): the
worker gives its tasks back and stops pulling them.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, TextIO

from . import retry as storage_retry
from .messages import MalformedMessage, TaskMessage, decode
from .queues import Lease, TaskQueue

StageFactory = Callable[[str, str], object]   # (run, stage) -> Stage
SESSION_SECONDS = 60.0                        # how often a working worker re-reports its session
WRITE_GRACE_SECONDS = 3.0                     # on stop: how long a write in flight may finish


class JsonLog:
    """One JSON object per line: time, worker, event and the task's run, stage and index."""

    def __init__(self, worker: str, stream: TextIO = sys.stderr):
        self.worker = worker
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: str, level: str = "info", **fields) -> None:
        record = {"ts": round(time.time(), 3), "level": level, "worker": self.worker,
                  "event": event, **fields}
        with self._lock:
            self.stream.write(json.dumps(record, default=str) + "\n")
            self.stream.flush()


@dataclass
class _Job:
    lease: Lease
    message: TaskMessage
    stage: object = None                   # built by the load job
    loaded: Optional[Future] = None        # stage build + stage.load, on the I/O thread
    computed: Optional[Future] = None      # stage.compute, on the compute thread
    written: Optional[Future] = None       # stage.write, on the write thread


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text[:2000]


def task_error(exc: BaseException) -> str:
    """What a failed task's dead letter keeps: the one-line error, then the traceback's
    last frames (the console shows them on click; summaries show the first line)."""
    import traceback
    frames = "".join(traceback.format_exception(exc, limit=-8))
    return f"{_short_error(exc)}\n{frames[-4000:]}"


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    A forward pass allocates and frees activations of tens to hundreds of MB per batch.
    glibc serves blocks that large with mmap and unmaps them on free (and trims the heap
    top past 128 KiB), so every batch faults its activations in again, page by page: at
    batch 4 on a 2-vCPU Xeon the peer job spent 46 s of 105 in the kernel (22 M minor
    faults); batch 1 less, so a larger batch looked slower. One arena (a thread's own arena
    mmaps every block larger than its 64 MiB heaps, whatever M_MMAP_MAX says: the compute
    thread's activations), no mmap and no trimming keep them: 0.27 M faults, 1 s in the
    kernel. The process's memory stays at its peak, which a worker reaches in its first
    task anyway. Returns False where there is no glibc (mallopt)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
    return all(mallopt(option, value) for option, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))


def stop_on_signals(stop: threading.Event,
                    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Make SIGTERM and SIGINT set `stop` — from a thread, never from the handler: Python runs
    a handler in the main thread between two bytecodes, possibly while that thread holds the
    event's own lock (inside `stop.wait`), and `Event.set` there waits for it forever (seen:
    a worker that never exited on SIGTERM, its leases never released). The handler only
    writes a byte to a pipe, which takes no lock."""
    read, write = os.pipe()

    def handler(signum, frame) -> None:
        os.write(write, b"\0")

    def watch() -> None:
        os.read(read, 1)
        stop.set()

    threading.Thread(target=watch, name="voxflow-signals", daemon=True).start()
    for sig in signals:
        signal.signal(sig, handler)


class RunWatch:
    """Which runs a worker may still serve: a run is live while its state is "active" and its
    driver heart-beat within the run's `driver_timeout`. Asked often, it reads the queue at
    most every `every` seconds per run; once a run is given up it stays given up here."""

    def __init__(self, queue: TaskQueue, every: float = 2.0, clock=time.time):
        self.queue = queue
        self.every = every
        self.clock = clock
        self.ended: set[str] = set()
        self._seen: dict[str, float] = {}

    def live(self, run: str) -> bool:
        if run in self.ended:
            return False
        now = self.clock()
        if now - self._seen.get(run, -1e18) < self.every:
            return True
        self._seen[run] = now
        state = self.queue.run_state(run)
        if state is None:
            return True                  # an unknown run fails on its own (no params)
        timeout = state.meta.get("driver_timeout")
        if state.state != "active" or (timeout and now - state.heartbeat > timeout):
            self.ended.add(run)
            return False
        return True


class Worker:
    """Serves the queue's tasks of the given kinds (all kinds if None), of the given runs (all
    if None). Tasks of a run that ended or whose driver went quiet are given back and no
    longer pulled; a worker serving named runs stops once all of them have ended
    (`runs_ended()`: a VM then leaves its group)."""

    def __init__(self, queue: TaskQueue, stage_factory: StageFactory,
                 kinds: Optional[Iterable[str]] = None, worker_id: Optional[str] = None,
                 lease_seconds: Optional[float] = None, prefetch: bool = True,
                 log: Optional[JsonLog] = None, idle_backoff: tuple[float, float] = (0.05, 2.0),
                 runs: Optional[Iterable[str]] = None, on_vm: bool = False):
        self.queue = queue
        self.stage_factory = stage_factory
        self.kinds = list(kinds) if kinds else None
        self.runs = list(runs) if runs else None
        self.on_vm = on_vm                  # a cloud VM of its own: billed from its boot
        self.watch = RunWatch(queue)
        self._served: dict[str, float] = {}              # run -> seconds of compute
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_seconds = lease_seconds or getattr(queue, "lease_seconds", 60.0)
        self.prefetch = prefetch
        self.log = log or JsonLog(self.id)
        self.idle_backoff = idle_backoff
        self.stop = threading.Event()
        self.done = 0
        self._held: dict[tuple, Lease] = {}
        self._held_lock = threading.Lock()
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="voxflow-compute")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="voxflow-io")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="voxflow-write")
        self._backoff = idle_backoff[0]
        self._pull_after = 0.0                          # monotonic: no pull before this

    # -- leases ---------------------------------------------------------------------------
    def _hold(self, lease: Lease) -> None:
        with self._held_lock:
            self._held[(lease.run, lease.stage, lease.index)] = lease

    def _holds(self, lease: Lease) -> bool:
        with self._held_lock:
            return (lease.run, lease.stage, lease.index) in self._held

    def _drop(self, lease: Lease) -> bool:
        """Stop holding `lease`; False if it was no longer held (given up or released)."""
        with self._held_lock:
            return self._held.pop((lease.run, lease.stage, lease.index), None) is not None

    def release_all(self) -> int:
        """Give every held lease back now (preemption): another worker takes them at once."""
        with self._held_lock:
            leases, self._held = list(self._held.values()), {}
        for lease in leases:
            self.queue.release(lease)
            self.log("released", run=lease.run, stage=lease.stage, index=lease.index)
        return len(leases)

    def _extend_all(self) -> None:
        with self._held_lock:
            leases = list(self._held.values())
        for lease in leases:
            if not self.queue.extend(lease, self.lease_seconds):
                self.log("lease_lost", "warning", run=lease.run, stage=lease.stage,
                         index=lease.index)

    def _give_up_ended(self) -> None:
        """Release the held leases of runs that are no longer live."""
        with self._held_lock:
            gone = [l for l in self._held.values() if not self.watch.live(l.run)]
            for lease in gone:
                del self._held[(lease.run, lease.stage, lease.index)]
        for lease in gone:
            self.queue.release(lease)
            self.log("run_given_up", "warning", run=lease.run, stage=lease.stage,
                     index=lease.index)

    def runs_ended(self) -> bool:
        """It serves named runs, and every one of them has ended."""
        return self.runs is not None and not any(self.watch.live(r) for r in self.runs)

    # -- taking a task ---------------------------------------------------------------------
    def _take(self) -> Optional[_Job]:
        """Pull one task, validate it, and start loading its input; None if nothing is ready."""
        while not self.stop.is_set():
            leases = self.queue.pull(self.kinds, 1, self.id, self.lease_seconds,
                                     runs=self.runs, skip_runs=self.watch.ended)
            if not leases:
                return None
            lease = leases[0]
            if not self.watch.live(lease.run):
                self.queue.release(lease)            # not ours to run any more
                self.log("run_given_up", "warning", run=lease.run, stage=lease.stage,
                         index=lease.index)
                continue
            try:
                message = decode(lease.body)
                if (message.run, message.stage, message.index) != \
                        (lease.run, lease.stage, lease.index):
                    raise MalformedMessage("message body does not match its queue key")
            except Exception as exc:
                # Malformed: retried like any failure (a newer worker may understand a newer
                # message), then dead-lettered with this error.
                self.queue.nack(lease, task_error(exc))
                self.log("task_failed", "error", run=lease.run, stage=lease.stage,
                         index=lease.index, attempt=lease.attempt, error=_short_error(exc))
                continue
            self._hold(lease)
            job = _Job(lease, message)
            job.loaded = self._io.submit(self._load_job, job)
            return job
        return None

    def _load_job(self, job: _Job) -> object:
        """Build the task's stage (the run's plan; the model, on its first inference task),
        check the message against the plan, read the input. On the I/O thread: the main loop
        stays free to see a stop and release the lease at once (building a stage may load
        a model for seconds). A failure — an unknown run or stage, a box the plan does not
        have, a plan that cannot be built — fails the task like any other."""
        message = job.message
        job.stage = stage = self.stage_factory(message.run, message.stage)
        if stage.box(message.index) != message.bbox:
            raise MalformedMessage(f"box {message.bbox} is not task {message.index}'s "
                                   f"box {stage.box(message.index)} in the run's plan")
        return stage.load(message.index)

    def _next(self) -> Optional[_Job]:
        """`_take`, pulling at most once per idle backoff while nothing is found."""
        now = time.monotonic()
        if now < self._pull_after:
            return None
        job = self._take()
        if job is None:
            self._pull_after = now + self._backoff
            self._backoff = min(self._backoff * 2, self.idle_backoff[1])
        else:
            self._backoff, self._pull_after = self.idle_backoff[0], 0.0
        return job

    def _compute_job(self, job: _Job) -> tuple[object, float]:
        t0 = time.perf_counter()
        loaded = job.loaded.result()                    # sets job.stage
        computed = job.stage.compute(job.message.index, loaded)
        return computed, time.perf_counter() - t0

    def _write_job(self, job: _Job, computed: object) -> float:
        t0 = time.perf_counter()
        job.stage.write(job.message.index, computed)
        return time.perf_counter() - t0

    def _fields(self, job: _Job) -> dict:
        lease = job.lease
        return dict(run=lease.run, stage=lease.stage, index=lease.index, attempt=lease.attempt)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if self._drop(job.lease):                       # still ours: count the attempt
            self.queue.nack(job.lease, task_error(exc))
        self.log("task_failed", "error", error=_short_error(exc),
                 trace="".join(traceback.format_exception(exc, limit=-3)), **self._fields(job))

    def _finish(self, job: _Job) -> None:
        """Ack a task whose writes ended well (if it is still ours), or fail it."""
        exc = job.written.exception()
        if exc is not None:
            return self._fail(job, exc)
        if not self._drop(job.lease):                   # given up meanwhile: not ours to ack
            return
        computed, seconds = job.computed.result()
        skipped = getattr(computed, "skipped", False)    # `voxflow.mask.Skipped`: no model run
        if skipped:
            self.queue.ack(job.lease, skipped=True)     # only now: all its writes are done
        else:
            self.queue.ack(job.lease)
        self.done += 1
        self._served[job.lease.run] = self._served.get(job.lease.run, 0.0) + seconds
        self.log("task_done", seconds=round(seconds, 3), skipped=skipped,
                 write_seconds=round(job.written.result(), 3), **self._fields(job))

    # -- the loop --------------------------------------------------------------------------
    def run(self, exit_when_idle: Optional[float] = None) -> int:
        """Work until `stop` is set, or until idle for `exit_when_idle` seconds."""
        started = last_report = time.time()
        self.log("worker_started", kinds=self.kinds)
        retries_before = storage_retry.retry_count()
        storage_retry.add_listener(self._log_retry)
        nxt: Optional[_Job] = None          # loading
        computing: Optional[_Job] = None    # computing, or computed and waiting for the writer
        writing: Optional[_Job] = None
        idle_since: Optional[float] = None
        extend_every = self.lease_seconds / 3
        last_extend = time.monotonic()
        while not self.stop.is_set():
            if time.time() - last_report >= SESSION_SECONDS:   # a summary taken meanwhile
                self._record_sessions(started)                 # sees this worker's time
                last_report = time.time()
            if self.runs_ended():
                self.log("runs_ended", runs=self.runs)
                break
            if writing is not None and writing.written.done():
                self._finish(writing)
                writing = None
            if computing is not None and computing.computed.done():
                exc = computing.computed.exception()
                if exc is not None:
                    self._fail(computing, exc)
                    computing = None
                elif not self._holds(computing.lease):   # given up meanwhile: not written
                    computing = None
                elif writing is None:
                    writing, computing = computing, None
                    writing.written = self._writer.submit(
                        self._write_job, writing, writing.computed.result()[0])
            if computing is None:
                job, nxt = nxt or self._next(), None
                if job is not None and not self.watch.live(job.lease.run):
                    self._give_up_ended()                # ended while it was prefetched
                    continue
                if job is not None:
                    job.computed = self._compute.submit(self._compute_job, job)
                    computing = job
            if self.prefetch and nxt is None and computing is not None:
                nxt = self._next()
            busy = [j for j in (computing, writing, nxt) if j is not None]
            if not busy:
                now = time.monotonic()
                idle_since = idle_since or now
                if exit_when_idle is not None and now - idle_since >= exit_when_idle:
                    break
                self.stop.wait(max(self._pull_after - now, 0.0))
                continue
            idle_since = None
            pending = [f for f in (computing and computing.computed,
                                   writing and writing.written) if f is not None and not f.done()]
            if pending:
                wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
            self._give_up_ended()
            if time.monotonic() - last_extend >= extend_every:
                self._extend_all()
                last_extend = time.monotonic()
        released = self._stop_pipeline(writing)
        self._record_sessions(started)
        storage_retry.remove_listener(self._log_retry)
        self.log("worker_stopped", done=self.done, released=released,
                 storage_retries=storage_retry.retry_count() - retries_before)
        return self.done

    def _log_retry(self, **fields) -> None:
        """A storage request of this process is retried (`voxflow.retry`): in the log."""
        self.log("storage_retry", "warning", **fields)

    def _stop_pipeline(self, writing: Optional[_Job]) -> int:
        """Release every lease except a write in flight, which may finish within
        `WRITE_GRACE_SECONDS` (then acked), else is released too: never acked half-written."""
        keep = writing.lease if writing is not None else None
        with self._held_lock:
            held = dict(self._held)
        released = 0
        for key, lease in held.items():
            if lease is not keep and self._drop(lease):
                self.queue.release(lease)
                self.log("released", run=lease.run, stage=lease.stage, index=lease.index)
                released += 1
        if writing is not None:
            wait([writing.written], timeout=WRITE_GRACE_SECONDS)
            if writing.written.done():
                self._finish(writing)
        return released + self.release_all()

    def _record_sessions(self, started: float) -> None:
        """Report this session to the queue for each run it served (or was started for):
        how a run learns the worker-hours of machines it cannot see (a gce VM's lifetime
        runs from its boot)."""
        stopped = time.time()
        try:
            booted = stopped - float(open("/proc/uptime").read().split()[0])
        except (OSError, ValueError, IndexError):
            booted = started
        for run in set(self.runs or ()) | set(self._served):
            session = {"worker": self.id, "kind": "+".join(self.kinds or ["all"]),
                       "started": started, "stopped": stopped, "booted": booted,
                       "billed_from": "booted" if self.on_vm else "started",
                       "busy_seconds": round(self._served.get(run, 0.0), 3)}
            try:
                self.queue.record_session(run, session)
            except Exception as exc:              # the queue is gone: the tasks are safe
                self.log("session_not_recorded", "warning", run=run, error=_short_error(exc))

    def shutdown(self) -> None:
        for pool in (self._compute, self._io, self._writer):
            pool.shutdown(wait=False, cancel_futures=True)
