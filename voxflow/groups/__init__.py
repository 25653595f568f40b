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


def open_stage_group(config, kind: str, run: str) -> Optional[WorkerGroup]:
    """The group a run's (`RunConfig`) stages of `kind` run on, as the driver opens it."""
    from ..config import voxflow_home
    workers = getattr(config.workers, kind)
    return open_group(workers.group, config.queue.url, kind, gce=workers.gce, run=run,
                      log_dir=voxflow_home() / "logs" / run,
                      lease_seconds=config.queue.lease_seconds, capacity=workers.max)


def open_group(url: str, queue_url: str, kind: str, gce=None, run: Optional[str] = None,
               **options) -> Optional[WorkerGroup]:
    """The group for `url`; None for local://0 (the driver works the queue itself).

    `run` is the run the group serves: a gce:// group is one managed instance group per run
    (so two runs on one URL never resize or delete each other's VMs), a local one passes it
    to its workers; `run=None` means a group that is not per run. `gce` (a `GceConfig`) is
    for gce:// groups and ignored by local ones; `options` are the local backend's (log_dir,
    lease_seconds, capacity, state_dir): a gce:// group uses only lease_seconds (passed to
    its workers) and ignores the rest.
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
                                 lease_seconds=options.get("lease_seconds"))
    raise ValueError(f"unknown worker group URL {url!r}")
