"""The driver of one run: plan, create layers, then stage by stage publish, scale, wait.

Each stage's tasks go through the queue; a worker group, sized by the autoscaler, serves
them; the driver only watches the stage's counters (progress) until nothing is open, then
scales the group to zero — also when the run fails or is interrupted. Re-running the same
run skips the tasks already done, as long as the output layer still exists (a run that has to
create its output forgets the run's old done records). A stage with dead tasks stops the run:
later stages would read incomplete data. In overlap mode the run's temporary partial sums are
deleted once every stage has succeeded (unless `inference.keep_temporary`); a failed or
interrupted run keeps them, so resuming it skips the inference already done.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

from .blend import TemporaryStore, temporary_url
from .config import RunConfig, voxflow_home
from .groups import Autoscaler, open_group
from .messages import encode
from .pipeline import Plan, create_layers, plan
from .queues import DeadLetter, TaskQueue, open_queue
from .stages import StageCache, stage_grid, stage_kind, stage_names
from .worker import JsonLog, Worker


class Reporter(Protocol):
    """Progress sink: the CLI draws bars, tests record."""

    def begin(self, run: str, queue: str) -> None: ...

    def start(self, stage: str, total: int, skipped: int) -> None: ...

    def update(self, done: int, dead: int) -> None: ...

    def finish(self) -> None: ...


class RunFailed(RuntimeError):
    """Tasks of a stage ended in dead letters; names them and why."""

    def __init__(self, run: str, stage: str, dead: list[DeadLetter], count: int):
        self.run, self.stage, self.dead, self.count = run, stage, dead, count
        shown = "; ".join(f"#{d.index} after {d.attempts} attempt(s): {d.error}"
                          for d in dead[:5])
        more = f" (and {count - 5} more: voxflow status {run})" if count > 5 else ""
        super().__init__(f"run {run}: {count} task(s) of stage {stage} are dead: {shown}{more}")


@dataclass
class StageSummary:
    name: str
    tasks: int
    skipped: int
    seconds: float


@dataclass
class RunSummary:
    run: str
    output: str
    voxels: int
    stages: list[StageSummary] = field(default_factory=list)


def default_run_id(config: RunConfig) -> str:
    """Same config, same run id: re-running resumes. Readable: the output layer's name."""
    digest = hashlib.sha1(config.model_dump_json().encode()).hexdigest()[:10]
    name = config.output.rstrip("/").rsplit("/", 1)[-1]
    return f"{name}-{digest}"


def run(config: RunConfig, reporter: Optional[Reporter] = None, run_id: Optional[str] = None,
        poll_seconds: float = 0.2) -> RunSummary:
    run_id = run_id or default_run_id(config)
    p = plan(config)
    created = create_layers(p)
    queue = open_queue(config.queue.url, lease_seconds=config.queue.lease_seconds,
                       max_attempts=config.queue.max_attempts)
    if created:
        queue.forget_run(run_id)          # done records describe an output that is gone
    queue.register_run(run_id, config.model_dump_json(), config.queue.max_attempts)
    if reporter:
        reporter.begin(run_id, queue.url)
    summary = RunSummary(run_id, config.output, p.bbox.size)
    poll_seconds = max(poll_seconds, getattr(queue, "poll_seconds", 0.0))
    try:
        for name in stage_names(p):
            summary.stages.append(_run_stage(config, p, queue, run_id, name, reporter,
                                             poll_seconds))
        queue.finish(run_id)
    finally:
        queue.close()
    if config.inference.blend == "overlap" and not config.inference.keep_temporary:
        delete_temporary(config, run_id)
    return summary


def delete_temporary(config: RunConfig, run_id: str) -> None:
    """Delete a succeeded overlap-mode run's partial sums (any orchestrator calls this after
    the last stage; deleting twice is harmless)."""
    TemporaryStore(temporary_url(config, run_id)).delete_all()


def publish_stage(queue: TaskQueue, run_id: str, p: Plan, name: str) -> int:
    """Publish every task of a stage (streamed from its lazy grid); returns how many were
    already done (a resumed run skips them)."""
    grid, kind = stage_grid(p, name), stage_kind(name)
    before = queue.stats(run_id).get(name)
    queue.publish(run_id, name, kind,
                  ((i, encode(run_id, name, i, grid.box(i))) for i in range(len(grid))))
    return before.done if before else 0


def _run_stage(config, p, queue, run_id, name, reporter, poll_seconds) -> StageSummary:
    t0 = time.perf_counter()
    kind = stage_kind(name)
    skipped = publish_stage(queue, run_id, p, name)
    stats = queue.stats(run_id)[name]
    if reporter:
        reporter.start(name, stats.total, skipped)
    workers = getattr(config.workers, kind)
    log_dir = voxflow_home() / "logs" / run_id
    group = open_group(workers.group, queue.url, kind,
                       log_dir=log_dir,
                       lease_seconds=config.queue.lease_seconds, capacity=workers.max,
                       gce=workers.gce)
    inline: Optional[Worker] = None
    thread: Optional[threading.Thread] = None
    if group is None:                              # local://0: this process works the queue
        log_dir.mkdir(parents=True, exist_ok=True)
        wid = f"driver-{os.getpid()}"
        inline = Worker(queue, StageCache(queue.run_params), [kind], worker_id=wid,
                        log=JsonLog(wid, open(log_dir / f"{wid}.log", "a")))
        thread = threading.Thread(target=inline.run, name="voxflow-inline-worker", daemon=True)
        thread.start()
    scaler = Autoscaler(group, workers.min, workers.max, workers.tasks_per_worker) \
        if group else None
    try:
        while True:
            stats = queue.stats(run_id)[name]
            if reporter:
                reporter.update(stats.done, stats.dead)
            if stats.open == 0:
                break
            if scaler:
                scaler.step(stats.open, queue.busy_workers(kind))
            elif not thread.is_alive():
                raise RuntimeError("the inline worker stopped unexpectedly")
            time.sleep(poll_seconds)
    finally:
        if group:
            group.close()                          # scale to zero, also on failure
        if inline:
            inline.stop.set()
            thread.join()
            inline.shutdown()
            inline.log.stream.close()
        if reporter:
            reporter.finish()
    if stats.dead:
        raise RunFailed(run_id, name, queue.dead_letters(run_id), stats.dead)
    return StageSummary(name, stats.total, skipped, time.perf_counter() - t0)
