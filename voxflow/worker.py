"""`Worker`: pull a task, keep its lease alive, run the stage's operation, ack.

The main thread only controls: it pulls, extends leases, watches for a stop, and acks or
nacks. Computing happens on one thread and reading the next task's input (prefetch, at most
one task ahead) on another, so a stop (SIGTERM on a Spot VM) is acted on within a fraction
of a second even in the middle of a long forward pass: the held leases are released at once
and the process may exit; the half-done task is simply redone elsewhere (tasks are idempotent).
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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, TextIO

from .messages import MalformedMessage, TaskMessage, decode
from .queues import Lease, TaskQueue

StageFactory = Callable[[str, str], object]   # (run, stage) -> Stage
SESSION_SECONDS = 60.0                        # how often a working worker re-reports its session


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
    stage: object
    loaded: Future


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text[:2000]


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
                 runs: Optional[Iterable[str]] = None):
        self.queue = queue
        self.stage_factory = stage_factory
        self.kinds = list(kinds) if kinds else None
        self.runs = list(runs) if runs else None
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

    # -- leases ---------------------------------------------------------------------------
    def _hold(self, lease: Lease) -> None:
        with self._held_lock:
            self._held[(lease.run, lease.stage, lease.index)] = lease

    def _drop(self, lease: Lease) -> None:
        with self._held_lock:
            self._held.pop((lease.run, lease.stage, lease.index), None)

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
                stage = self.stage_factory(message.run, message.stage)
                if stage.box(message.index) != message.bbox:
                    raise MalformedMessage(f"box {message.bbox} is not task {message.index}'s "
                                           f"box {stage.box(message.index)} in the run's plan")
            except Exception as exc:
                # Malformed, unknown run or stage, or a plan that cannot be built: retried
                # like any failure (a newer worker may understand a newer message), then
                # dead-lettered with this error.
                self.queue.nack(lease, _short_error(exc))
                self.log("task_failed", "error", run=lease.run, stage=lease.stage,
                         index=lease.index, attempt=lease.attempt, error=_short_error(exc))
                continue
            self._hold(lease)
            return _Job(lease, message, stage, self._io.submit(stage.load, message.index))
        return None

    def _process(self, job: _Job) -> float:
        t0 = time.perf_counter()
        job.stage.process(job.message.index, job.loaded.result())
        return time.perf_counter() - t0

    # -- the loop --------------------------------------------------------------------------
    def run(self, exit_when_idle: Optional[float] = None) -> int:
        """Work until `stop` is set, or until idle for `exit_when_idle` seconds."""
        started = last_report = time.time()
        self.log("worker_started", kinds=self.kinds)
        nxt: Optional[_Job] = None
        idle_since: Optional[float] = None
        backoff = self.idle_backoff[0]
        extend_every = self.lease_seconds / 3
        last_extend = time.monotonic()
        while not self.stop.is_set():
            if time.time() - last_report >= SESSION_SECONDS:   # a summary taken meanwhile
                self._record_sessions(started)                 # sees this worker's time
                last_report = time.time()
            if self.runs_ended():
                self.log("runs_ended", runs=self.runs)
                break
            job, nxt = nxt or self._take(), None
            if job is None:
                now = time.monotonic()
                idle_since = idle_since or now
                if exit_when_idle is not None and now - idle_since >= exit_when_idle:
                    break
                self.stop.wait(backoff)
                backoff = min(backoff * 2, self.idle_backoff[1])
                continue
            idle_since, backoff = None, self.idle_backoff[0]
            if not self.watch.live(job.lease.run):       # ended while it was prefetched
                self._give_up_ended()
                continue
            future = self._compute.submit(self._process, job)
            if self.prefetch:
                nxt = self._take()
            while not self.stop.is_set():
                if wait([future], timeout=0.05).done:
                    break
                self._give_up_ended()
                if not self.watch.live(job.lease.run):
                    break                             # released; its compute runs out unused
                if time.monotonic() - last_extend >= extend_every:
                    self._extend_all()
                    last_extend = time.monotonic()
            if self.stop.is_set():
                break
            lease = job.lease
            if not self.watch.live(lease.run):
                self._give_up_ended()
                continue
            fields = dict(run=lease.run, stage=lease.stage, index=lease.index,
                          attempt=lease.attempt)
            try:
                seconds = future.result()
            except Exception as exc:
                self.queue.nack(lease, _short_error(exc))
                self._drop(lease)
                self.log("task_failed", "error", error=_short_error(exc),
                         trace=traceback.format_exc(limit=-3), **fields)
                continue
            self.queue.ack(lease)                 # only now: the task's writes are complete
            self._drop(lease)
            self.done += 1
            self._served[lease.run] = self._served.get(lease.run, 0.0) + seconds
            self.log("task_done", seconds=round(seconds, 3), **fields)
        released = self.release_all()
        self._record_sessions(started)
        self.log("worker_stopped", done=self.done, released=released)
        return self.done

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
                       "busy_seconds": round(self._served.get(run, 0.0), 3)}
            try:
                self.queue.record_session(run, session)
            except Exception as exc:              # the queue is gone: the tasks are safe
                self.log("session_not_recorded", "warning", run=run, error=_short_error(exc))

    def shutdown(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)
