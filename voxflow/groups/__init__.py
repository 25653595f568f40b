"""`WorkerGroup`: a resizable set of workers, and the `Autoscaler` that sizes it.

Backends by URL: `local://N` (worker processes on this machine; `local://auto`: one per
GPU, or one using every core), `gce://PROJECT/ZONE/GROUP`
(a Compute Engine managed instance group of Spot VMs per run, `gce.py`), `external://`
(workers started by something else: compose services, a Kubernetes deployment, cluster jobs;
voxflow starts and stops nothing and only waits for the queue to drain). The autoscaler is
the same for every backend: target = clamp(ceil(backlog / tasks_per_worker), min, max), zero
once the stage has drained; scale-down stops only idle workers (those holding no lease).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Protocol


class WorkerGroup(Protocol):
    def size(self) -> int:
        """Workers alive (or starting) now; reaps dead ones, which resize() replaces."""

    def resize(self, target: int, busy: set[str]) -> None:
        """Grow to `target`, or shrink by stopping workers not in `busy`."""

    def close(self) -> None:
        """Stop every worker (SIGTERM: their leases are released), then reap them."""


class Autoscaler:
    """Sizes one group from one stage's backlog."""

    def __init__(self, group: WorkerGroup, minimum: int, maximum: int, tasks_per_worker: int):
        self.group = group
        self.min, self.max, self.per = minimum, maximum, tasks_per_worker
        self.target = 0

    def desired(self, backlog: int) -> int:
        if backlog <= 0:
            return 0
        return max(self.min, min(self.max, math.ceil(backlog / self.per)))

    def step(self, backlog: int, busy: set[str]) -> int:
        self.target = self.desired(backlog)
        self.group.resize(self.target, busy)
        return self.target


class ExternalGroup:
    """Workers someone else runs: nothing to size, nothing to stop."""

    def size(self) -> int:
        return 0

    def resize(self, target: int, busy: set[str]) -> None:
        pass

    def close(self) -> None:
        pass


class HybridGroup:
    """Several groups as one (`workers.KIND.group: [local://auto, gce://P/Z/G]`): a target
    fills the members in order, each up to its capacity, so the lab's own workers take the
    backlog first and the cloud the rest; shrinking empties them from the end (the cloud
    part first). `busy` goes to every member (each knows only its own workers)."""

    def __init__(self, members: list[tuple[WorkerGroup, int]]):
        self.members = members                  # (group, the most workers it may run)

    def size(self) -> int:
        return sum(group.size() for group, _ in self.members)

    def resize(self, target: int, busy: set[str]) -> None:
        left = max(0, target)
        for group, capacity in self.members:
            share = min(capacity, left)
            group.resize(share, busy)
            left -= share

    def close(self) -> None:
        for group, _ in reversed(self.members):
            group.close()


def open_stage_group(config, kind: str, run: str,
                     state_dir: Optional[Path] = None) -> Optional[WorkerGroup]:
    """The group a run's (`RunConfig`) stages of `kind` run on, as the driver opens it;
    `state_dir` keeps local members' pid files (a group that outlives its opener)."""
    from ..config import voxflow_home
    from .local import local_capacity
    workers = getattr(config.workers, kind)

    def member(url: str, capacity: int, where: Optional[Path]) -> Optional[WorkerGroup]:
        return open_group(url, config.queue.url, kind, gce=workers.gce, run=run,
                          log_dir=voxflow_home() / "logs" / run,
                          lease_seconds=config.queue.lease_seconds, capacity=capacity,
                          state_dir=where, threads=workers.threads)

    if isinstance(workers.group, str):
        return member(workers.group, workers.max, state_dir)
    members = []
    for i, url in enumerate(workers.group):
        capacity = local_capacity(url) if url.startswith("local://") else workers.max
        members.append((member(url, capacity, state_dir / str(i) if state_dir else None),
                        capacity))
    return HybridGroup(members)


def open_group(url: str, queue_url: str, kind: str, gce=None, run: Optional[str] = None,
               **options) -> Optional[WorkerGroup]:
    """The group for `url`; None for local://0 (the driver works the queue itself).

    `run` is the run the group serves: a gce:// group is one managed instance group per run
    (so two runs on one URL never resize or delete each other's VMs), a local one passes it
    to its workers; `run=None` means a group that is not per run. `gce` (a `GceConfig`) is
    for gce:// groups and ignored by local ones; `options` are the local backend's (log_dir,
    lease_seconds, capacity, state_dir, threads): a gce:// group uses only lease_seconds and
    threads (passed to its workers) and ignores the rest.
    """
    if url.startswith("local://"):
        from .local import LocalGroup, visible_gpus
        if url == "local://auto":
            return LocalGroup(queue_url, kind, run=run, devices=visible_gpus(), **options)
        if int(url[len("local://"):]) == 0:
            return None
        return LocalGroup(queue_url, kind, run=run, **options)
    if url == "external://":
        return ExternalGroup()
    if url.startswith("gce://"):
        if gce is None:
            raise ValueError(f"worker group {url!r} needs its gce settings (workers.KIND.gce)")
        from .gce import GceGroup
        return GceGroup.from_url(url, queue_url, kind, gce, run=run,
                                 lease_seconds=options.get("lease_seconds"),
                                 threads=options.get("threads"))
    raise ValueError(f"unknown worker group URL {url!r}")
