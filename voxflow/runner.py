"""The driver of one run: plan, create layers, then stage by stage publish, scale, wait.

Each stage's tasks go through the queue; a worker group, sized by the autoscaler, serves
them; the driver only watches the stage's counters (progress) until nothing is open, then
scales the group to zero — also when the run fails or is interrupted. While it waits it
heart-beats; when it ends (succeeded, failed, interrupted) it says so, and workers give the
run up at once; a driver killed outright stops heart-beating, and workers give the run up
after `queue.driver_timeout_seconds` — no group outlives its run. The run id follows the
run's content (`voxflow.identity`): re-running the same model and parameters skips the
tasks already done, as long as the output layer still exists (a run that has to create its
output forgets the run's old done records). A stage with dead tasks stops the run:
later stages would read incomplete data. In overlap mode the run's temporary partial sums are
deleted once every stage has succeeded (unless `inference.keep_temporary`), as are the
segmentation's objects and the levels (`normalize:`); a failed or interrupted run keeps
them, so resuming it skips the work already done.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

from .temporary import TemporaryStore, temporary_url
from .config import RunConfig, voxflow_home
from .cost import bill, spent
from .groups import Autoscaler, WorkerGroup, open_stage_group
from .messages import encode
from .identity import run_identity
from .pipeline import Plan, create_layers, plan
from .queues import DeadLetter, StageStats, TaskQueue, open_queue
from .stages import StageCache, stage_grid, stage_kind, stage_names
from .worker import JsonLog, Worker

HEARTBEAT_SECONDS = 2.0         # how often a waiting driver says it is alive
HEARTBEAT_EVERY = 100_000       # ... and every so many published messages


class Reporter(Protocol):
    """Progress sink: the CLI draws bars, tests record."""

    def begin(self, run: str, queue: str) -> None: ...

    def start(self, stage: str, total: int, skipped: int) -> None: ...

    def update(self, done: int, dead: int) -> None: ...

    def finish(self) -> None: ...

    # optional: `skip(count)`, the stage's tasks not run (outside the mask, or skipped as
    # empty by the workers), called before each update when the reporter has it


def skipped_tasks(p: Plan, name: str, stats: Optional[StageStats]) -> int:
    """Tasks of a stage that are not run: outside the mask (never published) plus those the
    workers skipped (`skip_empty`; counted done too)."""
    return (p.masked if name == "inference" else 0) + (stats.skipped if stats else 0)


class RunFailed(RuntimeError):
    """Tasks of a stage ended in dead letters; names them and why."""

    def __init__(self, run: str, stage: str, dead: list[DeadLetter], count: int):
        self.run, self.stage, self.dead, self.count = run, stage, dead, count
        shown = "; ".join(f"#{d.index} after {d.attempts} attempt(s): {d.headline}"
                          for d in dead[:5])
        more = f" (and {count - 5} more: voxflow status {run})" if count > 5 else ""
        super().__init__(f"run {run}: {count} task(s) of stage {stage} are dead: {shown}{more}")


@dataclass
class StageSummary:
    name: str
    tasks: int              # published
    skipped: int            # already done when published (a resumed run)
    seconds: float
    masked: int = 0         # outside the mask: not published
    empty: int = 0          # skipped by the workers: input all one value (in `tasks`)


@dataclass
class RunSummary:
    run: str
    output: str
    voxels: int
    model_digest: str
    stages: list[StageSummary] = field(default_factory=list)
    bill: dict = field(default_factory=dict)      # what plan estimated (`voxflow.cost.bill`)
    spent: dict = field(default_factory=dict)     # what was measured (`voxflow.cost.spent`)


def default_run_id(config: RunConfig) -> str:
    """Same content, same run id: re-running resumes (see `voxflow.identity`)."""
    return run_identity(config).run_id(config.output)


def register(config: RunConfig, p: Plan, run_id: Optional[str] = None,
             estimate: Optional[dict] = None, orchestrator: Optional[dict] = None
             ) -> tuple[str, dict]:
    """Create the output layers and register the run with its queue (any orchestrator calls
    this once plan has succeeded). Returns the run id and what the queue keeps with it:
    the identity, the plan's dollar estimate (`estimate`, the bill) and who drives the run
    (`orchestrator`, e.g. the Airflow DAG run), which the console shows."""
    identity = run_identity(config)
    run_id = run_id or identity.run_id(config.output)
    created = create_layers(p)
    meta = {**identity.meta(), "driver_timeout": config.queue.driver_timeout_seconds,
            "estimate_usd": (estimate or bill(p))["dollars"]["total"],
            "orchestrator": orchestrator or {"driver": "voxflow run"}}
    queue = open_queue(config.queue.url, **queue_options(config))
    try:
        if created:
            queue.forget_run(run_id)      # done records describe an output that is gone
        queue.register_run(run_id, config.model_dump_json(), config.queue.max_attempts, meta)
    finally:
        queue.close()
    return run_id, meta


def queue_options(config: RunConfig) -> dict:
    return {"lease_seconds": config.queue.lease_seconds,
            "max_attempts": config.queue.max_attempts,
            "retention_seconds": config.queue.retention_seconds}


def run(config: RunConfig, reporter: Optional[Reporter] = None, run_id: Optional[str] = None,
        poll_seconds: float = 0.2, started: Optional[dict[str, WorkerGroup]] = None
        ) -> RunSummary:
    """`started`: groups already started for this run (by kind; see `start_early`), which
    the first stage of their kind takes over (and closes, as any stage's group)."""
    started = started if started is not None else {}
    p = plan(config)
    estimate = bill(p)
    run_id, meta = register(config, p, run_id, estimate)
    queue = open_queue(config.queue.url, **queue_options(config))
    if reporter:
        reporter.begin(run_id, queue.url)
    summary = RunSummary(run_id, config.output, p.bbox.size, meta["model_digest"],
                         bill=estimate)
    poll_seconds = max(poll_seconds, getattr(queue, "poll_seconds", 0.0))
    ended = "failed"
    try:
        for name in stage_names(p):
            summary.stages.append(_run_stage(config, p, queue, run_id, name, reporter,
                                             poll_seconds, started.pop(stage_kind(name), None)))
        queue.finish(run_id)
        ended = "succeeded"
    except KeyboardInterrupt:
        ended = "cancelled"
        raise
    finally:
        queue.end_run(run_id, ended)      # workers give the run up at once
        queue.close()
    summary.spent = spent(config, run_id)           # counts the partial sums: before deleting
    if has_temporary(config) and not config.inference.keep_temporary:
        delete_temporary(config, run_id)
    return summary


def has_temporary(config: RunConfig) -> bool:
    """Whether a run leaves temporary data: overlap mode's partial sums, the segmentation's
    faces, pairs and table, the levels' histograms and windows."""
    return config.inference.blend == "overlap" or config.segmentation is not None \
        or config.normalize is not None


def delete_temporary(config: RunConfig, run_id: str) -> None:
    """Delete a succeeded run's temporary data (any orchestrator calls this after the last
    stage; deleting twice is harmless)."""
    TemporaryStore(temporary_url(config, run_id)).delete_all()


def publish_stage(queue: TaskQueue, run_id: str, p: Plan, name: str) -> int:
    """Publish every task of a stage (streamed from its lazy grid), heart-beating as it goes
    (publishing 10^7 tasks takes minutes); returns how many were already done (a resumed
    run skips them). Publishing again re-sends only what the queue may have lost. Inference
    tasks outside the mask are never published (`Plan.runs`)."""
    grid, kind = stage_grid(p, name), stage_kind(name)
    before = queue.stats(run_id).get(name)
    masked = name == "inference" and p.tissue is not None

    def messages():
        for i in range(len(grid)):
            if i and i % HEARTBEAT_EVERY == 0:
                queue.heartbeat(run_id)
            if masked and not p.runs(i):
                continue
            yield i, encode(run_id, name, i, grid.box(i))

    queue.publish(run_id, name, kind, messages())
    return before.done if before else 0


def heartbeat(queue: TaskQueue, run_id: str, p: Plan) -> None:
    """The driver's periodic duty while a run is open: say it is alive, and republish the
    stages whose messages may have outlived the queue's retention."""
    for name in queue.heartbeat(run_id):
        publish_stage(queue, run_id, p, name)


def _run_stage(config, p, queue, run_id, name, reporter, poll_seconds,
               group: Optional[WorkerGroup] = None) -> StageSummary:
    t0 = time.perf_counter()
    kind = stage_kind(name)
    skipped = publish_stage(queue, run_id, p, name)
    stats = queue.stats(run_id)[name]
    if reporter:
        reporter.start(name, stats.total, skipped)
    workers = getattr(config.workers, kind)
    log_dir = voxflow_home() / "logs" / run_id
    group = group or open_stage_group(config, kind, run_id)
    inline: Optional[Worker] = None
    thread: Optional[threading.Thread] = None
    if group is None:                              # local://0: this process works the queue
        log_dir.mkdir(parents=True, exist_ok=True)
        wid = f"driver-{os.getpid()}"
        inline = Worker(queue, StageCache(queue), [kind], worker_id=wid, runs=[run_id],
                        log=JsonLog(wid, open(log_dir / f"{wid}.log", "a")))
        thread = threading.Thread(target=inline.run, name="voxflow-inline-worker", daemon=True)
        thread.start()
    scaler = Autoscaler(group, workers.min, workers.max, workers.tasks_per_worker) \
        if group else None
    beat = 0.0
    try:
        while True:
            if time.monotonic() - beat >= HEARTBEAT_SECONDS:
                heartbeat(queue, run_id, p)
                beat = time.monotonic()
            stats = queue.stats(run_id)[name]
            if reporter:
                if hasattr(reporter, "skip"):
                    reporter.skip(skipped_tasks(p, name, stats))
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
    return StageSummary(name, stats.total, skipped, time.perf_counter() - t0,
                        p.masked if name == "inference" else 0, stats.skipped)
