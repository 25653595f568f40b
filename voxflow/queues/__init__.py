"""`TaskQueue`: the one interface between the driver and the workers.

At-least-once delivery with leases: `pull` hands out a message with a lease (visibility
timeout); the holder `extend`s it while working, then `ack`s (the task is recorded done),
`nack`s (failed: retried until `max_attempts`, then dead-lettered with the error), or
`release`s it (preempted: back at once, not counted as an attempt). A lease that expires
counts as an attempt, so a task that kills its worker every time still ends in dead letters.
Done wins over dead: a task that succeeds after it was counted dead (its lease was given up
while the work went on) is counted done only.

A run has a state besides its tasks, so that no worker serves a run its driver has left: the
driver `heartbeat`s while it waits on a stage and `end_run`s it; workers read `run_state`
(one cheap read) every few seconds and give a run up once it is not "active" or its heartbeat
is stale, then `pull(..., skip_runs=...)` never hands them its tasks again.

Backends are chosen by URL: `sqlite:///path/queue.db` (embedded default) and
`pubsub://PROJECT/PREFIX?ledger=URL` (Google Cloud Pub/Sub plus a run ledger in storage).
`open_queue(url, readonly=True)` gives a queue that only reads (status pages, `voxflow
status`): it creates nothing and refuses every method that writes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Iterable, Optional, Protocol, TypeVar

if TYPE_CHECKING:
    import numpy as np

ACTIVE = "active"
ENDED = ("succeeded", "failed", "cancelled")
# a task's state, as `task_states` codes it (SQLite stores the first four); SKIPPED: never
# published because the run's mask leaves it out (the chunk map's code, not a queue's)
PENDING, LEASED, DONE, DEAD, UNPUBLISHED, SKIPPED = 0, 1, 2, 3, 4, 5
STATE_NAMES = ("pending", "leased", "done", "dead", "unpublished", "skipped")


@dataclass(frozen=True)
class Lease:
    """One delivered message; `token` proves who holds it."""

    run: str
    stage: str
    index: int
    body: str
    attempt: int
    token: str


@dataclass(frozen=True)
class StageStats:
    pending: int = 0
    leased: int = 0
    done: int = 0
    dead: int = 0
    skipped: int = 0      # of done: finished without running (`ack(..., skipped=True)`)

    @property
    def total(self) -> int:
        return self.pending + self.leased + self.done + self.dead

    @property
    def open(self) -> int:
        """Tasks not yet finished one way or the other (the backlog)."""
        return self.pending + self.leased


@dataclass(frozen=True)
class DeadLetter:
    run: str
    stage: str
    index: int
    attempts: int
    error: str                     # the error's line, then the traceback (`task_error`)

    @property
    def headline(self) -> str:
        return self.error.split("\n", 1)[0]


@dataclass(frozen=True)
class RunState:
    """Whether a run's driver still owns it: what workers check before serving it."""

    state: str                  # "active" | "succeeded" | "failed" | "cancelled"
    heartbeat: float            # time.time() of the driver's last heartbeat (or registration)
    meta: dict                  # what register_run was given (the run's identity)


def check_end_state(state: str) -> str:
    if state not in ENDED:
        raise ValueError(f"a run ends {' or '.join(map(repr, ENDED))}, not {state!r}")
    return state


F = TypeVar("F", bound=Callable)


def writes(method: F) -> F:
    """Marks a queue method that writes: a queue opened read-only refuses it."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.readonly:
            raise PermissionError(f"{self.url} is open read-only: {method.__name__} writes")
        return method(self, *args, **kwargs)
    return guarded  # type: ignore[return-value]


class TaskQueue(Protocol):
    url: str
    readonly: bool

    def publish(self, run: str, stage: str, kind: str,
                messages: Iterable[tuple[int, str]]) -> int:
        """Add (index, body) messages; existing (run, stage, index) are kept as they are
        (done stays done). Returns how many were sent (new, or re-sent because the queue
        may have lost them: `heartbeat` names such stages)."""

    def pull(self, kinds: Optional[Iterable[str]] = None, n: int = 1, worker: str = "",
             lease_seconds: Optional[float] = None, runs: Optional[Collection[str]] = None,
             skip_runs: Collection[str] = ()) -> list[Lease]:
        """Lease up to `n` tasks of `kinds` (all if None), only of `runs` (all if None) and
        never of `skip_runs` (runs this worker has given up)."""

    def extend(self, lease: Lease, seconds: Optional[float] = None) -> bool: ...

    def ack(self, lease: Lease, skipped: bool = False) -> None:
        """Record the task done (idempotent); `skipped`: it finished without running its
        operation (an empty input), counted in `StageStats.skipped` too."""

    def nack(self, lease: Lease, error: str) -> None: ...

    def release(self, lease: Lease) -> None: ...

    def stats(self, run: str) -> dict[str, StageStats]: ...

    def dead_letters(self, run: str, limit: int = 100) -> list[DeadLetter]: ...

    def retry_dead(self, run: str, stage: Optional[str] = None,
                   index: Optional[int] = None) -> int:
        """Give the run's dead tasks (of one stage, or one task) fresh attempts; returns how
        many."""

    def task_states(self, run: str, stage: str, size: int) -> "np.ndarray":
        """uint8 state code of each task index in [0, size) (UNPUBLISHED where none was
        published): the operator console's chunk map."""

    def busy_workers(self, kind: Optional[str] = None, run: Optional[str] = None) -> set[str]:
        """Workers holding an unexpired lease (of `kind`, of `run`)."""

    def register_run(self, run: str, params: str, max_attempts: Optional[int] = None,
                     meta: Optional[dict] = None) -> None:
        """Store the run's parameters and identity; the run is "active", heartbeat now."""

    def heartbeat(self, run: str) -> list[str]:
        """The driver is alive: the run is "active" again, heartbeat now. Returns the stages
        whose open tasks the queue may soon lose (publish them again). KeyError if the run
        is not registered."""

    def end_run(self, run: str, state: str) -> None:
        """Mark the run "succeeded", "failed" or "cancelled" (workers give it up)."""

    def run_state(self, run: str) -> Optional[RunState]:
        """One cheap read; None if the run is not registered."""

    def run_params(self, run: str) -> str: ...

    def record_session(self, run: str, session: dict) -> None:
        """A worker's own report of how long it served the run (`Worker`): worker id, kind,
        started, stopped and its machine's boot time — what a run's summary prices for
        groups whose workers run on other machines (gce, external)."""

    def sessions(self, run: str) -> list[dict]:
        """Every session recorded for the run."""

    def runs(self) -> list[str]:
        """Registered runs, oldest first."""

    def forget_run(self, run: str) -> int:
        """Delete the run's tasks and records; its registration stays."""

    def finish(self, run: str) -> None:
        """The run succeeded: free what it holds in the queue (Pub/Sub topics); records stay."""

    def close(self) -> None: ...


def open_queue(url: str, **options) -> TaskQueue:
    """A queue backend by URL; options (lease_seconds, max_attempts, retention_seconds,
    readonly, ...) go to its constructor."""
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteQueue
        return SQLiteQueue(url, **options)
    if url.startswith("pubsub://"):
        from .pubsub import PubSubQueue
        return PubSubQueue(url, **options)
    raise ValueError(f"unknown queue URL {url!r} (expected sqlite:///path or "
                     "pubsub://PROJECT/PREFIX?ledger=URL)")
