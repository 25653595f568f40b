"""`TaskQueue`: the one interface between the driver and the workers.

At-least-once delivery with leases: `pull` hands out a message with a lease (visibility
timeout); the holder `extend`s it while working, then `ack`s (the task is recorded done),
`nack`s (failed: retried until `max_attempts`, then dead-lettered with the error), or
`release`s it (preempted: back at once, not counted as an attempt). A lease that expires
counts as an attempt, so a task that kills its worker every time still ends in dead letters.
Backends are chosen by URL: `sqlite:///path/queue.db` (embedded default) and
`pubsub://PROJECT/PREFIX?ledger=URL` (Google Cloud Pub/Sub plus a run ledger in storage).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Protocol


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
    error: str


class TaskQueue(Protocol):
    def publish(self, run: str, stage: str, kind: str,
                messages: Iterable[tuple[int, str]]) -> int:
        """Add (index, body) messages; existing (run, stage, index) are kept as they are
        (done stays done). Returns how many were new."""

    def pull(self, kinds: Optional[Iterable[str]] = None, n: int = 1, worker: str = "",
             lease_seconds: Optional[float] = None) -> list[Lease]: ...

    def extend(self, lease: Lease, seconds: Optional[float] = None) -> bool: ...

    def ack(self, lease: Lease) -> None: ...

    def nack(self, lease: Lease, error: str) -> None: ...

    def release(self, lease: Lease) -> None: ...

    def stats(self, run: str) -> dict[str, StageStats]: ...

    def dead_letters(self, run: str, limit: int = 100) -> list[DeadLetter]: ...

    def retry_dead(self, run: str) -> int: ...

    def busy_workers(self, kind: Optional[str] = None) -> set[str]: ...

    def register_run(self, run: str, params: str) -> None: ...

    def run_params(self, run: str) -> str: ...

    def forget_run(self, run: str) -> int: ...

    def finish(self, run: str) -> None:
        """The run succeeded: free what it holds in the queue (Pub/Sub topics); records stay."""

    def close(self) -> None: ...


def open_queue(url: str, **options) -> TaskQueue:
    """A queue backend by URL."""
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteQueue
        return SQLiteQueue(url, **options)
    if url.startswith("pubsub://"):
        from .pubsub import PubSubQueue
        return PubSubQueue(url, **options)
    raise ValueError(f"unknown queue URL {url!r} (expected sqlite:///path or "
                     "pubsub://PROJECT/PREFIX?ledger=URL)")
